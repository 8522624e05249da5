"""Fuzz the dataset readers: malformed COCO JSON, VOC XML, YOLO label files and mask images;
and the other files users hand detfit: YAML settings (``--config``, ``--set``) and the detfit
metadata of exported models (ONNX).

The property, for every generated input: reading it, checking it (``detfit data check``'s
check) and, when the check finds nothing fatal, building every training and evaluation target
either succeeds or raises DetfitError (one line for the user). Any other exception is a bug, and so
is an input that takes more than the per-example deadline (5 s), or that is interrupted as a hang
(20 s).

    python benchmarks/fuzz_readers.py --seconds 60            # every reader, a minute each
    python benchmarks/fuzz_readers.py coco --seconds 300

tests/test_fuzz_readers.py runs the same properties for a few seconds per reader.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from detfit.data.detection import DetectionDataset
from detfit.data.doctor import check
from detfit.data.formats.coco import read_coco
from detfit.data.formats.masks import read_mask_folder
from detfit.data.formats.voc import read_voc
from detfit.data.formats.yolo import read_yolo
from detfit.data.records import AnnotatedSet
from detfit.errors import DetfitError

SIZE = 32  # every real image the inputs may refer to is SIZE x SIZE

# ---------------------------------------------------------------- strategies

leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
anything = st.recursive(
    leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)


def _flat(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


coordinate = (
    st.integers(-5, SIZE + 5)
    | st.floats(-1e6, 1e6)
    | st.sampled_from([float("nan"), float("inf"), 1e300, -1e300, 0.5])
)


def _optional(strategy: st.SearchStrategy, one_in: int = 8) -> st.SearchStrategy:
    """Mostly well-typed values; one in ``one_in``, anything at all."""
    # not k == 0: hypothesis favours small and boundary integers
    return st.integers(0, 2**16).flatmap(lambda k: anything if k % one_in == 1 else strategy)


rle = st.fixed_dictionaries(
    {
        "size": st.sampled_from([[SIZE, SIZE], [SIZE, SIZE + 1], [0, 0], [-1, SIZE]]) | anything,
        "counts": st.text(alphabet=st.characters(min_codepoint=40, max_codepoint=120), max_size=20)
        | st.lists(st.integers(-5, SIZE * SIZE + 5), max_size=6)
        | st.just([SIZE * SIZE])
        | st.just("PPYo0"),
    }
)
segmentation = st.one_of(
    st.lists(st.lists(coordinate, max_size=12), max_size=3),
    st.lists(coordinate, max_size=10),
    rle,
    anything,
)
coco_image = st.fixed_dictionaries(
    {"id": _optional(st.integers(-2, 4))},
    optional={
        "file_name": _optional(st.sampled_from(["a.png", "b.jpg", "missing.png", "", "a.png\0"])),
        "width": _optional(st.sampled_from([SIZE, SIZE - 1, 0, -3, 2**40])),
        "height": _optional(st.sampled_from([SIZE, SIZE + 2, 0])),
    },
)
coco_annotation = st.fixed_dictionaries(
    {
        "image_id": _optional(st.integers(-2, 4)),
        "category_id": _optional(st.integers(0, 3)),
    },
    optional={
        "id": _optional(st.integers(-1, 10)),
        "bbox": _optional(st.lists(coordinate, min_size=3, max_size=5)),
        "segmentation": segmentation,
        "area": _optional(coordinate),
        "iscrowd": _optional(st.integers(-1, 2) | st.booleans()),
        "keypoints": _optional(st.lists(coordinate, max_size=7)),
    },
)
coco_category = st.fixed_dictionaries(
    {"id": _optional(st.integers(-1, 3))},
    optional={
        "name": _optional(st.sampled_from(["cat", "dog", "", "cat"])),
        "keypoints": _optional(st.lists(st.sampled_from(["nose", "eye"]), max_size=2)),
        "skeleton": anything,
    },
)
coco_document = st.fixed_dictionaries(
    {
        "images": _optional(st.lists(coco_image, max_size=4), 20),
        "annotations": _optional(st.lists(coco_annotation, max_size=6), 20),
        "categories": _optional(st.lists(coco_category, min_size=1, max_size=3), 20),
    }
)
coco_file = st.integers(0, 2**16).flatmap(
    lambda k: (
        st.one_of(
            anything.map(lambda d: json.dumps(d).encode()),
            st.binary(max_size=200),
            st.integers(1, 3000).map(
                lambda n: b"[" * n
            ),  # nesting deep enough to overflow a parser
        )
        if k == 0
        else coco_document.map(lambda d: json.dumps(d).encode())
    )  # NaN/Infinity tokens included
)

xml_text = st.integers(0, 2**16).flatmap(
    lambda k: (
        st.one_of(
            st.sampled_from(["0", "-4", "nan", "inf", "1e400", "", "cat", "1e308"]),
            st.text(alphabet="0123456789.-eE+abc ", max_size=8),
        )
        if k % 4 == 1
        else st.integers(1, SIZE).map(str)
    )
)


@st.composite
def voc_xml(draw: st.DrawFn) -> bytes:
    """An annotation file: mostly the VOC shape with odd values, sometimes broken XML."""
    if draw(st.integers(0, 2**16)) % 10 == 1:
        return draw(st.binary(max_size=200))
    parts = ["<annotation>"]
    if draw(st.booleans()):
        parts.append(f"<filename>{draw(st.sampled_from(['a.jpg', 'missing.jpg', '']))}</filename>")
    if draw(st.booleans()):
        parts.append(
            f"<size><width>{draw(xml_text)}</width><height>{draw(xml_text)}</height></size>"
        )
    for _ in range(draw(st.integers(0, 3))):
        corners = "".join(
            f"<{k}>{draw(xml_text)}</{k}>"
            for k in ("xmin", "ymin", "xmax", "ymax")
            if draw(st.integers(0, 2**16)) % 8 != 1
        )
        box = f"<bndbox>{corners}</bndbox>" if draw(st.integers(0, 2**16)) % 6 != 1 else ""
        parts.append(
            f"<object><name>{draw(st.sampled_from(['cat', 'dog', '', ' ']))}</name>"
            f"<difficult>{draw(st.sampled_from(['0', '1', 'x']))}</difficult>{box}</object>"
        )
    if draw(st.integers(0, 2**16)) % 6 != 1:
        parts.append("</annotation>")
    text = "".join(parts).encode()
    if draw(st.integers(0, 2**16)) % 5 == 1:  # cut it anywhere
        text = text[: draw(st.integers(0, len(text)))]
    return text


odd_token = st.one_of(
    st.sampled_from(["2", "-1", "1.5", "nan", "inf", "-inf", "1e309", "abc", "", "0x10"]),
    st.sampled_from(["9" * 30, "1e-300", "100000000000"]),
    st.floats(-3, 3).map(str),
)
yolo_line = st.tuples(
    _optional(st.sampled_from(["0", "1"]).map(lambda c: [c]), 6),
    st.lists(_optional(st.floats(0, 1).map(lambda v: [f"{v:.4f}"]), 10), min_size=0, max_size=10),
).map(lambda parts: " ".join(str(t) for group in (parts[0], *parts[1]) for t in _flat(group)))
yolo_file = st.integers(0, 9).flatmap(
    lambda k: (
        st.binary(max_size=120)
        if k == 0
        else st.lists(yolo_line, max_size=6).map(lambda lines: "\n".join(lines).encode())
    )
)


@st.composite
def mask_png(draw: st.DrawFn) -> bytes:
    """An instance-id mask: any PIL mode and size, odd values, or bytes that are no image."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    mode = draw(st.sampled_from(["L", "I;16", "I", "F", "P", "RGB", "RGBA", "1", "LA"]))
    height, width = draw(st.sampled_from([(SIZE, SIZE)] * 4 + [(SIZE - 1, SIZE), (1, SIZE + 3)]))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    high = draw(st.sampled_from([2, 4, 256, 2**16]))
    ids = rng.integers(0, high, (height, width))
    if mode == "F":
        ids = ids.astype(np.float32)
        ids[0, 0] = draw(st.sampled_from([np.nan, np.inf, -5.0, 1e10, 0.0]))
        image = Image.fromarray(ids, mode="F")
    elif mode == "I":
        image = Image.fromarray((ids - draw(st.integers(0, 3))).astype(np.int32))
    elif mode == "I;16":
        image = Image.fromarray(ids.astype(np.uint16))
    else:
        image = Image.fromarray((ids % 256).astype(np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if mode in ("F", "I") else "PNG")
    data = buffer.getvalue()
    if draw(st.integers(0, 6)) == 0:  # truncated
        data = data[: draw(st.integers(0, len(data)))]
    return data


mask_sidecar = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["1", "2", "x", "-1"]), st.sampled_from(["cat", "dog"])).map(
        lambda d: json.dumps(d).encode()
    ),
    st.binary(max_size=40),
)

# ---------------------------------------------------------------- the property


def _write_image(path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.arange(SIZE * SIZE * 3) % 251).astype(np.uint8).reshape(SIZE, SIZE, 3)
    Image.fromarray(pixels).save(path, format=fmt)


def exercise(read: Callable[[], AnnotatedSet]) -> str:
    """Read, check, and build every target: "error" (a DetfitError), "fatal" (the check stops
    training) or "ok" (training reads every image). Anything else propagates."""
    try:
        annotations = read()
        problems = check(annotations, workers=1)
        if any(p.fatal for p in problems):
            return "fatal"
        for train in (False, True):
            dataset = DetectionDataset(annotations, train=train)
            for i in range(len(dataset)):
                dataset[i]
    except DetfitError as exc:
        assert "\n" not in str(exc), f"a user error spans lines: {exc}"
        return "error"
    return "ok"


def coco_case(folder: Path, content: bytes) -> str:
    _write_image(folder / "a.png", "PNG")
    _write_image(folder / "b.jpg", "JPEG")
    (folder / "instances.json").write_bytes(content)
    return exercise(lambda: read_coco(folder / "instances.json"))


def voc_case(folder: Path, files: list[bytes], names: list[str] | None) -> str:
    _write_image(folder / "JPEGImages" / "a.jpg", "JPEG")
    (folder / "Annotations").mkdir()
    for k, content in enumerate(files):
        (folder / "Annotations" / ("a.xml" if k == 0 else f"x{k}.xml")).write_bytes(content)
    return exercise(lambda: read_voc(folder, names))


def yolo_case(folder: Path, content: bytes, names: list[str] | None) -> str:
    _write_image(folder / "images" / "a.png", "PNG")
    (folder / "labels").mkdir()
    (folder / "labels" / "a.txt").write_bytes(content)
    return exercise(lambda: read_yolo(folder / "images", names))


def masks_case(folder: Path, mask: bytes, sidecar: bytes | None) -> str:
    _write_image(folder / "images" / "a.png", "PNG")
    (folder / "masks").mkdir()
    (folder / "masks" / "a.png").write_bytes(mask)
    if sidecar is not None:
        (folder / "masks" / "a.json").write_bytes(sidecar)
    return exercise(lambda: read_mask_folder(folder))


class Hang(Exception):
    """An input kept a reader busy past the hang limit."""


class Case:
    """A fresh folder per example (hypothesis runs many examples per test), and an alarm that
    interrupts a reader still busy after ``hang_s`` (hypothesis' deadline only measures)."""

    def __init__(self, hang_s: float) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="detfit-fuzz-"))
        self.hang_s = hang_s

    def _alarm(self, signum: int, frame: Any) -> None:
        raise Hang(f"still reading after {self.hang_s} s")

    def __enter__(self) -> Path:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGALRM, self._alarm)
            signal.setitimer(signal.ITIMER_REAL, self.hang_s)
        return self.path

    def __exit__(self, *exc: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.setitimer(signal.ITIMER_REAL, 0)
        shutil.rmtree(self.path, ignore_errors=True)


# ---------------------------------------------------------------- settings and model metadata

SETTING_KEYS = ["epochs", "lr", "batch_size", "model", "model_options", "loss_weights", "workers",
                "hflip_prob", "max_pixels", "optimizer", "out", "epochz", "1"]  # fmt: skip
setting_value = st.one_of(
    anything,
    st.sampled_from([1, 2, 0.01, "sgd", "adamw", {"min_size": 64}, {"min_size": [60000]}]),
)


@st.composite
def settings_yaml(draw: st.DrawFn) -> str:
    """A settings file: mostly a mapping of (often real) keys, sometimes YAML aliases nested
    until they would expand past any memory, deep brackets, or any text."""
    kind = draw(st.integers(0, 9))
    if kind == 0:  # a billion laughs of 2..12 levels, each repeating the one before 2..10 times
        levels, fan = draw(st.integers(2, 12)), draw(st.integers(2, 10))
        lines = [f"l0: &l0 [{', '.join(['x'] * fan)}]"]
        lines += [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * fan)}]" for n in range(1, levels)]
        return "\n".join(lines) + "\n"
    if kind == 1:
        n = draw(st.integers(1, 5000))
        return "lr: " + draw(st.sampled_from(["[", "{a: "])) * n
    if kind == 2:
        return draw(st.text(max_size=60))
    if kind < 5:  # settings that validate
        good = {"epochs": 3, "lr": 0.02, "optimizer": "adamw", "model_options": {"min_size": 64}}
        keys = draw(st.lists(st.sampled_from(list(good)), max_size=4, unique=True))
        return json.dumps({k: good[k] for k in keys})
    data = draw(st.dictionaries(st.sampled_from(SETTING_KEYS), setting_value, max_size=4))
    return json.dumps(data, default=str)  # JSON is YAML


def settings_case(folder: Path, text: str, set_item: str) -> str:
    """Read a settings file and a --set item as the command line does: valid settings, or a
    SettingsError whose every line is short (values are quoted as excerpts)."""
    from detfit.config import TrainConfig, load_settings, merge_settings

    path = folder / "settings.yaml"
    path.write_text(text, errors="surrogateescape")
    try:
        TrainConfig.from_dict(merge_settings(load_settings(path), None, [set_item]))
    except DetfitError as exc:
        assert all(len(line) < 600 for line in str(exc).splitlines()), str(exc)[:2000]
        return "error"
    return "ok"


hostile_set = st.tuples(st.sampled_from(SETTING_KEYS + ["model_options.min_size"]), settings_yaml())
set_item = st.integers(0, 3).flatmap(
    lambda k: (
        hostile_set.map(lambda kv: f"{kv[0]}={kv[1]}")
        if k == 0
        else st.sampled_from(["epochs=2", "lr=0.01", "model_options.min_size=64", "workers=0"])
    )
)


def _onnx_with_metadata(path: Path, metadata: str) -> None:
    """A minimal ONNX detector shape (Identity nodes named boxes/labels/scores) carrying
    ``metadata``: ONNX Runtime opens it, so detfit reads the metadata as from an export."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [3, None, None])
    names = ("boxes", "labels", "scores")
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, None, None]) for n in names]
    nodes = [helper.make_node("Identity", ["images"], [n]) for n in names]
    graph = helper.make_graph(nodes, "g", [x], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"detfit": metadata})
    onnx.save(model, path)


GOOD_METADATA = {
    "name": "maskrcnn_mobilenet_v2_fpn",
    "num_classes": 3,
    "classes": ["__background__", "cat", "dog"],
    "category_ids": [0, 7, 3],
}
model_metadata = st.integers(0, 9).flatmap(
    lambda k: (
        anything.map(lambda d: json.dumps(d)) | st.text(max_size=30)
        if k == 0
        else st.just(json.dumps(GOOD_METADATA))
        if k < 4
        else st.fixed_dictionaries(
            {},
            optional={
                "name": _optional(st.just("maskrcnn_mobilenet_v2_fpn")),
                "num_classes": _optional(st.integers(-1, 4)),
                "classes": _optional(
                    st.lists(st.sampled_from(["__background__", "cat", "dog"]), max_size=4)
                ),  # fmt: skip
                "category_ids": _optional(st.lists(st.integers(-1, 90), max_size=4)),
            },
        ).map(json.dumps)
    )
)


def metadata_case(folder: Path, metadata: str, classes: list[str] | None, labels: list[int]) -> str:
    """Load an ONNX model with this metadata, keep ``classes``, and turn raw outputs with
    ``labels`` into a Prediction: a result or one DetfitError line."""
    import torch

    from detfit.predict.predictor import Predictor

    path = folder / "model.onnx"
    _onnx_with_metadata(path, metadata)
    try:
        predictor = Predictor(path, device="cpu", score_threshold=0.0, classes=classes)
        n = len(labels)
        out = {
            "boxes": torch.zeros(n, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "scores": torch.ones(n),
        }
        predictor._result(out, torch.zeros(3, SIZE, SIZE, dtype=torch.uint8))
    except DetfitError as exc:
        assert "\n" not in str(exc), f"a user error spans lines: {exc}"
        return "error"
    return "ok"


names = st.none() | st.just(["cat", "dog"])
READERS: dict[str, tuple[tuple[st.SearchStrategy, ...], Callable[..., str]]] = {
    "coco": ((coco_file,), coco_case),
    "voc": ((st.lists(voc_xml(), min_size=1, max_size=3), names), voc_case),
    "yolo": ((yolo_file, names), yolo_case),
    "masks": ((mask_png(), mask_sidecar), masks_case),
    "settings": ((settings_yaml(), set_item), settings_case),
    "metadata": (
        (model_metadata, st.none() | st.just(["cat"]), st.lists(st.integers(0, 3), max_size=3)),
        metadata_case,
    ),
}


def fuzz(
    reader: str, max_examples: int, deadline_s: float = 5.0, shrink: bool = True
) -> dict[str, int]:
    """Run ``max_examples`` generated inputs through ``reader``; returns the outcome counts.
    A failure is re-raised with the smallest failing input (``shrink=False``: the first)."""
    strategies, case = READERS[reader]
    outcomes = {"ok": 0, "fatal": 0, "error": 0}

    @settings(
        max_examples=max_examples,
        deadline=timedelta(seconds=deadline_s),
        suppress_health_check=list(HealthCheck),
        database=None,
        phases=list(Phase) if shrink else [Phase.generate],
    )
    @given(st.tuples(*strategies))
    def run(args: tuple) -> None:
        with Case(hang_s=4 * deadline_s) as folder:
            outcomes[case(folder, *args)] += 1

    run()
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("readers", nargs="*", help=f"some of {', '.join(READERS)} (default: all)")
    parser.add_argument("--seconds", type=float, default=60.0, help="per reader")
    args = parser.parse_args()
    unknown = set(args.readers) - set(READERS)
    if unknown:
        parser.error(
            f"unknown reader(s) {', '.join(sorted(unknown))}; choose from {', '.join(READERS)}"
        )
    for reader in args.readers or list(READERS):
        start, total = time.monotonic(), {"ok": 0, "fatal": 0, "error": 0}
        while time.monotonic() - start < args.seconds:
            for key, count in fuzz(reader, 200).items():
                total[key] += count
        examples = sum(total.values())
        print(
            f"{reader}: {examples} inputs in {time.monotonic() - start:.0f} s: "
            f"{total['ok']} clean, {total['fatal']} stopped by the check, "
            f"{total['error']} DetfitError; no other exception, none over the deadline",
            flush=True,
        )
    sys.exit(0)


if __name__ == "__main__":
    main()
