"""``detfit.Predictor``: one object for every model file detfit makes, one result structure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detfit.errors import DetfitError
from detfit.models.tta import check_scales_reach, tta_predict, tta_views
from detfit.predict.backends import Backend, load_backend
from detfit.predict.defaults import DEFAULT_MASK_THRESHOLD, DEFAULT_SCORE_THRESHOLD
from detfit.predict.slicing import Slicing, sliced_output

ImageLike = Any  # a path, a PIL image, an HxWx3 numpy array or a [3,H,W] tensor
# Test-time augmentation runs the model on the whole image and its mirror; sliced inference runs
# it on tiles. Both at once is not built, and one silently losing to the other would mislead.
TTA_WITH_SLICES = "--tta and --slice cannot be combined: choose one"
TTA_SCALES_ALONE = "--tta-scale sets the sizes of test-time augmentation: add --tta"


@dataclass
class Prediction:
    """Detections for one image, scores descending; pixel coordinates of the input image."""

    boxes: torch.Tensor  # float [N, 4] x0, y0, x1, y1
    labels: torch.Tensor  # int64 [N], 1..K
    scores: torch.Tensor  # float [N]
    class_names: list[str]
    category_ids: list[int]  # the training data's own ids (COCO ids need not be 1..K)
    masks: torch.Tensor | None = None  # bool [N, H, W]
    keypoints: torch.Tensor | None = None  # float [N, K, 3] x, y, visibility
    height: int = 0
    width: int = 0

    def __len__(self) -> int:
        return len(self.boxes)


def to_uint8_image(image: ImageLike) -> torch.Tensor:
    """uint8 [3,H,W] RGB from a file path, PIL image, HxWx3 array or [3,H,W] tensor."""
    if isinstance(image, (str, Path)):
        from detfit.data.images import load_rgb

        return load_rgb(Path(image))
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise DetfitError(f"numpy image of shape {image.shape}: expected HxWx3 RGB")
        image = torch.from_numpy(np.array(image[..., :3])).permute(2, 0, 1)  # a writable copy
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise DetfitError(f"{type(image).__name__}: expected an image path, PIL, HxWx3 or 3xHxW")
    if image.is_floating_point():
        return (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return image.to(torch.uint8).contiguous()


class Predictor:
    """Loads a checkpoint (.pt or run folder: its best.pt), TorchScript or ONNX model (an int8
    one from ``detfit export --quantize int8`` too). ``precision`` bf16 runs a checkpoint under
    bfloat16 autocast (docs/speed.md).
    ``tta=True``: test-time augmentation, the image and its mirror with detections fused, at
    each of ``tta_scales`` (factors of the model's own resize; None: the model's size alone).
    Sizes other than 1 need a checkpoint whose model resizes to ``min_size``/``max_size``: an
    exported file or SSD is refused in one line.

    >>> predictor = Predictor("runs/maskrcnn_mobilenet_v2_fpn", device="cpu")
    >>> result = predictor("photo.jpg")  # Prediction(boxes, labels, scores, class_names, masks)

    ``slicing`` (e.g. ``Slicing(640, overlap=0.2)``) predicts each image on overlapping tiles
    plus the whole image, merged (:mod:`detfit.predict.slicing`): small objects in large images.
    """

    def __init__(
        self,
        path: str | Path,
        device: str = "auto",
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        classes: Sequence[str | int] | None = None,
        mask_threshold: float = DEFAULT_MASK_THRESHOLD,
        tta: bool = False,
        precision: str | None = None,
        threads: int | None = None,
        slicing: Slicing | None = None,
        tta_scales: Sequence[float] | None = None,
    ) -> None:
        from detfit.config import check_setting

        if tta_scales is not None:  # None: the flip at the model's own size
            tta_scales = check_setting("tta_scales", list(tta_scales), "--tta-scale")
            if not tta:
                raise DetfitError(TTA_SCALES_ALONE)
        if tta and slicing is not None:  # before the (slow) load
            raise DetfitError(TTA_WITH_SLICES)
        self.backend: Backend = load_backend(path, device, threads, precision=precision)
        info = self.backend.info
        self.classes: list[str] = list(info.get("classes") or [])
        if not self.classes:
            self.classes = ["__background__", *map(str, range(1, info["num_classes"]))]
        ids = info.get("category_ids")
        self.category_ids: list[int] = list(ids) if ids else list(range(len(self.classes)))
        self.score_threshold, self.mask_threshold = score_threshold, mask_threshold
        self.keep_labels = self._labels(classes) if classes else None
        # test-time augmentation (the image and its mirror, fused): detfit.models.tta
        self.tta = tta_views(tta, info.get("keypoint_names"), tta_scales or (1.0,))
        check_scales_reach(self.backend, self.tta, str(path))
        self.slicing = slicing

    @property
    def kind(self) -> str:
        return self.backend.kind

    @property
    def name(self) -> str:
        return self.backend.info["name"]

    def _labels(self, classes: Sequence[str | int]) -> set[int]:
        """Class names, or the source's category ids, as model labels."""
        labels = set()
        for c in classes:
            if str(c) in self.classes[1:]:
                labels.add(self.classes.index(str(c)))
            elif str(c).isdigit() and int(c) in self.category_ids[1:]:
                labels.add(self.category_ids.index(int(c), 1))
            else:
                raise DetfitError(
                    f"--classes {c}: not a class of this model ({', '.join(self.classes[1:])})"
                )
        return labels

    def __call__(self, image: ImageLike) -> Prediction:
        return self.predict([image])[0]

    def predict(self, images: Sequence[ImageLike]) -> list[Prediction]:
        """One Prediction per image, in order: one model call per image size in the batch.

        torchvision pads a batch to its largest image, and the padding changes what the model
        sees (the FPN's borders, the anchors' reach): images of another size in the same call
        would get other detections than alone. Images of one size pad alike, so grouping them
        makes the results independent of how many are predicted at once."""
        uint8 = [to_uint8_image(im) for im in images]
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(uint8):
            by_size.setdefault(tuple(image.shape), []).append(index)
        outputs: list[Any] = [None] * len(uint8)
        for indices in by_size.values():
            floats = [uint8[i].float() / 255.0 for i in indices]
            if self.slicing is not None:
                results = []
                for im in floats:
                    self.slicing.check(*im.shape[-2:])
                    results.append(
                        sliced_output(
                            self.backend,
                            im,
                            self.slicing,
                            self.mask_threshold,
                            self.score_threshold,
                        )
                    )
            elif self.tta:
                results = tta_predict(self.backend, floats, self.tta)
            else:
                results = self.backend(floats)
            for index, out in zip(indices, results):
                outputs[index] = out
        return [self._result(out, im) for out, im in zip(outputs, uint8)]

    def _result(self, out: dict[str, torch.Tensor], image: torch.Tensor) -> Prediction:
        # RetinaNet/FCOS/SSD score every class index, the background's (0) too: never a result
        keep = (out["scores"] >= self.score_threshold) & (out["labels"] > 0)
        if self.keep_labels is not None:
            keep &= torch.isin(out["labels"], torch.tensor(sorted(self.keep_labels)))
        labels = out["labels"][keep].long()
        if len(labels) and int(labels.max()) >= len(self.category_ids):
            raise DetfitError(
                f"{self.backend.path}: the model predicts class {int(labels.max())} but its "
                f"metadata lists {len(self.classes)} classes (metadata of another model?)"
            )
        names = [self.classes[v] if v < len(self.classes) else str(v) for v in labels.tolist()]
        masks = out.get("masks")
        if masks is not None:
            masks = masks[keep][:, 0] > self.mask_threshold
        keypoints = out.get("keypoints")
        return Prediction(
            boxes=out["boxes"][keep].float(),
            labels=labels,
            scores=out["scores"][keep].float(),
            class_names=names,
            category_ids=[self.category_ids[v] for v in labels.tolist()],
            masks=masks,
            keypoints=None if keypoints is None else keypoints[keep],
            height=image.shape[-2],
            width=image.shape[-1],
        )
