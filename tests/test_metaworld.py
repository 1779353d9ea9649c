"""Meta-World adapter, scripted demos, closed-loop evaluation, and the CI smoke pipeline
(2 tasks x 3 demos at 64 px -> 20 training steps -> 2 evaluation episodes).

Oracles: the raw metaworld env (``MT1`` configurations, the scripted policies, its own render), numpy, the
LeRobotDataset reader. Success rates of trained models are never asserted; files and their consistency are.
"""

import json
import math
import os

import numpy as np
import pytest

pytest.importorskip("metaworld")
os.environ.setdefault("MUJOCO_GL", "egl")

from vla_blocks.cli import main  # noqa: E402
from vla_blocks.envs import make_env  # noqa: E402
from vla_blocks.envs.evaluate import evaluate, wilson_interval  # noqa: E402
from vla_blocks.envs.policies import NearestNeighbourPolicy, RandomPolicy  # noqa: E402

TASKS = ["reach-v3", "drawer-open-v3"]
STATE_IDX = [0, 1, 2, 3, 36, 37, 38]


@pytest.fixture(scope="module")
def reach():
    env = make_env("metaworld", "reach-v3", size=64, max_steps=150)
    yield env
    env.close()


def test_configs_follow_mt1_and_splits_are_disjoint(reach):
    import metaworld
    train, ev = reach.configs("train", 60), reach.configs("eval", 60)
    assert train[:2] == [(0, 0), (0, 1)] and train[50] == (2, 0) and ev[0] == (1, 0) and ev[59] == (3, 9)
    assert not set(train) & set(ev)
    # the adapter's state is the MT1 configuration's reset observation (hand, gripper, goal)
    bench = metaworld.MT1("reach-v3", seed=1)
    raw_env = bench.train_classes["reach-v3"]()
    raw_env.set_task(bench.train_tasks[3])
    ref, _ = raw_env.reset()
    raw_env.close()
    obs = reach.reset((1, 3), render=False)
    np.testing.assert_array_equal(obs.raw, ref)
    np.testing.assert_array_equal(obs.state, ref[STATE_IDX].astype(np.float32))
    assert obs.images == {}


def test_images_upright_and_deterministic(reach):
    a = reach.reset((1, 0))
    raw = reach.env.render()  # metaworld's own (upside-down) image of the same state
    np.testing.assert_array_equal(a.images["corner4"], raw[::-1, ::-1])
    assert a.images["corner4"].shape == (64, 64, 3) and a.images["corner4"].dtype == np.uint8
    s1 = reach.step(np.array([0.5, -0.2, 0.1, 0.0]))
    b = reach.reset((1, 0))
    s2 = reach.step(np.array([0.5, -0.2, 0.1, 0.0]))
    np.testing.assert_array_equal(a.images["corner4"], b.images["corner4"])
    np.testing.assert_array_equal(s1.observation.raw, s2.observation.raw)
    np.testing.assert_array_equal(s1.observation.images["corner4"], s2.observation.images["corner4"])
    frame = reach.frame(b)
    assert set(frame) == {"observation.images.corner4", "observation.state", "task"}
    assert frame["observation.images.corner4"].shape == (3, 64, 64)
    np.testing.assert_allclose(frame["observation.images.corner4"].permute(1, 2, 0).numpy() * 255,
                               b.images["corner4"], atol=1e-3)
    assert frame["task"] == "reach the red goal"


def test_expert_matches_metaworld_policy_and_action_checks(reach):
    from metaworld.policies import ENV_POLICY_MAP
    obs = reach.reset((1, 5), render=False)
    ref = np.clip(ENV_POLICY_MAP["reach-v3"]().get_action(obs.raw), -1, 1).astype(np.float32)
    np.testing.assert_array_equal(reach.expert_action(obs), ref)
    np.testing.assert_array_equal(reach.clip_action([2.0, -3.0, 0.5, 0.0]), np.float32([1, -1, 0.5, 0]))
    with pytest.raises(ValueError, match="4"):
        reach.clip_action([0.0, 0.0])
    with pytest.raises(ValueError, match="non-finite"):
        reach.clip_action([np.nan, 0, 0, 0])
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        make_env("metaworld", "pick-place-v2")
    with pytest.raises(ValueError, match="parity"):
        make_env("metaworld", "reach-v3", train_seed=0, eval_seed=2)


def test_wilson_interval_against_closed_form():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 3)
    z = 1.959964
    assert lo == 0.0 and math.isclose(hi, z * z / (3 + z * z), rel_tol=1e-9)  # k = 0: upper = z^2 / (n + z^2)
    lo, hi = wilson_interval(10, 20)
    # by hand: centre (0.5 + 1.92/20) / (1 + 3.8415/20) = 0.5, half 1.96 sqrt(0.0125 + 0.0024) / 1.1921 = 0.2007
    assert math.isclose(lo + hi, 1.0) and math.isclose(hi, 0.7007, abs_tol=2e-4)


def test_random_policy_deterministic_across_workers(tmp_path):
    kw = dict(tasks=["reach-v3"], episodes=2, horizon=15, size=64, progress=False)
    one = evaluate("random", out=tmp_path / "a", workers=1, **kw)
    two = evaluate("random", out=tmp_path / "b", workers=2, **kw)
    strip = lambda r: [{k: v for k, v in e.items() if k not in ("wall_s", "inference_ms_mean")} for e in r]  # noqa
    assert strip(one["episodes_detail"]) == strip(two["episodes_detail"])
    assert one["success_rate"] == 0.0 and one["episodes"] == 2
    # the same seed gives the same first actions; another seed other ones
    env = make_env("metaworld", "reach-v3", size=64)
    p = RandomPolicy()
    p.reset(7)
    a1 = p.act(env, None)[0]
    p.reset(7)
    assert np.array_equal(a1, p.act(env, None)[0])
    p.reset(8)
    assert not np.array_equal(a1, p.act(env, None)[0])
    env.close()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "--tasks", "reach-v3"]) == 2
    assert "MODEL or --server" in capsys.readouterr().err
    assert main(["eval", "nowhere/model", "--tasks", "reach-v3", "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vla-blocks eval: error:") and "nowhere/model" in err and "Traceback" not in err
    (tmp_path / "ds").mkdir()
    assert main(["demos", "metaworld", "--tasks", "reach-v3", "--out", str(tmp_path / "ds")]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_demos_train_eval(tmp_path, capsys):
    """The CI smoke: demos (2 workers) -> 20 training steps -> 2 evaluation episodes, files consistent."""
    from vla_blocks.data import LeRobotDataset
    from vla_blocks.train import train
    ds_dir, run_dir, ev_dir = tmp_path / "demos", tmp_path / "run", tmp_path / "eval"
    assert main(["demos", "metaworld", "--tasks", ",".join(TASKS), "--episodes", "3", "--size", "64",
                 "--workers", "2", "--out", str(ds_dir), "--quiet"]) == 0
    meta = json.loads((ds_dir / "meta" / "metaworld.json").read_text())
    ds = LeRobotDataset(ds_dir)
    assert ds.num_episodes == 6 and len(meta["episodes"]) == 6
    assert len(ds) == sum(e["length"] for e in meta["episodes"])
    assert [e["task"] for e in meta["episodes"]] == [TASKS[0]] * 3 + [TASKS[1]] * 3
    assert [tuple(e["config"]) for e in meta["episodes"][:3]] == [(0, 0), (0, 1), (0, 2)]
    assert all(e["success_step"] == e["length"] for e in meta["episodes"])  # stop at first success, no hold
    # meta/stats.json holds dataset-wide statistics (numpy over every frame), not averaged per-episode quantiles
    st = json.loads((ds_dir / "meta" / "stats.json").read_text())
    for key in ("observation.state", "action"):
        x = np.concatenate([b[key] for b in ds.iter_columns([key])]).astype(np.float64)
        span = x.max(0) - x.min(0)
        for q, name in ((0.01, "q01"), (0.99, "q99")):
            np.testing.assert_allclose(st[key][name], np.quantile(x, q, axis=0), atol=1e-6 + 0.01 * span.max())
        np.testing.assert_allclose(st[key]["mean"], x.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(st[key]["std"], x.std(0), rtol=1e-4, atol=1e-6)
    assert st["observation.state"]["q99"][4] > st["observation.state"]["q01"][4]  # goal x varies across episodes
    # episode 3 (drawer-open, config (0, 0)) starts at the env's reset observation and the expert's action
    env = make_env("metaworld", TASKS[1], size=64)
    obs = env.reset((0, 0))
    start = sum(e["length"] for e in meta["episodes"][:3])
    f = ds[start]
    assert f["task"] == "open the drawer" and int(f["episode_index"]) == 3 and int(f["frame_index"]) == 0
    np.testing.assert_allclose(f["observation.environment_state"].numpy(), obs.raw.astype(np.float32))
    np.testing.assert_allclose(f["observation.state"].numpy(), obs.raw[STATE_IDX].astype(np.float32))
    np.testing.assert_allclose(f["action"].numpy(), env.expert_action(obs))
    img = f["observation.images.corner4"].permute(1, 2, 0).numpy() * 255  # lossy video: close, not equal
    assert np.abs(img - obs.images["corner4"].astype(np.float32)).mean() < 12
    env.close()

    # 1-NN reference: a demonstration frame's own state gives back its own action
    nn = NearestNeighbourPolicy(ds_dir)
    env = make_env("metaworld", TASKS[0], size=64)
    obs = env.reset((0, 1), render=False)
    f = ds[meta["episodes"][0]["length"]]  # first frame of episode 1 = reach config (0, 1)
    np.testing.assert_allclose(nn.act(env, obs)[0][0], f["action"].numpy())
    env.close()

    res = train("pi0-mw", [f"data.root={ds_dir}", "train.steps=20", "train.batch_size=8",
                           "train.checkpoint.every=20", "train.log.every=10"], output_dir=run_dir)
    assert res.step == 20 and (run_dir / "final" / "processor_config.json").is_file()

    assert main(["eval", str(run_dir), "--tasks", ",".join(TASKS), "--episodes", "1", "--size", "64",
                 "--horizon", "40", "--video", "all", "--trace", "all", "--out", str(ev_dir), "--quiet"]) == 0
    out = json.loads((ev_dir / "results.json").read_text())
    eps = out["episodes_detail"]
    assert out["episodes"] == len(eps) == 2 and out["n_action_steps"] == 4
    assert [e["task"] for e in eps] == TASKS and all(e["config"] == [1, 0] for e in eps)
    assert out["successes"] == sum(e["success"] for e in eps)
    assert out["success_rate"] == out["successes"] / 2
    for t in TASKS:
        te = [e for e in eps if e["task"] == t]
        assert out["per_task"][t]["success_rate"] == sum(e["success"] for e in te) / len(te)
    for e in eps:
        assert 1 <= e["steps"] <= 40 and e["inference_calls"] == math.ceil(e["steps"] / 4)
        assert (e["steps_to_success"] == e["steps"]) if e["success"] else e["steps_to_success"] is None
        assert (ev_dir / e["video"]).is_file() and (ev_dir / e["trace"] / "episode.json").is_file()
        tr = json.loads((ev_dir / e["trace"] / "episode.json").read_text())
        assert tr["success"] == e["success"]
    md = (ev_dir / "results.md").read_text()
    assert f"**{out['success_rate']:.2f}**" in md and all(t in md for t in TASKS)

    # the same model through a policy server (openpi protocol): same actions per query, same episodes
    pytest.importorskip("websockets")
    from vla_blocks.envs.policies import ServerPolicy, load_policy
    from vla_blocks.serve import PolicyServer, load_runner
    server = PolicyServer(load_runner(str(run_dir / "final"), "metaworld"), "127.0.0.1", port=0)
    url = f"ws://127.0.0.1:{server.start()}"
    try:
        local, remote = load_policy(str(run_dir)), ServerPolicy(url, n_action_steps=4)
        env = make_env("metaworld", TASKS[0], size=64)
        obs = env.reset((1, 7))
        for p in (local, remote):
            p.reset(123)
        for _ in range(2):  # two consecutive queries (per-call noise seeds)
            a, b = local.act(env, obs)[0], remote.act(env, obs)[0]
            assert a.shape == b.shape == (4, 4)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        env.close()
        remote.client.close()
        sv_dir = tmp_path / "eval-server"
        assert main(["eval", "--server", url, "--n-action-steps", "4", "--tasks", ",".join(TASKS), "--episodes", "1",
                     "--size", "64", "--horizon", "40", "--out", str(sv_dir), "--quiet"]) == 0
    finally:
        server.stop()
    sv = json.loads((sv_dir / "results.json").read_text())
    key = ("task", "config", "success", "steps", "inference_calls")
    assert [{k: e[k] for k in key} for e in sv["episodes_detail"]] == [{k: e[k] for k in key} for e in eps]


@pytest.mark.slow
def test_bench_metaworld_smoke(tmp_path):
    """`vla-blocks bench metaworld --smoke` (references only) writes a consistent table."""
    argv = ["bench", "metaworld", "--smoke", "--out", str(tmp_path), "--quiet", "--device", "cpu",
            "--set", "models=expert,random,nn"]
    assert main(argv) == 0
    (js,) = tmp_path.glob("*/metaworld.json")
    p = json.loads(js.read_text())
    assert p["suite"] == "metaworld" and p["smoke"] is True
    rows = {r["name"]: r for r in p["results"]}
    assert list(rows) == ["expert", "random", "nn"] and all(r["kind"] == "reference" for r in rows.values())
    assert p["demos"]["episodes"] == 6
    for r in rows.values():
        assert r["episodes"] == 2 and set(r["per_task"]) == set(TASKS)
        assert r["success_rate"] == sum(t["successes"] for t in r["per_task"].values()) / 2
    # reference metaworld.md §4: the expert solves these configurations, random actions never do
    assert rows["expert"]["success_rate"] == 1.0 and rows["random"]["success_rate"] == 0.0
    md = js.with_suffix(".md").read_text()
    assert "| expert (ref) | 1.00 |" in md
