"""detfit: fine-tune torchvision detection and instance-segmentation models.

Layout follows the data flow: ``data`` (datasets, transforms, loaders) -> ``models`` (one
registry of builders) -> ``engine`` (training loop, checkpoints) -> ``eval`` (COCO metrics) ->
``predict``; ``cli`` only parses arguments and calls these.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``detfit.Predictor`` without importing torch when only the version is asked for."""
    if name == "Predictor":
        from detfit.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'detfit' has no attribute {name!r}")
