"""The reproducible training order (kapao.train.sampler): per-epoch shuffles and per-image seeds."""
from __future__ import annotations

import numpy as np
import torch

from kapao.cfg.dataset import load_dataset_config
from kapao.cfg.settings import Hyp
from kapao.train.sampler import EpochSampler, SeededItems, build_train_loader


class _Draws:
    """A dataset whose item is one draw of its augmentation generator."""

    def __init__(self, n: int) -> None:
        self.n, self.rng = n, np.random.default_rng(0)

    def __len__(self) -> int:
        return self.n

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __getitem__(self, i: int) -> float:
        return float(self.rng.random())


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    ds = list(range(10))

    def keys(epoch, rank=0, replicas=1, seed=0):
        s = EpochSampler(ds, num_replicas=replicas, rank=rank, shuffle=True, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert keys(1) == keys(1) and keys(1) != keys(2) and keys(1) != keys(1, seed=1)
    assert all(e == 1 for e, _ in keys(1)) and sorted(i for _, i in keys(1)) == ds
    shares = [i for r in range(2) for _, i in keys(3, rank=r, replicas=2)]
    assert sorted(shares) == ds  # two processes split the epoch's order without overlap


def test_seeded_items_draws_do_not_depend_on_order():
    items = SeededItems(_Draws(5), seed=0)
    forward = [items[(2, i)] for i in range(5)]
    backward = [items[(2, i)] for i in reversed(range(5))][::-1]
    assert forward == backward and len(set(forward)) == 5
    assert items[(3, 0)] != forward[0] and SeededItems(_Draws(5), seed=1)[(2, 0)] != forward[0]
    assert len(items) == 5


def test_train_loader_batches(coco_mini_yaml):
    cfg = load_dataset_config(coco_mini_yaml)
    loader, sampler = build_train_loader(cfg, Hyp(), 128, batch=2, workers=0, seed=0)
    sampler.set_epoch(0)
    batches = list(loader)
    assert len(loader) == len(batches) == 2  # 4 images
    imgs, targets, _ = batches[0]
    assert imgs.shape == (2, 3, 128, 128) and imgs.dtype == torch.uint8 and targets.shape[1] == 6 + 3 * 17
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))  # same epoch: same augmented images
