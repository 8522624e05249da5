"""Datasets, transforms and loaders: everything before the model."""

from detfit.data.batching import (
    GroupedBatchSampler,
    aspect_ratio_groups,
    collate_fn,
    split_dataset,
    split_indices,
)
from detfit.data.detection import DetectionDataset
from detfit.data.doctor import check, summary, validate
from detfit.data.export import write_coco
from detfit.data.pennfudan import (
    PENNFUDAN_CLASSES,
    PennFudanDataset,
    download_pennfudan,
    resolve_pennfudan,
    verify_pennfudan,
)
from detfit.data.records import AnnotatedSet, ImageRecord, Instance, Problem
from detfit.data.spec import DatasetSpec
from detfit.data.transforms import eval_transforms, train_transforms

__all__ = [
    "PENNFUDAN_CLASSES",
    "AnnotatedSet",
    "DatasetSpec",
    "DetectionDataset",
    "ImageRecord",
    "Instance",
    "Problem",
    "check",
    "summary",
    "validate",
    "write_coco",
    "GroupedBatchSampler",
    "PennFudanDataset",
    "aspect_ratio_groups",
    "collate_fn",
    "download_pennfudan",
    "eval_transforms",
    "resolve_pennfudan",
    "split_dataset",
    "split_indices",
    "train_transforms",
    "verify_pennfudan",
]
