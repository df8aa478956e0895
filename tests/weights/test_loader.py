"""load_model: plain state_dicts, keypoint-count mismatches, names with their dataset schema."""
from __future__ import annotations

import pytest
import torch

from kapao.errors import WeightsError
from kapao.models.network import KapaoModel, generic_schema
from kapao.weights.checkpoint import check_compatible, save_checkpoint
from kapao.weights.loader import load_model
from tests.weights.test_checkpoint import COCO, CROWDPOSE, _outputs


def test_plain_state_dict_loads(tmp_path, model_n, image):
    path = tmp_path / "sd.pt"
    torch.save(model_n.state_dict(), path)
    model, info = load_model(path)
    assert info["format"] == "state_dict" and info["size"] == "n" and info["num_keypoints"] == 17
    assert torch.equal(_outputs(model, image), _outputs(model_n, image))


def test_wrong_keypoint_count_is_a_clear_error(tmp_path, model_n):
    with pytest.raises(WeightsError, match=r"predict 17 keypoints \(nose.*but the data has 14 \(left_shoulder"):
        check_compatible(COCO, CROWDPOSE)
    check_compatible(COCO, COCO)
    path = save_checkpoint(tmp_path / "coco.pt", model_n)
    with pytest.raises(WeightsError, match="17 keypoints.*14") as e:
        load_model(path, schema=CROWDPOSE)
    assert str(path) in str(e.value)


def test_names_use_their_dataset_schema(cache, model_n):
    cache.mkdir()
    torch.manual_seed(6)
    save_checkpoint(cache / "kapao_s_crowdpose.pt", KapaoModel("n", generic_schema(14)))  # kp0..kp13
    model, info = load_model("kapao_s_crowdpose")
    assert model.schema == CROWDPOSE and info["keypoint_names"][0] == "left_shoulder"
    save_checkpoint(cache / "kapao_m_crowdpose.pt", model_n)  # a 17-keypoint file under a 14-keypoint name
    with pytest.raises(WeightsError, match="17 keypoints.*14"):
        load_model("kapao_m_crowdpose")
    with pytest.raises(WeightsError, match="not found: no such file, and not a known name"):
        load_model("kapao_s_cocoo")
    with pytest.raises(WeightsError, match="not found"):
        load_model(cache / "sub" / "kapao_s_coco.pt")  # an explicit missing path never downloads
