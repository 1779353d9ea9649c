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
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .config import ComponentConfig, ConfigError, register
from .mot import ExpertConfig, MoTConfig, MoTOutput, MoTStack
from .layout import Layout
from .validate import TRANSFORMER_SIZE_KEYS, check_transformer_sizes, check_value

SUPPORTED = ("qwen2", "llama", "gemma")


@dataclass(frozen=True)
class Family:
    """The conventions of one transformers causal-LM family, as its modeling code reads them.

    ``act_keys``: config keys naming the FFN activation, first set one wins (Gemma of transformers 4.x
    reads ``hidden_activation``, transformers 5 reads ``hidden_act``; a key counts only where the installed
    config class has it). ``norm``: ``gemma_rms`` is x̂·(1+w) with w initialised to 0, ``rms`` is x̂·w.
    ``embed_scale``: token embeddings are multiplied by √D (Gemma). ``qkv_bias``: always (Qwen2) or
    ``attention_bias`` (which also gives o_proj a bias).
    """

    act_keys: tuple[str, ...]
    norm: str
    embed_scale: bool
    qkv_bias_always: bool = False


FAMILIES = {
    "qwen2": Family(("hidden_act",), "rms", False, qkv_bias_always=True),
    "llama": Family(("hidden_act",), "rms", False),
    "gemma": Family(("hidden_activation", "hidden_act"), "gemma_rms", True),
}
# transformers ACT2FN names -> the stack's GatedFFN activations
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# keys that transformers configs accept besides their fields: legacy spellings folded into rope_parameters, and
# head_dim, which the Qwen2/Llama/Gemma modeling code reads with getattr whether or not the config declares it
_EXTRA_CONFIG_KEYS = ("rope_theta", "rope_scaling", "head_dim")
# earlier transformers spellings -> the current key, per family: read where the installed config class lacks the
# old key (Gemma's ``hidden_activation`` of transformers 4.x, written by PaliGemma configs and older saved models)
_LEGACY_CONFIG_KEYS = {"gemma": {"hidden_activation": "hidden_act"}}


def _fold_legacy_keys(model_type: str, config: dict) -> dict:
    """``config`` with earlier spellings renamed to the keys the installed config class has; both spellings with
    different values are an error naming them."""
    known = family_config_fields(model_type)
    out = dict(config)
    for old, new in _LEGACY_CONFIG_KEYS.get(model_type, {}).items():
        if old in out and old not in known:
            val = out.pop(old)
            if new in out and out[new] != val:
                raise ValueError(f"backbone.config: {old}={val!r} and {new}={out[new]!r} disagree ({old} is the "
                                 f"earlier spelling of {new})")
            out[new] = val
    return out


def family_config_fields(model_type: str) -> set[str]:
    """The keys a transformers config of ``model_type`` holds (the fields a recipe's ``config`` may set)."""
    from transformers import AutoConfig
    default = AutoConfig.for_model(model_type)
    names = {k for k in vars(default) if not k.startswith("_")} | set(default.to_dict())  # what it writes reads back
    return names | set(getattr(type(default), "__dataclass_fields__", {})) | set(_EXTRA_CONFIG_KEYS)


def _checkpoint_model_type(folder: str) -> str:
    import json
    from pathlib import Path
    f = Path(folder) / "config.json"
    if not f.is_file():
        raise ValueError(f"backbone.pretrained={folder!r}: no config.json there (a folder written by transformers' "
                         f"save_pretrained is expected)")
    try:
        mt = json.loads(f.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"backbone.pretrained: {f} is not a JSON config: {e}") from e
    if not mt:
        raise ValueError(f"backbone.pretrained: {f} has no 'model_type'")
    return mt


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

    ``model_type`` is the family (``qwen2``, ``llama``, ``gemma``); with ``pretrained`` it may be left
    out and is read from the checkpoint's config.json. ``config`` holds transformers config kwargs
    (``AutoConfig.for_model(model_type, **config)``; with ``pretrained`` they override the checkpoint's
    config); a key that the family's config does not have is an error. ``pretrained`` is a local folder
    of a transformers checkpoint (its config.json is used, and its weights when ``load_weights``).
    ``qk_norm`` adds q/k RMSNorms initialised to ones (BAGEL/HALO). ``seed`` makes the random
    initialisation reproducible.

    In a recipe, changing ``model_type`` drops an inherited ``config`` (it belongs to the old family) and
    changing ``pretrained`` drops an inherited ``config`` and ``model_type`` (``family_keys``).
    """

    family_keys: ClassVar[dict[str, tuple[str, ...]]] = {"model_type": ("config",),
                                                          "pretrained": ("config", "model_type")}

    # transformers family: qwen2 (HALO: Qwen2.5-1.5B), llama (also SmolLM2) or gemma (pi0: Gemma-2B);
    # None: read from ``pretrained``'s config.json
    model_type: str | None = None
    # transformers config kwargs (hidden_size, num_hidden_layers, ...) for AutoConfig.for_model(model_type, ...);
    # with ``pretrained`` they override the checkpoint's config; unknown keys are an error
    config: dict[str, Any] = field(default_factory=dict)
    # local folder of a transformers checkpoint (config.json + model.safetensors); None: random init from ``config``
    pretrained: str | None = None
    # with ``pretrained``: copy its weights into expert 0 (false: take only its config and initialise randomly)
    load_weights: bool = True
    # add q/k RMSNorms over head_dim, initialised to ones (BAGEL/HALO: true; stock Qwen2.5/Gemma/Llama: false)
    qk_norm: bool = False
    # RNG seed of the random initialisation (same seed -> same weights as transformers' own init)
    seed: int = 0

    def __post_init__(self):
        if self.model_type is None:
            if not self.pretrained:
                raise ValueError(f"backbone.model_type is required without backbone.pretrained; "
                                 f"supported: {list(SUPPORTED)}")
            self.model_type = _checkpoint_model_type(self.pretrained)
            if self.model_type not in SUPPORTED:
                raise ValueError(f"backbone.pretrained={self.pretrained!r} is a {self.model_type!r} model; "
                                 f"supported: {list(SUPPORTED)}")
        if self.model_type not in SUPPORTED:
            import difflib
            close = difflib.get_close_matches(self.model_type, SUPPORTED, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"model_type {self.model_type!r} is not supported{hint}; supported: {list(SUPPORTED)}")
        if self.config:
            self.config = _fold_legacy_keys(self.model_type, self.config)
            known = family_config_fields(self.model_type)
            for k in self.config:
                if k not in known:
                    import difflib
                    close = difflib.get_close_matches(k, sorted(known), n=2, cutoff=0.6)
                    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
                    raise ValueError(f"backbone.config.{k}: not a field of the {self.model_type} config{hint} "
                                     f"(a key of another family? recipes replace a mapping with `config: !replace`)")
            check_transformer_sizes(self.config, "config", rope=True)  # the decoder prefixes "backbone."

    # -- config ---------------------------------------------------------------------------------
    def hf_config(self):
        """The transformers config of this backbone: the checkpoint's (``pretrained``, with ``config`` overriding its
        keys) or ``AutoConfig.for_model(model_type, **config)``; ``ValueError`` when they disagree or a kwarg is
        invalid."""
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
        """The :class:`BackboneSpec` (attention geometry, vocabulary, expert-0 block) read from :meth:`hf_config` with
        the family's conventions (:data:`FAMILIES`); ``ValueError`` names any setting the stack cannot reproduce
        (rope scaling, sliding window, MLP bias, an unknown activation)."""
        c = self.hf_config()
        fam = FAMILIES[self.model_type]
        rope = getattr(c, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"backbone rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
        theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0) or 10000.0))
        sizes = {k: getattr(c, k) for k in TRANSFORMER_SIZE_KEYS if hasattr(c, k)}  # with the family's defaults
        check_transformer_sizes(sizes, "backbone.config", rope=True)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        fields_ = family_config_fields(self.model_type)
        key, name = next(((k, getattr(c, k)) for k in fam.act_keys if k in fields_ and getattr(c, k, None)),
                         (fam.act_keys[-1], None))
        act = ACTIVATIONS.get(name)
        if act is None:
            raise ValueError(f"backbone.config.{key}={name!r} ({self.model_type}) is not supported; "
                             f"supported: {sorted(ACTIVATIONS)}")
        if getattr(c, "mlp_bias", False):
            raise ValueError("backbone.config.mlp_bias=true is not supported (the stack's FFN has no biases)")
        if getattr(c, "use_sliding_window", False):
            raise ValueError("backbone.config.use_sliding_window=true is not supported (full attention only)")
        bias = bool(getattr(c, "attention_bias", False))
        expert = ExpertConfig(
            hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            norm=fam.norm, norm_eps=float(c.rms_norm_eps), ffn_act=act,
            qkv_bias=fam.qkv_bias_always or bias, o_bias=bias and not fam.qkv_bias_always, qk_norm=self.qk_norm)
        return BackboneSpec(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, head_dim, theta,
                            c.vocab_size, bool(getattr(c, "tie_word_embeddings", False)),
                            math.sqrt(c.hidden_size) if fam.embed_scale else 1.0, expert)

    # -- weights --------------------------------------------------------------------------------
    def meta_model(self):
        """The transformers model of this config on the meta device (names and shapes, no memory)."""
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(self.hf_config(), dtype=torch.float32)

    def reference_model(self):
        """The transformers model these weights come from: the checkpoint, or the random initialisation that
        :meth:`init_into` writes into the stack (same values), as a full transformers model. For tests and
        benchmarks; building a model never makes one."""
        from transformers import AutoModelForCausalLM
        if self.pretrained and self.load_weights:
            return AutoModelForCausalLM.from_pretrained(self.pretrained, local_files_only=True, dtype=torch.float32)
        ref = self.meta_model().to_empty(device="cpu")
        ref.tie_weights()  # to_empty gives tied parameters separate storage
        self.init_into(ref, {n: p.detach() for n, p in ref.named_parameters()})
        for m in ref.modules():  # buffers (rotary inv_freq, Gemma's embed scale): no random numbers drawn
            if not any(True for _ in m.parameters(recurse=False)):
                ref._init_weights(m)
        return ref

    @torch.no_grad()
    def init_into(self, meta_ref, targets: dict[str, torch.Tensor]):
        """Random-initialise ``targets`` (transformers parameter name -> destination tensor) the way transformers
        initialises this model, piece by piece in a fixed order from ``seed``, writing into the destinations:
        each transformers module of ``meta_ref`` borrows its destination tensors while its ``_init_weights``
        runs, so no second copy of the weights is ever allocated."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for name, module in meta_ref.named_modules():
                own = list(module.named_parameters(recurse=False))
                if not own:
                    continue
                saved = dict(module._parameters)
                for pname, _ in own:
                    key = f"{name}.{pname}" if name else pname
                    if key in targets:
                        module._parameters[pname] = nn.Parameter(targets[key], requires_grad=False)
                    elif key == "lm_head.weight" and getattr(meta_ref.config, "tie_word_embeddings", False):
                        module._parameters[pname] = None  # tied: the embedding is its weight
                    else:
                        raise KeyError(f"backbone parameter {key!r} has no destination in the stack")
                try:
                    if any(p is not None for p in module._parameters.values()):
                        meta_ref._init_weights(module)
                finally:
                    module._parameters.update(saved)


def hf_key_to_mot(k: str, expert: str, num_layers: int) -> str | None:
    """The :class:`MoTLanguageModel` name of a transformers causal-LM parameter for ``expert`` (None: no place
    needed, e.g. rotary ``inv_freq``); ``KeyError`` if it has no place in the stack."""
    if k == "model.embed_tokens.weight":
        return "embed_tokens.weight"
    if k == "lm_head.weight":
        return "lm_head.weight"
    if k == "model.norm.weight":
        return f"stack.norms.{expert}.weight"
    if k.startswith("model.layers."):
        i, name = k[len("model.layers."):].split(".", 1)
        if int(i) >= num_layers:
            raise KeyError(f"checkpoint key {k!r} is beyond the stack's {num_layers} layers")
        return f"stack.layers.{i}.experts.{expert}.{name.replace('self_attn.', '')}"
    if k.endswith("rotary_emb.inv_freq"):
        return None
    raise KeyError(f"checkpoint key {k!r} has no place in the MoT stack")


def hf_state_to_mot(hf_state: dict[str, torch.Tensor], expert: str, num_layers: int) -> dict[str, torch.Tensor]:
    """Map a transformers causal-LM state dict to :class:`MoTLanguageModel` names for one expert."""
    out = {}
    for k, v in hf_state.items():
        name = hf_key_to_mot(k, expert, num_layers)
        if name is not None:
            out[name] = v
    return out


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_files(folder) -> list:
    """The safetensors files of a transformers checkpoint folder (single file, or the shards of its index)."""
    import json
    from pathlib import Path
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index (no 'weight_map')") from e
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"backbone.pretrained={str(folder)!r} has no model.safetensors (or index); save the "
                            f"checkpoint with transformers' save_pretrained (safetensors)")


@torch.no_grad()
def read_safetensors_into(folder, place) -> set[str]:
    """Read every tensor of a checkpoint folder straight into its destination, one tensor at a time.

    ``place(key) -> tensor | None`` gives the destination of a checkpoint key (None: skip it). The file is
    read with plain reads into the destination's memory (a temporary of one tensor only when the dtype
    differs), never memory-mapped or loaded whole. Returns the keys read.
    """
    import json
    import struct
    done = set()
    for path in safetensors_files(folder):
        with open(path, "rb") as f:
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not a safetensors file ({e})") from e
            base = 8 + n
            for key, meta in sorted(((k, m) for k, m in header.items() if k != "__metadata__"),
                                    key=lambda km: km[1]["data_offsets"][0]):
                dest = place(key)
                if dest is None:
                    continue
                shape, (a, b) = tuple(meta["shape"]), meta["data_offsets"]
                if tuple(dest.shape) != shape:
                    raise ValueError(f"{path}: {key!r} has shape {shape}, the stack expects {tuple(dest.shape)}")
                dtype = _SAFETENSORS_DTYPES.get(meta["dtype"])
                if dtype is None:
                    raise ValueError(f"{path}: {key!r} has dtype {meta['dtype']!r}, which is not supported")
                direct = dest.dtype == dtype and dest.is_contiguous()
                buf = dest if direct else torch.empty(shape, dtype=dtype)
                raw = buf.reshape(-1).view(torch.uint8)
                if raw.numel() != b - a:
                    raise ValueError(f"{path}: {key!r} holds {b - a} bytes for shape {shape} {meta['dtype']}")
                f.seek(base + a)
                if f.readinto(memoryview(raw.numpy())) != b - a:
                    raise ValueError(f"{path}: truncated while reading {key!r}; save or download it again")
                if not direct:
                    dest.copy_(buf)
                done.add(key)
    return done


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
        """Token embeddings ``[..., D]`` of ``input_ids``, times ``embed_scale`` (√D for Gemma) in the embedding's
        dtype."""
        x = self.embed_tokens(input_ids)
        if self.embed_scale != 1.0:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM logits ``[..., vocab]`` of hidden states ``h [..., D]`` (the LM head, or the tied embedding)."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return h @ w.t()

    def forward(self, hidden: dict[str, torch.Tensor], layout: Layout, **kw) -> MoTOutput:
        """Run the :class:`MoTStack` on per-expert hidden states for ``layout`` (keyword arguments go to the stack)."""
        return self.stack(hidden, layout, **kw)

    @torch.no_grad()
    def import_backbone(self, backbone: HFCausalLMBackbone, expert: str | None = None):
        """Write the backbone's weights into ``expert`` (default: the LM expert), then re-run copy-init.

        Without a second copy: the checkpoint's tensors (``pretrained`` + ``load_weights``) are read straight
        into the stack's parameters; otherwise transformers' own initialisation runs module by module on
        the stack's parameters (the transformers model exists only on the meta device, for names, shapes
        and its ``_init_weights``). Every parameter of the transformers model must find its place (and, from
        a checkpoint, be present), else ``KeyError`` names it.
        """
        if next(self.parameters()).is_meta:
            return self
        expert = expert or self.lm_expert
        meta = backbone.meta_model()
        n_layers = len(self.stack.layers)
        own = self.state_dict()
        targets: dict[str, torch.Tensor] = {}
        for k, p in meta.named_parameters():  # tied weights are listed once (as the embedding)
            name = hf_key_to_mot(k, expert, n_layers)
            if name is None:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue
            if name not in own:
                raise KeyError(f"backbone weight {k!r} has no destination {name!r} (q/k norm or bias mismatch?)")
            if tuple(own[name].shape) != tuple(p.shape):
                raise ValueError(f"backbone weight {k!r} has shape {tuple(p.shape)}, the stack expects "
                                 f"{tuple(own[name].shape)}")
            targets[k] = own[name]
        if backbone.pretrained and backbone.load_weights:
            tied = self.lm_head is None

            def place(key):
                if key in targets:
                    return targets[key]
                if hf_key_to_mot(key, expert, n_layers) is None or (tied and key == "lm_head.weight"):
                    return None
                raise KeyError(f"{backbone.pretrained}: checkpoint key {key!r} has no place in the stack")
            got = read_safetensors_into(backbone.pretrained, place)
            missing = sorted(set(targets) - got)
            if missing:
                raise KeyError(f"backbone.pretrained={backbone.pretrained!r} lacks {len(missing)} weights of the "
                               f"stack: {missing[:5]}")
        else:
            backbone.init_into(meta, targets)
        self.stack.copy_init_experts()
        return self


@dataclass
class ExpertSpec:
    """An expert of a recipe, relative to the backbone expert: unset fields inherit the backbone's.

    ``ffn_ratio`` scales the backbone FFN size (HALO's ``action_expert_mlp_ratio``);
    ``init_from``: ``backbone`` (copy the backbone expert), another expert's name, or null (random).
    """

    hidden_size: int | None = None  # width D of this expert (None: the backbone's; pi0 action expert: 1024)
    # FFN inner size (None: the backbone's, or backbone × ``ffn_ratio``; pi0 action expert: 4096)
    intermediate_size: int | None = None
    # FFN size as a fraction of the backbone's, int(intermediate_size·ratio) (HALO action_expert_mlp_ratio, 1.0)
    ffn_ratio: float | None = None
    qk_norm: bool | None = None  # q/k RMSNorm in this expert (None: as the backbone)
    # width of the adaRMS conditioning vector (pi0.5's time embedding); None: plain RMSNorm, no modulation
    adarms_cond_dim: int | None = None
    # initial weights: "backbone" (copy of the backbone expert, sliced when sizes differ), another expert's
    # name, or None (random)
    init_from: str | None = "backbone"

    def __post_init__(self):
        # 0 is not "unset": it used to fall back to the backbone's width without a word
        for k in ("hidden_size", "intermediate_size", "adarms_cond_dim"):
            check_value(k, getattr(self, k), 1)
        check_value("ffn_ratio", self.ffn_ratio, 0.0, integer=False, strict=True)


def build_mot_config(backbone: BackboneSpec, experts: dict[str, ExpertSpec], attention_backend: str = "auto",
                     gradient_checkpointing: bool = False) -> MoTConfig:
    """The stack config: the first expert is the backbone's, the others derive from it."""
    if not experts:
        raise ValueError("experts: at least one expert is needed (the first one holds the backbone)")
    names = list(experts)
    out = {}
    for i, (name, s) in enumerate(experts.items()):
        base = backbone.expert
        inter = s.intermediate_size
        if inter is None and s.ffn_ratio is not None:
            inter = int(base.intermediate_size * s.ffn_ratio)
            if inter < 1:
                raise ConfigError(f"experts.{name}.ffn_ratio: {s.ffn_ratio} x the backbone's intermediate_size "
                                  f"{base.intermediate_size} leaves no FFN units", key=f"experts.{name}.ffn_ratio")
        init = s.init_from
        if init == "backbone":
            init = None if i == 0 else names[0]
        elif init is not None and init not in experts:
            raise ValueError(f"experts.{name}.init_from: {init!r} is not an expert; experts: {names}")
        out[name] = ExpertConfig(
            hidden_size=base.hidden_size if s.hidden_size is None else s.hidden_size,
            intermediate_size=base.intermediate_size if inter is None else inter,
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
    """A :class:`MoTLanguageModel` for ``backbone`` and ``experts`` (the first expert holds the backbone), its weights
    imported from the backbone unless ``import_weights`` is false."""
    spec = backbone.spec()
    mot = build_mot_config(spec, experts, attention_backend, gradient_checkpointing)
    lm = MoTLanguageModel(mot, spec.vocab_size, spec.tie_word_embeddings, spec.embed_scale)
    if import_weights:
        lm.import_backbone(backbone)
    return lm


__all__ = ["BackboneConfig", "BackboneSpec", "HFCausalLMBackbone", "ExpertSpec", "MoTLanguageModel", "build_mot_config",
           "build_language_model", "hf_state_to_mot", "hf_key_to_mot", "read_safetensors_into", "Family", "FAMILIES"]
