"""The training engine on one process: exact resume, checkpoints, config, optimizer groups, schedules, freezing,
EMA, accumulation, activation checkpointing, bf16, compile errors, validation and the CLI."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from train_helpers import build, cfg, noise_extra
from vla_blocks.config import ConfigError
from vla_blocks.train import DemoBatches, Trainer, load_train_recipe, param_groups
from vla_blocks.train.checkpoint import checkpoint_dirs


def _run(run_dir, steps, resume=False, model_seed=0, **kw):
    model = build(seed=model_seed)
    c = cfg(steps=steps, ema={"decay": 0.9, "start_step": 2}, grad_accum=2, batch_size=2,
            checkpoint={"every": 5, "keep_last": 2}, schedule={"decay_steps": 20}, **kw)
    tr = Trainer(model, c, DemoBatches(model, 2, seed=5), run_dir=run_dir)
    tr.fit(resume=resume)
    return tr


def _sd(tr):
    return {**tr.final_state_dict(use_ema=False), **{f"ema.{k}": v for k, v in tr.ema.items()}}


def test_resume_is_exact(tmp_path):
    """10 steps + resume + 10 steps == 20 uninterrupted steps, bit for bit (fp32, CPU): weights, EMA, optimizer,
    RNG (the model draws its own flow noise and times) and data position all come back."""
    full = _sd(_run(tmp_path / "a", 20))
    _run(tmp_path / "b", 10)
    tr = _run(tmp_path / "b", 20, resume=True, model_seed=99)
    assert [p.name for p in checkpoint_dirs(tmp_path / "b" / "checkpoints")] == ["step-00000015", "step-00000020"]
    got = _sd(tr)
    assert got.keys() == full.keys()
    for k in full:
        assert torch.equal(full[k], got[k]), k
    recs = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 21))
    assert [r["loss"] for r in recs] == [r["loss"] for r in ref]


def test_corrupted_latest_checkpoint_falls_back(tmp_path):
    _run(tmp_path, 10)
    ckpts = checkpoint_dirs(tmp_path / "checkpoints")
    assert [p.name for p in ckpts] == ["step-00000005", "step-00000010"]
    (ckpts[-1] / "state.pt").write_bytes(b"garbage")
    model = build()
    tr = Trainer(model, cfg(steps=20, ema={"decay": 0.9}, grad_accum=2, batch_size=2), DemoBatches(model, 2, seed=5),
                 run_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="step-00000010.*falling back"):
        assert tr.resume().endswith("step-00000005")
    assert tr.step == 5 and tr.data.position == 10  # 5 steps x 2 micro-batches


def test_no_checkpoint_is_loadable_is_an_error(tmp_path):
    _run(tmp_path, 5)
    for p in checkpoint_dirs(tmp_path / "checkpoints"):
        (p / "state.pt").write_bytes(b"")
    model = build()
    tr = Trainer(model, cfg(steps=6), DemoBatches(model, 4), run_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="no loadable checkpoint"):
            tr.resume()


def _adamw_oracle(p, grads, lrs, b1, b2, eps, wd):
    """Decoupled AdamW (Loshchilov & Hutter) in numpy, bias-corrected."""
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), 1):
        p *= 1 - lr * wd
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p -= lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p


def test_optimizer_step_matches_numpy_adamw_with_clipping_and_schedule():
    """Two engine steps on a tiny linear model equal a numpy AdamW on the clipped gradients."""
    class Lin(torch.nn.Module):
        _fsdp_wrap_modules = ()

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(3, 2)

        def forward(self, b):
            loss = ((self.w(b["x"]) - b["y"]) ** 2).mean()
            return loss, {}
    torch.manual_seed(0)
    m = Lin()
    w0, b0 = m.w.weight.detach().double().numpy().copy(), m.w.bias.detach().double().numpy().copy()
    xs = [torch.randn(4, 3) for _ in range(2)]
    ys = [torch.randn(4, 2) for _ in range(2)]
    c = cfg(steps=2, optimizer={"lr": 0.1, "weight_decay": 0.5, "clip_grad_norm": 0.3, "eps": 1e-8},
            schedule={"type": "constant", "warmup_steps": 1})
    tr = Trainer(m, c, [{"x": x, "y": y} for x, y in zip(xs, ys)])
    gw, gb, lrs = [], [], []
    W, Bv = w0.copy(), b0.copy()
    # gradients of the mean squared error at the oracle's own weights, clipped by the global norm
    lrs = [0.1 / 2 * 1, 0.1]  # warmup: peak/(warmup+1) at step 0, then the peak
    ow, ob = W.copy(), Bv.copy()
    state = []
    for x, y in zip(xs, ys):
        X, Y = x.double().numpy(), y.double().numpy()
        r = X @ ow.T + ob - Y
        g_w = 2 * r.T @ X / r.size
        g_b = 2 * r.sum(0) / r.size
        n = math.sqrt((g_w ** 2).sum() + (g_b ** 2).sum())
        s = min(1.0, 0.3 / (n + 1e-6))
        gw.append(g_w * s)
        gb.append(g_b * s)
        state.append(None)
        ow = _adamw_oracle(w0, gw, lrs[:len(gw)], 0.9, 0.95, 1e-8, 0.5)
        ob = _adamw_oracle(b0, gb, lrs[:len(gb)], 0.9, 0.95, 1e-8, 0.0)
    tr.fit()
    np.testing.assert_allclose(m.w.weight.detach().double().numpy(), ow, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.w.bias.detach().double().numpy(), ob, rtol=1e-5, atol=1e-6)
    assert [h["lr"] for h in tr.history] == pytest.approx(lrs)


def test_param_groups_no_decay_on_norms_biases_embeddings():
    model = build()
    groups = param_groups(model, 0.1)
    decay, no_decay = groups[0]["names"], groups[1]["names"]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "language_model.embed_tokens.weight" in no_decay
    assert all(not n.endswith("bias") for n in decay)
    assert any("layernorm" in n or "norm" in n for n in no_decay)
    assert all("norm" not in n.split(".")[-2] for n in decay)
    assert "action_in_proj.weight" in decay
    assert len(decay) + len(no_decay) == sum(1 for p in model.parameters() if p.requires_grad)


def test_cosine_schedule_matches_formula():
    from vla_blocks.train import CosineSchedule, OpenPICosineSchedule
    s = CosineSchedule(warmup_steps=10, peak_lr=1.0, decay_steps=110, decay_lr=0.1)
    assert s.at(0, 0, 0) == pytest.approx(1 / 11)
    assert s.at(10, 0, 0) == pytest.approx(1.0)
    assert s.at(60, 0, 0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.at(110, 0, 0) == pytest.approx(0.1) and s.at(500, 0, 0) == pytest.approx(0.1)
    o = OpenPICosineSchedule()
    assert (o.warmup_steps, o.peak_lr, o.decay_steps, o.decay_lr) == (1000, 2.5e-5, 30000, 2.5e-6)


def test_freeze_by_module_path_and_expert():
    model = build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    c = cfg(steps=2, freeze=["vision_tower", "expert:vlm"])
    tr = Trainer(model, c, DemoBatches(model, 4))
    tr.fit()
    for n, p in model.named_parameters():
        frozen = n.startswith("vision_tower") or ".experts.vlm." in n or ".norms.vlm." in n
        assert torch.equal(p, before[n]) == frozen or not frozen and torch.equal(p, before[n]) and p.grad is None, n
    assert any(n.startswith("action_in_proj") for n, _ in tr.trainable)
    with pytest.raises(ConfigError, match=r"train.freeze\[0\]: 'visoin'.*top-level modules"):
        Trainer(build(), cfg(freeze=["visoin"]), [])


def test_activation_checkpointing_gives_the_same_step():
    outs = []
    for ac in (False, True):
        model = build()
        Trainer(model, cfg(steps=2, activation_checkpointing=ac), DemoBatches(model, 4, extra=noise_extra(model))).fit()
        outs.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert outs[0].keys() == outs[1].keys()  # parameter names unchanged by the checkpoint wrapper
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=0, atol=1e-6)


def test_bf16_autocast_keeps_fp32_master_weights_and_optimizer_state():
    model = build()
    tr = Trainer(model, cfg(steps=3, precision="bf16"), DemoBatches(model, 4))
    tr.fit()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    st = tr.optimizer.state[next(p for _, p in tr.trainable)]
    assert st["exp_avg"].dtype == torch.float32
    assert all(math.isfinite(h["loss"]) for h in tr.history)


def test_compile_failure_is_loud():
    from torch._dynamo import register_backend

    @register_backend
    def _vla_test_broken_backend(gm, example_inputs):
        raise RuntimeError("backend refuses")
    model = build()
    tr = Trainer(model, cfg(steps=1, compile={"enabled": True, "backend": "_vla_test_broken_backend",
                                              "fullgraph": False}), DemoBatches(model, 4))
    with pytest.raises(Exception, match="backend refuses"):
        tr.fit()
    # fullgraph (the default): a graph break inside the MoT layer is an error, not a silent fallback to eager
    # (today the attention dispatch's mask inspection breaks the graph)
    model = build()
    tr = Trainer(model, cfg(steps=1, compile={"enabled": True, "backend": "eager"}), DemoBatches(model, 4))
    with pytest.raises(Exception, match="(?i)graph break|data dependent|unsupported"):
        tr.fit()


def test_compiled_layers_train_like_eager():
    """fullgraph: false with dynamo's eager backend: compiled regions give the eager step."""
    outs = []
    for enabled in (False, True):
        model = build()
        torch._dynamo.reset()
        Trainer(model, cfg(steps=1, compile={"enabled": enabled, "backend": "eager", "fullgraph": False}),
                DemoBatches(model, 4, extra=noise_extra(model))).fit()
        outs.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=0, atol=1e-6)


def test_validation_reports_flow_loss_and_action_error(tmp_path):
    model = build()
    val = [model.demo_batch(batch_size=3, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    tr = Trainer(model, cfg(steps=4, validation={"every": 2, "batches": 2}), DemoBatches(model, 4), val_data=val,
                 run_dir=tmp_path)
    tr.fit()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in vals] == [2, 4]
    # the action error is the error of predict_action_chunk against the raw actions (recomputed here)
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        errs = []
        for b in val:
            model(b)
            pred = model.predict_action_chunk(b)
            errs.append(float(((pred - b["actions"][:, :pred.shape[1], :pred.shape[2]]) ** 2).mean()))
    assert vals[-1]["val_action_mse"] == pytest.approx(sum(errs) / 2, rel=1e-5)


def test_train_config_errors_name_the_key_path():
    with pytest.raises(ConfigError, match=r"<dict>: train.optimizer.lrr: unknown key 'lrr'.*did you mean 'lr'"):
        load_train_recipe({"base": None, "type": "pi0", "train": {"optimizer": {"lrr": 1}}} | {} if False else
                          {"type": "pi0", "train": {"optimizer": {"lrr": 1}}})
    with pytest.raises(ConfigError, match=r"train.schedule.type: unknown lr_schedule component 'cosin'.*'cosine'"):
        load_train_recipe("pi0-tiny", ["train.schedule.type=cosin"])
    with pytest.raises(ConfigError, match=r"train.precision: 'fp16' is not allowed"):
        load_train_recipe("pi0-tiny", ["train.precision=fp16"])
    r = load_train_recipe("pi0-tiny", ["train.steps=7", "train.optimizer.lr=3e-4"])
    assert r.train.steps == 7 and r.train.optimizer.lr == 3e-4 and r.model.type == "pi0"


def test_bench_train_smoke(tmp_path):
    """The benchmark runs and records what it measured (facts only, never timings)."""
    from vla_blocks import create_model
    from vla_blocks.bench import run_suite
    payload = run_suite("train", smoke=True, out=tmp_path, quiet=True)
    (r,) = payload["results"]
    torch.manual_seed(0)
    model = create_model("acot-tiny")
    assert r["recipe"] == "acot-tiny" and r["params"] == model.num_parameters()
    assert r["param_tensors"] == sum(1 for p in model.parameters() if p.requires_grad)
    assert set(r["timings"]) == {"fwd_bwd", "fwd_bwd_adamw", "hand_loop", "engine", "engine_ema"}
    assert all(t["n"] == r["rounds"] for t in r["timings"].values())
    assert json.loads(open(payload["paths"]["json"]).read())["suite"] == "train"


def test_flops_per_step_match_the_matmul_count():
    """A linear model: forward 2·B·in·out, backward twice that (input and weight gradients) = 6·B·in·out."""
    class Lin(torch.nn.Module):
        _fsdp_wrap_modules = ()

        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 32)
            self.b = torch.nn.Linear(32, 4)

        def forward(self, b):
            return self.b(torch.relu(self.a(b["x"]))).pow(2).mean(), {}
    torch.manual_seed(0)
    batches = [{"x": torch.randn(8, 16)} for _ in range(3)]
    tr = Trainer(Lin(), cfg(steps=3), batches)
    tr.fit()
    # the first layer's input needs no gradient: its backward is the weight gradient only
    assert tr.flops_per_step == 2 * 8 * 16 * 32 * 2 + 2 * 8 * 32 * 4 * 3
    assert all(r["tflops_per_s"] > 0 and "mfu" not in r for r in tr.history)


def test_shipped_train_recipes_decode():
    from vla_blocks.train import list_train_recipes
    names = list_train_recipes()
    assert {"pi0-tiny-demo", "pi0-libero", "pi05-libero"} <= set(names)
    for n in names:
        r = load_train_recipe(n)
        assert r.train.steps > 0
    r = load_train_recipe("pi0-libero")
    assert (r.train.lr_at(0), r.train.lr_at(1000), r.train.lr_at(30000)) == pytest.approx((2.5e-5 / 1001, 2.5e-5, 2.5e-6))
    r = load_train_recipe("pi05-libero")
    assert (r.train.lr_at(10000), r.train.lr_at(29999)) == (5e-5, 5e-5)


def test_resume_fast_forwards_a_plain_iterable(tmp_path):
    """Data without state_dict (a generator function): the resumed run skips the consumed batches."""
    model = build()

    def batches():
        for i in range(100):
            g = torch.Generator().manual_seed(i)
            b = model.demo_batch(batch_size=2, generator=g)
            b.update(noise_extra(model)(2, g))
            yield b

    class Source:
        def __iter__(self):
            return batches()

    def run(d, steps, resume):
        tr = Trainer(build(), cfg(steps=steps, checkpoint={"every": 3}, schedule={"decay_steps": 6}), Source(),
                     run_dir=d)
        tr.fit(resume=resume)
        return tr.final_state_dict(use_ema=False)
    full = run(tmp_path / "a", 6, False)
    run(tmp_path / "b", 3, False)
    got = run(tmp_path / "b", 6, True)
    for k in full:
        assert torch.equal(full[k], got[k]), k


def test_a_recipe_without_a_dataset_root_says_how_to_give_one(tmp_path):
    """Shipped Meta-World recipes leave data.root to the command line; training without it is one clear error."""
    from vla_blocks.errors import ConfigError
    from vla_blocks.train import train
    with pytest.raises(ConfigError, match=r"data\.root=DIR") as e:
        train("halo-emcot-mw", ["train.steps=1"], output_dir=tmp_path / "run")
    assert e.value.key == "data.root"
