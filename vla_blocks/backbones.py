"""LLM backbones imported into expert 0 of an MoT stack, and the shared-embedding MoT language model.

The ``hf_causal_lm`` backbone reads a transformers causal-LM config (``model_type`` + kwargs, or a
local checkpoint folder) and gives the attention geometry and expert-0 block of the stack; its
weights (random init from the config, or the checkpoint) are copied into expert 0, the shared
token embedding, the final norm and the LM head. Other experts are copy-initialised from expert 0
(sliced when widths differ). Supported: Qwen2/Qwen2.5, Llama/SmolLM2, Gemma. Swapping the backbone
is one recipe line (``backbone.model_type``)::

    backbone: {type: hf_causal_lm, model_type: qwen2, config: {hidden_size: 64, num_hidden_layers: 2, ...}}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .config import ComponentConfig, register
from .mot import ExpertConfig, MoTConfig, MoTOutput, MoTStack
from .layout import Layout

SUPPORTED = ("qwen2", "llama", "gemma")


class BackboneConfig(ComponentConfig, slot="backbone"):
    """A source of the attention geometry, expert-0 block, vocabulary and (optionally) weights."""


@dataclass
class BackboneSpec:
    """What a backbone gives the stack (plain numbers; no weights)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    vocab_size: int
    tie_word_embeddings: bool
    embed_scale: float
    expert: ExpertConfig


@register("backbone", "hf_causal_lm")
@dataclass
class HFCausalLMBackbone(BackboneConfig):
    """A transformers causal LM (Qwen2/Qwen2.5, Llama/SmolLM2, Gemma).

    ``config`` holds transformers config kwargs (``AutoConfig.for_model(model_type, **config)``);
    ``pretrained`` is a local folder of a transformers checkpoint (its config.json is used, and
    its weights when ``load_weights``). ``qk_norm`` adds q/k RMSNorms initialised to ones (BAGEL/HALO).
    ``seed`` makes the random initialisation reproducible.
    """

    model_type: str = "qwen2"
    config: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    load_weights: bool = True
    qk_norm: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.model_type not in SUPPORTED:
            import difflib
            close = difflib.get_close_matches(self.model_type, SUPPORTED, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"model_type {self.model_type!r} is not supported{hint}; supported: {list(SUPPORTED)}")

    # -- config ---------------------------------------------------------------------------------
    def hf_config(self):
        from transformers import AutoConfig
        if self.pretrained:
            cfg = AutoConfig.from_pretrained(self.pretrained, local_files_only=True, **self.config)
            if cfg.model_type != self.model_type:
                raise ValueError(f"backbone.pretrained={self.pretrained!r} is a {cfg.model_type!r} model, "
                                 f"but backbone.model_type is {self.model_type!r}")
            return cfg
        try:
            return AutoConfig.for_model(self.model_type, **self.config)
        except TypeError as e:
            raise ValueError(f"backbone.config is not valid for {self.model_type}: {e}") from e

    def spec(self) -> BackboneSpec:
        c = self.hf_config()
        rope = getattr(c, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"backbone rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
        theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0) or 10000.0))
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        gemma = self.model_type == "gemma"
        act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", "silu")
        act = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}.get(act)
        if act is None:
            raise ValueError(f"backbone activation {getattr(c, 'hidden_act', None)!r} is not supported")
        expert = ExpertConfig(
            hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            norm="gemma_rms" if gemma else "rms", norm_eps=float(c.rms_norm_eps), ffn_act=act,
            qkv_bias=self.model_type == "qwen2" or bool(getattr(c, "attention_bias", False)),
            o_bias=bool(getattr(c, "attention_bias", False)) and self.model_type != "qwen2",
            qk_norm=self.qk_norm)
        return BackboneSpec(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, head_dim, theta,
                            c.vocab_size, bool(getattr(c, "tie_word_embeddings", False)),
                            math.sqrt(c.hidden_size) if gemma else 1.0, expert)

    # -- weights --------------------------------------------------------------------------------
    def reference_model(self):
        """The transformers model these weights come from (random init from the config, or the checkpoint)."""
        from transformers import AutoModelForCausalLM
        if self.pretrained and self.load_weights:
            return AutoModelForCausalLM.from_pretrained(self.pretrained, local_files_only=True, dtype=torch.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return AutoModelForCausalLM.from_config(self.hf_config(), dtype=torch.float32)


def hf_state_to_mot(hf_state: dict[str, torch.Tensor], expert: str, num_layers: int) -> dict[str, torch.Tensor]:
    """Map a transformers causal-LM state dict to :class:`MoTLanguageModel` names for one expert."""
    out = {}
    for k, v in hf_state.items():
        if k == "model.embed_tokens.weight":
            out["embed_tokens.weight"] = v
        elif k == "lm_head.weight":
            out["lm_head.weight"] = v
        elif k == "model.norm.weight":
            out[f"stack.norms.{expert}.weight"] = v
        elif k.startswith("model.layers."):
            rest = k[len("model.layers."):]
            i, name = rest.split(".", 1)
            if int(i) >= num_layers:
                raise KeyError(f"checkpoint key {k!r} is beyond the stack's {num_layers} layers")
            name = name.replace("self_attn.", "")
            out[f"stack.layers.{i}.experts.{expert}.{name}"] = v
        elif k.endswith("rotary_emb.inv_freq"):
            continue
        else:
            raise KeyError(f"checkpoint key {k!r} has no place in the MoT stack")
    return out


class MoTLanguageModel(nn.Module):
    """Shared token embedding + :class:`MoTStack` + LM head on the first (backbone) expert.

    ``embed(input_ids)`` scales by ``embed_scale`` (√D for Gemma) in the embedding's dtype.
    """

    def __init__(self, mot: MoTConfig, vocab_size: int, tie_word_embeddings: bool = False, embed_scale: float = 1.0,
                 lm_expert: str | None = None):
        super().__init__()
        self.lm_expert = lm_expert or next(iter(mot.experts))
        width = mot.experts[self.lm_expert].hidden_size
        self.embed_tokens = nn.Embedding(vocab_size, width)
        self.stack = MoTStack(mot)
        self.tie_word_embeddings = tie_word_embeddings
        self.lm_head = None if tie_word_embeddings else nn.Linear(width, vocab_size, bias=False)
        self.embed_scale = embed_scale

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.embed_scale != 1.0:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return h @ w.t()

    def forward(self, hidden: dict[str, torch.Tensor], layout: Layout, **kw) -> MoTOutput:
        return self.stack(hidden, layout, **kw)

    @torch.no_grad()
    def import_backbone(self, backbone: HFCausalLMBackbone, expert: str | None = None):
        """Copy a transformers model's weights into ``expert`` (default: the LM expert), then re-run copy-init."""
        if next(self.parameters()).is_meta:
            return self
        expert = expert or self.lm_expert
        ref = backbone.reference_model()
        mapped = hf_state_to_mot(ref.state_dict(), expert, len(self.stack.layers))
        if self.lm_head is None:
            mapped.pop("lm_head.weight", None)
        own = self.state_dict()
        for k, v in mapped.items():
            if k not in own:
                raise KeyError(f"backbone weight {k!r} has no destination (q/k norm or bias mismatch?)")
            if own[k].shape != v.shape:
                raise ValueError(f"backbone weight {k!r} has shape {tuple(v.shape)}, the stack expects "
                                 f"{tuple(own[k].shape)}")
            own[k].copy_(v)
        self.stack.copy_init_experts()
        return self


@dataclass
class ExpertSpec:
    """An expert of a recipe, relative to the backbone expert: unset fields inherit the backbone's.

    ``ffn_ratio`` scales the backbone FFN size (HALO's ``action_expert_mlp_ratio``);
    ``init_from``: ``backbone`` (copy the backbone expert), another expert's name, or null (random).
    """

    hidden_size: int | None = None
    intermediate_size: int | None = None
    ffn_ratio: float | None = None
    qk_norm: bool | None = None
    adarms_cond_dim: int | None = None
    init_from: str | None = "backbone"


def build_mot_config(backbone: BackboneSpec, experts: dict[str, ExpertSpec], attention_backend: str = "auto",
                     gradient_checkpointing: bool = False) -> MoTConfig:
    """The stack config: the first expert is the backbone's, the others derive from it."""
    if not experts:
        raise ValueError("experts: at least one expert is needed (the first one holds the backbone)")
    names = list(experts)
    out = {}
    for i, (name, s) in enumerate(experts.items()):
        base = backbone.expert
        inter = s.intermediate_size or (int(base.intermediate_size * s.ffn_ratio) if s.ffn_ratio else None)
        init = s.init_from
        if init == "backbone":
            init = None if i == 0 else names[0]
        elif init is not None and init not in experts:
            raise ValueError(f"experts.{name}.init_from: {init!r} is not an expert; experts: {names}")
        out[name] = ExpertConfig(
            hidden_size=s.hidden_size or base.hidden_size,
            intermediate_size=inter or base.intermediate_size,
            norm=base.norm, norm_eps=base.norm_eps, ffn_act=base.ffn_act, qkv_bias=base.qkv_bias, o_bias=base.o_bias,
            qk_norm=base.qk_norm if s.qk_norm is None else s.qk_norm,
            adarms_cond_dim=s.adarms_cond_dim, init_from=init)
    if out[names[0]].hidden_size != backbone.expert.hidden_size:
        raise ValueError(f"experts.{names[0]}.hidden_size must equal the backbone width {backbone.expert.hidden_size}")
    return MoTConfig(backbone.num_layers, backbone.num_heads, backbone.num_kv_heads, backbone.head_dim, out,
                     rope_theta=backbone.rope_theta, attention_backend=attention_backend,
                     gradient_checkpointing=gradient_checkpointing)


def build_language_model(backbone: HFCausalLMBackbone, experts: dict[str, ExpertSpec], attention_backend: str = "auto",
                         gradient_checkpointing: bool = False, import_weights: bool = True) -> MoTLanguageModel:
    spec = backbone.spec()
    mot = build_mot_config(spec, experts, attention_backend, gradient_checkpointing)
    lm = MoTLanguageModel(mot, spec.vocab_size, spec.tie_word_embeddings, spec.embed_scale)
    if import_weights:
        lm.import_backbone(backbone)
    return lm


__all__ = ["BackboneConfig", "BackboneSpec", "HFCausalLMBackbone", "ExpertSpec", "MoTLanguageModel", "build_mot_config",
           "build_language_model", "hf_state_to_mot"]
