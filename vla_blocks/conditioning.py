"""Time conditioning and fixed sinusoidal tables.

- :func:`posemb_sincos` — openpi's time embedding (geometric periods in [min_period, max_period], [sin ‖ cos]).
- :func:`timestep_sinusoid` + :class:`TimestepEmbedder` — DiT/BAGEL/HALO time embedding ([cos ‖ sin], raw t).
- :func:`sincos_1d_table` — HALO's action-position table ([sin ‖ cos], exponent log(1e4)/(D/2 − 1)).
- :func:`sincos_2d_table` — BAGEL's fixed 2-D table for latent / ViT patches (flattened id h·max_side + w).
- :class:`ConcatTimeMLP` (pi0) and :class:`AdaRMSTimeMLP` (pi0.5: the cond of :class:`vla_blocks.mot.AdaRMSNorm`).

All embeddings are computed in float64 and returned in float32 (cast them to the model dtype yourself,
or let the modules here do it), except :func:`posemb_sincos` with ``numerics="jax"``, which computes in
float32 the way openpi's / ACoT-VLA's JAX code does (see :data:`NUMERICS`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NUMERICS", "posemb_sincos", "timestep_sinusoid", "sincos_1d_table", "sincos_2d_table", "TimestepEmbedder",
           "ConcatTimeMLP", "AdaRMSTimeMLP"]


def _as_time(t, what="t") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t, dtype=torch.float64)
    if t.is_floating_point() or t.is_complex():
        if torch.isnan(t).any():
            raise ValueError(f"{what} contains NaN")
    return t


def _check_dim(dim, even=True):
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if even and dim % 2:
        raise ValueError(f"dim must be even, got {dim}")


#: How time embeddings and Euler times are computed: ``torch`` (lerobot / vla_blocks: float64 embedding, a float64
#: ``linspace`` time grid) or ``jax`` (openpi / ACoT-VLA JAX: everything in float32, Euler time accumulated as
#: ``t += dt``). With period 4e-3 the embedding's argument reaches ~1,500 rad, so the two differ by up to ~2e-4.
NUMERICS = ("torch", "jax")


def _check_numerics(numerics: str) -> str:
    if numerics not in NUMERICS:
        raise ValueError(f"numerics: {numerics!r} is not one of {list(NUMERICS)}")
    return numerics


def posemb_sincos(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0,
                  numerics: str = "torch") -> torch.Tensor:
    """openpi ``posemb_sincos``: periods ``min_period·(max_period/min_period)^linspace(0, 1, dim/2)``,
    output ``[sin(2π t/period) ‖ cos(2π t/period)]`` of shape ``t.shape + (dim,)``, float32.

    ``numerics="torch"``: computed in float64 (lerobot). ``"jax"``: in float32 in openpi's order: fraction
    ``i/(n−1)``, ``period = min_period·ratio^fraction`` (the power correctly rounded to float32),
    ``scale = (1/period)·2·π``, argument ``t·scale``, then sin / cos, every step rounded to float32.

    Example: ``posemb_sincos(torch.rand(8), 1024)`` → [8, 1024].
    """
    _check_dim(dim)
    t = _as_time(t)
    if _check_numerics(numerics) == "jax":
        f32 = torch.float32
        n = dim // 2
        frac = torch.arange(n, dtype=f32, device=t.device) / max(n - 1, 1)
        ratio = torch.tensor(max_period / min_period, dtype=f32, device=t.device)
        power = (ratio.double() ** frac.double()).to(f32)
        period = torch.tensor(min_period, dtype=f32, device=t.device) * power
        scale = (1.0 / period) * 2.0 * torch.tensor(math.pi, dtype=f32, device=t.device)
        x = t.to(f32)[..., None] * scale
        return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)
    frac = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** frac
    x = t.to(torch.float64)[..., None] * (2.0 * math.pi / period)
    return torch.cat([torch.sin(x), torch.cos(x)], dim=-1).to(torch.float32)


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 1e4) -> torch.Tensor:
    """DiT ``timestep_embedding`` on the raw t (BAGEL/HALO feed t ∈ [0, 1], no ×1000):
    ``freqs = exp(−log(max_period)·k/half)``, output ``[cos(t·f) ‖ sin(t·f)]`` (zero column if dim is odd).

    Example: ``timestep_sinusoid(torch.tensor([0.0, 0.5]))`` → [2, 256].
    """
    _check_dim(dim, even=False)
    t = _as_time(t)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    x = t.to(torch.float64)[..., None] * freqs
    emb = torch.cat([torch.cos(x), torch.sin(x)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb.to(torch.float32)


def sincos_1d_table(length: int, dim: int, device=None) -> torch.Tensor:
    """HALO ``apply_sinusoidal_pos_embedding`` table [length, dim]: position p, channel k < dim/2 uses
    frequency ``exp(−k·log(1e4)/(dim/2 − 1))``; output ``[sin ‖ cos]``.

    Example: ``tokens = tokens + sincos_1d_table(16, D).to(tokens)``.
    """
    _check_dim(dim)
    if dim < 4:
        raise ValueError(f"dim must be >= 4 (the exponent divides by dim/2 − 1), got {dim}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    half = dim // 2
    freqs = torch.exp(-torch.arange(half, dtype=torch.float64, device=device) * (math.log(1e4) / (half - 1)))
    x = torch.arange(length, dtype=torch.float64, device=device)[:, None] * freqs
    return torch.cat([torch.sin(x), torch.cos(x)], dim=-1).to(torch.float32)


def _mae_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    x = pos.reshape(-1).to(torch.float64)[:, None] * omega
    return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)


def sincos_2d_table(max_side: int, dim: int, device=None) -> torch.Tensor:
    """BAGEL's frozen 2-D table [max_side², dim] (the MAE ``get_2d_sincos_pos_embed`` layout), indexed by
    the flattened id ``h·max_side + w``: the first ``dim/2`` channels encode the column w, the last
    ``dim/2`` the row h; each half is ``[sin ‖ cos]`` with ``omega_k = 1e4^(−k/(dim/4))``.
    A row's value does not depend on ``max_side``, so the table can be regenerated at any size.

    Example: ``pos = sincos_2d_table(32, D)[h_idx * 32 + w_idx]``.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 4:
        raise ValueError(f"dim must be a positive multiple of 4, got {dim!r}")
    if max_side <= 0:
        raise ValueError(f"max_side must be > 0, got {max_side}")
    idx = torch.arange(max_side, dtype=torch.float64)
    hh, ww = torch.meshgrid(idx, idx, indexing="ij")  # [h, w]
    emb = torch.cat([_mae_1d(dim // 2, ww), _mae_1d(dim // 2, hh)], dim=-1)
    return emb.to(device=device, dtype=torch.float32)


class TimestepEmbedder(nn.Module):
    """DiT/BAGEL time embedder: ``mlp = Sequential(Linear(freq_dim, D), SiLU, Linear(D, D))`` on
    :func:`timestep_sinusoid` (keys ``mlp.0.*``, ``mlp.2.*`` as in BAGEL's ``time_embedder``).

    Example: ``TimestepEmbedder(512)(t)`` with ``t`` [B] in [0, 1] → [B, 512].
    """

    def __init__(self, hidden_size: int, freq_dim: int = 256, max_period: float = 1e4):
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        for m in (self.mlp[0], self.mlp[2]):  # DiT init
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, hidden_size]`` of times ``t [B]`` in [0, 1] (the raw t, no ×1000): sinusoid then the MLP."""
        emb = timestep_sinusoid(t, self.freq_dim, self.max_period)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ConcatTimeMLP(nn.Module):
    """pi0 action-time fusion: ``out(swish(in([action_emb ‖ posemb_sincos(t, W)])))`` with
    ``action_time_mlp_in`` (2W→W) and ``action_time_mlp_out`` (W→W); the result is the token input.

    Example: ``ConcatTimeMLP(W)(action_in_proj(x_t), t)`` with x_t [B, H, A], t [B] → [B, H, W].
    """

    def __init__(self, width: int, min_period: float = 4e-3, max_period: float = 4.0, numerics: str = "torch"):
        super().__init__()
        self.width, self.min_period, self.max_period = width, min_period, max_period
        self.numerics = _check_numerics(numerics)
        self.action_time_mlp_in = nn.Linear(2 * width, width)
        self.action_time_mlp_out = nn.Linear(width, width)

    def forward(self, action_emb: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Action tokens ``[B, H, W]`` fused with the time: ``action_emb [B, H, W]`` and ``t [B]`` (or a scalar)."""
        if action_emb.ndim != 3 or action_emb.shape[-1] != self.width:
            raise ValueError(f"action_emb must be [B, H, {self.width}], got {tuple(action_emb.shape)}")
        t = _as_time(t)
        if t.ndim == 0:
            t = t.expand(action_emb.shape[0])
        if t.shape != action_emb.shape[:1]:
            raise ValueError(f"t must be [B={action_emb.shape[0]}] or a scalar, got {tuple(t.shape)}")
        temb = posemb_sincos(t, self.width, self.min_period, self.max_period, self.numerics).to(action_emb.dtype)
        temb = temb[:, None, :].expand_as(action_emb)
        x = self.action_time_mlp_in(torch.cat([action_emb, temb], dim=-1))
        return self.action_time_mlp_out(F.silu(x))


class AdaRMSTimeMLP(nn.Module):
    """pi0.5 time MLP: ``swish(time_mlp_out(swish(time_mlp_in(posemb_sincos(t, W)))))`` = the adaRMS cond
    ``c`` [B, W] fed to every :class:`vla_blocks.mot.AdaRMSNorm` of the action expert.

    Example: ``cond = AdaRMSTimeMLP(W)(t)``; broadcast it over the expert's tokens.
    """

    def __init__(self, width: int, min_period: float = 4e-3, max_period: float = 4.0, numerics: str = "torch"):
        super().__init__()
        self.width, self.min_period, self.max_period = width, min_period, max_period
        self.numerics = _check_numerics(numerics)
        self.time_mlp_in = nn.Linear(width, width)
        self.time_mlp_out = nn.Linear(width, width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """The adaRMS condition ``[B, W]`` of times ``t [B]``."""
        temb = posemb_sincos(t, self.width, self.min_period, self.max_period, self.numerics).to(
            self.time_mlp_in.weight.dtype)
        return F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(temb))))
