"""detfit: fine-tune torchvision detection and instance-segmentation models.

Layout follows the data flow: ``data`` (datasets, transforms, loaders) -> ``models`` (one
registry of builders) -> ``engine`` (training loop, checkpoints) -> ``eval`` (COCO metrics) ->
``predict``; ``cli`` only parses arguments and calls these.
"""

__version__ = "0.1.0"
