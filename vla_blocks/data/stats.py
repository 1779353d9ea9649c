"""Normalisation statistics: lerobot's ``stats.json`` rules, a streaming dataset pass, openpi's ``norm_stats.json``.

Two kinds of statistics live here, because the two upstreams disagree (reference lerobot_dataset.md §7, §11):

- **lerobot's** (:func:`episode_stats`, :func:`aggregate_stats`): per episode ``min``, ``max``, ``mean``,
  ``std`` (population), ``count`` and ``q01 q10 q50 q90 q99`` from a 5000-bin histogram over
  ``[min − 1e-10, max + 1e-10]`` with linear interpolation inside the bin that reaches ``q·N``; episodes are
  merged exactly for min/max/mean/std/count, but every quantile is the **count-weighted mean of the episodes'
  quantiles** (what lerobot writes to ``stats.json``, not a dataset quantile). Cameras: per channel over a
  subsample of frames (all when fewer than 100, else ``max(100, min(int(N**0.75), 10000))`` frames at
  ``round(linspace(0, N−1, n))``; frames ≥ 300 px strided by ``int(long_side/150)``), divided by 255,
  ``count`` = sampled frames.
- **dataset-level** (:class:`StreamingStats`, :func:`compute_dataset_stats`): one streaming pass with bounded
  memory (per dimension: count, exact running mean/variance by Chan's merge, min, max and a fixed histogram).
  Quantiles are read from the histogram with linear interpolation; the error is at most one bin width,
  ``(max − min)/bins`` per dimension (``bins`` = 5000 by default, and the range is fixed by a first pass
  over min/max, so no re-binning error). This is what ``vla-blocks stats`` writes: real q01/q99 (openpi's
  meaning) under lerobot's ``stats.json`` layout.

openpi interop: :func:`to_openpi` / :func:`from_openpi` convert ``{"norm_stats": {"state": …, "actions": …}}``
(keys after openpi's repack: ``state``/``actions``; stats ``mean std q01 q99``).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["QUANTILES", "episode_stats", "feature_stats", "image_stats", "aggregate_stats", "StreamingStats",
           "compute_dataset_stats", "to_openpi", "from_openpi", "stats_to_json", "stats_from_json",
           "sample_frame_indices", "OPENPI_KEYS"]

QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
HIST_BINS = 5000
#: lerobot feature name -> openpi name after the repack transforms
OPENPI_KEYS = {"observation.state": "state", "action": "actions"}


def _qname(q: float) -> str:
    return f"q{int(round(q * 100)):02d}"


def _hist_quantiles(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, counts: np.ndarray, qs=QUANTILES) -> dict:
    """Quantiles per column from histograms ``counts [bins, D]`` over ``[lo, hi]``, linear inside the bin."""
    bins = counts.shape[0]
    n = counts.sum(0).astype(np.float64)  # [D]
    cum = np.cumsum(counts, axis=0).astype(np.float64)  # [bins, D]
    width = (hi - lo) / bins
    out = {}
    for q in qs:
        target = q * n
        idx = np.minimum((cum < target[None]).sum(0), bins - 1)  # first bin whose cumulative count reaches q·N
        cols = np.arange(counts.shape[1])
        before = np.where(idx > 0, cum[np.maximum(idx - 1, 0), cols], 0.0)
        c = counts[idx, cols].astype(np.float64)
        frac = np.where(c > 0, (target - before) / np.where(c > 0, c, 1.0), 0.0)
        out[_qname(q)] = lo + (idx + np.clip(frac, 0.0, 1.0)) * width
    return out


def _histogram(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bins: int) -> np.ndarray:
    """Per-column histogram of ``x [N, D]`` over ``[lo, hi]`` (values at ``hi`` in the last bin) → ``[bins, D]``."""
    width = (hi - lo) / bins
    safe = np.where(width > 0, width, 1.0)
    idx = np.floor((x - lo) / safe).astype(np.int64)
    idx = np.clip(idx, 0, bins - 1)
    D = x.shape[1]
    flat = idx + np.arange(D)[None] * bins
    return np.bincount(flat.ravel(), minlength=bins * D).reshape(D, bins).T


def feature_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """lerobot's per-episode statistics of a numeric feature ``x [N, D]`` (all kept as float64 arrays [D])."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[:, None]
    x = x.astype(np.promote_types(x.dtype, np.float32), copy=False).astype(np.float64)
    n = x.shape[0]
    if n == 0:
        raise ValueError("cannot compute statistics of an empty episode")
    mn, mx = x.min(0), x.max(0)
    mean = x.mean(0)
    std = np.sqrt(np.maximum(0.0, (x * x).mean(0) - mean * mean))
    out = {"min": mn, "max": mx, "mean": mean, "std": std, "count": np.array([n], dtype=np.int64)}
    if n == 1:
        out.update({_qname(q): mean.copy() for q in QUANTILES})
        return out
    lo, hi = mn - 1e-10, mx + 1e-10
    out.update(_hist_quantiles(x, lo, hi, _histogram(x, lo, hi, HIST_BINS)))
    return out


def sample_frame_indices(n: int) -> list[int]:
    """lerobot's camera-stats subsample of an ``n``-frame episode."""
    num = n if n < 100 else max(100, min(int(n ** 0.75), 10000))
    return np.round(np.linspace(0, n - 1, num)).astype(int).tolist()


def image_stats(frames: list[np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
    """lerobot's per-episode camera statistics from uint8 ``[N, H, W, 3]`` frames → stats of shape (3, 1, 1)."""
    idx = sample_frame_indices(len(frames))
    imgs = []
    for i in idx:
        f = np.asarray(frames[i])
        long_side = max(f.shape[0], f.shape[1])
        if long_side >= 300:
            s = int(long_side / 150)
            f = f[::s, ::s]
        imgs.append(f)
    px = np.stack(imgs).reshape(-1, 3).astype(np.float32)
    st = feature_stats(px)
    out = {k: (v / 255.0).reshape(3, 1, 1) for k, v in st.items() if k != "count"}
    out["count"] = np.array([len(idx)], dtype=np.int64)
    return out


def episode_stats(columns: Mapping[str, Any], features: Mapping[str, dict]) -> dict[str, dict[str, np.ndarray]]:
    """lerobot's ``stats/*`` of one episode: ``columns`` maps feature name → ``[N, ...]`` numbers, or uint8 frames
    for cameras. String features are skipped."""
    out = {}
    for key, data in columns.items():
        dtype = features[key]["dtype"]
        if dtype in ("string", "language"):
            continue
        out[key] = image_stats(data) if dtype in ("image", "video") else feature_stats(np.asarray(data))
    return out


def aggregate_stats(stats_list: list[Mapping[str, Mapping[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """lerobot's merge of per-episode stats: exact min/max/mean/std/count, count-weighted mean of quantiles."""
    keys: list[str] = []
    for s in stats_list:
        keys += [k for k in s if k not in keys]
    out = {}
    for key in keys:
        items = [s[key] for s in stats_list if key in s]
        counts = np.array([float(np.asarray(s["count"]).reshape(-1)[0]) for s in items])
        total = counts.sum()
        shape = np.asarray(items[0]["mean"]).shape
        w = counts.reshape((-1,) + (1,) * len(shape))
        means = np.stack([np.asarray(s["mean"], dtype=np.float64) for s in items])
        var = np.stack([np.asarray(s["std"], dtype=np.float64) ** 2 for s in items])
        mean = (means * w).sum(0) / total
        std = np.sqrt(((var + (means - mean) ** 2) * w).sum(0) / total)
        agg = {"min": np.min(np.stack([s["min"] for s in items]), 0), "max": np.max(np.stack([s["max"] for s in items]), 0),
               "mean": mean, "std": std, "count": np.array([int(total)], dtype=np.int64)}
        for q in QUANTILES:
            name = _qname(q)
            if all(name in s for s in items):
                agg[name] = (np.stack([np.asarray(s[name], dtype=np.float64) for s in items]) * w).sum(0) / total
        out[key] = agg
    return out


# ---------------------------------------------------------------------------------------------- streaming
class StreamingStats:
    """Dataset-level statistics of one feature in two bounded-memory passes over ``[n, D]`` blocks.

    Pass 1 (:meth:`update_range`) tracks min/max; pass 2 (:meth:`update`) fills a ``bins``-bin histogram over
    that fixed range plus exact count/mean/M2 (Chan's parallel merge). Quantile error ≤ one bin width.
    """

    def __init__(self, dim: int, bins: int = HIST_BINS):
        self.dim, self.bins = dim, bins
        self.min = np.full(dim, np.inf)
        self.max = np.full(dim, -np.inf)
        self.count = 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros(dim)
        self.hist: np.ndarray | None = None

    def _as2d(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        x = x.reshape(-1, self.dim) if x.ndim != 2 else x
        if x.shape[1] != self.dim:
            raise ValueError(f"expected [n, {self.dim}] values, got {x.shape}")
        return x

    def update_range(self, x):
        """Pass 1: widen min/max with a block of values ``[n, D]``."""
        x = self._as2d(x)
        if len(x):
            self.min = np.minimum(self.min, x.min(0))
            self.max = np.maximum(self.max, x.max(0))

    def update(self, x):
        """Pass 2: add a block ``[n, D]`` to the histogram (over pass 1's range) and the running count/mean/M2."""
        x = self._as2d(x)
        n = len(x)
        if n == 0:
            return
        if not np.all(np.isfinite(self.min)):
            raise RuntimeError("StreamingStats.update before update_range: the histogram range is unknown")
        if self.hist is None:
            self.hist = np.zeros((self.bins, self.dim), dtype=np.int64)
        self.hist += _histogram(x, self.min, self.max, self.bins)
        m = x.mean(0)
        m2 = ((x - m) ** 2).sum(0)
        tot = self.count + n
        delta = m - self.mean
        self.mean = self.mean + delta * n / tot
        self.m2 = self.m2 + m2 + delta ** 2 * self.count * n / tot
        self.count = tot

    def result(self) -> dict[str, np.ndarray]:
        """``min``, ``max``, ``mean``, ``std`` (population), ``count`` and the histogram quantiles of everything added.
        """
        if self.count == 0:
            raise ValueError("no data")
        out = {"min": self.min.copy(), "max": self.max.copy(), "mean": self.mean.copy(),
               "std": np.sqrt(self.m2 / self.count), "count": np.array([self.count], dtype=np.int64)}
        out.update(_hist_quantiles(None, self.min, self.max, self.hist))
        return out

    @property
    def max_quantile_error(self) -> np.ndarray:
        """The bound on each quantile's error: one bin width per dimension."""
        return (self.max - self.min) / self.bins


def compute_dataset_stats(dataset, keys: Iterable[str] | None = None, bins: int = HIST_BINS,
                          batch_rows: int = 65536) -> dict[str, dict[str, np.ndarray]]:
    """Dataset-level statistics of the numeric features of a :class:`~vla_blocks.data.LeRobotDataset` (episode
    filter respected), reading the parquet column by column in row batches (two passes, bounded memory)."""
    feats = dataset.meta.features
    keys = list(keys) if keys is not None else [k for k, f in feats.items()
                                                 if f["dtype"] not in ("image", "video", "string", "language")]
    for k in keys:
        if k not in feats:
            raise KeyError(f"feature {k!r} is not in the dataset (features: {list(feats)})")
        if feats[k]["dtype"] in ("image", "video", "string", "language"):
            raise ValueError(f"feature {k!r} is a {feats[k]['dtype']} feature; streaming stats cover numeric features")
    acc = {k: StreamingStats(int(np.prod(feats[k]["shape"])), bins) for k in keys}
    for pass_no in (1, 2):
        for block in dataset.iter_columns(keys, batch_rows):
            for k in keys:
                (acc[k].update_range if pass_no == 1 else acc[k].update)(block[k])
    return {k: a.result() for k, a in acc.items()}


# ---------------------------------------------------------------------------------------------- files
def stats_to_json(stats: Mapping[str, Mapping[str, Any]]) -> dict:
    """Nested lists (lerobot ``stats.json`` layout)."""
    return {k: {s: np.asarray(v).tolist() for s, v in st.items()} for k, st in stats.items()}


def stats_from_json(data: Mapping) -> dict[str, dict[str, np.ndarray]]:
    """Statistics read back from JSON (key -> statistic -> array), the inverse of :func:`stats_to_json`."""
    return {k: {s: np.asarray(v) for s, v in st.items()} for k, st in data.items()}


def to_openpi(stats: Mapping[str, Mapping[str, Any]], key_map: Mapping[str, str] = OPENPI_KEYS) -> dict:
    """``{"norm_stats": {openpi_key: {mean, std, q01, q99}}}`` from lerobot-named stats (keys in ``key_map``)."""
    out = {}
    for src, dst in key_map.items():
        if src not in stats:
            continue
        st = stats[src]
        missing = [s for s in ("mean", "std", "q01", "q99") if s not in st]
        if missing:
            raise ValueError(f"stats of {src!r} lack {missing} (openpi's norm_stats.json needs mean, std, q01, q99)")
        out[dst] = {s: np.asarray(st[s], dtype=np.float64).reshape(-1).tolist() for s in ("mean", "std", "q01", "q99")}
    if not out:
        raise ValueError(f"none of {list(key_map)} has statistics (have {list(stats)})")
    return {"norm_stats": out}


def from_openpi(data: Mapping, key_map: Mapping[str, str] = OPENPI_KEYS) -> dict[str, dict[str, np.ndarray]]:
    """lerobot-named stats from openpi's ``norm_stats.json`` content (``{"norm_stats": {...}}`` or the inner dict)."""
    inner = data.get("norm_stats", data)
    back = {v: k for k, v in key_map.items()}
    out = {}
    for k, st in inner.items():
        out[back.get(k, k)] = {s: np.asarray(v, dtype=np.float64) for s, v in st.items() if v is not None}
    return out
