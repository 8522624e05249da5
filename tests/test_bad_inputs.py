"""The bad-input matrix: every mistake a user can make with settings, data, checkpoints or the disk
ends in exit code 2 and one stderr line, without a traceback, naming the file or key, and leaves
every file already written exactly as it was (hashes of the whole workspace before and after).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import detfit.fileio as fileio
from conftest import SMALL, run_main
from detfit.checkpoint import model_info, save_checkpoint
from detfit.config import TrainConfig
from detfit.data.synthetic import make_pennfudan, write_all_formats
from detfit.models import build_model

MODEL = "maskrcnn_mobilenet_v2_fpn"
# Settings that keep any run that gets past the checks tiny (none should get that far).
TINY_RUN = [
    *("--model", MODEL, "--weights", "none", "--weights-backbone", "none", "--workers", "0"),
    *("--set", f"model_options={json.dumps(SMALL)}", "--set", "num_test=2"),
    *("--set", "max_iters_per_epoch=1", "--set", "plots=false"),
]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``: path -> sha256 (folders: "dir")."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        out[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace with good and broken datasets, checkpoints and an earlier run folder."""
    root = tmp_path_factory.mktemp("workspace")
    pf = make_pennfudan(root / "pf", num_images=6)
    for name, damage in {
        "pf_badmask": lambda r: Image.new("L", (5, 7)).save(
            sorted((r / "PedMasks").glob("*.png"))[0]
        ),
        "pf_truncated": lambda r: truncate(sorted((r / "PNGImages").glob("*.png"))[1]),
    }.items():
        shutil.copytree(pf, root / name)
        damage(root / name)
    one = make_pennfudan(root / "pf_one", num_images=1)
    assert one.is_dir()

    demo = root / "demo"
    write_all_formats(demo, num_images=6)
    coco = json.loads((demo / "coco" / "annotations.json").read_text())
    images_dir = demo / "coco" / "images"

    def coco_variant(name: str, data: dict | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data)
        (demo / "coco" / name).write_text(text)

    coco_variant("broken.json", '{"images": [')
    unknown_image = json.loads(json.dumps(coco))
    unknown_image["annotations"][0]["image_id"] = 999
    coco_variant("unknown_image.json", unknown_image)
    missing = json.loads(json.dumps(coco))
    missing["images"][0]["file_name"] = "nowhere.png"
    coco_variant("missing_image.json", missing)
    bad_bbox = json.loads(json.dumps(coco))
    bad_bbox["annotations"][0]["bbox"] = [1, 2, "wide", 4]
    coco_variant("bad_bbox.json", bad_bbox)
    short_rle = json.loads(json.dumps(coco))
    first_image = short_rle["images"][0]
    size = [first_image["height"], first_image["width"]]
    short_rle["annotations"][0]["segmentation"] = {"size": size, "counts": [5, 5]}
    coco_variant("short_rle.json", short_rle)
    truncated = json.loads(json.dumps(coco))
    first = truncated["images"][0]
    Image.open(images_dir / first["file_name"]).convert("RGB").save(images_dir / "cut.jpg")
    truncate(images_dir / "cut.jpg")
    first["file_name"] = "cut.jpg"
    coco_variant("truncated.json", truncated)

    voc = demo / "voc"
    shutil.copytree(voc, root / "voc_broken")
    (sorted((root / "voc_broken" / "Annotations").glob("*.xml"))[0]).write_text("<annotation><")
    shutil.copytree(demo / "yolo", root / "yolo_nan")
    label = sorted((root / "yolo_nan" / "labels").rglob("*.txt"))[0]
    label.write_text("0 nan 0.5 0.2 0.2\n")
    shutil.copytree(demo / "masks", root / "masks_unpaired")
    sorted((root / "masks_unpaired" / "masks").glob("*.png"))[0].unlink()

    # checkpoints: a good one, and broken variants of it
    cfg = TrainConfig(
        model=MODEL, weights=None, weights_backbone=None, model_options=dict(SMALL),
        data_root=str(pf), num_test=2, workers=0,
    )  # fmt: skip
    model = build_model(MODEL, 2, weights=None, weights_backbone=None, **SMALL)
    info = model_info(MODEL, 2, ["__background__", "person"], dict(SMALL), model)
    good = {"model": model.state_dict(), "model_info": info, "config": cfg.to_dict()}
    ckpts = root / "ckpts"
    save_checkpoint(ckpts / "good.pt", good)
    save_checkpoint(ckpts / "classes.pt", {**good, "model_info": {**info, "num_classes": 4}})
    bad_options = {**info, "options": {**info["options"], "fpn_channels": "wide"}}
    save_checkpoint(ckpts / "options.pt", {**good, "model_info": bad_options})
    extra = {**good["model"], "head.extra.weight": torch.zeros(1)}
    save_checkpoint(ckpts / "extra_key.pt", {**good, "model": extra})
    save_checkpoint(ckpts / "no_info.pt", {"model": good["model"]})
    (ckpts / "garbage.pt").write_bytes(b"PK\x03\x04 not a zip at all")
    with open(ckpts / "plain.pt", "wb") as f:  # pickle.dump, not torch.save
        pickle.dump({"model": {"w": [1.0]}, "model_info": info}, f)
    save_checkpoint(ckpts / "no_config.pt", {k: v for k, v in good.items() if k != "config"})

    run = root / "runs" / "old"
    run.mkdir(parents=True)
    cfg.save(run / "config.yaml")
    (run / "metrics.csv").write_text("epoch,bbox_AP\n0,0.1\n")
    shutil.copy(ckpts / "good.pt", run / "last.pt")
    (root / "settings").mkdir()
    (root / "settings" / "not_yaml.yaml").write_text("epochs: [1\n")
    (root / "settings" / "a_list.yaml").write_text("- epochs\n- 3\n")
    (root / "settings" / "typo.yaml").write_text("epochz: 3\n")
    (root / "settings" / "bad_value.yaml").write_text("lr: fast\n")
    (root / "settings" / "number_key.yaml").write_text("1: 2\n")
    return root


def expect_one_line(err: str, *named: str) -> str:
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("detfit: error: "), err
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def run_case(ws, monkeypatch, capsys, args, named, *, exit_code=2) -> str:
    monkeypatch.chdir(ws)
    before = snapshot(ws)
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == exit_code, err
    line = expect_one_line(err, *named)
    assert snapshot(ws) == before, "a failed command changed or created files"
    return line


TRAIN = ["train", "--quiet", "--out", "runs/new", *TINY_RUN]

SETTINGS_CASES = {
    "epochs not a number": (["--set", "epochs=abc"], ["epochs='abc'", "integer"]),
    "negative lr": (["--set", "lr=-0.01"], ["lr=-0.01", "greater than 0"]),
    "batch size 0": (["--set", "batch_size=0"], ["batch_size=0", "greater than or equal to 1"]),
    "negative workers": (["--workers", "-1"], ["workers=-1"]),
    "key inside a number": (["--set", "epochs.x=1"], ["epochs.x=1", "epochs=22", "single value"]),
    "option not a number": (["--set", "model_options.min_size=abc"], ["model_options.min_size"]),
    "zero epochs": (["--epochs", "0"], ["epochs=0"]),
    "zero num_test": (["--set", "num_test=0"], ["num_test=0"]),
    "misspelt setting": (["--set", "epoch=3"], ["epoch=3", "did you mean 'epochs'"]),
    "misspelt option": (["--set", "model_options.min_sise=64"], ["did you mean 'min_size'"]),
    "flip probability": (["--set", "hflip_prob=1.5"], ["hflip_prob=1.5", "less than or equal"]),
    "ema decay 1": (["--set", "ema_decay=1"], ["ema_decay=1", "less than 1"]),
    "unknown optimizer": (["--set", "optimizer=adam"], ["optimizer='adam'", "'sgd' or 'adamw'"]),
    "misspelt model": (
        ["--model", "maskrcnn_resnet_fpn"],
        ["did you mean 'maskrcnn_resnet50_fpn'"],
    ),
    "value not YAML": (["--set", "lr=[0.1"], ["--set lr=[0.1", "not a YAML value"]),
    "no key": (["--set", "=3"], ["--set '=3'", "KEY=VALUE"]),
    "zero threads": (["--set", "threads=0"], ["threads=0"]),
    "negative trainable layers": (
        ["--set", "model_options.trainable_backbone_layers=-1"],
        ["model_options.trainable_backbone_layers=-1"],
    ),
    "true as a count": (["--set", "batch_size=true"], ["batch_size=True", "integer"]),
    "config not YAML": (["--config", "settings/not_yaml.yaml"], ["settings/not_yaml.yaml"]),
    "config a list": (["--config", "settings/a_list.yaml"], ["settings/a_list.yaml", "mapping"]),
    "config misspelt key": (
        ["--config", "settings/typo.yaml"],
        ["settings/typo.yaml", "epochz=3", "did you mean 'epochs'"],
    ),
    "config bad value": (["--config", "settings/bad_value.yaml"], ["lr='fast'"]),
    "config number as a key": (["--config", "settings/number_key.yaml"], ["1 is not a setting"]),
    "options not a mapping": (["--set", "model_options=5"], ["model_options=5", "dictionary"]),
}


@pytest.mark.parametrize("case", list(SETTINGS_CASES))
def test_bad_settings(ws, monkeypatch, capsys, case):
    args, named = SETTINGS_CASES[case]
    run_case(ws, monkeypatch, capsys, [*TRAIN, *args], named)


def test_every_bad_setting_is_its_own_line(ws, monkeypatch, capsys):
    monkeypatch.chdir(ws)
    args = [*TRAIN, "--set", "epochs=0", "--set", "lr=-1", "--set", "model_options.max_size=x"]
    code, _, err = run_main(monkeypatch, capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 3 and "Traceback" not in err
    assert [ln.split(": ")[2].split("=")[0] for ln in lines] == [
        "model_options.max_size",
        "epochs",
        "lr",
    ]


def pennfudan(name: str) -> list[str]:
    return ["--data-root", name]


DATA_CASES = {
    "penn-fudan mask of another size": (
        pennfudan("pf_badmask"),
        ["pf_badmask/PedMasks/", "mask is"],
    ),
    "penn-fudan truncated image": (
        pennfudan("pf_truncated"),
        ["pf_truncated/PNGImages/", "decode"],
    ),
    "penn-fudan of one image": (pennfudan("pf_one"), ["pf_one", "at least 2"]),
    "coco not JSON": (["--data", "coco:demo/coco/broken.json"], ["broken.json", "not valid JSON"]),
    "coco unknown image id": (["--data", "coco:demo/coco/unknown_image.json"], ["image id 999"]),
    "coco missing image": (["--data", "coco:demo/coco/missing_image.json"], ["nowhere.png"]),
    "coco bbox not numbers": (
        ["--data", "coco:demo/coco/bad_bbox.json"],
        ["bad_bbox.json", "bbox"],
    ),
    "coco rle that does not cover its image": (
        ["--data", "coco:demo/coco/short_rle.json"],
        ["short_rle.json", "segmentation=", "counts cover 10 pixels"],
    ),
    "coco truncated jpeg": (["--data", "coco:demo/coco/truncated.json"], ["cut.jpg", "truncated"]),
    "voc broken xml": (["--data", "voc:voc_broken"], ["voc_broken/Annotations/", "cannot read"]),
    "yolo nan coordinate": (["--data", "yolo:yolo_nan/images"], ["yolo_nan/labels/", "normalised"]),
    "masks without a mask": (["--data", "masks:masks_unpaired"], ["masks_unpaired/images/"]),
    "unknown format": (["--data", "cocoa:x.json"], ["cocoa:x.json", "unknown format"]),
    "dataset option misspelt": (["--data", "coco:demo/coco/annotations.json,tset=x"], ["tset=x"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_stops_before_the_run_folder(ws, monkeypatch, capsys, case):
    args, named = DATA_CASES[case]
    run_case(ws, monkeypatch, capsys, [*TRAIN, *args], named)


CHECKPOINT_CASES = {
    "weights for another class count": ("classes.pt", ["classes.pt", "do not fit", "other shape"]),
    "model_info that does not build": ("options.pt", ["options.pt", "does not build"]),
    "weights with an extra tensor": ("extra_key.pt", ["extra_key.pt", "1 unexpected"]),
    "no model_info": ("no_info.pt", ["no_info.pt", "not a detfit checkpoint"]),
    "not a checkpoint": ("garbage.pt", ["garbage.pt", "not a readable checkpoint"]),
    "no such file": ("nowhere.pt", ["nowhere.pt", "not found"]),
    "a plain pickle": ("plain.pt", ["plain.pt", "not a readable checkpoint"]),
    "no training config": ("no_config.pt", ["no_config.pt", "holds no run settings"]),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint(ws, monkeypatch, capsys, case):
    name, named = CHECKPOINT_CASES[case]
    run_case(ws, monkeypatch, capsys, ["eval", f"ckpts/{name}", "--device", "cpu"], named)


@pytest.fixture
def full_disk(monkeypatch):
    """Files that accept 100 bytes and then fail as a full disk does (a patched write)."""
    real = os.fdopen

    class Full(io.RawIOBase):
        def __init__(self, fd: int, mode: str) -> None:
            self.file = real(fd, mode)
            self.written = 0

        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            self.written += len(data)
            if self.written > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def fileno(self) -> int:
            return self.file.fileno()

        def close(self) -> None:
            self.file.close()
            super().close()

    monkeypatch.setattr(fileio.os, "fdopen", Full)


def test_disk_full_when_converting(ws, monkeypatch, capsys, full_disk):
    (ws / "converted.json").write_text("{}")  # an earlier conversion, kept intact
    line = run_case(
        ws,
        monkeypatch,
        capsys,
        ["data", "convert", "coco:demo/coco/annotations.json", "converted.json"],
        ["no space left on device writing converted.json", "MB needed"],
    )
    assert "unexpected pos" not in line
    assert not list(ws.glob(".converted.json.*"))


def test_disk_full_when_a_run_starts(ws, monkeypatch, capsys, full_disk):
    monkeypatch.chdir(ws)
    before = snapshot(ws)
    code, _, err = run_main(monkeypatch, capsys, *TRAIN, "--data-root", "pf")
    assert code == 2
    expect_one_line(err, "no space left on device writing runs/new/")
    after = snapshot(ws)
    assert {k: v for k, v in after.items() if k in before} == before
    assert not [k for k in after if k.endswith(".tmp")]


def test_read_only_folder(ws, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(fileio.tempfile, "mkstemp", refuse)
    (ws / "readonly").mkdir(exist_ok=True)
    run_case(
        ws,
        monkeypatch,
        capsys,
        ["data", "convert", "coco:demo/coco/annotations.json", "readonly/out.json"],
        ["cannot write readonly/out.json", "Permission denied", "read-only"],
    )


def test_checkpoint_save_on_a_full_filesystem(tmp_path):
    """A real tiny filesystem (tmpfs): ENOSPC inside torch's zip writer still reads as a full
    disk, the previous checkpoint survives, and no temporary file is left."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size=1m tmpfs {mount} 2>/dev/null"):
        pytest.skip("needs root to mount a 1 MB tmpfs")
    try:
        small = {"model": {"w": torch.zeros(1000)}, "model_info": {}}
        save_checkpoint(mount / "last.pt", small)
        before = (mount / "last.pt").read_bytes()
        from detfit.errors import DetfitError

        with pytest.raises(DetfitError, match=r"no space left on device writing .*last.pt; 4 MB"):
            save_checkpoint(mount / "last.pt", {"model": {"w": torch.zeros(10**6)}})
        assert (mount / "last.pt").read_bytes() == before
        assert sorted(p.name for p in mount.iterdir()) == ["last.pt"]
    finally:
        os.system(f"umount {mount}")


def test_interrupted_save_keeps_the_old_file_and_stale_temps_are_removed(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")

    def killed(f):
        f.write(b"half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write(target, killed)
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]
    # what a kill -9 leaves: the temporary file itself
    stale = [tmp_path / ".last.pt.k3j_9xq1.tmp", tmp_path / ".metrics.csv.a1b2c3d4.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden.tmp", tmp_path / "config.yaml"]
    for path in keep:
        path.write_text("mine")
    assert fileio.remove_stale_temp_files(tmp_path) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted([target, *keep])
    assert fileio.remove_stale_temp_files(tmp_path / "absent") == []


def test_image_changed_on_disk_during_training(ws):
    """The check passed, then every image broke (a callback truncates them as training starts):
    the DataLoader worker's error is one line naming the file, a user error (exit code 2)."""
    from conftest import run_config
    from detfit.cli import user_message
    from detfit.engine import Callback, Trainer
    from detfit.errors import DetfitError

    data = ws / "changing"
    if data.exists():
        shutil.rmtree(data)
    shutil.copytree(ws / "pf", data)

    class BreakTheImages(Callback):
        def on_train_start(self, trainer) -> None:
            for image in data.rglob("PNGImages/*.png"):
                truncate(image)

    cfg = run_config(data, ws / "runs" / "changing").replace(
        workers=1, num_test=2, max_iters_per_epoch=1
    )
    with pytest.raises(DetfitError) as info:
        Trainer(cfg, callbacks=[BreakTheImages()], progress=False, log=lambda line: None).fit()
    line = user_message(info.value)
    assert "\n" not in line and info.value.exit_code == 2, line
    assert "changing/PennFudanPed/PNGImages/" in line and "cannot decode image" in line, line
    assert (ws / "runs" / "old" / "last.pt").read_bytes() == (ws / "ckpts" / "good.pt").read_bytes()
    shutil.rmtree(data)
    shutil.rmtree(ws / "runs" / "changing", ignore_errors=True)


# ---------------------------------------------------------------- run folders, resume, devices

RUN_CASES = {
    "out holds a run": (
        [*TRAIN[:3], "runs/old", *TRAIN[4:]],
        ["runs/old: already holds a run", "--resume runs/old", "--overwrite"],
    ),
    "no GPU": ([*TRAIN, "--device", "cuda"], ["--device cuda", "no CUDA GPU"]),
    "no second GPU": ([*TRAIN, "--device", "cuda:7"], ["--device cuda:7", "no CUDA GPU"]),
    "not a device": ([*TRAIN, "--device", "banana"], ["--device 'banana'", "not a device"]),
    "eval on no GPU": (["eval", "ckpts/good.pt", "--device", "cuda"], ["--device cuda"]),
    "resume changes lr": (
        ["train", "--resume", "runs/resumable", "--lr", "0.1"],
        ["--resume runs/resumable", "lr cannot change", "--config runs/resumable/config.yaml"],
    ),
    "resume with a recipe": (
        ["train", "--resume", "runs/resumable", "--recipe", "cpu"],
        ["--resume", "--recipe"],
    ),
    "resume elsewhere": (
        ["train", "--resume", "runs/resumable", "--out", "runs/other"],
        ["--resume runs/resumable", "not --out"],
    ),
    "resume weights only": (
        ["train", "--resume", "ckpts/good.pt"],
        ["ckpts/good.pt", "weights-only", "cannot be resumed"],
    ),
    "resume nothing": (["train", "--resume", "runs/none"], ["runs/none", "checkpoint not found"]),
    "predict into a file": (
        ["predict", "ckpts/good.pt", "settings", "--out", "settings/typo.yaml"],
        ["--out settings/typo.yaml: is a file"],
    ),
    "option the model lacks": (
        [*TRAIN, "--model", "fasterrcnn_mobilenet_v2", "--set", "model_options.fpn_channels=64"],
        ["fasterrcnn_mobilenet_v2 does not take model option(s) fpn_channels"],
    ),
}


def resumable_state(ws: Path) -> dict:
    """The good checkpoint's weights as a last.pt: every field a resume reads, before epoch 1."""
    from detfit.checkpoint import ResumeState

    good = torch.load(ws / "ckpts" / "good.pt", weights_only=True)
    state = ResumeState(
        model=good["model"], model_info=good["model_info"], config=good["config"],
        optimizer={}, scheduler={}, history=[], evaluated=False,
    )  # fmt: skip
    return state.payload()


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_bad_runs_and_devices(ws, monkeypatch, capsys, case):
    args, named = RUN_CASES[case]
    resumable = ws / "runs" / "resumable" / "last.pt"
    if not resumable.exists():  # what a run's checkpoint holds besides the weights
        save_checkpoint(resumable, resumable_state(ws))
    run_case(ws, monkeypatch, capsys, args, named)


def test_elastic_restarts_need_an_out_folder(ws, monkeypatch, capsys):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    args = [a for a in TRAIN if a not in ("--out", "runs/new")]
    run_case(ws, monkeypatch, capsys, args, ["--max-restarts needs --out"])


# ---------------------------------------------------------------- exported models, plots, predict


def onnx_file(path: Path, metadata: str | None, outputs=("boxes", "labels", "scores")) -> None:
    """A minimal ONNX graph (Identity nodes) with the given outputs and detfit metadata: enough
    for ONNX Runtime to open it, which is where the metadata is read."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [3, None, None])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, None, None]) for n in outputs]
    nodes = [helper.make_node("Identity", ["images"], [n]) for n in outputs]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], outs), opset_imports=[helper.make_opsetid("", 17)]
    )
    if metadata is not None:
        helper.set_model_props(model, {"detfit": metadata})
    onnx.save(model, path)


def torchscript_file(path: Path, metadata: str) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
        torch.jit.save(
            torch.jit.script(torch.nn.Identity()), path, _extra_files={"detfit.json": metadata}
        )


GOOD_INFO = {"name": MODEL, "num_classes": 2, "classes": ["__background__", "person"]}
BAD_METADATA = {
    "not JSON": ("{name:", "not valid JSON"),
    "a list": ("[1, 2]", "a list, not a mapping"),
    "no name": (json.dumps({"num_classes": 2}), "no model name"),
    "class count a word": (json.dumps({**GOOD_INFO, "num_classes": "two"}), "num_classes 'two'"),
    "classes of another model": (
        json.dumps({**GOOD_INFO, "classes": ["__background__", "a", "b"]}),
        "classes is not a list of 2 names",
    ),
    "category ids not numbers": (
        json.dumps({**GOOD_INFO, "category_ids": [0, "person"]}),
        "category_ids is not a list of 2 integers",
    ),
}


@pytest.fixture(scope="module")
def exports(ws) -> Path:
    folder = ws / "exports"
    folder.mkdir()
    for n, (text, _) in enumerate(BAD_METADATA.values()):
        onnx_file(folder / f"meta{n}.onnx", text)
        torchscript_file(folder / f"meta{n}.torchscript.pt", text)
    onnx_file(folder / "not_a_detector.onnx", json.dumps(GOOD_INFO), outputs=("y",))
    onnx_file(folder / "no_metadata.onnx", None)
    onnx_file(folder / ".model.partial.onnx", json.dumps(GOOD_INFO))  # a killed export's
    (ws / "plots").mkdir()
    for name, text in {
        "word_epoch": "epoch,bbox_AP\nabc,0.1\n",
        "nan_epoch": "epoch,bbox_AP\nnan,nan\n",
        "extra_cells": "epoch,bbox_AP\n1,0.1,5,6\n",
    }.items():
        (ws / "plots" / name).mkdir()
        (ws / "plots" / name / "metrics.csv").write_text(text)
    (ws / "settings" / "bomb.yaml").write_text(
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdef", "bcdefg"))
    )
    (ws / "settings" / "data_bomb.yaml").write_text(
        "format: coco\n" + (ws / "settings" / "bomb.yaml").read_text()
    )
    shutil.copytree(ws / "demo" / "yolo", ws / "yolo_empty")
    for label in (ws / "yolo_empty" / "labels").rglob("*.txt"):
        label.write_text("")
    ids = ws / "ids"
    ids.mkdir()
    (ids / "no_name.json").write_text(json.dumps({"images": [{"id": 1}]}))
    (ids / "word_id.json").write_text(json.dumps({"images": [{"id": "abc", "file_name": "a"}]}))
    (ids / "not_a_list.json").write_text(json.dumps({"images": 5}))
    return folder


def _exported_cases() -> dict[str, tuple[list[str], list[str]]]:
    cases = {}
    for n, (case, (_, words)) in enumerate(BAD_METADATA.items()):
        for kind, suffix in (("onnx", ".onnx"), ("torchscript", ".torchscript.pt")):
            name = f"exports/meta{n}{suffix}"
            cases[f"{kind} metadata {case}"] = (
                ["predict", name, "demo/coco/images", "--out", "p"],
                [name, "detfit metadata", words],
            )
    return cases


PHOTOS = "demo/coco/images"
FIRST = "demo/coco/images/img000.png"
MATRIX_CASES = {
    **_exported_cases(),
    "onnx without detector outputs": (
        ["predict", "exports/not_a_detector.onnx", PHOTOS, "--out", "p"],
        ["not_a_detector.onnx", "without boxes/labels/scores"],
    ),
    "onnx without metadata": (
        ["predict", "exports/no_metadata.onnx", PHOTOS, "--out", "p"],
        ["no_metadata.onnx", "without detfit metadata"],
    ),
    "an interrupted export": (
        ["predict", "exports/.model.partial.onnx", PHOTOS, "--out", "p"],
        [".model.partial.onnx: the unfinished file of an export that was stopped"],
    ),
    "eval of an onnx file": (
        ["eval", "exports/meta0.onnx"],
        ["meta0.onnx: an exported model", "predict takes exports"],
    ),
    "export of a torchscript file": (
        ["export", "exports/meta0.torchscript.pt"],
        ["meta0.torchscript.pt: an exported model"],
    ),
    "plot epoch a word": (["plot", "plots/word_epoch"], ["word_epoch/metrics.csv", "'abc'"]),
    "plot epoch nan": (["plot", "plots/nan_epoch"], ["nan_epoch/metrics.csv", "'nan'"]),
    "plot cells beyond the header": (
        ["plot", "plots/extra_cells"],
        ["extra_cells/metrics.csv", "line 2 does not match the header"],
    ),
    "predict into its input folder": (
        ["predict", "ckpts/good.pt", PHOTOS, "--out", PHOTOS],
        [f"--out {PHOTOS}: is the input folder"],
    ),
    "predict into a folder holding an input": (
        ["predict", "ckpts/good.pt", FIRST, "--out", "demo"],
        ["--out demo: holds the input", "img000.png"],
    ),
    "coco results over an input image": (
        ["predict", "ckpts/good.pt", FIRST, "--out", "p", "--coco-json", FIRST],
        [f"--coco-json {FIRST}: is one of the inputs"],
    ),
    "coco results over the ground truth": (
        [
            "predict",
            "ckpts/good.pt",
            FIRST,
            "--out",
            "p",
            "--coco-json",
            "demo/coco/annotations.json",
            "--image-ids",
            "demo/coco/annotations.json",
        ],
        ["--coco-json demo/coco/annotations.json: is one of the inputs"],
    ),  # fmt: skip
    "predict into the folder of its input file": (
        ["predict", "ckpts/good.pt", "settings/typo.yaml", "--out", "settings"],
        ["--out settings: holds the input settings/typo.yaml"],
    ),
    "image ids without file_name": (
        [
            "predict",
            "ckpts/good.pt",
            FIRST,
            "--out",
            "p",
            "--coco-json",
            "r.json",
            "--image-ids",
            "ids/no_name.json",
        ],
        ["ids/no_name.json: images[0] has no file_name"],
    ),  # fmt: skip
    "image id a word": (
        [
            "predict",
            "ckpts/good.pt",
            FIRST,
            "--out",
            "p",
            "--coco-json",
            "r.json",
            "--image-ids",
            "ids/word_id.json",
        ],
        ["ids/word_id.json: images[0] (a): id 'abc' is not an integer"],
    ),  # fmt: skip
    "image ids not a list": (
        [
            "predict",
            "ckpts/good.pt",
            FIRST,
            "--out",
            "p",
            "--coco-json",
            "r.json",
            "--image-ids",
            "ids/not_a_list.json",
        ],
        ["ids/not_a_list.json: 'images' must be a list"],
    ),  # fmt: skip
    "score threshold nan": (
        ["predict", "ckpts/good.pt", FIRST, "--out", "p", "--score-threshold", "nan"],
        ["--score-threshold nan: must be between 0 and 1"],
    ),
    "score threshold negative": (
        ["predict", "ckpts/good.pt", FIRST, "--out", "p", "--score-threshold", "-5"],
        ["--score-threshold -5.0: must be between 0 and 1"],
    ),
    "a billion epochs": ([*TRAIN, "--epochs", "1000000000"], ["epochs=1000000000", "100000"]),
    "a 60000-pixel resize": (
        [*TRAIN, "--set", "model_options.min_size=60000"],
        ["model_options.min_size=60000", "8192"],
    ),
    "a 60000-pixel cap": (
        [*TRAIN, "--set", "model_options.max_size=60000"],
        ["model_options.max_size=60000", "8192"],
    ),
    "max_pixels zero": ([*TRAIN, "--set", "max_pixels=0"], ["max_pixels=0"]),
    "alias bomb in --config": (
        [*TRAIN, "--config", "settings/bomb.yaml"],
        ["settings/bomb.yaml: expands to more than 100000 values"],
    ),
    "deep nesting in --set": (
        [*TRAIN, "--set", "lr=" + "[" * 3000 + "]" * 3000],
        ["--set lr: nested more than 32 levels deep"],
    ),
    "alias bomb in a dataset file": (
        [*TRAIN, "--data", "settings/data_bomb.yaml"],
        ["settings/data_bomb.yaml: expands to more than 100000 values"],
    ),
    "alias bomb in data check": (
        ["data", "check", "settings/data_bomb.yaml"],
        ["settings/data_bomb.yaml: expands"],
    ),
    "labels all empty": (
        [*TRAIN, "--data", "yolo:yolo_empty/data.yaml"],
        ["yolo_empty", "no usable object to train on"],
    ),
    "a weights file for a backbone-swap model": (
        [
            *TRAIN,
            "--data-root",
            "pf",
            "--model",
            "fasterrcnn_resnet18_fpn",
            "--weights",
            "ckpts/good.pt",
            "--set",
            "model_options={}",
        ],
        ["--weights ckpts/good.pt: fasterrcnn_resnet18_fpn is detfit's own combination"],
    ),  # fmt: skip
    "out is a file": (
        [*TRAIN[:3], "settings/typo.yaml", *TRAIN[4:], "--data-root", "pf"],
        ["--out settings/typo.yaml: is a file; give a folder for the run"],
    ),
}


@pytest.mark.parametrize("case", list(MATRIX_CASES))
def test_exports_plots_predictions_and_hostile_settings(ws, exports, monkeypatch, capsys, case):
    args, named = MATRIX_CASES[case]
    run_case(ws, monkeypatch, capsys, args, named)


def test_resume_of_a_last_pt_from_another_run(ws, exports, monkeypatch, capsys):
    run = ws / "runs" / "foreign"
    if not run.exists():
        good = torch.load(ws / "ckpts" / "good.pt", weights_only=True)
        save_checkpoint(run / "last.pt", resumable_state(ws))  # its config has no run id
        cfg = TrainConfig.from_dict({**good["config"], "run_id": "a1b2c3d4e5f6a7b8"})
        cfg.save(run / "config.yaml")
    run_case(
        ws, monkeypatch, capsys, ["train", "--resume", "runs/foreign"],
        ["--resume runs/foreign: last.pt belongs to another run", "a1b2c3d4e5f6a7b8"],
    )  # fmt: skip


def test_a_run_folder_that_cannot_be_made(ws, monkeypatch, capsys):
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.name == "new":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    run_case(
        ws, monkeypatch, capsys, [*TRAIN, "--data-root", "pf"],
        ["cannot make the run folder runs/new", "Permission denied"],
    )  # fmt: skip


def test_a_torchrun_restart_of_a_refused_request_refuses_at_once(ws, monkeypatch, capsys):
    """What a refusal records in torchrun's store (which outlives the worker group), and what a
    group torchrun restarts makes of it: the same line at once, a valid command or not, with
    nothing written. The store is a real TCPStore, as torchrun's agent serves it."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    launch = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    launch.update(MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True")
    launch.update(TORCHELASTIC_RUN_ID="job7", TORCHELASTIC_RESTART_COUNT="0")
    for key, value in launch.items():
        monkeypatch.setenv(key, value)
    first = run_case(ws, monkeypatch, capsys, [*TRAIN, "--set", "epochs=abc"], ["epochs='abc'"])
    assert store.get("detfit/refusal/job7/rank0").decode() == first.removeprefix("detfit: error: ")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again = run_case(ws, monkeypatch, capsys, [*TRAIN, "--data-root", "pf"], [])
    assert again == first  # the restart refuses, though its own command would train


def test_a_resize_that_needs_more_memory_than_there_is(ws, monkeypatch, capsys):
    """min_size/max_size within their bounds, but a resized batch of 2 images (768 MiB) larger
    than the memory left (here said to be 512 MiB): one line before the data is read."""
    import detfit.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 512 * 2**20)
    sizes = ["--set", "model_options.min_size=4096", "--set", "model_options.max_size=8192"]
    run_case(
        ws, monkeypatch, capsys, [*TRAIN, "--data-root", "pf", "--batch-size", "2", *sizes],
        ["model_options min_size=4096, max_size=8192 with batch_size=2",
         "needs 0.8 GiB, more than the 0.5 GiB of memory available"],
    )  # fmt: skip


def test_a_resize_beyond_an_address_space_limit_is_one_line(ws, tmp_path):
    """A real limit (RLIMIT_AS, 1.5 GiB above what the process maps once torch is loaded): the
    8192-pixel resize of a batch of 8 (6 GiB) is refused in one line, exit 2, no MemoryError."""
    import subprocess
    import sys

    script = (
        "import resource, sys, torch, detfit.cli\n"
        "mapped = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (mapped + 3 * 2**29, resource.RLIM_INFINITY))\n"
        "sys.argv = ['detfit', *sys.argv[1:]]\n"
        "detfit.cli.main()\n"
    )
    args = [*TRAIN, "--data-root", "pf", "--batch-size", "8", "--out", str(tmp_path / "run")]
    args += ["--set", "model_options.min_size=8192", "--set", "model_options.max_size=8192"]
    before = snapshot(ws)
    result = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=ws, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    line = expect_one_line(result.stderr, "batch_size=8", "the resized batch alone needs 6.0 GiB")
    assert "MemoryError" not in line and not (tmp_path / "run").exists()
    assert snapshot(ws) == before
