"""benchmarks/roofline.py on a tiny model: FLOPs and seconds per part, the measured peaks, and
the grouped-convolution backward formula it substitutes for torch's."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from roofline import flop_counter  # noqa: E402


def test_a_depthwise_convolution_backward_counts_twice_its_forward():
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
    x = torch.rand(2, 32, 20, 20, requires_grad=True)
    with flop_counter() as forward:
        y = conv(x)
    with flop_counter() as backward:
        y.sum().backward()
    # 2 FLOPs per multiply-add: batch x channels x pixels x 3x3 taps
    assert forward.get_total_flops() == 2 * 2 * 32 * 20 * 20 * 9
    assert backward.get_total_flops() == 2 * forward.get_total_flops()  # input and weight


def test_roofline_smoke_run_reports_every_part(tmp_path):
    out = tmp_path / "roofline.json"
    args = ["--tiny", "--iters", "1", "--peak-size", "128", "--size", "64", "96"]
    args += ["--threads", "1", "--precisions", "fp32", "--json", str(out)]
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "roofline.py"), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fp32 training iteration (batch 2)" in result.stdout
    assert "% of peak" in result.stdout
    report = json.loads(out.read_text())
    assert set(report["peak_gflops"]["fp32"]) == {"matmul", "conv3x3"}
    assert all(v > 0 for v in report["peak_gflops"]["fp32"].values())
    train = report["runs"]["fp32"]["train_iteration"]
    parts = ("backbone", "fpn", "rpn", "roi_heads", "total_forward", "backward")
    assert set(train["flops"]) == set(parts)
    assert all(train["flops"][p] > 0 and train["seconds"][p] > 0 for p in parts)
    # the parts add up to at most the whole forward pass (the transform is outside them)
    assert sum(train["flops"][p] for p in parts[:4]) <= train["flops"]["total_forward"]
    # backward: about twice the forward's convolution and product work, not 10x
    assert train["flops"]["total_forward"] < train["flops"]["backward"]
    assert train["flops"]["backward"] < 3 * train["flops"]["total_forward"]
    evaluation = report["runs"]["fp32"]["eval_image"]
    assert "backward" not in evaluation["flops"] and evaluation["flops"]["backbone"] > 0
