"""Hostile and odd inputs under a memory limit: YAML alias bombs and deep nesting, images of
hundreds of megapixels, absurd resizes; and the YOLO data.yaml layouts that Roboflow and
Ultralytics export. Each refusal is one stderr line, exit 2, no MemoryError."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from conftest import FAST_EVAL, REPO, SMALL, TINY, run_main
from detfit.checkpoint import model_info, save_checkpoint
from detfit.config import TrainConfig
from detfit.data import DatasetSpec
from detfit.data.synthetic import write_all_formats
from detfit.models import build_model

# Runs detfit's CLI after import with the address space capped at what it uses plus MB_EXTRA:
# torch's import alone reserves gigabytes of address space, so the cap is set afterwards.
LIMITED = textwrap.dedent(
    """
    import resource, sys
    import torch, torchvision, detfit.cli
    status = open("/proc/self/status").read().split("VmSize:")[1].split()[0]
    limit = int(status) * 1024 + (int(sys.argv[1]) << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.argv = ["detfit", *sys.argv[2:]]
    detfit.cli.main()
    """
)
MB_EXTRA = 600


def limited(cwd: Path, *args: str, mb: int = MB_EXTRA) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", LIMITED, str(mb), *map(str, args)],
        capture_output=True, text=True, timeout=300, cwd=cwd, env=env,
    )  # fmt: skip


def one_line(result: subprocess.CompletedProcess, code: int, *named: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1, result.stderr[-2000:]
    assert "MemoryError" not in result.stderr and "Traceback" not in result.stderr
    for text in named:
        assert text in lines[0], lines[0]
    return lines[0]


def billion_laughs(levels: int = 9) -> str:
    """Each level an anchor listing the previous one 9 times: 9^9 strings once expanded."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for n in range(1, levels):
        lines.append(f"a{n}: &a{n} [" + ",".join([f"*a{n - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    (root / "bomb.yaml").write_text(billion_laughs())
    # 12000x12000 pixels in a few hundred KB: 1-bit PNG of one colour, 432 MB once RGB
    big = root / "big.png"
    Image.new("1", (12000, 12000)).save(big)
    coco = write_all_formats(root / "demo", num_images=4)["coco"]
    data = json.loads(coco.read_text())
    first = data["images"][0]
    shutil.copy(big, coco.parent / "images" / first["file_name"])
    first["width"] = first["height"] = 12000
    coco.write_text(json.dumps(data))
    return root


MODEL = "maskrcnn_mobilenet_v2_fpn"
TRAIN = ["train", "--model", MODEL, "--weights", "none", "--weights-backbone", "none", "--quiet"]


@pytest.mark.parametrize(
    "args, named",
    [
        (["--config", "bomb.yaml"], ["bomb.yaml: expands to more than 100000 values"]),
        (["--set", "lr={" + billion_laughs().replace("\n", ", ") + "}"], ["--set lr: expands"]),
        (["--set", "lr=" + "[" * 20000 + "]" * 20000], ["--set lr: nested more than 32 levels"]),
    ],
    # (dataset files and nested mappings: the same loader, in test_bad_inputs.py's matrix)
    ids=["alias bomb in --config", "alias bomb in --set", "20000 brackets"],
)  # fmt: skip
def test_yaml_is_refused_before_it_expands(ws, args, named):
    result = limited(ws, *TRAIN, *args)
    line = one_line(result, 2, *named)
    assert len(line) < 300  # an excerpt, never the value


def test_an_image_of_144_megapixels_is_refused_from_its_header(ws):
    result = limited(ws, *TRAIN, "--data", "coco:demo/coco/annotations.json", "--workers", "0")
    one_line(result, 2, "demo/coco/images/", "12000x12000 image (144 MP)", "max_pixels (50 MP)")
    # predict: that input is skipped in one line, the exit code says so
    model = build_model(MODEL, 2, weights=None, weights_backbone=None, **SMALL)
    info = model_info(MODEL, 2, ["__background__", "person"], dict(SMALL), model)
    save_checkpoint(ws / "model.pt", {"model": model.state_dict(), "model_info": info})
    result = limited(
        ws, "predict", "model.pt", "big.png", "--out", "p", "--quiet", "--device", "cpu"
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "MemoryError" not in result.stderr, result.stderr[-2000:]
    assert "big.png: 12000x12000 image (144 MP) is larger than max_pixels (50 MP)" in lines[0]
    # data check names it too, as an error that stops training
    result = limited(ws, "data", "check", "coco:demo/coco/annotations.json")
    assert result.returncode == 1 and "MemoryError" not in result.stderr
    assert "12000x12000 image (144 MP) is larger than max_pixels" in result.stdout
    assert "1 error(s) that stop training" in result.stdout


@pytest.mark.parametrize(
    "setting, named",
    [
        ("model_options.min_size=60000", "less than or equal to 8192"),
        ("model_options.max_size=60000", "less than or equal to 8192"),
        ("epochs=1000000000", "less than or equal to 100000"),
    ],
)
def test_absurd_sizes_and_counts_are_refused(ws, monkeypatch, capsys, setting, named):
    monkeypatch.chdir(ws)
    code, _, err = run_main(monkeypatch, capsys, *TRAIN, "--set", setting)
    assert code == 2 and err.count("\n") == 1 and named in err and setting.split("=")[0] in err


def roboflow_copy(yolo: Path, root: Path) -> Path:
    """The layout of a Roboflow YOLO export: train/ valid/ beside data.yaml, whose paths start
    with ../ (Ultralytics resolves them relative to the yaml, then without the ../)."""
    for split, name in (("train", "train"), ("valid", "train")):
        for kind in ("images", "labels"):
            shutil.copytree(yolo / kind / name, root / split / kind)
    (root / "data.yaml").write_text(
        "train: ../train/images\nval: ../valid/images\nnc: 3\nnames: ['cat', 'dog', 'bird']\n"
        "roboflow:\n  workspace: w\n  project: p\n  version: 1\n"
    )
    return root / "data.yaml"


def test_roboflow_and_ultralytics_data_yaml(tmp_path, monkeypatch):
    yolo = write_all_formats(tmp_path / "demo", num_images=6)["yolo"].parent
    reference = DatasetSpec.parse(f"yolo:{yolo / 'data.yaml'}").read("train")
    data_yaml = roboflow_copy(yolo, tmp_path / "export")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # resolved from the yaml, not the working folder
    spec = DatasetSpec.parse(f"yolo:{data_yaml}")
    assert spec.train.path == tmp_path / "export" / "train" / "images"
    assert spec.val.path == tmp_path / "export" / "valid" / "images"
    for split in ("train", "val"):
        got = spec.read(split)
        assert got.classes == reference.classes == ["__background__", "cat", "dog", "bird"]
        assert [len(r.instances) for r in got.images] == [
            len(r.instances) for r in reference.images
        ]
    # a `path:` key relative to the yaml's folder, paths below it
    (tmp_path / "configs").mkdir()
    other = tmp_path / "configs" / "data.yaml"
    other.write_text(
        "path: ../export\ntrain: train/images\nval: valid/images\nnames: {0: cat, 1: dog, 2: bird}\n"
    )
    spec = DatasetSpec.parse(f"yolo:{other}")
    assert spec.train.path.resolve() == (tmp_path / "export" / "train" / "images").resolve()
    assert len(spec.read("val").images) == len(reference.images)


def test_a_roboflow_export_trains(tmp_path, monkeypatch, capsys):
    yolo = write_all_formats(tmp_path / "demo", num_images=6)["yolo"].parent
    data_yaml = roboflow_copy(yolo, tmp_path / "export")
    options = json.dumps({**TINY, **FAST_EVAL})
    code, out, err = run_main(
        monkeypatch, capsys, "train", "--model", "fasterrcnn_mobilenet_v2_fpn", "--weights",
        "none", "--weights-backbone", "none", "--quiet", "--recipe", "tutorial",
        "--data", f"yolo:{data_yaml}", "--epochs", "1", "--workers", "0", "--out",
        tmp_path / "run", "--set", "max_iters_per_epoch=1", "--set", "plots=false",
        "--set", f"model_options={options}",
    )  # fmt: skip
    assert code in (None, 0), err
    cfg = TrainConfig.load(tmp_path / "run" / "config.yaml")
    assert cfg.dataset == f"yolo:{data_yaml}"


def test_a_set_without_one_usable_object_is_an_error(tmp_path, monkeypatch, capsys):
    yolo = write_all_formats(tmp_path / "demo", num_images=6)["yolo"].parent
    for label in (yolo / "labels").rglob("*.txt"):
        label.write_text("")
    args = [*TRAIN, "--data", f"yolo:{yolo / 'data.yaml'}", "--out", tmp_path / "run"]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and err.count("\n") == 1
    assert "no usable object to train on in 6 images (every label/annotation is empty)" in err
    assert not (tmp_path / "run").exists()
    # COCO polygons of 2 points: masks of nothing
    coco = write_all_formats(tmp_path / "seg", num_images=6)["coco"]
    data = json.loads(coco.read_text())
    for ann in data["annotations"]:
        ann["segmentation"], ann["iscrowd"] = [[1, 1, 5, 5]], 0
    coco.write_text(json.dumps(data))
    code, out, _ = run_main(monkeypatch, capsys, "data", "check", f"coco:{coco}")
    assert code == 1 and "degenerate boxes or polygons under 3 points" in out


def test_a_file_name_that_is_not_utf8_fails_in_data_check(tmp_path, monkeypatch, capsys):
    masks = write_all_formats(tmp_path / "demo", num_images=4)["masks"]
    first = sorted((masks / "images").glob("*.png"))[0]
    odd = first.with_name(os.fsdecode(b"caf\xe9") + first.suffix)  # Latin-1 bytes
    first.rename(odd)
    (masks / "masks" / first.name).rename(masks / "masks" / odd.name)
    code, out, _ = run_main(monkeypatch, capsys, "data", "check", f"masks:{masks}")
    assert code == 1 and "caf\\udce9.png: error: file name is not valid UTF-8" in out


def test_run_folders_record_absolute_data_paths(tmp_path, monkeypatch, capsys):
    coco = write_all_formats(tmp_path / "demo", num_images=6)["coco"]
    monkeypatch.chdir(tmp_path)
    options = json.dumps({**TINY, **FAST_EVAL})
    args = ["train", "--model", "fasterrcnn_mobilenet_v2_fpn", "--weights", "none", "--quiet"]
    args += ["--weights-backbone", "none", "--recipe", "tutorial", "--epochs", "1"]
    args += ["--data", "coco:demo/coco/annotations.json,val=demo/coco/annotations.json"]
    args += ["--workers", "0", "--out", "run", "--set", "max_iters_per_epoch=1"]
    args += ["--set", "plots=false", "--set", f"model_options={options}"]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code in (None, 0), err
    cfg = TrainConfig.load(tmp_path / "run" / "config.yaml")
    assert cfg.dataset == f"coco:{coco},val={coco}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    stats = tmp_path / "stats.json"
    code, out, err = run_main(
        monkeypatch, capsys, "eval", tmp_path / "run", "--no-plots", "--json", stats
    )
    assert code in (None, 0), err
    # the same images scored from another folder: the numbers the run recorded for them
    (row,) = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert json.loads(stats.read_text())["bbox"] == {
        k.removeprefix("bbox_"): v for k, v in row.items() if k.startswith("bbox_")
    }
