"""int8 ONNX: ONNX Runtime's static quantization of the exported float32 graph, judged by AP.

Which nodes become int8 (QDQ: QuantizeLinear/DequantizeLinear pairs around the float kernels,
which ONNX Runtime fuses into int8 convolutions and matrix products on VNNI CPUs): the
convolutions and matrix products of the backbone, the FPN and the heads' hidden layers. Kept
float32: the layers whose outputs are decoded or thresholded directly (RPN objectness and box
deltas, class scores, box deltas, mask and keypoint logits; an error there moves boxes by pixels
or flips a mask pixel), and everything that is not a convolution or product: anchors, box
decoding, NMS, RoIAlign, mask pasting. The exported graph names nodes by module scope
(``/model/backbone/...``), which is how they are chosen.

An int8 model is not equal to the float32 one, so instead of a parity check it is scored: COCO AP
of both on the run's test split, through the same ONNX Runtime loader ``detfit predict`` uses.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from detfit.errors import DetfitError
from detfit.fileio import atomic_write
from detfit.predict.backends import METADATA_KEY, load_backend

# Module scopes (in the graph of formats.SingleImage, whose detector is ``model``) quantized.
QUANTIZED_SCOPES = (
    "/model/backbone/",
    "/model/rpn/head/conv/",
    "/model/roi_heads/box_head/",
    "/model/roi_heads/mask_head/",
    "/model/roi_heads/keypoint_head/",
)
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
CALIBRATION_IMAGES = 16  # training images whose activation ranges set the int8 scales


class AccuracyError(DetfitError):
    """The int8 model's AP drops by more than allowed (one line, exit 2; nothing written)."""


def quantized_nodes(model: Any) -> list[str]:
    """Names of the Conv/Gemm/MatMul nodes inside :data:`QUANTIZED_SCOPES`."""
    return [
        node.name
        for node in model.graph.node
        if node.op_type in QUANTIZED_OPS and node.name.startswith(QUANTIZED_SCOPES)
    ]


def quantize_int8(fp32: Path, out: Path, images: Sequence[torch.Tensor]) -> int:
    """Write ``out``: ``fp32`` statically quantized (QDQ, int8 weights per channel, uint8
    activations) with activation ranges from ``images`` (float [3,H,W] in [0, 1]); the detfit
    metadata is kept and marked int8. Returns how many nodes were quantized."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Images(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining = iter(images)

        def get_next(self) -> dict[str, Any] | None:
            image = next(self.remaining, None)
            return None if image is None else {"image": image.float().cpu().numpy()}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # shape inference and graph optimisation first, as ONNX Runtime recommends; the dynamic
        # image size defeats its symbolic shape inference, which is skipped
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        nodes = quantized_nodes(onnx.load(str(prepared)))
        quantize_static(
            str(prepared),
            str(Path(tmp) / "int8.onnx"),
            Images(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_quantize=nodes,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        model = onnx.load(str(Path(tmp) / "int8.onnx"))
    source = {p.key: p.value for p in onnx.load(str(fp32), load_external_data=False).metadata_props}
    meta = json.loads(source[METADATA_KEY])
    meta["precision"] = "int8"
    del model.metadata_props[:]
    for key, value in {**source, METADATA_KEY: json.dumps(meta)}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write(out, lambda f: f.write(model.SerializeToString()))
    return len(nodes)


def training_images(config: dict[str, Any], count: int) -> list[torch.Tensor]:
    """Up to ``count`` images of the run's training split (float, [0, 1]); none without data."""
    data = _datasets(config)
    if data is None:
        return []
    return [_as_float(data.train[i][0]) for i in range(min(count, len(data.train)))]


def split_ap(
    model_file: Path, config: dict[str, Any], iou_types: Sequence[str], classes: Sequence[str]
) -> dict[str, float] | None:
    """COCO AP per IoU type of ``model_file`` (run through ``load_backend``, as ``detfit
    predict`` runs it) on the run's test split; None when the data is not at hand."""
    from detfit.eval.coco import CocoEvaluator

    data = _datasets(config)
    if data is None:
        return None
    backend = load_backend(model_file, "cpu", unfinished=True)  # scored before it is kept
    evaluator = CocoEvaluator(iou_types, classes, config.get("eval_backend"))
    for i in range(len(data.test)):
        image, target = data.test[i]
        image = _as_float(image)
        evaluator.process([target], backend([image]), [tuple(image.shape[-2:])])
    return {t: s["AP"] for t, s in evaluator.evaluate().items()}


def check_accuracy(
    fp32: Path,
    int8: Path,
    config: dict[str, Any],
    iou_types: Sequence[str],
    classes: Sequence[str],
    max_ap_drop: float,
    log: Callable[[str], None],
    out: Path,
) -> tuple[dict[str, float], dict[str, float]]:
    """Score both files on the test split, print both, and raise :class:`AccuracyError` when
    int8's AP (any IoU type) is more than ``max_ap_drop`` below float32's."""
    before = split_ap(fp32, config, iou_types, classes)
    if before is None:
        raise DetfitError(
            f"{out}: the checkpoint's data is not at hand to score the int8 model; give "
            "--no-check to write it unscored"
        )
    after = split_ap(int8, config, iou_types, classes) or {}
    for name, stats in (("fp32", before), ("int8", after)):
        log(f"AP {name}: " + ", ".join(f"{t} {ap:.4f}" for t, ap in stats.items()))
    worst = max(iou_types, key=lambda t: before[t] - after[t])
    drop = before[worst] - after[worst]
    if drop > max_ap_drop:
        raise AccuracyError(
            f"{out}: int8 {worst} AP {after[worst]:.4f} is {drop:.4f} below fp32's "
            f"{before[worst]:.4f}, more than --max-ap-drop {max_ap_drop:g}; nothing written"
        )
    return before, after


def _datasets(config: dict[str, Any]):
    from detfit.config import TrainConfig
    from detfit.data.loaders import build_datasets

    try:
        cfg = TrainConfig.from_dict(config, "checkpoint config")
        return build_datasets(cfg, download=False, log=lambda s: None, held_out="test")
    except (DetfitError, OSError, KeyError, TypeError, ValueError):
        return None


def _as_float(image: torch.Tensor) -> torch.Tensor:
    image = torch.as_tensor(image)
    return image.float() if image.is_floating_point() else image.float() / 255.0
