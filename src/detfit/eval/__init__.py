"""Evaluation: the loop over a model and loader (one process or many), COCO metrics by
faster-coco-eval or pycocotools (``eval_backend``), and the scoring of a saved checkpoint."""

from detfit.eval.coco import STAT_NAMES, CocoEvaluator
from detfit.eval.loop import EvaluationResult, evaluate

__all__ = ["STAT_NAMES", "CocoEvaluator", "EvaluationResult", "evaluate"]
