"""EM-CoT pipeline, stages A and C and the rules annotator: synthetic trajectories with known segments, HALO's
rules as a hand-written loop oracle (tests/oracles/halo_emcot.py), hand-computed subgoal indices."""

from __future__ import annotations

import numpy as np
import pytest

from oracles.halo_emcot import HALO_SENTENCES_LEFT, halo_primitive_labels, halo_subgoal
from vla_blocks.emcot import (AnnotationCache, EmcotAnnotations, EpisodeAnnotation, EpisodeInput, PrimitiveConfig,
                              RulesAnnotator, StateLayout, SubtaskSpan, annotate_episodes, current_subtasks,
                              extract_primitives, first_moving_frame, frame_samples, label_arm, primitive_sentence,
                              subgoal_frames, write_sidecar)
from vla_blocks.emcot.annotation import AnnotationError, match_subtask, validate_spans
from vla_blocks.models.halo import format_thought


def build_arm(increments: dict[tuple[int, int], tuple[float, float, float]], gripper: dict[tuple[int, int], float],
              n: int, g0: float = 1.0):
    """xyz / gripper from per-frame deltas: frames s..e (inclusive) get delta d (frame t's delta = x_t - x_{t-1})."""
    dx = np.zeros((n, 3))
    dg = np.zeros(n)
    for (s, e), d in increments.items():
        dx[s:e + 1] = d
    for (s, e), d in gripper.items():
        dg[s:e + 1] = d
    dx[0] = 0
    dg[0] = 0
    return np.array([0.1, -0.2, 0.3]) + np.cumsum(dx, 0), g0 + np.cumsum(dg)


# one arm: idle 0-4, right 5-14 (with a 2-frame pause at 10-11), grasp 15-17, up 18-27, idle 28-31,
# release 32-35, idle 36-39
N = 40
XYZ, G = build_arm({(5, 9): (0.02, 0, 0), (12, 14): (0.02, 0, 0), (18, 27): (0, 0.001, 0.02)},
                   {(15, 17): -1 / 3, (32, 35): 0.25}, N)
EXPECTED = ([("idle", "")] * 5 + [("move", "right")] * 10 + [("grasp", "")] * 3 + [("move", "up")] * 10
            + [("idle", "")] * 4 + [("release", "")] * 4 + [("idle", "")] * 4)


def test_known_segments_one_arm():
    labels = label_arm(XYZ, G)
    assert labels == EXPECTED
    assert labels == halo_primitive_labels(XYZ.tolist(), G.tolist())


def test_thresholds_are_strict_and_short_idle_runs_stay_inside_segments():
    v = 0.01
    # 3 frames just below the speed threshold split the trajectory; just above, they are motion
    for speed, split in ((v * 0.999, True), (v * 1.001, False)):
        xyz, g = build_arm({(1, 6): (0.05, 0, 0), (7, 9): (speed, 0, 0), (10, 15): (0, 0, -0.05)}, {}, 16)
        labels = label_arm(xyz, g)
        assert labels == halo_primitive_labels(xyz.tolist(), g.tolist())
        if split:
            assert labels[7:10] == [("idle", "")] * 3
            assert labels[1] == ("move", "right") and labels[12] == ("move", "down")
        else:  # one move run 1..15 whose net displacement is right+down
            assert set(labels[1:]) == {("move", "right_down")}
    # gripper delta exactly at the threshold triggers grasp (≤ −0.01); just inside does not
    for dgv, lab in ((-0.01, "grasp"), (-0.0099, "move")):
        xyz, g = build_arm({(1, 8): (0.03, 0, 0)}, {(4, 4): dgv}, 9)
        assert label_arm(xyz, g)[4][0] == lab
        assert label_arm(xyz, g) == halo_primitive_labels(xyz.tolist(), g.tolist())
    # a one-frame move run between two grasp frames has no net displacement: no direction (HALO quirk)
    xyz, g = build_arm({(1, 5): (0.03, 0, 0)}, {(2, 2): -0.3, (4, 4): -0.3}, 6)
    assert label_arm(xyz, g)[3] == ("move", "") == halo_primitive_labels(xyz.tolist(), g.tolist())[3]
    assert extract_primitives(np.c_[xyz, g], StateLayout.from_mapping(
        {"left": {"xyz": [0, 1, 2], "gripper": 3}})).sentences["left"][3] == "Unknown action."
    # min_idle_frames is configurable: with 2, the 2-frame pause at 10-11 of the main trajectory splits it
    labels = label_arm(XYZ, G, PrimitiveConfig(min_idle_frames=2))
    assert labels[10:12] == [("idle", "")] * 2


def test_random_noisy_trajectories_match_the_oracle():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(5, 60))
        # speeds scattered around the threshold, gripper deltas around theirs, some frames frozen
        steps = rng.normal(size=(n, 3))
        steps *= (rng.choice([0.0, 0.009, 0.0101, 0.03], size=n) / np.linalg.norm(steps, axis=1))[:, None]
        dg = rng.choice([0.0, 0.0, 0.005, -0.02, 0.02, 0.0101, -0.0101], size=n)
        xyz = np.cumsum(steps, 0)
        g = np.clip(0.5 + np.cumsum(dg), -1, 2)
        cfg = PrimitiveConfig(direction_ratio_threshold=float(rng.choice([0.1, 0.2, 0.5])),
                              min_idle_frames=int(rng.integers(1, 5)))
        ours = label_arm(xyz, g, cfg)
        ref = halo_primitive_labels(xyz.tolist(), g.tolist(), cfg.velocity_threshold, cfg.delta_gripper_threshold,
                                    cfg.direction_eps, cfg.direction_ratio_threshold, cfg.min_idle_frames)
        assert ours == ref, trial


def test_sentences_match_halo_table():
    for (action, direction), text in HALO_SENTENCES_LEFT.items():
        assert primitive_sentence("left", action, direction) == text
    assert primitive_sentence("right", "move", "left_forward") == "Move the right gripper to the front-left."
    assert primitive_sentence("left", "move", "") == "Unknown action."  # HALO: no table entry
    with pytest.raises(ValueError, match="unknown primitive action"):
        primitive_sentence("left", "wiggle")


def two_arm_states():
    """14-D state: left xyz at 0-2, left gripper at 6 (0..1); right xyz at 7-9, right gripper at 13 in metres
    (0 closed, 0.04 open)."""
    rx, rg = build_arm({(3, 12): (0, -0.02, 0), (20, 30): (-0.015, 0, -0.015)}, {(14, 16): -0.04 / 3}, N, g0=1.0)
    rg = rg * 0.04
    s = np.zeros((N, 14))
    s[:, 0:3], s[:, 6] = XYZ, G
    s[:, 7:10], s[:, 13] = rx, rg
    s[:, 3:6] = np.random.default_rng(1).normal(size=(N, 3))  # orientation noise: not read
    return s


LAYOUT = StateLayout.from_mapping({"left": {"xyz": [0, 1, 2], "gripper": 6},
                                   "right": {"xyz": [7, 8, 9], "gripper": 13, "gripper_open": 0.04}})


def test_two_arms_and_state_layout():
    s = two_arm_states()
    p = extract_primitives(s, LAYOUT)
    assert p.labels["left"] == EXPECTED
    right = p.labels["right"]
    assert right[:3] == [("idle", "")] * 3 and set(right[3:13]) == {("move", "backward")}
    assert right[14:17] == [("grasp", "")] * 3 and set(right[20:31]) == {("move", "left_down")}
    assert right[31:] == [("idle", "")] * 9
    assert p.movement(14) == ("Move the left gripper to the right.", "Close the right gripper.")
    segs = [(x.start, x.end, x.action) for x in p.segments["left"]]
    assert segs == [(0, 4, "idle"), (5, 14, "move"), (15, 17, "grasp"), (18, 27, "move"), (28, 31, "idle"),
                    (32, 35, "release"), (36, 39, "idle")]
    # single arm: the other side of the thought says "No action."
    one = extract_primitives(s, StateLayout.from_mapping({"right": {"xyz": [7, 8, 9], "gripper": 13,
                                                                    "gripper_open": 0.04}}))
    assert one.movement(16) == ("No action.", "Close the right gripper.")
    with pytest.raises(ValueError, match="arm 'left' indexes \\[20\\]"):
        extract_primitives(s, StateLayout.from_mapping({"left": {"xyz": [0, 1, 2], "gripper": 20}}))
    with pytest.raises(ValueError, match="unknown \\['grip'\\]"):
        StateLayout.from_mapping({"left": {"xyz": [0, 1, 2], "gripper": 6, "grip": 1}})


# ---------------------------------------------------------------------------------------------- stage C
def test_subgoal_indices_hand_computed():
    starts = [0, 10, 25]
    T = 40
    assert current_subtasks(starts, T).tolist() == [0] * 10 + [1] * 15 + [2] * 15
    assert subgoal_frames(starts, T).tolist() == [9] * 10 + [24] * 15 + [39] * 15
    # HALO's float-time rule agrees wherever its keys are exact, at several fps
    for fps in (10, 15, 30, 50):
        for t in range(T):
            cur, goal = halo_subgoal(t, starts, fps, T)
            assert (current_subtasks(starts, T)[t], subgoal_frames(starts, T)[t]) == (cur, goal)
    # a one-subtask episode: every frame's subgoal is the last frame
    assert subgoal_frames([0], 7).tolist() == [6] * 7


def annotation(T=N, starts=(0, 18, 36), plan=("Pick up the block", "Place the block", "Retract the arm")):
    ends = list(starts[1:]) + [T]
    return EpisodeAnnotation(3, "put the block in the bin", T, 10.0, list(plan),
                             [SubtaskSpan(p, s, e - 1, "r") for p, s, e in zip(plan, starts, ends)])


def test_frame_samples_thought_plan_and_training_range():
    s = two_arm_states()
    prims = extract_primitives(s, LAYOUT)
    moving = s[:, [0, 1, 2, 6, 7, 8, 9, 13]]  # without the noisy orientation columns
    frames = frame_samples(annotation(), prims, states=moving, episode_start=100)
    assert [f.subgoal_frame_index for f in frames] == [17] * 18 + [35] * 18 + [39] * 4
    f = frames[20]
    assert (f.subtask_index, f.subtask, f.plan) == (1, "Place the block", ["Place the block", "Retract the arm"])
    assert f.thought == format_thought(["Place the block", "Retract the arm"], "Place the block",
                                       "Move the left gripper to the upper.", "Move the right gripper to the lower-left.")
    assert (f.index, f.subgoal_index) == (120, 135)
    full = frame_samples(annotation(), prims, plan_mode="full")
    assert full[39].plan == ["Pick up the block", "Place the block", "Retract the arm"] and full[0].train
    # the right arm starts moving at frame 3, the left at 5: training frames start one before the first motion
    assert first_moving_frame(moving) == 3 and first_moving_frame(np.zeros((5, 2))) is None
    assert [f.train for f in frames] == [False] * 2 + [True] * 38
    gap = annotation()
    gap.spans[2].start = 37
    with pytest.raises(AnnotationError, match="episode 3: span 2 .* leaves a gap after span 1"):
        frame_samples(gap, prims)


def test_validation_and_fuzzy_matching():
    plan = ["Pick up the red cup", "Place the cup on the tray"]
    assert match_subtask("pick up the red cup.", plan) == 0
    assert match_subtask("Place the cup on the tray carefully", plan) == 1
    assert match_subtask("Pick up red cup", plan) == 0  # close by ratio
    assert match_subtask("Dance", plan) is None
    spans = [SubtaskSpan(plan[0], 0, 9), SubtaskSpan(plan[1], 9, 20)]
    problems = validate_spans(spans, 20, plan)
    assert any("overlaps" in p for p in problems) and any("outside the episode" in p for p in problems)
    back = [SubtaskSpan(plan[1], 0, 9), SubtaskSpan(plan[0], 10, 19)]
    assert validate_spans(back, 20, plan) == ["spans go back in the plan's order"]


# ---------------------------------------------------------------------------------------------- rules annotator
def test_rules_annotator_sidecar_and_cache(tmp_path):
    s = two_arm_states()
    # left grasp run ends at 17, release at 35; right grasp at 14-16: cuts at 17, 18, 36
    ep = EpisodeInput(3, "put the block in the bin", 10.0, s).with_primitives(LAYOUT)
    rules = RulesAnnotator({"Put the block in the bin.": ["Pick up the block with both arms", "Lift the block",
                                                          "Drop the block into the bin", "Retract"]})
    ann = rules.annotate(ep)
    assert [(x.subtask, x.start, x.end) for x in ann.spans] == [
        ("Pick up the block with both arms", 0, 16), ("Lift the block", 17, 17),
        ("Drop the block into the bin", 18, 35), ("Retract", 36, 39)]
    # fewer template entries than phases: the last one runs to the end
    short = RulesAnnotator({"*": ["Do {task}", "Finish"]}).annotate(ep)
    assert [(x.subtask, x.start, x.end) for x in short.spans] == [("Do put the block in the bin", 0, 16),
                                                                   ("Finish", 17, 39)]
    # no template: one subtask, the task itself
    assert [x.subtask for x in RulesAnnotator().annotate(ep).spans] == ["put the block in the bin"]
    too_long = RulesAnnotator({"*": ["a", "b", "c", "d", "e", "f"]})
    idle_ep = EpisodeInput(4, "wait", 10.0, np.zeros((10, 14))).with_primitives(LAYOUT)
    cache = AnnotationCache(tmp_path / "cache")
    run = annotate_episodes([ep, idle_ep], too_long, cache, concurrency=2)
    assert run.failures == {3: run.failures[3], 4: run.failures[4]}
    assert "has 6 subtasks but the episode shows only 4 gripper phases" in run.failures[3]
    run = annotate_episodes([ep], rules, cache)
    assert run.cache_hits == 0 and run.summary()["subtasks_per_episode"]["max"] == 4
    again = annotate_episodes([ep], rules, cache)
    assert again.cache_hits == 1 and again.annotations[3].to_dict() == run.annotations[3].to_dict()
    # stage C into a sidecar and back through the reader
    frames = frame_samples(ann, ep.primitives, s[:, [0, 1, 2, 6, 7, 8, 9, 13]], episode_start=0)
    write_sidecar(tmp_path, [ann], frames, {"annotator": rules.identity(), "failures": {"4": "all idle"}})
    rd = EmcotAnnotations(tmp_path)
    assert len(rd) == N and rd.frame(3, 20) == frames[20]
    assert rd.training_frames()[0] == (3, 2) and rd.episodes[3].spans[2].subtask == "Drop the block into the bin"
    with pytest.raises(KeyError, match="episode 4 failed annotation: all idle"):
        rd.frame(4, 0)
    with pytest.raises(FileNotFoundError, match="vla-blocks annotate"):
        EmcotAnnotations(tmp_path / "nowhere")
