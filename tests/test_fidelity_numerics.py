"""pi0 / pi0.5 / ACoT fidelity settings (issue 14): the loss reduction over padded or real action dims (item 7,
against lerobot's ``PI0Policy.forward`` reduction) and ``numerics: jax`` (item 10, against float32 references of
openpi's ``posemb_sincos`` and ``sample_actions`` loop), on randomized inputs (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import test_acot
import test_pi0
from oracles.openpi import embed_suffix, lerobot_flow_loss, posemb_sincos as np_posemb, sample_times
from policy_helpers import build, fixed_batch
from vla_blocks.conditioning import AdaRMSTimeMLP, ConcatTimeMLP, posemb_sincos
from vla_blocks.flow import FlowMatching, euler_sample, time_grid
from vla_blocks.heads import FlowHead


# ---------------------------------------------------------------------------------------------- item 7
@pytest.mark.parametrize("name", ["pi0-tiny", "pi05-tiny"])
def test_real_dim_loss_equals_lerobot_pi0policy_forward(name):
    model = build(name, **{"loss_dims": "real", "real_action_dim": 5})
    batch = fixed_batch(model)
    loss, _ = model(batch)
    a = model.target_actions(batch)
    t, noise = batch["time"], batch["noise"]
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * a
    v = test_pi0.full_pass_velocity(model, batch, model.embed_prefix(batch), x_t, t)
    ref = lerobot_flow_loss(v, noise - a, 5)
    padded = ((v - (noise - a)) ** 2).mean()  # openpi's default
    assert abs(loss.item() - ref.item()) < 1e-5 and abs(ref.item() - padded.item()) > 1e-3
    default = build(name, **{"real_action_dim": 5})
    assert abs(default(batch)[0].item() - padded.item()) < 1e-5


def test_real_dim_loss_in_acot_covers_both_heads():
    model = test_acot.build(**{"loss_dims": "real", "real_action_dim": 4})
    batch = test_acot.fixed_batch(model)
    loss, metrics = model(batch)
    ref, ref_ear, ref_act = test_acot.three_pass_loss(model, batch, dims=4)
    assert abs(metrics["loss_ear"].item() - ref_ear.item()) <= 1e-5
    assert abs(metrics["loss_action"].item() - ref_act.item()) <= 1e-5
    assert abs(loss.item() - ref.item()) <= 1e-5


def test_loss_dims_is_validated():
    with pytest.raises(ValueError, match="loss_dims"):
        build("pi0-tiny", **{"loss_dims": "some"})
    with pytest.raises(ValueError, match="needs real_action_dim"):
        build("pi0-tiny", **{"loss_dims": "real"})


# ---------------------------------------------------------------------------------------------- item 10
times = st.lists(st.floats(0.0, 1.0, width=32), min_size=1, max_size=16)


@settings(max_examples=40, deadline=None)
@given(times, st.sampled_from([8, 64, 256, 1024, 2048]))
def test_posemb_numerics_match_float32_and_float64_references(ts, dim):
    t = torch.tensor(ts, dtype=torch.float32)
    jax = posemb_sincos(t, dim, numerics="jax")
    ref32 = np_posemb(np.array(ts, dtype=np.float32), dim, 4e-3, 4.0, dtype=np.float32)
    assert jax.dtype == torch.float32
    # same float32 arguments bit for bit; sin / cos implementations may differ by an ulp
    np.testing.assert_allclose(jax.numpy(), ref32, rtol=0, atol=5e-7)
    ref64 = np_posemb(np.array(ts, dtype=np.float32).astype(np.float64), dim, 4e-3, 4.0)
    np.testing.assert_allclose(posemb_sincos(t, dim).numpy(), ref64, rtol=0, atol=1e-7)


def test_jax_and_torch_posemb_differ_as_the_issue_says():
    t = torch.rand(256, generator=torch.Generator().manual_seed(0))
    d = (posemb_sincos(t, 1024, numerics="jax") - posemb_sincos(t, 1024)).abs().max().item()
    assert 1e-5 < d < 5e-4  # float32 rounding of a ~1,500 rad argument


@pytest.mark.parametrize("num_steps", [1, 2, 3, 7, 10, 25, 50])
def test_jax_time_grid_accumulates_in_float32_like_openpi(num_steps):
    g = time_grid(num_steps=num_steps, numerics="jax")
    ref = sample_times(num_steps, np.float32)
    assert g.dtype == torch.float32 and len(g) == len(ref) + 1 == num_steps + 1
    assert g[:-1].numpy().tobytes() == np.array(ref, dtype=np.float32).tobytes()
    if num_steps == 10:
        assert g[:3].tolist() == [1.0, np.float32(0.9), np.float32(0.79999995)]
    with pytest.raises(ValueError, match="numerics='jax'"):
        time_grid(points=10, numerics="jax")
    with pytest.raises(ValueError, match="numerics"):
        time_grid(num_steps=10, numerics="numpy")


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 20), st.integers(0, 2 ** 16))
def test_jax_euler_matches_openpi_loop_in_float32(num_steps, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 4, generator=g)
    w = torch.randn(4, 4, generator=g)

    def velocity(x, t):
        return torch.tanh(x @ w) * (1 + t)

    fm = FlowMatching(num_steps=num_steps, numerics="jax")
    got = fm.sample(velocity, x0.shape, noise=x0)
    # openpi: x_t + dt·v_t with dt = float32(−1/num_steps), at the float32-accumulated times
    x, wn, dt = x0.numpy(), w.numpy(), np.float32(-1.0 / num_steps)
    for t in sample_times(num_steps, np.float32):
        v = np.tanh(x @ wn) * (np.float32(1) + t)
        x = (x + dt * v.astype(np.float32)).astype(np.float32)
    np.testing.assert_allclose(got.numpy(), x, rtol=0, atol=2e-6)
    torch_grid = FlowMatching(num_steps=num_steps).sample(velocity, x0.shape, noise=x0)
    assert torch_grid.shape == got.shape


@pytest.mark.parametrize("name", ["pi0-tiny", "pi05-tiny"])
def test_numerics_jax_recipe_reaches_time_conditioning_and_sampler(name):
    model = build(name, **{"flow.numerics": "jax"})
    head = model.flow_heads["actions"]
    assert head.time.numerics == "jax" and head.flow.numerics == "jax"
    assert torch.equal(model.grid(), time_grid(num_steps=10, numerics="jax"))
    assert torch.equal(model.grid(4), time_grid(num_steps=4, numerics="jax"))
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, model.config.action_horizon, model.config.action_dim, generator=g)
    t = torch.tensor([0.37, 0.91])
    tokens, cond = head.embed(x_t, t)
    mlp = ("time_mlp_in", "time_mlp_out") if model.config.pi05 else ("action_time_mlp_in", "action_time_mlp_out")
    ref_tokens, ref_cond = embed_suffix(x_t, t, model.action_in_proj, *(getattr(model, n) for n in mlp),
                                        model.config.pi05, dtype=np.float32)
    assert (tokens - ref_tokens).abs().max() < 1e-5
    if cond is not None:
        assert (cond - ref_cond).abs().max() < 1e-5
    batch = fixed_batch(model)
    loss, _ = model(batch)
    assert torch.isfinite(loss)
    assert torch.isfinite(model.predict_action_chunk(batch)).all()


def test_time_modules_validate_numerics():
    for cls in (ConcatTimeMLP, AdaRMSTimeMLP):
        with pytest.raises(ValueError, match="numerics"):
            cls(8, numerics="np")
    with pytest.raises(ValueError, match="numerics"):
        FlowHead(4, 8, flow=FlowMatching(numerics="np"))
    # euler_sample with a jax grid and the default (torch) step would use grid differences: both integrate
    x = euler_sample(lambda x, t: x, torch.ones(2), time_grid(num_steps=4, numerics="jax"), numerics="jax")
    assert torch.isfinite(x).all()
