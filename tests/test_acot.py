"""ACoT-VLA: one prefix pass + one suffix pass equals upstream's three passes (loss and every gradient),
prefix-cache inference equals recomputing the prefix, teacher forcing, ablations as overrides, and a
tiny ACoT that learns a synthetic trajectory task on CPU."""

import math

import pytest
import torch
import torch.nn.functional as F

from vla_blocks.model import create_model, model_config
from vla_blocks.models.acot import EAR
from vla_blocks.models.pi0 import ACT, VLM, policy_layout
from vla_blocks.normalize import Normalizer
from vla_blocks.reasoners import stack_prefix_kv

import policy_helpers
from oracles.acot import action_guided_prediction
from oracles.openpi import embed_suffix, sample_times


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU run faster (and steadier) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(seed=0, perturb=True, **overrides):
    return policy_helpers.build("acot-tiny", seed, perturb, **overrides)


def fixed_batch(model, B=2, seed=1):
    return policy_helpers.fixed_batch(model, B, seed, times=(0.35, 0.9))


def linear(m, x):
    return x @ m.weight.T + m.bias


# ---------------------------------------------------------------------------------------------- reference
def reference_tokens(model, x_t, t, in_proj, mlp_in, mlp_out):
    """Suffix token inputs and adaRMS cond from openpi's ``embed_suffix`` (oracles.openpi) with these weights."""
    return embed_suffix(x_t, t, in_proj, mlp_in, mlp_out, model.config.pi05)


def full_pass(model, batch, expert, label, tokens, cond):
    """[prefix + one suffix] in one pass, the prefix recomputed from the raw batch (vision tower included)."""
    c = model.config
    prefix = model.embed_prefix(batch)
    B, H, W = tokens.shape
    layout = policy_layout(prefix.image_valid, prefix.tokens_per_image, prefix.text_valid,
                           [(expert, label, H, not c.pi05)], model.experts)
    n_img = prefix.image_valid.shape[1] * prefix.tokens_per_image
    embeds = {"image": prefix.tokens[:, :n_img].flatten(0, 1), "text": prefix.tokens[:, n_img:].flatten(0, 1),
              label: tokens.flatten(0, 1)}
    if not c.pi05:
        s = F.pad(batch["state"], (0, model.state_proj.in_features - batch["state"].shape[-1]))
        embeds[f"{label}.state"] = linear(model.state_proj, s)
    conds = {expert: cond[:, None].expand(B, H, -1).flatten(0, 1)} if cond is not None else None
    out = model.stack(layout.assemble(embeds), layout, cond=conds)
    return layout.extract(out.hidden, label).view(B, H, -1)


def implicit_tokens_from_prefix_pass(model, batch):
    """Upstream pass 1: ``[prefix, None, None]`` → per-layer K/V → IAR."""
    if model.config.iar is None:
        return None
    prefix = model.embed_prefix(batch)
    layout = policy_layout(prefix.image_valid, prefix.tokens_per_image, prefix.text_valid, [], model.experts)
    out = model.stack({VLM: prefix.tokens.flatten(0, 1)}, layout, return_kv=True)
    K, V = stack_prefix_kv(out.keys, out.values)
    return model.implicit_action_reasoner(K, V, prefix.valid if model.config.iar.mask_padding else None)


def three_pass_loss(model, batch, kind="mse"):
    """Upstream ``compute_loss``: three LLM passes, each recomputing the prefix; teacher forcing; shared t.
    ``kind="l1"`` takes |·| in place of (·)² (a recipe variant with HALO's loss)."""
    err = (lambda d: d ** 2) if kind == "mse" else torch.abs
    c = model.config
    H, Hc, s = c.action_horizon, c.ear.horizon, c.ear.stride
    pad = lambda x: F.pad(x, (0, c.action_dim - x.shape[-1]))  # noqa: E731
    chunk = batch["actions"]
    actions, coarse = pad(chunk[:, :H]), pad(chunk[:, 0:(Hc - 1) * s + 1:s])
    t = batch["time"][:, None, None]
    x_ref = t * batch["coarse_noise"] + (1 - t) * coarse
    u_ref = batch["coarse_noise"] - coarse
    x_t = t * batch["noise"] + (1 - t) * actions
    u = batch["noise"] - actions
    z_im = implicit_tokens_from_prefix_pass(model, batch)  # pass 1
    if c.pi05:
        ear_in, ear_cond = reference_tokens(model, x_ref, batch["time"], model.coarse_action_in_proj,
                                            model.coarse_time_mlp_in, model.coarse_time_mlp_out)
        act_in, act_cond = reference_tokens(model, x_t, batch["time"], model.action_in_proj, model.time_mlp_in,
                                            model.time_mlp_out)
    else:
        ear_in, ear_cond = reference_tokens(model, x_ref, batch["time"], model.coarse_action_in_proj,
                                            model.coarse_action_time_mlp_in, model.coarse_action_time_mlp_out)
        act_in, act_cond = reference_tokens(model, x_t, batch["time"], model.action_in_proj,
                                            model.action_time_mlp_in, model.action_time_mlp_out)
    h_ref = full_pass(model, batch, EAR, "coarse_actions", ear_in, ear_cond)  # pass 2
    act_in = action_guided_prediction(model, act_in, coarse, z_im)  # teacher forcing: the true coarse trajectory
    h = full_pass(model, batch, ACT, "actions", act_in, act_cond)  # pass 3
    loss_ref = err(linear(model.coarse_action_out_proj, h_ref) - u_ref).mean()
    loss_act = err(linear(model.action_out_proj, h) - u).mean()
    return loss_ref + loss_act, loss_ref, loss_act


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("overrides", [{}, {"pi05": False, "iar.type": "learnable_query", "iar.mask_padding": True}],
                         ids=["pi05-downsample", "pi0-learnable-query-masked"])
def test_one_pass_training_equals_three_pass_upstream(overrides, one_thread):
    model = build(**overrides)
    batch = fixed_batch(model)
    params = list(model.parameters())
    loss, metrics = model(batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    ref, ref_ear, ref_act = three_pass_loss(model, batch)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    assert abs(loss.item() - ref.item()) <= 1e-5 and ref.item() > 0.5
    assert abs(metrics["loss_ear"].item() - ref_ear.item()) <= 1e-5
    assert abs(metrics["loss_action"].item() - ref_act.item()) <= 1e-5
    nonzero = 0
    for (name, p), g1, g2 in zip(model.named_parameters(), grads, ref_grads):
        g1 = torch.zeros_like(p) if g1 is None else g1  # None = not in the graph = zero
        g2 = torch.zeros_like(p) if g2 is None else g2
        assert (g1 - g2).abs().max() <= 1e-5, name
        nonzero += bool(g2.abs().max() > 0)
    assert nonzero > 0.8 * len(params)


def test_teacher_forcing_keeps_the_action_loss_away_from_the_ear_expert():
    model = build()
    batch = fixed_batch(model)
    _, _, loss_act = three_pass_loss(model, batch)  # the action term alone (its graph is the model's, tested above)
    ear = [p for n, p in model.named_parameters() if ".experts.ear." in n or n.endswith("norms.ear.weight")]
    g = torch.autograd.grad(loss_act, ear + [model.coarse_action_in_proj.weight], allow_unused=True)
    assert all(x is None or x.abs().max() == 0 for x in g[:-1])
    assert g[-1].abs().max() > 0  # the shared coarse_action_in_proj embeds the clean trajectory for AGP


def reference_sample(model, batch, noise, coarse_noise):
    """Inference with the prefix recomputed at every Euler step (openpi's loop: dt = −0.1 while t ≥ −dt/2)."""
    c = model.config
    B = noise.shape[0]
    z_im = implicit_tokens_from_prefix_pass(model, batch)

    def euler(x, velocity):
        for t in sample_times(10):
            x = x + -0.1 * velocity(x, torch.full((B,), t))
        return x

    def ear_v(x, t):
        tok, cond = reference_tokens(model, x, t, model.coarse_action_in_proj, model.coarse_time_mlp_in,
                                     model.coarse_time_mlp_out)
        return linear(model.coarse_action_out_proj, full_pass(model, batch, EAR, "coarse_actions", tok, cond))

    coarse = euler(coarse_noise, ear_v)

    def act_v(x, t):
        tok, cond = reference_tokens(model, x, t, model.action_in_proj, model.time_mlp_in, model.time_mlp_out)
        tok = action_guided_prediction(model, tok, coarse, z_im)  # conditioned on the EAR sample
        return linear(model.action_out_proj, full_pass(model, batch, ACT, "actions", tok, cond))

    return euler(noise, act_v), coarse


def test_prefix_cache_inference_equals_recomputing_the_prefix(one_thread):
    model = build().eval()
    batch = fixed_batch(model)
    with torch.no_grad():
        out = model.sample_actions(batch, noise=batch["noise"], coarse_noise=batch["coarse_noise"])
        actions, coarse = reference_sample(model, batch, batch["noise"], batch["coarse_noise"])
    assert (out["coarse_actions"] - coarse).abs().max() < 1e-5
    assert (out["actions"] - actions).abs().max() < 1e-5
    assert (out["coarse_actions"] - batch["coarse_noise"]).abs().max() > 0.1
    # raw-space outputs: unnormalised with the coarse trajectory's own statistics, cut to real_action_dim (7)
    stats = {"actions": torch.randn(50, 7) * 2 + 1, "coarse_actions": torch.randn(50, 7) * 3 - 1}
    model.normalizer.load_dict(Normalizer.from_data(stats, "zscore").to_dict())
    with torch.no_grad():
        raw = model.infer(batch, noise=batch["noise"], coarse_noise=batch["coarse_noise"])
        assert raw["coarse_actions"].shape == (2, 5, 7) and raw["actions"].shape == (2, 4, 7)
        sampled = model.sample_actions(batch, noise=batch["noise"], coarse_noise=batch["coarse_noise"])
    assert torch.allclose(raw["coarse_actions"], model.normalizer.unnormalize("coarse_actions", sampled["coarse_actions"][..., :7]))
    assert torch.allclose(raw["actions"], model.normalizer.unnormalize("actions", sampled["actions"][..., :7]))


def test_coarse_reference_from_the_chunk_equals_explicit_coarse_actions_with_their_own_stats():
    model = build()
    batch = fixed_batch(model)
    chunk = batch["actions"]  # 10 frames: coarse = frames 0, 2, 4, 6, 8
    explicit = dict(batch, actions=chunk[:, :4], coarse_actions=chunk[:, 0:9:2])
    l1, _ = model(batch)
    l2, _ = model(explicit)
    assert abs(l1.item() - l2.item()) < 1e-6
    # with their own statistics the coarse targets are z-scored with them: (x − μ) / (σ + 1e-6)
    mu, sd = torch.randn(7), torch.rand(7) + 0.5
    model.normalizer.set_stats("coarse_actions", mean=mu, std=sd)
    target = model.target_coarse(explicit)
    assert torch.allclose(target[..., :7], (chunk[:, 0:9:2] - mu) / (sd + 1e-6), atol=1e-6)
    assert torch.equal(target[..., 7:], torch.zeros(2, 5, 1))


def test_ablations_are_overrides_and_both_off_is_pi05():
    full = build(perturb=False)
    names = {n.split(".")[0] for n, _ in full.named_parameters()}
    assert {"coarse_action_in_proj", "coarse_action_out_proj", "coarse_time_mlp_in", "explicit_action_reasoner",
            "implicit_action_reasoner", "implicit_action_reasoner_interact", "explicit_action_reason_proj",
            "implicit_action_reason_proj", "action_reasoning_fusion"} <= names
    no_ear = build(perturb=False, ear=None)
    assert EAR not in no_ear.stack.cfg.experts and not hasattr(no_ear, "coarse_action_in_proj")
    assert type(no_ear.action_reasoning_fusion).__name__ == "FusionMLP"
    no_iar = build(perturb=False, iar=None)
    assert not hasattr(no_iar, "implicit_action_reasoner") and type(no_iar.action_reasoning_fusion).__name__ == "FusionMLP"
    assert type(build(perturb=False, **{"iar.type": "attention_pooling"}).implicit_action_reasoner).__name__ == \
        "AttentionPoolingExtractor"
    # both reasoners off: exactly pi0.5 (same weights → same loss and same actions)
    bare = build(ear=None, iar=None)
    torch.manual_seed(0)
    pi05 = create_model("acot-tiny", type="pi0")  # the recipe as a plain pi0.5 model
    pi05.load_state_dict(bare.state_dict())
    batch = fixed_batch(bare)
    batch.pop("coarse_noise", None)
    la, _ = bare(batch)
    lb, _ = pi05(batch)
    assert abs(la.item() - lb.item()) < 1e-6
    with torch.no_grad():
        assert torch.allclose(bare.sample_actions(batch, noise=batch["noise"])["actions"],
                              pi05.sample_actions(batch, noise=batch["noise"])["actions"], atol=1e-6)


def test_full_size_acot_libero_on_meta():
    cfg = model_config("acot-libero")
    assert (cfg.ear.horizon, cfg.ear.stride, cfg.action_horizon, cfg.action_dim, cfg.chunk_length) == (15, 2, 10, 32, 30)
    with torch.device("meta"):
        model = cfg.build()
        pi05 = model_config("pi05").build()
    ear = sum(p.numel() for n, p in model.named_parameters() if ".experts.ear." in n or "norms.ear" in n)
    glue = model.num_parameters() - pi05.num_parameters() - ear
    it = model.implicit_action_reasoner
    assert (it.num_groups, it.num_heads, it.head_dim, len(it.query_params)) == (6, 8, 16, 18)
    assert model.stack.cfg.experts[EAR].adarms_cond_dim == 1024
    # EAR expert: gemma_300m (311M) + adaRMS Dense layers (37 × 1024·3072); new glue ≈ 36M (reference §1.1)
    assert abs(ear - 311e6 - 37 * (1024 * 3072 + 3072 + 1024)) < 1e6
    assert abs(glue - 36e6) < 1.5e6
    assert 3.6e9 < model.num_parameters() < 3.9e9
    # Gemma-2B frozen, vision and both experts trainable
    frozen = {n.split(".experts.")[-1].split(".")[0] for n, p in model.named_parameters()
              if not p.requires_grad and ".experts." in n}
    assert frozen == {VLM}
    assert all(p.requires_grad for p in model.vision_tower.parameters())


# ---------------------------------------------------------------------------------------------- learning
def trajectory_task(n_tasks=4, frames=10, dims=7, seed=0):
    """Per task a smooth trajectory ``A_k·sin(2π·(f_k·τ + φ_k))`` over ``frames`` steps (τ ∈ [0, 1))."""
    g = torch.Generator().manual_seed(seed)
    amp = torch.rand(n_tasks, 1, dims, generator=g) + 0.5
    freq = torch.rand(n_tasks, 1, dims, generator=g) * 0.8 + 0.2
    phase = torch.rand(n_tasks, 1, dims, generator=g)
    tau = torch.arange(frames).float()[None, :, None] / frames
    return amp * torch.sin(2 * math.pi * (freq * tau + phase))


def task_batch(model, trajectories, B, g):
    """The task id is in the prompt (token 10 + k) and in the colour of the first camera."""
    c = model.config
    k = torch.randint(0, trajectories.shape[0], (B,), generator=g)
    batch = model.demo_batch(B, g)
    batch["tokenized_prompt"][:] = 0
    batch["tokenized_prompt"][:, 0] = 10 + k
    batch["tokenized_prompt_mask"][:] = False
    batch["tokenized_prompt_mask"][:, :2] = True
    batch["images"][:, 0] = k.float()[:, None, None, None] / trajectories.shape[0]  # float images in [0, 1]
    batch["actions"] = trajectories[k] + 0.02 * torch.randn(B, trajectories.shape[1], trajectories.shape[2], generator=g)
    batch["coarse_target"] = trajectories[k][:, 0:(c.ear.horizon - 1) * c.ear.stride + 1:c.ear.stride]
    batch["fine_target"] = trajectories[k][:, :c.action_horizon]
    return batch


@pytest.mark.slow
def test_tiny_acot_learns_a_trajectory_task_on_cpu(one_thread):
    torch.manual_seed(0)
    model = create_model("acot-tiny")
    traj = trajectory_task(frames=model.config.chunk_length)
    g = torch.Generator().manual_seed(0)
    eval_batch = task_batch(model, traj, 16, torch.Generator().manual_seed(123))

    def errors():
        """Mean squared error of sampled coarse / fine trajectories against the stride-2 / H-step targets."""
        model.eval()
        with torch.no_grad():
            out = model.infer(eval_batch, generator=torch.Generator().manual_seed(7))
        model.train()
        return (((out["coarse_actions"] - eval_batch["coarse_target"]) ** 2).mean().item(),
                ((out["actions"] - eval_batch["fine_target"]) ** 2).mean().item())

    def losses(n=4):
        with torch.no_grad():
            ms = [model(task_batch(model, traj, 16, torch.Generator().manual_seed(1000 + i)))[1] for i in range(n)]
        return {k: sum(m[k].item() for m in ms) / n for k in ("loss_ear", "loss_action")}

    torch.manual_seed(1)
    before_err, before = errors(), losses()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(150):  # ≈ 15-30 s on one CPU thread
        loss, _ = model(task_batch(model, traj, 16, g))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    torch.manual_seed(1)
    after_err, after = errors(), losses()
    # typical: loss_ear 1.8 → 0.15, loss_action 2.1 → 0.7, coarse error 1.6 → 0.05
    assert after["loss_ear"] < 0.5 * before["loss_ear"], (before, after)
    assert after["loss_action"] < 0.7 * before["loss_action"], (before, after)
    assert after_err[0] < 0.3 * before_err[0], (before_err, after_err)  # the coarse trajectory tracks the target
    assert after_err[1] < 0.7 * before_err[1], (before_err, after_err)
