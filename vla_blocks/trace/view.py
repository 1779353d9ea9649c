"""``vla-blocks trace view DIR [--out report.html] [--rrd out.rrd]``: one self-contained offline HTML report.

The page has no external resource: CSS and JavaScript are inline, every image is a ``data:`` URI and every
plot is rendered here with matplotlib (Agg, PNG). A timeline scrubber (slider, ◀ ▶ buttons, arrow keys)
walks the steps of an episode; each step shows its camera frames, the executed action and the simulator's
signals, beside the panels of the policy call whose chunk is executing:

- every model: the action chunk per dimension; pi0 / pi0.5 / ACoT: the denoising trajectory of the chunk;
- HALO: the reasoning text, the imagined subgoal beside the frame actually reached at the end of that
  subtask (the last frame before the next reasoning call), the per-stage timings;
- ACoT: the EAR coarse trajectory against the final chunk per action dimension, IAR attention heat-maps over
  the camera images and over the prompt tokens, the AGP split between explicit and implicit guidance.

A single policy trace is shown as a one-step episode. ``--rrd`` also writes the same data as a rerun
recording (needs ``pip install vla-blocks[viz]``).
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
from pathlib import Path

import numpy as np

from .record import EpisodeTrace, StepRecord, Trace, load, png_bytes

__all__ = ["render_html", "as_episode", "export_rrd", "screenshot", "add_arguments", "run"]


# ---------------------------------------------------------------------------------------------- helpers
def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(arr: np.ndarray, alt: str, cls: str = "frame") -> str:
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="{_uri(png_bytes(arr))}">'


def _figure(w: float, h: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), dpi=80, layout="constrained")


def _plot(fig, alt: str) -> str:
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return f'<img class="plot" alt="{html.escape(alt)}" src="{_uri(buf.getvalue())}">'


def _panel(name: str, title: str, body: str) -> str:
    return f'<div class="panel" data-panel="{name}"><h3>{html.escape(title)}</h3>{body}</div>'


def _grid(n: int, ncols: int = 4):
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


def _real_dims(trace: Trace, a: np.ndarray) -> int:
    return min(a.shape[-1], int(trace.meta.get("real_action_dim", a.shape[-1])))


# ---------------------------------------------------------------------------------------------- plots
def plot_chunk(actions: np.ndarray) -> str:
    """An ``<img>`` tag (inline PNG) plotting each dimension of an action chunk ``[H, A]`` over its steps."""
    fig = _figure(5.5, 2.6)
    ax = fig.add_subplot()
    for d in range(actions.shape[-1]):
        ax.plot(np.arange(actions.shape[0]), actions[:, d], marker=".", lw=1, label=f"a{d}")
    ax.set_xlabel("chunk step")
    ax.set_ylabel("action (raw)")
    if actions.shape[-1] <= 16:
        ax.legend(fontsize=6, ncol=min(8, actions.shape[-1]), loc="upper left", bbox_to_anchor=(0, -0.25))
    return _plot(fig, "action chunk per dimension")


def plot_coarse_vs_final(coarse: np.ndarray, final: np.ndarray, stride: int) -> str:
    """An ``<img>`` tag plotting, per action dimension, ACoT's coarse (EAR) trajectory (every ``stride`` steps) against
    the final chunk."""
    A = min(coarse.shape[-1], final.shape[-1])
    rows, cols = _grid(A)
    fig = _figure(2.2 * cols, 1.7 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    tc = np.arange(coarse.shape[0]) * stride
    for d in range(rows * cols):
        ax = axes[d // cols][d % cols]
        if d >= A:
            ax.axis("off")
            continue
        ax.plot(tc, coarse[:, d], "s--", ms=3, lw=1, color="tab:orange", label="coarse (EAR)")
        ax.plot(np.arange(final.shape[0]), final[:, d], "o-", ms=2.5, lw=1.2, color="tab:blue", label="final chunk")
        ax.set_title(f"dim {d}", fontsize=8)
        ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6)
    return _plot(fig, "coarse vs final trajectory per action dimension")


def plot_denoising(x: np.ndarray, t: np.ndarray, dims: int, title: str) -> str:
    """``x [n+1, H, A]``: the chunk at every grid point (t = 1 noise → t = 0 sample)."""
    from matplotlib import colormaps
    cmap = colormaps["viridis"]
    dims = min(dims, x.shape[-1], 8)
    rows, cols = _grid(dims)
    fig = _figure(2.2 * cols, 1.7 * rows + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False)
    for d in range(rows * cols):
        ax = axes[d // cols][d % cols]
        if d >= dims:
            ax.axis("off")
            continue
        for k in range(x.shape[0] - 1):
            ax.plot(x[k, :, d], lw=0.8, color=cmap(float(t[k])), alpha=0.8)
        ax.plot(x[-1, :, d], lw=1.8, color="black")
        ax.set_title(f"dim {d}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"{title}: colour = t (yellow 1 noise → purple), black = sample", fontsize=8)
    return _plot(fig, title)


def plot_iar(trace: Trace) -> str:
    """Heat-maps of the IAR weights (mean over layers, heads, queries) over each camera, and over the prompt."""
    n_cam = int(trace.meta["num_cameras"])
    w = trace.arrays["iar_weights"].mean(0)
    T, L = int(trace.meta["tokens_per_image"]), int(trace.meta["prompt_length"])
    total = float(w.sum()) or 1.0
    fig = _figure(2.4 * n_cam + 3.2, 2.6)
    axes = fig.subplots(1, n_cam + 1, squeeze=False, width_ratios=[1] * n_cam + [1.6])[0]
    vmax = float(w[: n_cam * T].max()) if n_cam * T else 1.0
    valid_cam = trace.meta.get("camera_valid", [True] * n_cam)
    for i in range(n_cam):
        ax = axes[i]
        heat = trace.arrays[f"iar_camera{i}"].mean(0)
        img = trace.images.get(f"camera{i}")
        if img is not None:
            H, W = img.shape[:2]
            ax.imshow(img)
            ax.imshow(heat, cmap="inferno", alpha=0.55, extent=(0, W, H, 0), interpolation="nearest", vmin=0, vmax=vmax)
        else:
            ax.imshow(heat, cmap="inferno", interpolation="nearest", vmin=0, vmax=vmax)
        share = float(w[i * T:(i + 1) * T].sum()) / total
        ax.set_title(f"camera {i}{'' if valid_cam[i] else ' (masked)'}: {share:.0%}", fontsize=8)
        ax.axis("off")
    ax = axes[-1]
    text = w[n_cam * T:n_cam * T + L]
    ids = trace.arrays.get("prompt_ids")
    valid = trace.arrays.get("prefix_valid")
    tv = valid[n_cam * T:n_cam * T + L].astype(bool) if valid is not None else np.ones(L, bool)
    ax.bar(np.arange(L), text, color=np.where(tv, "tab:blue", "lightgrey"))
    if ids is not None and L <= 48:
        ax.set_xticks(np.arange(L), [str(int(i)) for i in ids], rotation=90, fontsize=5)
    ax.set_title(f"prompt tokens: {float(text.sum()) / total:.0%} (grey = padding)", fontsize=8)
    ax.tick_params(labelsize=6)
    return _plot(fig, "IAR attention over camera patches and prompt tokens")


def plot_agp(trace: Trace) -> str:
    """An ``<img>`` tag of ACoT's action-guided prior: the explicit share per Euler step and action token, and the mean
    norms of the explicit and implicit guidance per step."""
    share = trace.arrays.get("agp_explicit_share")
    fig = _figure(6.5, 2.4)
    if share is not None:
        ax1, ax2 = fig.subplots(1, 2)
        im = ax1.imshow(share, aspect="auto", cmap="coolwarm", vmin=0, vmax=1, interpolation="nearest")
        ax1.set_xlabel("action token")
        ax1.set_ylabel("Euler step")
        ax1.set_title("explicit share |a_ex| / (|a_ex| + |a_im|)", fontsize=8)
        fig.colorbar(im, ax=ax1, shrink=0.8)
    else:
        ax2 = fig.subplots()
    for name, label in (("agp_s_ex_norm", "|S_ex| (coarse)"), ("agp_s_im_norm", "|S_im| (KV prior)")):
        if name in trace.arrays:
            ax2.plot(trace.arrays[name].mean(1), marker=".", label=label)
    ax2.set_xlabel("Euler step")
    ax2.set_title("guidance norms (mean over tokens)", fontsize=8)
    ax2.legend(fontsize=6)
    return _plot(fig, "AGP explicit vs implicit guidance")


def plot_timings(timings: dict[str, float]) -> str:
    """An ``<img>`` tag of the per-stage timings (seconds) as horizontal bars."""
    items = [(k, v) for k, v in timings.items() if k != "total"]
    fig = _figure(5.0, 0.35 * len(items) + 0.9)
    ax = fig.add_subplot()
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="tab:green")
    ax.set_xlabel("seconds" + (f" (total {timings['total']:.3f} s)" if "total" in timings else ""))
    ax.tick_params(labelsize=7)
    return _plot(fig, "per-stage timings")


# ---------------------------------------------------------------------------------------------- sections
def as_episode(obj: Trace | EpisodeTrace) -> EpisodeTrace:
    """A single trace as a one-step episode (its input images as the step's frames)."""
    if isinstance(obj, EpisodeTrace):
        return obj
    frames = {k: v for k, v in obj.images.items() if k != "subgoal"}
    return EpisodeTrace(meta={"source": "single policy call", "model": obj.model}, steps=[StepRecord(0, frames,
                                                                                                    policy=obj)])


def _reached_frames(ep: EpisodeTrace) -> dict[int, tuple[int, np.ndarray]]:
    """For each HALO EM-CoT call, the frame at the end of its subtask: the step before the next EM-CoT call
    (or the episode's last step)."""
    calls = [i for i, s in enumerate(ep.steps)
             if s.policy is not None and s.policy.model == "halo" and s.policy.meta.get("mode") == "emcot"]
    out = {}
    for n, i in enumerate(calls):
        end = calls[n + 1] - 1 if n + 1 < len(calls) else len(ep.steps) - 1
        if end > i and ep.steps[end].frames:
            out[i] = (end, next(iter(ep.steps[end].frames.values())))
    return out


def policy_panels(trace: Trace, reached: tuple[int, np.ndarray] | None = None) -> str:
    """The HTML panels of one policy trace, chosen by its model (HALO reasoning and subgoal, ACoT coarse/AGP, chunks,
    timings); ``reached``: ``(step, frame)`` of the frame the episode reached, shown beside the imagined subgoal."""
    a = trace.arrays
    parts = []
    if trace.model == "halo":
        if "reasoning" in trace.text:
            parts.append(_panel("reasoning", "Reasoning", f'<pre class="reasoning">{html.escape(trace.text["reasoning"])}</pre>'))
        if "subgoal" in trace.images:
            body = f'<figure>{_img(trace.images["subgoal"], "imagined subgoal")}<figcaption>imagined subgoal</figcaption></figure>'
            if reached is not None:
                body += (f'<figure>{_img(reached[1], "frame reached")}<figcaption>frame reached (step {reached[0]})'
                         "</figcaption></figure>")
            parts.append(_panel("subgoal", "Imagined subgoal vs reached", f'<div class="row">{body}</div>'))
    if "actions" in a and a["actions"].ndim == 2:
        parts.append(_panel("chunk", "Action chunk", plot_chunk(a["actions"])))
    if "coarse_actions" in a:
        parts.append(_panel("coarse", "Coarse (EAR) vs final trajectory",
                            plot_coarse_vs_final(a["coarse_actions"], a["actions"], int(trace.meta.get("ear_stride", 1)))))
    if "iar_weights" in a:
        parts.append(_panel("iar", "IAR attention over the prefix", plot_iar(trace)))
    if "agp_s_ex_norm" in a or "agp_s_im_norm" in a:
        parts.append(_panel("agp", "AGP: explicit vs implicit guidance", plot_agp(trace)))
    if "denoise_x" in a:
        parts.append(_panel("denoise", "Denoising trajectory of the chunk (model space)",
                            plot_denoising(a["denoise_x"], a["denoise_t"], _real_dims(trace, a["denoise_x"]), "action chunk")))
    if "ear_x" in a:
        parts.append(_panel("ear-denoise", "Denoising trajectory of the coarse trajectory (model space)",
                            plot_denoising(a["ear_x"], a["ear_t"], _real_dims(trace, a["ear_x"]), "EAR")))
    if trace.timings:
        parts.append(_panel("timings", "Per-stage timings", plot_timings(trace.timings)))
    info = {k: v for k, v in trace.meta.items() if k != "contexts"}
    if "instruction" in trace.text:
        info["instruction"] = trace.text["instruction"]
    parts.append(_panel("meta", "Call", f'<pre class="meta">{html.escape(json.dumps(info))}</pre>'))
    return "\n".join(parts)


def _step_section(s: StepRecord, policy_step: int | None) -> str:
    frames = "".join(f'<figure>{_img(v, f"camera {k}")}<figcaption>{html.escape(k)}</figcaption></figure>'
                     for k, v in s.frames.items())
    facts = [f"step {s.index}"]
    if s.reward is not None:
        facts.append(f"reward {s.reward:.3f}")
    if s.success is not None:
        facts.append("success" if s.success else "not yet successful")
    if policy_step is not None:
        facts.append("policy called here" if policy_step == s.index else f"executing the chunk of step {policy_step}"
                     f" (offset {s.index - policy_step})")
    body = f'<p class="facts">{html.escape(" · ".join(facts))}</p><div class="row">{frames}</div>'
    if s.action is not None:
        body += f'<p class="action">action: {html.escape(np.array2string(np.asarray(s.action), precision=3))}</p>'
    if s.info:
        body += f'<pre class="meta">{html.escape(json.dumps(s.info))}</pre>'
    return body


_CSS = """
body{font-family:system-ui,sans-serif;margin:0;background:#f6f6f4;color:#222}
header{padding:10px 16px;background:#223;color:#eee}header h1{font-size:18px;margin:0 0 4px}
.ok{color:#7d7}.fail{color:#f77}
nav#scrubber{position:sticky;top:0;z-index:2;display:flex;gap:8px;align-items:center;padding:8px 16px;background:#dde}
nav#scrubber input{flex:1}
main{padding:8px 16px}.row{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
figure{margin:0}figcaption{font-size:12px;color:#555}
img.frame{image-rendering:pixelated;min-width:160px;max-width:320px;border:1px solid #aaa}
img.plot{max-width:100%}
section.policy{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:0 10px}
section.policy h2{grid-column:1/-1;font-size:16px;margin:10px 0 0}
.panel{background:#fff;border:1px solid #ccc;border-radius:6px;padding:6px 10px;margin:8px 0}
.panel h3{font-size:14px;margin:2px 0 6px}pre{white-space:pre-wrap;font-size:12px;margin:0}
[hidden]{display:none!important}
"""

_JS = """
(function(){
  const steps = JSON.parse(document.getElementById('steps-data').textContent);
  const slider = document.getElementById('step');
  const label = document.getElementById('step-label');
  function show(i){
    i = Math.max(0, Math.min(steps.length - 1, i));
    slider.value = i;
    const p = steps[i].policy;
    document.querySelectorAll('section.step').forEach(s => { s.hidden = Number(s.dataset.step) !== i; });
    document.querySelectorAll('section.policy').forEach(s => { s.hidden = p === null || Number(s.dataset.policy) !== p; });
    label.textContent = 'step ' + steps[i].index + ' / ' + steps[steps.length - 1].index;
    document.body.dataset.current = String(i);
  }
  slider.addEventListener('input', () => show(Number(slider.value)));
  document.getElementById('prev').addEventListener('click', () => show(Number(slider.value) - 1));
  document.getElementById('next').addEventListener('click', () => show(Number(slider.value) + 1));
  document.addEventListener('keydown', e => {
    if (e.key === 'ArrowLeft') show(Number(slider.value) - 1);
    if (e.key === 'ArrowRight') show(Number(slider.value) + 1);
  });
  show(0);
})();
"""


def render_html(obj: Trace | EpisodeTrace, title: str | None = None) -> str:
    """The whole report as one HTML string (no external resources)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the trace viewer renders its plots with matplotlib: pip install vla-blocks[viz]") from e
    matplotlib.use("Agg", force=False)
    ep = as_episode(obj)
    if not ep.steps:
        raise ValueError("the episode has no steps: nothing to show")
    reached = _reached_frames(ep)
    latest, steps_js, step_html, policy_html = None, [], [], []
    for i, s in enumerate(ep.steps):
        if s.policy is not None:
            latest = i
            policy_html.append(f'<section class="policy" data-policy="{i}" hidden>'
                               f'<h2>Policy call at step {s.index} ({html.escape(s.policy.model)})</h2>'
                               f"{policy_panels(s.policy, reached.get(i))}</section>")
        steps_js.append({"index": s.index, "policy": latest})
        step_html.append(f'<section class="step" data-step="{i}" hidden>'
                         f"{_step_section(s, None if latest is None else ep.steps[latest].index)}</section>")
    meta = {k: v for k, v in ep.meta.items()}
    title = title or str(meta.get("task") or meta.get("model") or "vla_blocks trace")
    verdict = ("" if ep.success is None else
               f' · <span class="{"ok" if ep.success else "fail"}">{"success" if ep.success else "failure"}</span>')
    n = len(ep.steps)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body data-current="0">
<header><h1>{html.escape(title)}</h1><div id="summary">{n} step{'s' if n != 1 else ''} · {len(policy_html)} policy call{'s' if len(policy_html) != 1 else ''}{verdict} · {html.escape(json.dumps(meta))}</div></header>
<nav id="scrubber"><button id="prev" type="button">&#9664;</button><input id="step" type="range" min="0" max="{n - 1}" value="0" step="1"><button id="next" type="button">&#9654;</button><span id="step-label"></span></nav>
<main>
{''.join(step_html)}
{''.join(policy_html)}
</main>
<script type="application/json" id="steps-data">{json.dumps(steps_js)}</script>
<script>{_JS}</script>
</body></html>
"""


# ---------------------------------------------------------------------------------------------- rerun
def export_rrd(obj: Trace | EpisodeTrace, path) -> Path:
    """Write the same data as a rerun recording (``.rrd``): camera frames per step, executed actions and
    chunks as scalars, reasoning as text, subgoal and IAR heat-maps as images. Needs ``rerun-sdk``."""
    try:
        import rerun as rr
    except ImportError as e:
        raise ImportError("rerun export needs rerun-sdk: pip install vla-blocks[viz]") from e
    ep = as_episode(obj)
    rec = rr.RecordingStream("vla_blocks_trace")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for s in ep.steps:
        rec.set_time("step", sequence=s.index)
        for cam, img in s.frames.items():
            rec.log(f"camera/{cam}", rr.Image(img))
        if s.action is not None:
            for d, v in enumerate(np.asarray(s.action, dtype=np.float64).reshape(-1)):
                rec.log(f"action/{d}", rr.Scalars(float(v)))
        if s.reward is not None:
            rec.log("reward", rr.Scalars(float(s.reward)))
        if s.success is not None:
            rec.log("success", rr.Scalars(float(s.success)))
        p = s.policy
        if p is None:
            continue
        if "reasoning" in p.text:
            rec.log("policy/reasoning", rr.TextDocument(p.text["reasoning"]))
        if "subgoal" in p.images:
            rec.log("policy/subgoal", rr.Image(p.images["subgoal"]))
        if "actions" in p.arrays:
            rec.log("policy/chunk", rr.Tensor(p.arrays["actions"]))
        if "coarse_actions" in p.arrays:
            rec.log("policy/coarse", rr.Tensor(p.arrays["coarse_actions"]))
        for i in range(int(p.meta.get("num_cameras", 0))):
            if f"iar_camera{i}" in p.arrays:
                rec.log(f"policy/iar/camera{i}", rr.Tensor(p.arrays[f"iar_camera{i}"].mean(0)))
        for k, v in p.timings.items():
            rec.log(f"policy/timings/{k}", rr.Scalars(float(v)))
    rec.save(str(path))
    return path


# ---------------------------------------------------------------------------------------------- CLI
def screenshot(html: str | Path, png: str | Path, step: int = 1, chromium: str = "/usr/bin/chromium",
               width: int = 1280, height: int = 1000) -> Path:
    """Open a report in headless Chromium (Playwright), advance the scrubber ``step`` times and save a small PNG
    (quantised to 128 colours). Needs ``pip install playwright`` and a Chromium binary (Debian's ``chromium``)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        raise ImportError("screenshots need playwright: pip install playwright (and Debian's chromium)") from e
    if not Path(chromium).exists():
        raise FileNotFoundError(f"no Chromium at {chromium}: apt-get install chromium")
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(Path(html).resolve().as_uri())
            for _ in range(step):
                page.click("#next")
            page.screenshot(path=str(png))
        finally:
            browser.close()
    from PIL import Image
    Image.open(png).convert("RGB").quantize(colors=128).save(png, optimize=True)
    return png


def add_arguments(parser):
    """Options of ``vla-blocks trace`` (subcommand ``view``)."""
    sub = parser.add_subparsers(dest="trace_command", metavar="{view}", required=True)
    v = sub.add_parser("view", help="render a trace or episode folder as one self-contained HTML file")
    v.add_argument("dir", help="a trace folder (trace.json) or an episode folder (episode.json)")
    v.add_argument("--out", default=None, help="output HTML file (default: DIR/report.html)")
    v.add_argument("--title", default=None, help="page title (default: the episode's task)")
    v.add_argument("--rrd", default=None, help="also write a rerun recording here (needs vla-blocks[viz])")
    v.add_argument("--screenshot", default=None, metavar="PNG",
                   help="also photograph the report (second step) in headless Chromium (needs playwright + chromium)")


def run(args) -> int:
    """``vla-blocks trace view``: render a trace or episode folder as one self-contained HTML file (and a rerun
    recording with ``--rrd``)."""
    try:
        obj = load(args.dir)
        out = Path(args.out) if args.out else Path(args.dir) / "report.html"
        page = render_html(obj, args.title)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
        print(f"wrote {out} ({len(page.encode()) / 1e6:.2f} MB)")
        if args.rrd:
            print(f"wrote {export_rrd(obj, args.rrd)}")
        if args.screenshot:
            print(f"wrote {screenshot(out, args.screenshot)}")
    except (FileNotFoundError, ValueError, ImportError, KeyError) as e:
        print(f"vla-blocks trace view: {e}", file=sys.stderr)
        return 2
    return 0
