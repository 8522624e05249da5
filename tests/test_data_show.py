"""``detfit data show``: a contact sheet and label statistics for every format ``--data`` takes;
the statistics drawn are the annotations' own (instances per class, box sizes and centres)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import run_main
from detfit.data import DatasetSpec
from detfit.data.export import to_coco
from detfit.data.synthetic import SYNTHETIC_CLASSES, write_all_formats
from detfit.plots import plot_labels
from detfit.plots.dataset import box_statistics, dataset_samples
from detfit.plots.figure import DPI
from detfit.plots.gallery import CELL
from test_plots import assert_not_blank


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    specs = write_all_formats(tmp_path_factory.mktemp("show"), num_images=8)
    return {name: f"{name.removesuffix('-seg')}:{path}" for name, path in specs.items()}


def bar_heights(fig) -> dict[str, int]:
    ax = fig.axes[0]
    names = [t.get_text() for t in ax.get_xticklabels()]
    return dict(zip(names, (int(p.get_height()) for p in ax.patches)))


@pytest.mark.parametrize("name", ["coco", "voc", "yolo", "yolo-seg", "masks"])
def test_labels_count_every_format_alike(formats, name, tmp_path):
    annotations = DatasetSpec.parse(formats[name]).read()
    coco = to_coco(annotations, tmp_path)
    fig = plot_labels(coco, name)
    expected = {
        c: sum(i.label == k for r in annotations.images for i in r.instances)
        for k, c in enumerate(annotations.classes[1:], 1)
    }
    assert bar_heights(fig) == expected
    assert set(expected) == set(SYNTHETIC_CLASSES) and sum(expected.values()) > 0
    stats = box_statistics(coco)
    assert len(stats["size"]) == sum(expected.values())
    assert ((stats["cx"] > 0) & (stats["cx"] < 1) & (stats["cy"] > 0) & (stats["cy"] < 1)).all()
    heat = fig.axes[3].get_images()[0].get_array()
    assert heat.sum() == len(stats["size"])  # every box centre is in the heat map
    sample = dataset_samples(annotations, [0])[0]
    assert sample.name == annotations.images[0].path.name


@pytest.mark.parametrize("name", ["coco", "pennfudan"])
def test_data_show_writes_a_contact_sheet_and_labels(
    formats, synthetic_root, name, tmp_path, monkeypatch, capsys
):
    spec = formats["coco"] if name == "coco" else f"pennfudan:{synthetic_root}"
    out = tmp_path / "show"
    code, stdout, err = run_main(monkeypatch, capsys, "data", "show", spec, "--out", out, "--n", 6)
    assert code in (None, 0), err
    assert stdout.split() == ["wrote", str(out / "samples.jpg"), "wrote", str(out / "labels.png")]
    with Image.open(out / "samples.jpg") as im:  # 6 images, 4 to a row
        assert im.size == (round(4 * CELL[0] * DPI), round((2 * CELL[1] + 0.5) * DPI))
        sheet = np.asarray(im.convert("RGB"))
    with Image.open(out / "labels.png") as im:
        labels = np.asarray(im.convert("RGB"))
    for image in (sheet, labels):
        assert_not_blank(image)
    assert not list(out.glob(".*.tmp"))
