"""Traces: records round trip (dict / JSON / files read back by PIL and numpy), per-model recording checked
against the model's own outputs and independent numpy recomputations, the rollout container, the CLI, and
the HTML report in headless Chromium (Playwright)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vla_blocks
from vla_blocks.cli import main
from vla_blocks.models.halo import synthetic_sample
from vla_blocks.reasoners import stack_prefix_kv
from vla_blocks.trace import EpisodeTrace, StepRecord, Trace, TraceRecorder, load, recording, trace_inference
from vla_blocks.trace.view import render_html

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _equal(a: Trace, b: Trace):
    assert (a.model, a.meta, a.text, a.timings) == (b.model, b.meta, b.text, b.timings)
    assert a.arrays.keys() == b.arrays.keys() and a.images.keys() == b.images.keys()
    for k in a.arrays:
        assert a.arrays[k].dtype == b.arrays[k].dtype, k
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k], err_msg=k)
    for k in a.images:
        np.testing.assert_array_equal(a.images[k], b.images[k], err_msg=k)


def _round_trip(trace: Trace, tmp_path: Path):
    d = json.loads(json.dumps(trace.to_dict()))  # JSON-serialisable
    _equal(Trace.from_dict(d), trace)
    folder = trace.save(tmp_path / "t")
    _equal(Trace.load(folder), trace)
    doc = json.loads((folder / "trace.json").read_text())
    for k, rel in doc["images"].items():  # the PNGs as any reader sees them
        np.testing.assert_array_equal(np.asarray(Image.open(folder / rel).convert("RGB")), trace.images[k])
    for k, rel in doc["arrays"].items():
        np.testing.assert_array_equal(np.load(folder / rel), trace.arrays[k])


# ---------------------------------------------------------------------------------------------- records
def test_trace_records_round_trip(tmp_path):
    g = np.random.default_rng(0)
    img_float = torch.rand(3, 6, 5)
    t = Trace("pi0", meta={"a": 1, "b": [1.5, "x"], "c": {"d": None}}, text={"reasoning": "move <left> & \"up\"\n"},
              arrays={"f32": g.standard_normal((2, 3)).astype(np.float32), "i64": np.arange(4),
                      "bf16": torch.randn(2, 2, dtype=torch.bfloat16), "b": np.array([True, False])},
              images={"cam": img_float, "u8": g.integers(0, 256, (4, 7, 3), dtype=np.uint8)},
              timings={"prefill": 0.25})
    assert t.arrays["bf16"].dtype == np.float32
    expect = np.round(np.clip(img_float.permute(1, 2, 0).double().numpy(), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(t.images["cam"], expect)
    _round_trip(t, tmp_path)


def test_trace_records_errors():
    with pytest.raises(ValueError, match="array name 'a/b'"):
        Trace("pi0", arrays={"a/b": np.zeros(1)})
    with pytest.raises(ValueError, match=r"meta\.x: tensor|meta\.x: Tensor"):
        Trace("pi0", meta={"x": torch.zeros(1)}).to_dict()
    with pytest.raises(ValueError, match=r"meta\.y\[1\]: nan"):
        Trace("pi0", meta={"y": [0.0, float("nan")]}).to_dict()
    with pytest.raises(ValueError, match="image must be"):
        Trace("pi0", images={"x": np.zeros(4)})


# ---------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("recipe", ["pi0-tiny", "pi05-tiny"])
def test_pi0_trace(recipe, tmp_path):
    torch.manual_seed(0)
    m = vla_blocks.create_model(recipe).eval()
    batch = m.check_batch(m.demo_batch(2, generator=torch.Generator().manual_seed(0)))  # as the model sees it
    H, A = m.config.action_horizon, m.config.action_dim
    noise = torch.randn(2, H, A, generator=torch.Generator().manual_seed(1))
    expected = m.infer(batch, noise=noise)["actions"]
    assert not any(mod._forward_hooks for mod in m.modules())
    with recording(m) as rec:
        out = m.infer(batch, noise=noise)["actions"]
        assert m.action_in_proj._forward_hooks  # hooks exist only inside the block
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    traces = rec.traces()
    assert len(traces) == 2 and traces[0].model == ("pi05" if m.config.pi05 else "pi0")
    for b, tr in enumerate(traces):
        x, t, v = tr.arrays["denoise_x"], tr.arrays["denoise_t"], tr.arrays["denoise_v"]
        assert x.shape == (11, H, A) and t.shape == (11,) and t[0] == 1 and t[-1] == 0
        np.testing.assert_array_equal(x[0], noise[b].numpy())
        np.testing.assert_allclose(x[1:], x[:-1] + (t[1:] - t[:-1])[:, None, None] * v, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(tr.arrays["actions"], out[b].numpy())
        # what the model saw: the [0, 1] pixels as 8-bit RGB (numpy oracle), the prompt ids, the masked camera
        for i in range(m.config.num_cameras):
            img = batch["images"][b, i].permute(1, 2, 0).double().numpy()  # a masked camera is zeroed (black)
            np.testing.assert_allclose(tr.images[f"camera{i}"].astype(np.int16),
                                       np.round(np.clip(img, 0, 1) * 255).astype(np.int16), atol=1, rtol=0)
        np.testing.assert_array_equal(tr.arrays["prompt_ids"], batch["tokenized_prompt"][b].numpy())
        assert tr.meta["camera_valid"] == batch["image_masks"][b].tolist()
    _round_trip(traces[1], tmp_path)
    with pytest.raises(TypeError, match="HALO"):
        with recording(vla_blocks.create_model("halo-tiny")):
            pass


def _iar_oracle(ext, K: np.ndarray) -> np.ndarray:
    """The downsample extractor's softmax weights [B, L, heads, Q, T] in numpy from its parameters."""
    B, L, T, _ = K.shape
    h, hd = ext.num_heads, ext.head_dim
    out = np.zeros((B, L, h, ext.num_queries, T))
    for layer in range(L):
        g = layer // ext.group_size
        wq, bq = ext.q_proj[g].weight.double().detach().numpy(), ext.q_proj[g].bias.double().detach().numpy()
        wk, bk = ext.k_proj[g].weight.double().detach().numpy(), ext.k_proj[g].bias.double().detach().numpy()
        q = ext.query_params[layer].double().detach().numpy() @ wq.T + bq  # [Q, inner]
        for b in range(B):
            k = K[b, layer] @ wk.T + bk  # [T, inner]
            for head in range(h):
                s = q[:, head * hd:(head + 1) * hd] @ k[:, head * hd:(head + 1) * hd].T / math.sqrt(hd)
                e = np.exp(s - s.max(-1, keepdims=True))
                out[b, layer, head] = e / e.sum(-1, keepdims=True)
    return out


def test_acot_trace(tmp_path):
    torch.manual_seed(0)
    m = vla_blocks.create_model("acot-tiny").eval()
    c = m.config
    batch = m.check_batch(m.demo_batch(2, generator=torch.Generator().manual_seed(0)))  # as the model sees it
    noise = torch.randn(2, c.action_horizon, c.action_dim, generator=torch.Generator().manual_seed(1))
    cnoise = torch.randn(2, c.ear.horizon, c.action_dim, generator=torch.Generator().manual_seed(2))
    with recording(m) as rec:
        out = m.infer(batch, noise=noise, coarse_noise=cnoise)
    traces = rec.traces()
    prefix = m.embed_prefix(batch)
    with torch.no_grad():
        kv, _ = m.run_prefix(prefix)
    K, _ = stack_prefix_kv(kv.keys, kv.values)
    oracle = _iar_oracle(m.implicit_action_reasoner, K.double().numpy()).mean(axis=(2, 3))  # [B, L, P]
    n_cam, T, L = c.num_cameras, traces[0].meta["tokens_per_image"], c.max_token_len
    for b, tr in enumerate(traces):
        a = tr.arrays
        np.testing.assert_array_equal(a["actions"], out["actions"][b].numpy())
        np.testing.assert_array_equal(a["coarse_actions"], out["coarse_actions"][b].numpy())
        np.testing.assert_array_equal(a["ear_x"][0], cnoise[b].numpy())
        np.testing.assert_array_equal(a["coarse_guide"], a["ear_x"][-1])  # AGP was guided by the EAR sample
        assert tr.meta["ear_stride"] == c.ear.stride and a["coarse_actions"].shape[0] == c.ear.horizon
        # IAR weights: numpy oracle, mapped back to camera patch grids and prompt tokens
        np.testing.assert_allclose(a["iar_weights"], oracle[b], rtol=1e-4, atol=1e-6)
        g = math.isqrt(T)
        for i in range(n_cam):
            np.testing.assert_array_equal(a[f"iar_camera{i}"], a["iar_weights"][:, i * T:(i + 1) * T].reshape(-1, g, g))
        np.testing.assert_array_equal(a["iar_text"], a["iar_weights"][:, n_cam * T:n_cam * T + L])
        np.testing.assert_allclose(a["iar_weights"].sum(-1), 1.0, rtol=1e-5)
        # AGP: recompute a_ex / a_im at Euler step k from the recorded x_t (model code, outside the loop)
        k = 3
        x_t = torch.from_numpy(a["denoise_x"][k])[None]
        t = torch.tensor([float(a["denoise_t"][k])])
        with torch.no_grad():
            tok = m.flow_heads["actions"].embed(x_t, t)[0]
            z_ex = m.coarse_action_in_proj(torch.from_numpy(a["coarse_guide"])[None])
            s_ex = m.explicit_action_reasoner(tok, z_ex)
            a_ex = m.explicit_action_reason_proj(torch.cat([tok, s_ex], -1))
        np.testing.assert_allclose(a["agp_s_ex_norm"][k], s_ex[0].norm(dim=-1).numpy(), rtol=1e-5)
        np.testing.assert_allclose(a["agp_a_ex_norm"][k], a_ex[0].norm(dim=-1).numpy(), rtol=1e-5)
        share = a["agp_explicit_share"]
        assert share.shape == (10, c.action_horizon) and ((share > 0) & (share < 1)).all()
    _round_trip(traces[0], tmp_path)


def test_acot_masked_iar_trace():
    m = vla_blocks.create_model("acot-tiny", **{"iar.mask_padding": True}).eval()
    tr = trace_inference(m, m.demo_batch(1, generator=torch.Generator().manual_seed(0)))[0]
    valid = tr.arrays["prefix_valid"]
    assert not valid.all() and (tr.arrays["iar_weights"][:, ~valid] == 0).all()
    np.testing.assert_allclose(tr.arrays["iar_weights"][:, valid].sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("override", ["iar=null", "ear=null"])
def test_acot_ablation_traces(override):
    key, _ = override.split("=")
    m = vla_blocks.create_model("acot-tiny", **{key: None}).eval()
    tr = trace_inference(m, m.demo_batch(1, generator=torch.Generator().manual_seed(0)))[0]
    assert ("iar_weights" in tr.arrays) == (key != "iar")
    assert ("coarse_actions" in tr.arrays) == (key != "ear")
    assert "agp_explicit_share" not in tr.arrays
    render_html(tr)


def _halo_trace(m, seed: int = 0) -> Trace:
    s = synthetic_sample("emcot", m.config.action_dim, m.config.chunk_size, image_size=32,
                         generator=torch.Generator().manual_seed(seed))
    return trace_inference(m, {"history": s.history, "instruction": s.instruction}, mode="emcot",
                           generator=torch.Generator().manual_seed(seed), max_new_tokens=6)[0]


def test_halo_trace(tmp_path):
    torch.manual_seed(0)
    m = vla_blocks.create_model("halo-tiny").eval()
    s = synthetic_sample("emcot", m.config.action_dim, m.config.chunk_size, image_size=32,
                         generator=torch.Generator().manual_seed(0))
    ht = m.infer(s.history, s.instruction, mode="emcot", generator=torch.Generator().manual_seed(0), max_new_tokens=6)
    tr = trace_inference(m, {"history": s.history, "instruction": s.instruction}, mode="emcot",
                         generator=torch.Generator().manual_seed(0), max_new_tokens=6)[0]
    assert tr.model == "halo" and tr.meta["mode"] == "emcot"
    assert tr.text["reasoning"] == ht.reasoning and tr.text["instruction"] == s.instruction
    np.testing.assert_array_equal(tr.arrays["actions"], ht.actions.numpy())
    np.testing.assert_array_equal(tr.arrays["reasoning_ids"], np.asarray(ht.reasoning_ids))
    sub = ht.subgoal_image.permute(1, 2, 0).double().numpy()
    np.testing.assert_array_equal(tr.images["subgoal"], np.round(np.clip(sub, 0, 1) * 255).astype(np.uint8))
    assert set(tr.timings) == set(ht.timings) and tr.timings["total"] > 0
    assert {"history0", "history1"} <= set(tr.images)
    _round_trip(tr, tmp_path)


# ---------------------------------------------------------------------------------------------- rollouts
def _frame(i: int, size: int = 24) -> np.ndarray:
    img = np.full((size, size, 3), 128, np.uint8)
    img[2 + i:8 + i, 3:9] = (220, 40, 40)
    return img


def _episode(policies: dict[int, Trace], n: int = 4, success: bool = False) -> EpisodeTrace:
    steps = [StepRecord(i, {"corner": _frame(i), "wrist": _frame(n - i)}, np.full(3, i / 10, np.float32),
                        policies.get(i), reward=float(i), success=success and i == n - 1, info={"i": i})
             for i in range(n)]
    return EpisodeTrace({"task": "reach the red block", "env": "synthetic"}, steps, success)


def test_recorder_modes_and_episode_round_trip(tmp_path):
    pol = Trace("pi0", arrays={"actions": np.ones((3, 2), np.float32)}, images={"camera0": _frame(0)})
    rec = TraceRecorder(tmp_path / "fail", mode="failures")
    for ok in (True, False):
        rec.start_episode(task="t", seed=int(ok))
        for i in range(3):
            rec.record_step({"corner": _frame(i)}, action=np.zeros(2), policy=pol if i == 0 else None, reward=0.0,
                            success=ok and i == 2)
        rec.end_episode(ok)
    assert [p.name for p in rec.saved] == ["episode_0001"]
    ep = load(rec.saved[0])
    assert isinstance(ep, EpisodeTrace) and ep.success is False and ep.meta == {"task": "t", "seed": 0}
    assert len(ep.steps) == 3 and ep.steps[1].policy is None
    _equal(ep.steps[0].policy, pol)
    np.testing.assert_array_equal(ep.steps[2].frames["corner"], _frame(2))
    json.dumps(ep.to_dict())
    none = TraceRecorder(tmp_path / "none", mode="none")
    none.start_episode()
    none.record_step({"corner": _frame(0)})
    assert not none.active and none.end_episode(False) is None and not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="trace mode 'some'"):
        TraceRecorder(tmp_path, mode="some")
    with pytest.raises(ValueError, match="holds 1 episodes"):
        load(tmp_path / "fail")


def test_cli_trace_view(tmp_path, capsys):
    tr = Trace("pi0", arrays={"actions": np.ones((3, 2), np.float32)}, images={"camera0": _frame(0)})
    tr.save(tmp_path / "t")
    assert main(["trace", "view", str(tmp_path / "t"), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!doctype html>") and "http://" not in page and "https://" not in page
    assert main(["trace", "view", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0] and "Traceback" not in err[0]


def test_rrd_export(tmp_path):
    rr = pytest.importorskip("rerun", reason="rerun-sdk not installed (pip install vla-blocks[viz])")
    from vla_blocks.trace.view import export_rrd
    m = vla_blocks.create_model("acot-tiny").eval()
    tr = trace_inference(m, m.demo_batch(1, generator=torch.Generator().manual_seed(0)))[0]
    path = export_rrd(_episode({0: tr}, n=2), tmp_path / "e.rrd")
    from rerun.chunk import RrdReader  # read back with rerun's own reader
    rows: dict[str, int] = {}
    for chunk in RrdReader(path).stream():
        rows[chunk.entity_path] = rows.get(chunk.entity_path, 0) + chunk.num_rows
    assert rows["/camera/corner"] == 2 and rows["/camera/wrist"] == 2 and rows["/reward"] == 2
    assert rows["/action/0"] == 2 and rows["/policy/chunk"] == 1 and rows["/policy/coarse"] == 1
    assert rows["/policy/iar/camera0"] == 1
    del rr


# ---------------------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("Debian's chromium package is not installed and .ci/run could not install it "
                    "(apt-get install -y chromium)")
    sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install vla-blocks[dev])")
    with sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                              args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser, path: Path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, errors


def _visible(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector, "els => els.filter(e => !e.hidden).map(e => e.dataset.step ?? e.dataset.policy)")


def _check_images(page, tmp_path: Path, name: str):
    bad = page.eval_on_selector_all("img", "els => els.filter(e => !(e.complete && e.naturalWidth > 0)).length")
    assert bad == 0
    assert page.eval_on_selector_all("img", "els => els.length") > 0
    shot = tmp_path / f"{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] >= 900 and img.shape[1] == 1280 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50


def test_html_acot_episode_in_chromium(browser, tmp_path):
    m = vla_blocks.create_model("acot-tiny").eval()
    batch = m.demo_batch(1, generator=torch.Generator().manual_seed(0))
    ep = _episode({0: trace_inference(m, batch)[0], 2: trace_inference(m, batch)[0]}, n=4, success=False)
    ep.save(tmp_path / "ep")
    assert main(["trace", "view", str(tmp_path / "ep"), "--out", str(tmp_path / "r.html")]) == 0
    page, errors = _open(browser, tmp_path / "r.html")
    assert _visible(page, "section.step") == ["0"] and _visible(page, "section.policy") == ["0"]
    panels = page.eval_on_selector_all("section.policy[data-policy='0'] .panel", "els => els.map(e => e.dataset.panel)")
    assert {"chunk", "coarse", "iar", "agp", "denoise", "ear-denoise"} <= set(panels)
    page.click("#next")
    assert _visible(page, "section.step") == ["1"] and _visible(page, "section.policy") == ["0"]
    assert page.inner_text("#step-label") == "step 1 / 3"
    page.fill("#step", "2")  # the slider itself (fires input)
    assert _visible(page, "section.step") == ["2"] and _visible(page, "section.policy") == ["2"]
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.body.dataset.current") == "3"
    assert "executing the chunk of step 2" in page.inner_text("section.step[data-step='3']")
    _check_images(page, tmp_path, "acot")
    assert errors == []
    page.close()


def test_html_halo_and_pi0_in_chromium(browser, tmp_path):
    halo = vla_blocks.create_model("halo-tiny").eval()
    ep = _episode({0: _halo_trace(halo, 0), 2: _halo_trace(halo, 1)}, n=4, success=True)
    html_path = tmp_path / "halo.html"
    html_path.write_text(render_html(ep))
    page, errors = _open(browser, html_path)
    panels = page.eval_on_selector_all("section.policy[data-policy='0'] .panel", "els => els.map(e => e.dataset.panel)")
    assert {"reasoning", "subgoal", "chunk", "timings"} <= set(panels)
    # the subgoal of the first call sits beside the frame reached at the end of its subtask (step 1)
    assert "frame reached (step 1)" in page.inner_text("section.policy[data-policy='0'] [data-panel='subgoal']")
    assert page.eval_on_selector_all("section.policy[data-policy='0'] [data-panel='subgoal'] img", "e => e.length") == 2
    page.click("#next")
    page.click("#next")
    assert _visible(page, "section.policy") == ["2"]
    _check_images(page, tmp_path, "halo")
    assert errors == []
    page.close()

    pi0 = vla_blocks.create_model("pi05-tiny").eval()
    tr = trace_inference(pi0, pi0.demo_batch(1, generator=torch.Generator().manual_seed(0)))[0]
    tr.save(tmp_path / "pi0")
    assert main(["trace", "view", str(tmp_path / "pi0")]) == 0
    page, errors = _open(browser, tmp_path / "pi0" / "report.html")
    assert _visible(page, "section.step") == ["0"]
    panels = page.eval_on_selector_all("section.policy .panel", "els => els.map(e => e.dataset.panel)")
    assert {"chunk", "denoise"} <= set(panels)
    _check_images(page, tmp_path, "pi0")
    assert errors == []
    page.close()
