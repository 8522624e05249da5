"""How a dataset is named everywhere (train, eval, predict, data check/convert).

On the command line, a short spec ``FORMAT:PATH[,key=value...]``::

    coco:annotations/instances.json,images=photos,val=annotations/val.json
    voc:VOCdevkit/VOC2007                  (ImageSets/Main/<split>.txt lists are honoured)
    yolo:data.yaml                         (Ultralytics' file: path, train, val, names)
    masks:my_masks                         (images/ + masks/ with instance-id PNGs)
    pennfudan                              (the tutorial's set; downloaded when missing)

or a YAML file with the same keys (paths relative to the file)::

    format: coco
    train: {path: train.json, images: train_images}
    val: {path: val.json, images: val_images}
    names: [cat, dog]        # optional: from the files when they carry them
    drop_empty: false        # keep images without annotations as negatives

Without ``val``, a seeded split of ``train`` holds out ``num_test`` images (as the tutorial).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from detfit.data.formats import FORMATS, read_split
from detfit.data.records import AnnotatedSet
from detfit.errors import DetfitError
from detfit.yamlio import load_yaml

SPLITS = ("train", "val", "test")
SHORT_KEYS = {"val", "test", "images", "val_images", "test_images", "names", "drop_empty"}


@dataclass
class SplitSource:
    path: Path | list[Path]
    images: Path | None = None  # COCO: the folder its file_names are relative to


@dataclass
class DatasetSpec:
    format: str
    train: SplitSource
    val: SplitSource | None = None
    test: SplitSource | None = None
    names: list[str] | None = None
    drop_empty: bool = False
    text: str = ""  # as the user wrote it, for messages and config.yaml

    @classmethod
    def parse(cls, text: str | Path) -> DatasetSpec:
        text = str(text)
        if text.endswith((".yaml", ".yml")) and ":" not in text.split("/")[0]:
            return cls.from_yaml(Path(text))
        fmt, _, rest = text.partition(":")
        fmt = fmt.strip().lower()
        if fmt not in FORMATS:
            raise DetfitError(
                f"dataset {text!r}: unknown format {fmt!r}; use one of {', '.join(FORMATS)} "
                "as FORMAT:PATH, or a .yaml file"
            )
        path, *options = rest.split(",") if rest else [""]
        opts: dict[str, str] = {}
        for option in options:
            key, eq, value = option.partition("=")
            if not eq or key.strip() not in SHORT_KEYS:
                raise DetfitError(
                    f"dataset {text!r}: bad option {option!r}; known: {', '.join(sorted(SHORT_KEYS))}"
                )
            opts[key.strip()] = value.strip()
        data: dict[str, Any] = {"format": fmt, "train": path or None}
        for split in ("val", "test"):
            if split in opts:
                data[split] = {"path": opts[split], "images": opts.get(f"{split}_images")}
        if path and "images" in opts:
            data["train"] = {"path": path, "images": opts["images"]}
        if "names" in opts:
            data["names"] = [n for n in opts["names"].split("|") if n]
        if "drop_empty" in opts:
            data["drop_empty"] = opts["drop_empty"].lower() in {"1", "true", "yes"}
        return cls.from_dict(data, Path.cwd(), text)

    @classmethod
    def from_yaml(cls, path: Path) -> DatasetSpec:
        try:
            data = load_yaml(path.read_text(), str(path))
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise DetfitError(f"{path}: cannot read dataset file ({reason})") from None
        except yaml.YAMLError as exc:
            raise DetfitError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise DetfitError(f"{path}: a dataset file must be a mapping (format, train, ...)")
        return cls.from_dict(data, path.parent, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path, text: str) -> DatasetSpec:
        unknown = set(data) - {"format", *SPLITS, "names", "drop_empty", "path"}
        if unknown:
            raise DetfitError(f"{text}: unknown key(s) {', '.join(sorted(unknown))}")
        fmt = str(data.get("format", "")).lower()
        if fmt not in FORMATS:
            raise DetfitError(f"{text}: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        base = base / data["path"] if data.get("path") else base

        def source(value: Any) -> SplitSource | None:
            if value is None:
                return None
            if isinstance(value, (str, Path)):
                return SplitSource(_resolve(base, value))
            if isinstance(value, list):
                return SplitSource([_resolve(base, v) for v in value])
            if isinstance(value, dict) and "path" in value:
                images = value.get("images")
                return SplitSource(
                    _resolve(base, value["path"]), _resolve(base, images) if images else None
                )
            raise DetfitError(
                f"{text}: a split is a path or {{path: ..., images: ...}}, got {value!r}"
            )

        names = data.get("names")
        if isinstance(names, dict):  # Ultralytics style {0: a, 1: b}
            names = [names[k] for k in sorted(names)]
        if fmt == "pennfudan":  # the folder is optional: detfit's cache, downloaded on demand
            return cls(fmt, source(data.get("train")) or SplitSource(Path(".")), text=text)
        if data.get("train") is None:
            raise DetfitError(f"{text}: no train split (give FORMAT:PATH or a 'train' key)")
        spec = cls(
            format=fmt,
            train=source(data["train"]),
            val=source(data.get("val")),
            test=source(data.get("test")),
            names=[str(n) for n in names] if names else None,
            drop_empty=bool(data.get("drop_empty", False)),
            text=text,
        )
        if (
            fmt == "yolo"
            and isinstance(spec.train.path, Path)
            and spec.train.path.suffix in {".yaml", ".yml"}
        ):
            return _from_ultralytics(spec)
        return spec

    @property
    def splits(self) -> list[str]:
        """The splits it names, train first."""
        return [s for s in SPLITS if getattr(self, s) is not None]

    def read(self, split: str = "train", classes: list[str] | None = None) -> AnnotatedSet:
        """One split's annotations; ``classes`` (from train) fixes the label order of the others."""
        source = getattr(self, split) if split in SPLITS else None
        if source is None:
            raise DetfitError(f"{self.text}: no {split} split (it has {', '.join(self.splits)})")
        names = classes[1:] if classes else self.names
        result = read_split(self.format, source.path, source.images, names, self.drop_empty)
        if classes and result.classes != classes:
            raise DetfitError(
                f"{result.source}: classes {result.classes[1:]} differ from the train split's "
                f"{classes[1:]}"
            )
        return result


SPLITS = ("train", "val", "test")
PATH_OPTIONS = {"val", "test", "images", "val_images", "test_images"}


def absolute_spec(text: str) -> str:
    """``text`` with every path in it absolute (from the working folder, as :meth:`DatasetSpec.parse`
    reads them): what a run folder records, so that ``detfit eval RUN`` finds the data from any
    folder."""
    if text.endswith((".yaml", ".yml")) and ":" not in text.split("/")[0]:
        return os.path.abspath(text)
    fmt, colon, rest = text.partition(":")
    if not colon or not rest:
        return text
    path, *options = rest.split(",")
    parts = [os.path.abspath(path) if path else path]
    for option in options:
        key, eq, value = option.partition("=")
        if eq and key.strip() in PATH_OPTIONS and value.strip():
            option = f"{key}={os.path.abspath(value.strip())}"
        parts.append(option)
    return f"{fmt}:{','.join(parts)}"


def _resolve(base: Path, value: Any) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else base / path


def _from_ultralytics(spec: DatasetSpec) -> DatasetSpec:
    """Expand a YOLO ``data.yaml`` (path, train, val, test, names) into a spec."""
    path = spec.train.path
    assert isinstance(path, Path)
    try:
        data = load_yaml(path.read_text(), str(path)) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise DetfitError(f"{path}: cannot read YOLO data file ({first})") from None
    if not isinstance(data, dict):
        raise DetfitError(f"{path}: a YOLO data file must be a mapping (path, train, val, names)")
    data = {k: v for k, v in data.items() if k in {"path", *SPLITS, "names"}}
    base = path.parent
    if data.get("path"):
        root = Path(str(data["path"])).expanduser()
        # Ultralytics reads a relative ``path`` from the working folder; detfit from the file's
        # folder first (a data set that travels with its yaml), then the working folder
        if not root.is_absolute():
            root = path.parent / root if (path.parent / root).exists() else Path.cwd() / root
        base = root
    for split in SPLITS:
        value = data.get(split)
        if isinstance(value, str):
            data[split] = _ultralytics_split(base, value)
        elif isinstance(value, list):
            data[split] = [_ultralytics_split(base, str(v)) for v in value]
    data.pop("path", None)
    data["format"] = "yolo"
    if spec.names:
        data["names"] = spec.names
    result = DatasetSpec.from_dict(data, base, spec.text)
    result.drop_empty = spec.drop_empty
    return result


def _ultralytics_split(base: Path, value: str) -> Path:
    """A split's path as Ultralytics resolves it: relative to ``base``, and when that does not
    exist and it starts with ``../``, without it. Roboflow's YOLO exports write
    ``train: ../train/images`` beside a data.yaml that sits next to ``train/``."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    if not (base / path).exists() and value.startswith("../"):
        fallback = base / value[3:]
        if fallback.exists():
            return fallback
    return base / path
