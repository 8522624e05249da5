"""`detfit data check` decodes every image (a truncated file is an error) in threads; `--quick`
reads headers only; training runs the same check on Penn-Fudan as on every other format."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from conftest import run_main
from detfit.data import check
from detfit.data.formats.masks import read_mask_folder
from detfit.data.synthetic import make_pennfudan, write_all_formats


@pytest.fixture(scope="module")
def truncated_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    write_all_formats(root, num_images=20)
    coco = root / "coco"
    data = json.loads((coco / "annotations.json").read_text())
    first = data["images"][3]
    Image.open(coco / "images" / first["file_name"]).convert("RGB").save(coco / "images" / "t.jpg")
    raw = (coco / "images" / "t.jpg").read_bytes()
    (coco / "images" / "t.jpg").write_bytes(raw[: len(raw) * 2 // 3])
    first["file_name"] = "t.jpg"
    (coco / "truncated.json").write_text(json.dumps(data))
    return coco / "truncated.json"


def test_data_check_decodes_every_image(truncated_coco, monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "data", "check", f"coco:{truncated_coco}")
    assert code == 1
    problems = [line for line in out.splitlines() if ": error: " in line]
    assert (
        len(problems) == 1
        and "t.jpg: error: cannot decode image (image file is truncated" in (problems[0])
    )
    assert "1 error(s) that stop training" in out


def test_data_check_quick_reads_headers_only(truncated_coco, monkeypatch, capsys):
    code, out, _ = run_main(
        monkeypatch, capsys, "data", "check", f"coco:{truncated_coco}", "--quick"
    )
    assert code == 0, out
    assert "0 error(s) that stop training" in out


def test_parallel_check_reports_what_a_serial_one_does(truncated_coco):
    from detfit.data import DatasetSpec

    annotations = DatasetSpec.parse(f"coco:{truncated_coco}").read()
    assert len(annotations.images) >= 16  # enough to run in threads
    seen = []
    serial = check(annotations, workers=1)
    threaded = check(annotations, workers=2, progress=lambda it, n: seen.append(n) or it)
    assert threaded == serial and seen == [len(annotations.images)]
    assert sum(p.fatal for p in serial) == 1


def test_pennfudan_goes_through_the_check(tmp_path):
    root = make_pennfudan(tmp_path / "pf", num_images=3)
    bad = sorted((root / "PedMasks").glob("*.png"))[0]
    Image.new("L", (7, 5)).save(bad)
    problems = [p for p in read_mask_folder(root, ["person"]).problems if p.fatal]
    assert [p.file for p in problems] == [str(bad)]
    shutil.rmtree(root)


def test_pennfudan_smaller_than_num_test_holds_out_a_fifth(tmp_path):
    from detfit.config import TrainConfig
    from detfit.data.loaders import build_datasets

    root = make_pennfudan(tmp_path / "pf", num_images=5)
    lines: list[str] = []
    data = build_datasets(TrainConfig(data_root=str(root), num_test=50), log=lines.append)
    assert (len(data.train), len(data.test)) == (4, 1)
    assert lines == [f"{root}: 5 images, fewer than num_test=50; holding out 1"]
