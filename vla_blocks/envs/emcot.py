"""EM-CoT annotations of Meta-World demonstrations for HALO (``halo-emcot-mw``).

The ``rules`` annotator of :mod:`vla_blocks.emcot` splits each scripted episode into phases at the gripper's
grasp / release events and names them from :data:`METAWORLD_PHASES` (one template per task instruction); the
subgoal of a frame is the last frame of its subtask. :data:`METAWORLD_STATE_LAYOUT` tells stage A where the hand
and the gripper sit in the demos' state (hand xyz, gripper opening in [0, 1] with 1 = open, goal xyz). A template
with more subtasks than an episode has gripper phases keeps as many as the episode shows (the last one runs to
the end)::

    from vla_blocks.envs.emcot import annotate_metaworld
    annotate_metaworld("runs/metaworld/demos")   # -> runs/metaworld/demos/meta/emcot

The same with the CLI: ``vla-blocks annotate DEMOS --annotator rules --templates phases.json --state-layout
layout.json`` with the two mappings below written to files.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["METAWORLD_PHASES", "METAWORLD_STATE_LAYOUT", "annotate_metaworld", "phase_templates"]

#: Subtasks per Meta-World task name (the instruction of each is :func:`vla_blocks.envs.metaworld.task_instruction`).
METAWORLD_PHASES: dict[str, list[str]] = {
    "reach-v3": ["move to the target"],
    "push-v3": ["reach the puck", "push the puck to the goal"],
    "pick-place-v3": ["grasp the object", "lift it", "place it at the goal"],
    "drawer-open-v3": ["reach the handle", "pull the drawer open"],
    "button-press-topdown-v3": ["move above the button", "press the button down"],
}

#: The demos' ``observation.state``: hand xyz (0-2), gripper opening (3; 1 open, 0 closed), goal xyz (4-6). One
#: arm, named ``right`` (HALO's thought has a left and a right slot).
METAWORLD_STATE_LAYOUT: dict = {"key": "observation.state",
                                "right": {"xyz": [0, 1, 2], "gripper": 3, "gripper_closed": 0.0, "gripper_open": 1.0}}


def phase_templates(tasks=None) -> dict[str, list[str]]:
    """The rules templates keyed by task instruction (all tasks of :data:`METAWORLD_PHASES` by default)."""
    from .metaworld import task_instruction
    return {task_instruction(t): list(METAWORLD_PHASES[t]) for t in (tasks or METAWORLD_PHASES)}


def _merging_rules(templates):
    from ..emcot.annotators import RulesAnnotator

    class MergingRules(RulesAnnotator):
        """:class:`~vla_blocks.emcot.annotators.RulesAnnotator` that, when an episode shows fewer gripper phases
        than its template has subtasks (e.g. a scripted drawer opening that never closes the gripper), names the
        last phase after the remaining subtasks joined with "and" instead of failing the episode."""

        def identity(self) -> dict:
            return {**super().identity(), "surplus": "merge_into_last"}

        def annotate(self, ep):
            plan = self.template_for(ep.task)
            if plan is not None and ep.primitives is not None:
                n = len(self.boundaries(ep.primitives)) + 1
                if len(plan) > n:
                    plan = plan[:n - 1] + [" and ".join(plan[n - 1:])]
                return RulesAnnotator({ep.task: plan}, self.split_on).annotate(ep)
            return super().annotate(ep)

    return MergingRules(templates)


def annotate_metaworld(root: str | os.PathLike, tasks=None, plan_mode: str = "remaining",
                       concurrency: int = 2) -> dict:
    """Annotate a Meta-World demos dataset (``vla-blocks demos metaworld``) for HALO's EM-CoT training: stage-A
    primitives from :data:`METAWORLD_STATE_LAYOUT`, subtasks from :data:`METAWORLD_PHASES` cut at gripper events,
    subgoal = the last frame of the current subtask. Writes ``ROOT/meta/emcot`` and returns the run summary;
    ``RuntimeError`` naming the episodes when any failed."""
    from ..data import LeRobotDataset
    from ..emcot.annotators import AnnotationCache, annotate_episodes
    from ..emcot.cli import load_episodes
    from ..emcot.primitives import PrimitiveConfig, StateLayout
    from ..emcot.samples import SIDECAR_DIR, frame_samples, write_sidecar
    layout = StateLayout.from_mapping(METAWORLD_STATE_LAYOUT)
    cfg = PrimitiveConfig()
    annotator = _merging_rules(phase_templates(tasks))
    ds = LeRobotDataset(root, decode_video=False)
    episodes, moving, starts = [], {}, {}
    for ep, mv, start in load_episodes(ds, layout, layout.key, None, None):
        episodes.append(ep.with_primitives(layout, cfg))
        moving[ep.episode_index], starts[ep.episode_index] = mv, start
    cache = AnnotationCache(Path(ds.root) / SIDECAR_DIR / "cache")
    result = annotate_episodes(episodes, annotator, cache, concurrency=concurrency, num_episodes=len(episodes))
    by_index = {ep.episode_index: ep for ep in episodes}
    frames, kept = [], []
    for idx in sorted(result.annotations):
        ann = result.annotations[idx]
        frames += frame_samples(ann, by_index[idx].primitives, moving[idx], plan_mode, starts[idx])
        kept.append(ann)
    summary = result.summary()
    summary["frames"] = len(frames)
    summary["training_frames"] = sum(f.train for f in frames)
    if summary["failed"]:
        raise RuntimeError(f"{root}: EM-CoT annotation failed for episodes {summary['failures']}")
    info = {"annotator": annotator.identity(), "primitive_config": cfg.to_dict(), "state_layout": layout.to_dict(),
            "plan_mode": plan_mode, "moving_key": layout.key, "camera": None, "summary": summary,
            "failures": summary["failures"]}
    write_sidecar(ds.root, kept, frames, info)
    return summary
