"""Range checks of sizes and policy knobs, each error a :class:`~vla_blocks.config.ConfigError` naming its key path.

Two kinds of check, both run when a recipe is loaded (:func:`~vla_blocks.config.load_recipe`) and again when a
model is built (a config made in Python skips the loader):

- :func:`check_transformer_sizes`: the size keys of a transformers config mapping (``backbone.config`` when the
  backbone is decoded and built, ``vision.config`` from :func:`check_config`): positive integers,
  ``num_attention_heads`` a multiple of ``num_key_value_heads``, and ``hidden_size`` a multiple of
  ``num_attention_heads`` where the head width is derived from it (even, for RoPE).
- :func:`check_config`: every field of a typed config tree whose name is a size or a count (``action_horizon``,
  ``n_action_steps``, ``chunk_size``, ``ear.horizon``, ``inference.latent_points`` …; the table
  :data:`FIELD_RULES`), plus the cross-field rule ``1 <= n_action_steps <= action_horizon`` (``chunk_size``
  for HALO). A ``None`` value means "not set" and is never checked.
"""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from typing import Any, Mapping

from .errors import ConfigError

# name -> (minimum, integer?): fields of that name anywhere in a config tree must be >= minimum
FIELD_RULES: dict[str, tuple[float, bool]] = {
    **{k: (1, True) for k in (
        "action_dim", "action_horizon", "adarms_cond_dim", "agp_num_heads", "chunk_size", "downsample_dim",
        "group_size", "head_dim", "hidden_size", "intermediate_size", "history_frames", "horizon", "stride",
        "image_max_pixels", "latent_patch_size", "max_latent_size", "max_num_patches", "max_token_len",
        "n_action_steps", "num_cameras", "num_heads", "num_layers", "num_queries", "num_steps", "real_action_dim",
        "state_dim", "vae_max_side", "vae_min_side", "vit_max_side", "vit_max_size", "vit_min_size")},
    **{k: (2, True) for k in ("points", "latent_points", "action_points")},  # a grid has both endpoints
    "max_new_tokens": (0, True),  # 0: no text is generated
    "ffn_ratio": (0.0, False),  # strictly positive, see _positive_floats
}
_POSITIVE_FLOATS = {"ffn_ratio"}

# size keys of a transformers config mapping (backbone.config, vision.config) that must be positive integers
TRANSFORMER_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "image_size",
                         "patch_size", "num_channels", "num_patches")


def _err(path: str, msg: str, file: str | None = None) -> ConfigError:
    return ConfigError(f"{file}: {path}: {msg}" if file else f"{path}: {msg}", key=path)


def check_value(path: str, value: Any, minimum: float, integer: bool = True, strict: bool = False,
                file: str | None = None):
    """``value`` is a number ``>= minimum`` (``> minimum`` with ``strict``; an ``int`` with ``integer``), else a
    :class:`ConfigError` naming ``path``. ``None`` passes (not set)."""
    if value is None:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _err(path, f"expected {kind}, got {type(value).__name__} {value!r}", file)
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        rel = ">" if strict else ">="
        raise _err(path, f"must be {rel} {minimum:g}, got {value!r}", file)


def check_transformer_sizes(values: Mapping[str, Any], path: str, *, head_dim_derived: bool | None = None,
                            rope: bool = False, file: str | None = None):
    """Check the size keys of a transformers config (a mapping or a config object's ``vars``) under ``path``.

    ``head_dim_derived``: whether the head width is ``hidden_size // num_attention_heads`` (None: when
    ``head_dim`` is absent or None). ``rope``: the head width must be even. Keys that are absent are skipped.
    """
    get = values.get
    for k in TRANSFORMER_SIZE_KEYS:
        if k in values and not (k == "head_dim" and get(k) is None):
            check_value(f"{path}.{k}", get(k), 1, file=file)
    heads, kv = get("num_attention_heads"), get("num_key_value_heads")
    if heads is not None and kv is not None and heads % kv:
        raise _err(f"{path}.num_key_value_heads", f"num_attention_heads={heads} is not a multiple of "
                   f"num_key_value_heads={kv} (each key/value head serves a whole group of query heads)", file)
    if head_dim_derived is None:
        head_dim_derived = get("head_dim") is None
    hidden = get("hidden_size")
    if head_dim_derived and hidden is not None and heads is not None:
        if hidden % heads:
            raise _err(f"{path}.num_attention_heads", f"hidden_size={hidden} is not a multiple of "
                       f"num_attention_heads={heads} (the head width is hidden_size / num_attention_heads here; "
                       f"set head_dim to choose it)", file)
        if rope and (hidden // heads) % 2:
            raise _err(f"{path}.num_attention_heads", f"the head width hidden_size / num_attention_heads = "
                       f"{hidden // heads} must be even for RoPE", file)
    if rope and not head_dim_derived and isinstance(get("head_dim"), int) and get("head_dim") % 2:
        raise _err(f"{path}.head_dim", f"must be even for RoPE, got {get('head_dim')}", file)


def check_config(cfg, path: str = "", file: str | None = None):
    """Check every size / count field of a typed config tree (see the module docstring); returns ``cfg``."""
    _walk(cfg, path, file)
    horizon_key = next((k for k in ("action_horizon", "chunk_size") if isinstance(getattr(cfg, k, None), int)), None)
    steps = getattr(cfg, "n_action_steps", None)
    if horizon_key is not None and isinstance(steps, int) and not isinstance(steps, bool):
        horizon = getattr(cfg, horizon_key)
        if steps > horizon:
            key = f"{path}.n_action_steps" if path else "n_action_steps"
            raise _err(key, f"{steps} actions per chunk, but a chunk holds {horizon_key}={horizon}", file)
    return cfg


def _walk(node, path: str, file: str | None):
    if is_dataclass(node) and not isinstance(node, type):
        for f in fields(node):
            if not f.init:
                continue
            sub = f"{path}.{f.name}" if path else f.name
            val = getattr(node, f.name)
            rule = FIELD_RULES.get(f.name)
            if f.name == "config" and isinstance(val, dict) and getattr(node, "slot", None) == "vision":
                check_transformer_sizes(val, sub, head_dim_derived=True, file=file)  # ViTs derive the head width
            elif rule is not None and not is_dataclass(val):
                check_value(sub, val, rule[0], rule[1], strict=f.name in _POSITIVE_FLOATS, file=file)
            else:
                _walk(val, sub, file)
    elif isinstance(node, dict):
        for k, v in node.items():
            if is_dataclass(v):
                _walk(v, f"{path}.{k}" if path else str(k), file)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            if is_dataclass(v):
                _walk(v, f"{path}[{i}]", file)


__all__ = ["check_config", "check_transformer_sizes", "check_value", "FIELD_RULES", "TRANSFORMER_SIZE_KEYS"]
