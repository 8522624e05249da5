"""Training settings: one typed model (pydantic), saved as ``config.yaml`` in the run folder and in
every checkpoint. Recipes are named sets of overrides, kept here with the defaults.

Every setting is checked for type and range when it is parsed (a file, ``--set``, a recipe, a
constructor call), before any folder is made or data is read; the problems come back as one
:class:`SettingsError` with one line each, naming the key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    with_config,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from detfit.errors import DetfitError


class SettingsError(DetfitError):
    """Settings that fail validation; the message has one line per problem."""

    same_on_every_rank = True  # from the command line: every torchrun rank finds the same


def _not_bool(value: Any) -> Any:
    # YAML's true/false would otherwise pass as 1.0/0.0
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


# Integers are strict (no "10" or true); floats also take YAML 1.1's "1e-3", which it reads as a
# string, but not booleans.
Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_not_bool)]
PositiveInt = Annotated[int, Strict(), Field(ge=1)]
PositiveFloat = Annotated[float, BeforeValidator(_not_bool), Field(gt=0)]
Fraction = Annotated[float, BeforeValidator(_not_bool), Field(ge=0, le=1)]
# Bounds on hostile or mistyped settings: a 60000-pixel side would allocate ~25 GB per image.
MAX_IMAGE_SIDE = 8192
ImageSide = Annotated[int, Strict(), Field(ge=1, le=MAX_IMAGE_SIDE)]


@with_config(ConfigDict(extra="allow"))
class ModelOptions(TypedDict, total=False):
    """The model options detfit knows, typed. Any other keyword of the torchvision detector class
    is passed on unchecked here; the builder refuses a name the chosen model does not take."""

    min_size: Annotated[
        ImageSide | list[ImageSide],
        Field(
            description="short image side after resizing; a list: one at random per training "
            "image, the last in evaluation"
        ),
    ]
    max_size: Annotated[ImageSide, Field(description="cap on the long image side after resizing")]
    size: Annotated[
        Annotated[int, Strict(), Field(ge=32)], Field(description="SSDLite's square input size")
    ]
    trainable_backbone_layers: Annotated[
        Annotated[int, Strict(), Field(ge=0)] | None,
        Field(
            description="backbone stages trained, the others frozen (the most depends on the "
            "backbone: 5 for ResNets); None: the default"
        ),
    ]
    anchor_sizes: Annotated[
        list[list[PositiveFloat]],
        Field(description="anchor sizes in pixels, one list per feature map"),
    ]
    aspect_ratios: Annotated[
        list[PositiveFloat] | list[list[PositiveFloat]],
        Field(
            description="anchor height/width ratios: one list for all feature maps, or one per map"
        ),
    ]
    detections_per_img: Annotated[PositiveInt, Field(description="most detections kept per image")]
    score_thresh: Annotated[
        Fraction, Field(description="detections scoring below this are dropped")
    ]
    nms_thresh: Annotated[
        Fraction, Field(description="IoU above which NMS suppresses the lower-scoring detection")
    ]
    box_detections_per_img: Annotated[
        PositiveInt, Field(description="R-CNN name of detections_per_img")
    ]
    box_score_thresh: Annotated[Fraction, Field(description="R-CNN name of score_thresh")]
    box_nms_thresh: Annotated[Fraction, Field(description="R-CNN name of nms_thresh")]
    box_batch_size_per_image: Annotated[
        PositiveInt, Field(description="RoIs sampled per image to train the box head")
    ]
    box_positive_fraction: Annotated[
        Fraction, Field(description="share of positive RoIs in that sample")
    ]
    box_fg_iou_thresh: Annotated[Fraction, Field(description="IoU from which a RoI is a positive")]
    box_bg_iou_thresh: Annotated[Fraction, Field(description="IoU below which a RoI is background")]
    rpn_pre_nms_top_n_train: Annotated[
        PositiveInt, Field(description="proposals per level before NMS, training")
    ]
    rpn_post_nms_top_n_train: Annotated[
        PositiveInt, Field(description="proposals kept after NMS, training")
    ]
    rpn_pre_nms_top_n_test: Annotated[
        PositiveInt, Field(description="proposals per level before NMS, evaluation")
    ]
    rpn_post_nms_top_n_test: Annotated[
        PositiveInt, Field(description="proposals kept after NMS, evaluation")
    ]
    rpn_batch_size_per_image: Annotated[
        PositiveInt, Field(description="anchors sampled per image to train the RPN")
    ]
    rpn_positive_fraction: Annotated[
        Fraction, Field(description="share of positive anchors in that sample")
    ]
    rpn_nms_thresh: Annotated[Fraction, Field(description="the RPN's NMS IoU")]
    rpn_fg_iou_thresh: Annotated[
        Fraction, Field(description="IoU from which an anchor is a positive")
    ]
    rpn_bg_iou_thresh: Annotated[
        Fraction, Field(description="IoU below which an anchor is background")
    ]
    rpn_score_thresh: Annotated[
        Fraction, Field(description="proposals scoring below this are dropped")
    ]
    topk_candidates: Annotated[
        PositiveInt, Field(description="RetinaNet/FCOS: candidates per level before NMS")
    ]
    image_mean: Annotated[
        Annotated[list[Float], Field(min_length=3, max_length=3)], Field(description="RGB mean")
    ]
    image_std: Annotated[
        Annotated[list[PositiveFloat], Field(min_length=3, max_length=3)],
        Field(description="RGB std"),
    ]
    keep_classes: Annotated[
        list[str] | None,
        Field(description="COCO classes whose pretrained rows are kept, as labels 1, 2, ..."),
    ]
    keep_keypoints: Annotated[
        list[str] | None, Field(description="Keypoint R-CNN: pretrained keypoints kept")
    ]
    num_keypoints: Annotated[
        PositiveInt, Field(description="Keypoint R-CNN: keypoints per object (from the data)")
    ]
    num_levels: Annotated[
        PositiveInt | None, Field(description="situation B: FPN levels, from stride 32 down")
    ]
    fpn_channels: Annotated[PositiveInt | None, Field(description="situation B: FPN width")]
    mask_head_channels: Annotated[
        PositiveInt, Field(description="situation B Mask R-CNN: mask head width")
    ]
    mask_head_norm: Annotated[
        bool, Field(description="situation B Mask R-CNN: BatchNorm in the mask head")
    ]
    mask_levels: Annotated[
        PositiveInt | None, Field(description="situation B Mask R-CNN: finest N levels for masks")
    ]


@functools.cache
def known_model_options() -> frozenset[str]:
    """Every option name some model takes (the union of the registry's per-model options)."""
    from detfit.models.registry import MODELS

    names = set(ModelOptions.__annotations__)
    for spec in MODELS.values():
        names |= spec.options
    return frozenset(names)


def did_you_mean(name: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_of(name: str, choices: Sequence[str]) -> str:
    """``must be one of a, b (did you mean 'a'?)``: the message for a name not among choices."""
    return f"must be one of {', '.join(choices)}{did_you_mean(name, choices)}"


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds in ``30m``, ``1.5h``, ``900s`` (a plain number counts seconds)."""
    value, unit = text.strip(), "s"
    if value and value[-1].lower() in _DURATION_UNITS:
        value, unit = value[:-1], value[-1].lower()
    try:
        seconds = float(value) * _DURATION_UNITS[unit]
    except ValueError:
        raise ValueError("must be a duration such as 30m, 1.5h or 900s") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError("must be a positive duration such as 30m, 1.5h or 900s")
    return seconds


# The COCO metric's implementations (detfit.eval.backends), the same numbers from each.
EvalBackend = Literal["faster-coco-eval", "pycocotools"]
# Memory layouts for the model's 4-D weights and activations (detfit.models.speedups).
MemoryFormat = Literal["auto", "channels_last", "contiguous"]
# Arithmetic of training, evaluation and prediction (detfit.models.precision).
Precision = Literal["fp32", "bf16", "fp16"]
# Where a run's curves and numbers also go (detfit.engine.tensorboard, detfit.engine.mlflow_logger).
LoggerName = Literal["none", "tensorboard", "mlflow"]
# The speed-up settings (models.speedups), at the values that switch each off (the plain path).
# Each keeps the model's function, so a run may change them on resume.
SPEED_UPS_OFF: dict[str, Any] = {
    "fold_frozen_bn": False,
    "memory_format": "contiguous",
    "fused_optimizer": False,
    "sparse_roi_align": False,
    "compile": False,
}


class TrainConfig(BaseModel):
    """Every setting of a run. ``cfg.epochs`` reads and ``cfg.epochs = 5`` writes, validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    # what to train
    model: str = Field(
        "maskrcnn_resnet50_fpn", description="architecture (detfit models lists them)"
    )
    weights: str | None = Field(
        "default",
        description="detector weights: default (lowercase: what detfit's registry picks for this "
        "model, e.g. none for a backbone swap), DEFAULT (torchvision's best enum member), an enum "
        "name, a .pth file, or none",
    )
    weights_backbone: str | None = Field(
        "default",
        description="backbone weights: default (the registry's pick, e.g. IMAGENET1K_V1), "
        "DEFAULT (torchvision's best), an enum name, a .pth file, or none",
    )
    model_options: ModelOptions = Field(
        default_factory=dict, description="model options (see below and README 'Models')"
    )
    # data
    dataset: str = Field(
        "pennfudan", description="pennfudan, FORMAT:PATH[,key=value] or a dataset .yaml"
    )
    data_root: str | None = Field(
        None, description="Penn-Fudan folder; None: detfit's cache (downloaded once)"
    )
    num_test: PositiveInt = Field(
        50, description="images held out for evaluation when the dataset gives no val/test split"
    )
    split_seed: Int = Field(0, description="seed of that held-out split")
    max_pixels: PositiveInt = Field(
        50_000_000,
        description="images with more pixels are refused before decoding (a 12000x12000 PNG of "
        "450 KB decodes to 432 MB and trains in 15 GB)",
    )
    photometric: bool = Field(False, description="colour jitter while training")
    hflip_prob: Fraction = Field(0.5, description="probability of a horizontal flip in training")
    # augmentation, test-time augmentation, time budget and early stopping (docs/augmentation.md)
    augment: Literal["basic", "ssj", "lsj"] = Field(
        "basic",
        description="basic: flip, colour, the model's size list; ssj/lsj: also rescale by "
        "0.8-1.25 / 0.1-2.0 and crop or pad to a square canvas",
    )
    augment_size: PositiveInt | None = Field(
        None,
        description="ssj/lsj canvas side in pixels; None: the largest model_options.min_size "
        "(800 without one)",
    )
    copy_paste: Fraction = Field(
        0.0,
        description="probability of pasting some objects of another training image (needs masks)",
    )
    tta: bool = Field(
        False, description="evaluate with test-time augmentation (the image and its mirror)"
    )
    tta_scales: Annotated[list[PositiveFloat], Field(min_length=1, max_length=5)] = Field(
        [1.0],
        description="test-time augmentation's sizes, as factors of the model's own resize "
        "(1.0); every size is also mirrored, e.g. [1.0, 1.15]",
    )
    adapt_to_data: bool = Field(
        True,
        description="let the training set's image and object sizes choose the resize, anchors, "
        "proposal counts and detection cap the recipe left to it (false: the recipe's numbers)",
    )
    time_budget: str | None = Field(
        None,
        description="wall-clock budget for training and its evaluations, e.g. 30m, 1.5h, 900s: "
        "plans the epochs and the lr schedule to end in it",
    )
    patience: PositiveInt | None = Field(
        None, description="stop after N evaluations without a better best_metric; None: never"
    )
    best_metric: str | None = Field(
        None,
        description="IOUTYPE_STAT that picks best.pt and patience watches, e.g. segm_AP50; "
        "None: segm_AP for mask models, else bbox_AP",
    )
    # optimisation (the tutorial's by default)
    epochs: Annotated[PositiveInt, Field(le=100_000)] = Field(10, description="training epochs")
    max_iters_per_epoch: PositiveInt | None = Field(
        None, description="cut epochs short (smoke runs); None: whole epochs"
    )
    batch_size: PositiveInt = Field(2, description="images per training batch")
    eval_batch_size: PositiveInt = Field(1, description="images per evaluation batch")
    eval_backend: EvalBackend = Field(
        "faster-coco-eval",
        description="COCO metric: faster-coco-eval (C++) or pycocotools (the reference)",
    )
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="optimizer")
    lr: PositiveFloat = Field(0.005, description="base learning rate")
    momentum: Annotated[Float, Field(ge=0, lt=1)] = Field(0.9, description="SGD momentum")
    weight_decay: Annotated[Float, Field(ge=0)] = Field(0.0005, description="weight decay")
    warmup_iters: Annotated[int, Strict(), Field(ge=0)] = Field(
        1000, description="linear warm-up iterations, capped at the first epoch's length"
    )
    warmup_factor: Annotated[Float, Field(gt=0, le=1)] = Field(
        0.001, description="lr factor at the start of the warm-up"
    )
    lr_schedule: Literal["step", "multistep", "cosine", "constant"] = Field(
        "step", description="decay after the warm-up"
    )
    lr_step_size: PositiveInt = Field(3, description="step: epochs between lr x lr_gamma")
    lr_milestones: list[Annotated[int, Strict(), Field(ge=0)]] = Field(
        default_factory=lambda: [8, 11], description="multistep: epochs where lr x lr_gamma"
    )
    lr_gamma: PositiveFloat = Field(0.1, description="step/multistep decay factor")
    clip_grad_norm: PositiveFloat | None = Field(
        None, description="clip the gradient norm to this; None: no clipping"
    )
    loss_weights: dict[str, Annotated[Float, Field(ge=0)]] = Field(
        default_factory=dict, description="factor per named loss, e.g. {loss_mask: 2.0}"
    )
    ema_decay: Annotated[Float, Field(gt=0, lt=1)] | None = Field(
        None, description="evaluate a moving average of the weights (e.g. 0.99); None: off"
    )
    amp: bool = Field(
        False,
        description="mixed precision when precision is unset: bf16 on the CPU, fp16 on CUDA",
    )
    precision: Precision | None = Field(
        None,
        description="fp32; bf16 (autocast, on CPUs with AVX-512 BF16 or AMX, and CUDA); fp16 "
        "(autocast with loss scaling, CUDA only); None: amp decides (docs/speed.md)",
    )
    # running
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    workers: Annotated[int, Strict(), Field(ge=0)] = Field(
        2, description="data-loading processes (0: in the main process)"
    )
    threads: PositiveInt | None = Field(
        None, description="torch intra-op threads on the CPU; None: torch's default"
    )
    fold_frozen_bn: bool = Field(
        True,
        description="run each frozen BatchNorm inside the convolution before it (same function, "
        "faster)",
    )
    memory_format: MemoryFormat = Field(
        "auto", description="auto: channels_last on the CPU (faster there), contiguous elsewhere"
    )
    fused_optimizer: bool = Field(
        True, description="the optimizer's fused one-kernel step where torch has one for the device"
    )
    sparse_roi_align: bool = Field(
        True,
        description="RoIAlign as a sparse matrix product on the CPU (same function, faster)",
    )
    compile: bool = Field(
        False,
        description="torch.compile (inductor) the backbone and FPN; off by default: its compile "
        "time was not recovered on the CPU (docs/speed.md)",
    )
    seed: Annotated[int, Strict(), Field(ge=0, lt=2**32)] = Field(0, description="random seed")
    aspect_ratio_group_factor: Annotated[int, Strict(), Field(ge=-1)] = Field(
        3, description="grouped batching by aspect ratio; -1 disables it"
    )
    print_freq: PositiveInt = Field(
        10, description="iterations between progress-bar updates of the loss and learning rate"
    )
    plots: bool = Field(
        True,
        description="results.png every epoch; PR curves, confusion matrix and val_predictions.jpg "
        "for the best epoch",
    )
    val_loss: bool = Field(
        False, description="also compute the losses on the held-out split every epoch (val_*)"
    )
    logger: LoggerName | list[LoggerName] = Field(
        "none",
        description="tensorboard: scalars and images under RUN/tensorboard; mlflow: params, "
        "metrics and pictures in an MLflow store; a list for several, e.g. [tensorboard, mlflow]",
    )
    # experiment tracking (logger: mlflow; see docs/experiments.md)
    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow store; None: $MLFLOW_TRACKING_URI, else sqlite in mlruns/ of the "
        "current folder (beside runs/)",
    )
    mlflow_experiment: str = Field("detfit", description="MLflow experiment the run is logged in")
    mlflow_tags: dict[str, str] = Field(
        default_factory=dict, description="tags on the MLflow run (detfit tune adds the study's)"
    )
    checkpoint_every_iters: PositiveInt | None = Field(
        None, description="also write last.pt every N training iterations"
    )
    lr_scaling: Literal["none", "linear"] = Field(
        "none", description="linear: lr x world size under torchrun"
    )
    sync_bn: bool = Field(False, description="SyncBatchNorm under torchrun")
    world_size: PositiveInt = Field(
        1, description="recorded by the run: set by the launch, not by you"
    )
    global_batch_size: PositiveInt | None = Field(
        None, description="recorded by the run: set by the launch, not by you"
    )
    out: str | None = Field(None, description="run folder; None: runs/<model>[-N]")
    run_id: str | None = Field(
        None,
        description="recorded by the run: a new id when it starts, in config.yaml and every "
        "checkpoint (--resume refuses a last.pt of another run)",
    )
    recipe: str = Field("tutorial", description="the recipe these settings started from")

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from detfit.models.registry import MODELS

        if name not in MODELS:
            raise ValueError(
                f"not a model detfit builds{did_you_mean(name, list(MODELS))}; "
                "`detfit models` lists them"
            )
        return name

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, name: str) -> str:
        if name == "auto":
            import torch

            return "tutorial" if torch.cuda.is_available() else "cpu"
        if name not in RECIPES:
            raise ValueError(one_of(name, ["auto", *RECIPES]))
        return name

    @field_validator("time_budget")
    @classmethod
    def _duration(cls, text: str | None) -> str | None:
        if text is not None:
            parse_duration(text)
        return text

    @field_validator("best_metric")
    @classmethod
    def _metric_name(cls, name: str | None) -> str | None:
        if name is None:
            return name
        iou_type, _, stat = name.partition("_")
        from detfit.eval.coco import KEYPOINT_STAT_NAMES, STAT_NAMES

        stats = KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES
        if iou_type not in ("bbox", "segm", "keypoints") or stat not in stats:
            names = [f"{t}_{s}" for t in ("bbox", "segm") for s in STAT_NAMES]
            names += [f"keypoints_{s}" for s in KEYPOINT_STAT_NAMES]
            raise ValueError(
                f"must be bbox_, segm_ or keypoints_ and a COCO number ({', '.join(STAT_NAMES)})"
                + did_you_mean(name, names)
            )
        return name

    @field_validator("eval_backend", mode="before")
    @classmethod
    def _known_backend(cls, name: Any) -> Any:
        if isinstance(name, str) and name not in get_args(EvalBackend):
            raise ValueError(one_of(name, get_args(EvalBackend)))
        return name

    @field_validator("model_options", mode="wrap")
    @classmethod
    def _known_options(cls, options: Any, handler: Any) -> dict[str, Any]:
        """Unknown names first (with a "did you mean"), then types; the user's order is kept."""
        if isinstance(options, dict):
            known = known_model_options()
            unknown = [k for k in options if k not in known]
            if unknown:  # one error per key, so each is reported as model_options.KEY=VALUE
                raise ValidationError.from_exception_data(
                    "model_options",
                    [
                        {
                            "type": PydanticCustomError(
                                "unknown_option",
                                "no model takes this option"
                                + did_you_mean(str(k), sorted(known)).replace("{", "("),
                            ),
                            "loc": (k,),
                            "input": options[k],
                        }
                        for k in unknown
                    ],
                )
        checked = handler(options)
        return {k: checked[k] for k in options if k in checked}

    # Validation errors become SettingsError (a DetfitError) wherever they are raised.
    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SettingsError(describe_errors(exc, data)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise SettingsError(describe_errors(exc, {name: value})) from None

    def loggers(self) -> list[str]:
        """The loggers in force: ``logger`` as a list, without ``none``."""
        names = [self.logger] if isinstance(self.logger, str) else self.logger
        return [n for n in dict.fromkeys(names) if n != "none"]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what config.yaml and checkpoints hold)."""
        return self.model_dump()

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` (as ``dataclasses.replace``)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> TrainConfig:
        """Validate ``data``; ``source`` (a file, ``--set``) prefixes every problem line."""
        prefix = f"{source}: " if source else ""
        if not isinstance(data, dict):
            raise SettingsError(f"{prefix}settings must be a mapping of names to values")
        names = [k for k in data if not isinstance(k, str)]
        if names:  # YAML keys can be numbers; pydantic's __init__ takes keywords only
            raise SettingsError(f"{prefix}{names[0]!r} is not a setting name")
        try:
            return cls.model_validate(data)  # pydantic runs __init__, which raises SettingsError
        except ValidationError as exc:
            raise SettingsError(describe_errors(exc, data, source)) from None
        except SettingsError as exc:
            if not source:
                raise
            lines = str(exc).splitlines()
            raise SettingsError("\n".join(prefix + line for line in lines)) from None

    def save(self, path: str | Path) -> None:
        from detfit.fileio import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(load_settings(path), str(path))


def check_setting(name: str, value: Any, source: str | None = None) -> Any:
    """``value`` as setting ``name`` takes it (checked by the same rules as a config file), for a
    value that arrives on its own, e.g. ``detfit eval --backend``; a problem is one SettingsError
    line naming ``source`` (default: the setting). The one validator of a setting's value."""
    cfg = TrainConfig.model_construct()
    try:
        BaseModel.__setattr__(cfg, name, value)
    except ValidationError as exc:
        line = describe_errors(exc, {name: value})
        raise SettingsError(f"{source or name}{line.removeprefix(name)}") from None
    return getattr(cfg, name)


def load_settings(path: str | Path) -> dict[str, Any]:
    """A settings file as plain data, not yet validated (so that overrides can still fix it)."""
    from detfit.yamlio import load_yaml

    try:
        data = load_yaml(Path(path).read_text(), str(path), SettingsError) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SettingsError(f"{path}: cannot read settings ({first})") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: a settings file must be a mapping of settings")
    return data


# Settings that hold a mapping: their problems are reported per key (model_options.min_size).
_MAPPINGS = ("model_options", "loss_weights")


def _lookup(data: Any, loc: tuple) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _message(error: dict[str, Any]) -> str:
    msg = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    msg = msg.replace("Input should be", "must be").replace("Input", "value")
    return msg.replace("Extra inputs are not permitted", "unknown")


def describe_errors(exc: ValidationError, data: dict[str, Any], source: str = "") -> str:
    """One line per setting in error: ``key=value: what is allowed`` (union branches joined; a
    long value cut to an excerpt)."""
    from detfit.yamlio import excerpt

    found: dict[str, tuple[Any, list[str]]] = {}
    for error in exc.errors():
        loc = tuple(error["loc"])
        depth = 2 if loc and loc[0] in _MAPPINGS and len(loc) > 1 else 1
        key_loc = loc[:depth]
        key = ".".join(map(str, key_loc)) or "settings"
        if error["type"] == "extra_forbidden":
            fields = list(TrainConfig.model_fields)
            msg = f"unknown setting{did_you_mean(str(loc[-1]), fields)}"
        else:
            msg = _message(error)
        value = _lookup(data, key_loc) if key_loc else None
        messages = found.setdefault(key, (value, []))[1]
        if msg not in messages:
            messages.append(msg)
    prefix = f"{source}: " if source else ""
    lines = []
    for key, (value, messages) in found.items():
        text = messages[0] + "".join(", or " + m.removeprefix("must be ") for m in messages[1:])
        lines.append(f"{prefix}{key}={excerpt(value)}: {text}")
    return "\n".join(lines)


def merge_settings(
    base: dict[str, Any],
    overrides: dict[str, Any] | None = None,
    sets: Sequence[str] = (),
) -> dict[str, Any]:
    """``base`` with ``overrides`` (None values skipped; mappings such as ``model_options``
    merged key by key) and then ``--set KEY=VALUE`` items (YAML values; ``a.b=1`` reaches into a
    mapping). The one place settings are combined: the CLI, recipes and the sweep use it."""
    from detfit.yamlio import excerpt, load_yaml

    merged = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    for item in sets:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        shown = item if len(item) <= 100 else f"{item[:97]}..."  # messages quote an excerpt
        if not sep or not all(parts):
            raise SettingsError(
                f"--set {shown!r}: expected KEY=VALUE, e.g. epochs=5 or model_options.min_size=512"
            )
        try:
            value = load_yaml(text, f"--set {key}", SettingsError)
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise SettingsError(
                f"--set {shown}: {excerpt(text)} is not a YAML value ({first})"
            ) from None
        node = merged
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise SettingsError(
                    f"--set {shown}: {where}={excerpt(child)} is a single value, it has no keys "
                    "to set"
                )
            node = child
        node[parts[-1]] = value
    return merged


def flatten_settings(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Settings one level deep: mappings flattened with dots (``model_options.min_size``), as
    MLflow params and ``detfit runs`` show them."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_settings(value, f"{name}."))
        else:
            flat[name] = value
    return flat


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
        # what this machine can do in 30 minutes, evaluations included: the budget plans the
        # epochs and ends the cosine schedule there; without a budget, the 22 epochs the fp32
        # recipe fit on a quiet 2-core Zen 4 (bf16 fits more)
        "time_budget": "30m",
        "epochs": 22,
        # bfloat16 autocast (fp32 with one line on CPUs without it): 1.6x the iterations in the
        # same 30 minutes, and higher AP there than fp32 on both seeds (BENCHMARKS.md)
        "precision": "bf16",
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


def resolve_recipe(name: str) -> str:
    """``auto`` as ``detfit train`` reads it (``tutorial`` when CUDA is present, else ``cpu``);
    any other name checked against RECIPES, by the ``recipe`` setting's own rule."""
    return check_setting("recipe", name)


# With a time budget the budget plans the epochs: a recipe's own epoch count is no limit then
# (the tutorial's 10 would cap a 2-hour budget at 10 epochs), only a user's ``epochs`` is.
BUDGET_EPOCHS = 1000


def uncap_for_budget(settings: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (a recipe's, merged with the user's ``user`` settings) with ``epochs`` raised
    to :data:`BUDGET_EPOCHS` when a ``time_budget`` is set and the user did not give ``epochs``,
    so that the budget, not the recipe's epoch count, ends the run."""
    if settings.get("time_budget") and user.get("epochs") is None:
        settings["epochs"] = max(settings.get("epochs") or 0, BUDGET_EPOCHS)
    return settings


def recipe_config(name: str, *, uncap: bool = True, **overrides: Any) -> TrainConfig:
    """A TrainConfig for recipe ``name`` (``auto`` included) with ``overrides`` merged on top (see
    merge_settings); with a ``time_budget`` and no ``epochs`` in ``overrides`` the budget alone
    plans the epochs (:func:`uncap_for_budget`), unless ``uncap`` is false (a base that the
    user's settings are merged onto later, and uncapped then: a user's ``time_budget=null``
    must bring back the recipe's epochs)."""
    name = resolve_recipe(name)
    data = merge_settings(RECIPES[name], overrides)
    if uncap:
        data = uncap_for_budget(data, overrides)
    data["recipe"] = name
    return TrainConfig.from_dict(data, f"recipe {name}")


def _schema_type(schema: dict[str, Any]) -> str:
    """A JSON-schema node as a short type: ``int >= 1``, ``float in [0, 1]``, ``sgd | adamw``."""
    if "anyOf" in schema:
        return " | ".join(_schema_type(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(map(str, schema["enum"]))
    if "const" in schema:
        return str(schema["const"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list[{_schema_type(schema.get('items', {}))}]"
    if kind == "object":
        extra = schema.get("additionalProperties")
        return f"dict[str, {_schema_type(extra)}]" if isinstance(extra, dict) else "mapping"
    name = {"integer": "int", "number": "float", "string": "str", "boolean": "bool"}.get(kind, kind)
    low = high = None
    for key, bound in (("minimum", "["), ("ge", "["), ("exclusiveMinimum", "("), ("gt", "(")):
        low = (bound, schema[key]) if key in schema else low
    for key, bound in (("maximum", "]"), ("le", "]"), ("exclusiveMaximum", ")"), ("lt", ")")):
        high = (bound, schema[key]) if key in schema else high
    if low and high:
        return f"{name} in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
    if low:
        return f"{name} {'>=' if low[0] == '[' else '>'} {_num(low[1])}"
    if high:
        return f"{name} {'<=' if high[0] == ']' else '<'} {_num(high[1])}"
    return name


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) and value < 10**6 else f"{value:g}"


def settings_table(recipe: str | None = None) -> list[tuple[str, str, str, str]]:
    """(name, type, value, meaning) for every setting, then every known model option. The value is
    the one recipe ``recipe`` gives (``auto``: the recipe ``detfit train`` would use here), or
    TrainConfig's plain default; a model option the recipe does not set shows ``-``."""
    cfg = recipe_config(recipe, uncap=False).to_dict() if recipe else TrainConfig().to_dict()
    schema = TrainConfig.model_json_schema()
    rows = []
    for name, prop in schema["properties"].items():
        kind = "mapping" if name == "model_options" else _schema_type(prop)
        value = cfg[name] if name != "model_options" else {}
        rows.append((name, kind, "null" if value is None else str(value), prop["description"]))
    options = schema["$defs"]["ModelOptions"]["properties"]
    for name, prop in options.items():
        value = str(cfg["model_options"][name]) if name in cfg["model_options"] else "-"
        rows.append((f"model_options.{name}", _schema_type(prop), value, prop["description"]))
    return rows
