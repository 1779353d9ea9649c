"""Flow matching: time samplers, the interpolation path, losses, time grids, Euler sampling, CFG.

One convention everywhere (DESIGN.md §4): **t = 1 is noise, t = 0 is data**::

    x_t = t·ε + (1−t)·x0          target u = ε − x0          Euler from t = 1 down to t = 0

openpi pi0/pi0.5 (Beta time, MSE, 10 steps), BAGEL images (logit-normal time with shift, MSE,
50-point grid, CFG) and HALO actions (logit-normal time, L1, 10-point grid) are all this
convention with different settings of :class:`FlowMatching`.

Example::

    fm = FlowMatching(time_sampler=BetaTimeSampler(), loss="mse", reduction="mean", num_steps=10)
    x_t, t, target = fm.training_pair(actions)              # actions [B, H, D]
    loss = fm.loss(model(x_t, t), target)
    sample = fm.sample(lambda x, t: model(x, t.expand(x.shape[0])), actions.shape)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from .config import ComponentConfig, register

__all__ = [
    "TimeSamplerConfig", "BetaTimeSampler", "LogitNormalTimeSampler", "UniformTimeSampler",
    "shift_time", "interpolate", "velocity_target", "flow_loss", "time_grid", "euler_sample",
    "cfg_velocity", "cfg_in_interval", "FlowMatching",
]


# ---------------------------------------------------------------------------------------------- checks
def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as e:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from e
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {shape}")
    return shape


def _check_finite_t(t: torch.Tensor, what: str = "t"):
    if torch.isnan(t).any():
        raise ValueError(f"{what} contains NaN")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains inf")


def _gen_device(generator, device):
    if device is None and generator is not None:
        device = generator.device
    return device


# ---------------------------------------------------------------------------------------------- time samplers
class TimeSamplerConfig(ComponentConfig, slot="time_sampler"):
    """Slot base of training-time samplers. ``sample`` always returns float32 t in [0, 1].

    Example (a recipe field): ``decode(TimeSamplerConfig, {"type": "beta"}).sample((B,), generator=g)``.
    """

    def sample(self, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training times of ``shape``, float32 in [0, 1], drawn from ``generator`` (on its device by default)."""
        raise NotImplementedError

    def build(self):
        """The sampler itself (a config that is its own component)."""
        return self


def _sample_gamma(conc: float, shape, generator, device) -> torch.Tensor:
    """Gamma(conc, 1) with an explicit generator (Marsaglia–Tsang; boosting for conc < 1)."""
    boost = conc < 1.0
    a = conc + 1.0 if boost else conc
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    n = int(math.prod(shape))
    out = torch.empty(n, dtype=torch.float64, device=device)
    todo = torch.arange(n, device=device)
    while todo.numel():
        m = todo.numel()
        x = torch.randn(m, generator=generator, device=device, dtype=torch.float64)
        u = torch.rand(m, generator=generator, device=device, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-300)) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        out[todo[ok]] = (d * v)[ok]
        todo = todo[~ok]
    if boost:
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        out = out * u.pow(1.0 / conc)
    return out.reshape(shape)


@register("time_sampler", "beta")
@dataclass
class BetaTimeSampler(TimeSamplerConfig):
    """openpi pi0: ``t = Beta(alpha, beta)·scale + offset`` (default Beta(1.5, 1)·0.999 + 0.001).

    The density ∝ t^0.5 leans toward t = 1 (noise). Example::

        t = BetaTimeSampler().sample((8,), generator=torch.Generator().manual_seed(0))
    """

    alpha: float = 1.5  # Beta's first shape parameter, > 0 (openpi pi0/pi0.5, ACoT: 1.5)
    beta: float = 1.0  # Beta's second shape parameter, > 0 (openpi: 1.0)
    scale: float = 0.999  # t = Beta·scale + offset: keeps t in [offset, offset + scale] (openpi: 0.999)
    offset: float = 0.001  # smallest t, so the loss never sees pure data (openpi: 0.001)

    def __post_init__(self):
        if not (self.alpha > 0 and self.beta > 0):
            raise ValueError(f"Beta parameters must be > 0, got alpha={self.alpha}, beta={self.beta}")

    def sample(self, shape, generator=None, device=None) -> torch.Tensor:
        """``Beta(alpha, beta)·scale + offset`` of ``shape`` (float32; drawn in float64)."""
        shape = _check_shape(shape)
        device = _gen_device(generator, device)
        if self.beta == 1.0:  # inverse CDF of Beta(a, 1): U^(1/a)
            u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
            b = u.pow(1.0 / self.alpha)
        elif self.alpha == 1.0:
            u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
            b = 1.0 - u.pow(1.0 / self.beta)
        else:
            ga = _sample_gamma(self.alpha, shape, generator, device)
            gb = _sample_gamma(self.beta, shape, generator, device)
            b = ga / (ga + gb)
        return (b * self.scale + self.offset).to(torch.float32)


@register("time_sampler", "logit_normal")
@dataclass
class LogitNormalTimeSampler(TimeSamplerConfig):
    """BAGEL / HALO: ``t = sigmoid(N(mean, std))``, then ``shift_time(t, shift)``.

    BAGEL trains images with shift 1.0 (code default); HALO actions use no shift. Example::

        t = LogitNormalTimeSampler(shift=3.0).sample(4)
    """

    mean: float = 0.0  # mean of the normal before the sigmoid (BAGEL/HALO: 0)
    std: float = 1.0  # standard deviation of the normal, >= 0 (BAGEL/HALO: 1)
    shift: float = 1.0  # time shift s·t / (1 + (s−1)·t) after the sigmoid, > 0 (1: none; BAGEL/HALO training: 1)

    def __post_init__(self):
        if not self.std >= 0:
            raise ValueError(f"std must be >= 0, got {self.std}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    def sample(self, shape, generator=None, device=None) -> torch.Tensor:
        """``shift_time(sigmoid(N(mean, std)), shift)`` of ``shape`` (float32)."""
        shape = _check_shape(shape)
        device = _gen_device(generator, device)
        n = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        t = torch.sigmoid(n * self.std + self.mean)
        return shift_time(t, self.shift)


@register("time_sampler", "uniform")
@dataclass
class UniformTimeSampler(TimeSamplerConfig):
    """``t ~ U(low, high)``. Example: ``UniformTimeSampler().sample((2, 3))``."""

    low: float = 0.0  # lower bound of t, in [0, high]
    high: float = 1.0  # upper bound of t, in [low, 1]

    def __post_init__(self):
        if not (0.0 <= self.low <= self.high <= 1.0):
            raise ValueError(f"need 0 <= low <= high <= 1, got low={self.low}, high={self.high}")

    def sample(self, shape, generator=None, device=None) -> torch.Tensor:
        """``U(low, high)`` of ``shape`` (float32)."""
        shape = _check_shape(shape)
        device = _gen_device(generator, device)
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
        return u * (self.high - self.low) + self.low


# ---------------------------------------------------------------------------------------------- the path
def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3/BAGEL time shift ``s·t / (1 + (s−1)·t)``; keeps 0 and 1 fixed, ``s > 1`` pushes t toward noise.

    Example: ``shift_time(torch.tensor([0.5]), 3.0)`` → ``tensor([0.75])``.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def _expand_t(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t), device=x.device)
    _check_finite_t(t)
    if t.ndim > x.ndim or any(a not in (1, b) for a, b in zip(t.shape, x.shape)):
        raise ValueError(f"t of shape {tuple(t.shape)} must match the leading dims of x {tuple(x.shape)}")
    return t.reshape(tuple(t.shape) + (1,) * (x.ndim - t.ndim))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """``x_t = t·noise + (1−t)·x0``, with ``t`` ([B], [B, L] … a prefix of x0's shape) broadcast over the
    trailing dims. Computed in float32, returned in ``x0.dtype``.

    Example: ``x_t = interpolate(actions, torch.randn_like(actions), t)`` with ``t`` of shape [B].
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    tt = _expand_t(t, x0).float()
    return (tt * noise.float() + (1.0 - tt) * x0.float()).to(x0.dtype)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching target ``u = noise − x0`` (points from data to noise). Example: ``velocity_target(a, eps)``."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    return noise - x0


# ---------------------------------------------------------------------------------------------- loss
def flow_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse",
              token_mask: torch.Tensor | None = None, dim_mask: torch.Tensor | None = None,
              reduction: str = "token_mean") -> torch.Tensor:
    """Scalar flow-matching loss, computed in float32.

    - ``kind``: ``"mse"`` (squared error) or ``"l1"`` (absolute error; HALO actions).
    - ``token_mask``: bool, shape ``pred.shape[:-1]``; only True tokens count.
    - ``dim_mask``: bool, broadcastable to ``pred`` along the last dim (e.g. [C] with the real action
      dims True); only True channels count.
    - ``reduction="mean"``: openpi's plain mean over every counted element (all padded action dims
      included unless ``dim_mask`` says otherwise).
      ``reduction="token_mean"``: BAGEL/HALO's mean over channels per token, then the mean over the
      counted tokens (a global per-token mean).
    With no counted token the loss is an exact 0 that keeps the graph (so DDP sees every parameter).

    Example: ``flow_loss(v, eps - a, kind="l1", reduction="token_mean")``.
    """
    if kind not in ("mse", "l1"):
        raise ValueError(f"unknown loss kind {kind!r} (valid: 'mse', 'l1')")
    if reduction not in ("token_mean", "mean"):
        raise ValueError(f"unknown reduction {reduction!r} (valid: 'token_mean', 'mean')")
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    if pred.ndim < 1:
        raise ValueError("pred must have a channel dimension")
    diff = pred.float() - target.float()
    err = diff.square() if kind == "mse" else diff.abs()
    C = err.shape[-1]
    if dim_mask is not None:
        dim_mask = dim_mask.to(device=err.device)
        if dim_mask.shape[-1] != C:
            raise ValueError(f"dim_mask last dim {dim_mask.shape[-1]} != channels {C}")
        dm = dim_mask.to(torch.bool).expand(err.shape).float()
    else:
        dm = None
    if token_mask is not None:
        token_mask = token_mask.to(device=err.device)
        if tuple(token_mask.shape) != tuple(err.shape[:-1]):
            raise ValueError(f"token_mask shape {tuple(token_mask.shape)} must be pred.shape[:-1] = "
                             f"{tuple(err.shape[:-1])}")
        tm = token_mask.to(torch.bool).float()
    else:
        tm = torch.ones(err.shape[:-1], device=err.device)
    zero = err.sum() * 0.0
    if reduction == "mean":
        w = tm.unsqueeze(-1).expand(err.shape) if dm is None else tm.unsqueeze(-1) * dm
        n = w.sum()
        return zero if n == 0 else (err * w).sum() / n
    if dm is None:
        per_tok = err.mean(-1)
    else:
        per_tok = (err * dm).sum(-1) / dm.sum(-1).clamp_min(1.0)
    n = tm.sum()
    return zero if n == 0 else (per_tok * tm).sum() / n


# ---------------------------------------------------------------------------------------------- sampling
def time_grid(num_steps: int | None = None, points: int | None = None, shift: float = 1.0,
              device=None, numerics: str = "torch") -> torch.Tensor:
    """Descending float32 time grid from 1 to 0 (exact endpoints), with ``shift_time`` applied.

    Give exactly one of ``num_steps`` (openpi: dt = −1/num_steps, so num_steps + 1 points) or
    ``points`` (BAGEL/HALO: ``linspace(1, 0, points)``, so points − 1 Euler steps).

    ``numerics="jax"`` (``num_steps``, no shift): openpi's JAX loop instead — ``t = 1``, then ``t += dt`` in
    float32 while ``t ≥ −dt/2`` (1, 0.9, 0.79999995, …); the last point is where the loop stops (about 0, not
    exactly). Integrate it with :func:`euler_sample` ``numerics="jax"`` (a constant float32 ``dt``).

    Example: ``time_grid(num_steps=10)`` has 11 points; ``time_grid(points=50, shift=3.0)`` has 50.
    """
    from .conditioning import _check_numerics
    if (num_steps is None) == (points is None):
        raise ValueError("give exactly one of num_steps and points")
    n = num_steps + 1 if num_steps is not None else points
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"need num_steps >= 1 or points >= 2, got num_steps={num_steps}, points={points}")
    if _check_numerics(numerics) == "jax":
        if num_steps is None or shift != 1.0:
            raise ValueError(f"numerics='jax' is openpi's uniform loop: it needs num_steps and shift 1 "
                             f"(got num_steps={num_steps}, points={points}, shift={shift})")
        dt = torch.tensor(-1.0 / num_steps, dtype=torch.float32)
        stop = torch.tensor(-(-1.0 / num_steps) / 2, dtype=torch.float32)
        t, out = torch.tensor(1.0, dtype=torch.float32), []
        while bool(t >= stop):
            out.append(t)
            t = t + dt
        out.append(t)
        return torch.stack(out).to(device)
    g = torch.linspace(1.0, 0.0, n, dtype=torch.float64)
    g = shift_time(g, shift)
    return g.to(device=device, dtype=torch.float32)


def euler_sample(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                 grid: torch.Tensor, return_trajectory: bool = False, numerics: str = "torch"):
    """Integrate ``dx/dt = velocity_fn(x, t)`` along ``grid`` (descending, 1 → 0).

    ``velocity_fn(x_t, t)`` gets ``t`` as a 0-d float32 tensor; each step is
    ``x ← x + (t_{i+1} − t_i)·v`` (``numerics="jax"``: ``x ← x + dt·v`` with openpi's constant float32
    ``dt = −1/steps``, for a :func:`time_grid` ``numerics="jax"`` grid). Returns ``x`` or
    ``(x, [x at every grid point])``.

    Example: ``x0 = euler_sample(lambda x, t: net(x, t.expand(len(x))), torch.randn(B, 2), time_grid(num_steps=10))``.
    """
    from .conditioning import _check_numerics
    if not isinstance(grid, torch.Tensor) or grid.ndim != 1 or grid.numel() < 2:
        raise ValueError("grid must be a 1-D tensor with at least 2 points")
    _check_finite_t(grid, "grid")
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError("grid must be strictly descending (t = 1 noise → t = 0 data)")
    grid = grid.to(device=x.device, dtype=torch.float32)
    const_dt = None
    if _check_numerics(numerics) == "jax":
        const_dt = torch.tensor(-1.0 / (grid.numel() - 1), dtype=torch.float32, device=x.device)
    traj = [x] if return_trajectory else None
    for i in range(grid.numel() - 1):
        t = grid[i]
        v = velocity_fn(x, t)
        if v.shape != x.shape:
            raise ValueError(f"velocity_fn returned shape {tuple(v.shape)} for x of shape {tuple(x.shape)}")
        dt = grid[i + 1] - t if const_dt is None else const_dt
        x = (x.float() + dt * v.float()).to(x.dtype)
        if traj is not None:
            traj.append(x)
    return (x, traj) if return_trajectory else x


def cfg_velocity(v_cond: torch.Tensor, v_no_text: torch.Tensor | None = None,
                 v_no_image: torch.Tensor | None = None, text_scale: float = 1.0, image_scale: float = 1.0,
                 renorm: str = "global", renorm_min: float = 0.0, batched: bool = False,
                 eps: float = 1e-8) -> torch.Tensor:
    """BAGEL's two-condition classifier-free guidance with norm clamping.

    Guidance is on only when ``v_no_text`` is given and ``text_scale > 1`` (otherwise ``v_cond`` comes
    back untouched, no renorm: BAGEL nests image guidance inside text guidance, and runs neither
    outside ``cfg_interval``, where it sets both scales to 1). Then
    ``v_txt = v_no_text + text_scale·(v_cond − v_no_text)``,
    ``v_cfg = v_no_image + image_scale·(v_txt − v_no_image)`` (only when ``v_no_image`` is given and
    ``image_scale > 1``; else ``v_cfg = v_txt``),
    then ``v = v_cfg·clamp(‖v_cond‖ / (‖v_cfg‖ + eps), renorm_min, 1)`` where the norms are

    - ``renorm="global"``: over the whole tensor (BAGEL, batch 1 / one packed image). With
      ``batched=True`` dim 0 is the batch and each sample gets its own norm over its other dims.
    - ``renorm="channel"``: per token, over the last dim.
    - ``renorm="text_channel"``: BAGEL's editing mode: the per-token renorm is applied to ``v_txt``
      (against ``v_cond``) before the image guidance, and the result is not renormed again.
    - ``renorm="none"``: no clamping.

    Example: ``v = cfg_velocity(v, v_no_text, v_no_img, text_scale=4.0, image_scale=2.0)``.
    """
    if renorm not in ("global", "channel", "text_channel", "none"):
        raise ValueError(f"unknown renorm {renorm!r} (valid: 'global', 'channel', 'text_channel', 'none')")
    for name, v in (("v_no_text", v_no_text), ("v_no_image", v_no_image)):
        if v is not None and v.shape != v_cond.shape:
            raise ValueError(f"{name} {tuple(v.shape)} must have v_cond's shape {tuple(v_cond.shape)}")

    def _norm(v, per_token):
        v = v.float()
        if per_token:
            return v.norm(dim=-1, keepdim=True)
        if batched:
            return v.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (v.ndim - 1))
        return v.norm()

    def _clamp(v_ref, v, per_token):
        s = (_norm(v_ref, per_token) / (_norm(v, per_token) + eps)).clamp(min=renorm_min, max=1.0)
        return (v.float() * s).to(v.dtype)

    if v_no_text is None or text_scale <= 1.0:
        return v_cond  # BAGEL: no guidance at all (and no renorm) unless text guidance is on
    use_image = v_no_image is not None and image_scale > 1.0
    v_txt = v_no_text + text_scale * (v_cond - v_no_text)
    if renorm == "text_channel":
        v_txt = _clamp(v_cond, v_txt, True)
        return v_no_image + image_scale * (v_txt - v_no_image) if use_image else v_txt
    v_cfg = v_no_image + image_scale * (v_txt - v_no_image) if use_image else v_txt
    if renorm == "none":
        return v_cfg
    return _clamp(v_cond, v_cfg, renorm == "channel")


def cfg_in_interval(t: torch.Tensor | float, interval: tuple[float, float] = (0.4, 1.0)) -> bool:
    """True when CFG applies at time ``t``: ``lo < t ≤ hi`` (BAGEL ``cfg_interval``, default [0.4, 1]).

    Example: ``cfg_in_interval(0.4)`` → False, ``cfg_in_interval(1.0)`` → True.
    """
    lo, hi = interval
    t = float(t)
    if math.isnan(t):
        raise ValueError("t is NaN")
    return lo < t <= hi


# ---------------------------------------------------------------------------------------------- bundle
@dataclass
class FlowMatching:
    """A flow-matching recipe: time sampler, loss, reduction and sampling grid (a recipe field).

    ``numerics``: ``torch`` (float64 time embedding, float64 ``linspace`` grid) or ``jax`` (openpi / ACoT-VLA's
    JAX float32 embedding and ``t += dt`` Euler time; see :data:`vla_blocks.conditioning.NUMERICS`); flow heads
    pass it to their time conditioning and sampler.

    Presets: openpi ``FlowMatching()`` (Beta, MSE, plain mean, 10 steps); BAGEL images
    ``FlowMatching(LogitNormalTimeSampler(), "mse", "token_mean", points=50, shift=3.0)``; HALO actions
    ``FlowMatching(LogitNormalTimeSampler(), "l1", "token_mean", points=10)``.

    Example::

        fm = FlowMatching()
        x_t, t, u = fm.training_pair(actions)          # t: [B] float32
        loss = fm.loss(v_pred, u)
        actions = fm.sample(lambda x, t: v(x, t), (B, H, D))
    """

    # training-time sampler (a ``time_sampler`` component: beta | logit_normal | uniform; openpi: Beta(1.5, 1))
    time_sampler: TimeSamplerConfig = field(default_factory=BetaTimeSampler)
    loss_kind: Literal["mse", "l1"] = "mse"  # mse: squared error (openpi, BAGEL images); l1: absolute (HALO actions)
    # mean: plain mean over every element (openpi, padded dims included); token_mean: mean per token over channels,
    # then over tokens (BAGEL/HALO)
    reduction: Literal["token_mean", "mean"] = "mean"
    # Euler steps of the sampler, dt = −1/num_steps (openpi: 10); set to None when ``points`` is given
    num_steps: int | None = 10
    points: int | None = None  # grid points linspace(1, 0, points), i.e. points − 1 Euler steps (BAGEL 50, HALO 10)
    shift: float = 1.0  # time shift s·t / (1 + (s−1)·t) of the sampling grid (1: none; BAGEL image sampling: 3)
    # time arithmetic: torch (float64 sin-cos embedding, float64 grid) or jax (openpi/ACoT: float32 embedding, t += dt)
    numerics: Literal["torch", "jax"] = "torch"

    def __post_init__(self):
        if self.loss_kind not in ("mse", "l1"):
            raise ValueError(f"unknown loss kind {self.loss_kind!r} (valid: 'mse', 'l1')")
        if self.reduction not in ("token_mean", "mean"):
            raise ValueError(f"unknown reduction {self.reduction!r} (valid: 'token_mean', 'mean')")
        if self.points is not None and self.num_steps is not None:
            self.num_steps = None  # `points` given (e.g. by a recipe override) wins over the default steps
        time_grid(self.num_steps, self.points, self.shift, numerics=self.numerics)  # validates

    def grid(self, device=None) -> torch.Tensor:
        """The sampling grid (see :func:`time_grid`)."""
        return time_grid(self.num_steps, self.points, self.shift, device=device, numerics=self.numerics)

    def training_pair(self, x0: torch.Tensor, generator: torch.Generator | None = None,
                      noise: torch.Tensor | None = None, t: torch.Tensor | None = None):
        """``(x_t, t, target)`` for clean ``x0`` [B, ...]: one t per sample ([B], float32) unless ``t`` is
        given; ``noise`` defaults to ``randn`` from ``generator``."""
        if x0.ndim < 1:
            raise ValueError("x0 must have a batch dimension")
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32).to(x0.dtype)
        if t is None:
            t = self.time_sampler.sample((x0.shape[0],), generator=generator, device=x0.device)
        t = t.to(device=x0.device, dtype=torch.float32)
        return interpolate(x0, noise, t), t, velocity_target(x0, noise)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, token_mask=None, dim_mask=None) -> torch.Tensor:
        """:func:`flow_loss` with this recipe's kind and reduction."""
        return flow_loss(pred, target, self.loss_kind, token_mask, dim_mask, self.reduction)

    def sample(self, velocity_fn, shape, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               device=None, dtype: torch.dtype = torch.float32, return_trajectory: bool = False):
        """Draw ``noise`` (or use the given one) of ``shape`` and integrate it to t = 0 with Euler."""
        if noise is None:
            shape = _check_shape(shape)
            device = _gen_device(generator, device)
            noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
        return euler_sample(velocity_fn, noise, self.grid(noise.device), return_trajectory, self.numerics)
