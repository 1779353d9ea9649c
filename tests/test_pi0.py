"""pi0 / pi0.5: openpi's mask and positions, the loss and gradients against a single full pass, prefix-cache
inference against recomputing the prefix every Euler step, the lerobot inference API, parameter counts."""

import pytest
import torch
import torch.nn.functional as F

from vla_blocks.model import model_config
from vla_blocks.models.pi0 import ACT, discretize_state, pi05_prompt, policy_layout

from oracles.openpi import embed_suffix, make_attn_mask, sample_times
from policy_helpers import build, fixed_batch


# ---------------------------------------------------------------------------------------------- helpers
def time_conditioning(model, x_t, t):
    """Token inputs and adaRMS cond from openpi's ``embed_suffix`` (oracles.openpi) with the model's weights."""
    mlp = ("time_mlp_in", "time_mlp_out") if model.config.pi05 else ("action_time_mlp_in", "action_time_mlp_out")
    return embed_suffix(x_t, t, model.action_in_proj, *(getattr(model, n) for n in mlp), model.config.pi05)


def full_pass_velocity(model, batch, prefix, x_t, t):
    """One pass over the whole sequence (prefix recomputed, no cache): the straightforward pi0."""
    c = model.config
    B, H, _ = x_t.shape
    layout = policy_layout(prefix.image_valid, prefix.tokens_per_image, prefix.text_valid,
                           [(ACT, "actions", H, not c.pi05)], model.experts)
    tokens, cond = time_conditioning(model, x_t, t)
    n_img = prefix.image_valid.shape[1] * prefix.tokens_per_image
    embeds = {"image": prefix.tokens[:, :n_img].flatten(0, 1), "text": prefix.tokens[:, n_img:].flatten(0, 1),
              "actions": tokens.flatten(0, 1)}
    conds = None
    if c.pi05:
        conds = {ACT: cond[:, None].expand(B, H, -1).flatten(0, 1)}  # the act expert's tokens, row-major
    else:
        s = F.pad(model.normalizer.normalize("state", batch["state"]), (0, model.state_proj.in_features - batch["state"].shape[-1]))
        embeds["actions.state"] = s @ model.state_proj.weight.T + model.state_proj.bias
    out = model.stack(layout.assemble(embeds), layout, cond=conds)
    h = layout.extract(out.hidden, "actions").view(B, H, -1)
    return h @ model.action_out_proj.weight.T + model.action_out_proj.bias


# ---------------------------------------------------------------------------------------------- mask
@pytest.mark.parametrize("pi05", [False, True])
def test_layout_mask_and_positions_equal_openpi_make_attn_mask(pi05):
    B, n_cam, T, L, H = 3, 3, 4, 6, 5
    g = torch.Generator().manual_seed(0)
    image_valid = torch.rand(B, n_cam, generator=g) > 0.3
    image_valid[:, 0] = True
    image_valid[2, 0] = False  # a masked leading camera
    image_valid[2, 1] = True
    text_valid = torch.arange(L)[None] < torch.tensor([[6], [2], [4]])
    layout = policy_layout(image_valid, T, text_valid, [(ACT, "actions", H, not pi05)], ["vlm", ACT])
    # openpi: images and text (ar False), pi0's state (ar True), actions ([True] + [False]·(H−1))
    input_mask = torch.cat([image_valid.repeat_interleave(T, 1), text_valid] +
                           ([torch.ones(B, 1, dtype=torch.bool)] if not pi05 else []) +
                           [torch.ones(B, H, dtype=torch.bool)], 1)
    ar = [False] * (n_cam * T + L) + ([True] if not pi05 else []) + [True] + [False] * (H - 1)
    expect = make_attn_mask(input_mask, torch.tensor(ar)[None].expand(B, -1))
    assert torch.equal(layout.dense_mask(), expect)
    # positions: cumsum(input_mask) − 1 on valid tokens (openpi gives −1 to invalid leading tokens, we give 0;
    # invalid tokens are never attended, so only the valid ones matter)
    pos = torch.cumsum(input_mask.long(), 1) - 1
    assert torch.equal(layout.position_ids[input_mask], pos[input_mask])


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["pi0-tiny", "pi05-tiny"])
def test_loss_and_gradients_equal_a_single_full_pass(name):
    model = build(name)
    batch = fixed_batch(model)
    loss, metrics = model(batch)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)

    a = model.target_actions(batch)
    t, noise = batch["time"], batch["noise"]
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * a
    prefix = model.embed_prefix(batch)
    v = full_pass_velocity(model, batch, prefix, x_t, t)
    ref = ((v - (noise - a)) ** 2).mean()  # openpi: mean over (B, H, 32 padded dims)
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters()], allow_unused=True)
    assert abs(loss.item() - ref.item()) < 1e-5 and ref.item() > 0.1
    assert torch.equal(metrics["loss_action"], loss.detach())
    nonzero = set()
    for (pname, p), g1, g2 in zip(model.named_parameters(), grads, ref_grads):
        # None = not in the graph = zero (the prefix's last-layer outputs are not needed, only its K/V)
        g1 = torch.zeros_like(p) if g1 is None else g1
        g2 = torch.zeros_like(p) if g2 is None else g2
        assert (g1 - g2).abs().max() <= 1e-5 * max(1.0, g2.abs().max().item()), pname
        if g2.abs().max() > 0:
            nonzero.add(pname)
    # every vision-tower, projector and action-expert parameter is trained through the cached prefix
    # (except, in pi0.5, the scale vectors of adaRMS norms: with a cond they are not used)
    for pname, _ in model.named_parameters():
        if model.config.pi05 and ("layernorm.weight" in pname or pname.endswith("norms.act.weight")):
            continue
        if pname.startswith(("vision_tower", "multi_modal_projector", "action_")) or ".experts.act." in pname:
            assert pname in nonzero, pname


def test_freeze_vlm_leaves_vision_trainable():
    model = build("pi0-tiny", perturb=False, freeze_vlm=True)
    loss, _ = model(fixed_batch(model))
    loss.backward()
    for n, p in model.named_parameters():
        frozen = n.startswith("language_model.embed_tokens") or ".experts.vlm." in n or n.endswith("norms.vlm.weight")
        assert p.requires_grad == (not frozen), n
        assert (p.grad is not None) == (not frozen), n
    patch = next(p for n, p in model.vision_tower.named_parameters() if "patch_embedding.weight" in n)
    assert patch.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("name", ["pi0-tiny", "pi05-tiny"])
def test_prefix_cache_inference_equals_recomputing_the_prefix_each_step(name):
    model = build(name).eval()
    batch = fixed_batch(model)
    noise = batch["noise"]
    with torch.no_grad():
        got = model.sample_actions(batch, noise=noise)["actions"]
        # openpi sample_actions: dt = −1/10, while t ≥ −dt/2: x ← x + dt·v(x, t) — with a full pass per step
        prefix = model.embed_prefix(batch)
        x, times = noise.clone(), sample_times(10)
        for t in times:
            x = x + -0.1 * full_pass_velocity(model, batch, prefix, x, torch.full((2,), t))
    assert len(times) == 10
    assert (got - x).abs().max() < 1e-5
    assert (got - noise).abs().max() > 0.1  # it moved


def test_masked_camera_and_text_padding_do_not_change_the_actions():
    model = build("pi0-tiny").eval()
    batch = fixed_batch(model)
    other = dict(batch)
    other["images"] = batch["images"].clone()
    other["images"][:, 2] = torch.rand_like(other["images"][:, 2])  # camera 2 is masked in every row
    other["images"][1, 0] = 0.0  # masked in row 1
    other["tokenized_prompt"] = batch["tokenized_prompt"].clone()
    other["tokenized_prompt"][0, 3:] = 7  # padding of row 0
    with torch.no_grad():
        a = model.sample_actions(batch, noise=batch["noise"])["actions"]
        b = model.sample_actions(other, noise=batch["noise"])["actions"]
        other["images"][0, 0] = 1.0 - other["images"][0, 0]  # a valid camera does matter (still in [0, 1])
        c = model.sample_actions(other, noise=batch["noise"])["actions"]
    assert (a - b).abs().max() < 1e-6
    assert (a[0] - c[0]).abs().max() > 1e-4


def test_state_token_only_in_pi0():
    for name, matters in (("pi0-tiny", True), ("pi05-tiny", False)):
        model = build(name).eval()
        batch = fixed_batch(model)
        other = dict(batch, state=batch["state"] + 1.0)
        with torch.no_grad():
            d = (model.sample_actions(batch, noise=batch["noise"])["actions"] -
                 model.sample_actions(other, noise=batch["noise"])["actions"]).abs().max()
        assert (d > 1e-4) == matters, name


def test_predict_action_chunk_unnormalises_and_select_action_pops_a_queue():
    from vla_blocks.normalize import Normalizer
    model = build("pi05-tiny", real_action_dim=3, n_action_steps=2).eval()
    model.normalizer.load_dict(Normalizer.from_data({"actions": torch.randn(100, 3) * 4 + 2}, "quantile").to_dict())
    batch = fixed_batch(model)
    torch.manual_seed(5)
    raw = model.sample_actions(batch)["actions"]
    torch.manual_seed(5)
    chunk = model.predict_action_chunk(batch)
    assert chunk.shape == (2, 5, 3)
    assert torch.allclose(chunk, model.normalizer.unnormalize("actions", raw[..., :3]))
    calls = []
    orig = model.predict_action_chunk
    model.predict_action_chunk = lambda b: calls.append(1) or orig(b)
    torch.manual_seed(5)
    first = [model.select_action(batch) for _ in range(2)]
    assert len(calls) == 1 and all(torch.allclose(a, chunk[:, i]) for i, a in enumerate(first))
    model.select_action(batch)  # queue empty after n_action_steps: a new chunk
    assert len(calls) == 2
    model.reset()
    torch.manual_seed(5)
    assert torch.allclose(model.select_action(batch), chunk[:, 0]) and len(calls) == 3


# ---------------------------------------------------------------------------------------------- sizes
def gemma_params(D, F, L, vocab=0, heads=8, head_dim=256, adarms=False):
    attn = D * heads * head_dim * 2 + D * head_dim * 2  # q, o and one kv head
    # adaRMS: Dense(D → 3D) per norm (the unused scale vector of our AdaRMSNorm is counted too: D per norm)
    norms = (2 * L + 1) * ((D * 3 * D + 3 * D) + D if adarms else D)
    return L * (attn + 3 * D * F) + norms + vocab * D


def siglip_params(C=1152, F=4304, L=27, patch=14, tokens=256):
    layer = 4 * (C * C + C) + (C * F + F) + (F * C + C) + 4 * C
    return L * layer + 3 * patch * patch * C + C + tokens * C + 2 * C


def test_full_size_pi0_and_pi05_parameter_counts_on_meta():
    for name, pi05 in (("pi0", False), ("pi05", True)):
        cfg = model_config(name)
        with torch.device("meta"):
            model = cfg.build()
        assert next(model.parameters()).is_meta
        expect = (gemma_params(2048, 16384, 18, vocab=257152) + siglip_params() + 1152 * 2048 + 2048 +
                  gemma_params(1024, 4096, 18, adarms=pi05) + (32 * 1024 + 1024) + (1024 * 32 + 32) +
                  (2 * (1024 * 1024 + 1024) if pi05 else (32 * 1024 + 1024) + 2048 * 1024 + 1024 + 1024 * 1024 + 1024))
        assert model.num_parameters() == expect, name
    assert 3.2e9 < expect < 3.4e9  # pi0.5 ≈ 3.3B (reference/acot_pi0.md §1.1)


def test_pi05_prompt_discretises_the_state_like_openpi():
    import numpy as np
    state = torch.tensor([-1.5, -1.0, -0.3, 0.0, 0.999, 1.0, 2.0])
    expect = np.digitize(state.numpy(), bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1  # openpi tokenizer.py
    assert discretize_state(state).tolist() == expect.tolist()
    assert pi05_prompt("pick_up the\ncup ", state[:2]) == "Task: pick up the cup, State: -1 0;\nAction: "
    assert pi05_prompt("pick_up the cup") == "pick up the cup"
