"""Which items each process reads, in which order, with which random augmentation.

Three properties make a run resumable mid-epoch and independent of how it is launched:
- the order of an epoch is a function of (seed, epoch): torch's ``DistributedSampler``, for one
  process too, so a resumed run rebuilds the epoch and skips the batches it already took;
- each item's augmentation is drawn from its own seed (seed, epoch, index), not from a worker's
  RNG stream, so it does not depend on the number of loader workers, on the number of processes,
  or on where a resumed run starts;
- evaluation shards whole batches (rank r takes batches r, r+N, ...), so every image is evaluated
  with the same batch-mates, and so the same padding, as in one process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice

import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, Sampler

from detfit.data.batching import GroupedBatchSampler, image_size


class PerItemSeed(Dataset):
    """``dataset`` whose item ``i`` in epoch ``e`` draws its random transforms from a seed of its
    own, (seed, e, i), inside a forked RNG: the caller's RNG stream is left untouched."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def item_seed(self, index: int) -> int:
        words = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2)
        return int(words[0]) << 32 | int(words[1])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.item_seed(index))
            return self.dataset[index]

    def get_height_and_width(self, index: int) -> tuple[int, int]:
        return image_size(self.dataset, index)


class EpochBatches(Sampler[list[int]]):
    """This rank's training batches for one epoch, optionally from the ``skip``-th batch on.

    ``set_epoch(e, skip=k)`` before each epoch: reshuffles (seed + e) and, when resuming in the
    middle of an epoch, drops the ``k`` batches already trained on (no image is read for them).
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        group_ids: Sequence[int] | None = None,
    ) -> None:
        self.sampler = DistributedSampler(
            range(num_items), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        exact = world_size > 1
        if group_ids is not None:
            self.batches: Sampler[list[int]] = GroupedBatchSampler(
                self.sampler, group_ids, batch_size, exact_length=exact
            )
        else:
            self.batches = BatchSampler(self.sampler, batch_size, drop_last=False)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[list[int]]:
        return islice(iter(self.batches), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.batches) - self.skip, 0)

    def batches_per_epoch(self) -> int:
        return len(self.batches)


class ShardBatches(Sampler[list[int]]):
    """Evaluation batches of ``range(num_items)`` in order, every ``world_size``-th one from
    ``rank``: no item dropped or repeated, and each batch as one process would form it."""

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world_size: int = 1):
        starts = range(0, num_items, batch_size)
        batches = [list(range(s, min(s + batch_size, num_items))) for s in starts]
        self.batches = batches[rank::world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
