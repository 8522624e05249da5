"""The checkpoint format, in one place: what a checkpoint holds and how it is written (atomically:
temporary file + rename), read (``weights_only``: no code runs from the file), described
(:func:`model_info`), rebuilt into its model, stripped to what inference needs, and which file a
run folder means.

Every command that reads a model (``eval``, ``predict``, ``export``, ``serve``) calls
:func:`load_model`; the trainer writes a :class:`ResumeState` (:meth:`ResumeState.payload`) and
continues one read with :func:`resume_state`, so no other module knows the checkpoint's keys.
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detfit.errors import DetfitError
from detfit.fileio import atomic_write

# What a run folder holds; ``--overwrite`` removes these before starting over.
RUN_FILES = ("config.yaml", "metrics.csv", "metrics.json", "last.pt", "best.pt")


# What eval, predict and export read from a checkpoint: the evaluated weights (EMA's when on), the
# model's description and the settings (``detfit export --strip`` keeps these alone).
INFERENCE_KEYS = ("model", "model_info", "config", "history", "metric_key")
# best.pt also keeps the raw training weights (beside EMA's) and where it was taken, but not the
# optimizer, schedule, RNG or sampler state, which only last.pt needs to continue a run: with
# AdamW, whose two moments per weight dominate last.pt, about half its size when EMA is on (two
# copies of the weights) and a third without.
BEST_KEYS = (*INFERENCE_KEYS, "train_model", "epoch", "global_step")


def holds_run(folder: Path) -> bool:
    """True when ``folder`` has any of a run's files (so starting a run there would replace it)."""
    return any((Path(folder) / name).exists() for name in RUN_FILES)


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` so that ``path`` is always either the old or the new complete file."""
    atomic_write(Path(path), lambda f: torch.save(checkpoint, f))


def run_checkpoint(path: str | Path) -> Path:
    """The checkpoint a path means to every command that reads a model (eval, predict, export,
    export --strip, serve): a run folder means its best.pt (last.pt before any epoch was best); a
    file is itself. ``--resume`` alone reads last.pt (:func:`load_checkpoint`)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise DetfitError(f"{path}: no best.pt or last.pt in this folder")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A detfit checkpoint, loaded with ``weights_only=True`` (no code runs from the file). A run
    folder means its last.pt here: the complete state that ``--resume`` continues (commands that
    read a model go through :func:`run_checkpoint`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise DetfitError(f"{path}: checkpoint not found")
    if path.suffix.lower() == ".onnx" or is_torchscript(path):
        raise DetfitError(
            f"{path}: an exported model (ONNX/TorchScript); this command takes a detfit .pt "
            "checkpoint or run folder (detfit predict takes exports)"
        )
    try:
        with (
            warnings.catch_warnings()
        ):  # a plain pickle's "legacy format" warning: the error says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights only load failed" in first.lower() or "weights_only" in str(exc):
            # torch's text goes on to suggest weights_only=False, which would run the file's code
            first = "it holds Python objects besides tensors and plain data; detfit never runs them"
        raise DetfitError(f"{path}: not a readable checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_info" not in ckpt:
        raise DetfitError(f"{path}: not a detfit checkpoint (no model/model_info)")
    return ckpt


def is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a code/ folder; torch.save checkpoints do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.split("/", 2)[1:2] == ["code"] for n in archive.namelist())


def model_info(
    name: str, num_classes: int, classes: list[str] | None, options: dict, model: nn.Module
) -> dict:
    """Everything needed to rebuild ``model`` from a checkpoint alone."""
    from detfit.models.structure import describe_structure

    return {
        "name": name,
        "num_classes": num_classes,
        "classes": list(classes) if classes else None,
        "options": dict(options),
        "structure": describe_structure(model),
    }


# Options that only select pretrained rows: a rebuild from a checkpoint has no pretrained file.
PRETRAINED_ONLY = ("keep_classes", "keep_keypoints")


def rebuild_model(
    info: dict, state_dict: dict | None = None, source: str = "checkpoint"
) -> nn.Module:
    """The exact architecture recorded by :func:`model_info`, with no pretrained file needed.

    A ``model_info`` that does not build, or weights that do not fit what it describes (a
    hand-edited or mixed-up checkpoint), is a DetfitError naming ``source`` (the file).
    """
    from detfit.models import build_model
    from detfit.models.structure import apply_structure

    if not (
        isinstance(info, dict)
        and isinstance(info.get("name"), str)
        and isinstance(info.get("num_classes"), int)
        and isinstance(info.get("options", {}), dict)
        and isinstance(info.get("structure", {}), dict)
    ):
        raise DetfitError(f"{source}: model_info is incomplete (name, num_classes, options)")
    options = {k: v for k, v in info.get("options", {}).items() if k not in PRETRAINED_ONLY}
    if info.get("options", {}).get("keep_keypoints") and "num_keypoints" not in options:
        options["num_keypoints"] = len(info["options"]["keep_keypoints"])
    try:
        with warnings.catch_warnings():
            # "trainable layers has no effect" when built from scratch
            warnings.simplefilter("ignore", UserWarning)
            model = build_model(
                info["name"], info["num_classes"], weights=None, weights_backbone=None, **options
            )
        apply_structure(model, info.get("structure", {}))
    except DetfitError as exc:
        raise DetfitError(f"{source}: its model_info does not build ({exc})") from None
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DetfitError(f"{source}: its model_info does not build ({first})") from None
    if state_dict is not None:
        load_weights(model, state_dict, f"{source}: its weights do not fit {info['name']}")
    return model


def weights_in(obj: Any) -> Any:
    """The model's state dict when ``obj`` is a loaded checkpoint, else ``obj`` itself (a plain
    state dict), so ``--weights`` and ``--weights-backbone`` take either kind of file."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]
    return obj


def load_weights(model: nn.Module, state_dict: Any, what: str) -> None:
    """``model.load_state_dict`` with a one-line DetfitError (``what``: ...) when they differ."""
    if not isinstance(state_dict, dict):
        raise DetfitError(f"{what} (the weights are not a state dict)")
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        k
        for k in own
        if k in state_dict
        and not (isinstance(state_dict[k], torch.Tensor) and state_dict[k].shape == own[k].shape)
    ]
    differences = []
    for keys, kind in ((missing, "missing"), (unexpected, "unexpected"), (shapes, "other shape")):
        if keys:
            differences.append(f"{len(keys)} {kind}, e.g. {keys[0]}")
    if differences:
        raise DetfitError(f"{what} ({'; '.join(differences)})")
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DetfitError(f"{what} ({first})") from None


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint's model, ready to run: ``model`` in eval mode on the device asked for,
    ``info`` its :func:`model_info` (with ``category_ids`` and ``keypoint_names`` where the run
    recorded them), ``config`` the run's settings as saved (None in a hand-made checkpoint)."""

    path: Path  # the file read (a run folder's best.pt, see run_checkpoint)
    model: nn.Module
    info: dict[str, Any]
    config: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def classes(self) -> list[str] | None:
        """Class names, background first (None when the checkpoint does not record them)."""
        return self.info.get("classes")

    @property
    def keypoint_names(self) -> list[str] | None:
        return self.info.get("keypoint_names")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a checkpoint or run folder (:func:`run_checkpoint`: its best.pt), rebuilt
    from its ``model_info`` with the evaluated weights (EMA's when the run kept an average), on
    ``device`` (a torch device, or a name as ``--device`` takes them: auto, cpu, cuda, ...).
    Every problem with the file is one DetfitError line naming it."""
    from detfit.distributed import resolve_device

    file = run_checkpoint(path)
    ckpt = load_checkpoint(file)
    device = resolve_device(device) if isinstance(device, str) else device
    model = rebuild_model(ckpt["model_info"], ckpt["model"], str(file))
    config = ckpt.get("config")
    return LoadedModel(file, model.to(device).eval(), dict(ckpt["model_info"]), config)


# What only a resumable checkpoint (last.pt) holds; without them it is weights-only.
RESUME_KEYS = ("optimizer", "scheduler", "history", "epoch")
# Fields last.pt holds only sometimes: the raw weights beside EMA's.
OPTIONAL_RESUME_KEYS = ("train_model",)


@dataclass
class ResumeState:
    """Everything last.pt holds to continue a run from the very step it was saved at.

    The trainer fills one to save (:meth:`payload`) and gets one back from :func:`resume_state`,
    so the key names live here alone. ``epoch`` is the index of the current epoch (from 0) and
    ``iteration`` the steps done in it; ``evaluated`` says the epoch ended with its evaluation.
    """

    model: dict[str, Any]  # the evaluated weights (EMA's when on)
    model_info: dict[str, Any]
    config: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    history: list[dict[str, Any]]
    epoch: int = 0
    iteration: int = 0
    evaluated: bool = True
    global_step: int = 0
    iters_per_epoch: int = 0
    world_size: int = 1
    seconds: float = 0.0  # training time spent so far (a time budget counts it)
    metric_key: str | None = None
    scaler: dict[str, Any] | None = None
    rng: list[dict[str, Any]] | None = None  # one per rank
    meter: dict[str, Any] | None = None  # the epoch's running loss means
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    budget: dict[str, Any] | None = None
    stopped: str | None = None  # why a time budget or patience ended the run
    train_model: dict[str, Any] | None = None  # the raw weights, when ``model`` is EMA's

    def payload(self) -> dict[str, Any]:
        """The dictionary written to disk (``epoch`` counted from 1 there, as in the metrics)."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["epoch"] = self.epoch + 1
        if self.train_model is None:
            del out["train_model"]
        return out

    @property
    def done(self) -> int:
        """Epochs trained and evaluated."""
        return len(self.history)

    def training_model(self, source: str) -> nn.Module:
        """The model a resumed run continues training: the raw training weights (a run with EMA
        also keeps them, beside the averaged ones it evaluates)."""
        return rebuild_model(self.model_info, self.train_model or self.model, source)


def resume_state(path: str | Path) -> ResumeState:
    """Read ``path`` (a last.pt) to continue its run. A weights-only file, or a last.pt of a
    format this version does not write (a field missing), is one line: its weights still start
    a new run (``--weights``)."""
    path = Path(path)
    path = path / "last.pt" if path.is_dir() else path
    ckpt = load_checkpoint(path)
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise DetfitError(
            f"{path}: a weights-only checkpoint (no {', '.join(missing)}) cannot be resumed"
        )
    fields = {name: ckpt[name] for name in ResumeState.__dataclass_fields__ if name in ckpt}
    absent = [name for name in ResumeState.__dataclass_fields__ if name not in fields]
    absent = [name for name in absent if name not in OPTIONAL_RESUME_KEYS]
    if absent:
        raise DetfitError(
            f"{path}: written by another version of detfit (no {', '.join(absent)}), so it "
            f"cannot be resumed; start a new run from its weights with --weights {path}"
        )
    fields["epoch"] = int(fields["epoch"]) - 1  # from 1 on disk, as in the metrics
    return ResumeState(**fields)


def best_payload(state: ResumeState) -> dict[str, Any]:
    """What best.pt keeps of a run's state (:data:`BEST_KEYS`: no optimizer, schedule or RNG)."""
    payload = state.payload()
    return {k: payload[k] for k in BEST_KEYS if k in payload}


def strip_checkpoint(source: str | Path, out: str | Path) -> tuple[Path, int, int]:
    """Keep what eval/predict/export need (:data:`INFERENCE_KEYS`: weights, model_info,
    settings); drop optimizer state, schedules, RNG and EMA's raw weights. ``source``: a
    checkpoint or run folder (its best.pt). Returns (out, bytes before, bytes after)."""
    path = run_checkpoint(source)
    ckpt = load_checkpoint(path)
    small = {k: ckpt[k] for k in INFERENCE_KEYS if k in ckpt}
    out = Path(out)
    save_checkpoint(out, small)
    return out, path.stat().st_size, out.stat().st_size
