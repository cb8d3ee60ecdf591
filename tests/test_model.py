"""Model parity: clipcli's CLIPModel against transformers.CLIPModel loaded from the same saved directory."""

from __future__ import annotations

import pytest
import torch
import transformers

from clipcli.config import CLIPConfig
from clipcli.errors import UsageError
from clipcli.loader import load
from tests.conftest import make_hf_checkpoint

ATOL = 1e-5

CONFIGS = {
    "quick_gelu-eos49407-224/32": dict(
        vision_config=dict(image_size=224, patch_size=32, hidden_act="quick_gelu"),
        text_config=dict(hidden_act="quick_gelu", eos_token_id=49407)),
    "gelu-eos2-legacy": dict(
        vision_config=dict(hidden_act="gelu"), text_config=dict(hidden_act="gelu", eos_token_id=2)),
    "quick_gelu-336/14-proj24": dict(
        vision_config=dict(image_size=336, patch_size=14, hidden_size=48, num_attention_heads=4),
        text_config=dict(hidden_size=40, num_attention_heads=5), projection_dim=24),
    "gelu_new-224/16": dict(
        vision_config=dict(image_size=224, patch_size=16, hidden_act="gelu_new"),
        text_config=dict(hidden_act="gelu_new")),
    "gelu-224/14-different-widths": dict(
        vision_config=dict(image_size=224, patch_size=14, hidden_size=64, intermediate_size=100),
        text_config=dict(hidden_size=48, intermediate_size=72, num_attention_heads=6, eos_token_id=49407),
        projection_dim=20),
}


def _inputs(image_size: int, n_images: int = 3):
    torch.manual_seed(1)
    pixels = torch.randn(n_images, 3, image_size, image_size)
    # Ragged texts: BOS, tokens, EOS, then padding (with EOS as the pad id, as openai's Hub tokenizer does).
    ids = torch.full((4, 12), 49407, dtype=torch.long)
    for row, length in enumerate((3, 12, 7, 5)):
        ids[row, 0] = 49406
        ids[row, 1:length - 1] = torch.randint(0, 49000, (length - 2,))
        ids[row, length - 1] = 49407
    return pixels, ids


def _compare(directory, image_size):
    reference = transformers.CLIPModel.from_pretrained(directory).eval()
    ours = load(str(directory), device="cpu", dtype="fp32").model
    pixels, ids = _inputs(image_size)
    with torch.no_grad():
        out = reference(pixel_values=pixels, input_ids=ids)
        ref_image = reference.get_image_features(pixel_values=pixels)
        ref_text = reference.get_text_features(input_ids=ids)
        ref_image = getattr(ref_image, "pooler_output", ref_image)
        ref_text = getattr(ref_text, "pooler_output", ref_text)
        image, text = ours.encode_image(pixels), ours.encode_text(ids)
        logits = ours.logits(image, text)
    assert (image - ref_image).abs().max() <= ATOL
    assert (text - ref_text).abs().max() <= ATOL
    assert (logits - out.logits_per_image).abs().max() <= ATOL * 10  # logits are scaled by exp(logit_scale)
    assert torch.equal(logits.argmax(-1), out.logits_per_image.argmax(-1))


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_with_transformers(tmp_path, name):
    overrides = CONFIGS[name]
    make_hf_checkpoint(tmp_path, seed=3, **overrides)
    image_size = overrides.get("vision_config", {}).get("image_size", 32)
    _compare(tmp_path, image_size)


def test_parity_full_vit_b32_dimensions(tmp_path):
    """openai/clip-vit-base-patch32's exact dimensions, random weights with transformers' own init."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(eos_token_id=2), vision_config=dict(), projection_dim=512)  # the Hub config's values
    transformers.CLIPModel(config).eval().save_pretrained(tmp_path)
    ours = CLIPConfig.from_dict(__import__("json").loads((tmp_path / "config.json").read_text()))
    assert (ours.vision.hidden_size, ours.vision.num_hidden_layers, ours.vision.patch_size) == (768, 12, 32)
    assert (ours.text.hidden_size, ours.text.num_hidden_layers, ours.text.eos_token_id) == (512, 12, 2)
    _compare(tmp_path, 224)


def test_eos_pooling_rules(tmp_path):
    """eos_token_id 2 pools at argmax(ids); otherwise at the first eos_token_id, even if a larger id follows."""
    make_hf_checkpoint(tmp_path / "legacy", text_config=dict(eos_token_id=2))
    make_hf_checkpoint(tmp_path / "modern", text_config=dict(eos_token_id=49407))
    ids = torch.tensor([[49406, 320, 49407, 49407, 49407], [49406, 320, 49407, 1000, 49407]])
    for variant in ("legacy", "modern"):
        model = load(str(tmp_path / variant), device="cpu").model
        states = model.text_model(ids)
        hidden = model.text_model.final_layer_norm(
            model.text_model.encoder(model.text_model.embeddings(ids)))
        assert torch.allclose(states, hidden[:, 2], atol=1e-6), variant
    # An id larger than EOS (only possible with added tokens) shows the difference between the two rules.
    ids = torch.tensor([[49406, 320, 49407, 49407]])
    bigger = torch.tensor([[49406, 49407, 320, 49407]])
    modern = load(str(tmp_path / "modern"), device="cpu").model.text_model
    legacy = load(str(tmp_path / "legacy"), device="cpu").model.text_model
    hidden = modern.final_layer_norm(modern.encoder(modern.embeddings(bigger)))
    assert torch.allclose(modern(bigger), hidden[:, 1], atol=1e-6)  # first EOS
    legacy_hidden = legacy.final_layer_norm(legacy.encoder(legacy.embeddings(ids)))
    assert torch.allclose(legacy(ids), legacy_hidden[:, 2], atol=1e-6)  # argmax = first max


def test_padding_does_not_change_pooled_text(tiny_model_dir):
    model = load(str(tiny_model_dir), device="cpu").model
    short = torch.tensor([[49406, 320, 1125, 49407]])
    padded = torch.cat([short, torch.full((1, 73), 49407)], dim=1)
    zero_padded = torch.cat([short, torch.zeros((1, 20), dtype=torch.long)], dim=1)
    with torch.no_grad():
        a, b, c = model.encode_text(short), model.encode_text(padded), model.encode_text(zero_padded)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)


def test_state_dict_names_match_transformers(tiny_model_dir):
    reference = transformers.CLIPModel.from_pretrained(tiny_model_dir)
    ours = load(str(tiny_model_dir), device="cpu").model
    expected = {k for k in reference.state_dict() if not k.endswith("position_ids")}
    assert set(ours.state_dict()) == expected


def test_config_validation_errors():
    with pytest.raises(UsageError, match="not divisible"):
        CLIPConfig.from_dict({"vision_config": {"hidden_size": 30, "num_attention_heads": 4}})
    with pytest.raises(UsageError, match="hidden_act"):
        CLIPConfig.from_dict({"text_config": {"hidden_act": "tanh"}})
    with pytest.raises(UsageError, match="multiple of patch_size"):
        CLIPConfig.from_dict({"vision_config": {"image_size": 100, "patch_size": 32}})
    with pytest.raises(UsageError, match="positive integer"):
        CLIPConfig.from_dict({"projection_dim": -3})
    with pytest.raises(UsageError, match="JSON object"):
        CLIPConfig.from_dict(["not", "a", "dict"])


def test_config_defaults_and_unknown_keys():
    config = CLIPConfig.from_dict({"some_new_key": 1, "text_config": {"unknown": True}, "vision_config": None})
    assert config == CLIPConfig()
    legacy = CLIPConfig.from_dict({"text_config_dict": {"hidden_size": 64, "num_attention_heads": 2}})
    assert legacy.text.hidden_size == 64


def test_config_round_trip_through_transformers():
    config = CLIPConfig.from_dict(CONFIGS["quick_gelu-336/14-proj24"] | {"logit_scale_init_value": 3.0})
    reference = transformers.CLIPConfig(**config.to_dict())
    assert CLIPConfig.from_dict(reference.to_dict()) == config
