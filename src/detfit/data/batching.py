"""Collation, seeded splits and aspect-ratio grouped batching (torchvision references' behaviour)."""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from itertools import cycle, islice

import torch
from torch.utils.data import Dataset, Sampler, Subset


def collate_fn(batch: Sequence) -> tuple:
    """Keep images of different sizes apart: a batch is (images, targets) tuples, not a stack."""
    return tuple(zip(*batch))


def split_indices(n: int, num_test: int = 50, seed: int = 0) -> tuple[list[int], list[int]]:
    """A random permutation from a CPU generator (the same on every machine); last ``num_test`` test."""
    if not 0 <= num_test < n:
        raise ValueError(f"num_test must be in [0, {n}), got {num_test}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[: n - num_test], perm[n - num_test :]


def split_dataset(
    train_ds: Dataset, test_ds: Dataset | None = None, num_test: int = 50, seed: int = 0
) -> tuple[Subset, Subset]:
    """Tutorial split: the same images seen through train and eval transforms."""
    train_idx, test_idx = split_indices(len(train_ds), num_test, seed)
    return Subset(train_ds, train_idx), Subset(
        test_ds if test_ds is not None else train_ds, test_idx
    )


def image_size(dataset: Dataset, idx: int) -> tuple[int, int]:
    """(height, width) through ``get_height_and_width``, looking through Subsets; decodes otherwise."""
    while isinstance(dataset, Subset):
        dataset, idx = dataset.dataset, dataset.indices[idx]
    if hasattr(dataset, "get_height_and_width"):
        return tuple(dataset.get_height_and_width(idx))
    image = dataset[idx][0]
    if hasattr(image, "size") and not isinstance(image, torch.Tensor):  # PIL: (w, h)
        return image.size[1], image.size[0]
    return tuple(image.shape[-2:])


def aspect_ratio_groups(dataset: Dataset, k: int = 3) -> list[int]:
    """Group id per item: aspect ratio w/h binned on 2**linspace(-1, 1, 2k+1) (references' bins)."""
    bins = (2 ** torch.linspace(-1, 1, 2 * k + 1)).tolist() if k > 0 else [1.0]
    groups = []
    for i in range(len(dataset)):
        h, w = image_size(dataset, i)
        groups.append(bisect.bisect_right(bins, w / h))
    return groups


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches whose items share a group id (similar aspect ratio), so padding wastes little.

    Every index the sampler yields appears in exactly one batch per epoch. A group's last partial
    batch is topped up with other items of that group, as torchvision's references do, so every
    batch is full. ``sampler`` must visit each of ``group_ids``' items once per epoch.

    ``exact_length=True`` gives exactly ``ceil(len(sampler) / batch_size)`` batches every epoch:
    the groups' leftovers are batched together (neighbouring aspect ratios first) instead of one
    partial batch per group. Distributed training needs it: every rank must take the same number
    of steps, whatever mix of groups its shard holds this epoch.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        group_ids: Sequence[int],
        batch_size: int,
        exact_length: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.exact_length = exact_length

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        seen: dict[int, list[int]] = defaultdict(list)
        for idx in self.sampler:
            group = self.group_ids[idx]
            buffers[group].append(idx)
            seen[group].append(idx)
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
        if self.exact_length:
            leftover = [i for group in sorted(buffers) for i in buffers[group]]
            everything = [i for group in sorted(seen) for i in seen[group]]
            for start in range(0, len(leftover), self.batch_size):
                batch = leftover[start : start + self.batch_size]
                others = [i for i in everything if i not in batch] or batch
                yield batch + list(islice(cycle(others), self.batch_size - len(batch)))
            return
        for group in sorted(buffers):
            leftover = buffers[group]
            others = [i for i in seen[group] if i not in leftover] or leftover
            need = self.batch_size - len(leftover)
            yield leftover + list(islice(cycle(others), need))

    def __len__(self) -> int:
        if self.exact_length:
            return -(-len(self.sampler) // self.batch_size)
        counts = Counter(self.group_ids)
        return sum(-(-c // self.batch_size) for c in counts.values())
