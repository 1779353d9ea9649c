"""HALO: sequence plans, mask and RoPE against the BAGEL reference, losses, inference chain, guidance, contexts."""

from __future__ import annotations

import pytest
import torch

from vla_blocks.flow import time_grid
from vla_blocks.layout import Layout, Segment
from vla_blocks.model import create_model, model_config
from vla_blocks.models.halo import (ContextItem, HaloContext, HaloSample, format_prompt, format_thought, pack_rows,
                                    synthetic_sample)
from vla_blocks.tokenization import SPECIAL_TOKENS, TokenizerConfig, _raw_byte_tokenizer, build_offline_tokenizer

from oracles import halo as halo_oracle
from oracles.bagel import guided_euler, prepare_attention_mask_per_sample

# halo-tiny geometry for 32×32 frames: ViT patch 8, ≤ 16 patches → 4×4 tokens; VAE ×8 and 2×2 patches → 2×2 tokens
VIT, LAT, CHUNK, A = 16, 4, 16, 14


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("halo-tiny")


@pytest.fixture(scope="module")
def model():
    return _model().eval()


def _samples(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [synthetic_sample("emcot", A, CHUNK, 32, g), synthetic_sample("reactive", A, CHUNK, 32, g),
            synthetic_sample("emcot", A, CHUNK, 32, g)]


def reference_splits(sample: HaloSample, tok):
    """The hand-counted splits of ``sample``'s plan (oracles.halo.splits) at halo-tiny's geometry."""
    thought = None if sample.thought is None else len(tok.encode(sample.thought))
    return halo_oracle.splits(len(sample.history), len(tok.encode(format_prompt(sample.instruction))), thought,
                              VIT, LAT, CHUNK)


# ---------------------------------------------------------------------------------------------- tokenizer
def test_offline_tokenizer_bytes_and_special_tokens():
    tok = TokenizerConfig(kind="byte").build()
    text = "pick up the cup — é"
    assert tok.encode(text) == list(text.encode("utf-8"))  # id = byte value
    assert [tok.token_id(s) for s in SPECIAL_TOKENS] == list(range(256, 256 + len(SPECIAL_TOKENS)))
    assert tok.decode(tok.encode(text) + [tok.eos_id]) == text
    assert tok.decode([tok.bos_id], skip_special_tokens=False) == "<|im_start|>"


def test_local_qwen2_style_tokenizer_gets_action_tokens_appended(tmp_path):
    # a local tokenizer.json that, like Qwen2.5's, has the vision markers but no action markers
    _raw_byte_tokenizer(SPECIAL_TOKENS[:5]).save(str(tmp_path / "tokenizer.json"))
    tok = TokenizerConfig(path=str(tmp_path)).build()
    assert tok.source.startswith("qwen2:")
    assert (tok.vision_start_id, tok.vision_end_id) == (259, 260)  # kept
    assert (tok.action_start_id, tok.action_end_id) == (261, 262)  # appended after the existing ids
    with pytest.raises(FileNotFoundError):
        TokenizerConfig(path=str(tmp_path / "missing"), kind="qwen2").build()
    assert TokenizerConfig(path=str(tmp_path / "missing")).build().source == "byte"  # auto falls back


def test_bpe_tokenizer_learned_offline_shortens_thoughts():
    thought = format_thought(["move the red block"], "move the red block", "down left", "stay")
    tok = build_offline_tokenizer([thought] * 4, vocab_size=300)
    ids = tok.encode(thought)
    assert tok.decode(ids) == thought
    assert len(ids) < len(thought.encode()) // 2


# ---------------------------------------------------------------------------------------------- plans, mask, RoPE
def test_packed_emcot_mask_matches_bagel_per_sample_mask(model):
    samples = _samples()
    batch = model.collate(samples, max_tokens=1000, pad=True)
    layout: Layout = batch["layout"]
    assert batch["rows"] == [[0, 1, 2]]
    splits = [reference_splits(s, model.tokenizer) for s in samples]
    blocks = [prepare_attention_mask_per_sample([n for n, _, _ in sp], [m for _, m, _ in sp]) for sp in splits]
    expected = torch.zeros(1000, 1000, dtype=torch.bool)
    a = 0
    for b in blocks:  # documents: block-diagonal, padding attends nothing and is never attended
        expected[a:a + len(b), a:a + len(b)] = b
        a += len(b)
    assert a < 1000
    assert torch.equal(layout.dense_mask()[0], expected)


def test_rope_ids_and_routing_follow_reference_tables(model):
    samples = _samples()
    batch = model.collate(samples)
    layout = batch["layout"]
    rope, experts = [], []
    for s in samples:
        sp = reference_splits(s, model.tokenizer)
        rope += halo_oracle.rope_ids(sp)  # restarts at 0 for every document
        experts += halo_oracle.experts(sp)
    assert layout.position_ids[0].tolist() == rope
    assert [layout.experts[i] for i in layout.expert_id[0].tolist()] == experts


def test_text_targets_give_ce_on_the_thought_only(model):
    s = _samples()[0]
    batch = model.collate([s])
    tok = model.tokenizer
    th = tok.encode(s.thought)
    ids, tg = batch["input_ids"].tolist(), batch["text_targets"].tolist()
    # text tokens in layout order: 2 markers per history image, the prompt, then the thought
    k = ids.index(tok.bos_id, ids.index(tok.bos_id) + 1)  # the thought's <|im_start|>
    assert ids[k:k + len(th) + 2] == [tok.bos_id] + th + [tok.eos_id]
    assert tg[k:k + len(th) + 2] == th + [tok.eos_id, -100]
    assert sum(t >= 0 for t in tg) == len(th) + 1


def test_pack_rows_respects_the_token_budget(model):
    assert pack_rows([5, 4, 3, 6, 1], 9) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        pack_rows([10], 9)
    samples = _samples() + _samples(1)
    lens = [sum(n for n, _, _ in reference_splits(s, model.tokenizer)) for s in samples]
    budget = max(lens) + min(lens)
    batch = model.collate(samples, max_tokens=budget, pad=True)
    assert batch["rows"] == pack_rows(lens, budget)
    lay = batch["layout"]
    assert lay.seq_len == budget and lay.batch_size == len(batch["rows"])
    for b, row in enumerate(batch["rows"]):
        starts = lay.doc_offsets[b]
        assert [int(lay.position_ids[b, s]) for s in starts] == [0] * len(row)  # positions restart per document
        assert int(lay.valid[b].sum()) == sum(lens[i] for i in row)


# ---------------------------------------------------------------------------------------------- training forward
def test_packing_does_not_change_the_losses(model):
    """Packed documents (one row) and one row per sample give the same per-token losses with the same noise."""
    samples = _samples()
    m_packed = model(dict(model.collate(samples), seed=3))[1]
    m_rows = model(dict(model.collate(samples, pack=False), seed=3))[1]
    for k in ("ce", "mse", "l1"):
        assert torch.allclose(m_packed[k], m_rows[k], atol=1e-5), k
    assert m_packed["ce_tokens"] == sum(len(model.tokenizer.encode(s.thought)) + 1 for s in samples if s.thought)
    assert m_packed["mse_tokens"] == 2 * LAT and m_packed["l1_tokens"] == 3 * CHUNK


def test_forward_backward_stage_weights_and_zero_init_heads():
    model = _model().train()
    batch = dict(model.collate(_samples()), seed=0)
    for stage, (wc, wm, wl) in (("pretrain", (0.25, 0.5, 1.0)), ("emcot", (1.0, 1.0, 1.0))):
        loss, m = model(dict(batch, stage=stage))
        assert torch.allclose(loss, wc * m["ce"] + wm * m["mse"] + wl * m["l1"])
    model.zero_grad()
    loss, m = model(batch)
    loss.backward()
    grad = lambda p: 0.0 if p.grad is None else float(p.grad.abs().sum())  # noqa: E731
    stack = model.lm.stack
    # CE reaches und and, through the clean latents the text attends to, gen; the ViT and connector train too
    for e in ("und", "gen"):
        assert grad(stack.layers[0].experts[e].mlp.up_proj.weight) > 0, e
    assert grad(model.connector.fc1.weight) > 0 and grad(model.vae2llm.weight) > 0
    assert grad(model.llm2vae.weight) > 0 and grad(model.output_linear_layer.weight) > 0
    # zero-initialised output layers: nothing attends to noisy action tokens, so at init the act expert
    # and the action input path get exactly zero gradient; the frozen VAE gets none
    assert all(grad(p) == 0.0 for n, p in stack.named_parameters() if ".experts.act." in n)
    assert grad(model.input_linear_layer.weight) == 0.0
    assert all(p.grad is None for p in model.vae.parameters())
    # with a non-zero output layer the action expert learns
    torch.nn.init.normal_(model.output_linear_layer.weight, std=0.1)
    model.zero_grad()
    model(batch)[0].backward()
    assert grad(stack.layers[1].experts["act"].mlp.up_proj.weight) > 0
    assert grad(model.input_linear_layer.weight) > 0 and grad(model.action_time_embedder.mlp[0].weight) > 0


# ---------------------------------------------------------------------------------------------- inference
def _randomised(seed=1):
    """A tiny model whose zero-initialised output layers are randomised, so velocities are not zero."""
    m = _model(seed).eval()
    with torch.no_grad():
        torch.nn.init.normal_(m.llm2vae.weight, std=0.3)
        torch.nn.init.normal_(m.output_linear_layer.weight, std=0.3)
    return m


@pytest.fixture(scope="module")
def rmodel():
    return _randomised()


@torch.no_grad()
def _prefill(model, items):
    """Oracle: one pass over all ``items`` from an empty cache."""
    ctx = HaloContext(model, "oracle")
    ctx.extend(items)
    return ctx


def _same_cache(a: HaloContext, b: HaloContext, atol=1e-5):
    return (a.length == b.length and all(torch.allclose(x, y, atol=atol) for x, y in zip(a.cache.keys, b.cache.keys))
            and all(torch.allclose(x, y, atol=atol) for x, y in zip(a.cache.values, b.cache.values)))


def _open_text(m, ids):
    """A text segment still being decoded: <|im_start|> + ids, no <|im_end|>."""
    full = [m.tokenizer.bos_id] + list(ids)
    return ContextItem("text", "thought", Segment.of("causal", "und", len(full), "text"), {"text": m.embed_text(full)})


@torch.no_grad()
def _one_shot_logits(m, items):
    layout = Layout.from_samples([[it.segment for it in items]], m.experts)
    labels = {k for it in items for k in it.embeds}
    embeds = {k: torch.cat([it.embeds[k] for it in items if k in it.embeds]) for k in labels}
    out = m.lm.stack(layout.assemble(embeds), layout)
    return m.lm.logits(out.hidden["und"][-1])


def test_greedy_reasoning_with_cache_matches_uncached_decoding(rmodel):
    m = rmodel
    s = _samples()[0]
    lat = m.encode_latents(s.history)
    obs = []
    for i, f in enumerate(s.history):
        obs += [m.latent_item(*lat[i], f"history[{i}]"), m.vit_item(f, f"history[{i}]")]
    obs.append(m.text_item(m.tokenizer.encode(format_prompt(s.instruction)), "prompt"))
    ctx = HaloContext(m, "full")
    ctx.extend(obs)
    with torch.no_grad():
        ids = m.generate_text(ctx, max_new_tokens=6)
        # oracle: no cache; every step runs the whole sequence (<|im_start|> + the ids so far) from scratch
        ref = []
        for _ in range(6):
            nxt = int(_one_shot_logits(m, obs + [_open_text(m, ref)]).argmax(-1))
            if nxt == m.tokenizer.eos_id:
                break
            ref.append(nxt)
    assert ids == ref
    # the decoded segment in the cache is the one a prefill of <|im_start|> ids <|im_end|> gives
    assert ctx.items[-1].ids == [m.tokenizer.bos_id] + ids + [m.tokenizer.eos_id]
    assert _same_cache(ctx, _prefill(m, obs + [m.text_item(ids, "thought")]))


def test_emcot_trace_end_to_end(rmodel):
    m = rmodel
    s = _samples()[0]
    trace = m.infer(s.history, s.instruction, generator=torch.Generator().manual_seed(0))
    assert trace.mode == "emcot"
    assert trace.reasoning == m.tokenizer.decode(trace.reasoning_ids)
    assert 0 < len(trace.reasoning_ids) <= m.config.inference.max_new_tokens
    # the decoded subgoal is the VAE decoding of the sampled latent, mapped to [0, 1]
    with torch.no_grad():
        img = (m.vae.decode(trace.subgoal_latent[None]) + 1) / 2
    assert torch.allclose(trace.subgoal_image, img[0].clamp(0, 1), atol=1e-5)
    assert trace.subgoal_latent.shape == (16, 4, 4) and trace.actions.shape == (CHUNK, A)
    assert torch.isfinite(trace.actions).all() and torch.isfinite(trace.subgoal_image).all()
    assert set(trace.timings) == {"prefill", "reasoning", "subgoal", "subgoal_insert", "action", "total"}
    assert trace.timings["total"] >= sum(v for k, v in trace.timings.items() if k != "total") - 1e-6
    # the policy API returns the same chunk for the same noise; select_action pops it step by step
    batch = {"history": [s.history], "instruction": [s.instruction], "generator": torch.Generator().manual_seed(0)}
    chunk = m.predict_action_chunk(batch)
    assert torch.equal(chunk[0], trace.actions)
    m.reset()
    batch["generator"] = torch.Generator().manual_seed(0)
    popped = [m.select_action(batch) for _ in range(CHUNK)]
    assert torch.equal(torch.stack(popped, 1), chunk)
    summary = trace.summary()
    assert summary["reasoning"] == repr(trace.reasoning) and summary["actions"] is trace.actions


def test_context_holds_each_observation_once(rmodel):
    m = rmodel
    s = _samples()[0]
    trace = m.infer(s.history, s.instruction, generator=torch.Generator().manual_seed(0))
    full, no_text, no_image = (trace.contexts[k] for k in ("full", "no_text", "no_image"))
    hist = [f"history[{i}]:{k}" for i in range(len(s.history)) for k in ("vae", "vit")]
    assert full.sources() == hist + ["prompt:text", "thought:text", "subgoal:vae", "subgoal:vit"]
    assert no_text.sources() == hist + ["subgoal:vae", "subgoal:vit"]
    assert no_image.sources() == ["prompt:text", "thought:text"]
    # the policy is prompted with the training template (upstream passed the raw instruction at inference)
    tok = m.tokenizer
    train_prompt = [it for it in m.collate([s])["plans"][0] if it.source == "prompt"][0].ids
    assert full.items[2 * len(s.history)].ids == [tok.bos_id] + train_prompt + [tok.eos_id]
    assert no_image.items[0].ids == full.items[2 * len(s.history)].ids
    # the caches hold exactly those segments, each once: a one-shot prefill of them gives the same K/V
    for ctx in (full, no_text, no_image):
        assert ctx.length == sum(seg.length for seg in ctx.segments)
        assert _same_cache(ctx, _prefill(m, ctx.items)), ctx.name
    # every context owns its cache (no aliasing as upstream's cfg_text_context = gen_context)
    ptrs = [c.cache.keys[0].data_ptr() for c in (full, no_text, no_image)]
    assert len(set(ptrs)) == 3


def _euler(m, contexts, make_item, label, noise, grid, scales, interval):
    """Independent sampler: BAGEL's guided Euler chain (oracles.bagel.guided_euler) on the model's velocities."""
    return guided_euler(lambda c, x, t: m._velocity(contexts[c], make_item(x, t), label).reshape(x.shape), noise,
                        grid, scales, interval)


@pytest.mark.parametrize("scales", [(1.0, 1.0), (4.0, 2.0)])
def test_subgoal_and_action_guidance(scales):
    m = _randomised()
    inf = m.config.inference
    inf.cfg_text_scale, inf.cfg_img_scale = scales
    inf.action_cfg_text_scale = inf.action_cfg_img_scale = max(scales)
    s = _samples()[0]
    trace = m.infer(s.history, s.instruction, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    lat_noise = torch.randn(LAT, 64, generator=g)
    act_noise = torch.randn(CHUNK, A, generator=g)
    grid_l = [float(t) for t in time_grid(points=inf.latent_points, shift=inf.latent_shift)]
    grid_a = [float(t) for t in torch.linspace(1, 0, inf.action_points)]
    full_items = trace.contexts["full"].items
    n_obs = 2 * len(s.history)
    pre = {"full": _prefill(m, full_items[:-2]),  # history, prompt, thought (before the subgoal)
           "no_text": _prefill(m, full_items[:n_obs]),  # images only
           "no_image": _prefill(m, full_items[n_obs:-2])}  # text only
    with torch.no_grad():
        x = _euler(m, pre, lambda x, t: m.latent_item(x, (2, 2), "subgoal", t=t), "latent_noisy", lat_noise,
                   grid_l, scales, inf.cfg_interval)
        assert torch.allclose(trace.subgoal_latent, m.latent_head.unpatchify(x[None], 2, 2)[0], atol=1e-4)
        post = {"full": _prefill(m, full_items), "no_text": _prefill(m, full_items[:n_obs] + full_items[-2:]),
                "no_image": pre["no_image"]}
        a = _euler(m, post, lambda x, t: m.action_item(x, t), "action", act_noise, grid_a,
                   (inf.action_cfg_text_scale,) * 2, inf.action_cfg_interval)
        assert torch.allclose(trace.actions, a, atol=1e-4)
        if scales == (1.0, 1.0):
            return
        # guidance changes the output: the same chain without guidance gives another subgoal
        x1 = _euler(m, pre, lambda x, t: m.latent_item(x, (2, 2), "subgoal", t=t), "latent_noisy", lat_noise,
                    grid_l, (1.0, 1.0), inf.cfg_interval)
        assert not torch.allclose(x, x1, atol=1e-3)
        a1 = _euler(m, post, lambda x, t: m.action_item(x, t), "action", act_noise, grid_a, (1.0, 1.0),
                    inf.action_cfg_interval)
        assert not torch.allclose(a, a1, atol=1e-3)


def test_guidance_scale_one_equals_unguided_and_above_one_differs():
    m = _randomised()
    s = _samples()[0]
    inf = m.config.inference

    def run(ts, is_, interval=(0.4, 1.0)):
        inf.cfg_text_scale, inf.cfg_img_scale, inf.cfg_interval = ts, is_, interval
        return m.infer(s.history, s.instruction, generator=torch.Generator().manual_seed(2)).subgoal_latent

    unguided = run(4.0, 2.0, interval=(1.0, 1.0))  # empty interval: the conditional model alone
    assert torch.allclose(run(1.0, 1.0), unguided, atol=1e-6)
    assert torch.allclose(run(1.0, 2.0), unguided, atol=1e-6)  # BAGEL: image guidance only under text guidance
    text_only = run(4.0, 1.0)
    assert not torch.allclose(text_only, unguided, atol=1e-3)
    assert not torch.allclose(run(4.0, 2.0), text_only, atol=1e-3)  # image guidance on top of text guidance


def test_reactive_mode_uses_vit_history_and_prompt_only(rmodel):
    m = rmodel
    s = _samples()[1]
    trace = m.infer(s.history, s.instruction, mode="reactive", generator=torch.Generator().manual_seed(0))
    assert trace.reasoning is None and trace.subgoal_image is None
    full = trace.contexts["full"]
    assert full.sources() == [f"history[{i}]:vit" for i in range(len(s.history))] + ["prompt:text"]
    # HALO's reactive action interval [1, 1] turns guidance off: the chain equals the conditional Euler sampler
    inf = m.config.inference
    noise = torch.randn(CHUNK, A, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = _euler(m, {"full": full}, lambda x, t: m.action_item(x, t), "action", noise,
                   [float(t) for t in torch.linspace(1, 0, inf.action_points)], (1.0, 1.0), (1.0, 1.0))
    assert torch.allclose(trace.actions, a, atol=1e-5)


def test_history_is_truncated_to_history_frames(rmodel):
    m = rmodel
    g = torch.Generator().manual_seed(0)
    frames = [torch.rand(3, 32, 32, generator=g) for _ in range(4)]
    trace = m.infer(frames, "stack the cups", mode="reactive")
    assert trace.contexts["full"].sources()[:2] == ["history[0]:vit", "history[1]:vit"]
    vit = trace.contexts["full"].items[0].embeds["vit"]
    assert torch.allclose(vit, m.embed_vit([frames[2]]))  # the last history_frames = 2 frames


# ---------------------------------------------------------------------------------------------- recipes
def test_halo_recipe_sizes_on_meta():
    cfg = model_config("halo")
    with torch.device("meta"):
        m = cfg.build()
    assert all(p.is_meta for p in m.parameters())
    st = m.lm.stack.cfg
    assert (st.num_layers, st.num_heads, st.num_kv_heads, st.head_dim, st.rope_theta) == (28, 12, 2, 128, 1e6)
    assert {e: (c.hidden_size, c.intermediate_size, c.qk_norm, c.qkv_bias) for e, c in st.experts.items()} == \
        {e: (1536, 8960, True, True) for e in ("und", "gen", "act")}
    assert m.lm.lm_head is not None and m.lm.embed_tokens.num_embeddings == 151936
    # analytic count of the three expert stacks (q/k/v with bias, o, q/k norm, 2 norms, SwiGLU) + final norms
    D, F_, d, L = 1536, 8960, 128, 28
    layer = D * 12 * d + 12 * d + 2 * (D * 2 * d + 2 * d) + 12 * d * D + 2 * d + 2 * D + 3 * D * F_
    assert sum(p.numel() for p in m.lm.stack.parameters()) == 3 * (L * layer + D)
    vit = getattr(m.vit_model.model, "vision_model", m.vit_model.model)
    c = m.vit_model.model.config
    assert len(vit.encoder.layers) == 26 and (c.hidden_size, c.intermediate_size, c.patch_size) == (1152, 4304, 14)
    total = m.num_parameters()
    assert 4.5e9 < total < 5.0e9  # HALO reports "~4.5B"; with SigLIP-26 and the FLUX VAE this count is 4.91B
    assert tuple(m.vae.vae.config.block_out_channels) == (128, 256, 512, 512) and m.vae.latent_channels == 16
    assert m.config.action_dim == 14 and m.config.chunk_size == 16
    # reference §5.3: a 320×240 RoboTwin frame goes to the VAE at 688×512, i.e. 43×32 = 1376 latent tokens
    assert m.vae_size(240, 320) == (512, 688)
    assert m.latent_grid(torch.zeros(3, 240, 320, device="meta")) == (32, 43)


def test_action_expert_ffn_ratio_is_a_recipe_edit():
    cfg = model_config("halo-tiny", **{"experts.act.ffn_ratio": 0.25})
    with torch.device("meta"):
        m = cfg.build()
    assert m.lm.stack.cfg.experts["act"].intermediate_size == 32
    assert m.lm.stack.layers[0].experts["act"].mlp.up_proj.weight.shape == (32, 64)


def test_tiny_experts_copy_init_from_the_backbone_and_qk_norm_starts_at_ones(model):
    lay = model.lm.stack.layers[0].experts
    assert torch.equal(lay["gen"].q_proj.weight, lay["und"].q_proj.weight)
    assert torch.equal(lay["act"].mlp.up_proj.weight, lay["und"].mlp.up_proj.weight[:64])  # sliced copy (ratio 0.5)
    assert torch.equal(lay["und"].q_norm.weight, torch.ones(16))


def test_demo_batch_and_inference_run(model):
    batch = model.demo_batch(2, torch.Generator().manual_seed(0))
    assert [s.mode for s in batch["samples"]] == ["emcot", "reactive"]
    out = model.demo_inference(batch)
    assert out["mode"] == "emcot" and out["actions"].shape == (CHUNK, A)
    assert out["contexts"]["full"].endswith("subgoal:vae subgoal:vit")


def test_condition_dropout_leaves_out_conditions_never_targets():
    cfg = model_config("halo-tiny", **{"cond_dropout.text": 1.0, "cond_dropout.vit": 1.0, "cond_dropout.vae": 1.0})
    m = cfg.build().train()
    s = _samples()[0]
    plan = [(it.source, it.kind) for it in m.collate([s])["plans"][0]]
    assert plan == [("thought", "text"), ("goal", "vae_noisy"), ("goal", "vae"), ("goal", "vit"), ("action", "action")]
    full = [(it.source, it.kind) for it in m.collate([s], cond_dropout=False)["plans"][0]]
    assert full[:4] == [("history[0]", "vae"), ("history[0]", "vit"), ("history[1]", "vae"), ("history[1]", "vit")]
    assert [(it.source, it.kind) for it in m.eval().collate([s])["plans"][0]] == full  # off in eval mode
    loss, metrics = m.train()(dict(m.collate([s]), seed=0))  # a plan without conditions still trains
    assert torch.isfinite(loss) and metrics["l1_tokens"] == CHUNK


def test_mixed_mode_draws_the_chain_with_cot_prob(rmodel):
    inf = rmodel.config.inference
    s = _samples()[0]
    saved = inf.cot_prob
    try:
        for p, mode in ((1.0, "emcot"), (0.0, "reactive")):
            inf.cot_prob = p
            trace = rmodel.infer(s.history, s.instruction, mode="mixed", generator=torch.Generator().manual_seed(0))
            assert trace.mode == mode and (trace.reasoning is not None) == (mode == "emcot")
    finally:
        inf.cot_prob = saved


def test_save_and_load_keep_weights_and_the_trace(rmodel, tmp_path):
    rmodel.save_pretrained(tmp_path)
    loaded = type(rmodel).from_pretrained(f"local-dir:{tmp_path}").eval()
    ref = rmodel.state_dict()
    assert set(loaded.state_dict()) == set(ref)
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
    assert loaded.latent_head.llm2vae is loaded.llm2vae  # the patchify helper shares the registered modules
    s = _samples()[0]
    a = rmodel.infer(s.history, s.instruction, generator=torch.Generator().manual_seed(0))
    b = loaded.infer(s.history, s.instruction, generator=torch.Generator().manual_seed(0))
    assert a.reasoning_ids == b.reasoning_ids and torch.equal(a.actions, b.actions)
