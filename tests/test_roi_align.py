"""RoIAlign as a sparse matrix product (detfit.models.roi_align) against torchvision's kernel:
the same pooled values and the same feature gradients, on every border case of the kernel."""

from __future__ import annotations

import copy
import re
import sys
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as torchvision_roi_align

from conftest import REPO, TINY
from detfit.models import build_model
from detfit.models.roi_align import (
    SparseMultiScaleRoIAlign,
    roi_align,
    roi_align_matrix,
    use_sparse_roi_align,
)


def random_rois(gen: torch.Generator, count: int, batch: int, extent: tuple[float, float]):
    """(count, 5) RoIs in image coordinates: ordinary ones, ones reaching past the right and
    bottom edges, ones starting left of and above the image, ones smaller than a pixel."""
    height, width = extent
    xy = torch.rand(count, 2, generator=gen, dtype=torch.float64) * torch.tensor([width, height])
    size = torch.rand(count, 2, generator=gen, dtype=torch.float64) * torch.tensor([width, height])
    boxes = torch.cat([xy, xy + size], 1)
    boxes[0::5, 2:] += torch.tensor([width, height])  # past the far edges
    boxes[1::5, :2] -= torch.tensor([width, height]) / 3  # before the near edges
    boxes[2::5, 2:] = boxes[2::5, :2] + 0.3  # a fraction of a pixel at scale 1
    boxes[3::5] = torch.tensor([width + 5.0, height + 5.0, width + 9.0, height + 9.0])  # outside
    image = torch.randint(0, batch, (count, 1), generator=gen).to(torch.float64)
    return torch.cat([image, boxes], 1)


def both(features, rois, grad, **pool):
    """Pooled values and feature gradients from torchvision's kernel and from the sparse one."""
    results = []
    for fn in (torchvision_roi_align, roi_align):
        x = features.detach().clone().requires_grad_()
        out = fn(x, rois, **pool)
        (out * grad).sum().backward()
        results.append((out.detach(), x.grad))
    return results


CASES = [  # output size, spatial scale, sampling ratio, aligned
    ((7, 7), 1 / 8, 2, False),  # the box pooler of every torchvision detector
    ((14, 14), 1 / 4, 2, False),  # the mask pooler
    ((3, 5), 1.0, 1, True),
    ((2, 2), 0.5, 3, False),
]


@pytest.mark.parametrize(("output_size", "scale", "ratio", "aligned"), CASES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_sparse_roi_align_equals_torchvision(output_size, scale, ratio, aligned, memory_format):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 6, 13, 17, generator=gen, dtype=torch.float64)
    features = features.contiguous(memory_format=memory_format)
    rois = random_rois(gen, 40, 2, (13 / scale, 17 / scale))
    grad = torch.randn(40, 6, *output_size, generator=gen, dtype=torch.float64)
    pool = {
        "output_size": output_size,
        "spatial_scale": scale,
        "sampling_ratio": ratio,
        "aligned": aligned,
    }
    (expected, expected_grad), (got, got_grad) = both(features, rois, grad, **pool)
    assert got.shape == expected.shape == (40, 6, *output_size)
    assert got.is_contiguous()  # the heads after a pooler view their input
    assert expected.abs().max() > 0.5 and expected_grad.abs().max() > 0.5
    # float64: equal up to rounding of a different summation order
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-12)
    # RoIs wholly outside the map pool to zero and send no gradient, as in torchvision
    assert got[3::5].abs().max() == 0


def test_sparse_roi_align_float32_within_rounding():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 128, 52, 80, generator=gen).contiguous(
        memory_format=torch.channels_last
    )
    rois = random_rois(gen, 128, 2, (52 * 8, 80 * 8)).float()
    grad = torch.randn(128, 128, 7, 7, generator=gen)
    pool = {"output_size": (7, 7), "spatial_scale": 1 / 8, "sampling_ratio": 2}
    (expected, expected_grad), (got, got_grad) = both(features, rois, grad, **pool)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_autograd_backward_passes_gradcheck():
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(1, 2, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = random_rois(gen, 5, 1, (6.0, 7.0))

    def pooled(x):
        return roi_align(x, rois, (2, 3), 1.0, 2)

    assert torch.autograd.gradcheck(pooled, (features,))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    count=st.integers(1, 12),
    pooled=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    ratio=st.integers(1, 3),
    scale=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    aligned=st.booleans(),
)
def test_sparse_roi_align_fuzzed_against_torchvision(
    seed, height, width, count, pooled, ratio, scale, aligned
):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 3, height, width, generator=gen, dtype=torch.float64)
    rois = random_rois(gen, count, 2, (height / scale, width / scale))
    grad = torch.randn(count, 3, *pooled, generator=gen, dtype=torch.float64)
    pool = {"output_size": pooled, "spatial_scale": scale, "sampling_ratio": ratio}
    (expected, expected_grad), (got, got_grad) = both(features, rois, grad, **pool, aligned=aligned)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-12)


def test_matrix_rows_are_valid_csr():
    gen = torch.Generator().manual_seed(3)
    rois = random_rois(gen, 20, 2, (40.0, 50.0))
    matrix = roi_align_matrix(rois, torch.Size([2, 4, 10, 12]), (7, 7), 0.25, 2, False)
    assert matrix.layout == torch.sparse_csr and matrix.shape == (20 * 49, 2 * 10 * 12)
    crow, cols = matrix.crow_indices(), matrix.col_indices()
    for row in range(matrix.shape[0]):
        entries = cols[crow[row] : crow[row + 1]]
        assert 0 < len(entries) <= 16 and bool(
            (entries[1:] > entries[:-1]).all()
        )  # sorted, distinct
    assert int(cols.min()) >= 0 and int(cols.max()) < 2 * 10 * 12
    # the same matrix, its invariants checked by torch itself
    torch.sparse_csr_tensor(
        crow, cols, matrix.values(), matrix.shape, check_invariants=True
    ).to_dense()
    # each bin averages its samples: inside the map, a row's weights sum to one
    inside = torch.tensor([[0.0, 4.0, 4.0, 30.0, 30.0]], dtype=torch.float64)
    sums = roi_align_matrix(inside, torch.Size([1, 1, 10, 12]), (7, 7), 0.25, 2, False)
    torch.testing.assert_close(sums.to_dense().sum(1), torch.ones(49, dtype=torch.float64))


def test_torchvision_kernel_where_not_covered():
    gen = torch.Generator().manual_seed(4)
    features = torch.randn(1, 3, 9, 9, generator=gen)
    rois = random_rois(gen, 6, 1, (9.0, 9.0)).float()
    # an adaptive sampling grid (sampling_ratio <= 0): torchvision's own result, bit for bit
    adaptive = {"output_size": (3, 3), "spatial_scale": 1.0, "sampling_ratio": -1}
    expected = torchvision_roi_align(features, rois, **adaptive)
    assert torch.equal(roi_align(features, rois, **adaptive), expected)
    empty = roi_align(features, rois[:0], (3, 3), 1.0, 2)
    assert empty.shape == (0, 3, 3, 3)
    # torchvision's CPU kernel has no bfloat16; bfloat16 features (autocast) pool in float32
    with pytest.raises(RuntimeError, match="roi_align_forward_kernel"):
        torchvision_roi_align(features.bfloat16(), rois.bfloat16(), (3, 3), 1.0, 2)
    low = roi_align(features.bfloat16(), rois, (3, 3), 1.0, 2)
    expected = torchvision_roi_align(features.bfloat16().float(), rois, (3, 3), 1.0, 2)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, expected, rtol=1e-5, atol=1e-6)


def multiscale_inputs(gen: torch.Generator):
    features = OrderedDict(
        (name, torch.randn(2, 4, size, size + 3, generator=gen))
        for name, size in (("0", 32), ("1", 16), ("2", 8), ("pool", 4))
    )
    boxes = []
    for _ in range(2):
        xy = torch.rand(30, 2, generator=gen) * 200
        wh = torch.rand(30, 2, generator=gen) * 700 + 2  # small to large: every level
        boxes.append(torch.cat([xy, xy + wh], 1))
    return features, boxes, [(256, 280), (240, 280)]


@pytest.mark.parametrize("names", [["0", "1", "2"], ["1"]])
def test_sparse_multiscale_pooler_equals_torchvision(names):
    gen = torch.Generator().manual_seed(5)
    features, boxes, shapes = multiscale_inputs(gen)
    reference = MultiScaleRoIAlign(names, 7, 2)
    sparse = copy.deepcopy(reference)
    assert use_sparse_roi_align(sparse) == 1 and type(sparse) is SparseMultiScaleRoIAlign
    results = []
    for pooler in (reference, sparse):
        inputs = OrderedDict((k, v.clone().requires_grad_()) for k, v in features.items())
        out = pooler(inputs, boxes, shapes)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {k: v.grad for k, v in inputs.items() if v.grad is not None}
        results.append((out.detach(), grads))
    (expected, expected_grads), (got, got_grads) = results
    assert got.shape == expected.shape == (60, 4, 7, 7)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert set(got_grads) == set(expected_grads) == set(names)
    for name in names:
        assert expected_grads[name].abs().sum() > 0
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-5, atol=1e-5)
    assert sparse.scales == reference.scales  # set up the same way on the first call


@pytest.mark.parametrize(
    ("model", "poolers"),
    [
        ("maskrcnn_resnet50_fpn", 2),
        ("keypointrcnn_resnet50_fpn", 2),
        ("fasterrcnn_resnet50_fpn", 1),
    ],
)
def test_use_sparse_roi_align_swaps_every_pooler_and_keeps_the_state(model, poolers):
    torch.manual_seed(0)
    detector = build_model(model, 2, weights=None, weights_backbone=None, **TINY)
    state = {k: v.clone() for k, v in detector.state_dict().items()}
    assert use_sparse_roi_align(detector) == poolers
    assert sum(type(m) is SparseMultiScaleRoIAlign for m in detector.modules()) == poolers
    assert not any(type(m) is MultiScaleRoIAlign for m in detector.modules())
    after = detector.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)


def test_speed_benchmark_runs_and_agrees(monkeypatch, capsys):
    """benchmarks/roi_align_speed.py times both kernels on the recipe's shapes and finds the same
    pooled values and gradients (in this process: no second torch import)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import roi_align_speed

    monkeypatch.setattr(sys, "argv", ["roi_align_speed.py", "--reps", "1"])
    roi_align_speed.main()
    rows = re.findall(r"(\d+\.\d)x\s+(\S+)\s+(\S+)\n", capsys.readouterr().out)
    assert len(rows) == len(roi_align_speed.CASES)
    for ratio, out_diff, grad_diff in rows:
        assert float(ratio) > 0 and float(out_diff) < 1e-4 and float(grad_diff) < 1e-4
