"""The validation loss (kapao.train.step.ValLoss): the training loss of the validation batches, from the
forward pass that gives the validation poses."""
from __future__ import annotations

import pytest
import torch

from kapao.cfg.dataset import load_dataset_config
from kapao.cfg.settings import VAL_SETTINGS, Hyp
from kapao.eval.val import make_val_loader, validate
from kapao.infer.predictor import Predictor
from kapao.models.loss import KapaoLoss
from kapao.models.network import kapao_n
from kapao.train.step import ValLoss


@pytest.mark.slow
def test_val_loss_is_the_training_loss_of_the_val_batches(coco_mini_yaml):
    torch.manual_seed(0)
    model = kapao_n(17).eval()
    loss_fn = KapaoLoss(model, Hyp(), 128)
    loader = make_val_loader(load_dataset_config(coco_mini_yaml), "val", 128, 2)
    vl = ValLoss(model, loss_fn, torch.device("cpu"), half=False)
    predictor = Predictor(vl.forward, vl.backend.schema, torch.device("cpu"), VAL_SETTINGS)
    result = validate(predictor, loader, progress=False, batch_hook=vl.add)
    expected = []
    with torch.no_grad():
        for imgs, targets, _ in loader:
            _, items = loss_fn(model(imgs.float() / 255)[1], targets)
            expected.append(items)
    assert vl.batches == len(expected) == 2 and result.images == 4
    assert vl.mean() == pytest.approx(torch.stack(expected).mean(0).tolist(), rel=1e-3)  # folded BN: rounding only
    assert all(v > 0 for v in vl.mean())
    assert any(hasattr(m, "bn") for m in model.modules())  # the model itself was not folded
