"""One call for every kind of model file: float RGB images in [0, 1] in, torchvision's detection
dicts out (boxes, labels, scores, masks [N,1,H,W] probabilities, keypoints). Prediction, export
parity and the benchmark all run models through here, so what is checked is what is shipped."""

from __future__ import annotations

import json
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detfit.checkpoint import is_torchscript, run_checkpoint
from detfit.distributed import resolve_device
from detfit.errors import DetfitError

Output = dict[str, torch.Tensor]
METADATA_KEY = "detfit"  # ONNX metadata_props key and TorchScript extra file (detfit.json)
EXTRA_FILE = "detfit.json"


@dataclass
class Backend:
    """A loaded model: ``kind`` (checkpoint, torchscript, onnx), its metadata, and a runner."""

    path: Path
    kind: str
    info: dict[str, Any]  # name, classes, category_ids, options (a checkpoint's model_info)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    runner: Any = None

    def __call__(self, images: list[torch.Tensor]) -> list[Output]:
        """Detections for float [3,H,W] images in [0, 1]; the outputs are on the CPU."""
        return self.runner(images)


class EagerRunner:
    """The torch model itself; ``autocast_dtype`` runs it under bf16/fp16 autocast with the
    coordinate arithmetic kept in float32 (``models.precision``)."""

    def __init__(
        self, model: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None = None
    ) -> None:
        from detfit.models.precision import keep_fp32_where_needed

        self.model, self.device = model.to(device).eval(), device
        self.autocast_dtype = autocast_dtype
        if autocast_dtype is not None:
            keep_fp32_where_needed(self.model)

    @torch.inference_mode()
    def __call__(self, images: list[torch.Tensor]) -> list[Output]:
        from detfit.models.precision import autocast

        with autocast(self.device, self.autocast_dtype):
            outputs = self.model([im.to(self.device) for im in images])
        return [{k: v.cpu() for k, v in out.items()} for out in outputs]


class TorchScriptRunner:
    def __init__(self, module: torch.jit.ScriptModule, device: torch.device) -> None:
        self.module, self.device = module, device

    @torch.inference_mode()
    def __call__(self, images: list[torch.Tensor]) -> list[Output]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "RCNN always returns a (Losses, Detections) tuple"
            outputs = self.module([im.to(self.device) for im in images])
        if isinstance(outputs, tuple):  # scripted detectors return (losses, detections)
            outputs = outputs[1]
        return [{k: v.cpu() for k, v in out.items()} for out in outputs]


class OnnxRunner:
    """One image per call: the exported graph takes a single [3,H,W] image (sizes vary)."""

    def __init__(self, session: Any, output_names: list[str]) -> None:
        self.session, self.output_names = session, output_names
        self.input_name = session.get_inputs()[0].name

    def __call__(self, images: list[torch.Tensor]) -> list[Output]:
        results = []
        for image in images:
            arrays = self.session.run(None, {self.input_name: image.float().cpu().numpy()})
            results.append({k: torch.from_numpy(a) for k, a in zip(self.output_names, arrays)})
        return results


def model_file(path: str | Path) -> Path:
    """A run folder means its best.pt (last.pt when no epoch was best yet), as for eval."""
    path = run_checkpoint(path)
    if not path.is_file():
        raise DetfitError(f"{path}: model file not found")
    return path


def load_backend(
    path: str | Path,
    device: str = "auto",
    threads: int | None = None,
    precision: str | None = None,
    unfinished: bool = False,
) -> Backend:
    """Any model file detfit makes: a checkpoint (.pt or run folder), TorchScript or ONNX.
    ``threads`` sets ONNX Runtime's intra-op threads (torch's are torch.set_num_threads).
    ``precision`` (fp32, bf16, fp16) applies to checkpoints; an exported file runs at the
    precision it was exported with (float32, or int8 from ``export --quantize int8``).
    ``unfinished``: the export's own parity check may load its ``.NAME.partial`` file."""
    path = model_file(path)
    if not unfinished and path.name.startswith(".") and ".partial." in path.name:
        raise DetfitError(
            f"{path}: the unfinished file of an export that was stopped (its parity never "
            "checked); export again"
        )
    if precision not in (None, "fp32") and (path.suffix.lower() == ".onnx" or is_torchscript(path)):
        raise DetfitError(
            f"--precision {precision}: applies to checkpoints; {path.name} runs at the precision "
            "it was exported with"
        )
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path, device, threads)
    if is_torchscript(path):
        return _load_torchscript(path, device)
    if not zipfile.is_zipfile(path):
        raise DetfitError(
            f"{path}: not a model file (expected a detfit .pt checkpoint, TorchScript or .onnx)"
        )
    from detfit.checkpoint import load_model
    from detfit.models.precision import autocast_dtype

    dev = resolve_device(device)
    loaded = load_model(path, dev)
    dtype = autocast_dtype(precision, dev, log=lambda line: print(line, file=sys.stderr))
    return Backend(path, "checkpoint", loaded.info, dev, EagerRunner(loaded.model, dev, dtype))


def _load_torchscript(path: Path, device: str) -> Backend:
    dev = resolve_device(device)
    extra = {EXTRA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
            module = torch.jit.load(str(path), map_location=dev, _extra_files=extra)
    except Exception as exc:
        raise DetfitError(f"{path}: not a readable TorchScript file ({_first_line(exc)})") from None
    if not extra[EXTRA_FILE]:
        raise DetfitError(
            f"{path}: TorchScript file without detfit metadata (not from detfit export)"
        )
    info = read_metadata(path, extra[EXTRA_FILE])
    return Backend(path, "torchscript", info, dev, TorchScriptRunner(module.eval(), dev))


def onnx_providers(device: str) -> list[str]:
    """CUDA when asked for (or auto with a GPU) and ONNX Runtime has it; always CPU after."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.startswith("cuda"):
        raise DetfitError(
            f"--device {device}: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)"
        )
    return ["CPUExecutionProvider"]


def _load_onnx(path: Path, device: str, threads: int | None = None) -> Backend:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # no per-node warnings on stderr
    try:
        session = ort.InferenceSession(str(path), options, providers=onnx_providers(device))
    except DetfitError:
        raise
    except Exception as exc:
        raise DetfitError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    meta = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        raise DetfitError(f"{path}: ONNX model without detfit metadata (not from detfit export)")
    info = read_metadata(path, meta[METADATA_KEY])
    outputs = [o.name for o in session.get_outputs()]
    if not {"boxes", "labels", "scores"} <= set(outputs):
        raise DetfitError(
            f"{path}: ONNX model without boxes/labels/scores outputs (outputs: "
            f"{', '.join(outputs)[:200]}): not a detector from detfit export"
        )
    dev = torch.device("cuda" if "CUDA" in session.get_providers()[0] else "cpu")
    return Backend(path, "onnx", info, dev, OnnxRunner(session, outputs))


def read_metadata(path: Path, text: str | bytes) -> dict[str, Any]:
    """The detfit metadata of an exported model, checked: a hand-edited or truncated one is one
    line naming the file, not a KeyError later."""
    try:
        info = json.loads(text)
    except ValueError as exc:
        raise DetfitError(f"{path}: its detfit metadata is not valid JSON ({exc})") from None

    def bad(what: str) -> DetfitError:
        return DetfitError(f"{path}: its detfit metadata is malformed ({what})")

    if not isinstance(info, dict):
        raise bad(f"a {type(info).__name__}, not a mapping")
    if not isinstance(info.get("name"), str):
        raise bad("no model name")
    count = info.get("num_classes")
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise bad(f"num_classes {str(count)[:40]!r} is not a count of 2 or more")
    classes = info.get("classes")
    if classes is not None and (
        not isinstance(classes, list)
        or len(classes) != count
        or not all(isinstance(c, str) for c in classes)
    ):
        raise bad(f"classes is not a list of {count} names")
    ids = info.get("category_ids")
    if ids is not None and (
        not isinstance(ids, list)
        or len(ids) != count
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
    ):
        raise bad(f"category_ids is not a list of {count} integers")
    return info


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
