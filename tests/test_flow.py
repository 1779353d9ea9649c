"""Flow matching: samplers, path, losses, grids, Euler, CFG — each against a hand-written upstream formula."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from vla_blocks.config import ConfigError, decode, encode
from vla_blocks.flow import (BetaTimeSampler, FlowMatching, LogitNormalTimeSampler, TimeSamplerConfig,
                             UniformTimeSampler, cfg_in_interval, cfg_velocity, euler_sample, flow_loss,
                             interpolate, shift_time, time_grid, velocity_target)

from oracles.bagel import cfg as bagel_cfg
from oracles.openpi import sample_times


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ks_stat(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov–Smirnov statistic."""
    a, b = np.sort(a.double().numpy()), np.sort(b.double().numpy())
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


# ---------------------------------------------------------------------------------------------- samplers
def test_beta_sampler_openpi_moments_and_range():
    t = BetaTimeSampler().sample((200_000,), generator=gen(0))
    assert t.dtype == torch.float32 and t.shape == (200_000,)
    # openpi: t = Beta(1.5, 1)·0.999 + 0.001
    a, b = 1.5, 1.0
    mean_b = a / (a + b)
    var_b = a * b / ((a + b) ** 2 * (a + b + 1))
    assert abs(t.mean().item() - (0.999 * mean_b + 0.001)) < 3e-3
    assert abs(t.var().item() - 0.999 ** 2 * var_b) < 2e-3
    assert t.min() >= 0.001 and t.max() <= 1.0
    # CDF of Beta(1.5, 1) is x^1.5
    x = (t.double() - 0.001) / 0.999
    for q in (0.1, 0.3, 0.5, 0.7, 0.9):
        assert abs((x <= q).double().mean().item() - q ** 1.5) < 5e-3


@pytest.mark.parametrize("alpha,beta", [(2.0, 3.0), (0.5, 0.5), (1.0, 2.5)])
def test_beta_sampler_general_matches_torch_distribution(alpha, beta):
    ours = BetaTimeSampler(alpha=alpha, beta=beta, scale=1.0, offset=0.0).sample((50_000,), generator=gen(1))
    torch.manual_seed(2)
    ref = torch.distributions.Beta(alpha, beta).sample((50_000,))
    assert ks_stat(ours, ref) < 0.015  # ~ the 0.1 % critical value for n = m = 50k


def test_samplers_are_deterministic_with_generator_and_float32():
    for s in (BetaTimeSampler(), BetaTimeSampler(alpha=2.0, beta=2.0), LogitNormalTimeSampler(shift=3.0),
              UniformTimeSampler()):
        a, b = s.sample((4, 5), generator=gen(7)), s.sample((4, 5), generator=gen(7))
        assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape == (4, 5)
        assert isinstance(s, TimeSamplerConfig)


def test_logit_normal_matches_bagel_formula():
    s = LogitNormalTimeSampler(mean=0.2, std=1.3, shift=3.0)
    t = s.sample((1000,), generator=gen(3))
    n = torch.randn((1000,), generator=gen(3))
    ref = torch.sigmoid(n * 1.3 + 0.2)
    ref = 3.0 * ref / (1.0 + 2.0 * ref)
    torch.testing.assert_close(t, ref)


def test_uniform_sampler_range_and_mean():
    t = UniformTimeSampler(0.2, 0.6).sample(100_000, generator=gen(4))
    assert t.min() >= 0.2 and t.max() <= 0.6 and abs(t.mean().item() - 0.4) < 3e-3


def test_sampler_bad_parameters():
    with pytest.raises(ValueError):
        BetaTimeSampler(alpha=0.0)
    with pytest.raises(ValueError):
        LogitNormalTimeSampler(shift=0.0)
    with pytest.raises(ValueError):
        UniformTimeSampler(0.7, 0.2)
    with pytest.raises(ValueError):
        UniformTimeSampler().sample((-1,))


# ---------------------------------------------------------------------------------------------- path
def test_shift_time_formula_and_endpoints():
    t = torch.linspace(0, 1, 11)
    for s in (0.5, 1.0, 3.0):
        torch.testing.assert_close(shift_time(t, s), s * t / (1 + (s - 1) * t))
    assert shift_time(torch.tensor([0.5]), 3.0).item() == pytest.approx(0.75)
    assert shift_time(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError):
        shift_time(t, -1.0)


def test_interpolate_and_target_openpi_convention():
    x0, eps = torch.randn(3, 4, 5, generator=gen(0)), torch.randn(3, 4, 5, generator=gen(1))
    t = torch.tensor([0.0, 0.3, 1.0])
    xt = interpolate(x0, eps, t)
    ref = t[:, None, None] * eps + (1 - t[:, None, None]) * x0
    torch.testing.assert_close(xt, ref)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], eps[2])
    torch.testing.assert_close(velocity_target(x0, eps), eps - x0)
    # per-token t ([B, L]) broadcasts over channels
    tt = torch.rand(3, 4, generator=gen(2))
    torch.testing.assert_close(interpolate(x0, eps, tt), tt[..., None] * eps + (1 - tt[..., None]) * x0)
    # the model dtype is kept
    assert interpolate(x0.bfloat16(), eps.bfloat16(), t).dtype == torch.bfloat16


def test_interpolate_bad_input():
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="NaN"):
        interpolate(x0, x0, torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="leading dims"):
        interpolate(x0, x0, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="same shape"):
        interpolate(x0, torch.zeros(2, 4), torch.tensor([0.1, 0.2]))


# ---------------------------------------------------------------------------------------------- loss
def test_flow_loss_mean_is_openpi():
    pred, tgt = torch.randn(2, 10, 32, generator=gen(0)), torch.randn(2, 10, 32, generator=gen(1))
    # openpi: mean((v − u)², axis=-1) → (B, H), then the trainer's mean
    ref = ((pred - tgt) ** 2).mean(-1).mean()
    torch.testing.assert_close(flow_loss(pred, tgt, reduction="mean"), ref)
    # only the real 7 dims
    dm = torch.arange(32) < 7
    ref7 = ((pred[..., :7] - tgt[..., :7]) ** 2).mean()
    torch.testing.assert_close(flow_loss(pred, tgt, reduction="mean", dim_mask=dm), ref7)


def test_flow_loss_token_mean_is_bagel_halo():
    pred, tgt = torch.randn(2, 6, 64, generator=gen(0)), torch.randn(2, 6, 64, generator=gen(1))
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    # BAGEL: mse.mean(-1) over the selected tokens, summed, divided by the token count
    mse = ((pred - tgt) ** 2)[mask].mean(-1)
    torch.testing.assert_close(flow_loss(pred, tgt, "mse", token_mask=mask), mse.sum() / mask.sum())
    # HALO: the same recipe with L1
    l1 = (pred - tgt).abs()[mask].mean(-1)
    torch.testing.assert_close(flow_loss(pred, tgt, "l1", token_mask=mask), l1.sum() / mask.sum())
    # the two reductions differ once a dim mask makes tokens unequal… but agree without one
    torch.testing.assert_close(flow_loss(pred, tgt, token_mask=mask, reduction="mean"),
                               flow_loss(pred, tgt, token_mask=mask, reduction="token_mean"))


def test_flow_loss_empty_mask_is_zero_with_grad():
    pred = torch.randn(2, 3, 4, requires_grad=True)
    loss = flow_loss(pred, torch.zeros(2, 3, 4), token_mask=torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_flow_loss_bad_input():
    p = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="reduction"):
        flow_loss(p, p, reduction="sum")
    with pytest.raises(ValueError, match="kind"):
        flow_loss(p, p, kind="huber")
    with pytest.raises(ValueError, match="same shape"):
        flow_loss(p, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="token_mask"):
        flow_loss(p, p, token_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="dim_mask"):
        flow_loss(p, p, dim_mask=torch.ones(4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- grids and Euler
def test_time_grid_openpi_steps():
    g = time_grid(num_steps=10)
    assert g.dtype == torch.float32 and g.numel() == 11 and g[0] == 1.0 and g[-1] == 0.0
    assert len(sample_times(10)) == 10
    np.testing.assert_allclose(g[:-1].numpy(), sample_times(10), atol=1e-6)
    np.testing.assert_allclose((g[1:] - g[:-1]).numpy(), -0.1, atol=1e-6)


def test_time_grid_bagel_linspace_with_shift():
    g = time_grid(points=10)
    torch.testing.assert_close(g, torch.linspace(1, 0, 10))
    g50 = time_grid(points=50, shift=3.0)
    ref = torch.linspace(1, 0, 50, dtype=torch.float64)
    ref = (3 * ref / (1 + 2 * ref)).float()
    torch.testing.assert_close(g50, ref)
    assert g50[0] == 1.0 and g50[-1] == 0.0


def test_time_grid_bad_input():
    with pytest.raises(ValueError):
        time_grid()
    with pytest.raises(ValueError):
        time_grid(num_steps=10, points=10)
    with pytest.raises(ValueError):
        time_grid(num_steps=0)
    with pytest.raises(ValueError):
        time_grid(points=1)


def test_euler_matches_openpi_loop():
    def v(x, t):
        return torch.sin(x) * t + 0.3 * x

    x = torch.randn(4, 3, generator=gen(0))
    calls = []
    out = euler_sample(lambda x, t: calls.append(float(t)) or v(x, t), x, time_grid(num_steps=10))
    assert len(calls) == 10
    np.testing.assert_allclose(calls, sample_times(10), atol=1e-6)
    # openpi: x ← x + dt·v(x, t), t ← t + dt
    ref, t, dt = x.clone(), 1.0, -0.1
    while t >= -dt / 2:
        ref = ref + dt * v(ref, torch.tensor(t))
        t += dt
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_euler_matches_bagel_loop():
    def v(x, t):
        return x * t - 1.0

    x = torch.randn(6, 64, generator=gen(1))
    calls = []
    out, traj = euler_sample(lambda x, t: calls.append(float(t)) or v(x, t), x, time_grid(points=10, shift=3.0),
                             return_trajectory=True)
    assert len(calls) == 9 and len(traj) == 10 and torch.equal(traj[0], x) and torch.equal(traj[-1], out)
    # BAGEL: timesteps = shift(linspace(1, 0, n)); dts = t[:-1] − t[1:]; x ← x − v·dts[i]
    ts = torch.linspace(1, 0, 10)
    ts = 3 * ts / (1 + 2 * ts)
    ref = x.clone()
    for i in range(9):
        ref = ref - v(ref, ts[i]) * (ts[i] - ts[i + 1])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_euler_constant_velocity_integrates_exactly():
    x = torch.randn(5, 2, generator=gen(2))
    c = torch.tensor([0.5, -2.0])
    out = euler_sample(lambda x, t: c.expand_as(x), x, time_grid(points=7, shift=2.0))
    torch.testing.assert_close(out, x - c)  # ∫₁⁰ c dt = −c


def test_euler_bad_input():
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="descending"):
        euler_sample(lambda x, t: x, x, torch.linspace(0, 1, 5))
    with pytest.raises(ValueError, match="shape"):
        euler_sample(lambda x, t: x[:1], x, time_grid(num_steps=2))
    with pytest.raises(ValueError, match="NaN"):
        euler_sample(lambda x, t: x, x, torch.tensor([1.0, float("nan"), 0.0]))


# ---------------------------------------------------------------------------------------------- CFG
@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
@pytest.mark.parametrize("scales", [(4.0, 2.0), (4.0, 1.0), (1.0, 2.0), (1.5, 1.5), (0.5, 3.0)])
@pytest.mark.parametrize("renorm_min", [0.0, 0.9])
def test_cfg_matches_bagel(renorm, scales, renorm_min):
    v, vt, vi = (torch.randn(37, 64, generator=gen(i)) for i in range(3))
    st, si = scales
    out = cfg_velocity(v, vt, vi, text_scale=st, image_scale=si, renorm=renorm, renorm_min=renorm_min)
    torch.testing.assert_close(out, bagel_cfg(v, vt, vi, st, si, renorm, renorm_min))


def test_cfg_global_renorm_clamps_norm_and_batched_is_per_sample():
    v, vt, vi = (torch.randn(3, 20, 16, generator=gen(i)) for i in range(3))
    out = cfg_velocity(v, vt, vi, 4.0, 2.0, renorm="global")
    assert out.norm() <= v.norm() * (1 + 1e-5)
    ob = cfg_velocity(v, vt, vi, 4.0, 2.0, renorm="global", batched=True)
    for b in range(3):
        torch.testing.assert_close(ob[b], cfg_velocity(v[b], vt[b], vi[b], 4.0, 2.0, renorm="global"))
        assert ob[b].norm() <= v[b].norm() * (1 + 1e-5)
    none = cfg_velocity(v, vt, vi, 4.0, 2.0, renorm="none")
    torch.testing.assert_close(none, vi + 2.0 * (vt + 4.0 * (v - vt) - vi))


def test_cfg_bad_input_and_interval():
    v = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="renorm"):
        cfg_velocity(v, v, v, 2.0, 2.0, renorm="per_image")
    with pytest.raises(ValueError, match="shape"):
        cfg_velocity(v, torch.zeros(3, 2), None, 2.0)
    # BAGEL cfg_interval [0.4, 1.0]: on when 0.4 < t ≤ 1
    assert [cfg_in_interval(t) for t in (0.0, 0.4, 0.41, 1.0)] == [False, False, True, True]
    assert cfg_in_interval(torch.tensor(0.5), (0.6, 1.0)) is False
    with pytest.raises(ValueError):
        cfg_in_interval(float("nan"))


# ---------------------------------------------------------------------------------------------- the bundle
def test_flow_matching_training_pair_and_dtypes():
    fm = FlowMatching()
    x0 = torch.randn(4, 10, 32).bfloat16()
    xt, t, u = fm.training_pair(x0, generator=gen(0))
    assert t.dtype == torch.float32 and t.shape == (4,) and xt.dtype == torch.bfloat16
    g = gen(0)
    eps = torch.randn(x0.shape, generator=g).bfloat16()
    t_ref = BetaTimeSampler().sample((4,), generator=g)
    torch.testing.assert_close(t, t_ref)
    torch.testing.assert_close(xt, interpolate(x0, eps, t_ref))
    torch.testing.assert_close(u, eps - x0)


def test_flow_matching_from_recipe_data():
    fm = decode(FlowMatching, {"time_sampler": {"type": "logit_normal", "shift": 3.0}, "loss_kind": "l1",
                               "reduction": "token_mean", "points": 50, "shift": 3.0})
    assert isinstance(fm.time_sampler, LogitNormalTimeSampler) and fm.time_sampler.shift == 3.0
    assert fm.num_steps is None and fm.grid().numel() == 50
    assert decode(FlowMatching, encode(fm)) == fm
    with pytest.raises(ConfigError, match="beta"):
        decode(FlowMatching, {"time_sampler": {"type": "betta"}})
    with pytest.raises(ConfigError):
        decode(FlowMatching, {"reduction": "sum"})


def test_flow_matching_sample_counts_steps():
    calls = []
    fm = FlowMatching(LogitNormalTimeSampler(), "l1", "token_mean", num_steps=None, points=10)
    out = fm.sample(lambda x, t: calls.append(t) or torch.zeros_like(x), (2, 16, 14), generator=gen(0))
    assert len(calls) == 9
    torch.testing.assert_close(out, torch.randn((2, 16, 14), generator=gen(0)))  # zero velocity: x stays noise


# ---------------------------------------------------------------------------------------------- learning
class TinyVelocity(nn.Module):
    def __init__(self, width=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 16, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2))

    def forward(self, x, t):
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        k = torch.arange(8, dtype=torch.float32)
        temb = torch.cat([torch.sin(t[:, None] * (2 ** k) * math.pi / 2),
                          torch.cos(t[:, None] * (2 ** k) * math.pi / 2)], -1)
        return self.net(torch.cat([x, temb], -1))


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention
    yield
    torch.set_num_threads(n)


def test_flow_head_learns_gaussian_mixture(one_thread):
    torch.manual_seed(0)
    g = gen(0)
    centers = torch.tensor([[-2.0, 0.0], [2.0, 1.0]])
    std = 0.3

    def data(n):
        k = torch.randint(0, 2, (n,), generator=g)
        return centers[k] + std * torch.randn(n, 2, generator=g)

    fm = FlowMatching(UniformTimeSampler(), "mse", "mean", num_steps=40)
    net = TinyVelocity()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1000)
    for _ in range(1000):
        xt, t, u = fm.training_pair(data(256), generator=g)
        loss = fm.loss(net(xt, t), u)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        s = fm.sample(net, (4000, 2), generator=gen(1))
    # target moments: mean (0, 0.5); cov [[4 + σ², 1], [1, 0.25 + σ²]]
    mean = s.mean(0)
    cov = torch.cov(s.T)
    assert torch.allclose(mean, torch.tensor([0.0, 0.5]), atol=0.15), mean
    ref_cov = torch.tensor([[4.0 + std ** 2, 1.0], [1.0, 0.25 + std ** 2]])
    assert torch.allclose(cov, ref_cov, atol=0.25, rtol=0.1), cov
    # and it is bimodal: most samples sit near one of the two modes
    d = torch.cdist(s, centers).min(1).values
    assert (d < 4 * std).float().mean() > 0.9
