"""Attention without an N×N mask: per-document query chunks that read only their non-empty key tiles.

The ``sdpa_blocks`` backend (:mod:`.builtin`) runs ``scaled_dot_product_attention`` on small blocks planned
here from the O(N) mask metadata, once per batch (cached on the :class:`MaskMeta`, shared by every layer):

1. **Documents.** The valid queries of a row are cut into runs of one document (a document's invalid
   tokens in the middle stay in its run; padding between documents is dropped). Document boundaries come
   from the metadata, never from a dense mask.
2. **Query chunks.** A run longer than ``block_q`` is cut into chunks of at most ``block_q`` queries.
3. **Key tiles.** Each chunk gets statistics like a tile's (min/max of position, document, segment, any/all
   valid, bidirectional, noise) and is classified against every ``block_k`` key tile with the same rule as
   :meth:`MaskMeta.tile_summary`. The chunk reads only the valid keys of its own document in its non-empty
   tiles, gathered into one contiguous block, so memory is chunk × reach, not N².
4. **Masks.** A chunk whose tiles are all *full* needs no mask. Otherwise its mask is the formula evaluated
   on the gathered vectors (exact, ``[Lq, Lk]``), built on first use and cached. Rows that attend nothing
   inside their chunk attend nothing at all (the chunk holds every key they could see): they are opened in
   the chunk mask and their output is set to 0 (zero gradient), as the dense path does.
5. **Batching.** Chunks of the same shape (``Lq``, ``Lk``, masked or not) — e.g. the identical samples of a
   packed row — run as one batched SDPA call, split so a call's mask holds at most ``max_call_pairs``
   elements. Chunks of at least ``view_min_pairs`` pairs over one contiguous key range run alone on pieces of
   q, k, v (no gather copy). Inputs are cut and outputs joined with one split / gather / concatenation per
   tensor, so the backward adds O(N) work, not O(calls × N).

Tensors: ``q [B, Hq, Nq, D]``, ``k, v [B, Hkv, Nk, D]``; the keys of a cached-prefix call are
``prefix ++ k`` (the caller concatenates, O(N)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .meta import FLAG_BIDIR, FLAG_NOISE, FLAG_VALID, TILE_EMPTY, TILE_FULL, MaskMeta, classify_tiles

BLOCK_Q = 1024
BLOCK_K = 64
MAX_CALL_PAIRS = 2 ** 24
VIEW_MIN_PAIRS = 2 ** 16  # chunks this large run alone on slices of q, k, v; smaller ones are gathered and batched


@dataclass
class BlockCall:
    """One SDPA call: ``n`` chunks of ``lq`` queries × ``lk`` keys (flat indices into ``B·Nq`` / ``B·Nk``)."""

    q_index: torch.Tensor  # [n * lq] int64
    k_index: torch.Tensor  # [n * lk] int64
    n: int
    lq: int
    lk: int
    full: bool  # every (q, k) of every chunk is allowed: no mask
    starts: list[tuple[int, int]]  # (row, first query) of each chunk: chunks are contiguous query ranges
    view: tuple[int, int, int] | None = None  # (row, first query, first key): one chunk over a contiguous key range
    _mask: tuple | None = field(default=None, repr=False)

    def mask(self, meta: MaskMeta) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(mask [n, lq, lk] with empty rows opened, empty rows [n, lq])``; ``(None, None)`` for a full call."""
        if self.full:
            return None, None
        if self._mask is None:
            qi, ki = self.q_index.view(self.n, self.lq), self.k_index.view(self.n, self.lk)
            q_idx, q_seg, q_flags = (t.reshape(-1)[qi][:, :, None] for t in (meta.q_idx, meta.q_seg, meta.q_flags))
            k_idx, k_seg, k_flags = (t.reshape(-1)[ki][:, None, :] for t in (meta.k_idx, meta.k_seg, meta.k_flags))
            # the formula, knowing every gathered key is valid and of the chunk's document (in-place: few temporaries)
            same = q_seg == k_seg
            m = k_idx <= q_idx
            m |= same & ((q_flags & FLAG_BIDIR) != 0)
            m &= same | ((k_flags & FLAG_NOISE) == 0)
            m &= (q_flags & FLAG_VALID) != 0
            del same
            empty = ~m.any(-1)
            if bool(empty.any()):
                m |= empty[:, :, None]
            else:
                empty = None
            self._mask = (m, empty)
        return self._mask

    @property
    def pairs(self) -> int:
        return self.n * self.lq * self.lk


@dataclass
class BlockPlan:
    """The calls of one batch, and what they cost next to the dense mask."""

    calls: list[BlockCall]
    dense_pairs: int  # B·Nq·Nk: what the dense path evaluates
    issued_pairs: int  # Σ n·lq·lk over the calls
    chunks: int
    documents: int
    block_q: int
    block_k: int

    @property
    def fraction(self) -> float:
        return self.issued_pairs / self.dense_pairs if self.dense_pairs else 0.0

    def describe(self) -> str:
        shapes = len({(c.lq, c.lk, c.full) for c in self.calls})
        return (f"{self.documents} document run(s) in {self.chunks} chunk(s) of ≤{self.block_q} queries, "
                f"{len(self.calls)} SDPA call(s) of {shapes} shape(s), {self.issued_pairs} pairs issued "
                f"({100 * self.fraction:.1f}% of the dense {self.dense_pairs})")


def block_plan(meta: MaskMeta, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
               max_call_pairs: int = MAX_CALL_PAIRS, view_min_pairs: int = VIEW_MIN_PAIRS) -> BlockPlan:
    """The :class:`BlockPlan` of ``meta`` (cached per batch; O(N) plus O(chunks × N / block_k))."""
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q and block_k must be >= 1 (got {block_q}, {block_k})")
    return meta.cached(("block_plan", block_q, block_k, max_call_pairs, view_min_pairs),
                       lambda: _build_plan(meta, block_q, block_k, max_call_pairs, view_min_pairs))


def _runs(meta: MaskMeta) -> list[tuple[int, int, int, int]]:
    """(row, start, end, document) of every run of valid queries of one document (in row order)."""
    qv = (meta.q_flags & FLAG_VALID) != 0
    rows, cols = torch.nonzero(qv, as_tuple=True)
    if rows.numel() == 0:
        return []
    docs = meta.q_doc[rows, cols]
    brk = torch.ones_like(rows, dtype=torch.bool)
    brk[1:] = (rows[1:] != rows[:-1]) | (docs[1:] != docs[:-1])
    starts = torch.nonzero(brk).squeeze(-1)
    ends = torch.cat([starts[1:], starts.new_tensor([rows.numel()])]) - 1
    return list(zip(rows[starts].tolist(), cols[starts].tolist(), (cols[ends] + 1).tolist(), docs[starts].tolist()))


def _chunk_stats(meta: MaskMeta, chunk_of: torch.Tensor, pos_row: torch.Tensor, pos_col: torch.Tensor,
                 n: int) -> dict[str, torch.Tensor]:
    """Per-chunk ``q_*`` statistics (the names of :meth:`MaskMeta.tile_stats`) over the chunks' positions."""
    big = 2 ** 30
    dev = chunk_of.device
    flags = meta.q_flags[pos_row, pos_col]
    valid = (flags & FLAG_VALID) != 0
    bidir = ((flags & FLAG_BIDIR) != 0) & valid

    def red(x, fill, op):
        out = torch.full((n,), fill, dtype=torch.int64, device=dev)
        return out.scatter_reduce(0, chunk_of, x.to(torch.int64), op)

    st = {}
    for name, vec in (("idx", meta.q_idx), ("doc", meta.q_doc), ("seg", meta.q_seg)):
        x = vec[pos_row, pos_col].to(torch.int64)
        st[f"q_{name}_min"] = red(torch.where(valid, x, big), big, "amin")
        st[f"q_{name}_max"] = red(torch.where(valid, x, -big), -big, "amax")
    st["q_any_valid"] = red(valid, 0, "amax")
    st["q_all_valid"] = red(valid, 1, "amin")
    st["q_any_bidir"] = red(bidir, 0, "amax")
    st["q_all_bidir"] = red(bidir, 1, "amin")
    return st


def _build_plan(meta: MaskMeta, block_q: int, block_k: int, max_call_pairs: int, view_min_pairs: int) -> BlockPlan:
    B, nq, nk = meta.batch_size, meta.q_len, meta.k_len
    dev = meta.device
    runs = _runs(meta)
    chunks, chunk_doc = [], []  # (row, start, end), document
    for r, a, e, doc in runs:
        for s in range(a, e, block_q):
            chunks.append((r, s, min(e, s + block_q)))
            chunk_doc.append(doc)
    if not chunks:
        return BlockPlan([], B * nq * nk, 0, 0, 0, block_q, block_k)
    ct = torch.tensor(chunks, dtype=torch.int64, device=dev)
    lens = ct[:, 2] - ct[:, 1]
    n = len(chunks)
    chunk_of = torch.repeat_interleave(torch.arange(n, device=dev), lens)
    starts = torch.cumsum(lens, 0) - lens
    pos_col = ct[:, 1][chunk_of] + (torch.arange(int(lens.sum()), device=dev) - starts[chunk_of])
    pos_row = ct[:, 0][chunk_of]
    qst = {k: v[:, None] for k, v in _chunk_stats(meta, chunk_of, pos_row, pos_col, n).items()}
    kst = {k: v[ct[:, 0]].to(torch.int64) for k, v in meta.tile_stats(block_k, block_k).items() if k.startswith("k_")}
    state = classify_tiles(qst, kst)  # [chunks, Mk]
    kvalid = (meta.k_flags & FLAG_VALID) != 0
    mk = state.shape[1]
    tile_pos = torch.arange(mk * block_k, device=dev).view(mk, block_k)
    groups: dict[tuple[int, int, bool], list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]] = {}
    calls = []
    lens_l = lens.tolist()
    for c, (r, a, e) in enumerate(chunks):
        st = state[c]
        live = st != TILE_EMPTY
        if not bool(live.any()):
            continue  # every query of the chunk attends nothing: its output stays 0
        kpos = tile_pos[live].reshape(-1)
        kpos = kpos[kpos < nk]
        kpos = kpos[kvalid[r, kpos] & (meta.k_doc[r, kpos] == chunk_doc[c])]  # chunks hold one document
        if kpos.numel() == 0:
            continue
        full = bool((st[live] == TILE_FULL).all())
        qidx = r * nq + torch.arange(a, e, device=dev)
        k0, lk = int(kpos[0]), kpos.numel()
        if lens_l[c] * lk >= view_min_pairs and int(kpos[-1]) - k0 + 1 == lk:
            # a large chunk over one key range: slices of q, k, v (no gather copy), its own call
            calls.append(BlockCall(qidx, r * nk + kpos, 1, lens_l[c], lk, full, [(r, a)], view=(r, a, k0)))
            continue
        groups.setdefault((lens_l[c], lk, full), []).append((qidx, r * nk + kpos, (r, a)))
    for (lq, lk, full), items in groups.items():
        per_call = max(1, max_call_pairs // (lq * lk))
        for i in range(0, len(items), per_call):
            part = items[i:i + per_call]
            calls.append(BlockCall(torch.cat([p[0] for p in part]), torch.cat([p[1] for p in part]),
                                   len(part), lq, lk, full, [p[2] for p in part]))
    issued = sum(c.pairs for c in calls)
    return BlockPlan(calls, B * nq * nk, issued, n, len(runs), block_q, block_k)


def _merged(intervals: list[tuple[int, int]]) -> list[list[int]]:
    """Overlapping intervals merged (touching ones stay apart), sorted."""
    out: list[list[int]] = []
    for a, e in sorted(intervals):
        if out and a < out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([a, e])
    return out


def _split_cover(t: torch.Tensor, intervals: list[list[int]], n: int) -> dict[int, torch.Tensor]:
    """``t [H, n, D]`` split along dim 1 at the bounds of disjoint sorted ``intervals``: {start: piece}. One split
    op, so the backward concatenates once instead of allocating a full-size gradient per piece."""
    sizes, starts, pos = [], [], 0
    for a, e in intervals:
        if a > pos:
            sizes.append(a - pos)
            starts.append(None)
        sizes.append(e - a)
        starts.append(a)
        pos = e
    if pos < n:
        sizes.append(n - pos)
        starts.append(None)
    return {a: p for a, p in zip(starts, t.split(sizes, dim=1)) if a is not None}


def blocks_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: MaskMeta, plan: BlockPlan,
                     scale: float | None = None) -> torch.Tensor:
    """Masked attention by the calls of ``plan``; ``[B, Hq, Nq, Dv]``, rows that attend nothing are 0.

    Every input and output is taken apart and put together with one split / gather / concatenation per tensor,
    so the backward costs O(N) besides the calls themselves (a slice per call would allocate a full-size
    gradient per call)."""
    B, hq, nq, d = q.shape
    hk, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    gqa = hq != hk
    if not plan.calls:  # nothing attends anything: zeros that stay in q's, k's and v's graphs (zero gradients)
        true = torch.ones((), dtype=torch.bool, device=q.device)
        tied = k.masked_fill(true, 0.0).sum() + v.masked_fill(true, 0.0).sum()
        return q.new_zeros((B, hq, nq, dv)) + q.masked_fill(true, 0.0).sum() + tied
    views = [c for c in plan.calls if c.view is not None]
    gathers = [c for c in plan.calls if c.view is None]
    inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    if views:  # large chunks: pieces of q, k, v (per row: one split of q at the chunks, one of k/v at key ranges)
        rows_q, rows_k, rows_v = q.unbind(0), k.unbind(0), v.unbind(0)
        for r in sorted({c.view[0] for c in views}):
            mine = [c for c in views if c.view[0] == r]
            qp = _split_cover(rows_q[r], [[c.view[1], c.view[1] + c.lq] for c in mine], nq)
            # keys: one split at the merged key ranges (a document's, when its chunks share keys); a chunk narrows
            # its piece, a view: no copy kept for the backward, which allocates that piece's size per chunk
            kr = _merged([(c.view[2], c.view[2] + c.lk) for c in mine])
            kp, vp = _split_cover(rows_k[r], kr, nk), _split_cover(rows_v[r], kr, nk)
            for c in mine:
                k0 = c.view[2]
                ks = max(a for a, _ in kr if a <= k0)
                kk, vv = kp[ks], vp[ks]
                if kk.shape[1] != c.lk:
                    kk, vv = kk.narrow(1, k0 - ks, c.lk), vv.narrow(1, k0 - ks, c.lk)
                inputs[id(c)] = (qp[c.view[1]][None], kk[None], vv[None])
    if gathers:  # small chunks, batched by shape: one gather of q, k, v for all of them
        qf = q.transpose(0, 1).reshape(hq, B * nq, d)  # a view for B == 1
        kf = k.transpose(0, 1).reshape(hk, B * nk, d)
        vf = v.transpose(0, 1).reshape(hk, B * nk, dv)
        qi = torch.cat([c.q_index for c in gathers])
        ki = torch.cat([c.k_index for c in gathers])
        qs = qf.index_select(1, qi).split([c.n * c.lq for c in gathers], 1)
        ks_ = kf.index_select(1, ki).split([c.n * c.lk for c in gathers], 1)
        vs = vf.index_select(1, ki).split([c.n * c.lk for c in gathers], 1)
        for c, a, b_, e in zip(gathers, qs, ks_, vs):
            inputs[id(c)] = (a.view(hq, c.n, c.lq, d).transpose(0, 1), b_.view(hk, c.n, c.lk, d).transpose(0, 1),
                             e.view(hk, c.n, c.lk, dv).transpose(0, 1))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    out = None if grad else q.new_zeros((B, hq, nq, dv))  # inference: write in place, no pieces to join
    pieces: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for call in plan.calls:
        qq, kk, vv = inputs[id(call)]
        mask, empty = call.mask(meta)
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=None if mask is None else mask[:, None],
                                           scale=scale, enable_gqa=gqa)
        if empty is not None:
            o = o.masked_fill(empty[:, None, :, None], 0.0)
        for (r, a), t in zip(call.starts, o.unbind(0)):
            if out is not None:
                out[r, :, a:a + call.lq] = t
            else:
                pieces.setdefault(r, []).append((a, t))
    if out is not None:
        return out
    rows = []
    for r in range(B):  # one concatenation per row: chunk outputs in order, zeros where no chunk is
        seq, pos = [], 0
        for a, t in sorted(pieces.get(r, []), key=lambda x: x[0]):
            if a > pos:
                seq.append(q.new_zeros((hq, a - pos, dv)))
            seq.append(t)
            pos = a + t.shape[1]
        if pos < nq:
            seq.append(q.new_zeros((hq, nq - pos, dv)))
        rows.append(torch.cat(seq, 1) if len(seq) > 1 else seq[0])
    return torch.stack(rows) if B > 1 else rows[0][None]
