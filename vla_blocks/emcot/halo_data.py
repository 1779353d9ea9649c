"""EM-CoT training samples for HALO from a LeRobotDataset and its ``meta/emcot`` sidecar.

:class:`EmcotHaloDataset` is a torch ``Dataset`` of :class:`vla_blocks.models.halo.HaloSample` over the sidecar's
training frames (HALO samples the step uniformly from ``first_moving_frame − 1`` on): the last ``history``
frames of ``camera`` (repeating the episode's first frame before it starts, as HALO pads), the task as the
instruction, the action chunk (the last action repeated past the episode's end), the thought text and the
subgoal frame image::

    data = EmcotHaloDataset("path/to/dataset", camera="observation.images.top", history=2, chunk_size=16)
    batch = model.collate([data[0], data[1]])
"""

from __future__ import annotations

import os

import torch

from .samples import EmcotAnnotations

__all__ = ["EmcotHaloDataset"]


class EmcotHaloDataset(torch.utils.data.Dataset):
    """HALO EM-CoT training samples (:class:`~vla_blocks.models.halo.HaloSample`) of a dataset with a ``meta/emcot``
    sidecar.

    ``camera``: the camera key (its last ``history`` frames form the history); ``chunk_size``: actions per sample from
    ``action_key``; ``train_only``: only the sidecar's training frames; ``with_thought`` / ``with_goal``: include the
    thought text / the subgoal frame image."""

    def __init__(self, root: str | os.PathLike, camera: str, history: int = 3, chunk_size: int = 16,
                 action_key: str = "action", train_only: bool = True, with_thought: bool = True,
                 with_goal: bool = True):
        from ..data import LeRobotDataset
        self.annotations = EmcotAnnotations(root)
        base = LeRobotDataset(root)
        if camera not in base.meta.camera_keys:
            raise KeyError(f"camera {camera!r} is not a camera of {base.root} ({base.meta.camera_keys})")
        if action_key not in base.features:
            raise KeyError(f"action key {action_key!r} is not a feature of {base.root} ({list(base.features)})")
        fps = base.fps
        self.frames = LeRobotDataset(root, delta_timestamps={camera: [(k - history + 1) / fps for k in range(history)],
                                                             action_key: [k / fps for k in range(chunk_size)]})
        self.goals = base  # every episode, no deltas: item index == global frame index
        self.camera, self.action_key = camera, action_key
        self.with_thought, self.with_goal = with_thought, with_goal
        eps = base.meta.episodes
        start = {int(e): int(a) for e, a in zip(eps["episode_index"], eps["dataset_from_index"])}
        keys = self.annotations.training_frames() if train_only else sorted(self.annotations._rows)
        self.items = [(e, f, start[e] + f) for e, f in keys]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from ..models.halo import HaloSample
        ep, fr, g = self.items[i]
        item = self.frames[g]
        if (int(item["episode_index"]), int(item["frame_index"])) != (ep, fr):
            raise RuntimeError(f"{self.frames.root}: global index {g} is episode {int(item['episode_index'])} frame "
                               f"{int(item['frame_index'])}, the sidecar says episode {ep} frame {fr}")
        f = self.annotations.frame(ep, fr)
        goal = None
        if self.with_goal:
            goal_item = self.goals[f.subgoal_index]
            if (int(goal_item["episode_index"]), int(goal_item["frame_index"])) != (ep, f.subgoal_frame_index):
                raise RuntimeError(f"{self.goals.root}: subgoal index {f.subgoal_index} is not episode {ep} frame "
                                   f"{f.subgoal_frame_index}")
            goal = goal_item[self.camera]
        return HaloSample(history=list(item[self.camera]), instruction=item["task"],
                          actions=item[self.action_key].float(), thought=f.thought if self.with_thought else None,
                          goal=goal)
