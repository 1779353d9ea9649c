"""openpi / ACoT-VLA JAX parameter trees for :mod:`vla_blocks.convert` (kinds ``pi0-jax``, ``pi05-jax``,
``acot-jax``): the flattened ``/`` names of an openpi ``params`` tree (reference acot_pi0.md §2.4) seen as
PyTorch-layout tensors of the ``pi0`` / ``pi05`` / ``acot`` recipes.

Layer-stacked JAX arrays (leading axis = layers) become one entry per layer, ``"<jax path>[i]"``; entries that
split one array (``kv_einsum`` → k / v, ``gating_einsum`` → gate / up) add ``:k`` / ``:v`` / ``:gate`` / ``:up``;
the three ``attn/{query,key,value}/kernel`` (and ``bias``) of an ``nnx.MultiHeadAttention`` become one entry,
``"<module>/attn/qkv/kernel"``, PyTorch's packed ``in_proj_weight``. The transforms (einsum layouts → ``[out, in]``
weights; big_vision's HWIO patch kernel → OIHW; ``nnx.Linear`` ``kernel [in, out]`` → ``weight [out, in]``) are
those of openpi's ``examples/convert_jax_model_to_pytorch.py``, re-derived from the einsum strings.

Sources: a ``.npz`` of the flattened tree (keys joined with ``/``, as PaliGemma's ``pt_224.npz``), or an orbax
``params`` folder (needs ``pip install vla-blocks[orbax]``). A leading ``params/`` and trailing ``/value`` are
stripped (NNX state)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

LLM, IMG = "PaliGemma/llm/", "PaliGemma/img/"
#: experts by parameter suffix: openpi pi0 / pi0.5 (``_1`` = the action expert) and ACoT-VLA (``_1`` = EAR).
EXPERTS = {"pi0": {"": "vlm", "_1": "act"}, "acot": {"": "vlm", "_1": "ear", "_2": "act"}}
_TOP_LINEARS = ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out", "state_proj",
                "action_time_mlp_in", "action_time_mlp_out", "coarse_action_in_proj", "coarse_action_out_proj",
                "coarse_time_mlp_in", "coarse_time_mlp_out", "coarse_action_time_mlp_in", "coarse_action_time_mlp_out",
                "explicit_action_reason_proj", "implicit_action_reason_proj")
_GLUE = ("explicit_action_reasoner", "implicit_action_reasoner_interact", "action_reasoning_fusion")


def _clean(key: str) -> str:
    key = key[len("params/"):] if key.startswith("params/") else key
    return key[: -len("/value")] if key.endswith("/value") else key


def read_jax_tree(src: str | Path) -> dict[str, np.ndarray]:
    """A flattened ``{"a/b/c": array}`` tree from a ``.npz`` file or an orbax checkpoint folder (``params`` or its
    parent step folder)."""
    src = Path(src).expanduser()
    if src.is_file() and src.suffix == ".npz":
        with np.load(src, allow_pickle=False) as z:
            return {_clean(k): np.asarray(z[k]) for k in z.files}
    if src.is_dir():
        npz = sorted(src.glob("*.npz"))
        if len(npz) == 1:
            return read_jax_tree(npz[0])
        folder = src / "params" if (src / "params").is_dir() else src
        try:
            import orbax.checkpoint as ocp
        except ImportError as e:
            raise ImportError(f"{folder}: reading an orbax checkpoint needs orbax-checkpoint: "
                              f"pip install vla-blocks[orbax] (or save the tree as a .npz)") from e
        tree = ocp.PyTreeCheckpointer().restore(str(folder.resolve()))
        out: dict[str, np.ndarray] = {}

        def walk(node, path):
            if isinstance(node, Mapping):
                for k, v in node.items():
                    walk(v, f"{path}/{k}" if path else str(k))
            else:
                out[_clean(path)] = np.asarray(node, dtype=np.float32)
        walk(tree, "")
        return out
    raise FileNotFoundError(f"{src}: expected a .npz of the flattened params tree or an orbax checkpoint folder")


class _Entry:
    __slots__ = ("shape", "make", "target")

    def __init__(self, shape, make, target):
        self.shape, self.make, self.target = tuple(int(v) for v in shape), make, target


def _stack_rules(a: Mapping[str, np.ndarray]):
    """(entry name, torch-layout shape, tensor thunk, target(experts) → key) for every tree entry understood."""
    out: dict[str, _Entry] = {}
    used: set[str] = set()

    def add(name, shape, make, target, *sources):
        out[name] = _Entry(shape, make, target)
        used.update(sources)

    def per_layer(key, layer_shape, fn, target):
        arr = a[key]
        for i in range(arr.shape[0]):
            add(f"{key}[{i}]", layer_shape, (lambda i=i: fn(arr[i])), (lambda ex, i=i: target(ex, i)), key)

    for key, arr in a.items():
        s = arr.shape
        if key.startswith(LLM + "layers/"):
            rest = key[len(LLM + "layers/"):]
            if m := re.fullmatch(r"attn/q_einsum(_\d)?/w", rest):  # (L, H, D, hd): q = einsum(BTD,NDH->BTNH)
                e = m[1] or ""
                per_layer(key, (s[1] * s[3], s[2]), lambda w: w.transpose(0, 2, 1).reshape(-1, w.shape[1]),
                          lambda ex, i, e=e: f"language_model.stack.layers.{i}.experts.{ex[e]}.q_proj.weight")
            elif m := re.fullmatch(r"attn/kv_einsum(_\d)?/w", rest):  # (L, 2, K, D, hd)
                e = m[1] or ""
                for j, part in enumerate(("k", "v")):
                    for i in range(s[0]):
                        add(f"{key}[{i}]:{part}", (s[2] * s[4], s[3]),
                            (lambda i=i, j=j, arr=arr: arr[i, j].transpose(0, 2, 1).reshape(-1, arr.shape[3])),
                            (lambda ex, i=i, e=e, part=part:
                             f"language_model.stack.layers.{i}.experts.{ex[e]}.{part}_proj.weight"), key)
            elif m := re.fullmatch(r"attn/attn_vec_einsum(_\d)?/w", rest):  # (L, H, hd, D): einsum(BTNH,NHD->BTD)
                e = m[1] or ""
                per_layer(key, (s[3], s[1] * s[2]), lambda w: w.reshape(-1, w.shape[2]).T,
                          lambda ex, i, e=e: f"language_model.stack.layers.{i}.experts.{ex[e]}.o_proj.weight")
            elif m := re.fullmatch(r"mlp(_\d)?/gating_einsum", rest):  # (L, 2, D, F): [0] gelu gate, [1] up
                e = m[1] or ""
                for j, part in enumerate(("gate", "up")):
                    for i in range(s[0]):
                        add(f"{key}[{i}]:{part}", (s[3], s[2]), (lambda i=i, j=j, arr=arr: arr[i, j].T),
                            (lambda ex, i=i, e=e, part=part:
                             f"language_model.stack.layers.{i}.experts.{ex[e]}.mlp.{part}_proj.weight"), key)
            elif m := re.fullmatch(r"mlp(_\d)?/linear", rest):  # (L, F, D)
                e = m[1] or ""
                per_layer(key, (s[2], s[1]), lambda w: w.T,
                          lambda ex, i, e=e: f"language_model.stack.layers.{i}.experts.{ex[e]}.mlp.down_proj.weight")
            elif m := re.fullmatch(r"(pre_attention_norm|pre_ffw_norm)(_\d)?/scale", rest):
                e, norm = m[2] or "", {"pre_attention_norm": "input_layernorm",
                                       "pre_ffw_norm": "post_attention_layernorm"}[m[1]]
                per_layer(key, (s[1],), lambda w: w,
                          lambda ex, i, e=e, n=norm: f"language_model.stack.layers.{i}.experts.{ex[e]}.{n}.weight")
            elif m := re.fullmatch(r"(pre_attention_norm|pre_ffw_norm)(_\d)?/Dense_0/(kernel|bias)", rest):
                e, norm = m[2] or "", {"pre_attention_norm": "input_layernorm",
                                       "pre_ffw_norm": "post_attention_layernorm"}[m[1]]
                kernel = m[3] == "kernel"
                per_layer(key, (s[2], s[1]) if kernel else (s[1],), (lambda w: w.T) if kernel else (lambda w: w),
                          lambda ex, i, e=e, n=norm, k=kernel:
                          f"language_model.stack.layers.{i}.experts.{ex[e]}.{n}.dense.{'weight' if k else 'bias'}")
        elif m := re.fullmatch(re.escape(LLM) + r"final_norm(_\d)?/scale", key):
            e = m[1] or ""
            add(key, s, (lambda arr=arr: arr), (lambda ex, e=e: f"language_model.stack.norms.{ex[e]}.weight"), key)
        elif m := re.fullmatch(re.escape(LLM) + r"final_norm(_\d)?/Dense_0/(kernel|bias)", key):
            e, kernel = m[1] or "", m[2] == "kernel"
            add(key, s[::-1] if kernel else s, (lambda arr=arr, k=kernel: arr.T if k else arr),
                (lambda ex, e=e, k=kernel:
                 f"language_model.stack.norms.{ex[e]}.dense.{'weight' if k else 'bias'}"), key)
        elif key == LLM + "embedder/input_embedding":
            add(key, s, (lambda arr=arr: arr), (lambda ex: "language_model.embed_tokens.weight"), key)
        elif key.startswith(IMG):
            _vision(key[len(IMG):], key, arr, add, per_layer)
        elif (m := re.fullmatch(r"(\w+)/(kernel|bias)", key)) and m[1] in _TOP_LINEARS:
            kernel = m[2] == "kernel"
            add(key, s[::-1] if kernel else s, (lambda arr=arr, k=kernel: arr.T if k else arr),
                (lambda ex, n=m[1], k=kernel: f"{n}.{'weight' if k else 'bias'}"), key)
        elif (m := re.fullmatch(r"(\w+)/(q_proj|kv_proj|fc_out)/(kernel|bias)", key)) and m[1] in _GLUE:
            kernel = m[3] == "kernel"
            add(key, s[::-1] if kernel else s, (lambda arr=arr, k=kernel: arr.T if k else arr),
                (lambda ex, g=m[1], p=m[2], k=kernel: f"{g}.{p}.{'weight' if k else 'bias'}"), key)
        elif (m := re.fullmatch(r"(\w+)/attn/out/(kernel|bias)", key)) and m[1] in _GLUE:
            if m[2] == "kernel":  # (heads, h/heads, h)
                add(key, (s[2], s[0] * s[1]), (lambda arr=arr: arr.reshape(-1, arr.shape[2]).T),
                    (lambda ex, g=m[1]: f"{g}.attn.out_proj.weight"), key)
            else:
                add(key, s, (lambda arr=arr: arr), (lambda ex, g=m[1]: f"{g}.attn.out_proj.bias"), key)
        elif m := re.fullmatch(r"implicit_action_reasoner/query_params/(\d+)", key):
            add(key, s, (lambda arr=arr: arr), (lambda ex, n=m[1]: f"implicit_action_reasoner.query_params.{n}"), key)
        elif m := re.fullmatch(r"implicit_action_reasoner/(q_proj|k_proj|v_proj|out_proj)/(\d+)/(kernel|bias)", key):
            kernel = m[3] == "kernel"
            add(key, s[::-1] if kernel else s, (lambda arr=arr, k=kernel: arr.T if k else arr),
                (lambda ex, p=m[1], g=m[2], k=kernel: f"implicit_action_reasoner.{p}.{g}.{'weight' if k else 'bias'}"),
                key)
    # nnx.MultiHeadAttention q / k / v → PyTorch's packed in_proj
    for g in _GLUE:
        for kind in ("kernel", "bias"):
            keys = [f"{g}/attn/{p}/{kind}" for p in ("query", "key", "value")]
            if not all(k in a for k in keys):
                continue
            if kind == "kernel":  # (h, heads, h/heads) each → [h_out, h_in]
                arrs = [a[k] for k in keys]
                shape = (sum(x.shape[1] * x.shape[2] for x in arrs), arrs[0].shape[0])
                add(f"{g}/attn/qkv/kernel", shape,
                    (lambda arrs=arrs: np.concatenate([x.reshape(x.shape[0], -1).T for x in arrs])),
                    (lambda ex, g=g: f"{g}.attn.in_proj_weight"), *keys)
            else:
                arrs = [a[k] for k in keys]
                add(f"{g}/attn/qkv/bias", (sum(x.size for x in arrs),),
                    (lambda arrs=arrs: np.concatenate([x.reshape(-1) for x in arrs])),
                    (lambda ex, g=g: f"{g}.attn.in_proj_bias"), *keys)
    return out, used


def _vision(rest: str, key: str, arr: np.ndarray, add, per_layer):
    s = arr.shape
    V = "vision_tower.model."
    if rest == "embedding/kernel":  # HWIO (p, p, 3, C) → OIHW
        add(key, (s[3], s[2], s[0], s[1]), (lambda: arr.transpose(3, 2, 0, 1)),
            (lambda ex: V + "embeddings.patch_embedding.weight"), key)
    elif rest == "embedding/bias":
        add(key, s, (lambda: arr), (lambda ex: V + "embeddings.patch_embedding.bias"), key)
    elif rest == "pos_embedding":  # (1, N, C)
        add(key, s[-2:], (lambda: arr.reshape(arr.shape[-2], arr.shape[-1])),
            (lambda ex: V + "embeddings.position_embedding.weight"), key)
    elif rest == "head/kernel":
        add(key, s[::-1], (lambda: arr.T), (lambda ex: "multi_modal_projector.linear.weight"), key)
    elif rest == "head/bias":
        add(key, s, (lambda: arr), (lambda ex: "multi_modal_projector.linear.bias"), key)
    elif m := re.fullmatch(r"Transformer/encoder_norm/(scale|bias)", rest):
        add(key, s, (lambda: arr), (lambda ex, p=m[1]: V + f"post_layernorm.{'weight' if p == 'scale' else 'bias'}"),
            key)
    elif m := re.fullmatch(r"Transformer/encoderblock/LayerNorm_([01])/(scale|bias)", rest):
        n, p = f"layer_norm{int(m[1]) + 1}", "weight" if m[2] == "scale" else "bias"
        per_layer(key, s[1:], lambda w: w, lambda ex, i, n=n, p=p: V + f"encoder.layers.{i}.{n}.{p}")
    elif m := re.fullmatch(r"Transformer/encoderblock/MlpBlock_0/Dense_([01])/(kernel|bias)", rest):
        fc, kernel = f"fc{int(m[1]) + 1}", m[2] == "kernel"
        per_layer(key, (s[2], s[1]) if kernel else s[1:], (lambda w: w.T) if kernel else (lambda w: w),
                  lambda ex, i, fc=fc, k=kernel: V + f"encoder.layers.{i}.mlp.{fc}.{'weight' if k else 'bias'}")
    elif m := re.fullmatch(r"Transformer/encoderblock/MultiHeadDotProductAttention_0/(query|key|value|out)/"
                           r"(kernel|bias)", rest):
        proj = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}[m[1]]
        tgt = (lambda ex, i, p=proj, k=m[2]:
               V + f"encoder.layers.{i}.self_attn.{p}.{'weight' if k == 'kernel' else 'bias'}")
        if m[2] == "kernel" and m[1] != "out":  # (L, C, heads, hd): einsum(btd,dnh->btnh)
            per_layer(key, (s[2] * s[3], s[1]), lambda w: w.reshape(w.shape[0], -1).T, tgt)
        elif m[2] == "kernel":  # out (L, heads, hd, C)
            per_layer(key, (s[3], s[1] * s[2]), lambda w: w.reshape(-1, w.shape[2]).T, tgt)
        elif m[1] != "out":  # bias (L, heads, hd)
            per_layer(key, (s[1] * s[2],), lambda w: w.reshape(-1), tgt)
        else:
            per_layer(key, s[1:], lambda w: w, tgt)


class JaxTreeSource:
    """A flattened openpi / ACoT-VLA params tree seen as PyTorch-layout entries (see the module docstring): the
    source :func:`vla_blocks.convert.convert` reads for the ``*-jax`` kinds. ``keys()`` lists the entries and the
    tree keys no rule understands (reported as unmapped); ``raw_shapes`` are the tree's own shapes."""

    def __init__(self, tree: Mapping[str, np.ndarray], label: str = "<tree>"):
        self.label = label
        self.raw_shapes = {k: tuple(int(v) for v in np.shape(a)) for k, a in tree.items()}
        self._entries, used = _stack_rules(tree)
        self.unknown = [k for k in tree if k not in used]
        self.shapes = {k: e.shape for k, e in self._entries.items()}
        self.shapes.update({k: self.raw_shapes[k] for k in self.unknown})

    def keys(self) -> list[str]:
        """Entry names in PyTorch layout, plus the tree keys no rule maps (reported as unmapped)."""
        return list(self.shapes)

    def __contains__(self, key) -> bool:
        return key in self.shapes

    def tensor(self, key: str) -> torch.Tensor:
        """The entry ``key`` as a torch tensor in PyTorch layout (transposed / reshaped from the JAX array)."""
        return torch.from_numpy(np.ascontiguousarray(self._entries[key].make(), dtype=np.float32))

    def key_map(self, experts: Mapping[str, str]) -> Callable[[str], "tuple[str | None, str | None]"]:
        """Entry → target key, with the tree's expert suffixes named by ``experts`` (:data:`EXPERTS`)."""
        def fn(key: str):
            e = self._entries.get(key)
            if e is None:
                return None, None
            try:
                return e.target(experts), None
            except KeyError:  # an expert suffix this recipe does not have (e.g. `_2` in a pi0 tree)
                return None, None
        return fn

    def __repr__(self):
        return self.label


def infer_openpi(shapes: Mapping[str, tuple], acot: bool) -> dict[str, Any]:
    """Recipe fields read off an openpi / ACoT-VLA tree's shapes: the LLM's vocabulary, width, depth, heads, kv heads,
    head_dim and FFN width (from the einsum shapes), each expert's width and FFN width (``_1`` = pi0's action expert
    or ACoT's EAR, ``_2`` = ACoT's action expert), ``pi05`` (adaRMS norms present), the vision tower's width, patch,
    image size, depth, FFN width and heads, ``action_dim`` and pi0's ``state_dim``."""
    s, out = shapes, {}
    L = LLM + "layers/"
    if (emb := s.get(LLM + "embedder/input_embedding")) is not None:
        out["backbone.config.vocab_size"], out["backbone.config.hidden_size"] = emb
    if (q := s.get(L + "attn/q_einsum/w")) is not None:
        out["backbone.config.num_hidden_layers"], out["backbone.config.num_attention_heads"] = q[0], q[1]
        out["backbone.config.head_dim"] = q[3]
    if (kv := s.get(L + "attn/kv_einsum/w")) is not None:
        out["backbone.config.num_key_value_heads"] = kv[2]
    if (g := s.get(L + "mlp/gating_einsum")) is not None:
        out["backbone.config.intermediate_size"] = g[3]
    experts = {"_1": "ear.expert.", "_2": "action_expert."} if acot else {"_1": "action_expert."}
    for suffix, field in experts.items():
        if (q := s.get(L + f"attn/q_einsum{suffix}/w")) is not None:
            out[field + "hidden_size"] = q[2]
        if (g := s.get(L + f"mlp{suffix}/gating_einsum")) is not None:
            out[field + "intermediate_size"] = g[3]
    last = "_2" if acot else "_1"
    if L + f"pre_attention_norm{last}/Dense_0/kernel" in s:
        out["pi05"] = True
    elif L + f"pre_attention_norm{last}/scale" in s:
        out["pi05"] = False
    if (k := s.get(IMG + "embedding/kernel")) is not None:
        out["vision.config.hidden_size"], out["vision.config.patch_size"] = k[3], k[0]
        if (pe := s.get(IMG + "pos_embedding")) is not None:
            side = math.isqrt(pe[-2])
            if side * side == pe[-2]:
                out["vision.config.image_size"] = side * k[0]
    if (d := s.get(IMG + "Transformer/encoderblock/MlpBlock_0/Dense_0/kernel")) is not None:
        out["vision.config.num_hidden_layers"], out["vision.config.intermediate_size"] = d[0], d[2]
    if (qk := s.get(IMG + "Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel")) is not None:
        out["vision.config.num_attention_heads"] = qk[2]
    if (a := s.get("action_in_proj/kernel")) is not None:
        out["action_dim"] = a[0]
    if (st := s.get("state_proj/kernel")) is not None:
        out["state_dim"] = st[0]
    return out
