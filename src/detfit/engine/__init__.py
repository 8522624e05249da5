"""Training and evaluation. ``train_one_epoch``/``evaluate`` keep the references' signatures."""

from detfit.engine.loop import EvaluationResult, evaluate, train_one_epoch
from detfit.engine.trainer import fit

__all__ = ["EvaluationResult", "evaluate", "fit", "train_one_epoch"]
