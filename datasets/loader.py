"""DataLoader factory: batching, workers and seeding, single-process or distributed.

Repeatability: shuffling and the per-worker seeds come from a
``torch.Generator`` seeded with ``seed`` (default ``cfg.SEED``), so the order of
samples and the random primary expression of each sample are the same run to
run. With ``NUM_WORKER`` 0 the primary expression comes from the process's
global torch generator instead, which the training script seeds.

Distributed runs (``torch.distributed`` initialised):

- training uses ``DistributedSampler`` (shuffled with ``seed``, the same on
  every rank, the tail dropped so that every rank has as many batches);
  calling ``sampler.set_epoch(epoch)`` each epoch is the caller's job;
- evaluation uses ``ShardSampler``: each rank gets one contiguous slice, with
  no padding and no sample dropped, so counts (and accuracies gathered from
  the ranks) are exact; rank r's slice comes before rank r+1's.
"""
from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class ShardSampler(Sampler[int]):
    """Indices ``[rank * n // world_size, (rank + 1) * n // world_size)``: disjoint, covering, unpadded."""

    def __init__(self, length: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.start = rank * length // world_size
        self.stop = (rank + 1) * length // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a worker from the seed torch gave it (itself from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(cfg, dataset: Dataset, *, train: bool, batch_size: int | None = None,
                 distributed: bool = False, seed: int | None = None) -> DataLoader:
    """A DataLoader over ``dataset``.

    ``batch_size`` (default ``cfg.BATCH_SIZE``) counts samples over all
    processes, like ``BATCH_SIZE``; each rank gets ``batch_size / world_size``.
    Training shuffles and drops the last incomplete batch (a batch of one has
    no negatives for the contrastive loss); evaluation keeps every sample in
    file order. ``cfg.NUM_WORKER`` workers per process.
    """
    seed = cfg.SEED if seed is None else seed
    batch_size = cfg.BATCH_SIZE if batch_size is None else batch_size
    rank, world_size = 0, 1
    if distributed:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("build_loader(distributed=True) needs torch.distributed to be initialised first")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the world size {world_size}")
        batch_size //= world_size
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1 per process, got {batch_size}")

    if distributed and train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                     shuffle=True, seed=seed, drop_last=True)
    elif distributed:
        sampler = ShardSampler(len(dataset), rank, world_size)
    else:
        sampler = None
    if train and (len(sampler) if sampler is not None else len(dataset)) < batch_size:
        raise ValueError(f"the training data has {len(dataset)} samples, too few for one batch of "
                         f"{batch_size} per process; lower BATCH_SIZE")

    # Different ranks draw different primaries; the shuffle order itself is the
    # DistributedSampler's, shared by all ranks.
    generator = torch.Generator().manual_seed(seed + rank)
    workers = cfg.NUM_WORKER
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker if workers > 0 else None,
        generator=generator,
    )
