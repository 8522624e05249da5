"""Prediction from any model file detfit makes (checkpoint, TorchScript, ONNX): the Predictor
API (whole images, or sliced into tiles), readable overlays, tracking through videos, and the
``detfit predict`` driver over images, folders, globs and videos."""

from detfit.predict.backends import load_backend
from detfit.predict.overlay import draw_prediction
from detfit.predict.predictor import Prediction, Predictor
from detfit.predict.run import predict_files, predict_inputs
from detfit.predict.slicing import Slicing

__all__ = [
    "Prediction",
    "Predictor",
    "Slicing",
    "draw_prediction",
    "load_backend",
    "predict_files",
    "predict_inputs",
]
