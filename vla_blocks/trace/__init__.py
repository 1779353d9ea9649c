"""Interpretable traces: what a policy reasoned, imagined and planned, saved as plain data and viewed offline.

- :class:`Trace` — one policy call of one sample (``to_dict`` / ``save`` / ``load``);
- :func:`recording` — a context manager recording pi0 / pi0.5 / ACoT calls through forward hooks (none
  attached outside it); :func:`from_halo` — HALO's ``infer`` result as a :class:`Trace`;
- :class:`EpisodeTrace`, :class:`StepRecord`, :class:`TraceRecorder` — rollouts (frames, actions, success);
- :func:`vla_blocks.trace.view.render_html` — the self-contained HTML viewer (``vla-blocks trace view``).
"""

from .capture import Recording, from_halo, recording, trace_inference
from .record import EpisodeTrace, StepRecord, Trace, TraceRecorder, load

__all__ = ["Trace", "EpisodeTrace", "StepRecord", "TraceRecorder", "load", "recording", "Recording", "from_halo",
           "trace_inference"]
