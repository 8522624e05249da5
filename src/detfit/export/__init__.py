"""``detfit export``: a checkpoint as ONNX or TorchScript, checked against eager torch before the
file is kept; and ``--strip``, a weights-only checkpoint."""

from detfit.export.exporter import ParityError, export_model, strip_checkpoint

__all__ = ["ParityError", "export_model", "strip_checkpoint"]
