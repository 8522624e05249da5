"""Training settings: one dataclass, saved as ``config.yaml`` in the run folder and in every
checkpoint. Recipes are named sets of overrides, kept here with the defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from detfit.errors import DetfitError


@dataclass
class TrainConfig:
    # what to train
    model: str = "maskrcnn_resnet50_fpn"
    weights: str | None = "default"  # "default" = the registry's choice; DEFAULT, enum name, path
    weights_backbone: str | None = "default"
    model_options: dict[str, Any] = field(default_factory=dict)  # min_size, trainable layers, ...
    # data
    dataset: str = "pennfudan"
    data_root: str | None = None  # None: download into detfit's cache
    num_test: int = 50
    split_seed: int = 0
    photometric: bool = False
    hflip_prob: float = 0.5
    # optimisation (the tutorial's by default)
    epochs: int = 10
    max_iters_per_epoch: int | None = None  # cut epochs short: smoke runs and quick checks
    batch_size: int = 2
    eval_batch_size: int = 1
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 0.0005
    warmup_iters: int = 1000  # capped at the first epoch's length, as the references do
    warmup_factor: float = 0.001
    lr_schedule: str = "step"  # step | multistep | cosine | constant
    lr_step_size: int = 3
    lr_milestones: list[int] = field(default_factory=lambda: [8, 11])
    lr_gamma: float = 0.1
    clip_grad_norm: float | None = None
    loss_weights: dict[str, float] = field(default_factory=dict)  # e.g. {loss_mask: 2.0}
    ema_decay: float | None = None  # evaluate a moving average of the weights (e.g. 0.99)
    amp: bool = False
    checkpoint_every_iters: int | None = None  # also write last.pt every N training iterations
    # torchrun: "linear" multiplies lr by the number of processes (lr is set for one process's
    # batch); "none" keeps lr as given for the global batch of world_size x batch_size
    lr_scaling: str = "none"
    sync_bn: bool = False  # SyncBatchNorm under torchrun (BatchNorm layers that train)
    # running
    device: str = "auto"
    workers: int = 2
    threads: int | None = None  # torch intra-op threads on the CPU (None: torch's default)
    seed: int = 0
    aspect_ratio_group_factor: int = 3  # -1 disables grouped batching
    print_freq: int = 10
    out: str | None = None  # run folder (default runs/<model>-<n>)
    recipe: str = "tutorial"
    # recorded by the run: set by the launch, not by you
    world_size: int = 1
    global_batch_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DetfitError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        from detfit.fileio import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise DetfitError(f"{path}: cannot read config ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise DetfitError(f"{path}: a config must be a mapping of settings")
        return cls.from_dict(data, str(path))


# Named recipes: overrides on TrainConfig's defaults, one place for every tuned number.
RECIPES: dict[str, dict[str, Any]] = {
    # The tutorial's published run: COCO-pretrained Mask R-CNN, 10 epochs (meant for a GPU).
    "tutorial": {},
    # No GPU: ImageNet MobileNetV2-FPN Mask R-CNN, tuned for a 30-minute run on 2 cores (see
    # BENCHMARKS.md for the curves behind each number). Why: the RoI heads, not the backbone,
    # dominate CPU time, so they are slimmed (128-ch FPN, 64 sampled RoIs per image); images stay
    # near Penn-Fudan's own size (352-448 px short side); AdamW trains the from-scratch heads
    # far faster than SGD here (SGD at lr 0.02 diverged; AdamW gave 2x the AP after one epoch);
    # the loss weight, EMA and lr came from the variants in benchmarks/sweeps/.
    "cpu": {
        "model": "maskrcnn_mobilenet_v2_fpn",
        "weights": None,
        "weights_backbone": "IMAGENET1K_V1",
        "model_options": {
            # random per image while training; torchvision evaluates at the last one
            "min_size": [352, 384, 416, 448, 416],
            "max_size": 700,
            "trainable_backbone_layers": 4,
            "fpn_channels": 128,
            "mask_head_channels": 256,
            "mask_head_norm": True,
            "box_batch_size_per_image": 64,
            "rpn_pre_nms_top_n_train": 1000,
            "rpn_post_nms_top_n_train": 500,
            "rpn_pre_nms_top_n_test": 500,
            "rpn_post_nms_top_n_test": 150,
            "box_detections_per_img": 30,  # Penn-Fudan has at most 8 people per image
        },
        "epochs": 11,
        "optimizer": "adamw",
        "lr": 0.0004,
        "weight_decay": 0.0001,
        "warmup_iters": 100,
        "lr_schedule": "cosine",
        "clip_grad_norm": 10.0,
        # the mask head limits segm AP: its loss counts twice; the averaged weights are evaluated
        "loss_weights": {"loss_mask": 2.0},
        "ema_decay": 0.99,
        "photometric": True,
        "workers": 1,
    },
}


def recipe_config(name: str, **overrides: Any) -> TrainConfig:
    """A TrainConfig for recipe ``name`` with ``overrides`` applied on top."""
    if name not in RECIPES:
        raise DetfitError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    data = {
        **RECIPES[name],
        **{k: v for k, v in overrides.items() if v is not None},
        "recipe": name,
    }
    return TrainConfig.from_dict(data, f"recipe {name}")
