"""The tutorial's ``utils`` module (from torchvision's references), as far as the tutorial uses it."""

from detfit.data.batching import collate_fn

__all__ = ["collate_fn"]
