"""Writing a detector as ONNX (torch's TorchScript-based exporter) or TorchScript (scripted, so
the transform's resize stays dynamic), with the metadata prediction needs inside the file."""

from __future__ import annotations

import io
import json
from typing import Any

import torch
from torch import nn

from detfit.errors import DetfitError
from detfit.predict.backends import EXTRA_FILE, METADATA_KEY

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


def metadata(info: dict[str, Any], fmt: str, outputs: list[str]) -> dict[str, Any]:
    """What a predictor needs without the checkpoint: classes, source ids, model and options."""
    from detfit import __version__

    return {
        "detfit_version": __version__,
        "format": fmt,
        "name": info["name"],
        "num_classes": info["num_classes"],
        "classes": info.get("classes"),
        "category_ids": info.get("category_ids"),
        "options": info.get("options", {}),
        "input": "one float32 RGB image [3, H, W] in [0, 1], any H and W",
        "outputs": outputs,
    }


class SingleImage(nn.Module):
    """The detector on one image, its outputs as a tuple: ONNX graphs take and give tensors."""

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model([image])[0]
        return tuple(out[k] for k in self.keys)


def output_keys(model: nn.Module, example: torch.Tensor) -> list[str]:
    with torch.inference_mode():
        return list(model([example])[0].keys())


def to_onnx(model: nn.Module, example: torch.Tensor, meta: dict[str, Any], opset: int) -> bytes:
    """The serialized ONNX model: dynamic height/width, metadata in ``metadata_props``."""
    import onnx

    keys = meta["outputs"]
    dynamic = {"image": {1: "height", 2: "width"}}
    for key in keys:
        dynamic[key] = {0: "detections"}
    if "masks" in dynamic:
        dynamic["masks"] = {0: "detections", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    try:
        with torch.no_grad():
            torch.onnx.export(
                SingleImage(model, keys).eval(),
                (example,),
                buffer,
                dynamo=False,  # torch.export fails on the detectors' data-dependent shapes
                opset_version=opset,
                input_names=["image"],
                output_names=keys,
                dynamic_axes=dynamic,
                do_constant_folding=True,
            )
    except Exception as exc:
        raise DetfitError(
            f"{meta['name']}: torch.onnx.export failed ({_first_line(exc)})"
        ) from None
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    for key in ("name", "detfit_version"):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(meta[key])
    return proto.SerializeToString()


def to_torchscript(model: nn.Module, meta: dict[str, Any]) -> bytes:
    """The scripted model (its resize and post-processing stay code, not traced constants)."""
    try:
        scripted = torch.jit.script(model)
    except Exception as exc:
        raise DetfitError(
            f"{meta['name']}: cannot be scripted for TorchScript ({_first_line(exc)})"
        ) from None
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer, _extra_files={EXTRA_FILE: json.dumps(meta)})
    return buffer.getvalue()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
