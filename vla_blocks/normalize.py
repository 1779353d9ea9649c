"""Normalisation of states and actions: z-score (ACoT, pi0) and quantile (openpi pi0.5) statistics.

A :class:`Normalizer` holds per-key statistics as buffers (``mean``/``std`` for z-score, ``q01``/``q99``
for quantile) and maps raw values to model space and back::

    z-score   :  x̂ = (x − μ) / (σ + 1e-6)                 x = x̂·(σ + 1e-6) + μ
    quantile  :  x̂ = (x − q01) / (q99 − q01 + 1e-6)·2 − 1   x = (x̂ + 1)/2·(q99 − q01 + 1e-6) + q01

Widths must match exactly: a tensor whose last dim differs from the statistics' width ``d`` is a
:class:`~vla_blocks.errors.StatsError` naming the key (never the first ``d`` stats used, never trailing
channels left unnormalised). The one explicit exception is ``padded=True``: model-space tensors zero-padded
to a wider ``action_dim`` (openpi pads 7-d LIBERO actions to 32) have their first ``d`` channels transformed
and the padding passed through (as openpi's ``Unnormalize``). A key without statistics is passed through
unchanged, so a model without stats still runs (tests, demos). Statistics that are not finite, a negative
``std`` or ``q99 < q01`` are refused, as is data containing NaN/Inf in :func:`compute_stats`.

Statistics files: :func:`convert_stats` is the one converter. It reads this module's own form
(:meth:`Normalizer.to_dict`), openpi's ``norm_stats.json`` (``{"norm_stats": {"state": …, "actions": …}}``)
and lerobot's ``stats.json`` (``{"observation.state": {"mean": …}, "action": {…}, …}``: ``observation.state``
→ ``state``, ``action`` → ``actions``, other features dropped) and raises ``StatsError`` for anything else;
:meth:`Normalizer.load_dict` goes through it.

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

from .errors import StatsError

__all__ = ["Normalizer", "compute_stats", "convert_stats", "NORM_MODES", "STATS_OF_MODE", "LEROBOT_KEYS"]

#: lerobot feature name -> the model's statistics key (openpi's names after its repack transforms)
LEROBOT_KEYS = {"observation.state": "state", "action": "actions"}

NORM_MODES = ("zscore", "quantile")
STATS_OF_MODE = {"zscore": ("mean", "std"), "quantile": ("q01", "q99")}
ALL_STATS = ("mean", "std", "q01", "q99")


def _check_mode(mode: str) -> str:
    if mode not in NORM_MODES:
        raise ValueError(f"unknown normalisation mode {mode!r} (valid: {', '.join(NORM_MODES)})")
    return mode


def compute_stats(x: torch.Tensor, key: str | None = None) -> dict[str, torch.Tensor]:
    """``mean``, ``std`` (population, as numpy), ``q01`` and ``q99`` over every leading dim of ``x [..., D]``.

    Quantiles are exact (``torch.quantile``, linear interpolation); openpi approximates them with a
    histogram, so values differ slightly on large data sets. Data with NaN/Inf is a ``StatsError`` (``key``
    names it in the message).
    """
    name = f"{key!r}: " if key else ""
    x = torch.as_tensor(x)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise StatsError(f"{name}need data of shape [..., D] with D > 0, got {tuple(x.shape)}", key)
    flat = x.reshape(-1, x.shape[-1]).double()
    if flat.shape[0] == 0:
        raise StatsError(f"{name}cannot compute statistics of an empty tensor", key)
    if not torch.isfinite(flat).all():
        bad = (~torch.isfinite(flat)).any(0).nonzero().flatten().tolist()
        raise StatsError(f"{name}data contains NaN/Inf in dims {bad}: statistics would be NaN; clean the data "
                         f"first", key)
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
        """The normalisation mode of ``key`` (its own from ``modes``, else the default ``mode``)."""
        return self.modes.get(key, self.mode)

    def keys(self) -> list[str]:
        """Keys with statistics."""
        return list(self._names)

    def has(self, key: str) -> bool:
        """Whether ``key`` has statistics."""
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
            raise StatsError(f"unknown statistics {sorted(unknown)} for {key!r} (valid: {', '.join(ALL_STATS)})", key)
        need = STATS_OF_MODE[self.mode_of(key)]
        missing = [s for s in need if stats.get(s) is None]
        if missing:
            raise StatsError(f"key {key!r} ({self.mode_of(key)} normalisation) needs statistics {list(need)}; "
                             f"missing {missing}", key)
        try:
            tensors = {s: torch.as_tensor(v, dtype=torch.float32).reshape(-1) for s, v in stats.items() if v is not None}
        except (TypeError, ValueError, RuntimeError) as e:
            raise StatsError(f"statistics of {key!r} are not arrays of numbers: {e}", key) from None
        dims = {t.numel() for t in tensors.values()}
        if len(dims) != 1:
            raise StatsError(f"statistics of {key!r} have different widths: "
                             f"{ {s: t.numel() for s, t in tensors.items()} }", key)
        if dims == {0}:
            raise StatsError(f"statistics of {key!r} are empty", key)
        for s, t in tensors.items():
            if not torch.isfinite(t).all():
                raise StatsError(f"statistics of {key!r}: {s} is not finite at dims "
                                 f"{(~torch.isfinite(t)).nonzero().flatten().tolist()}", key)
        if "std" in tensors and (tensors["std"] < 0).any():
            raise StatsError(f"statistics of {key!r}: negative std at dims "
                             f"{(tensors['std'] < 0).nonzero().flatten().tolist()}", key)
        if "q01" in tensors and "q99" in tensors and (tensors["q99"] < tensors["q01"]).any():
            raise StatsError(f"statistics of {key!r}: q99 < q01 at dims "
                             f"{(tensors['q99'] < tensors['q01']).nonzero().flatten().tolist()}", key)
        if key in self._names:
            self.remove(key)
        prefix = self._prefix(key)
        self._names[key] = prefix
        device = next((b.device for b in self.buffers()), None)
        for s, t in tensors.items():
            self.register_buffer(f"{prefix}__{s}", t if device is None else t.to(device), persistent=False)
        return self

    def remove(self, key: str):
        """Drop the statistics of ``key`` (``KeyError`` if it has none)."""
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
    def width(self, key: str) -> int:
        """The number of channels the statistics of ``key`` describe."""
        return next(iter(self.stats(key).values())).numel()

    def _transform(self, key: str, x: torch.Tensor, inverse: bool, padded: bool = False) -> torch.Tensor:
        if key not in self._names:
            return x
        st = {s: t.to(x.device) for s, t in self.stats(key).items()}
        d = self.width(key)
        n = x.shape[-1] if x.ndim else 0
        if n != d and not (padded and n > d):
            how = "wider" if n > d else "narrower"
            hint = (" (a model-space tensor zero-padded past the real dims: pass padded=True)" if n > d else "")
            raise StatsError(f"statistics of {key!r} have {d} dims but the tensor has {n} ({how}, shape "
                             f"{tuple(x.shape)}); widths must match exactly{hint}", key)
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

    def normalize(self, key: str, x: torch.Tensor, padded: bool = False) -> torch.Tensor:
        """Raw values → model space (identity when ``key`` has no statistics). The last dim must equal the
        statistics' width; ``padded=True`` allows a wider tensor whose extra channels pass through."""
        return self._transform(key, x, inverse=False, padded=padded)

    def unnormalize(self, key: str, x: torch.Tensor, padded: bool = False) -> torch.Tensor:
        """Model space → raw values (identity when ``key`` has no statistics); ``padded`` as in :meth:`normalize`."""
        return self._transform(key, x, inverse=True, padded=padded)

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
        """Replace every statistic of this module in place with those of ``data``: the :meth:`to_dict` form
        (which also sets the modes), openpi's ``norm_stats.json`` or lerobot's ``stats.json`` content (the
        modes are kept), through :func:`convert_stats`. Nothing changes when ``data`` is refused."""
        data = convert_stats(data)
        mode = _check_mode(data.get("mode", self.mode))
        modes = {k: _check_mode(m) for k, m in (data.get("modes") or {}).items()} if "modes" in data else self.modes
        trial = Normalizer(mode, data["stats"], modes, float(data.get("eps", self.eps)))  # validates everything first
        for k in self.keys():
            self.remove(k)
        self.mode, self.modes, self.eps = trial.mode, dict(trial.modes), trial.eps
        for key in trial.keys():
            self.set_stats(key, **trial.stats(key))
        return self

    @classmethod
    def from_data(cls, data: Mapping[str, torch.Tensor], mode: str = "zscore",
                  modes: Mapping[str, str] | None = None, eps: float = 1e-6) -> "Normalizer":
        """Statistics computed from raw data ``{key: [..., D]}`` (all four statistics are kept)."""
        return cls(mode, {k: compute_stats(v, key=k) for k, v in data.items()}, modes, eps)

    def extra_repr(self) -> str:
        """The default mode and the keys with statistics (shown in ``repr``)."""
        return f"mode={self.mode}, keys={self.keys()}"


def _is_stat_block(v) -> bool:
    return isinstance(v, Mapping) and bool(v) and all(isinstance(s, str) for s in v) and \
        any(s in v for s in ("mean", "std", "q01", "q99", "min", "max"))


def convert_stats(data: Mapping, key_map: Mapping[str, str] = LEROBOT_KEYS) -> dict:
    """The one converter of statistics files → :meth:`Normalizer.to_dict` form (``{"stats": {key: {stat: …}}}``,
    plus ``mode`` / ``modes`` / ``eps`` when ``data`` is that form already).

    Accepted layouts: this module's form (a mapping with ``stats``); openpi's ``norm_stats.json`` (a mapping
    with ``norm_stats``: keys ``state`` / ``actions``; read by :func:`vla_blocks.data.stats.from_openpi`); lerobot's
    ``stats.json`` (feature name → statistics; features in ``key_map`` are renamed, ``observation.state`` →
    ``state`` and ``action`` → ``actions``, the rest dropped; ``min``/``max``/other quantiles are dropped as
    the normaliser uses ``mean``/``std``/``q01``/``q99``). Anything else raises :class:`~vla_blocks.errors.StatsError`.

    Example::

        model.normalizer.load_dict(json.load(open("assets/libero/norm_stats.json")))   # openpi
        model.normalizer.load_dict(json.load(open("meta/stats.json")))                  # lerobot
    """
    if not isinstance(data, Mapping):
        raise StatsError(f"statistics must be a mapping, got {type(data).__name__}")
    keep = lambda st: {s: v for s, v in st.items() if s in ALL_STATS and v is not None}  # noqa: E731
    if "stats" in data:
        st = data["stats"]
        if not isinstance(st, Mapping) or not all(isinstance(v, Mapping) for v in st.values()):
            raise StatsError("'stats' must map keys to {stat: values}", "stats")
        return {**{k: data[k] for k in ("mode", "modes", "eps") if k in data}, "stats": dict(st)}
    if "norm_stats" in data:
        from .data.stats import from_openpi
        inner = data["norm_stats"]
        if not isinstance(inner, Mapping) or not inner or not all(_is_stat_block(v) for v in inner.values()):
            raise StatsError("openpi 'norm_stats' must map keys (state, actions) to {mean, std, q01, q99}", "norm_stats")
        identity = {k: k for k in inner}  # openpi names are already the model's keys
        return {"stats": {k: keep(v) for k, v in from_openpi(data, identity).items()}}
    if data and all(_is_stat_block(v) for v in data.values()):
        known = [k for k in data if k in key_map]
        if not known:
            raise StatsError(f"lerobot stats have none of the features {list(key_map)} (have {sorted(data)[:8]}); "
                             f"pass key_map= to say which feature is which key")
        return {"stats": {key_map[k]: keep(data[k]) for k in known}}
    raise StatsError("unrecognised statistics layout: expected vla_blocks' {'stats': …} (Normalizer.to_dict), "
                     "openpi's {'norm_stats': {...}} or lerobot's {feature: {'mean': …, 'std': …}}; got keys "
                     f"{sorted(map(str, data))[:8]}")
