"""Flow heads: the action head (pi0 / ACoT / HALO) and the visual-latent head (BAGEL / HALO images).

Both map noisy data to expert tokens (``embed``) and expert outputs back to velocities (``decode``);
time conditioning lives in :mod:`vla_blocks.conditioning`. :class:`FlowHead` composes the three parts a
model needs per flow-matched output — an :class:`ActionHead`, one time-conditioning block and a
:class:`~vla_blocks.flow.FlowMatching` recipe — and is what pi0, pi0.5, ACoT (action and EAR coarse heads)
and HALO (action head) instantiate.
"""

from __future__ import annotations

import torch
from torch import nn

from .conditioning import AdaRMSTimeMLP, ConcatTimeMLP, TimestepEmbedder, sincos_1d_table, sincos_2d_table
from .flow import FlowMatching, euler_sample, interpolate, velocity_target

__all__ = ["ActionHead", "PositionEmbedding2D", "VisualLatentHead", "FlowHead", "TIME_CONDITIONING"]

#: How a :class:`FlowHead` tells its expert the flow time: ``concat`` (pi0: ``ConcatTimeMLP`` fuses
#: ``posemb(t)`` into the tokens), ``adarms`` (pi0.5: ``AdaRMSTimeMLP`` gives the condition of the expert's
#: adaRMS norms), ``additive`` (BAGEL/HALO: ``TimestepEmbedder(t)`` added to every token).
TIME_CONDITIONING = ("concat", "adarms", "additive")


class ActionHead(nn.Module):
    """Action chunk ↔ tokens: ``in_proj`` (A→W) and ``out_proj`` (W→A, zero-initialised by default).

    - ``action_dim`` is the model's (padded) action width A, e.g. 32 in openpi; real actions with fewer
      dims are zero-padded by :meth:`pad` and :meth:`dim_mask` marks the real dims for the loss.
    - ``horizon`` (optional) is checked on every call.
    - ``state_dim`` (optional) adds pi0's ``state_proj`` (state padded to ``state_dim`` → one token).
    - ``pos_embed="sincos"`` adds HALO's fixed 1-D table (:func:`sincos_1d_table`) to the tokens.
    - ``time_embedder=True`` adds HALO's ``time_embedder`` (:class:`TimestepEmbedder`); then
      ``embed(x_t, t)`` adds ``time_embedder(t)`` to every token (pi0 uses ConcatTimeMLP / AdaRMSTimeMLP
      from :mod:`vla_blocks.conditioning` instead).

    Example::

        head = ActionHead(32, 1024, horizon=50, state_dim=32)
        tokens = head.embed(x_t)              # [B, 50, 1024]
        halo = ActionHead(14, D, pos_embed="sincos", time_embedder=True)
        tokens = halo.embed(x_t, t)           # in(x_t) + time_embedder(t) + sincos(arange(L))
        v = head.decode(expert_out)           # [B, 50, 32]
        loss = flow_loss(v, u, dim_mask=head.dim_mask(7), reduction="mean")
    """

    def __init__(self, action_dim: int, width: int, zero_init_out: bool = True, horizon: int | None = None,
                 state_dim: int | None = None, pos_embed: str = "none", bias: bool = True,
                 time_embedder: bool = False):
        super().__init__()
        if action_dim <= 0 or width <= 0:
            raise ValueError(f"action_dim and width must be > 0, got {action_dim}, {width}")
        if pos_embed not in ("none", "sincos"):
            raise ValueError(f"unknown pos_embed {pos_embed!r} (valid: 'none', 'sincos')")
        self.action_dim, self.width, self.horizon = action_dim, width, horizon
        self.state_dim, self.pos_embed = state_dim, pos_embed
        self.in_proj = nn.Linear(action_dim, width, bias=bias)
        self.out_proj = nn.Linear(width, action_dim, bias=bias)
        if zero_init_out:
            nn.init.zeros_(self.out_proj.weight)
            if bias:
                nn.init.zeros_(self.out_proj.bias)
        self.state_proj = nn.Linear(state_dim, width, bias=bias) if state_dim else None
        self.time_embedder = TimestepEmbedder(width) if time_embedder else None

    @staticmethod
    def _pad_last(x: torch.Tensor, n: int, what: str) -> torch.Tensor:
        if x.shape[-1] > n:
            raise ValueError(f"{what} has {x.shape[-1]} dims, more than the head's {n}")
        if x.shape[-1] == n:
            return x
        return torch.nn.functional.pad(x, (0, n - x.shape[-1]))

    def pad(self, actions: torch.Tensor) -> torch.Tensor:
        """Zero-pad the last dim to ``action_dim`` (openpi ``pad_to_dim``)."""
        return self._pad_last(actions, self.action_dim, "actions")

    def dim_mask(self, real_dim: int, device=None) -> torch.Tensor:
        """Bool [action_dim], True for the first ``real_dim`` (real) dims."""
        if not 0 < real_dim <= self.action_dim:
            raise ValueError(f"real_dim must be in [1, {self.action_dim}], got {real_dim}")
        return torch.arange(self.action_dim, device=device) < real_dim

    def _check(self, x: torch.Tensor, last: int | None, what: str):
        if x.ndim != 3:
            raise ValueError(f"{what} must be [B, H, dims], got shape {tuple(x.shape)}")
        if self.horizon is not None and x.shape[1] != self.horizon:
            raise ValueError(f"{what} horizon {x.shape[1]} != head horizon {self.horizon}")
        if last is not None and x.shape[-1] != last:
            raise ValueError(f"{what} last dim {x.shape[-1]} != {last}")

    def embed(self, x_t: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Noisy actions [B, H, ≤A] → tokens [B, H, W] (padded, projected, + 1-D table if enabled,
        + ``time_embedder(t)`` for t [B] or a scalar if given)."""
        self._check(x_t, None, "x_t")
        h = self.in_proj(self.pad(x_t).to(self.in_proj.weight.dtype))
        if t is not None:
            if self.time_embedder is None:
                raise ValueError("this ActionHead has no time_embedder (build it with time_embedder=True)")
            t = torch.as_tensor(t, dtype=torch.float32, device=h.device)
            if t.ndim == 0:
                t = t.expand(h.shape[0])
            if t.shape != h.shape[:1]:
                raise ValueError(f"t must be [B={h.shape[0]}] or a scalar, got {tuple(t.shape)}")
            h = h + self.time_embedder(t).to(h.dtype)[:, None, :]
        if self.pos_embed == "sincos":
            h = h + sincos_1d_table(h.shape[1], self.width, device=h.device).to(h.dtype)
        return h

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """Expert outputs [B, H, W] → velocities [B, H, A]."""
        self._check(h, self.width, "h")
        return self.out_proj(h)

    def embed_state(self, state: torch.Tensor) -> torch.Tensor:
        """pi0 state [B, ≤state_dim] → one token [B, 1, W]."""
        if self.state_proj is None:
            raise ValueError("this ActionHead has no state_proj (build it with state_dim=...)")
        if state.ndim != 2:
            raise ValueError(f"state must be [B, dims], got shape {tuple(state.shape)}")
        s = self._pad_last(state, self.state_dim, "state").to(self.state_proj.weight.dtype)
        return self.state_proj(s)[:, None, :]


class PositionEmbedding2D(nn.Module):
    """Frozen 2-D sincos table ``pos_embed`` [max_side², D] (BAGEL's ``PositionEmbedding``; a
    non-trainable parameter so checkpoints keep the ``*.pos_embed`` key). ``forward(ids)`` looks up rows.

    Example: ``PositionEmbedding2D(32, D)(ids)`` with ``ids = h·32 + w``.
    """

    def __init__(self, max_side: int, dim: int):
        super().__init__()
        self.max_side, self.dim = max_side, dim
        self.pos_embed = nn.Parameter(sincos_2d_table(max_side, dim), requires_grad=False)

    def reset_parameters(self):
        """Refill ``pos_embed`` with the fixed sincos table (it is not learned; e.g. after ``to_empty``)."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_table(self.max_side, self.dim))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Rows ``[..., D]`` of the table for flattened ids ``h·max_side + w``; ``ValueError`` for ids outside it."""
        if position_ids.numel() and (int(position_ids.min()) < 0 or int(position_ids.max()) >= self.max_side ** 2):
            raise ValueError(f"position ids must be in [0, {self.max_side ** 2}), got range "
                             f"[{int(position_ids.min())}, {int(position_ids.max())}]")
        return self.pos_embed[position_ids]


class VisualLatentHead(nn.Module):
    """BAGEL/HALO image-latent head over a VAE latent [B, C, H, W] (FLUX: C = 16).

    - :meth:`patchify` / :meth:`unpatchify`: p×p patches in BAGEL's channel-last order → [B, h·w, p²C].
    - ``vae2llm`` (p²C→D), ``llm2vae`` (D→p²C, zero-init), ``time_embedder`` (:class:`TimestepEmbedder`,
      optional) and ``latent_pos_embed`` (:class:`PositionEmbedding2D`, ids ``h·max_latent_size + w``).
    - :meth:`embed`: ``vae2llm(x_t) + time_embedder(t) + latent_pos_embed(ids)`` (in that order); :meth:`decode`: ``llm2vae``.

    Example::

        head = VisualLatentHead(D)
        x0 = head.patchify(latent)                        # [B, h·w, 64]
        tokens = head.embed(x_t, t, head.position_ids(h, w))
        v = head.decode(expert_out)                       # [B, h·w, 64]
    """

    def __init__(self, width: int, latent_channels: int = 16, patch_size: int = 2, max_latent_size: int = 32,
                 time_embedder: bool = True):
        super().__init__()
        self.width, self.latent_channels, self.patch_size = width, latent_channels, patch_size
        self.max_latent_size = max_latent_size
        self.patch_dim = patch_size * patch_size * latent_channels
        self.vae2llm = nn.Linear(self.patch_dim, width)
        self.llm2vae = nn.Linear(width, self.patch_dim)
        nn.init.zeros_(self.llm2vae.weight)
        nn.init.zeros_(self.llm2vae.bias)
        self.time_embedder = TimestepEmbedder(width) if time_embedder else None
        self.latent_pos_embed = PositionEmbedding2D(max_latent_size, width)

    def patchify(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] → [B, h·w, p·p·C]; crops H, W down to multiples of p; per token (p, q, c) order."""
        if latent.ndim != 4 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"latent must be [B, {self.latent_channels}, H, W], got {tuple(latent.shape)}")
        p = self.patch_size
        B, C, H, W = latent.shape
        h, w = H // p, W // p
        if h == 0 or w == 0:
            raise ValueError(f"latent {H}×{W} is smaller than one {p}×{p} patch")
        x = latent[:, :, : h * p, : w * p].reshape(B, C, h, p, w, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, h·w, p·p·C] → [B, C, h·p, w·p] (inverse of :meth:`patchify`)."""
        p, C = self.patch_size, self.latent_channels
        if tokens.ndim != 3 or tokens.shape[1] != h * w or tokens.shape[2] != self.patch_dim:
            raise ValueError(f"tokens must be [B, {h * w}, {self.patch_dim}], got {tuple(tokens.shape)}")
        B = tokens.shape[0]
        x = tokens.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, h * p, w * p)

    def position_ids(self, h: int, w: int, device=None) -> torch.Tensor:
        """Flattened 2-D ids ``i·max_latent_size + j`` for an h×w token grid (row-major), shape [h·w]."""
        m = self.max_latent_size
        if not (0 < h <= m and 0 < w <= m):
            raise ValueError(f"token grid {h}×{w} exceeds max_latent_size {m} (or is empty)")
        i = torch.arange(h, device=device)[:, None]
        j = torch.arange(w, device=device)[None, :]
        return (i * m + j).reshape(-1)

    def embed(self, x_t: torch.Tensor, t: torch.Tensor | None, position_ids: torch.Tensor) -> torch.Tensor:
        """Noisy patch tokens [..., N, p²C], time [...] (one per image; None to skip) and ids [N] or [..., N]
        → [..., N, D]."""
        if x_t.shape[-1] != self.patch_dim:
            raise ValueError(f"x_t last dim must be {self.patch_dim}, got {tuple(x_t.shape)}")
        h = self.vae2llm(x_t.to(self.vae2llm.weight.dtype))
        if t is not None:  # BAGEL's order: vae2llm(x) + time embedding + position embedding
            if self.time_embedder is None:
                raise ValueError("this VisualLatentHead has no time_embedder")
            temb = self.time_embedder(torch.as_tensor(t, device=h.device)).to(h.dtype)
            h = h + temb.unsqueeze(-2) if temb.ndim == h.ndim - 1 else h + temb
        return h + self.latent_pos_embed(position_ids).to(h.dtype)

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """Expert outputs [..., N, D] → velocities [..., N, p²C]."""
        if h.shape[-1] != self.width:
            raise ValueError(f"h last dim must be {self.width}, got {tuple(h.shape)}")
        return self.llm2vae(h)


class FlowHead(nn.Module):
    """One flow-matched output of a model: noisy data ↔ expert tokens, time conditioning, loss and sampler.

    Composition of an :class:`ActionHead` (``proj``: in/out projections, optional pi0 state token, optional
    HALO 1-D table), a time-conditioning block (``time``; see :data:`TIME_CONDITIONING`: ``concat`` →
    :class:`~vla_blocks.conditioning.ConcatTimeMLP`, ``adarms`` → :class:`~vla_blocks.conditioning.AdaRMSTimeMLP`,
    ``additive`` → the ActionHead's :class:`~vla_blocks.conditioning.TimestepEmbedder`) and a
    :class:`~vla_blocks.flow.FlowMatching` recipe (``flow``: time sampler, loss kind, reduction, grid).
    Convention (DESIGN §4): t = 1 noise, t = 0 data, ``x_t = t·ε + (1−t)·x0``, target ``ε − x0``.

    Models keep upstream parameter names by registering the head's sub-modules under those names
    (:meth:`vla_blocks.model.VLAModel.expose`); the head itself does the computing.

    Example::

        head = FlowHead(32, 64, time="adarms")               # a pi0.5 action head
        x_t, u = head.training_pair(x0, t)                     # x0 [B, H, 32], t [B]
        tokens, cond = head.embed(x_t, t)                      # [B, H, 64], adaRMS cond [B, 64]
        loss = head.loss(head.decode(expert_out), u)
        x0_hat = head.sample(lambda x, t: head.decode(run_expert(*head.embed(x, t.expand(B)))), noise)
    """

    def __init__(self, action_dim: int, width: int, *, time: str = "concat", flow: FlowMatching | None = None,
                 state_dim: int | None = None, pos_embed: str = "none", zero_init_out: bool = False):
        super().__init__()
        if time not in TIME_CONDITIONING:
            raise ValueError(f"unknown time conditioning {time!r} (valid: {', '.join(TIME_CONDITIONING)})")
        self.time_kind = time
        self.flow = flow if flow is not None else FlowMatching()
        self.proj = ActionHead(action_dim, width, zero_init_out=zero_init_out, state_dim=state_dim,
                               pos_embed=pos_embed, time_embedder=time == "additive")
        nm = self.flow.numerics
        self.time = (ConcatTimeMLP(width, numerics=nm) if time == "concat"
                     else AdaRMSTimeMLP(width, numerics=nm) if time == "adarms" else None)

    @property
    def action_dim(self) -> int:
        """The padded action width the head reads and writes."""
        return self.proj.action_dim

    @property
    def width(self) -> int:
        """The width of the expert the head's tokens live in."""
        return self.proj.width

    def embed(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Noisy data ``x_t [B, H, ≤A]`` at times ``t [B]`` → ``(tokens [B, H, W], adaRMS cond [B, W] or None)``
        (``concat`` and ``additive`` heads put the time into the tokens, ``adarms`` into the cond)."""
        if self.time_kind == "additive":
            return self.proj.embed(x_t, t), None
        tokens = self.project(x_t)
        if self.time_kind == "concat":
            return self.time(tokens, t), None
        return tokens, self.time(t)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``in_proj`` alone (no time): ``[B, H, ≤A]`` → ``[B, H, W]`` (ACoT embeds the clean coarse
        trajectory with its EAR head's projection)."""
        return self.proj.embed(x)

    def embed_state(self, state: torch.Tensor) -> torch.Tensor:
        """pi0's state token ``[B, 1, W]`` (the head needs ``state_dim``)."""
        return self.proj.embed_state(state)

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """Expert outputs ``[B, H, W]`` → velocities ``[B, H, A]``."""
        return self.proj.decode(h)

    @staticmethod
    def training_pair(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, target u = ε − x0)`` for clean ``x0`` at per-sample times ``t`` (``noise`` or fresh ε)."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        else:
            noise = noise.to(x0)
        return interpolate(x0, noise, t), velocity_target(x0, noise)

    def loss(self, v: torch.Tensor, u: torch.Tensor, dim_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The recipe's flow loss (kind and reduction of ``flow``)."""
        return self.flow.loss(v, u, dim_mask=dim_mask)

    def sample(self, velocity_fn, noise: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        """Euler from ``noise`` (t = 1) to t = 0 along ``grid`` (default: the recipe's grid)."""
        return euler_sample(velocity_fn, noise, self.flow.grid(noise.device) if grid is None else grid,
                            numerics=self.flow.numerics)
