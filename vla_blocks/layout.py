"""Token layout of a packed batch: segments -> experts, RoPE positions, documents, mask metadata.

A *sample* (document) is a list of :class:`Segment` (and :class:`RopeSkip`, which advances the RoPE counter
without tokens: BAGEL's dropped condition images). A segment is one attention unit with a mode
(``causal`` text, ``full`` image/prefix, ``noise`` diffusion input) and a RoPE policy; it holds one
or more :class:`Part` runs, each of one expert and one label (BAGEL's ``<|vision_start|>`` marker is
a ``und`` part inside a ``gen`` image segment). Labels name token sets: models put embeddings in by
label (:meth:`Layout.assemble`) and read hidden states and losses out by label.

The mask contract (DESIGN §2) for tokens q, k of one row::

    allowed(q, k) = valid(q) ∧ valid(k) ∧ doc(q) = doc(k)
                  ∧ (k ≤ q ∨ (seg(q) = seg(k) ∧ mode(seg) ∈ {full, noise}))
                  ∧ ¬(mode(seg(k)) = noise ∧ seg(q) ≠ seg(k))

is a pure function of per-token vectors, held in :class:`vla_blocks.attention.MaskMeta`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .attention.meta import FLAG_BIDIR, FLAG_NOISE, FLAG_VALID, MaskMeta

MODES = ("causal", "full", "noise")
ROPE_POLICIES = ("sequential", "sequential_hold", "block", "block_hold")


@dataclass
class Part:
    """A run of ``length`` tokens of one expert and one label inside a segment."""

    expert: str
    length: int
    label: str
    valid: Sequence[bool] | torch.Tensor | bool = True

    def valid_tensor(self) -> torch.Tensor:
        """The per-token validity of this part as a bool tensor ``[length]``."""
        if isinstance(self.valid, bool):
            return torch.full((self.length,), self.valid, dtype=torch.bool)
        v = torch.as_tensor(self.valid, dtype=torch.bool).reshape(-1)
        if v.numel() != self.length:
            raise ValueError(f"part {self.label!r}: valid has {v.numel()} entries for {self.length} tokens")
        return v


@dataclass
class Segment:
    """One attention unit: ``mode`` in {causal, full, noise}, ``rope`` policy, and its parts.

    RoPE policies: ``sequential`` (one id per valid token, counter advances), ``sequential_hold``
    (sequential ids, counter does not advance: parallel suffixes that must all start at the same
    offset, e.g. ACoT's EAR and action chunks trained in one pass), ``block`` (all tokens share the
    counter value, which then advances by 1: BAGEL images), ``block_hold`` (share one id, no
    advance: BAGEL/HALO noisy targets).

    ``frames`` (``block`` / ``block_hold`` only): the segment is a run of frames, each a ``(tokens, delta)``
    pair: a frame's tokens share the counter value, which then advances by ``delta`` (BAGEL's video splits:
    several frames in one ``full`` segment, ``frame_delta`` apart). The token counts must add up to the
    segment's length; without ``frames`` the segment is one frame that advances by 1 (``block``) or 0.
    """

    mode: str
    parts: list[Part]
    rope: str = "sequential"
    frames: Sequence[tuple[int, int]] | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"segment mode {self.mode!r} is not one of {MODES}")
        if self.rope not in ROPE_POLICIES:
            raise ValueError(f"segment rope policy {self.rope!r} is not one of {ROPE_POLICIES}")
        if not self.parts:
            raise ValueError("a segment needs at least one part")
        for p in self.parts:
            if p.length < 0:
                raise ValueError(f"part {p.label!r} has negative length {p.length}")
        if self.frames is not None:
            if self.rope not in ("block", "block_hold"):
                raise ValueError(f"segment frames need rope 'block' or 'block_hold', not {self.rope!r}")
            self.frames = [(int(n), int(d)) for n, d in self.frames]
            if any(n < 0 or d < 0 for n, d in self.frames):
                raise ValueError(f"segment frames must have non-negative token counts and deltas: {self.frames}")
            if sum(n for n, _ in self.frames) != self.length:
                raise ValueError(f"segment frames cover {sum(n for n, _ in self.frames)} tokens, the segment has "
                                 f"{self.length}")

    @classmethod
    def of(cls, mode: str, expert: str, length: int, label: str, rope: str = "sequential",
           valid: Sequence[bool] | torch.Tensor | bool = True) -> "Segment":
        """A segment of one part: ``length`` tokens of ``expert`` labelled ``label``."""
        return cls(mode, [Part(expert, length, label, valid)], rope)

    @property
    def length(self) -> int:
        """Number of tokens in the segment (sum over its parts)."""
        return sum(p.length for p in self.parts)


@dataclass
class RopeSkip:
    """A layout construct with no tokens: advances the sample's RoPE counter by ``n`` (BAGEL's ``pack_sequence``
    does this for a ViT / VAE condition image left out by condition dropout, so later tokens keep their ids).

    Example: ``Layout.from_samples([[RopeSkip(1), Segment.of("causal", "und", 5, "text")]], ["und"])`` gives the
    text ids 1…5."""

    n: int = 1

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"RopeSkip.n must be a non-negative int, got {self.n!r}")

    @property
    def length(self) -> int:
        """Tokens this construct adds to a sample: always 0 (it only advances RoPE)."""
        return 0


Sample = list[Segment | RopeSkip]


@dataclass
class Layout:
    """Per-token tensors of a batch of ``B`` rows × ``N`` tokens (rows padded with invalid tokens).

    Each row holds one or more documents (packing). ``expert_id`` is -1 for padding tokens,
    ``doc_id`` and ``seg_id`` are unique within a row (padding: -1). Flat indices below index the
    row-major ``B*N`` token grid.
    """

    experts: list[str]
    expert_id: torch.Tensor  # [B, N] long
    position_ids: torch.Tensor  # [B, N] long
    doc_id: torch.Tensor  # [B, N] long
    seg_id: torch.Tensor  # [B, N] long
    seg_mode: torch.Tensor  # [B, N] long (index into MODES, -1 for padding)
    valid: torch.Tensor  # [B, N] bool
    label_index: dict[str, torch.Tensor] = field(default_factory=dict)  # label -> flat indices
    doc_offsets: list[list[int]] = field(default_factory=list)  # per row: start token of each document
    rope_next: list[int] = field(default_factory=list)  # per row: RoPE counter after its last document

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_samples(cls, samples: Sequence[Sample] | Sequence[Sequence[Sample]], experts: Sequence[str],
                     pack: bool = False, pad_to: int | None = None, rope_start: int = 0) -> "Layout":
        """Build a layout.

        ``samples`` is a list of samples (each a list of segments). With ``pack=False`` each sample
        is its own row; with ``pack=True`` all samples go into one row as documents. A list of
        lists of samples gives explicit rows of packed documents. ``pad_to`` pads rows to a fixed
        length (an error if a row is longer). ``rope_start``: the RoPE counter the first document of
        each row starts at (a continuation, :meth:`extend`).
        """
        experts = list(experts)
        if not samples:
            raise ValueError("no samples given")
        if isinstance(samples[0], (Segment, RopeSkip)):
            raise TypeError("samples must be a list of samples (lists of Segment), got a list of Segment")
        if isinstance(samples[0][0], (Segment, RopeSkip)):
            rows = [list(samples)] if pack else [[s] for s in samples]
        else:
            rows = [list(r) for r in samples]
        lens = [sum(seg.length for s in r for seg in s) for r in rows]
        n = max(lens)
        if pad_to is not None:
            if pad_to < n:
                raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({n} tokens)")
            n = pad_to
        B = len(rows)
        expert_id = torch.full((B, n), -1, dtype=torch.long)
        pos = torch.zeros((B, n), dtype=torch.long)
        doc = torch.full((B, n), -1, dtype=torch.long)
        seg = torch.full((B, n), -1, dtype=torch.long)
        mode = torch.full((B, n), -1, dtype=torch.long)
        valid = torch.zeros((B, n), dtype=torch.bool)
        labels: dict[str, list[torch.Tensor]] = {}
        offsets: list[list[int]] = []
        rope_next: list[int] = []
        e_index = {e: i for i, e in enumerate(experts)}
        for b, row in enumerate(rows):
            t = 0
            s_global = 0
            offsets.append([])
            for d, sample in enumerate(row):
                offsets[-1].append(t)
                counter = rope_start if d == 0 else 0
                for segment in sample:
                    if isinstance(segment, RopeSkip):
                        counter += segment.n
                        continue
                    a = t
                    mode_i = MODES.index(segment.mode)
                    seg_valid = []
                    for part in segment.parts:
                        if part.expert not in e_index:
                            raise KeyError(f"part {part.label!r} names expert {part.expert!r}; "
                                           f"this layout has experts {experts}")
                        L = part.length
                        v = part.valid_tensor()
                        expert_id[b, t:t + L] = e_index[part.expert]
                        valid[b, t:t + L] = v
                        seg_valid.append(v)
                        idx = b * n + torch.arange(t, t + L)
                        labels.setdefault(part.label, []).append(idx)
                        t += L
                    doc[b, a:t] = d
                    seg[b, a:t] = s_global
                    mode[b, a:t] = mode_i
                    s_global += 1
                    v = torch.cat(seg_valid) if seg_valid else torch.zeros(0, dtype=torch.bool)
                    if segment.rope in ("sequential", "sequential_hold"):
                        p = counter + torch.cumsum(v.long(), 0) - 1
                        p = torch.clamp(p, min=counter)  # invalid leading tokens share the first id
                        pos[b, a:t] = p
                        if segment.rope == "sequential":
                            counter += int(v.sum())
                    elif segment.frames is not None:
                        f = a
                        for nf, delta in segment.frames:
                            pos[b, f:f + nf] = counter
                            f += nf
                            counter += delta
                    else:
                        pos[b, a:t] = counter
                        if segment.rope == "block":
                            counter += 1
            rope_next.append(counter)
        label_index = {k: torch.cat(v) for k, v in labels.items()}
        return cls(experts, expert_id, pos, doc, seg, mode, valid, label_index, offsets, rope_next)

    # ------------------------------------------------------------------ shape
    @property
    def batch_size(self) -> int:
        """Number of rows B."""
        return self.expert_id.shape[0]

    @property
    def seq_len(self) -> int:
        """Tokens per row L (padding included)."""
        return self.expert_id.shape[1]

    def to(self, device) -> "Layout":
        """This layout with every tensor moved to ``device``."""
        mv = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Layout(self.experts, mv(self.expert_id), mv(self.position_ids), mv(self.doc_id), mv(self.seg_id),
                      mv(self.seg_mode), mv(self.valid), {k: mv(v) for k, v in self.label_index.items()},
                      self.doc_offsets, self.rope_next)

    def tokens(self, start: int, end: int | None = None) -> "Layout":
        """The sub-layout of tokens ``[start, end)`` of every row (a suffix pass routes with this).

        Positions, documents and segments keep their values; label indices are re-based to the
        sub-grid and labels with no token inside are dropped.
        """
        end = self.seq_len if end is None else end
        if not 0 <= start <= end <= self.seq_len:
            raise ValueError(f"token range [{start}, {end}) is outside a layout of {self.seq_len} tokens")
        n, m = self.seq_len, end - start
        labels = {}
        for k, idx in self.label_index.items():
            b, i = idx // n, idx % n
            keep = (i >= start) & (i < end)
            if keep.any():
                labels[k] = b[keep] * m + (i[keep] - start)
        sl = (slice(None), slice(start, end))
        return Layout(self.experts, self.expert_id[sl], self.position_ids[sl], self.doc_id[sl], self.seg_id[sl],
                      self.seg_mode[sl], self.valid[sl], labels, self.doc_offsets, self.rope_next)

    def grow(self, n: int, label: str) -> "Layout":
        """``n`` more tokens continuing every row's last segment (greedy decoding into a causal text segment):
        the last token's expert, document and segment, positions after its position, labelled ``label``.

        Equals rebuilding the layout with the last segment ``n`` tokens longer, without walking the
        segments again: a few O(N) tensor copies, so a decoding step's bookkeeping does not grow with the
        Python structure of the context."""
        if n < 1:
            raise ValueError(f"grow needs n >= 1 tokens, got {n}")
        if self.seq_len == 0:
            raise ValueError("cannot grow an empty layout")
        last = (slice(None), slice(self.seq_len - 1, self.seq_len))
        if not bool(self.valid[last].all()) or not bool((self.seg_mode[last] == MODES.index("causal")).all()):
            raise ValueError("grow continues a causal segment: every row must end in a valid causal token")
        B, N = self.batch_size, self.seq_len
        step = torch.arange(1, n + 1, device=self.position_ids.device)
        rep = lambda t: torch.cat([t, t[last].expand(B, n)], dim=1)  # noqa: E731
        pos = torch.cat([self.position_ids, self.position_ids[last] + step], dim=1)
        rows = torch.arange(B, device=self.expert_id.device)[:, None]
        labels = {k: (idx // N) * (N + n) + idx % N for k, idx in self.label_index.items()}
        new = (rows * (N + n) + N + step.to(rows.device) - 1).reshape(-1)
        labels[label] = torch.cat([labels[label], new]) if label in labels else new
        return Layout(self.experts, rep(self.expert_id), pos, rep(self.doc_id), rep(self.seg_id), rep(self.seg_mode),
                      rep(self.valid), labels, self.doc_offsets, [r + n for r in self.rope_next])

    def extend(self, segments: Sequence[Segment | RopeSkip]) -> "Layout":
        """This one-row layout with ``segments`` appended to its last document (a KV-cached context growing by
        items): equals rebuilding the layout from all the segments, while only the new ones are walked.

        Needs the RoPE counter the layout ended at (``rope_next``, recorded by :meth:`from_samples`)."""
        if self.batch_size != 1 or not self.rope_next:
            raise ValueError("extend needs a one-row layout built by from_samples (it records where RoPE ends)")
        N = self.seq_len
        new = Layout.from_samples([list(segments)], self.experts, rope_start=self.rope_next[0]).to(
            self.expert_id.device)
        doc = int(self.doc_id[0, -1]) if N else 0
        seg0 = int(self.seg_id.max()) + 1 if N else 0
        cat = lambda a, b: torch.cat([a, b], dim=1)  # noqa: E731
        labels = dict(self.label_index)
        for k, idx in new.label_index.items():
            labels[k] = torch.cat([labels[k], idx + N]) if k in labels else idx + N
        valid_new = new.expert_id >= 0
        return Layout(self.experts, cat(self.expert_id, new.expert_id), cat(self.position_ids, new.position_ids),
                      cat(self.doc_id, torch.where(valid_new, doc, new.doc_id)),
                      cat(self.seg_id, torch.where(valid_new, new.seg_id + seg0, new.seg_id)),
                      cat(self.seg_mode, new.seg_mode), cat(self.valid, new.valid), labels, self.doc_offsets,
                      new.rope_next)

    # ------------------------------------------------------------------ routing
    def expert_index(self, expert: str | int) -> torch.Tensor:
        """Flat indices (ascending) of the tokens routed to ``expert``."""
        e = self.experts.index(expert) if isinstance(expert, str) else expert
        return torch.nonzero(self.expert_id.reshape(-1) == e).squeeze(-1)

    def expert_indices(self) -> dict[str, torch.Tensor]:
        """Flat indices per expert with at least one token in this layout (the active experts)."""
        out = {}
        flat = self.expert_id.reshape(-1)
        for i, e in enumerate(self.experts):
            idx = torch.nonzero(flat == i).squeeze(-1)
            if idx.numel():
                out[e] = idx
        return out

    def index(self, label: str) -> torch.Tensor:
        """Flat indices (into the B·L tokens) of the tokens labelled ``label``; ``KeyError`` listing the labels
        otherwise."""
        try:
            return self.label_index[label]
        except KeyError:
            raise KeyError(f"label {label!r} is not in this layout; labels: {sorted(self.label_index)}") from None

    def assemble(self, embeds: dict[str, torch.Tensor], widths: dict[str, int] | None = None,
                 partial: bool = False) -> dict[str, torch.Tensor]:
        """Route per-label embeddings ``{label: [n_label, D_e]}`` into per-expert hidden tensors.

        Returns ``{expert: [n_e, D_e]}`` ordered like :meth:`expert_indices`. Every token of an
        active expert must be covered by exactly one label given here; with ``partial=True`` only the
        experts the labels touch are returned (and must be covered): per-expert side inputs such as the
        adaRMS condition of one expert.
        """
        flat_e = self.expert_id.reshape(-1)
        idx_e = self.expert_indices()
        # position of each flat token inside its expert's tensor
        slot = torch.full_like(flat_e, -1)
        for e, idx in idx_e.items():
            slot[idx] = torch.arange(idx.numel(), device=idx.device)
        out: dict[str, torch.Tensor] = {}
        covered = {e: 0 for e in idx_e}
        parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {e: [] for e in idx_e}
        for label, x in embeds.items():
            idx = self.index(label)
            if x.shape[0] != idx.numel():
                raise ValueError(f"label {label!r}: got {x.shape[0]} embeddings for {idx.numel()} tokens")
            if idx.numel() == 0:
                continue
            es = flat_e[idx].unique()
            if es.numel() != 1:
                raise ValueError(f"label {label!r} spans several experts; give one label per expert")
            e = self.experts[int(es)]
            parts[e].append((slot[idx], x))
            covered[e] += idx.numel()
        for e, idx in idx_e.items():
            if partial and not parts[e]:
                continue
            if covered[e] != idx.numel():
                raise ValueError(f"expert {e!r} has {idx.numel()} tokens but the embeddings cover {covered[e]}")
            first = parts[e][0][1]
            buf = first.new_zeros((idx.numel(),) + tuple(first.shape[1:]))
            for s, x in parts[e]:
                buf = buf.index_copy(0, s, x.to(buf.dtype))
            out[e] = buf
        return out

    def extract(self, hidden: dict[str, torch.Tensor], label: str) -> torch.Tensor:
        """Hidden states ``[n_label, D_e]`` of the tokens with ``label`` from per-expert tensors."""
        idx = self.index(label)
        flat_e = self.expert_id.reshape(-1)
        es = flat_e[idx].unique()
        if es.numel() != 1:
            raise ValueError(f"label {label!r} spans {es.numel()} experts")
        e = self.experts[int(es)]
        e_idx = self.expert_index(e)
        slot = torch.searchsorted(e_idx, idx)
        return hidden[e][slot]

    # ------------------------------------------------------------------ mask
    def flags(self) -> torch.Tensor:
        """Per-token mask flags ``[B, L]`` int32 for the attention kernels: ``FLAG_VALID`` | ``FLAG_BIDIR`` (full or
        noise segment) | ``FLAG_NOISE``."""
        f = self.valid.int() * FLAG_VALID
        f = f + ((self.seg_mode == 1) | (self.seg_mode == 2)).int() * FLAG_BIDIR
        f = f + (self.seg_mode == 2).int() * FLAG_NOISE
        return f.to(torch.int32)

    def mask_meta(self, q_slice: slice | None = None, k_slice: slice | None = None) -> MaskMeta:
        """Mask metadata for queries ``q_slice`` against keys ``k_slice`` of this layout.

        A prefix pass is ``(slice(0, P), slice(0, P))``; a suffix pass reading a cached prefix is
        ``(slice(P, N), slice(0, N))``.
        """
        q_slice = q_slice or slice(0, self.seq_len)
        k_slice = k_slice or slice(0, self.seq_len)
        n = self.seq_len
        idx = torch.arange(n, device=self.expert_id.device, dtype=torch.int32).expand(self.batch_size, n)
        f = self.flags()
        doc = self.doc_id.to(torch.int32)
        seg = self.seg_id.to(torch.int32)
        return MaskMeta(q_idx=idx[:, q_slice], q_doc=doc[:, q_slice], q_seg=seg[:, q_slice], q_flags=f[:, q_slice],
                        k_idx=idx[:, k_slice], k_doc=doc[:, k_slice], k_seg=seg[:, k_slice], k_flags=f[:, k_slice])

    def dense_mask(self) -> torch.Tensor:
        """The oracle boolean mask ``[B, N, N]`` (True = may attend)."""
        return self.mask_meta().dense()
