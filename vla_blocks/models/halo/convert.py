"""HALO / BAGEL checkpoint knowledge for :mod:`vla_blocks.convert` (kind ``halo``): the key map from BAGEL's
Qwen2-MoT names, the sizes read off the tensors, and the recipe fields read from BAGEL's ``llm_config.json`` /
``vit_config.json`` (reference halo_bagel.md §6).

``halo_key_map`` is also importable from :mod:`vla_blocks.convert` (its old home)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

_ROPE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.")
_VIT_LAYER = re.compile(r"^vit_model\.vision_model\.encoder\.layers\.(\d+)\.")

#: BAGEL's model-level files a converter reads beside the weights.
HALO_CONFIG_FILES = ("llm_config.json", "vit_config.json")
#: The Qwen2 tokenizer files a HALO / BAGEL folder carries (copied into a converted folder).
QWEN2_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                         "special_tokens_map.json", "added_tokens.json")


def halo_key_map(experts: list[str]) -> Callable[[str], "tuple[str | None, str | None]"]:
    """BAGEL / HALO names → ours. Suffix ``""`` → the first expert (und), ``_moe_X`` → expert ``X``."""
    first = experts[0]

    def expert(suffix: str | None) -> str | None:
        if not suffix:
            return first
        name = suffix[len("_moe_"):]
        return name if name in experts else None

    L = r"^language_model\.model\.layers\.(\d+)\."
    rules = [
        (re.compile(L + r"self_attn\.([qkvo])_proj(_moe_\w+)?\.(weight|bias)$"),
         lambda m, e: f"lm.stack.layers.{m[1]}.experts.{e}.{m[2]}_proj.{m[4]}", 3),
        (re.compile(L + r"self_attn\.([qk])_norm(_moe_\w+)?\.weight$"),
         lambda m, e: f"lm.stack.layers.{m[1]}.experts.{e}.{m[2]}_norm.weight", 3),
        (re.compile(L + r"(input_layernorm|post_attention_layernorm)(_moe_\w+)?\.weight$"),
         lambda m, e: f"lm.stack.layers.{m[1]}.experts.{e}.{m[2]}.weight", 3),
        (re.compile(L + r"mlp(_moe_\w+)?\.(gate|up|down)_proj\.weight$"),
         lambda m, e: f"lm.stack.layers.{m[1]}.experts.{e}.mlp.{m[3]}_proj.weight", 2),
        (re.compile(r"^language_model\.model\.norm(_moe_\w+)?\.weight$"),
         lambda m, e: f"lm.stack.norms.{e}.weight", 1),
    ]
    same = ("connector.", "time_embedder.", "vae2llm.", "llm2vae.", "input_linear_layer.", "output_linear_layer.",
            "action_time_embedder.")
    regenerated = ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed")

    def fn(key: str):
        if key in regenerated:
            return None, "fixed sin-cos table: regenerated"
        if _ROPE.search(key):
            return None, "RoPE inverse frequencies: recomputed"
        if key == "language_model.model.embed_tokens.weight":
            return "lm.embed_tokens.weight", None
        if key == "language_model.lm_head.weight":
            return "lm.lm_head.weight", None
        if key.startswith("vit_model.vision_model."):
            return "vit_model.model." + key[len("vit_model.vision_model."):], None
        if key.startswith(same):
            return key, None
        for pat, target, group in rules:
            m = pat.match(key)
            if m:
                e = expert(m[group])
                return (target(m, e), None) if e else (None, None)
        return None, None
    return fn


def infer_halo(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    """Recipe fields read off a HALO / BAGEL checkpoint's tensor shapes: the LLM's vocabulary, width, depth, FFN
    width, query / key-value heads and head_dim (``q_norm`` is ``[head_dim]``), the act expert's FFN width, the
    action width, and the ViT's width, FFN width and depth (the checkpoint holds the layers BAGEL keeps)."""
    s, out = shapes, {}
    P = "language_model.model."
    emb = s.get(P + "embed_tokens.weight")
    if emb is not None:
        out["backbone.config.vocab_size"], out["backbone.config.hidden_size"] = int(emb[0]), int(emb[1])
    layers = {int(m[1]) for k in s if (m := _LAYER.match(k))}
    if layers:
        out["backbone.config.num_hidden_layers"] = max(layers) + 1
    L0 = P + "layers.0."
    if L0 + "mlp.gate_proj.weight" in s:
        out["backbone.config.intermediate_size"] = int(s[L0 + "mlp.gate_proj.weight"][0])
    if L0 + "self_attn.q_norm.weight" in s:
        hd = int(s[L0 + "self_attn.q_norm.weight"][0])
        out["backbone.config.head_dim"] = hd
        if L0 + "self_attn.q_proj.weight" in s:
            out["backbone.config.num_attention_heads"] = int(s[L0 + "self_attn.q_proj.weight"][0]) // hd
        if L0 + "self_attn.k_proj.weight" in s:
            out["backbone.config.num_key_value_heads"] = int(s[L0 + "self_attn.k_proj.weight"][0]) // hd
    act, und = L0 + "mlp_moe_act.gate_proj.weight", L0 + "mlp.gate_proj.weight"
    if act in s and und in s and s[act][0] != s[und][0]:
        out["experts.act.intermediate_size"] = int(s[act][0])
    if "input_linear_layer.weight" in s:
        out["action_dim"] = int(s["input_linear_layer.weight"][1])
    V = "vit_model.vision_model."
    if V + "embeddings.patch_embedding.weight" in s:
        out["vision.config.hidden_size"] = int(s[V + "embeddings.patch_embedding.weight"][0])
    vit_layers = {int(m[1]) for k in s if (m := _VIT_LAYER.match(k))}
    if vit_layers:
        out["vision.num_layers"] = max(vit_layers) + 1
    if V + "encoder.layers.0.mlp.fc1.weight" in s:
        out["vision.config.intermediate_size"] = int(s[V + "encoder.layers.0.mlp.fc1.weight"][0])
    return out


# not vocab_size: BAGEL resizes the token embedding to its tokenizer after reading llm_config.json, so the size is
# the tensor's (HALO's released embed_tokens: 151933 rows, its Qwen2.5 config: 151936)
_LLM_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "rope_theta", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")
_VIT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size")


def read_halo_configs(folder: str | Path) -> dict[str, Any]:
    """Recipe fields from BAGEL / HALO's ``llm_config.json`` (Qwen2: sizes but the vocabulary, RoPE θ, norm eps,
    tied head; ``head_dim`` = hidden / heads when absent; ``qk_norm``; HALO's ``action_expert_mlp_ratio`` →
    ``experts.act.ffn_ratio``) and ``vit_config.json`` (SigLIP sizes and patch) in ``folder``. Missing files give
    nothing."""
    folder, out = Path(folder), {}
    llm = folder / "llm_config.json"
    if llm.is_file():
        c = json.loads(llm.read_text())
        for f in _LLM_FIELDS:
            if f in c:
                out[f"backbone.config.{f}"] = c[f]
        if "head_dim" in c:
            out["backbone.config.head_dim"] = c["head_dim"]
        elif "hidden_size" in c and "num_attention_heads" in c:
            out["backbone.config.head_dim"] = c["hidden_size"] // c["num_attention_heads"]
        if "qk_norm" in c:
            out["backbone.qk_norm"] = bool(c["qk_norm"])
        if "action_expert_mlp_ratio" in c:
            out["experts.act.ffn_ratio"] = float(c["action_expert_mlp_ratio"])
    vit = folder / "vit_config.json"
    if vit.is_file():
        c = json.loads(vit.read_text())
        for f in _VIT_FIELDS:
            if f in c:
                out[f"vision.config.{f}"] = c[f]
    return out
