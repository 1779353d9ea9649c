"""Normalisation of states and actions: z-score (ACoT, pi0) and quantile (openpi pi0.5) statistics.

A :class:`Normalizer` holds per-key statistics as buffers (``mean``/``std`` for z-score, ``q01``/``q99``
for quantile) and maps raw values to model space and back::

    z-score   :  x̂ = (x − μ) / (σ + 1e-6)                 x = x̂·(σ + 1e-6) + μ
    quantile  :  x̂ = (x − q01) / (q99 − q01 + 1e-6)·2 − 1   x = (x̂ + 1)/2·(q99 − q01 + 1e-6) + q01

Only the first ``d`` channels are transformed, ``d`` = the statistics' width: model-space tensors are
often zero-padded to a wider ``action_dim`` (openpi pads 7-d LIBERO actions to 32), and the padded
channels pass through untouched (as openpi's ``Unnormalize``). A key without statistics is passed
through unchanged, so a model without stats still runs (tests, demos).

The buffers are non-persistent: statistics do not live in the weight files. :meth:`Normalizer.to_dict`
and :meth:`Normalizer.from_dict` give a JSON-ready form that the Hub code saves beside the weights
(openpi keeps them in ``assets/<id>/norm_stats.json``)::

    norm = Normalizer.from_data({"actions": actions_np_or_tensor}, mode="quantile")
    json.dump(norm.to_dict(), f)
    model.normalizer.load_dict(json.load(f))
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import torch
from torch import nn

__all__ = ["Normalizer", "compute_stats", "NORM_MODES", "STATS_OF_MODE"]

NORM_MODES = ("zscore", "quantile")
STATS_OF_MODE = {"zscore": ("mean", "std"), "quantile": ("q01", "q99")}
ALL_STATS = ("mean", "std", "q01", "q99")


def _check_mode(mode: str) -> str:
    if mode not in NORM_MODES:
        raise ValueError(f"unknown normalisation mode {mode!r} (valid: {', '.join(NORM_MODES)})")
    return mode


def compute_stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``mean``, ``std`` (population, as numpy), ``q01`` and ``q99`` over every leading dim of ``x [..., D]``.

    Quantiles are exact (``torch.quantile``, linear interpolation); openpi approximates them with a
    histogram, so values differ slightly on large data sets.
    """
    x = torch.as_tensor(x)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"need data of shape [..., D] with D > 0, got {tuple(x.shape)}")
    flat = x.reshape(-1, x.shape[-1]).double()
    if flat.shape[0] == 0:
        raise ValueError("cannot compute statistics of an empty tensor")
    q = torch.quantile(flat, torch.tensor([0.01, 0.99], dtype=torch.float64), dim=0)
    return {"mean": flat.mean(0).float(), "std": flat.std(0, correction=0).float(),
            "q01": q[0].float(), "q99": q[1].float()}


class Normalizer(nn.Module):
    """Per-key normalisation statistics and the maps to and from model space.

    - ``mode``: ``"zscore"`` or ``"quantile"``, the default for every key; ``modes`` overrides it per key.
    - ``stats``: ``{key: {stat: values [D]}}`` (any of ``mean``, ``std``, ``q01``, ``q99``; a key needs
      the two of its mode). Keys are free strings (``"actions"``, ``"observation.state"``).
    - ``eps``: the 1e-6 of openpi's formulas.

    Example::

        norm = Normalizer("zscore", {"actions": {"mean": m, "std": s}})
        a_hat = norm.normalize("actions", a)          # [B, H, 7] -> model space
        a = norm.unnormalize("actions", a_hat_32)     # [B, H, 32]: the first 7 dims unnormalised
    """

    def __init__(self, mode: str = "zscore", stats: Mapping[str, Mapping[str, Any]] | None = None,
                 modes: Mapping[str, str] | None = None, eps: float = 1e-6):
        super().__init__()
        self.mode = _check_mode(mode)
        self.modes = {k: _check_mode(m) for k, m in (modes or {}).items()}
        self.eps = float(eps)
        self._names: dict[str, str] = {}  # key -> buffer name prefix
        for key, st in (stats or {}).items():
            self.set_stats(key, **st)

    # -- statistics ---------------------------------------------------------------------------------
    def mode_of(self, key: str) -> str:
        return self.modes.get(key, self.mode)

    def keys(self) -> list[str]:
        """Keys with statistics."""
        return list(self._names)

    def has(self, key: str) -> bool:
        return key in self._names

    def _prefix(self, key: str) -> str:
        base = "stats_" + re.sub(r"\W", "_", key)
        name, i = base, 1
        taken = set(self._names.values())
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        return name

    def set_stats(self, key: str, **stats) -> "Normalizer":
        """Set (or replace) the statistics of ``key``: any of ``mean``, ``std``, ``q01``, ``q99`` ([D] each)."""
        unknown = set(stats) - set(ALL_STATS)
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)} for {key!r} (valid: {', '.join(ALL_STATS)})")
        need = STATS_OF_MODE[self.mode_of(key)]
        missing = [s for s in need if stats.get(s) is None]
        if missing:
            raise ValueError(f"key {key!r} ({self.mode_of(key)} normalisation) needs statistics {list(need)}; "
                             f"missing {missing}")
        tensors = {s: torch.as_tensor(v, dtype=torch.float32).reshape(-1) for s, v in stats.items() if v is not None}
        dims = {t.numel() for t in tensors.values()}
        if len(dims) != 1:
            raise ValueError(f"statistics of {key!r} have different widths: "
                             f"{ {s: t.numel() for s, t in tensors.items()} }")
        if key in self._names:
            self.remove(key)
        prefix = self._prefix(key)
        self._names[key] = prefix
        device = next((b.device for b in self.buffers()), None)
        for s, t in tensors.items():
            self.register_buffer(f"{prefix}__{s}", t if device is None else t.to(device), persistent=False)
        return self

    def remove(self, key: str):
        prefix = self._names.pop(key)
        for s in ALL_STATS:
            self._buffers.pop(f"{prefix}__{s}", None)

    def stats(self, key: str) -> dict[str, torch.Tensor]:
        """The statistics of ``key`` as a dict of tensors."""
        if key not in self._names:
            raise KeyError(f"no statistics for {key!r}; keys with statistics: {self.keys()}")
        prefix = self._names[key]
        return {s: self._buffers[f"{prefix}__{s}"] for s in ALL_STATS if f"{prefix}__{s}" in self._buffers}

    # -- maps ----------------------------------------------------------------------------------------
    def _transform(self, key: str, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        if key not in self._names:
            return x
        st = {s: t.to(x.device) for s, t in self.stats(key).items()}
        d = min(next(iter(st.values())).numel(), x.shape[-1])
        head = x[..., :d].float()
        if self.mode_of(key) == "zscore":
            mean, scale = st["mean"][:d], st["std"][:d] + self.eps
            y = head * scale + mean if inverse else (head - mean) / scale
        else:
            q01, r = st["q01"][:d], st["q99"][:d] - st["q01"][:d] + self.eps
            y = (head + 1.0) / 2.0 * r + q01 if inverse else (head - q01) / r * 2.0 - 1.0
        dtype = x.dtype if x.is_floating_point() else torch.float32
        y = y.to(dtype)
        if d == x.shape[-1]:
            return y
        return torch.cat([y, x[..., d:].to(dtype)], dim=-1)

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Raw values → model space (identity when ``key`` has no statistics)."""
        return self._transform(key, x, inverse=False)

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Model space → raw values (identity when ``key`` has no statistics)."""
        return self._transform(key, x, inverse=True)

    def normalize_batch(self, batch: dict, keys: Iterable[str]) -> dict:
        """A shallow copy of ``batch`` with ``keys`` (those present) normalised."""
        out = dict(batch)
        for k in keys:
            if k in out and out[k] is not None:
                out[k] = self.normalize(k, out[k])
        return out

    def _apply(self, fn, recurse: bool = True):
        """``.to()`` / ``.cuda()`` / ``.half()``: statistics follow the device but stay float32 (a bf16 model
        must not round its normalisation statistics)."""
        for name, b in list(self._buffers.items()):
            if b is not None:
                moved = fn(b)
                self._buffers[name] = moved if moved.dtype == b.dtype else b.to(moved.device)
        return self

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-ready ``{"mode", "modes", "eps", "stats": {key: {stat: [floats]}}}``."""
        return {"mode": self.mode, "modes": dict(self.modes), "eps": self.eps,
                "stats": {k: {s: t.detach().cpu().tolist() for s, t in self.stats(k).items()} for k in self.keys()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Normalizer":
        """Inverse of :meth:`to_dict`."""
        return cls(data.get("mode", "zscore"), data.get("stats") or {}, data.get("modes"), data.get("eps", 1e-6))

    def load_dict(self, data: Mapping) -> "Normalizer":
        """Replace every setting and statistic of this module in place with those of ``data`` (:meth:`to_dict` form)."""
        for k in self.keys():
            self.remove(k)
        self.mode = _check_mode(data.get("mode", self.mode))
        self.modes = {k: _check_mode(m) for k, m in (data.get("modes") or {}).items()}
        self.eps = float(data.get("eps", self.eps))
        for key, st in (data.get("stats") or {}).items():
            self.set_stats(key, **st)
        return self

    @classmethod
    def from_data(cls, data: Mapping[str, torch.Tensor], mode: str = "zscore",
                  modes: Mapping[str, str] | None = None, eps: float = 1e-6) -> "Normalizer":
        """Statistics computed from raw data ``{key: [..., D]}`` (all four statistics are kept)."""
        return cls(mode, {k: compute_stats(v) for k, v in data.items()}, modes, eps)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, keys={self.keys()}"
