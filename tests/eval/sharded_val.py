"""validate() with a stand-in network whose poses are the ground truth moved by a few pixels (so AP is
neither 0 nor 1), run alone or under torchrun by tests/eval/test_val.py: prints the metrics table.

Usage: python tests/eval/sharded_val.py DATASET_YAML SPLIT
"""
from __future__ import annotations

import sys

import torch

from kapao.cfg.dataset import load_dataset_config
from kapao.cfg.schema import HeadLayout
from kapao.cfg.settings import VAL_SETTINGS
from kapao.distributed import DistEnv, close, join
from kapao.eval.val import make_val_loader, validate
from kapao.infer.engine import Predictor
from tests.eval.test_val import targets_as_predictions


def main(yaml: str, split: str) -> None:
    env = DistEnv.from_environ()
    join(env)
    cfg = load_dataset_config(yaml)
    k = cfg.schema.num_keypoints
    loader = make_val_loader(cfg, split, imgsz=320, batch=1, env=env)
    lay = HeadLayout(k)
    queue = []
    for im, t, metas in loader:
        pred = targets_as_predictions(t, len(metas), tuple(im.shape[-2:]), k)
        g = torch.Generator().manual_seed(int(str(metas[0]["image_id"])[-6:]))  # the same noise on any rank
        pred[..., lay.kpt] += 12 * torch.randn(pred[..., lay.kpt].shape, generator=g)
        pred[..., lay.obj] = 0.5 + 0.5 * torch.rand(pred[..., lay.obj].shape, generator=g)
        queue.append(pred)
    predictor = Predictor(lambda x: queue.pop(0), cfg.schema, torch.device("cpu"), VAL_SETTINGS)
    res = validate(predictor, loader, progress=False, env=env)
    if res is not None:
        print(f"{res.images} images, {res.poses} poses")
        print(res.table())
    close(env)


if __name__ == "__main__":
    main(*sys.argv[1:3])
