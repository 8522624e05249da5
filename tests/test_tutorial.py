"""The tutorial's own script runs with detfit's helpers (imports changed, nothing else)."""

from __future__ import annotations

import functools
import runpy

import torch
import torchvision
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

from conftest import FAST_EVAL, REPO, TINY
from detfit.data.synthetic import make_pennfudan
from detfit.models.weights import weights_filename


def test_tutorial_script_runs_on_synthetic_data(tmp_path, monkeypatch, offline_torch_home, capsys):
    # The tutorial splits off the last 50 images for test, so it needs more than 50.
    make_pennfudan(tmp_path / "data", num_images=52, size=(48, 56), max_instances=2)
    # Its model asks the Weights API for COCO weights: serve a checkpoint made here, from the cache.
    coco_like = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91
    )
    weights = MaskRCNN_ResNet50_FPN_Weights.DEFAULT
    torch.save(coco_like.state_dict(), offline_torch_home / weights_filename(weights))

    def no_download(*args, **kwargs):
        raise AssertionError("the tutorial must load the cached file, not download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    # Tiny images keep the run short: the same builder, only the resize target changed.
    builder = torchvision.models.detection.maskrcnn_resnet50_fpn
    monkeypatch.setattr(
        torchvision.models.detection,
        "maskrcnn_resnet50_fpn",
        functools.partial(builder, **TINY, **FAST_EVAL),
    )
    monkeypatch.chdir(tmp_path)

    runpy.run_path(str(REPO / "examples" / "tutorial.py"), run_name="__main__")

    out = capsys.readouterr()
    assert "That's it!" in out.out
    # evaluate() prints pycocotools' summary for both IoU types, once per epoch (2 epochs).
    assert out.out.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == 4
