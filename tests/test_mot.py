"""MoT stack: backbone parity with transformers, a hand-written per-token MoT reference, the prefix cache."""

import math

import pytest
import torch
import torch.nn.functional as F

from vla_blocks.backbones import ExpertSpec, HFCausalLMBackbone, build_language_model
from vla_blocks.layout import Layout, Part, Segment
from vla_blocks.model import create_model
from vla_blocks.mot import ExpertConfig, MoTConfig, MoTStack

from oracles.nn import mot_layer_per_token

BACKBONES = {
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, rope_theta=1e6),
    "llama": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=1, vocab_size=97),
    "gemma": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, vocab_size=97),
}


def text_layout(B, N, experts=("und",)):
    return Layout.from_samples([[Segment.of("causal", "und", N, "text")]] * B, list(experts))


@pytest.mark.parametrize("model_type", list(BACKBONES))
def test_single_expert_stack_reproduces_transformers_logits(model_type):
    bb = HFCausalLMBackbone(model_type=model_type, config=BACKBONES[model_type], seed=3)
    lm = build_language_model(bb, {"und": ExpertSpec()}).eval()
    ref = bb.reference_model().eval()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = ref(ids).logits
        layout = text_layout(2, 11)
        h = lm({"und": lm.embed(ids).reshape(22, -1)}, layout).hidden["und"]
        got = lm.logits(h).view(2, 11, -1)
        assert (got - expect).abs().max() <= 1e-4
        assert expect.std() > 1e-2  # not a degenerate comparison
        # with the cache: prefix of 7 tokens, then the last 4 as a suffix pass, then token-by-token decoding
        pre = layout.tokens(0, 7)
        out = lm({"und": lm.embed(ids[:, :7]).reshape(14, -1)}, pre, return_kv=True)
        cache = out.cache(pre)
        suf = lm({"und": lm.embed(ids[:, 7:]).reshape(8, -1)}, layout, start=7, cache=cache).hidden["und"]
        assert (lm.logits(suf).view(2, 4, -1) - expect[:, 7:]).abs().max() <= 1e-4
        for t in range(7, 11):
            lay = text_layout(2, t + 1)
            step = lm({"und": lm.embed(ids[:, t:t + 1]).reshape(2, -1)}, lay, start=t, cache=cache, return_kv=True)
            cache.append(step.keys, step.values, lay)
            assert (lm.logits(step.hidden["und"]) - expect[:, t]).abs().max() <= 1e-4
        assert cache.length == 11


def hf_state_from_expert(lm, expert="und"):
    """Our backbone expert's weights under transformers' causal-LM names (the inverse of the import)."""
    out = {"model.embed_tokens.weight": lm.embed_tokens.weight, "model.norm.weight": lm.stack.norms[expert].weight}
    if lm.lm_head is not None:
        out["lm_head.weight"] = lm.lm_head.weight
    for i, layer in enumerate(lm.stack.layers):
        for name, t in layer.experts[expert].state_dict().items():
            attn = name.split(".")[0] in ("q_proj", "k_proj", "v_proj", "o_proj")
            out[f"model.layers.{i}.{'self_attn.' if attn else ''}{name}"] = t
    return out


@pytest.mark.parametrize("model_type", ["llama", "gemma"])
def test_backbone_swap_is_one_recipe_line(model_type):
    """Swapping mot-tiny's Qwen2 backbone for another family by recipe keys gives that family's network: with our
    expert's weights loaded into a fresh transformers model of that family, the text loss is transformers' CE."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(BACKBONES[model_type], vocab_size=256)
    m = create_model("mot-tiny", **{"backbone.model_type": model_type, "backbone.config": cfg,
                                    "backbone.qk_norm": False, "experts.act.hidden_size": 16}).eval()
    assert m.lm.stack.cfg.experts["act"].hidden_size == 16 and m.lm.embed_tokens.num_embeddings == 256
    # the oracle: transformers' own model of the family (its activation, norm and embedding conventions)
    ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **m.config.backbone.config)).eval()
    missing, unexpected = ref.load_state_dict(hf_state_from_expert(m.lm), strict=False)
    assert not unexpected and all("lm_head" in k or "rotary" in k for k in missing), (missing, unexpected)
    # one row: mot_lm's next_token_pairs pairs the last token of a row with the first of the next when two
    # unpadded rows of text follow each other (seg_id restarts per row), a separate bug reported to the lead
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    batch = {"layout": text_layout(1, 12, m.experts), "input_ids": ids.reshape(-1), "embeds": {}}
    with torch.no_grad():
        loss, metrics = m(batch)
        logits = ref(ids).logits
    expect = F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    assert metrics["text_tokens"] == 11
    assert abs(loss.item() - expect.item()) <= 1e-4
    assert math.isfinite(m(m.demo_batch())[0].item())  # and the three-expert demo batch runs


# ------------------------------------------------------------------ per-token MoT reference (oracles.nn)
def three_expert_config():
    return MoTConfig(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=100.0, experts={
        "und": ExpertConfig(24, 40, qkv_bias=True, qk_norm=True),
        "gen": ExpertConfig(16, 24, norm="gemma_rms", ffn_act="gelu_tanh"),
        "act": ExpertConfig(12, 20, norm="gemma_rms", adarms_cond_dim=6),
    })


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def mixed_layout():
    s1 = [Segment.of("full", "gen", 3, "img", rope="block"),
          Segment("causal", [Part("und", 4, "text")]),
          Segment("noise", [Part("und", 1, "ms"), Part("act", 3, "act"), Part("und", 1, "me")], rope="block_hold")]
    s2 = [Segment.of("causal", "und", 2, "text2", valid=[1, 0]), Segment.of("noise", "act", 2, "act2")]
    return Layout.from_samples([s1, s2], ["und", "gen", "act"], pack=True, pad_to=20)


def test_mot_layer_matches_per_token_reference():
    cfg = three_expert_config()
    stack = MoTStack(cfg).double()
    randomize(stack)
    layout = mixed_layout()
    g = torch.Generator().manual_seed(5)
    widths = {e: c.hidden_size for e, c in cfg.experts.items()}
    idx = layout.expert_indices()
    hidden = {e: torch.randn(i.numel(), widths[e], generator=g, dtype=torch.float64) for e, i in idx.items()}
    cond = {"act": torch.randn(idx["act"].numel(), 6, generator=g, dtype=torch.float64)}
    routing_out = stack.layers[0]
    from vla_blocks.mot import Routing, rope_cos_sin
    r = Routing.from_layout(layout)
    cos, sin = rope_cos_sin(layout.position_ids, 8, 100.0, torch.float64)
    got, _, _ = routing_out(hidden, r, layout.mask_meta(), cos, sin, None, cond)
    # per-token reference over valid, non-padding tokens
    flat_e = layout.expert_id[0].tolist()
    names = layout.experts
    tokens = [i for i, e in enumerate(flat_e) if e >= 0]
    x_tok, expert_of, cond_tok = [], [], []
    for i in tokens:
        e = names[flat_e[i]]
        j = int((idx[e] == i).nonzero())
        x_tok.append(hidden[e][j])
        expert_of.append(e)
        cond_tok.append(cond[e][j] if e in cond else None)
    mask = layout.dense_mask()[0][tokens][:, tokens]
    ref = mot_layer_per_token(stack.layers[0], cfg, x_tok, expert_of, layout.position_ids[0][tokens].double(), mask,
                              cond_tok)
    for t, i in enumerate(tokens):
        e = expert_of[t]
        j = int((idx[e] == i).nonzero())
        torch.testing.assert_close(got[e][j], ref[t], atol=1e-9, rtol=1e-9)


def test_suffix_passes_leave_cache_unchanged_and_match_recompute():
    cfg = three_expert_config()
    cfg.num_layers = 3
    stack = MoTStack(cfg)
    randomize(stack, 1)
    stack.eval()
    layout = mixed_layout()
    P = 7  # row 0's image+text prefix (the tokens before its noise segment)
    g = torch.Generator().manual_seed(2)
    widths = {e: c.hidden_size for e, c in cfg.experts.items()}
    full_idx = layout.expert_indices()
    hidden = {e: torch.randn(i.numel(), widths[e], generator=g) for e, i in full_idx.items()}
    cond = {"act": torch.randn(full_idx["act"].numel(), 6, generator=g)}
    with torch.no_grad():
        full = stack(hidden, layout, cond=cond).hidden
        pre, suf = layout.tokens(0, P), layout.tokens(P)

        def split(h, sub):
            out = {}
            for e, i in sub.expert_indices().items():
                if e not in h:
                    continue
                # flat indices of the sub-layout -> positions in the full expert tensor
                n = layout.seq_len
                b, t = i // sub.seq_len, i % sub.seq_len
                start = P if sub is suf else 0
                full_flat = b * n + t + start
                out[e] = h[e][torch.searchsorted(full_idx[e], full_flat)]
            return out

        cache = stack(split(hidden, pre), pre, return_kv=True).cache(pre)
        snapshot = [k.clone() for k in cache.keys] + [v.clone() for v in cache.values]
        sc = split(cond, suf)
        for _ in range(3):
            out = stack(split(hidden, suf), layout, start=P, cache=cache, cond=sc).hidden
            expect = split(full, suf)
            for e in out:
                torch.testing.assert_close(out[e], expect[e], atol=1e-5, rtol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(cache.keys + cache.values, snapshot))
        assert cache.length == P


def test_gradients_flow_through_the_cache():
    cfg = three_expert_config()
    stack = MoTStack(cfg)
    randomize(stack, 4)
    layout = Layout.from_samples([[Segment.of("full", "und", 5, "p"), Segment.of("noise", "act", 3, "a")]], ["und", "gen", "act"])
    x_p = torch.randn(5, 24, requires_grad=True)
    x_a = torch.randn(3, 12)
    full = stack({"und": x_p, "act": x_a}, layout).hidden["act"].pow(2).sum()
    g_full = torch.autograd.grad(full, [x_p] + list(stack.parameters()), allow_unused=True)
    pre = layout.tokens(0, 5)
    cache = stack({"und": x_p}, pre, return_kv=True).cache(pre)
    two = stack({"act": x_a}, layout, start=5, cache=cache).hidden["act"].pow(2).sum()
    g_two = torch.autograd.grad(two, [x_p] + list(stack.parameters()), allow_unused=True)
    assert g_full[0].abs().sum() > 0
    for a, b in zip(g_full, g_two):
        if a is None or b is None:
            assert (a is None or not a.abs().sum()) and (b is None or not b.abs().sum())
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_copy_init_slices_into_narrower_expert():
    bb = HFCausalLMBackbone(model_type="qwen2", config=BACKBONES["qwen2"], qk_norm=True)
    lm = build_language_model(bb, {"und": ExpertSpec(), "act": ExpertSpec(hidden_size=16, ffn_ratio=0.5)})
    u = lm.stack.layers[1].experts["und"]
    a = lm.stack.layers[1].experts["act"]
    assert a.mlp.gate_proj.weight.shape == (32, 16)
    assert torch.equal(a.mlp.gate_proj.weight, u.mlp.gate_proj.weight[:32, :16])
    assert torch.equal(a.q_proj.bias, u.q_proj.bias)
    assert torch.equal(a.q_norm.weight, torch.ones(8))  # q/k norm added at ones (BAGEL)


def test_stack_rejects_mismatched_inputs():
    stack = MoTStack(three_expert_config())
    layout = mixed_layout()
    with pytest.raises(ValueError, match="active experts"):
        stack({"und": torch.randn(8, 24)}, layout)
    with pytest.raises(ValueError, match="cache"):
        stack({"act": torch.randn(3, 12)}, layout, start=8)
    with pytest.raises(ValueError, match="num_kv_heads"):
        MoTConfig(1, 4, 3, 8, {"a": ExpertConfig(8, 8)})


def test_activation_checkpointing_per_layer_gives_identical_gradients():
    cfg = three_expert_config()
    cfg.num_layers = 2
    stack = MoTStack(cfg)
    randomize(stack, 7)
    layout = mixed_layout()
    g = torch.Generator().manual_seed(3)
    idx = layout.expert_indices()
    hidden = {e: torch.randn(i.numel(), cfg.experts[e].hidden_size, generator=g) for e, i in idx.items()}
    cond = {"act": torch.randn(idx["act"].numel(), 6, generator=g)}
    grads = []
    for ckpt in (False, True):
        stack.cfg.gradient_checkpointing = ckpt
        stack.zero_grad()
        out = stack(hidden, layout, cond=cond).hidden
        sum(v.pow(2).sum() for v in out.values()).backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in stack.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_backbone_from_a_local_transformers_checkpoint(tmp_path):
    """``backbone.pretrained`` reads a local transformers folder (config and weights, no download)."""
    src = HFCausalLMBackbone(model_type="llama", config=BACKBONES["llama"], seed=11).reference_model()
    src.save_pretrained(tmp_path / "llama")
    bb = HFCausalLMBackbone(model_type="llama", pretrained=str(tmp_path / "llama"))
    lm = build_language_model(bb, {"und": ExpertSpec(), "act": ExpertSpec(hidden_size=16)}).eval()
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    layout = Layout.from_samples([[Segment.of("causal", "und", 9, "text")]], ["und", "act"])
    with torch.no_grad():
        got = lm.logits(lm({"und": lm.embed(ids)[0]}, layout).hidden["und"])
        assert (got - src(ids).logits[0]).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="is a 'llama' model"):
        HFCausalLMBackbone(model_type="qwen2", pretrained=str(tmp_path / "llama")).spec()


def test_prefix_cache_append_buffers_without_grad_and_concatenates_with_grad():
    from vla_blocks.mot import PrefixCache
    g = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    steps = [(torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 2, n, 4, generator=g)) for n in (1, 3, 1, 70)]
    with torch.no_grad():
        c = PrefixCache([k0.clone()], [v0.clone()])
        ks, vs = [k0], [v0]
        for k, v in steps:
            c.append([k], [v])
            ks.append(k)
            vs.append(v)
            assert torch.equal(c.keys[0], torch.cat(ks, 2)) and torch.equal(c.values[0], torch.cat(vs, 2))
        clone = c.clone()
        c.append([steps[0][0]], [steps[0][1]])
        assert clone.length == c.length - 1 and torch.equal(clone.keys[0], torch.cat(ks, 2))
    kg = k0.clone().requires_grad_()
    c = PrefixCache([kg], [v0])
    c.append([steps[0][0]], [steps[0][1]])
    c.keys[0].sum().backward()
    assert torch.equal(kg.grad, torch.ones_like(kg))


def test_next_token_pairs_never_cross_rows():
    from vla_blocks.layout import Layout, Segment
    from vla_blocks.models.mot_lm import next_token_pairs
    layout = Layout.from_samples([[Segment.of("causal", "und", 9, "text")]] * 2, ["und"])
    src, tgt = next_token_pairs(layout)
    assert src.numel() == 16  # 8 pairs per row of 9 tokens, none from row 0's last token to row 1's first
    assert not any(int(s) == 8 for s in src)
