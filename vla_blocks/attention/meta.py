"""Mask metadata: per-token vectors of the query and key sides, and per-tile summaries.

The metadata of one attention call is eight int32 vectors of shape ``[B, Nq]`` / ``[B, Nk]``:
``idx`` (token position in the row's common coordinate; causality compares these), ``doc``,
``seg`` (segment id, unique within a row) and ``flags`` (bit 0 valid, bit 1 bidirectional segment
(full/noise), bit 2 noise segment). The mask is (DESIGN §2)::

    allowed = valid_q ∧ valid_k ∧ doc_q = doc_k
              ∧ (idx_k ≤ idx_q ∨ (seg_q = seg_k ∧ bidir_q))
              ∧ ¬(noise_k ∧ seg_q ≠ seg_k)

It is computed once per batch and shared by every layer: the dense mask, the tile summaries and
the FlexAttention BlockMask are cached on the object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

FLAG_VALID = 1
FLAG_BIDIR = 2
FLAG_NOISE = 4

TILE_EMPTY = 0
TILE_PARTIAL = 1
TILE_FULL = 2


def allowed_pairs(q_idx, q_doc, q_seg, q_flags, k_idx, k_doc, k_seg, k_flags) -> torch.Tensor:
    """The mask formula on broadcastable vectors (used by the dense oracle and by Flex's mask_mod)."""
    qv = (q_flags & FLAG_VALID) != 0
    kv = (k_flags & FLAG_VALID) != 0
    bidir = (q_flags & FLAG_BIDIR) != 0
    knoise = (k_flags & FLAG_NOISE) != 0
    same_seg = q_seg == k_seg
    return qv & kv & (q_doc == k_doc) & ((k_idx <= q_idx) | (same_seg & bidir)) & ~(knoise & ~same_seg)


@dataclass
class TileSummary:
    """Per-(row, q-tile, k-tile) state: 0 empty (skip), 1 partial (evaluate the mask), 2 full (no mask work)."""

    state: torch.Tensor  # [B, Mq, Mk] int8
    block_m: int
    block_n: int

    def counts(self) -> dict[str, int]:
        """Number of empty, partial and full tiles."""
        s = self.state
        return {"empty": int((s == TILE_EMPTY).sum()), "partial": int((s == TILE_PARTIAL).sum()),
                "full": int((s == TILE_FULL).sum())}

    def kv_lists(self):
        """Flex-style ordered lists per q tile: (partial counts, partial indices, full counts, full indices)."""
        s = self.state.to(torch.int32)
        partial = s == TILE_PARTIAL
        full = s == TILE_FULL
        mk = s.shape[-1]
        ar = torch.arange(mk, device=s.device, dtype=torch.int32)

        def ordered(sel):
            # stable order: selected tiles first, by increasing k-tile index
            key = torch.where(sel, ar, ar + mk)
            idx = torch.argsort(key, dim=-1, stable=True).to(torch.int32)
            return sel.sum(-1).to(torch.int32), idx

        return (*ordered(partial), *ordered(full))

    def transposed(self) -> "TileSummary":
        """The summary with the q and k sides swapped: ``state`` ``[B, Mk, Mq]``, ``block_m``/``block_n`` swapped."""
        return TileSummary(self.state.transpose(1, 2).contiguous(), self.block_n, self.block_m)

    def q_lists(self):
        """Ordered lists per k tile (the dK/dV backward's loop): (partial counts ``[B, Mk]``, partial q-tile
        indices ``[B, Mk, Mq]``, full counts, full indices), like :meth:`kv_lists` on the transposed summary."""
        return self.transposed().kv_lists()


def _tile_reduce(x: torch.Tensor, block: int, pad_value: int, op: str) -> torch.Tensor:
    B, n = x.shape
    m = -(-n // block)
    if m * block != n:
        x = torch.cat([x, x.new_full((B, m * block - n), pad_value)], dim=1)
    x = x.view(B, m, block)
    return x.amin(-1) if op == "min" else x.amax(-1)


def classify_tiles(q: dict[str, torch.Tensor], k: dict[str, torch.Tensor]) -> torch.Tensor:
    """Empty / partial / full state of (query block, key block) pairs from their O(N) statistics.

    ``q`` and ``k`` hold the ``q_*`` and ``k_*`` entries of :meth:`MaskMeta.tile_stats` (or the same
    statistics over any other blocks, e.g. per-document query chunks) in broadcastable shapes. Conservative:
    a pair holding an allowed (q, k) is never empty, and a full pair is allowed everywhere.
    """
    any_valid = (q["q_any_valid"] > 0) & (k["k_any_valid"] > 0)
    doc_overlap = (q["q_doc_min"] <= k["k_doc_max"]) & (k["k_doc_min"] <= q["q_doc_max"])
    seg_overlap = (q["q_seg_min"] <= k["k_seg_max"]) & (k["k_seg_min"] <= q["q_seg_max"])
    some_causal = k["k_idx_min"] <= q["q_idx_max"]
    some_bidir = seg_overlap & (q["q_any_bidir"] > 0)
    # noise rule: if every valid key is noise and of one segment, only that segment's rows see it
    k_one_seg = k["k_seg_min"] == k["k_seg_max"]
    noise_blocks = (k["k_all_noise"] > 0) & (k["k_any_valid"] > 0) & k_one_seg & ~seg_overlap
    nonempty = any_valid & doc_overlap & (some_causal | some_bidir) & ~noise_blocks
    q_one_seg = q["q_seg_min"] == q["q_seg_max"]
    one_doc = ((q["q_doc_min"] == q["q_doc_max"]) & (k["k_doc_min"] == k["k_doc_max"])
               & (q["q_doc_min"] == k["k_doc_min"]))
    all_valid = (q["q_all_valid"] > 0) & (k["k_all_valid"] > 0)
    same_single_seg = q_one_seg & k_one_seg & (q["q_seg_min"] == k["k_seg_min"])
    noise_ok = (k["k_any_noise"] == 0) | same_single_seg
    all_causal = k["k_idx_max"] <= q["q_idx_min"]
    all_bidir = same_single_seg & (q["q_all_bidir"] > 0)
    full = all_valid & one_doc & noise_ok & (all_causal | all_bidir)
    return torch.where(full, TILE_FULL, torch.where(nonempty, TILE_PARTIAL, TILE_EMPTY)).to(torch.int8)


@dataclass
class MaskMeta:
    """Query- and key-side metadata of one attention call; see the module docstring."""

    q_idx: torch.Tensor
    q_doc: torch.Tensor
    q_seg: torch.Tensor
    q_flags: torch.Tensor
    k_idx: torch.Tensor
    k_doc: torch.Tensor
    k_seg: torch.Tensor
    k_flags: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        B, nq = self.q_idx.shape
        for name in ("q_doc", "q_seg", "q_flags"):
            if getattr(self, name).shape != (B, nq):
                raise ValueError(f"MaskMeta.{name} has shape {tuple(getattr(self, name).shape)}, expected {(B, nq)}")
        nk = self.k_idx.shape[1]
        for name in ("k_idx", "k_doc", "k_seg", "k_flags"):
            if getattr(self, name).shape != (B, nk):
                raise ValueError(f"MaskMeta.{name} has shape {tuple(getattr(self, name).shape)}, expected {(B, nk)}")

    # ------------------------------------------------------------------ basics
    @property
    def batch_size(self) -> int:
        """Rows B."""
        return self.q_idx.shape[0]

    @property
    def q_len(self) -> int:
        """Query tokens per row."""
        return self.q_idx.shape[1]

    @property
    def k_len(self) -> int:
        """Key tokens per row (prefix included)."""
        return self.k_idx.shape[1]

    @property
    def device(self):
        """The device of the metadata tensors."""
        return self.q_idx.device

    def to(self, device) -> "MaskMeta":
        """This metadata on ``device`` (the per-batch cache is not carried over)."""
        return MaskMeta(*(getattr(self, n).to(device) for n in
                          ("q_idx", "q_doc", "q_seg", "q_flags", "k_idx", "k_doc", "k_seg", "k_flags")))

    def with_invalid_keys(self, at: int, count: int) -> "MaskMeta":
        """A copy whose key side has ``count`` invalid keys inserted before key ``at`` (the query side is shared).

        Invalid keys are never attended and are neutral in tile statistics, so the mask of the original
        keys is unchanged. Kernels use this to align a cached prefix to their key-tile size.
        """
        if not 0 <= at <= self.k_len or count < 0:
            raise ValueError(f"cannot insert {count} keys at {at} into {self.k_len} keys")
        B = self.batch_size

        def ins(t, fill):
            pad = t.new_full((B, count), fill)
            return torch.cat([t[:, :at], pad, t[:, at:]], dim=1)

        return MaskMeta(self.q_idx, self.q_doc, self.q_seg, self.q_flags,
                        ins(self.k_idx, 0), ins(self.k_doc, -1), ins(self.k_seg, -1), ins(self.k_flags, 0))

    def vectors(self) -> tuple[torch.Tensor, ...]:
        """The eight per-token vectors (index, doc, segment, flags of queries, then of keys), each ``[B, N]``."""
        return (self.q_idx, self.q_doc, self.q_seg, self.q_flags, self.k_idx, self.k_doc, self.k_seg, self.k_flags)

    def cached(self, key, fn):
        """Compute ``fn()`` once per (meta, key): the per-batch cache shared by every layer."""
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    # ------------------------------------------------------------------ oracle
    def dense(self) -> torch.Tensor:
        """Dense boolean mask ``[B, Nq, Nk]`` from the formula (the oracle)."""
        def build():
            q = [t[:, :, None] for t in (self.q_idx, self.q_doc, self.q_seg, self.q_flags)]
            k = [t[:, None, :] for t in (self.k_idx, self.k_doc, self.k_seg, self.k_flags)]
            return allowed_pairs(*q, *k)
        return self.cached("dense", build)

    def num_allowed_pairs(self) -> int:
        """Exact count of allowed (q, k) pairs (for useful-FLOP accounting), computed blockwise in O(N) memory."""
        total = 0
        step = max(1, 4096 * 4096 // max(self.k_len, 1))
        for a in range(0, self.q_len, step):
            sl = slice(a, a + step)
            q = [t[:, sl, None] for t in (self.q_idx, self.q_doc, self.q_seg, self.q_flags)]
            k = [t[:, None, :] for t in (self.k_idx, self.k_doc, self.k_seg, self.k_flags)]
            total += int(allowed_pairs(*q, *k).sum())
        return total

    def is_plain_causal(self) -> bool:
        """True when the mask is exactly ``k ≤ q`` on a square pass: every token valid, one document per row,
        no bidirectional segment, and queries and keys are the same tokens. O(N), cached."""
        def build():
            if self.q_len != self.k_len or not torch.equal(self.q_idx, self.k_idx):
                return False
            if not bool(((self.q_flags & FLAG_VALID) != 0).all()) or bool(((self.q_flags & (FLAG_BIDIR | FLAG_NOISE)) != 0).any()):
                return False
            if not torch.equal(self.q_flags, self.k_flags) or not torch.equal(self.q_doc, self.k_doc):
                return False
            ar = torch.arange(self.q_len, device=self.q_idx.device, dtype=self.q_idx.dtype)
            return bool((self.q_doc == self.q_doc[:, :1]).all()) and bool((self.q_idx == ar).all())
        return self.cached("plain_causal", build)

    def row_is_empty(self) -> torch.Tensor:
        """[B, Nq] True where a query row attends to nothing (its output is 0).

        Computed from the O(N) vectors (grouped minima, no dense mask), cached. A valid query ``q`` sees a key
        exactly when its document has a valid non-noise key at or before it, or its own segment has a valid
        key at or before it, or ``q`` is bidirectional and its segment has any valid key.
        """
        return self.cached("row_is_empty", self._row_is_empty)

    def _row_is_empty(self) -> torch.Tensor:
        B, nq = self.batch_size, self.q_len
        dev = self.q_idx.device
        qv = (self.q_flags & FLAG_VALID) != 0
        kv = (self.k_flags & FLAG_VALID) != 0
        rows = torch.arange(B, device=dev, dtype=torch.int64)
        # (row, doc) and (row, doc, seg) group ids shared by both sides
        doc_key = torch.cat([(rows[:, None] * 2 ** 32 + self.q_doc.to(torch.int64) + 2 ** 31).reshape(-1),
                             (rows[:, None] * 2 ** 32 + self.k_doc.to(torch.int64) + 2 ** 31).reshape(-1)])
        _, gdoc = torch.unique(doc_key, return_inverse=True)
        seg = torch.cat([self.q_seg.reshape(-1), self.k_seg.reshape(-1)]).to(torch.int64)
        _, gseg = torch.unique(gdoc * 2 ** 32 + seg + 2 ** 31, return_inverse=True)
        gdoc_q, gdoc_k = gdoc[:B * nq], gdoc[B * nq:]
        gseg_q, gseg_k = gseg[:B * nq], gseg[B * nq:]
        big = torch.iinfo(torch.int64).max
        k_idx = self.k_idx.reshape(-1).to(torch.int64)
        kvf = kv.reshape(-1)
        k_plain = kvf & ((self.k_flags.reshape(-1) & FLAG_NOISE) == 0)
        n_doc = int(gdoc.max()) + 1 if gdoc.numel() else 0
        n_seg = int(gseg.max()) + 1 if gseg.numel() else 0
        first_plain = torch.full((n_doc,), big, dtype=torch.int64, device=dev).scatter_reduce(
            0, gdoc_k, torch.where(k_plain, k_idx, big), "amin")
        first_seg = torch.full((n_seg,), big, dtype=torch.int64, device=dev).scatter_reduce(
            0, gseg_k, torch.where(kvf, k_idx, big), "amin")
        q_idx = self.q_idx.reshape(-1).to(torch.int64)
        q_bidir = ((self.q_flags.reshape(-1) & FLAG_BIDIR) != 0)
        sees = (first_plain[gdoc_q] <= q_idx) | (first_seg[gseg_q] <= q_idx) | (q_bidir & (first_seg[gseg_q] < big))
        return ~(qv & sees.view(B, nq))

    # ------------------------------------------------------------------ tile summaries
    def tile_stats(self, block_m: int, block_n: int) -> dict[str, torch.Tensor]:
        """O(N) per-tile reductions of the metadata (the FlashMask scan-max-min analogue)."""
        def build():
            big = 2 ** 30
            qv = (self.q_flags & FLAG_VALID) != 0
            kv = (self.k_flags & FLAG_VALID) != 0
            # invalid tokens are neutral: they never attend, so tiles ignore them in min/max
            q_doc = torch.where(qv, self.q_doc, big)
            k_doc = torch.where(kv, self.k_doc, big)
            st = {}
            st["q_idx_min"] = _tile_reduce(torch.where(qv, self.q_idx, big), block_m, big, "min")
            st["q_idx_max"] = _tile_reduce(torch.where(qv, self.q_idx, -big), block_m, -big, "max")
            st["q_doc_min"] = _tile_reduce(q_doc, block_m, big, "min")
            st["q_doc_max"] = _tile_reduce(torch.where(qv, self.q_doc, -big), block_m, -big, "max")
            st["q_seg_min"] = _tile_reduce(torch.where(qv, self.q_seg, big), block_m, big, "min")
            st["q_seg_max"] = _tile_reduce(torch.where(qv, self.q_seg, -big), block_m, -big, "max")
            qb = ((self.q_flags & FLAG_BIDIR) != 0) & qv
            st["q_any_valid"] = _tile_reduce(qv.int(), block_m, 0, "max")
            st["q_all_valid"] = _tile_reduce(qv.int(), block_m, 0, "min")
            st["q_any_bidir"] = _tile_reduce(qb.int(), block_m, 0, "max")
            st["q_all_bidir"] = _tile_reduce(qb.int(), block_m, 0, "min")
            st["k_idx_min"] = _tile_reduce(torch.where(kv, self.k_idx, big), block_n, big, "min")
            st["k_idx_max"] = _tile_reduce(torch.where(kv, self.k_idx, -big), block_n, -big, "max")
            st["k_doc_min"] = _tile_reduce(k_doc, block_n, big, "min")
            st["k_doc_max"] = _tile_reduce(torch.where(kv, self.k_doc, -big), block_n, -big, "max")
            st["k_seg_min"] = _tile_reduce(torch.where(kv, self.k_seg, big), block_n, big, "min")
            st["k_seg_max"] = _tile_reduce(torch.where(kv, self.k_seg, -big), block_n, -big, "max")
            kn = ((self.k_flags & FLAG_NOISE) != 0) & kv
            st["k_any_valid"] = _tile_reduce(kv.int(), block_n, 0, "max")
            st["k_all_valid"] = _tile_reduce(kv.int(), block_n, 0, "min")
            st["k_any_noise"] = _tile_reduce(kn.int(), block_n, 0, "max")
            st["k_all_noise"] = _tile_reduce(kn.int(), block_n, 0, "min")
            # a k tile whose valid tokens are all noise of one segment is visible only to that segment
            return st
        return self.cached(("tile_stats", block_m, block_n), build)

    def tile_summary(self, block_m: int = 128, block_n: int = 128) -> TileSummary:
        """Classify every (q tile, k tile) as empty / partial / full from the O(N) tile stats.

        Conservative: a tile holding an allowed pair is never empty, and a full tile is allowed
        everywhere (tested against :meth:`dense`). Cost O(B·Mq·Mk), no O(N²) pass.
        """
        def build():
            s = self.tile_stats(block_m, block_n)
            q = {k: v[:, :, None] for k, v in s.items() if k.startswith("q_")}
            k = {kk: v[:, None, :] for kk, v in s.items() if kk.startswith("k_")}
            return TileSummary(classify_tiles(q, k), block_m, block_n)
        return self.cached(("tile_summary", block_m, block_n), build)
