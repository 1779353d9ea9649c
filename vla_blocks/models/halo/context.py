"""HALO's inference contexts: KV-cached prefixes of segments (BAGEL's gen / cfg-text / cfg-image contexts)
that grow while decoding, and the trace of one inference call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from ...layout import Layout, Segment
from ...mot import PrefixCache

if TYPE_CHECKING:
    from .modeling import HaloModel

# ---------------------------------------------------------------------------------------------- inference contexts
@dataclass
class ContextItem:
    """A segment held in a :class:`HaloContext` with the embeddings it was run with (by label)."""

    kind: str
    source: str
    segment: Segment
    embeds: dict[str, torch.Tensor]
    ids: list[int] = field(default_factory=list)
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # per-label adaRMS condition (action tokens)


def _segment_key(seg: Segment) -> tuple:
    """A hashable description of a segment's structure (mode, RoPE policy, parts with validity)."""
    return (seg.mode, seg.rope, tuple((p.expert, p.length, p.label,
                                       p.valid if isinstance(p.valid, bool) else tuple(p.valid_tensor().tolist()))
                                      for p in seg.parts))


class HaloContext:
    """A KV-cached prefix of segments (batch 1): the unit of BAGEL's ``gen_context`` /
    ``cfg_text_context`` / ``cfg_img_context``. Each context owns its cache; :meth:`clone` copies it.

    :meth:`extend` runs new segments over the cache and appends their K/V; :meth:`grow_text` appends one
    token to the last (causal text) segment; :meth:`suffix` runs a segment (noisy latent or action)
    without touching the cache.
    """

    def __init__(self, model: "HaloModel", name: str = "context"):
        self.model = model
        self.name = name
        self.items: list[ContextItem] = []
        self.cache: PrefixCache | None = None
        self._layout: Layout | None = None  # the layout of the cached tokens (grown in place while decoding)
        self._suffix_plan: tuple | None = None  # (key, PassPlan) of the last suffix structure

    @property
    def segments(self) -> list[Segment]:
        """The segments held, in order."""
        return [it.segment for it in self.items]

    @property
    def length(self) -> int:
        """Number of cached tokens."""
        return 0 if self.cache is None else self.cache.length

    def sources(self) -> list[str]:
        """``source:kind`` of each held segment (what the context contains, for traces)."""
        return [f"{it.source}:{it.kind}" for it in self.items]

    def layout(self, extra: Sequence[Segment] = ()) -> Layout:
        """The batch-1 layout of the held segments followed by ``extra``."""
        return Layout.from_samples([self.segments + list(extra)], self.model.experts)

    def _layout_with(self, segments: list[Segment]) -> Layout:
        """The context's layout followed by ``segments`` (only the new segments are walked)."""
        if self._layout is None:
            return Layout.from_samples([list(segments)], self.model.experts)
        return self._layout.extend(segments)

    def _run(self, layout: Layout, items: Sequence[ContextItem]):
        """Run ``items`` (the tokens of ``layout`` after the cached ones) and append their K/V to the cache."""
        P = self.length
        plan = self.model.lm.stack.plan(layout, start=P)
        embeds: dict[str, list[torch.Tensor]] = {}
        for it in items:
            for k, v in it.embeds.items():
                embeds.setdefault(k, []).append(v)
        hidden = plan.sub.assemble({k: torch.cat(v) for k, v in embeds.items()})
        out = self.model.lm.stack(hidden, plan=plan, cache=self.cache if P else None, return_kv=True)
        if self.cache is None:
            self.cache = out.cache(layout)
        else:
            self.cache.append(out.keys, out.values, layout)
        self._layout = layout
        return out, plan.sub

    def extend(self, items: Sequence[ContextItem]):
        """Append ``items`` (their K/V go into the cache). Returns (MoTOutput of the new tokens, their layout)."""
        out = self._run(self._layout_with([it.segment for it in items]), items)
        self.items.extend(items)
        return out

    def grow_text(self, token_id: int):
        """Append one token to the last segment (causal text), as the decoding step of greedy generation.

        The context's layout grows by one token (:meth:`Layout.grow`) and the K/V go into the cache's
        preallocated buffers: a step's bookkeeping and copies do not grow with the context."""
        last = self.items[-1]
        if last.kind != "text":
            raise ValueError("grow_text needs a text segment at the end of the context")
        m = self.model
        seg = Segment.of("causal", m.roles["text"], last.segment.length + 1, "text")
        new_tok = ContextItem("text", last.source, seg, {"text": m.embed_text([token_id])}, [token_id])
        out = self._run(self._layout.grow(1, "text"), [new_tok])
        self.items[-1] = ContextItem("text", last.source, seg, {"text": torch.cat([last.embeds["text"],
                                                                                   new_tok.embeds["text"]])},
                                     last.ids + [token_id])
        return out

    def suffix(self, item: ContextItem):
        """Run ``item`` after the cached prefix without writing to the cache (flow-matching steps).

        The layout, routing sub-layout and mask metadata are built once per (prefix length, suffix
        structure) and reused by every step of a flow loop."""
        key = (self.length, _segment_key(item.segment))
        if self._suffix_plan is None or self._suffix_plan[0] != key:
            self._suffix_plan = (key, self.model.lm.stack.plan(self._layout_with([item.segment]), start=self.length))
        plan = self._suffix_plan[1]
        hidden = plan.sub.assemble(item.embeds)
        cond = plan.sub.assemble(item.cond, partial=True) if item.cond else None
        out = self.model.lm.stack(hidden, plan=plan, cache=self.cache if plan.start else None, cond=cond)
        return out, plan.sub

    def clone(self, name: str) -> "HaloContext":
        """A copy named ``name`` with its own copy of the cache (extending it leaves this context unchanged)."""
        c = HaloContext(self.model, name)
        c.items = list(self.items)
        c.cache = None if self.cache is None else self.cache.clone()
        c._layout = self._layout
        return c


@dataclass
class HaloTrace:
    """What one inference call did: reasoning text, subgoal (latent and decoded image in [0, 1]),
    actions [L, A], per-stage wall-clock seconds, and the contexts it used."""

    mode: str
    actions: torch.Tensor
    timings: dict[str, float]
    reasoning: str | None = None
    reasoning_ids: list[int] | None = None
    subgoal_latent: torch.Tensor | None = None
    subgoal_image: torch.Tensor | None = None
    contexts: dict[str, HaloContext] = field(default_factory=dict)

    def summary(self) -> dict:
        """Printable summary: mode, reasoning, subgoal image, actions, timings (s) and each context's length and
        contents."""
        out = {"mode": self.mode}
        if self.mode == "emcot":
            out["reasoning"] = repr(self.reasoning)
            out["subgoal_image"] = self.subgoal_image
        out["actions"] = self.actions
        out["timings"] = {k: round(v, 4) for k, v in self.timings.items()}
        out["contexts"] = {k: f"{c.length} tokens: {' '.join(c.sources())}" for k, c in self.contexts.items()}
        return out
