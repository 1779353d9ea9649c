"""HALO on Meta-World: closed-loop evaluation with a frame history (HaloPolicy), the EM-CoT phase annotation of
the demos and the ``data.emcot`` training source.

Oracles: the raw env replayed with the same actions (its own renders give the frames HALO must have seen),
numpy un-normalisation from ``meta/stats.json``, the sidecar reader. Success rates are never asserted.
"""

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("metaworld")
os.environ.setdefault("MUJOCO_GL", "egl")

from vla_blocks.envs import make_env  # noqa: E402
from vla_blocks.envs.evaluate import run_episode  # noqa: E402
from vla_blocks.envs.policies import HaloPolicy, call_seed  # noqa: E402

TASKS = ["reach-v3", "pick-place-v3"]
EPS = 1e-6  # the z-score epsilon of vla_blocks.normalize (x̂ = (x − mean) / (std + 1e-6))


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    from vla_blocks.envs.demos import generate_demos
    root = tmp_path_factory.mktemp("halo-mw") / "demos"
    generate_demos(root, "metaworld", TASKS, 2, 64, workers=1, progress=False)
    return root


def _model(mode: str, **over):
    from vla_blocks.train import load_train_recipe
    torch.manual_seed(0)
    cfg = load_train_recipe("halo-mw", [f"inference.mode={mode}", "inference.max_new_tokens=6",
                                        "inference.latent_points=3", "inference.action_points=3",
                                        *[f"{k}={v}" for k, v in over.items()]]).model
    return cfg.build().eval()


def _policy(demos, mode="reactive", trace=False):
    from vla_blocks.data import LeRobotDataset, make_processor
    model = _model(mode)
    proc = make_processor(model, LeRobotDataset(demos, decode_video=False).meta)
    return HaloPolicy(model, proc, trace=trace)


def _job(tmp_path, trace="none", horizon=10):
    return dict(suite="metaworld", task="reach-v3", config=(1, 3), env_kw={"size": 64, "max_steps": 150}, seed=5,
                horizon=horizon, video="none", trace=trace, out=str(tmp_path), name="ep")


def test_halo_policy_history_actions_and_determinism(demos, tmp_path):
    """Each query sees the frames of the last history_frames env steps (the first frame repeated at the start), the
    noise generator is re-seeded per query, and the executed actions are the un-normalised chunk's first 4."""
    pol = _policy(demos)
    assert pol.chunk == 4 and pol.history_frames == 2 and pol.frames_before_query == 2
    calls = []
    infer = pol.model.infer

    def spy(history, instruction, mode=None, generator=None, **kw):
        calls.append(([h.clone() for h in history], instruction, mode, generator.initial_seed()))
        tr = infer(history, instruction, mode=mode, generator=generator, **kw)
        calls[-1] += (tr.actions.clone(),)
        return tr

    pol.model.infer = spy
    out = run_episode(_job(tmp_path), pol)
    assert out["steps"] == 10 and out["inference_calls"] == 3 and len(calls) == 3
    # oracle: replay the executed actions in a fresh env; HALO's frames are the renders of steps t-1 and t
    env = make_env("metaworld", "reach-v3", size=64, max_steps=150)
    obs = env.reset((1, 3))
    renders = [obs.images["corner4"]]
    for k, (hist, instr, mode, seed, chunk) in enumerate(calls):
        assert instr == "reach the red goal" and mode == "reactive" and seed == call_seed(out["seed"], k)
        t = 4 * k
        want = [renders[max(t - 1, 0)], renders[t]]
        for h, w in zip(hist, want):
            np.testing.assert_allclose(h.permute(1, 2, 0).numpy(), w.astype(np.float32) / 255, atol=1e-6)
        raw = _unnormalize(chunk.numpy(), demos)
        for a in raw[:4, :4]:
            a = env.clip_action(a.astype(np.float32))
            if len(renders) <= 10:
                renders.append(env.step(a).observation.images["corner4"])
    env.close()
    # the same episode again: identical (per-episode seeds, history cleared on reset)
    calls2 = []
    pol.model.infer = lambda *a, **k: calls2.append(1) or infer(*a, **k)
    again = run_episode(_job(tmp_path), pol)
    assert len(calls2) == 3 and again["steps"] == out["steps"] and again["success"] == out["success"]


def _stats(root):
    st = json.loads((root / "meta" / "stats.json").read_text())["action"]
    return np.asarray(st["mean"], np.float64), np.asarray(st["std"], np.float64)


def _unnormalize(a, root):
    """Model space -> raw, by hand from the dataset statistics (HALO's processor: z-score)."""
    mean, std = _stats(root)
    return a[:, :len(mean)] * (std + EPS) + mean


def test_halo_emcot_trace_records_reasoning_and_subgoal(demos, tmp_path):
    from vla_blocks.trace import EpisodeTrace
    pol = _policy(demos, mode="emcot", trace=True)
    out = run_episode(_job(tmp_path, trace="all", horizon=5), pol)
    assert out["inference_calls"] == 2
    ep = EpisodeTrace.load(tmp_path / out["trace"])
    traces = [s.policy for s in ep.steps if s.policy is not None]
    assert len(traces) == 2
    for tr in traces:
        assert tr.model == "halo" and tr.meta.get("mode") == "emcot"
        assert isinstance(tr.text["reasoning"], str) and len(tr.arrays["reasoning_ids"]) <= 6
        assert tr.images["subgoal"].dtype == np.uint8 and tr.images["subgoal"].ndim == 3


def test_metaworld_emcot_annotation_and_training_source(demos, tmp_path):
    """Phase templates cut at gripper events (pick-place grasps: >= 2 phases; reach: 1), subgoal = last frame of
    the current subtask; data.emcot builds EM-CoT HALO batches with normalised actions and trains."""
    import shutil
    from vla_blocks.emcot.samples import EmcotAnnotations
    from vla_blocks.envs.emcot import METAWORLD_PHASES, annotate_metaworld
    from vla_blocks.train import train
    root = tmp_path / "demos"
    shutil.copytree(demos, root)
    summary = annotate_metaworld(root)
    assert summary["episodes"] == 4 and summary["failed"] == 0
    ann = EmcotAnnotations(root)
    meta = json.loads((root / "meta" / "metaworld.json").read_text())
    for e, info in enumerate(meta["episodes"]):
        plan = ann.frame(e, 0).plan
        full = METAWORLD_PHASES[info["task"]]
        assert 1 <= len(plan) <= len(full) and plan[:-1] == full[:len(plan) - 1]
        assert plan[-1] == " and ".join(full[len(plan) - 1:])
        if info["task"] == "pick-place-v3":
            assert len(plan) >= 2  # the expert grasps the puck
        subs = [ann.frame(e, f) for f in range(info["length"])]
        for f, fr in enumerate(subs):  # subgoal = last frame of the current subtask
            last = max(g for g, other in enumerate(subs) if other.subtask_index == fr.subtask_index)
            assert fr.subgoal_frame_index == last and fr.subtask == plan[fr.subtask_index]
    res = train("halo-emcot-mw", [f"data.root={root}", "train.steps=2", "train.batch_size=4",
                                  "train.checkpoint.every=2", "train.log.every=1", "data.val_episodes=[3]"],
                output_dir=tmp_path / "run")
    assert res.step == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("ce", 0) > 0 and r.get("mse", 0) > 0 for r in rows)  # thought and subgoal are trained
    # the collate normalises the raw actions exactly as the reactive path does
    from vla_blocks.data import LeRobotDataset, make_processor
    from vla_blocks.emcot.halo_data import EmcotHaloDataset
    model = _model("emcot")
    proc = make_processor(model, LeRobotDataset(root, decode_video=False).meta).eval()
    ds = EmcotHaloDataset(root, camera="observation.images.corner4", history=2, chunk_size=8)
    captured = []
    model.collate = lambda samples, **kw: captured.extend(samples) or {}
    proc.halo_collate([ds[0]])
    mean, std = _stats(root)
    want = (ds[0].actions.numpy() - mean) / (std + EPS)
    got = captured[0].actions.numpy()
    assert got.shape == (8, 4)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert captured[0].thought == ds[0].thought and captured[0].goal is not None


def test_emcot_data_errors(demos, tmp_path):
    from vla_blocks.train import train
    with pytest.raises(FileNotFoundError, match="no EM-CoT annotations"):
        train("halo-emcot-mw", [f"data.root={demos}", "train.steps=1"], output_dir=tmp_path / "r1")
    with pytest.raises(ValueError, match="EM-CoT samples train HALO only"):
        train("pi0-mw", [f"data.root={demos}", "train.steps=1", "data.emcot=true"], output_dir=tmp_path / "r2")


def test_bench_metaworld_merge_rows():
    """--merge: new rows replace same-named rows, others keep their order, new names are appended; settings that
    differ (other than models / work) are refused."""
    from vla_blocks.bench import load_suite
    mod = load_suite("metaworld")
    s = {"tasks": ["reach-v3"], "episodes": 20, "steps": 1500, "models": ["a", "b"], "work": "w"}
    old = {"created": "t0", "settings": s, "results": [{"name": "a", "v": 1}, {"name": "b", "v": 2}]}
    new = {"created": "t1", "settings": {**s, "models": ["b", "c"], "work": "x"},
           "results": [{"name": "b", "v": 3}, {"name": "c", "v": 4}]}
    out = mod.merge(old, new)
    assert [(r["name"], r["v"]) for r in out["results"]] == [("a", 1), ("b", 3), ("c", 4)]
    assert out["settings"]["models"] == ["a", "b", "c"] and out["merged_runs"] == ["t0", "t1"]
    with pytest.raises(ValueError, match="settings differ in \\['episodes'\\]"):
        mod.merge(old, {**new, "settings": {**new["settings"], "episodes": 5}})
