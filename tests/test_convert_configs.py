"""Converters read the upstream configs (issue 14 item 8): lerobot's policy ``config.json`` and BAGEL / HALO's
``llm_config.json`` / ``vit_config.json`` set the recipe fields, sizes are read off the tensors, a disagreement
between config, tensors and overrides is an error listing it, and the tokenizer travels with the folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import test_convert as tc
from vla_blocks import hub
from vla_blocks.convert import ConversionError, convert, recipe_fields
from vla_blocks.model import VLAModel
from vla_blocks.models import acot as acot_module
from vla_blocks.models.pi0_convert import read_lerobot_config
from vla_blocks.tokenization import SPECIAL_TOKENS, _raw_byte_tokenizer


def lerobot_config(**over):
    c = {"type": "pi05", "chunk_size": 6, "n_action_steps": 4, "max_state_dim": 8, "max_action_dim": tc.PA,
         "tokenizer_max_length": 12, "num_inference_steps": 5, "empty_cameras": 1,
         "input_features": {"observation.images.base_0_rgb": {"type": "VISUAL", "shape": [3, 224, 224]},
                            "observation.images.left_wrist_0_rgb": {"type": "VISUAL", "shape": [3, 224, 224]},
                            "observation.state": {"type": "STATE", "shape": [8]}},
         "output_features": {"action": {"type": "ACTION", "shape": [7]}},
         "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}}
    c.update(over)
    return c


def test_lerobot_config_sets_the_recipe_and_the_tokenizer_travels(tmp_path):
    src = tmp_path / "src"
    tc.write_lerobot(src, pi05=True)
    (src / "config.json").write_text(json.dumps(lerobot_config()))
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 12}))
    out, report = convert("pi05", src, tmp_path / "out", recipe="pi05-tiny")
    c = VLAModel.from_pretrained(out).config
    assert (c.pi05, c.action_horizon, c.n_action_steps, c.max_token_len, c.action_dim, c.real_action_dim,
            c.num_cameras, c.normalization, c.flow.num_steps) == (True, 6, 4, 12, tc.PA, 7, 3, "zscore", 5)
    # widths and depths off the tensors
    assert (c.backbone.config["hidden_size"], c.backbone.config["num_hidden_layers"], c.action_expert.hidden_size) \
        == (tc.PD, tc.PL, tc.PW)
    assert report.facts["camera_keys"] == ["observation.images.base_0_rgb", "observation.images.left_wrist_0_rgb"]
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()


def test_config_tensor_and_override_conflicts_are_listed(tmp_path):
    src = tmp_path / "src"
    tc.write_lerobot(src, pi05=True)
    (src / "config.json").write_text(json.dumps(lerobot_config(max_action_dim=2 * tc.PA)))
    with pytest.raises(ConversionError) as e:
        convert("pi05", src, tmp_path / "out", recipe="pi05-tiny", overrides={"action_horizon": 9})
    msg = str(e.value)
    assert f"action_dim: config={2 * tc.PA}, tensors={tc.PA}" in msg
    assert "action_horizon: config=6, override=9" in msg
    # overrides of fields nobody else sets stay possible
    (src / "config.json").write_text(json.dumps(lerobot_config()))
    _, report = convert("pi05", src, tmp_path / "ok", recipe="pi05-tiny", overrides={"freeze_vlm": True})
    assert report.inferred["action_horizon"] == 6


def test_lerobot_config_errors_name_the_setting(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(lerobot_config(
        normalization_mapping={"STATE": "MEAN_STD", "ACTION": "QUANTILES"})))
    with pytest.raises(ValueError, match="normalization_mapping"):
        read_lerobot_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(lerobot_config(paligemma_variant="gemma_7b")))
    with pytest.raises(ValueError, match="gemma_7b"):
        read_lerobot_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"type": "act"}))
    assert read_lerobot_config(tmp_path) == ({}, {})


def test_gemma_variant_gives_the_head_split():
    shapes = {tc.PALI + "language_model.layers.0.self_attn.q_proj.weight": (8 * 256, 2048),
              tc.PALI + "language_model.layers.0.self_attn.k_proj.weight": (256, 2048)}
    fields, _ = recipe_fields("pi05", shapes)
    assert "backbone.config.num_attention_heads" not in fields  # ambiguous without the variant
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps({"type": "pi05", "paligemma_variant": "gemma_2b"}))
        fields, _ = recipe_fields("pi05", shapes, d)
    assert (fields["backbone.config.num_attention_heads"], fields["backbone.config.num_key_value_heads"],
            fields["backbone.config.head_dim"]) == (8, 1, 256)


def test_halo_llm_and_vit_configs_set_the_recipe_and_the_qwen2_tokenizer_travels(tmp_path):
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "halo"
    src.mkdir()
    save_file(tc.bagel_checkpoint(g), src / "ema.safetensors")
    save_file(tc.tiny_vae_diffusers(g), src / "vae.safetensors")
    (src / "llm_config.json").write_text(json.dumps({
        "hidden_size": tc.D, "intermediate_size": tc.FFN, "num_hidden_layers": tc.LAYERS, "num_attention_heads": tc.H,
        "num_key_value_heads": tc.HKV, "vocab_size": 999, "rope_theta": 5000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "qk_norm": True}))
    vit = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3, "patch_size": 8}
    (src / "vit_config.json").write_text(json.dumps(vit))
    _raw_byte_tokenizer(SPECIAL_TOKENS[:5]).save(str(src / "tokenizer.json"))
    out, report = convert("halo", src, tmp_path / "out", recipe="halo-tiny", vae=str(src / "vae.safetensors"),
                          overrides={"tokenizer.kind": "auto"})
    assert json.loads((out / "config.json").read_text())["tokenizer"]["path"] == "tokenizer"
    model = VLAModel.from_pretrained(out)
    b = model.config.backbone.config
    assert (b["rope_theta"], b["rms_norm_eps"], b["vocab_size"], b["head_dim"]) == (5000.0, 1e-5, tc.VOCAB, tc.HD)
    assert model.config.vision.config["num_hidden_layers"] == 3 and model.config.vision.num_layers == 2
    assert model.tokenizer.source.startswith("qwen2:")  # the carried tokenizer, nothing else needed
    # a config that disagrees with the tensors is an error listing the field
    (src / "llm_config.json").write_text(json.dumps({"hidden_size": 2 * tc.D}))
    with pytest.raises(ConversionError, match=r"backbone.config.hidden_size: config=128, tensors=64"):
        convert("halo", src, tmp_path / "bad", recipe="halo-tiny", vae=str(src / "vae.safetensors"))


def test_acot_preset_lives_beside_acot():
    """Model-specific loading knowledge sits with its model; the Hub layer knows no model (no import cycle)."""
    assert acot_module.ACOT_FROM_PI05["expert_map"] == {"ear": "act"}
    assert not hasattr(hub, "ACOT_FROM_PI05")
