"""Prediction's defaults, in a module that imports nothing: the library and the command line
(``detfit predict``, ``detfit serve``) read them here, so a default is written once."""

# Detections scoring below this are not shown: by predict, in galleries and confusion matrices.
DEFAULT_SCORE_THRESHOLD = 0.5
DEFAULT_MASK_THRESHOLD = 0.5  # a mask pixel's probability from which it belongs to the object
DEFAULT_BATCH_SIZE = 4  # images per model call in detfit predict
DEFAULT_OVERLAP = 0.2  # sliced inference: share of a tile overlapping its neighbours
