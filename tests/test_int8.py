"""``detfit export --format onnx --quantize int8``: ONNX Runtime static quantization of the
backbone, FPN and hidden head layers (predictors, RoI and NMS parts kept float32), scored by AP
on the run's test split against the float32 export, refused (one line, exit 2, no file) when AP
drops by more than ``--max-ap-drop``; ``detfit predict`` and the Predictor run the int8 file."""

from __future__ import annotations

import json

import onnx
import pytest

from conftest import run_main
from detfit.export.quantize import QUANTIZED_SCOPES
from detfit.predict import Predictor
from exportkit import write_images
from speedkit import pseudo_labelled_checkpoint

# the layers whose outputs are decoded or thresholded: they must stay float32
FLOAT_LAYERS = (
    "/rpn/head/cls_logits",
    "/rpn/head/bbox_pred",
    "/box_predictor/",
    "/mask_predictor/",
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return pseudo_labelled_checkpoint(tmp_path_factory.mktemp("int8"))


def ap_lines(stdout: str) -> dict[str, dict[str, float]]:
    """``AP fp32: bbox 0.9431, segm 0.0000`` lines as {"fp32": {"bbox": 0.9431, ...}}."""
    found = {}
    for line in stdout.splitlines():
        if line.startswith("AP "):
            name, _, rest = line[3:].partition(": ")
            found[name] = {t: float(v) for t, v in (p.split() for p in rest.split(", "))}
    return found


def test_int8_refused_when_ap_drops_too_far_leaves_no_file(checkpoint, monkeypatch, capsys):
    out = checkpoint.parent / "refused.onnx"
    code, stdout, err = run_main(
        monkeypatch, capsys, "export", checkpoint, "--quantize", "int8", "--file", out,
        "--max-ap-drop", "-1",  # any int8 model drops by more than -1: always refused
    )  # fmt: skip
    assert code == 2, err
    aps = ap_lines(stdout)
    assert set(aps) == {"fp32", "int8"} and set(aps["fp32"]) == {"bbox", "segm"}
    assert aps["fp32"]["bbox"] > 0.5  # the pseudo labels are the float32 model's detections
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "more than --max-ap-drop -1; nothing written" in lines[0]
    assert lines[0].startswith(f"detfit: error: {out}: int8 ")
    assert sorted(p.name for p in out.parent.iterdir() if "refused" in p.name) == []
    # NaN would pass every comparison, so it is refused before any work
    code, _, err = run_main(
        monkeypatch, capsys, "export", checkpoint, "--quantize", "int8", "--file", out,
        "--max-ap-drop", "nan",
    )  # fmt: skip
    assert (
        code == 2
        and err == "detfit: error: --max-ap-drop nan: must be a number (AP points, e.g. 0.01)\n"
    )
    assert not out.exists()


def test_int8_export_quantizes_the_feature_layers_and_predicts(
    checkpoint, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "model.int8.onnx"
    calibration = write_images(tmp_path / "calibration", [(60, 80), (90, 70), (64, 64)])
    code, stdout, err = run_main(
        monkeypatch, capsys, "export", checkpoint, "--quantize", "int8", "--file", out,
        "--calibration-images", tmp_path / "calibration", "--max-ap-drop", "1",
    )  # fmt: skip
    assert code in (None, 0), err
    assert "calibrated on 3 images" in stdout and set(ap_lines(stdout)) == {"fp32", "int8"}
    assert f"wrote {out}" in stdout and "AP within 1 of fp32" in stdout
    graph = onnx.load(str(out)).graph
    # every quantized convolution/product reads its weight through a DequantizeLinear
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    quantized = [n.name for n in layers if n.input[1] in dequantized]
    assert quantized and all(name.startswith(QUANTIZED_SCOPES) for name in quantized)
    assert any("/backbone/fpn/" in name for name in quantized)
    kept = [n.name for n in layers if any(s in n.name for s in FLOAT_LAYERS)]
    assert len(kept) >= 4 and not set(kept) & set(quantized)
    # RoIAlign stays the float operator (QDQ dequantizes the FPN maps it reads); NMS and mask
    # pasting live in If/Loop subgraphs, untouched
    assert "RoiAlign" in {n.op_type for n in graph.node}
    subgraphs = [
        a.g for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH
    ]
    inner = {n.op_type for g in subgraphs for n in g.node}
    assert subgraphs and not inner & {"QuantizeLinear", "DequantizeLinear"}
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["detfit"])
    assert meta["precision"] == "int8" and meta["classes"] == ["__background__", "cat", "dog"]
    # the Predictor and detfit predict run the int8 file
    predictor = Predictor(out, device="cpu", score_threshold=0.0)
    result = predictor(calibration[0])
    assert predictor.kind == "onnx" and len(result) > 0 and result.masks.shape[1:] == (60, 80)
    code, stdout, err = run_main(
        monkeypatch, capsys, "predict", out, calibration[1], "--out", tmp_path / "pred", "--quiet"
    )
    assert code in (None, 0), err
    assert (tmp_path / "pred" / "img1.json").is_file()
    code, _, err = run_main(
        monkeypatch, capsys, "predict", out, calibration[1], "--precision", "bf16"
    )
    assert code == 2 and "runs at the precision it was exported with" in err


def test_quantize_asks_for_onnx_and_int8(checkpoint, monkeypatch, capsys):
    code, _, err = run_main(
        monkeypatch, capsys, "export", checkpoint, "--format", "torchscript", "--quantize", "int8"
    )
    assert code == 2 and "ONNX Runtime quantizes ONNX models, not torchscript" in err
    code, _, err = run_main(monkeypatch, capsys, "export", checkpoint, "--quantize", "int4")
    assert code == 2 and "--quantize int4: the one quantization is int8" in err
