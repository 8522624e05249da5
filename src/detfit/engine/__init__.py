"""Training: the :class:`Trainer` and its callbacks, and the references' ``train_one_epoch`` /
``evaluate`` for the tutorial's own loop."""

from detfit.engine.callbacks import Callback
from detfit.engine.step import EvaluationResult, evaluate, train_one_epoch
from detfit.engine.trainer import Trainer, fit

__all__ = ["Callback", "EvaluationResult", "Trainer", "evaluate", "fit", "train_one_epoch"]
