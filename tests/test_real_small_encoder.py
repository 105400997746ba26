"""The CNN encoder (models/cnn_encoder.py) and the Lite0 key mapping (models/small_backbones.py) on random weights:
what a wrong grouping, image size or weights folder gets. Needs no wheel and no converted folder."""
from __future__ import annotations

import pytest
import torch

from minigpt4.common.errors import CheckpointError
from minigpt4.models.checkpoints import save_state_file
from minigpt4.models.cnn_encoder import CNNGridEncoder, load_cnn_folder


@pytest.fixture(scope="module")
def encoder() -> CNNGridEncoder:
    torch.manual_seed(0)
    return CNNGridEncoder(group=7)


def folder_with(tmp_path, encoder, extra=None, drop=None):
    """A converted-folder look-alike holding the encoder's own tensors under EfficientNetForImageClassification's
    names, plus/minus some keys."""
    state = {f"efficientnet.{k}": v for k, v in encoder.vision_model.state_dict().items()}
    state.update({"classifier.weight": torch.zeros(1000, 1280), "classifier.bias": torch.zeros(1000)})
    state.update(extra or {})
    for key in drop or ():
        del state[key]
    save_state_file(tmp_path / "model.safetensors", state)
    return str(tmp_path)


def test_the_grid_is_cut_into_whole_groups_only():
    with pytest.raises(ValueError, match=r"7 × 7 feature map \(224 px\) has 49 positions.*groups of 5"):
        CNNGridEncoder(group=5)


def test_images_of_another_size_than_the_model_was_built_for_are_refused(encoder):
    with pytest.raises(ValueError, match=r"give 4 feature positions; the model was built for 49 \(224 px\)"):
        encoder(torch.zeros(1, 3, 64, 64))


def test_the_encoder_stays_in_eval_mode(encoder):
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())


def test_a_folder_round_trips_and_the_imagenet_head_is_the_only_key_left_out(tmp_path, encoder):
    fresh = CNNGridEncoder(group=7)
    load_cnn_folder(fresh, folder_with(tmp_path, encoder))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(fresh(x), encoder(x))


def test_a_folder_with_foreign_keys_is_refused(tmp_path, encoder):
    folder = folder_with(tmp_path, encoder, extra={"qformer.layer.0.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="neither the EfficientNet body nor its ImageNet head.*qformer"):
        load_cnn_folder(CNNGridEncoder(group=7), folder)


def test_a_folder_missing_a_tensor_is_refused(tmp_path, encoder):
    folder = folder_with(tmp_path, encoder, drop=["efficientnet.encoder.top_bn.running_var"])
    with pytest.raises(CheckpointError, match="1 missing key.*encoder.top_bn.running_var"):
        load_cnn_folder(CNNGridEncoder(group=7), folder)


def test_an_unknown_reference_key_is_refused():
    from transformers import EfficientNetForImageClassification

    from minigpt4.models.small_backbones import lite0_config, lite0_state_dict

    model = EfficientNetForImageClassification(lite0_config())
    with pytest.raises(CheckpointError, match="unknown key part '_se_reduce'"):
        lite0_state_dict({"_blocks.3._se_reduce.weight": torch.zeros(1)}, model)


def test_squeeze_excite_is_an_exact_identity_in_fp32_and_bf16():
    """The converted Lite0 keeps transformers' SE layers with a constant gate sigmoid(30): exactly 1.0."""
    from minigpt4.models.small_backbones import SE_GATE_BIAS

    for dtype in (torch.float32, torch.bfloat16):
        assert torch.sigmoid(torch.tensor(SE_GATE_BIAS, dtype=dtype)).item() == 1.0
