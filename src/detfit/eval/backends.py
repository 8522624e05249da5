"""COCO metric backends: one COCOeval protocol, two implementations.

``faster-coco-eval`` (the default) runs COCOeval's matching and accumulation in C++ and gives the
same 12 numbers several times sooner on large sets (BENCHMARKS.md); ``pycocotools`` is the
reference it is checked against (tests/test_metric_backend.py). Both hand back a COCOeval-like
object with ``stats``, ``params`` and ``eval["precision"]`` ([T, R, K, A, M], the same shape and
meaning in both), so nothing downstream knows which one ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np

from detfit.config import EvalBackend, TrainConfig, check_setting


def backend_names() -> tuple[str, ...]:
    """The backends ``eval_backend`` and ``detfit eval --backend`` take."""
    return get_args(EvalBackend)


def default_backend() -> str:
    """``eval_backend``'s default (config.py holds it)."""
    return TrainConfig.model_fields["eval_backend"].default


@dataclass(frozen=True)
class MetricBackend:
    """A backend's ``COCO`` and ``COCOeval`` classes and how to call them the same way."""

    name: str
    coco: type
    cocoeval: type
    cocoeval_kwargs: dict[str, Any]

    def ground_truth(self, dataset: dict[str, Any]) -> Any:
        """A COCO object over ``dataset`` (a COCO instances dict), indexed, not copied."""
        coco_gt = self.coco()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        return coco_gt

    def evaluate(
        self,
        coco_gt: Any,
        results: Sequence[dict[str, Any]],
        iou_type: str,
        kpt_oks_sigmas: np.ndarray | None = None,
    ) -> Any:
        """COCOeval of ``results`` against ``coco_gt`` on every image and every category,
        summarised (what it prints goes to stdout, as pycocotools' does)."""
        # loadRes adds id/area/bbox to the dicts it is given (an array bbox for segm, which a
        # second loadRes of them trips on): it gets copies. It fails on an empty list; an empty
        # COCO is "no detections" in both backends.
        coco_dt = coco_gt.loadRes([dict(r) for r in results]) if results else self.coco()
        coco_eval = self.cocoeval(coco_gt, coco_dt, iouType=iou_type, **self.cocoeval_kwargs)
        coco_eval.params.imgIds = sorted(coco_gt.getImgIds())
        # faster-coco-eval keeps only categories with ground truth for keypoints; pycocotools
        # keeps them all: the same K (per-class AP, the precision array) either way
        coco_eval.params.catIds = sorted(coco_gt.getCatIds())
        if kpt_oks_sigmas is not None:
            coco_eval.params.kpt_oks_sigmas = kpt_oks_sigmas
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        return coco_eval


def metric_backend(name: str | None = None) -> MetricBackend:
    """The backend called ``name`` (None: the default), imported on first use; an unknown name
    is refused as the ``eval_backend`` setting refuses it."""
    name = check_setting("eval_backend", name or default_backend())
    if name == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return MetricBackend(name, COCO, COCOeval, {})
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster

    # print, not its default logger.info: printed like pycocotools, so silenced the same way
    return MetricBackend(name, FasterCOCO, COCOeval_faster, {"print_function": print})
