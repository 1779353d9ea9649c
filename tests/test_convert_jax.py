"""openpi / ACoT-VLA JAX params trees → the pi0 / pi0.5 / ACoT recipes (issue 14 item 9): synthetic trees with the
real flattened names (acot_pi0.md §2.4) at tiny shapes, every converted module checked against the JAX-layout
formula of the tree it came from (tests/oracles/openpi.py), and the full-size names and shapes on the meta device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oracles.openpi import (big_vision_patches, gemma_attn_vec, gemma_gating, gemma_kv, gemma_q, mha_in, mha_out,
                            nnx_linear)
from vla_blocks.convert import CONVERTERS, ConversionError, check_mapping, convert
from vla_blocks.model import VLAModel

P, IMG = "PaliGemma/llm/", "PaliGemma/img/"


def openpi_tree(mode: str, *, L=2, D=32, H=2, K=1, HD=16, F=64, V=128, W=16, FW=32, A=8, C=16, CF=32, CL=1, CH=2,
                patch=14, positions=4, agp_heads=2, iar_groups=2, seed=0, full=False) -> dict[str, np.ndarray]:
    """A flattened openpi (``mode`` pi0 / pi05) or ACoT-VLA (acot, pi0.5 mode) params tree with the upstream names;
    ``full``: zero-stride stand-ins (for names-and-shapes checks at full size)."""
    rng = np.random.default_rng(seed)

    def r(*s):
        if full:
            return np.broadcast_to(np.float32(0), s)
        return (rng.standard_normal(s) * 0.2).astype(np.float32)

    t = {P + "embedder/input_embedding": r(V, D)}
    experts = {"": (D, F), "_1": (W, FW)}
    if mode == "acot":
        experts["_2"] = (W, FW)
    for sfx, (w, fw) in experts.items():
        t[P + f"layers/attn/q_einsum{sfx}/w"] = r(L, H, w, HD)
        t[P + f"layers/attn/kv_einsum{sfx}/w"] = r(L, 2, K, w, HD)
        t[P + f"layers/attn/attn_vec_einsum{sfx}/w"] = r(L, H, HD, w)
        t[P + f"layers/mlp{sfx}/gating_einsum"] = r(L, 2, w, fw)
        t[P + f"layers/mlp{sfx}/linear"] = r(L, fw, w)
        ada = sfx != "" and mode != "pi0"
        for n in ("pre_attention_norm", "pre_ffw_norm"):
            if ada:
                t[P + f"layers/{n}{sfx}/Dense_0/kernel"] = r(L, w, 3 * w)
                t[P + f"layers/{n}{sfx}/Dense_0/bias"] = r(L, 3 * w)
            else:
                t[P + f"layers/{n}{sfx}/scale"] = r(L, w)
        if ada:
            t[P + f"final_norm{sfx}/Dense_0/kernel"], t[P + f"final_norm{sfx}/Dense_0/bias"] = r(w, 3 * w), r(3 * w)
        else:
            t[P + f"final_norm{sfx}/scale"] = r(w)
    E = IMG + "Transformer/encoderblock/"
    t.update({IMG + "embedding/kernel": r(patch, patch, 3, C), IMG + "embedding/bias": r(C),
              IMG + "pos_embedding": r(1, positions, C), IMG + "head/kernel": r(C, D), IMG + "head/bias": r(D),
              IMG + "Transformer/encoder_norm/scale": r(C), IMG + "Transformer/encoder_norm/bias": r(C),
              E + "LayerNorm_0/scale": r(CL, C), E + "LayerNorm_0/bias": r(CL, C),
              E + "LayerNorm_1/scale": r(CL, C), E + "LayerNorm_1/bias": r(CL, C),
              E + "MlpBlock_0/Dense_0/kernel": r(CL, C, CF), E + "MlpBlock_0/Dense_0/bias": r(CL, CF),
              E + "MlpBlock_0/Dense_1/kernel": r(CL, CF, C), E + "MlpBlock_0/Dense_1/bias": r(CL, C)})
    for p in ("query", "key", "value"):
        t[E + f"MultiHeadDotProductAttention_0/{p}/kernel"] = r(CL, C, CH, C // CH)
        t[E + f"MultiHeadDotProductAttention_0/{p}/bias"] = r(CL, CH, C // CH)
    t[E + "MultiHeadDotProductAttention_0/out/kernel"] = r(CL, CH, C // CH, C)
    t[E + "MultiHeadDotProductAttention_0/out/bias"] = r(CL, C)

    def lin(name, i, o):
        t[f"{name}/kernel"], t[f"{name}/bias"] = r(i, o), r(o)

    lin("action_in_proj", A, W)
    lin("action_out_proj", W, A)
    if mode == "pi0":
        lin("state_proj", A, W)
        lin("action_time_mlp_in", 2 * W, W)
        lin("action_time_mlp_out", W, W)
    else:
        lin("time_mlp_in", W, W)
        lin("time_mlp_out", W, W)
    if mode == "acot":
        lin("coarse_action_in_proj", A, W)
        lin("coarse_action_out_proj", W, A)
        lin("coarse_time_mlp_in", W, W)
        lin("coarse_time_mlp_out", W, W)
        lin("explicit_action_reason_proj", D, W)
        lin("implicit_action_reason_proj", D, W)
        for g, q_in, kv_in in (("explicit_action_reasoner", W, W), ("implicit_action_reasoner_interact", W, W),
                               ("action_reasoning_fusion", 2 * W, 2 * W)):
            lin(f"{g}/q_proj", q_in, W)
            lin(f"{g}/kv_proj", kv_in, 2 * W)
            lin(f"{g}/fc_out", W, W)
            for p in ("query", "key", "value"):
                t[f"{g}/attn/{p}/kernel"], t[f"{g}/attn/{p}/bias"] = r(W, agp_heads, W // agp_heads), \
                    r(agp_heads, W // agp_heads)
            t[f"{g}/attn/out/kernel"], t[f"{g}/attn/out/bias"] = r(agp_heads, W // agp_heads, W), r(W)
        for layer in range(L):
            t[f"implicit_action_reasoner/query_params/{layer}"] = r(1, HD)
        for gi in range(iar_groups):
            for p, (i, o) in {"q_proj": (HD, HD // 2), "k_proj": (HD, HD // 2), "v_proj": (HD, HD // 2),
                              "out_proj": (HD // 2, W)}.items():
                lin(f"implicit_action_reasoner/{p}/{gi}", i, o)
    return t


def _save(tree, path):
    np.savez(path, **{"params/" + k + "/value": v for k, v in tree.items()})  # NNX-style names, stripped on load
    return path


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def check_llm(model, tree, experts, L):
    g = np.random.default_rng(1)
    stack = model.language_model.stack
    for sfx, e in experts.items():
        for i in range(L):
            ex = stack.layers[i].experts[e]
            w = tree[P + f"layers/attn/q_einsum{sfx}/w"][i]
            x = g.standard_normal((3, w.shape[1])).astype(np.float32)
            with torch.no_grad():
                q = ex.q_proj(_t(x)).view(3, w.shape[0], -1).numpy()
                k = ex.k_proj(_t(x)).view(3, -1, w.shape[2]).numpy()
                v = ex.v_proj(_t(x)).view(3, -1, w.shape[2]).numpy()
            np.testing.assert_allclose(q, gemma_q(x, w), atol=1e-5)
            k_ref, v_ref = gemma_kv(x, tree[P + f"layers/attn/kv_einsum{sfx}/w"][i])
            np.testing.assert_allclose(k, k_ref, atol=1e-5)
            np.testing.assert_allclose(v, v_ref, atol=1e-5)
            enc = g.standard_normal(q.shape).astype(np.float32)
            with torch.no_grad():
                o = ex.o_proj(_t(enc.reshape(3, -1))).numpy()
            np.testing.assert_allclose(o, gemma_attn_vec(enc, tree[P + f"layers/attn/attn_vec_einsum{sfx}/w"][i]),
                                       atol=1e-5)
            gate_ref, up_ref = gemma_gating(x, tree[P + f"layers/mlp{sfx}/gating_einsum"][i])
            with torch.no_grad():
                np.testing.assert_allclose(ex.mlp.gate_proj(_t(x)).numpy(), gate_ref, atol=1e-5)
                np.testing.assert_allclose(ex.mlp.up_proj(_t(x)).numpy(), up_ref, atol=1e-5)
                h = g.standard_normal(gate_ref.shape).astype(np.float32)
                np.testing.assert_allclose(ex.mlp.down_proj(_t(h)).numpy(),
                                           nnx_linear(h, tree[P + f"layers/mlp{sfx}/linear"][i]), atol=1e-5)
            for n, ours in (("pre_attention_norm", ex.input_layernorm), ("pre_ffw_norm", ex.post_attention_layernorm)):
                dense = P + f"layers/{n}{sfx}/Dense_0/kernel"
                if dense in tree:  # adaRMS modulation: cond @ kernel + bias (scale, shift, gate)
                    c = g.standard_normal((2, tree[dense].shape[1])).astype(np.float32)
                    with torch.no_grad():
                        np.testing.assert_allclose(ours.dense(_t(c)).numpy(), nnx_linear(
                            c, tree[dense][i], tree[P + f"layers/{n}{sfx}/Dense_0/bias"][i]), atol=1e-5)
                else:
                    assert torch.equal(ours.weight, _t(tree[P + f"layers/{n}{sfx}/scale"][i]))


def check_vision(model, tree):
    g = np.random.default_rng(2)
    vt = model.vision_tower.model
    k = tree[IMG + "embedding/kernel"]
    img = g.standard_normal((2 * k.shape[0], 2 * k.shape[0], 3)).astype(np.float32)
    with torch.no_grad():
        ours = vt.embeddings.patch_embedding(_t(img).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, big_vision_patches(img, k, tree[IMG + "embedding/bias"]), atol=1e-4)
    E = IMG + "Transformer/encoderblock/MultiHeadDotProductAttention_0/"
    layer = vt.encoder.layers[0].self_attn
    x = g.standard_normal((3, k.shape[3])).astype(np.float32)
    for p, ours in (("query", layer.q_proj), ("key", layer.k_proj), ("value", layer.v_proj)):
        kern = tree[E + f"{p}/kernel"][0]
        with torch.no_grad():
            got = ours(_t(x)).view(3, kern.shape[1], -1).numpy()
        np.testing.assert_allclose(got, mha_in(x, kern, tree[E + f"{p}/bias"][0]), atol=1e-5)
    y = g.standard_normal((3,) + tree[E + "out/kernel"].shape[1:3]).astype(np.float32)
    with torch.no_grad():
        got = layer.out_proj(_t(y.reshape(3, -1))).numpy()
    np.testing.assert_allclose(got, mha_out(y, tree[E + "out/kernel"][0], tree[E + "out/bias"][0]), atol=1e-5)
    h = g.standard_normal((3, k.shape[3])).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(model.multi_modal_projector.linear(_t(h)).numpy(),
                                   nnx_linear(h, tree[IMG + "head/kernel"], tree[IMG + "head/bias"]), atol=1e-5)


@pytest.mark.parametrize("mode", ["pi0", "pi05"])
def test_openpi_tree_converts_to_the_pi_recipes(mode, tmp_path):
    tree = openpi_tree(mode)
    out, report = convert(f"{mode}-jax", _save(tree, tmp_path / "params.npz"), tmp_path / "out", recipe=f"{mode}-tiny")
    assert not report.unmapped and not report.missing
    model = VLAModel.from_pretrained(out)
    assert model.config.flow.numerics == "jax"  # converted JAX checkpoints default to JAX numerics
    check_llm(model, tree, {"": "vlm", "_1": "act"}, 2)
    check_vision(model, tree)
    g = np.random.default_rng(3)
    for name in (["state_proj", "action_time_mlp_in", "action_time_mlp_out"] if mode == "pi0"
                 else ["time_mlp_in", "time_mlp_out"]) + ["action_in_proj", "action_out_proj"]:
        x = g.standard_normal((2, tree[f"{name}/kernel"].shape[0])).astype(np.float32)
        with torch.no_grad():
            np.testing.assert_allclose(getattr(model, name)(_t(x)).numpy(),
                                       nnx_linear(x, tree[f"{name}/kernel"], tree[f"{name}/bias"]), atol=1e-5)
    batch = model.demo_batch(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model.predict_action_chunk(batch)).all()


def test_acot_tree_converts_with_ear_and_action_experts(tmp_path):
    tree = openpi_tree("acot", L=4)
    out, report = convert("acot-jax", _save(tree, tmp_path / "params.npz"), tmp_path / "out", recipe="acot-tiny")
    assert not report.unmapped and not report.missing
    model = VLAModel.from_pretrained(out)
    check_llm(model, tree, {"": "vlm", "_1": "ear", "_2": "act"}, 4)
    g = np.random.default_rng(4)
    for gname in ("explicit_action_reasoner", "implicit_action_reasoner_interact", "action_reasoning_fusion"):
        mod = getattr(model, gname)
        W = tree[f"{gname}/fc_out/kernel"].shape[0]
        x = g.standard_normal((3, W)).astype(np.float32)
        with torch.no_grad():
            qkv = torch.nn.functional.linear(_t(x), mod.attn.in_proj_weight, mod.attn.in_proj_bias).numpy()
        for j, p in enumerate(("query", "key", "value")):
            ref = mha_in(x, tree[f"{gname}/attn/{p}/kernel"], tree[f"{gname}/attn/{p}/bias"]).reshape(3, -1)
            np.testing.assert_allclose(qkv[:, j * W:(j + 1) * W], ref, atol=1e-5)
        y = g.standard_normal((3,) + tree[f"{gname}/attn/out/kernel"].shape[:2]).astype(np.float32)
        with torch.no_grad():
            got = mod.attn.out_proj(_t(y.reshape(3, -1))).numpy()
        np.testing.assert_allclose(got, mha_out(y, tree[f"{gname}/attn/out/kernel"], tree[f"{gname}/attn/out/bias"]),
                                   atol=1e-5)
    iar = model.implicit_action_reasoner
    assert torch.equal(iar.query_params[3], _t(tree["implicit_action_reasoner/query_params/3"]))
    x = g.standard_normal((2, 16)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(iar.k_proj[1](_t(x)).numpy(), nnx_linear(
            x, tree["implicit_action_reasoner/k_proj/1/kernel"], tree["implicit_action_reasoner/k_proj/1/bias"]),
            atol=1e-5)
    batch = model.demo_batch(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model.predict_action_chunk(batch)).all()


def test_jax_trees_are_strict_and_name_the_wrong_kind(tmp_path):
    tree = openpi_tree("pi05")
    with pytest.raises(ConversionError, match="convert it as `pi05-jax`"):
        convert("pi0-jax", _save(tree, tmp_path / "a.npz"), tmp_path / "x", recipe="pi0-tiny")
    tree["PaliGemma/llm/some_new_module/w"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ConversionError, match="some_new_module"):
        convert("pi05-jax", _save(tree, tmp_path / "b.npz"), tmp_path / "y", recipe="pi05-tiny")
    with pytest.raises(ConversionError, match="action_dim: tensors=8, override=16"):
        convert("pi05-jax", tmp_path / "a.npz", tmp_path / "z", recipe="pi05-tiny", overrides={"action_dim": 16})


@pytest.mark.parametrize("kind,recipe", [("pi05-jax", "pi05"), ("acot-jax", "acot-libero")])
def test_full_size_openpi_and_acot_trees_map_onto_the_full_recipes(kind, recipe):
    """openpi pi05_base / ACoT-VLA LIBERO shapes (Gemma-2B 18 layers 8/1 heads of 256, gemma_300m experts, SigLIP
    So400m/14 at 224 px, acot_pi0.md §1.1, §2.4) cover the full recipe exactly (names and shapes; meta device)."""
    mode = "acot" if kind == "acot-jax" else "pi05"
    tree = openpi_tree(mode, full=True, L=18, D=2048, H=8, K=1, HD=256, F=16384, V=257152, W=1024, FW=4096, A=32,
                       C=1152, CF=4304, CL=27, CH=16, positions=256, agp_heads=4, iar_groups=6)
    report = check_mapping(kind, {k: v.shape for k, v in tree.items()}, recipe=recipe)
    assert not report.unmapped and not report.missing
    assert report.inferred["backbone.config.head_dim"] == 256 and report.inferred["vision.config.image_size"] == 224
    assert CONVERTERS[kind].defaults == {"flow.numerics": "jax"}
