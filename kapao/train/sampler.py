"""Training data in a reproducible order: a per-epoch shuffle that depends on (seed, epoch) only and
augmentation draws seeded per (seed, epoch, image), so that a resumed run repeats exactly what the
uninterrupted one would have done, whatever the workers or processes."""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kapao.cfg.schema import DatasetConfig
from kapao.cfg.settings import Hyp
from kapao.data.dataset import PoseDataset, build_dataloader
from kapao.runtime import cpu_count


class EpochSampler(DistributedSampler):
    """This process's share of a per-epoch shuffled order (a function of seed and epoch only).

    Yields (epoch, index) keys for :class:`SeededItems`; call ``set_epoch`` before every epoch.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in super().__iter__())


class SeededItems(Dataset):
    """Reseeds the dataset's augmentation from (seed, epoch, index) before each item, so that the
    draws do not depend on workers, processes or where a run was resumed."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, i = key
        self.dataset.reseed(int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0]))
        return self.dataset[i]


def build_train_loader(cfg: DatasetConfig, hyp: Hyp, imgsz: int, batch: int, workers: int, seed: int,
                       cache: bool = False, rank: int = 0, world_size: int = 1) -> tuple[DataLoader, EpochSampler]:
    """(loader, sampler) of this process's augmented training batches; `batch` and `workers` per process
    (workers capped at CPU count / processes). Call ``sampler.set_epoch(epoch)`` before each epoch."""
    ds = PoseDataset(cfg, "train", imgsz, hyp, augment=True, batch_size=batch, cache_images=cache)
    sampler = EpochSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    workers = min(workers, cpu_count() // world_size)
    loader = build_dataloader(SeededItems(ds, seed), batch, workers, shuffle=False, sampler=sampler,
                              seed=seed + rank)
    return loader, sampler
