"""Seeded splits, collation, aspect-ratio groups and the grouped batch sampler."""

from __future__ import annotations

import bisect
from collections import Counter

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, Subset

from detfit.data.batching import (
    GroupedBatchSampler,
    aspect_ratio_groups,
    collate_fn,
    image_size,
    split_dataset,
    split_indices,
)
from detfit.data.pennfudan import PennFudanDataset

# --- split_indices ----------------------------------------------------------------------------


def test_split_indices_partition():
    train, test = split_indices(170, 50, seed=0)
    assert len(train) == 120
    assert len(test) == 50
    assert not set(train) & set(test)
    assert sorted(train + test) == list(range(170))


def test_split_indices_seeded():
    assert split_indices(170, 50, seed=0) == split_indices(170, 50, seed=0)
    assert split_indices(170, 50, seed=0) != split_indices(170, 50, seed=1)
    assert set(split_indices(170, 50, seed=0)[1]) != set(split_indices(170, 50, seed=1)[1])


def test_split_indices_regression():
    # torch's CPU generator is platform independent: the same split on every machine
    train, test = split_indices(170, 50, seed=0)
    assert train[:5] == [24, 107, 79, 51, 117]
    assert test[:5] == [106, 160, 47, 98, 22]


def test_split_indices_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    split_indices(170, 50, seed=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("num_test", [-1, 170, 200])
def test_split_indices_rejects_bad_sizes(num_test):
    with pytest.raises(ValueError, match="num_test"):
        split_indices(170, num_test)


def test_split_indices_zero_test():
    train, test = split_indices(10, 0, seed=0)
    assert sorted(train) == list(range(10))
    assert test == []


def test_split_dataset_uses_both_views():
    train_view, test_view = list(range(100, 110)), list(range(200, 210))
    train, test = split_dataset(train_view, test_view, num_test=4, seed=3)
    train_idx, test_idx = split_indices(10, 4, seed=3)
    assert isinstance(train, Subset) and isinstance(test, Subset)
    assert [train[i] for i in range(len(train))] == [100 + i for i in train_idx]
    assert [test[i] for i in range(len(test))] == [200 + i for i in test_idx]
    _, same = split_dataset(train_view, num_test=4, seed=3)
    assert same.dataset is train_view


# --- collate_fn -------------------------------------------------------------------------------


def test_collate_fn_tuples():
    a, b = torch.zeros(3, 4, 5), torch.ones(3, 6, 2)
    ta, tb = {"labels": torch.tensor([1])}, {"labels": torch.tensor([1, 1])}
    images, targets = collate_fn([(a, ta), (b, tb)])
    assert type(images) is tuple and type(targets) is tuple
    assert images[0] is a and images[1] is b
    assert targets == (ta, tb)


def test_collate_fn_in_dataloader(synthetic_root):
    ds = PennFudanDataset(synthetic_root)
    images, targets = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_fn)))
    assert len(images) == len(targets) == 3
    assert [t["image_id"].item() for t in targets] == [0, 1, 2]
    assert [tuple(im.shape[-2:]) for im in images] == [ds.get_height_and_width(i) for i in range(3)]


# --- aspect_ratio_groups ----------------------------------------------------------------------


def _expected_groups(synthetic_root, k=3):
    bins = (2 ** torch.linspace(-1, 1, 2 * k + 1)).tolist()
    groups = []
    for path in sorted((synthetic_root / "PNGImages").glob("*.png")):
        w, h = Image.open(path).size
        groups.append(bisect.bisect_right(bins, w / h))
    return groups


def test_aspect_ratio_groups_reads_headers_only(synthetic_root, monkeypatch):
    ds = PennFudanDataset(synthetic_root)
    expected = _expected_groups(synthetic_root)
    assert len(set(expected)) >= 2  # the synthetic sizes land in several bins

    def no_items(self, idx):
        raise AssertionError("an item was loaded")

    monkeypatch.setattr(PennFudanDataset, "__getitem__", no_items)
    with pytest.raises(AssertionError, match="an item was loaded"):
        ds[0]
    assert aspect_ratio_groups(ds, k=3) == expected

    subset = Subset(ds, [5, 2, 7])
    assert aspect_ratio_groups(subset, k=3) == [expected[5], expected[2], expected[7]]
    nested = Subset(subset, [2, 0])
    assert aspect_ratio_groups(nested, k=3) == [expected[7], expected[5]]


def test_aspect_ratio_groups_bins():
    class Sized:
        def __init__(self, sizes):
            self.sizes = sizes

        def __len__(self):
            return len(self.sizes)

        def get_height_and_width(self, idx):
            return self.sizes[idx]

    # bins 2**linspace(-1, 1, 7) = 0.5, 0.63, 0.79, 1, 1.26, 1.59, 2 (w / h)
    sizes = [(100, 40), (100, 60), (100, 100), (100, 120), (100, 300), (100, 200)]
    assert aspect_ratio_groups(Sized(sizes), k=3) == [0, 1, 4, 4, 7, 7]
    assert aspect_ratio_groups(Sized(sizes), k=0) == [0, 0, 1, 1, 1, 1]


def test_image_size_falls_back_to_items():
    pil = Image.new("RGB", (30, 20))
    assert image_size([(pil, {})], 0) == (20, 30)
    assert image_size([(torch.zeros(3, 11, 7), {})], 0) == (11, 7)
    assert image_size(Subset([(None, {}), (torch.zeros(3, 5, 9), {})], [1]), 0) == (5, 9)


# --- GroupedBatchSampler ----------------------------------------------------------------------

GROUP_IDS = [0, 1, 0, 2, 1, 0, 0, 1, 2, 0, 1, 1, 0, 3]  # sizes: 0 -> 6, 1 -> 5, 2 -> 2, 3 -> 1


def _check_batches(batches, group_ids, batch_size):
    assert all(len(batch) == batch_size for batch in batches)
    for batch in batches:
        assert len({group_ids[i] for i in batch}) == 1, batch
    assert set().union(*map(set, batches)) == set(range(len(group_ids)))


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_grouped_batches_sequential(batch_size):
    sampler = GroupedBatchSampler(SequentialSampler(GROUP_IDS), GROUP_IDS, batch_size)
    batches = list(sampler)
    _check_batches(batches, GROUP_IDS, batch_size)
    assert len(sampler) == len(batches)
    counts = Counter(GROUP_IDS)
    assert len(batches) == sum(-(-c // batch_size) for c in counts.values())


def test_grouped_batches_sequential_exact():
    batches = list(GroupedBatchSampler(SequentialSampler(GROUP_IDS), GROUP_IDS, 4))
    # full batches as soon as a group fills, then the leftovers by group id, topped up in order
    assert batches == [
        [0, 2, 5, 6],
        [1, 4, 7, 10],
        [9, 12, 0, 2],
        [11, 1, 4, 7],
        [3, 8, 3, 8],
        [13, 13, 13, 13],
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_batches_random(seed):
    generator = torch.Generator().manual_seed(seed)
    sampler = GroupedBatchSampler(RandomSampler(GROUP_IDS, generator=generator), GROUP_IDS, 3)
    batches = list(sampler)
    _check_batches(batches, GROUP_IDS, 3)
    assert len(sampler) == len(batches) == 6  # ceil: 2 + 2 + 1 + 1


def test_singleton_group_repeats_its_item():
    group_ids = [0, 1, 0]
    batches = list(GroupedBatchSampler(SequentialSampler(group_ids), group_ids, 2))
    assert batches == [[0, 2], [1, 1]]


def test_grouped_batch_sampler_in_dataloader(synthetic_root):
    ds = PennFudanDataset(synthetic_root)
    groups = aspect_ratio_groups(ds)
    sampler = GroupedBatchSampler(SequentialSampler(ds), groups, 2)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_fn)
    seen = []
    for _, targets in loader:
        ids = [t["image_id"].item() for t in targets]
        assert len(ids) == 2
        assert len({groups[i] for i in ids}) == 1
        seen += ids
    assert set(seen) == set(range(len(ds)))
    assert len(loader) == len(sampler)


def test_grouped_batch_sampler_rejects_zero_batch():
    with pytest.raises(ValueError, match="batch_size"):
        GroupedBatchSampler(SequentialSampler([0]), [0], 0)
