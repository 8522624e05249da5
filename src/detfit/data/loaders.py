"""The data of a run as the settings name it: the datasets (checked, split into training and
held-out images) and this process's loaders. Training and ``detfit eval`` build theirs here."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from detfit.config import TrainConfig
from detfit.data import (
    AnnotatedSet,
    DatasetSpec,
    DetectionDataset,
    PennFudanDataset,
    aspect_ratio_groups,
    collate_fn,
    eval_transforms,
    resolve_pennfudan,
    split_dataset,
    train_transforms,
    validate,
)
from detfit.data.adapt import DataSizes, data_sizes
from detfit.data.copy_paste import CopyPaste
from detfit.data.formats.masks import read_mask_folder
from detfit.data.sampling import EpochBatches, PerItemSeed, ShardBatches
from detfit.errors import DetfitError


@dataclass
class Datasets:
    train: Dataset
    test: Dataset  # the held-out split that is evaluated
    classes: list[str]
    category_ids: list[int] | None = None  # the source's category id per label
    has_masks: bool = True
    keypoint_names: list[str] | None = None
    # where ``test`` comes from: "val", "test", "train", "split" (the seeded split's held-out
    # part), "split-train" (its training part), "all" (every image); see held_out_source
    held_out: str = "split"
    max_objects: int = 0  # the most objects in one training image (detection caps adapt to it)
    sizes: DataSizes | None = None  # the training set's image and object sizes (adapt.py)


def held_out_count(n: int, cfg: TrainConfig, what: str, log: Callable[[str], None]) -> int:
    """Images the seeded split holds out: ``num_test``, or a fifth when the set is smaller."""
    if n < 2:
        raise DetfitError(f"{what}: {n} image(s); a seeded split needs at least 2 (or give val=)")
    if cfg.num_test < n:
        return cfg.num_test
    num_test = max(1, n // 5)
    log(f"{what}: {n} images, fewer than num_test={cfg.num_test}; holding out {num_test}")
    return num_test


def build_datasets(
    cfg: TrainConfig,
    download: bool = True,
    log: Callable[[str], None] = print,
    *,
    held_out: str = "val",
    split: str | None = None,
) -> Datasets:
    """The configured dataset, checked, with the split that is evaluated: the spec's ``held_out``
    split ("val" while training, "test" for ``detfit eval``) if it names one, else the other of
    val/test, else the seeded tutorial split of ``num_test`` images; ``held_out="all"`` (``detfit
    eval --data``): the test or val split, else every image. ``split`` (``detfit eval --split``)
    names the split evaluated instead: one the dataset names, or, for a dataset that names none
    (Penn-Fudan among them), ``train`` and ``test`` are the two parts of the seeded split.

    Every format, Penn-Fudan included, goes through the same check first (every image decoded):
    fatal problems stop here with one line naming the file.
    """
    spec = DatasetSpec.parse(cfg.dataset)
    if spec.format == "pennfudan":
        given = str(spec.train.path) if str(spec.train.path) != "." else None
        if split == "val":
            raise DetfitError(
                f"{spec.text or 'pennfudan'}: no val split (train and test are the seeded split "
                f"that holds out num_test={cfg.num_test} images)"
            )
        root = resolve_pennfudan(given or cfg.data_root, download=download)
        records = read_mask_folder(root, ["person"])
        validate([records], spec.text or "pennfudan", log, max_pixels=cfg.max_pixels)
        train_full = PennFudanDataset(root, training_transforms(cfg))
        test_full = PennFudanDataset(root, eval_transforms())
        classes, most = list(PennFudanDataset.classes), most_objects(records)
        if held_out == "all" and split is None:
            return Datasets(train_full, test_full, classes, max_objects=most, held_out="all")
        num_test = held_out_count(len(train_full), cfg, str(root), log)
        train, test = split_dataset(train_full, test_full, num_test, cfg.split_seed)
        if split == "train":
            test = Subset(test_full, train.indices)
        train = with_copy_paste(cfg, train, True)
        source = "split-train" if split == "train" else "split"
        return Datasets(
            train, test, classes, max_objects=most, sizes=data_sizes(records), held_out=source
        )

    train_set = spec.read("train")
    source = held_out_source(spec, held_out, split)
    eval_set = spec.read(source, train_set.classes) if source in ("val", "test") else None
    train_tf = training_transforms(cfg, train_set.keypoint_names)
    validate(
        [train_set] + ([eval_set] if eval_set else []), spec.text, log, max_pixels=cfg.max_pixels
    )
    if eval_set is not None or source in ("all", "train"):
        train = DetectionDataset(train_set, train_tf, train=True)
        test = DetectionDataset(eval_set or train_set, eval_transforms())
    else:
        num_test = held_out_count(len(train_set.images), cfg, spec.text, log)
        every_image = DetectionDataset(train_set, eval_transforms())
        train, test = split_dataset(
            DetectionDataset(train_set, train_tf, train=True),
            every_image,
            num_test,
            cfg.split_seed,
        )
        if source == "split-train":
            test = Subset(every_image, train.indices)
    return Datasets(
        with_copy_paste(cfg, train, train_set.has_masks, spec.text, log),
        test,
        train_set.classes,
        train_set.category_ids,
        train_set.has_masks and (eval_set is None or eval_set.has_masks),
        train_set.keypoint_names,
        source,
        most_objects(train_set),
        data_sizes(train_set),
    )


def held_out_source(spec: DatasetSpec, held_out: str, split: str | None) -> str:
    """Where the evaluated images come from (:attr:`Datasets.held_out`): a split the spec names
    (val, test, train), the seeded split's held-out part ("split") or its training part
    ("split-train"), or every image ("all"). See :func:`build_datasets`."""
    named = [s for s in ("val", "test") if getattr(spec, s) is not None]
    if split == "train":
        return "train" if named else "split-train"
    if split is not None:
        if split not in named and (named or split == "val"):
            raise DetfitError(f"{spec.text}: no {split} split (it has {', '.join(spec.splits)})")
        return split if named else "split"
    order = ("val", "test") if held_out == "val" else ("test", "val")
    unsplit = "all" if held_out == "all" else "split"
    return next((s for s in order if getattr(spec, s) is not None), unsplit)


def augment_canvas(cfg: TrainConfig) -> int:
    """The ssj/lsj canvas side: ``augment_size``, else the largest short side the model resizes
    to (so the canvas is not shrunk again), else torchvision's default of 800."""
    if cfg.augment_size:
        return cfg.augment_size
    sizes = cfg.model_options.get("min_size") or cfg.model_options.get("size") or 800
    return max(sizes) if isinstance(sizes, list) else int(sizes)


def training_transforms(cfg: TrainConfig, keypoint_names: list[str] | None = None):
    """The training split's per-image augmentation, as the settings choose it."""
    return train_transforms(
        cfg.hflip_prob, cfg.photometric, keypoint_names, cfg.augment, augment_canvas(cfg)
    )


def with_copy_paste(
    cfg: TrainConfig,
    train: Dataset,
    has_masks: bool,
    source: str = "pennfudan",
    log: Callable[[str], None] = print,
) -> Dataset:
    """The training split, pasting objects between its images when ``copy_paste`` is on. On a
    box-only dataset a recipe's copy-paste is turned off with one line (the recipe stays usable
    with a box model); the user's own is an error."""
    from detfit.config import RECIPES

    if not cfg.copy_paste:
        return train
    if not has_masks and RECIPES.get(cfg.recipe, {}).get("copy_paste") == cfg.copy_paste:
        log(
            f"{source} has boxes only: the {cfg.recipe} recipe's copy_paste is off (it needs masks)"
        )
        return train
    if not has_masks:
        raise DetfitError(
            f"copy_paste={cfg.copy_paste}: {source} has boxes only, and copy-paste needs masks "
            "(set copy_paste: 0)"
        )
    return CopyPaste(train, cfg.copy_paste)


def most_objects(records: AnnotatedSet) -> int:
    """The most annotated objects in any one image of ``records``."""
    return max((len(r.instances) for r in records.images), default=0)


@dataclass
class Loaders:
    """This process's loaders: training batches of its shard, evaluation batches of its share."""

    train: DataLoader
    test: DataLoader
    batches: EpochBatches  # set_epoch(epoch, skip) before each epoch
    train_items: PerItemSeed  # set_epoch(epoch) before each epoch

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.train_items.set_epoch(epoch)
        self.batches.set_epoch(epoch, skip)


def build_loaders(cfg: TrainConfig, data: Datasets, rank: int = 0, world_size: int = 1) -> Loaders:
    """Training loader with aspect-ratio grouped batches of this rank's shard (reshuffled every
    epoch from the seed); evaluation loader over this rank's share of the test batches, in order.

    The loaders draw their worker seeds from their own generator, never from the global RNG:
    creating an iterator (each epoch, or on a resume) leaves the training's RNG stream alone.
    """
    groups = None
    if cfg.aspect_ratio_group_factor >= 0:
        groups = aspect_ratio_groups(data.train, k=cfg.aspect_ratio_group_factor)
    batches = EpochBatches(
        len(data.train),
        cfg.batch_size,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        group_ids=groups,
    )
    items = PerItemSeed(data.train, cfg.seed)
    # a stop sent to the process group is the main process's to handle (it saves, then ends)
    common: dict[str, Any] = dict(
        num_workers=cfg.workers, collate_fn=collate_fn, worker_init_fn=ignore_stop_signals
    )
    train = DataLoader(
        items,
        batch_sampler=batches,
        generator=torch.Generator().manual_seed(cfg.seed + rank),
        **common,
    )
    shards = ShardBatches(len(data.test), cfg.eval_batch_size, rank, world_size)
    test = DataLoader(data.test, batch_sampler=shards, **common)
    return Loaders(train, test, batches, items)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader worker's ``worker_init_fn``: SIGTERM and SIGINT are left to the main process.

    A stop sent to the whole process group (``timeout``, a scheduler's SIGTERM, Ctrl-C in a
    terminal) reaches the workers too; torch's workers die of it by default, and the main process
    then fails with "DataLoader worker (pid N) is killed by signal" instead of finishing its step
    and saving. Ignoring it here lets the main process stop as it would alone; the workers end
    with it (they watch their parent), and SIGKILL still ends them at once."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
