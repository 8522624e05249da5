"""benchmarks/vs_references.py is a fair baseline only if its re-implementation of the
references' per-batch COCO evaluation scores what detfit's evaluation scores: same weights, same
images, the same AP."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO
from detfit.data import PennFudanDataset, collate_fn, eval_transforms
from detfit.eval import evaluate

sys.path.insert(0, str(REPO / "benchmarks"))
from vs_references import TutorialPennFudan, refs_evaluate, tuple_collate, tutorial_transform  # noqa: E402,I001


class Noisy(torch.nn.Module):
    """Stands in for a trained model: per image, in loader order, the ground truth moved by a
    few pixels with random scores, some masks eroded, plus one false positive."""

    def __init__(self, dataset) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.outputs = []
        for _, target in dataset:
            boxes = target["boxes"].float() + torch.randn(len(target["boxes"]), 4, generator=gen)
            boxes = torch.cat([boxes, torch.tensor([[0.0, 0.0, 10.0, 10.0]])])
            masks = target["masks"].float()[:, None]
            masks[::2, :, ::3] = 0  # every other mask loses a third of its columns
            masks = torch.cat([masks, torch.zeros(1, *masks.shape[1:])])
            masks[-1, :, :10, :10] = 1
            n = len(boxes)
            scores = torch.rand(n, generator=gen)
            self.outputs.append(
                {
                    "boxes": boxes,
                    "labels": torch.ones(n, dtype=torch.int64),
                    "scores": scores,
                    "masks": masks,
                }
            )
        self.calls = 0

    def forward(self, images):
        out = self.outputs[self.calls : self.calls + len(images)]
        self.calls += len(images)
        return out


def test_the_references_evaluation_scores_what_detfits_does(synthetic_root):
    ours_data = PennFudanDataset(synthetic_root, eval_transforms())
    refs_loader = torch.utils.data.DataLoader(
        TutorialPennFudan(str(synthetic_root), tutorial_transform(False)),
        batch_size=1,
        collate_fn=tuple_collate,
    )
    ours_loader = torch.utils.data.DataLoader(ours_data, batch_size=1, collate_fn=collate_fn)
    model = Noisy(ours_data)
    threads = torch.get_num_threads()
    refs = refs_evaluate(model, refs_loader, torch.device("cpu"), ["bbox", "segm"])
    assert torch.get_num_threads() == threads  # the one-thread evaluation restores the count
    model.calls = 0
    ours = evaluate(
        model,
        ours_loader,
        "cpu",
        iou_types=["bbox", "segm"],
        progress=False,
        verbose=False,
        backend="pycocotools",
    ).stats
    for iou_type in ("bbox", "segm"):
        # AP, AP50, AP75 over all areas do not depend on the ground truth's area, which the
        # tutorial takes from the box and detfit from the mask's pixels
        assert refs[iou_type][:3] == pytest.approx(
            [ours[iou_type][k] for k in ("AP", "AP50", "AP75")], abs=1e-12
        )
        assert 0.1 < refs[iou_type][0] < 1.0  # neither nothing found nor a perfect score
