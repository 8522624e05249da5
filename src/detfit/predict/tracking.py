"""Follow objects through a video: ByteTrack from Roboflow's ``trackers`` package (maintained, and
the ByteTrack that ``supervision`` moved out of its own code) gives each detection of a frame the
id of the track it continues.

The tracker matches boxes, whatever their class, so a detector that hesitates between two classes
for one object does not cut its track; a track's class is the one it was detected as most often.
The model's NMS is per class, so one object can come out twice, under two classes, with nearly
the same box: two tracks would then follow it and take turns. Before tracking, such duplicates
(IoU >= ``DUPLICATE_IOU``, any class) are reduced to the best-scoring one (torchvision's
``nms``); the others stay in the output, with no id.
A detection is given an id once its track has been seen on two frames in a row (the library's
default): a one-frame false detection never becomes a track, and is written with no id.
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import numpy as np
from torchvision.ops import nms

from detfit.errors import DetfitError
from detfit.predict.defaults import DEFAULT_SCORE_THRESHOLD
from detfit.predict.predictor import Prediction

INSTALL_HINT = "pip install 'detfit[track]'"
DUPLICATE_IOU = 0.7  # one object detected under two classes


def bytetrack_class() -> type:
    """trackers' ByteTrack, or a one-line error naming the extra that installs it."""
    try:
        from trackers import ByteTrackTracker
    except ImportError:
        raise DetfitError(f"--track needs the trackers package: {INSTALL_HINT}") from None
    return ByteTrackTracker


class VideoTracker:
    """One video's tracks: ``update`` gives a track id (or None) per detection of each frame, in
    the Prediction's order; ``counts`` the distinct tracks per class so far."""

    def __init__(
        self, frame_rate: float | Fraction = 30.0, score_threshold: float = DEFAULT_SCORE_THRESHOLD
    ) -> None:
        tracker_class = bytetrack_class()  # first: it names the extra when trackers is missing
        import supervision as sv  # a dependency of trackers

        self._sv = sv
        # ByteTrack's second stage matches detections scoring under its high threshold to lost
        # tracks; predict has already dropped those under --score-threshold, so new tracks may
        # start from any detection that is kept.
        threshold = min(max(score_threshold, 0.0), 1.0)
        self.tracker = tracker_class(
            frame_rate=float(frame_rate),
            track_activation_threshold=threshold,
            high_conf_det_threshold=threshold,
        )
        self.classes: dict[int, Counter[str]] = {}

    def update(self, p: Prediction) -> list[int | None]:
        """Track ids of ``p``'s detections (None: not, or not yet, part of a track)."""
        unique = nms(p.boxes.float(), p.scores.float(), DUPLICATE_IOU).numpy()
        detections = self._sv.Detections(
            xyxy=p.boxes.numpy().astype(np.float32).reshape(-1, 4)[unique],
            confidence=p.scores.numpy().astype(np.float32)[unique],
            class_id=p.labels.numpy().astype(int)[unique],
            data={"index": unique},
        )
        tracked = self.tracker.update(detections)
        ids: list[int | None] = [None] * len(p)
        indices = tracked.data.get("index", np.zeros(0, dtype=int))  # none when nothing tracked
        for index, track in zip(indices.tolist(), tracked.tracker_id.tolist()):
            if track >= 0:
                ids[index] = int(track)
                self.classes.setdefault(int(track), Counter())[p.class_names[index]] += 1
        return ids

    def counts(self) -> dict[str, int]:
        """Distinct tracks per class (a track's class: the one it was detected as most often)."""
        per_class = Counter(c.most_common(1)[0][0] for c in self.classes.values())
        return dict(sorted(per_class.items()))
