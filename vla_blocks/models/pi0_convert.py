"""lerobot pi0 / pi0.5 checkpoint knowledge for :mod:`vla_blocks.convert` (kinds ``pi0`` / ``pi05``): the key map
from lerobot's PyTorch names, the sizes read off the tensors, and the recipe fields read from lerobot's policy
``config.json`` (reference acot_pi0.md, ecosystem.md).

``lerobot_pi0_key_map`` is also importable from :mod:`vla_blocks.convert` (its old home)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

_ROPE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_PALI = ("paligemma_with_expert.paligemma.model.", "paligemma_with_expert.paligemma.")
_EXPERT = "paligemma_with_expert.gemma_expert."
_PI_TOP = ("action_in_proj.", "action_out_proj.", "time_mlp_in.", "time_mlp_out.", "state_proj.",
           "action_time_mlp_in.", "action_time_mlp_out.")

#: openpi's Gemma variants (``gemma.get_config``) by the names lerobot's config uses: (heads, kv heads, head_dim).
GEMMA_HEADS = {"gemma_2b": (8, 1, 256), "gemma_300m": (8, 1, 256)}
#: The PaliGemma tokenizer files a converted pi0 folder carries when the source has them.
PALIGEMMA_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")
_NORM = {"MEAN_STD": "zscore", "QUANTILES": "quantile"}


def _gemma_layer(rest: str, expert: str) -> str | None:
    m = re.match(r"^layers\.(\d+)\.(?:self_attn\.)?((?:[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight|"
                 r"(?:input_layernorm|post_attention_layernorm)\.(?:weight|dense\.weight|dense\.bias))$", rest)
    if m:
        return f"language_model.stack.layers.{m[1]}.experts.{expert}.{m[2]}"
    m = re.match(r"^norm\.(weight|dense\.weight|dense\.bias)$", rest)
    if m:
        return f"language_model.stack.norms.{expert}.{m[1]}"
    return None


def lerobot_pi0_key_map(vlm: str = "vlm", act: str = "act") -> Callable[[str], "tuple[str | None, str | None]"]:
    """lerobot's pi0 / pi0.5 names (transformers 4.x ``paligemma.language_model.model`` and 5.x
    ``paligemma.model.language_model`` layouts, with or without the policy's ``model.`` prefix) → ours."""

    def fn(key: str):
        k = key[len("model."):] if key.startswith("model.paligemma_with_expert.") or \
            key.startswith(tuple("model." + t for t in _PI_TOP)) else key
        if _ROPE.search(k):
            return None, "RoPE inverse frequencies: recomputed"
        if k.startswith(_PI_TOP):
            return k, None
        if k.startswith(_EXPERT):
            rest = k[len(_EXPERT):]
            if rest == "lm_head.weight":
                return None, "the action expert's LM head is unused by pi0"
            if rest == "model.embed_tokens.weight":
                return None, "the action expert's token embedding is unused by pi0"
            if rest.startswith("model."):
                t = _gemma_layer(rest[len("model."):], act)
                return (t, None) if t else (None, None)
            return None, None
        for p in _PALI:
            if not k.startswith(p):
                continue
            rest = k[len(p):]
            if rest in ("lm_head.weight", "language_model.lm_head.weight"):
                return None, "PaliGemma's LM head: tied to embed_tokens"
            for lm in ("language_model.model.", "language_model."):
                if rest.startswith(lm):
                    sub = rest[len(lm):]
                    if sub == "embed_tokens.weight":
                        return "language_model.embed_tokens.weight", None
                    t = _gemma_layer(sub, vlm)
                    if t:
                        return t, None
            if rest.startswith("vision_tower."):
                sub = rest[len("vision_tower."):]
                sub = sub[len("vision_model."):] if sub.startswith("vision_model.") else sub
                return "vision_tower.model." + sub, None
            if rest.startswith("multi_modal_projector."):
                return rest, None
        return None, None
    return fn


def infer_pi0(shapes: Mapping[str, tuple], head_dim: int | None = None) -> dict[str, Any]:
    """Recipe fields read off a lerobot pi0 / pi0.5 checkpoint's tensor shapes: the vocabulary, the PaliGemma LLM's
    width, depth and FFN width, the action expert's width and FFN width, the vision tower's width, depth, FFN width
    and patch size, ``action_dim`` and pi0's ``state_dim``. Gemma's q / k projections hold heads·head_dim rows:
    with ``head_dim`` (from the config's variant) the head counts are read off too."""
    fn = lerobot_pi0_key_map()
    t2s = {}
    for k, shape in shapes.items():
        t, _ = fn(k)
        if t is not None:
            t2s[t] = tuple(int(v) for v in shape)
    out: dict[str, Any] = {}
    emb = t2s.get("language_model.embed_tokens.weight")
    if emb:
        out["backbone.config.vocab_size"], out["backbone.config.hidden_size"] = emb
    for expert, prefix in (("vlm", "backbone.config."), ("act", "action_expert.")):
        L = f"language_model.stack.layers.{{}}.experts.{expert}."
        pat = re.compile(rf"^language_model\.stack\.layers\.(\d+)\.experts\.{expert}\.")
        layers = [int(m[1]) for t in t2s if (m := pat.match(t))]
        if layers and expert == "vlm":
            out[prefix + "num_hidden_layers"] = max(layers) + 1
        gate = t2s.get(L.format(0) + "mlp.gate_proj.weight")
        if gate:
            out[prefix + "intermediate_size"] = gate[0]
            if expert == "act":
                out[prefix + "hidden_size"] = gate[1]
        q, kk = t2s.get(L.format(0) + "q_proj.weight"), t2s.get(L.format(0) + "k_proj.weight")
        if expert == "vlm" and head_dim and q and kk:
            out[prefix + "head_dim"] = head_dim
            out[prefix + "num_attention_heads"] = q[0] // head_dim
            out[prefix + "num_key_value_heads"] = kk[0] // head_dim
    if "action_in_proj.weight" in t2s:
        out["action_dim"] = t2s["action_in_proj.weight"][1]
    if "state_proj.weight" in t2s:
        out["state_dim"] = t2s["state_proj.weight"][1]
    V = "vision_tower.model."
    pe = t2s.get(V + "embeddings.patch_embedding.weight")
    if pe:
        out["vision.config.hidden_size"], out["vision.config.patch_size"] = pe[0], pe[-1]
    vl = [int(m[1]) for t in t2s if (m := re.match(r"^vision_tower\.model\.encoder\.layers\.(\d+)\.", t))]
    if vl:
        out["vision.config.num_hidden_layers"] = max(vl) + 1
    fc1 = t2s.get(V + "encoder.layers.0.mlp.fc1.weight")
    if fc1:
        out["vision.config.intermediate_size"] = fc1[0]
    return out


def read_lerobot_config(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Recipe fields from a lerobot pi0 / pi0.5 policy ``config.json`` in ``folder`` → ``(fields, facts)``.

    Fields: ``pi05`` (``type``), ``action_horizon`` (``chunk_size``), ``n_action_steps``, ``max_token_len``
    (``tokenizer_max_length``), ``action_dim`` (``max_action_dim``), pi0's ``state_dim`` (``max_state_dim``),
    ``real_action_dim`` (``output_features.action.shape``), ``num_cameras`` (the VISUAL input features plus
    ``empty_cameras``), ``normalization`` (``normalization_mapping`` STATE / ACTION: MEAN_STD → zscore,
    QUANTILES → quantile), ``flow.num_steps`` (``num_inference_steps``). Facts (not recipe fields): the camera
    keys, the state dim, the Gemma variants' head_dim. Unsupported settings raise ``ValueError`` naming them.
    No ``config.json`` (or one of another policy type) gives nothing."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}, {}
    c = json.loads(path.read_text())
    kind = c.get("type")
    if kind not in ("pi0", "pi05"):
        return {}, {}
    out: dict[str, Any] = {"pi05": kind == "pi05"}
    facts: dict[str, Any] = {"type": kind}
    for src, dst in (("chunk_size", "action_horizon"), ("n_action_steps", "n_action_steps"),
                     ("tokenizer_max_length", "max_token_len"), ("max_action_dim", "action_dim"),
                     ("num_inference_steps", "flow.num_steps")):
        if c.get(src) is not None:
            out[dst] = c[src]
    if kind == "pi0" and c.get("max_state_dim") is not None:
        out["state_dim"] = c["max_state_dim"]
    feats = c.get("input_features") or {}
    cams = [k for k, f in feats.items() if isinstance(f, dict) and f.get("type") == "VISUAL"]
    if feats or c.get("empty_cameras"):
        out["num_cameras"] = len(cams) + int(c.get("empty_cameras") or 0)
    facts["camera_keys"] = cams
    state = feats.get("observation.state")
    if isinstance(state, dict) and state.get("shape"):
        facts["state_dim"] = int(state["shape"][0])
    action = (c.get("output_features") or {}).get("action")
    if isinstance(action, dict) and action.get("shape"):
        out["real_action_dim"] = int(action["shape"][0])
    norm = c.get("normalization_mapping") or {}
    modes = {k: norm[k] for k in ("STATE", "ACTION") if k in norm}
    if modes:
        bad = {k: v for k, v in modes.items() if v not in _NORM}
        if bad or len(set(modes.values())) > 1:
            raise ValueError(f"{path}: normalization_mapping {modes} is not supported (state and action must both be "
                             f"MEAN_STD or both QUANTILES)")
        out["normalization"] = _NORM[next(iter(modes.values()))]
    for f in ("min_period", "max_period"):
        default = {"min_period": 4e-3, "max_period": 4.0}[f]
        if c.get(f) is not None and float(c[f]) != default:
            raise ValueError(f"{path}: {f}={c[f]} is not supported (the time embedding uses {default})")
    variants = [c.get("paligemma_variant"), c.get("action_expert_variant")]
    for v in variants:
        if v is not None and v not in GEMMA_HEADS:
            raise ValueError(f"{path}: unknown Gemma variant {v!r} (known: {sorted(GEMMA_HEADS)})")
    if c.get("paligemma_variant"):
        facts["head_dim"] = GEMMA_HEADS[c["paligemma_variant"]][2]
    return out, facts
