"""Prediction from any model file detfit makes (checkpoint, TorchScript, ONNX): the Predictor
API, readable overlays, and the ``detfit predict`` driver over images, folders, globs and videos."""

from detfit.predict.backends import load_backend
from detfit.predict.overlay import draw_prediction
from detfit.predict.predictor import Prediction, Predictor
from detfit.predict.run import predict_files, predict_inputs

__all__ = [
    "Prediction",
    "Predictor",
    "draw_prediction",
    "load_backend",
    "predict_files",
    "predict_inputs",
]
