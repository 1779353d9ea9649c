"""Stage-B results: an episode's plan and its subtasks aligned to frame ranges, with parsing and validation.

An :class:`EpisodeAnnotation` is what either annotator (``openai`` or ``rules``) returns and what the cache and
the sidecar store: the task, the plan (an ordered list of subtask strings), and contiguous inclusive frame
spans, each naming one plan entry, with the first-person reasoning (HALO's call 2) and an optional scene
description (call 3).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

__all__ = ["SubtaskSpan", "EpisodeAnnotation", "AnnotationError", "ReplyError", "parse_json_reply",
           "match_subtask", "validate_spans", "limit_words"]


class AnnotationError(ValueError):
    """An episode could not be annotated; the message says why (it is listed in the run summary)."""


class ReplyError(AnnotationError):
    """A model reply is not the JSON that was asked for, or fails validation."""


@dataclass
class SubtaskSpan:
    """One subtask of an episode: its plan entry, frames ``start``..``end`` (inclusive) and the model's first-person
    reasoning (optional)."""
    subtask: str
    start: int
    end: int  # inclusive
    reasoning: str = ""


@dataclass
class EpisodeAnnotation:
    """The EM-CoT annotation of one episode: the plan (ordered subtasks), the spans covering every frame, an optional
    scene description and the annotator that made it."""
    episode_index: int
    task: str
    num_frames: int
    fps: float
    plan: list[str]
    spans: list[SubtaskSpan]
    scene: str | None = None
    annotator: str = ""
    model: str | None = None
    prompt_version: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.spans = [s if isinstance(s, SubtaskSpan) else SubtaskSpan(**s) for s in self.spans]

    def to_dict(self) -> dict:
        """Plain data (JSON-ready) of this annotation."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EpisodeAnnotation":
        """The inverse of :meth:`to_dict`."""
        return cls(**d)

    def validate(self):
        """Raise :class:`AnnotationError` listing every problem of the spans (see :func:`validate_spans`)."""
        problems = validate_spans(self.spans, self.num_frames, self.plan)
        if problems:
            raise AnnotationError(f"episode {self.episode_index}: " + "; ".join(problems))


def parse_json_reply(text: str, expect: type) -> Any:
    """Strict JSON: the whole reply (optionally inside one ```json fence) must parse and be of type ``expect``."""
    s = text.strip()
    m = re.fullmatch(r"```[A-Za-z]*\s*\n?(.*?)\n?\s*```", s, flags=re.S)
    if m:
        s = m.group(1).strip()
    try:
        value = json.loads(s)
    except json.JSONDecodeError as e:
        raise ReplyError(f"reply is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(value, expect):
        raise ReplyError(f"reply is JSON {type(value).__name__}, expected a {expect.__name__}")
    return value


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", s.lower()).split())


def match_subtask(name: str, plan: Sequence[str], cutoff: float = 0.6) -> int | None:
    """Index of the plan entry ``name`` refers to: exact, then case/punctuation-insensitive, then containment
    (either way; the longest such entry wins), then the closest by ``difflib`` ratio ≥ ``cutoff``; None if none."""
    if name in plan:
        return list(plan).index(name)
    n = _norm(name)
    normed = [_norm(p) for p in plan]
    if n in normed:
        return normed.index(n)
    if n:
        inside = [i for i, p in enumerate(normed) if p and (p in n or n in p)]
        if inside:
            return max(inside, key=lambda i: len(normed[i]))
    ratios = [difflib.SequenceMatcher(None, n, p).ratio() for p in normed]
    if ratios and max(ratios) >= cutoff:
        return max(range(len(ratios)), key=ratios.__getitem__)
    return None


def validate_spans(spans: Sequence[SubtaskSpan], num_frames: int, plan: Sequence[str]) -> list[str]:
    """Problems with a span list (empty list = valid): every span names a plan entry, spans are ordered by start,
    cover frames 0..num_frames-1 without gap or overlap, lie inside the episode, and follow the plan's order."""
    problems: list[str] = []
    if not spans:
        return ["no subtask spans"]
    for i, s in enumerate(spans):
        if s.subtask not in plan:
            problems.append(f"span {i} names {s.subtask!r}, which is not in the plan")
        if s.start > s.end:
            problems.append(f"span {i} ({s.subtask!r}) has start {s.start} > end {s.end}")
        if s.start < 0 or s.end > num_frames - 1:
            problems.append(f"span {i} ({s.subtask!r}) frames [{s.start}, {s.end}] outside the episode "
                            f"[0, {num_frames - 1}]")
    if spans[0].start != 0:
        problems.append(f"the first span starts at frame {spans[0].start}, not 0")
    if spans[-1].end != num_frames - 1:
        problems.append(f"the last span ends at frame {spans[-1].end}, not {num_frames - 1}")
    for i in range(1, len(spans)):
        a, b = spans[i - 1], spans[i]
        if b.start != a.end + 1:
            kind = "overlaps" if b.start <= a.end else "leaves a gap after"
            problems.append(f"span {i} ({b.subtask!r}, starts {b.start}) {kind} span {i - 1} (ends {a.end})")
    order = [list(plan).index(s.subtask) for s in spans if s.subtask in plan]
    if any(j < i for i, j in zip(order, order[1:])):
        problems.append("spans go back in the plan's order")
    return problems


def limit_words(text: str, n: int) -> str:
    """``text`` cut to its first ``n`` words (HALO's reasoning limit is 50)."""
    words = text.split()
    return text.strip() if len(words) <= n else " ".join(words[:n])
