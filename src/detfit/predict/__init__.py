"""Prediction from any model file detfit makes (checkpoint, TorchScript, ONNX): the Predictor
API (whole images, or sliced into tiles), readable overlays, tracking through videos, and the
``detfit predict`` driver over images, folders, globs and videos.

The names below are imported on first use, so that the command line can read
:mod:`detfit.predict.defaults` without importing torch."""

from importlib import import_module
from typing import Any

_HOMES = {
    "Prediction": "detfit.predict.predictor",
    "Predictor": "detfit.predict.predictor",
    "Slicing": "detfit.predict.slicing",
    "draw_prediction": "detfit.predict.overlay",
    "load_backend": "detfit.predict.backends",
    "predict_inputs": "detfit.predict.run",
}

__all__ = [
    "Prediction",
    "Predictor",
    "Slicing",
    "draw_prediction",
    "load_backend",
    "predict_inputs",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'detfit.predict' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
