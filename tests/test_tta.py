"""Test-time augmentation: views mapped back exactly, the fusion's numbers, one view equal to
plain inference, and ``--tta`` on ``detfit eval`` and ``detfit predict``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cocokit import assert_scores_equal, pseudo_ground_truth, reference_scores
from conftest import run_config, run_main
from detfit import Predictor
from detfit.checkpoint import load_checkpoint, rebuild_model
from detfit.engine import fit
from detfit.models.tta import TTA, fuse, tta_predict


def bright_box_model(images: list[torch.Tensor]) -> list[dict]:
    """A fake detector: one box around the pixels brighter than 0.5, its masks, score 0.9."""
    outputs = []
    for image in images:
        on = image[0] > 0.5
        ys, xs = on.nonzero(as_tuple=True)
        box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        kps = torch.tensor([[[float(xs.min()), float(ys.min()), 1.0], [xs.max() + 1.0, 0.0, 1.0]]])
        outputs.append(
            {
                "boxes": box,
                "labels": torch.tensor([1]),
                "scores": torch.tensor([0.9]),
                "masks": on[None, None].float(),
                "keypoints": kps,
            }
        )
    return outputs


def test_mirrored_and_rescaled_views_map_back_onto_the_image():
    image = torch.zeros(3, 20, 40)
    image[:, 4:10, 5:15] = 1.0  # an off-centre object: a wrong unflip would move it
    plain = bright_box_model([image])[0]
    for tta in (TTA(flip=True), TTA(flip=True, scales=(1.0, 2.0)), TTA(keypoint_perm=(1, 0))):
        (out,) = tta_predict(bright_box_model, [image], tta)
        assert torch.allclose(out["boxes"], plain["boxes"]) and len(out["boxes"]) == 1
        assert out["scores"].tolist() == pytest.approx([0.9])  # every view found it
        assert torch.equal(out["masks"] > 0.5, plain["masks"] > 0.5)
    # the mirror's left/right swap: keypoint 0 of the mirrored view is its keypoint 1
    (out,) = tta_predict(bright_box_model, [image], TTA(flip=True, keypoint_perm=(1, 0)))
    assert out["keypoints"].shape == (1, 2, 3)


def test_fusion_averages_matching_detections_and_discounts_what_one_view_misses():
    masks_a = torch.zeros(2, 1, 10, 10)
    masks_a[0, 0, :, :4] = 0.8
    masks_b = torch.zeros(1, 1, 10, 10)
    masks_b[0, 0, :, :4] = 0.4
    view_a = {
        "boxes": torch.tensor([[0.0, 0.0, 4.0, 10.0], [6.0, 6.0, 9.0, 9.0]]),
        "labels": torch.tensor([1, 1]),
        "scores": torch.tensor([0.9, 0.6]),
        "masks": masks_a,
    }
    view_b = {
        "boxes": torch.tensor([[0.0, 0.0, 5.0, 10.0]]),  # IoU 0.8 with view a's first
        "labels": torch.tensor([1]),
        "scores": torch.tensor([0.3]),
        "masks": masks_b,
    }
    out = fuse([view_a, view_b])
    assert out["scores"].tolist() == pytest.approx([0.6, 0.3])  # (0.9 + 0.3) / 2, 0.6 / 2
    assert out["boxes"][0].tolist() == pytest.approx([0.0, 0.0, 4.25, 10.0])  # 0.75*4 + 0.25*5
    assert out["boxes"][1].tolist() == [6.0, 6.0, 9.0, 9.0]
    assert out["masks"][0, 0, 0, :5].tolist() == pytest.approx([0.6, 0.6, 0.6, 0.6, 0.0])
    assert out["labels"].tolist() == [1, 1] and out["masks"].shape == (2, 1, 10, 10)


@pytest.fixture(scope="module")
def trained_run(synthetic_root, tmp_path_factory) -> Path:
    """Two short epochs of the SMALL Mask R-CNN: a model whose detections mean something."""
    cfg = run_config(synthetic_root, tmp_path_factory.mktemp("tta") / "run")
    return fit(cfg, progress=False, log=lambda s: None)


def test_one_view_is_plain_inference_and_the_flip_gives_valid_outputs(trained_run):
    ckpt = load_checkpoint(trained_run / "best.pt")
    model = rebuild_model(ckpt["model_info"], ckpt["model"]).eval()
    images = [torch.rand(3, 60, 80), torch.rand(3, 72, 64)]
    with torch.inference_mode():
        plain = model(images)
        one = tta_predict(model, images, TTA(flip=False))
        flipped = tta_predict(model, images, TTA(flip=True))
    for a, b in zip(plain, one):
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key
    cap = ckpt["model_info"]["options"]["box_detections_per_img"]
    for out, image, ref in zip(flipped, images, plain):
        assert set(out) == set(ref)
        n = len(out["boxes"])
        assert n <= cap and out["masks"].shape == (n, 1, *image.shape[-2:])
        assert (out["scores"][:-1] >= out["scores"][1:]).all()
        assert (out["boxes"][:, 2:] >= out["boxes"][:, :2]).all()
        assert (out["boxes"] >= 0).all() and (out["boxes"][:, 2] <= image.shape[-1] + 1e-4).all()
        assert (out["masks"] >= 0).all() and (out["masks"] <= 1).all()
        assert out["labels"].dtype == torch.int64


def test_eval_and_predict_take_tta(trained_run, tmp_path, monkeypatch, capsys):
    files = sorted(Path(load_checkpoint(trained_run)["config"]["data_root"]).rglob("PNGImages/*"))
    # scored against the model's own detections moved by a pixel: AP well above 0, so the
    # numbers compared below move with anything that changes what is scored
    gt = pseudo_ground_truth(trained_run, files[:4], tmp_path / "gt.json")
    data = f"coco:{gt},val={gt}"
    common = ["eval", trained_run, "--device", "cpu", "--no-plots", "--data", data, "--json"]
    code, _, err = run_main(monkeypatch, capsys, *common, tmp_path / "plain.json")
    assert code == 0, err
    import detfit.eval.loop as eval_loop

    calls = []

    def spy(model, images, tta):
        calls.append(tta)
        return tta_predict(model, images, tta)

    monkeypatch.setattr(eval_loop, "tta_predict", spy)
    code, _, err = run_main(monkeypatch, capsys, *common, tmp_path / "tta.json", "--tta")
    assert code == 0, err
    assert len(calls) == 4 and calls[0] == TTA(flip=True)  # the 4 images, mirrored too
    stats = json.loads((tmp_path / "tta.json").read_text())
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert set(stats) == set(plain) == {"bbox", "segm"}
    assert all(plain[t]["AP"] > 0.3 for t in plain)
    # each equals pycocotools on the saved model's own detections, one view or two
    for report, views in ((plain, None), (stats, TTA(flip=True))):
        reference = reference_scores(trained_run, data=data, tta=views)
        for iou_type in ("bbox", "segm"):
            assert_scores_equal(report[iou_type], reference[iou_type])
    assert stats["bbox"]["AP"] != plain["bbox"]["AP"]  # the mirrored view changed the boxes
    code, out, err = run_main(monkeypatch, capsys, "predict", trained_run, files[0], "--out",
                              tmp_path / "pred", "--tta", "--device", "cpu", "--quiet",
                              "--score-threshold", "0")  # fmt: skip
    assert code == 0, err
    written = json.loads((tmp_path / "pred" / f"{files[0].stem}.json").read_text())
    fused = Predictor(trained_run, device="cpu", score_threshold=0.0, tta=True)(files[0])
    plain = Predictor(trained_run, device="cpu", score_threshold=0.0)(files[0])
    assert len(written["detections"]) == len(fused) > 0
    assert [d["score"] for d in written["detections"]] == pytest.approx(fused.scores.tolist())
    assert fused.masks.shape[1:] == plain.masks.shape[1:] and fused.masks.dtype == torch.bool


def test_a_scale_resizes_inside_the_model_and_puts_its_sizes_back(trained_run):
    """A torchvision detector resizes every image itself, so a view's scale multiplies the sizes
    it resizes to (rescaling the image would be undone); the detections come back in the
    image's own pixels and the model's sizes are as they were."""
    ckpt = load_checkpoint(trained_run / "best.pt")
    model = rebuild_model(ckpt["model_info"], ckpt["model"]).eval()
    sizes = (model.transform.min_size, model.transform.max_size)
    seen: list[tuple[int, int]] = []
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-2:]))
    image = torch.rand(3, 60, 80)
    with torch.inference_mode():
        model([image])
        scaled = tta_predict(model, [image], TTA(flip=False, scales=(1.5,)))
        fused = tta_predict(model, [image], TTA(flip=True, scales=(1.0, 1.5)))
    assert (model.transform.min_size, model.transform.max_size) == sizes
    plain_h, scaled_h = seen[0][0], seen[1][0]  # batched (padded to a multiple of 32) heights
    assert scaled_h >= 1.4 * plain_h, seen
    assert len(seen) == 2 + 4  # the fused call: two sizes, each mirrored
    for out in (scaled[0], fused[0]):
        n = len(out["boxes"])
        assert out["masks"].shape == (n, 1, 60, 80)
        assert (out["boxes"][:, 2] <= 80 + 1e-4).all() and (out["boxes"][:, 3] <= 60 + 1e-4).all()


def test_tta_scales_are_checked_as_the_setting(trained_run, tmp_path, monkeypatch, capsys):
    """Bad sizes, sizes without --tta, and sizes for a model that resizes itself out of reach:
    one line each, exit 2."""
    from detfit.config import SettingsError, TrainConfig
    from detfit.export import export_model

    with pytest.raises(SettingsError, match="tta_scales"):
        TrainConfig(tta_scales=[])
    cases = [
        (["eval", trained_run, "--tta", "--tta-scale", "0", "--no-plots"], "--tta-scale"),
        (["eval", trained_run, "--tta-scale", "1.2", "--no-plots"], "add --tta"),
        (
            ["predict", trained_run, "x.png", "--tta-scale", "1.2", "--out", tmp_path / "q"],
            "add --tta",
        ),
    ]
    scripted, _ = export_model(
        trained_run, "torchscript", tmp_path / "m.torchscript.pt", check=False, log=lambda s: None
    )
    cases.append(
        (["predict", scripted, "x.png", "--tta", "--tta-scale", "1.2", "--out", tmp_path / "p"],
         "would change nothing")
    )  # fmt: skip
    for args, message in cases:
        code, _, err = run_main(monkeypatch, capsys, *args)
        assert code == 2 and err.startswith("detfit: error: ") and err.count("\n") == 1, err
        assert message in err, err
    with pytest.raises(SettingsError, match="--tta-scale"):
        Predictor(trained_run, device="cpu", tta=True, tta_scales=[1.0, -2.0])


def test_predictor_scales_reach_the_checkpoints_model(trained_run):
    """Predictor(tta_scales=...) on a checkpoint: the backbone sees the larger size (a scale
    applied to the image alone would be resized back), and the detections change with it."""
    image = torch.rand(3, 60, 80)
    plain = Predictor(trained_run, device="cpu", score_threshold=0.0, tta=True)
    scaled = Predictor(trained_run, device="cpu", score_threshold=0.0, tta=True,
                       tta_scales=[1.0, 1.5])  # fmt: skip
    seen: list[int] = []
    backbone = scaled.backend.runner.model.backbone
    backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-2]))
    a, b = plain(image), scaled(image)
    assert len(seen) == 4 and max(seen) >= 1.4 * min(seen), seen  # 2 sizes x (image, mirror)
    assert len(a) != len(b) or not torch.equal(a.scores, b.scores)
