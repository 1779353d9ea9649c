"""Recipe merging: family keys drop the old family's fields, ``!replace`` replaces a mapping, per-family conventions,
and ``vla-blocks info --show-config`` prints a recipe that loads back to the same config."""

from __future__ import annotations

import math

import pytest
import yaml

from vla_blocks.cli import main
from vla_blocks.config import ConfigError, dump_recipe, encode, load_recipe

LLAMA = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1}


def write(tmp_path, name: str, text: str):
    f = tmp_path / f"{name}.yaml"
    f.write_text(text)
    return str(f)


def test_family_change_in_a_recipe_drops_the_inherited_config(tmp_path):
    """The issue's case: ``base: pi05-tiny`` + ``backbone: {model_type: llama, ...}`` is a plain Llama."""
    f = write(tmp_path, "pi05-llama", f"base: pi05-tiny\nbackbone: {{model_type: llama, config: {LLAMA}}}\n")
    bb = load_recipe(f).backbone
    assert bb.model_type == "llama" and bb.config == LLAMA  # no Gemma key (hidden_act gelu, head_dim) inherited
    spec = bb.spec()
    assert spec.expert.ffn_act == "silu" and spec.expert.norm == "rms" and spec.embed_scale == 1.0
    assert not spec.tie_word_embeddings  # Llama's default, not Gemma's


def test_per_family_conventions():
    gemma = load_recipe("pi0-tiny").backbone.spec()
    assert gemma.expert.ffn_act == "gelu_tanh" and gemma.expert.norm == "gemma_rms"
    assert gemma.embed_scale == math.sqrt(32) and gemma.tie_word_embeddings
    qwen = load_recipe("mot-tiny").backbone.spec()
    assert qwen.expert.ffn_act == "silu" and qwen.expert.norm == "rms" and qwen.embed_scale == 1.0
    assert qwen.expert.qkv_bias and not qwen.expert.o_bias  # Qwen2: q/k/v biases always, none on o_proj
    llama = load_recipe("mot-tiny", {"backbone.model_type": "llama", "backbone.config": dict(LLAMA, attention_bias=True)})
    s = llama.backbone.spec()
    assert s.expert.qkv_bias and s.expert.o_bias and s.expert.ffn_act == "silu"


def test_same_family_merges_and_replace_replaces(tmp_path):
    base = load_recipe("mot-tiny").backbone.config
    merged = load_recipe(write(tmp_path, "a", "base: mot-tiny\nbackbone: {config: {hidden_size: 128}}\n")).backbone
    assert merged.config == {**base, "hidden_size": 128}
    replaced = load_recipe(write(tmp_path, "b", "base: mot-tiny\nbackbone: {config: !replace {hidden_size: 128}}\n"))
    assert replaced.backbone.config == {"hidden_size": 128}
    cleared = load_recipe(write(tmp_path, "c", "base: mot-tiny\nbackbone:\n  config: !replace {}\n")).backbone
    assert cleared.config == {} and cleared.model_type == "qwen2" and cleared.qk_norm  # other fields still inherited
    # a replaced mapping is itself the base of the next recipe: it merges there again
    f = write(tmp_path, "d", f"base: {tmp_path / 'b.yaml'}\nbackbone: {{config: {{num_hidden_layers: 1}}}}\n")
    assert load_recipe(f).backbone.config == {"hidden_size": 128, "num_hidden_layers": 1}


def test_replace_on_a_scalar_is_an_error(tmp_path):
    f = write(tmp_path, "bad", "base: mot-tiny\nbackbone: {seed: !replace 3}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML.*!replace applies to a mapping"):
        load_recipe(f)


def test_overrides_switch_first_whatever_their_order():
    """``backbone.config.*`` before ``backbone.model_type`` still lands on the new family's (emptied) config."""
    over = [*(f"backbone.config.{k}={v}" for k, v in LLAMA.items()), "backbone.model_type=llama"]
    bb = load_recipe("pi0-tiny", over).backbone
    assert bb.model_type == "llama" and bb.config == LLAMA
    same = load_recipe("pi0-tiny", ["backbone.model_type=gemma", "backbone.config.num_hidden_layers=1"]).backbone
    assert same.config["head_dim"] == 16 and same.config["num_hidden_layers"] == 1  # no change: nothing dropped


def test_pretrained_drops_inherited_model_type_and_config(tmp_path):
    from transformers import AutoConfig
    AutoConfig.for_model("llama", **LLAMA).save_pretrained(tmp_path / "llama")
    bb = load_recipe("halo-tiny", {"backbone.pretrained": str(tmp_path / "llama")}).backbone
    assert bb.model_type == "llama" and bb.config == {} and bb.qk_norm  # qk_norm is not the family's: kept
    assert bb.spec().expert.hidden_size == 32
    with pytest.raises(ConfigError, match=r"backbone\.pretrained=.*no config\.json"):
        load_recipe("halo-tiny", {"backbone.pretrained": str(tmp_path)})
    # an explicit model_type next to pretrained is checked against the checkpoint
    with pytest.raises(ValueError, match=r"is a 'llama' model, but backbone.model_type is 'qwen2'"):
        load_recipe("halo-tiny", {"backbone.pretrained": str(tmp_path / "llama"),
                                  "backbone.model_type": "qwen2"}).backbone.spec()
    vision = load_recipe("pi0-tiny", {"vision.pretrained": "/ckpt/siglip"}).vision
    assert vision.pretrained == "/ckpt/siglip" and vision.config is None  # same rule for vision towers


def test_a_key_of_another_family_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"backbone\.config\.hidden_activation: not a field of the llama config; "
                                          r"did you mean 'hidden_act'"):
        load_recipe("pi0-tiny", {"backbone.model_type": "llama",
                                 "backbone.config": dict(LLAMA, hidden_activation="gelu_pytorch_tanh")})
    with pytest.raises(ConfigError, match=r"backbone.model_type is required without backbone.pretrained"):
        load_recipe("mot-tiny", {"backbone.model_type": None})
    with pytest.raises(ValueError, match=r"backbone\.config\.hidden_act='gelu' \(llama\) is not supported"):
        load_recipe("mot-tiny", {"backbone.model_type": "llama", "backbone.config": dict(LLAMA, hidden_act="gelu")}
                    ).backbone.spec()


def test_info_show_config_prints_the_resolved_recipe(capsys):
    over = ["backbone.model_type=llama", *(f"backbone.config.{k}={v}" for k, v in LLAMA.items())]
    assert main(["info", "pi05-tiny", *over, "--show-config"]) == 0
    text = capsys.readouterr().out
    data = yaml.safe_load(text)
    assert data["backbone"]["model_type"] == "llama" and data["backbone"]["config"] == LLAMA
    assert data["pi05"] is True and data["normalization"] == "quantile"  # from pi05-tiny itself
    assert encode(load_recipe(data)) == encode(load_recipe("pi05-tiny", over))  # loads back to the same config
    assert dump_recipe(load_recipe(data)) in text
