"""Evaluation: COCO metrics by pycocotools."""

from detfit.eval.coco import STAT_NAMES, CocoEvaluator

__all__ = ["STAT_NAMES", "CocoEvaluator"]
