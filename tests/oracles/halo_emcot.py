"""Hand-written references of HALO's EM-CoT rules (reference halo_bagel.md §5.1 and §5.3), written as plain
per-frame loops straight from the rule text, independent of vla_blocks.emcot's vectorised code."""

from __future__ import annotations

import math
from fractions import Fraction


def halo_primitive_labels(xyz, g, v_th=0.01, dg_th=0.01, eps=0.0, dir_th=0.2, min_idle=3):
    """Per frame (action, direction) for one arm; xyz a list of [x, y, z], g a list of openness values."""
    n = len(g)
    idle = [True] * n
    for t in range(1, n):
        d = [xyz[t][i] - xyz[t - 1][i] for i in range(3)]
        speed = math.sqrt(sum(v * v for v in d))
        idle[t] = speed < v_th and abs(g[t] - g[t - 1]) < dg_th
    # idle runs
    runs, t = [], 0
    while t < n:
        if idle[t]:
            s = t
            while t < n and idle[t]:
                t += 1
            runs.append((s, t - 1))
        else:
            t += 1
    long_runs = [(s, e) for s, e in runs if e - s + 1 >= min_idle]
    if not long_runs:
        segs = [] if all(idle) else [(0, n - 1)]
    else:
        segs = []
        if long_runs[0][0] > 0:
            segs.append((0, long_runs[0][0] - 1))
        for (s0, e0), (s1, e1) in zip(long_runs, long_runs[1:]):
            if s1 > e0 + 1:
                segs.append((e0 + 1, s1 - 1))
        if long_runs[-1][1] < n - 1:
            segs.append((long_runs[-1][1] + 1, n - 1))
    labels = [["idle", ""] for _ in range(n)]
    for s, e in segs:
        for t in range(max(1, s), e + 1):
            dg = g[t] - g[t - 1]
            if dg <= -dg_th:
                labels[t] = ["grasp", ""]
            elif dg >= dg_th:
                labels[t] = ["release", ""]
        t = s
        while t <= e:
            if labels[t][0] != "idle":
                t += 1
                continue
            a = t
            while t <= e and labels[t][0] == "idle":
                t += 1
            b = t - 1
            tot = [0.0, 0.0, 0.0]
            for i in range(a + 1, b + 1):
                for k in range(3):
                    tot[k] += xyz[i][k] - xyz[i - 1][k]
            norm = math.sqrt(sum(v * v for v in tot))
            direction = ""
            if not norm < eps and norm > 0:
                parts = []
                for k, (p, m) in enumerate((("right", "left"), ("forward", "backward"), ("up", "down"))):
                    if abs(tot[k]) / norm >= dir_th:
                        parts.append(p if tot[k] > 0 else m)
                direction = "_".join(parts)
            for i in range(a, b + 1):
                labels[i] = ["move", direction]
    return [tuple(x) for x in labels]


# HALO's sentence table, a few entries written out by hand
HALO_SENTENCES_LEFT = {
    ("idle", ""): "Keep the left arm idle.",
    ("grasp", ""): "Close the left gripper.",
    ("release", ""): "Open the left gripper.",
    ("move", "up"): "Move the left gripper to the upper.",
    ("move", "backward"): "Move the left gripper to the back.",
    ("move", "left_up"): "Move the left gripper to the upper-left.",
    ("move", "right_forward"): "Move the left gripper to the front-right.",
    ("move", "backward_down"): "Move the left gripper to the lower-back.",
    ("move", "right_backward_up"): "Move the left gripper to the upper-right-back.",
    ("move", "left_forward_down"): "Move the left gripper to the lower-left-front.",
}


def halo_subgoal(step, starts, fps, num_steps):
    """HALO's stage-C rule on time keys ``start / fps`` (exact rationals here): (current index, goal frame)."""
    keys = [Fraction(s) / Fraction(fps) for s in starts]
    now = Fraction(step) / Fraction(fps)
    cur = 0
    for i, k in enumerate(keys):
        if k <= now:
            cur = i
        else:
            break
    goal = int(keys[cur + 1] * fps) - 1 if cur < len(keys) - 1 else num_steps - 1
    return cur, max(0, min(goal, num_steps - 1))
