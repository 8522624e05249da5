"""``detfit export``: a checkpoint as ONNX or TorchScript, checked against eager torch before the
file is kept (``--strip``, a weights-only checkpoint, is :func:`detfit.checkpoint.strip_checkpoint`)."""

from detfit.export.exporter import ParityError, export_model

__all__ = ["ParityError", "export_model"]
