"""End to end: a small generated LeRobotDataset → ``vla-blocks annotate --annotator rules`` → the meta/emcot
sidecar → EM-CoT HaloSamples (history, thought, subgoal frame, action chunk) → a halo-tiny training step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")

from vla_blocks.cli import main  # noqa: E402
from vla_blocks.emcot import EmcotAnnotations  # noqa: E402
from vla_blocks.emcot.halo_data import EmcotHaloDataset  # noqa: E402
from vla_blocks.models.halo import format_thought  # noqa: E402

FPS, T, CAM = 10, 30, "observation.images.top"
TASK = "Put the cube in the bowl."
LAYOUT = {"left": {"xyz": [0, 1, 2], "gripper": 3}, "right": {"xyz": [4, 5, 6], "gripper": 7, "gripper_open": 0.04}}
TEMPLATES = {"put the cube in the bowl": ["pick up the cube", "place the cube in the bowl", "retract the arm"]}


def image(ep, t):
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 0] = 8 * t
    img[..., 1] = 100 + 50 * ep
    img[t % 32, :, 2] = 255
    return img


def left_arm(ep):
    """Scripted pick and place: idle 0-2, move forward 3-9, close 10-12, up 13-17, release 18-20, idle 21-29."""
    xyz = np.zeros((T, 3))
    g = np.ones(T)
    step = 0.02 + 0.005 * ep
    for t in range(1, T):
        xyz[t] = xyz[t - 1]
        if 3 <= t <= 9:
            xyz[t, 1] += step
        if 13 <= t <= 17:
            xyz[t, 2] += step
    g[10:13] = [0.6, 0.3, 0.0]
    g[13:18] = 0.0
    g[18:21] = [0.3, 0.6, 1.0]
    return xyz, g


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from vla_blocks.data import LeRobotDataset
    root = tmp_path_factory.mktemp("emcot") / "pickplace"
    features = {CAM: {"dtype": "image", "shape": [32, 32, 3], "names": ["height", "width", "channels"]},
                "observation.state": {"dtype": "float32", "shape": [8], "names": None},
                "action": {"dtype": "float32", "shape": [14], "names": None}}
    w = LeRobotDataset.create(root, fps=FPS, features=features, use_videos=False)
    for ep in range(2):
        xyz, g = left_arm(ep)
        for t in range(T):
            state = np.r_[xyz[t], g[t], 0.3, 0.0, 0.2, 0.04].astype(np.float32)  # the right arm rests, open
            w.add_frame({CAM: image(ep, t), "observation.state": state,
                         "action": np.full(14, t / T + ep, np.float32), "task": TASK})
        w.save_episode()
    w.finalize()
    return root


def test_annotate_rules_sidecar_and_halo_training_step(dataset, tmp_path, capsys):
    templates = tmp_path / "phases.json"
    templates.write_text(json.dumps(TEMPLATES))
    rc = main(["annotate", str(dataset), "--state-layout", json.dumps(LAYOUT), "--annotator", "rules",
               "--templates", str(templates), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "annotate (rules): 2/2 episodes annotated, 0 from the cache, 0 failed" in out
    assert "subtasks per episode: min 3, mean 3.0, max 3" in out and "frames: 60 (56 training frames)" in out
    ann = EmcotAnnotations(dataset)
    # grasp run ends at 12 -> second subtask from 13; release run ends at 20 -> third from 21
    spans = [(s.subtask, s.start, s.end) for s in ann.episodes[1].spans]
    assert spans == [("pick up the cube", 0, 12), ("place the cube in the bowl", 13, 20), ("retract the arm", 21, 29)]
    f = ann.frame(1, 15)
    assert (f.subgoal_frame_index, f.index, f.subgoal_index) == (20, 45, 50)
    assert f.thought == format_thought(["place the cube in the bowl", "retract the arm"], "place the cube in the bowl",
                                       "Move the left gripper to the upper.", "Keep the right arm idle.")
    assert ann.frame(0, 29).subgoal_frame_index == 29 and not ann.frame(0, 1).train and ann.frame(0, 2).train
    # a second run is served from the cache
    rc = main(["annotate", str(dataset), "--state-layout", json.dumps(LAYOUT), "--annotator", "rules",
               "--templates", str(templates), "--no-progress"])
    assert rc == 0 and "2 from the cache" in capsys.readouterr().out

    data = EmcotHaloDataset(dataset, camera=CAM, history=2, chunk_size=16)
    assert len(data) == 56  # frames 2..29 of each episode (first motion at frame 3)
    k = data.items.index((1, 15, 45))
    s = data[k]
    assert s.instruction == TASK and s.thought == f.thought
    torch.testing.assert_close(s.goal, torch.from_numpy(image(1, 20)).permute(2, 0, 1).float() / 255)
    torch.testing.assert_close(s.history[0], torch.from_numpy(image(1, 14)).permute(2, 0, 1).float() / 255)
    expected = torch.tensor([min(t, T - 1) / T + 1 for t in range(15, 31)])  # repeats the last action past the end
    torch.testing.assert_close(s.actions[:, 0], expected)
    first = data[data.items.index((0, 2, 2))]  # history before frame 0 repeats frame 0
    torch.testing.assert_close(first.history[0], torch.from_numpy(image(0, 1)).permute(2, 0, 1).float() / 255)

    from vla_blocks.model import create_model
    torch.manual_seed(0)
    model = create_model("halo-tiny", stage="emcot")
    model.train()
    batch = model.collate([data[k], data[0]])
    loss, metrics = model(dict(batch, seed=0))
    loss.backward()
    assert torch.isfinite(loss) and metrics["ce_tokens"] > 0 and metrics["mse_tokens"] > 0 and metrics["l1_tokens"] > 0
    assert sum(p.grad is not None for p in model.parameters()) > 0


def test_annotate_cli_errors(dataset, capsys):
    rc = main(["annotate", str(dataset), "--state-layout", json.dumps(LAYOUT), "--annotator", "openai"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "vla-blocks annotate: error: --annotator openai needs --base-url and --model"
    bad = {"left": {"xyz": [0, 1, 2], "gripper": 9}}
    rc = main(["annotate", str(dataset), "--state-layout", json.dumps(bad), "--no-progress"])
    assert rc == 2 and "arm 'left' indexes [9] outside the state vector" in capsys.readouterr().err
    rc = main(["annotate", str(dataset), "--state-layout", "{nope", "--no-progress"])
    assert rc == 2 and "--state-layout: not JSON" in capsys.readouterr().err
