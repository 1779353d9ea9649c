"""Backbone swaps are right: every model recipe × every supported family, against transformers itself.

The oracle is transformers' own model of the family — ``AutoModelForCausalLM.from_config`` of a config
built here from the test's dict (not from the recipe), or ``from_pretrained`` of a checkpoint saved by
transformers into ``tmp_path`` — given the same weights. Expert 0 of the built model (the backbone expert,
its shared embedding, final norm and LM head) must give transformers' logits (fp32, ≤ 1e-4) for causal
text: a wrong activation, norm convention or embedding scale (e.g. a Gemma key inherited by a Llama)
shows up as a difference of ~1e-3 or more.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from vla_blocks.backbones import MoTLanguageModel
from vla_blocks.config import load_recipe
from vla_blocks.layout import Layout, Segment
from vla_blocks.model import create_model

RECIPES = ["pi0-tiny", "pi05-tiny", "acot-tiny", "halo-tiny"]
FAMILIES = ["gemma", "llama", "qwen2"]
# the tokenizers of the tiny recipes need these vocabularies (halo-tiny: byte tokenizer + special tokens)
VOCAB = {"pi0-tiny": 128, "pi05-tiny": 128, "acot-tiny": 128, "halo-tiny": 320}


def tiny(family: str, vocab: int, width: int = 32) -> dict:
    """A tiny config of ``family`` with 16-dim heads (the recipes' experts share the backbone's head geometry)."""
    c = dict(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
             num_attention_heads=width // 16, num_key_value_heads=1, rms_norm_eps=1e-6)
    if family != "qwen2":  # Qwen2 derives head_dim = hidden_size / heads
        c["head_dim"] = 16
    return c


def extra_overrides(recipe: str) -> dict:
    # HALO's backbone adds q/k norms (BAGEL); transformers' Qwen2/Llama/Gemma have none, so compare without
    return {"backbone.qk_norm": False} if recipe.startswith("halo") else {}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this file on one thread."""


def language_model(model) -> MoTLanguageModel:
    (lm,) = [m for m in model.modules() if isinstance(m, MoTLanguageModel)]
    return lm


def to_hf_name(ours: str, expert: str) -> str | None:
    """Our parameter name -> transformers' (hand-written here, independent of vla_blocks' key map)."""
    if ours == "embed_tokens.weight":
        return "model.embed_tokens.weight"
    if ours == "lm_head.weight":
        return "lm_head.weight"
    if ours == f"stack.norms.{expert}.weight":
        return "model.norm.weight"
    prefix = "stack.layers."
    if ours.startswith(prefix) and f".experts.{expert}." in ours:
        layer, rest = ours[len(prefix):].split(f".experts.{expert}.")
        if rest.split(".")[0] in ("q_proj", "k_proj", "v_proj", "o_proj"):
            rest = "self_attn." + rest
        return f"model.layers.{layer}.{rest}"
    return None


def expert0_logits(lm: MoTLanguageModel, ids: torch.Tensor) -> torch.Tensor:
    B, N = ids.shape
    e0 = lm.lm_expert
    layout = Layout.from_samples([[Segment.of("causal", e0, N, "text")]] * B, list(lm.stack.cfg.experts))
    h = lm({e0: lm.embed(ids).reshape(B * N, -1)}, layout).hidden[e0]
    return lm.logits(h).view(B, N, -1)


def assert_same_logits(lm: MoTLanguageModel, hf, vocab: int):
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expect = hf.eval()(ids).logits
        got = expert0_logits(lm.eval(), ids)
    assert expect.std() > 1e-2  # not a degenerate comparison
    assert (got - expect).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_swapped_family_reproduces_transformers(recipe, family):
    """``backbone.model_type`` + dotted ``backbone.config.*`` keys: the inherited config of the recipe's own family
    is dropped on a family change (its activation / sizes would leak otherwise), and expert 0 is transformers'
    model of that family."""
    cfg = tiny(family, VOCAB[recipe])
    over = {"backbone.model_type": family, **{f"backbone.config.{k}": v for k, v in cfg.items()},
            **extra_overrides(recipe)}
    model = create_model(recipe, **over)
    bb = model.config.backbone
    assert bb.model_type == family
    inherited = load_recipe(recipe).backbone
    # a family change starts from that family's config; the same family merges into the recipe's config
    expected = cfg if inherited.model_type != family else {**inherited.config, **cfg}
    assert bb.config == expected
    lm = language_model(model)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **expected), dtype=torch.float32)
    ours = lm.state_dict()
    state = {}
    for name, t in ours.items():
        hf_name = to_hf_name(name, lm.lm_expert)
        if hf_name is not None:
            state[hf_name] = t
    if lm.lm_head is None:  # tied (Gemma's default): transformers ties lm_head to the embedding
        assert hf.config.tie_word_embeddings
        state["lm_head.weight"] = ours["embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k or "embed_scale" in k for k in missing), (missing, unexpected)
    assert_same_logits(lm, hf, VOCAB[recipe])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One transformers checkpoint per family, 48 wide with 3 heads (the recipes' own backbones are 32 or 64)."""
    out = {}
    for family in FAMILIES:
        for vocab in sorted(set(VOCAB.values())):
            folder = tmp_path_factory.mktemp(f"{family}-{vocab}")
            torch.manual_seed(len(out) + 1)
            conf = AutoConfig.for_model(family, **tiny(family, vocab, width=48))
            AutoModelForCausalLM.from_config(conf, dtype=torch.float32).save_pretrained(folder)
            out[family, vocab] = folder
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_local_checkpoint_of_any_family_loads_with_its_own_sizes(recipe, family, checkpoints):
    """``backbone.pretrained: <dir>`` alone: the family and sizes come from the checkpoint (the inherited model_type
    and config are dropped), and its weights land in expert 0 exactly."""
    folder = checkpoints[family, VOCAB[recipe]]
    model = create_model(recipe, **{"backbone.pretrained": str(folder), **extra_overrides(recipe)})
    bb = model.config.backbone
    assert bb.model_type == family and bb.config == {}
    lm = language_model(model)
    assert lm.embed_tokens.weight.shape == (VOCAB[recipe], 48) and len(lm.stack.layers) == 2
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    assert torch.equal(lm.embed_tokens.weight, hf.model.embed_tokens.weight)
    assert_same_logits(lm, hf, VOCAB[recipe])


def test_gemma_legacy_hidden_activation_is_read_as_hidden_act():
    """PaliGemma configs and models saved before transformers 5 spell Gemma's activation ``hidden_activation``."""
    from vla_blocks.backbones import HFCausalLMBackbone
    base = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    old = HFCausalLMBackbone(model_type="gemma", config={**base, "hidden_activation": "gelu_pytorch_tanh"})
    assert old.hf_config().hidden_act == "gelu_pytorch_tanh"
    with pytest.raises(ValueError, match="hidden_activation='silu' and hidden_act='gelu_pytorch_tanh' disagree"):
        HFCausalLMBackbone(model_type="gemma", config={**base, "hidden_activation": "silu",
                                                       "hidden_act": "gelu_pytorch_tanh"})
