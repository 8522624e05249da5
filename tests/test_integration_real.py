"""The main job's path on the real Penn-Fudan (skipped where ../shared is absent): the CPU recipe
trains a few iterations, evaluates with COCO metrics, and its checkpoint predicts."""

from __future__ import annotations

import json

import pytest
from torchvision.io import decode_image

from cocokit import assert_scores_equal, reference_scores, row_scores
from detfit.checkpoint import load_checkpoint
from detfit.config import recipe_config
from detfit.engine import fit
from detfit.models.weights import cached_weights_path
from detfit.predict import predict_inputs


@pytest.mark.slow
def test_cpu_recipe_on_real_pennfudan(real_root, tmp_path):
    from torchvision.models import MobileNet_V2_Weights

    if not cached_weights_path(MobileNet_V2_Weights.IMAGENET1K_V1).is_file():
        pytest.skip("ImageNet mobilenet_v2 weights not in torchvision's cache")
    cfg = recipe_config(
        "cpu",
        data_root=str(real_root),
        epochs=1,
        max_iters_per_epoch=3,
        num_test=4,
        workers=0,
        out=str(tmp_path / "run"),
    )
    run = fit(cfg, progress=False)

    rows = json.loads((run / "metrics.json").read_text())
    assert len(rows) == 1
    assert rows[0]["train_loss"] > 0
    reference = reference_scores(run / "last.pt")  # pycocotools on the 4 held-out images
    for iou in ("bbox", "segm"):
        assert_scores_equal(row_scores(rows[0], iou), reference[iou])
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["model_info"]["classes"] == ["__background__", "person"]
    assert ckpt["config"]["max_iters_per_epoch"] == 3

    image = real_root / "PNGImages" / "FudanPed00001.png"
    written = predict_inputs(
        run / "best.pt", [image], tmp_path / "pred", score_threshold=0.0, progress=False
    ).written
    overlay = decode_image(str(tmp_path / "pred" / "FudanPed00001.png"))
    assert overlay.shape == decode_image(str(image)).shape
    record = json.loads((tmp_path / "pred" / "FudanPed00001.json").read_text())
    assert record["width"] == 559 and record["height"] == 536
    assert {p.name for p in written} == {"FudanPed00001.png", "FudanPed00001.json"}
