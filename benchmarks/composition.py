"""Composition benchmark: how much of a policy call is bookkeeping, HALO's per-token decode cost, and what one
flow step costs as the prefix and the chunk grow.

1. **Bookkeeping share** (pi0-tiny, acot-tiny, halo-tiny inference): wall time spent building sub-layouts,
   routing indices, mask metadata, RoPE tables and choosing attention backends (``Layout.from_samples``,
   ``Layout.tokens``, ``Layout.mask_meta``, ``Routing.from_layout``, ``rope_cos_sin``, ``choose_backend`` and
   ``PassPlan.build`` where it exists; outermost calls only, so nested ones are not counted twice) over the
   wall time of the same instrumented call. Target: ≤ 15 %.
2. **HALO decode**: per-token time of greedy decoding (``HaloContext.grow_text``) after a context of
   100 … 2,000 tokens. Target: flat within ±20 % from 100 to 2,000.
3. **Flow step**: one Euler step of pi0.5-tiny (best time of ``sample_actions`` with 11 steps minus 1 step, / 10)
   as the prompt grows (fixed chunk) and as the chunk grows (fixed prompt): the step should cost in
   proportion to its own tokens, not the prefix's bookkeeping.

Run ``vla-blocks bench composition`` (or ``python benchmarks/composition.py OUT.json`` against any checkout,
to measure a commit before a change with the same code).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import time

import torch

CONTEXT_SIZES = (100, 500, 1000, 2000)
PROMPT_LENGTHS = (16, 256, 1024)
HORIZONS = (4, 16, 64)
RECIPES = ("pi0-tiny", "acot-tiny", "halo-tiny")
TARGET_BOOKKEEPING = 0.15
TARGET_DECODE_FLATNESS = 0.20


# ---------------------------------------------------------------------------------------------- instrumentation
class Bookkeeping:
    """Times the outermost calls of the bookkeeping functions while active (a context manager)."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self.by_name: dict[str, float] = {}
        self._depth = 0
        self._patches: list[tuple[object, str, object]] = []

    def _targets(self):
        layout = importlib.import_module("vla_blocks.layout")
        mot = importlib.import_module("vla_blocks.mot")
        dispatch = importlib.import_module("vla_blocks.attention.dispatch")
        out = [(layout.Layout, "from_samples"), (layout.Layout, "tokens"), (layout.Layout, "mask_meta"),
               (mot.Routing, "from_layout"), (mot, "rope_cos_sin"), (dispatch, "choose_backend")]
        if hasattr(mot, "PassPlan"):
            out.append((mot.PassPlan, "build"))
        return out

    def _wrap(self, fn, name):
        def timed(*a, **kw):
            self._depth += 1
            t0 = time.perf_counter() if self._depth == 1 else None
            try:
                return fn(*a, **kw)
            finally:
                if t0 is not None:
                    dt = time.perf_counter() - t0
                    self.seconds += dt
                    self.calls += 1
                    self.by_name[name] = self.by_name.get(name, 0.0) + dt
                self._depth -= 1
        return timed

    def __enter__(self):
        for owner, name in self._targets():
            raw = inspect.getattr_static(owner, name)
            label = f"{getattr(owner, '__name__', owner)}.{name}".rsplit(".", 2)[-2:]
            label = ".".join(label)
            if isinstance(raw, classmethod):
                new = classmethod(self._wrap(raw.__func__, label))
            elif isinstance(raw, staticmethod):
                new = staticmethod(self._wrap(raw.__func__, label))
            else:
                new = self._wrap(raw, label)
            self._patches.append((owner, name, raw))
            setattr(owner, name, new)
        return self

    def __exit__(self, *exc):
        for owner, name, raw in reversed(self._patches):
            setattr(owner, name, raw)
        self._patches.clear()


def _best_time(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls: the least disturbed by other load on a shared 2-core machine."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ---------------------------------------------------------------------------------------------- measurements
def bookkeeping_share(name: str, repeats: int) -> dict:
    from vla_blocks.model import create_model
    torch.manual_seed(0)
    model = create_model(name).eval()
    batch = model.demo_batch(1, torch.Generator().manual_seed(0))

    def call():
        with torch.no_grad():
            model.demo_inference(batch)

    call()
    wall = _best_time(call, repeats)
    shares = []
    for _ in range(repeats):
        with Bookkeeping() as bk:
            t0 = time.perf_counter()
            call()
            total = time.perf_counter() - t0
        shares.append((bk.seconds / total, bk.calls, total, {k: v / total for k, v in bk.by_name.items()}))
    share, calls, total, by_name = sorted(shares, key=lambda x: x[0])[len(shares) // 2]
    return {"recipe": name, "wall_ms": wall * 1e3, "instrumented_ms": total * 1e3, "bookkeeping_share": share,
            "bookkeeping_calls": calls, "share_by_function": by_name, "target": TARGET_BOOKKEEPING, "meets_target": share <= TARGET_BOOKKEEPING}


def halo_decode(sizes, tokens: int, repeats: int) -> dict:
    from vla_blocks.model import create_model
    from vla_blocks.models.halo import HaloContext
    torch.manual_seed(0)
    model = create_model("halo-tiny", **{"backbone.config.max_position_embeddings": 8192}).eval()
    vocab = model.tokenizer.max_id
    rows = []
    for n in sizes:
        per_token = []
        for _ in range(repeats):
            ctx = HaloContext(model)
            ids = torch.randint(0, vocab, (n - 2,), generator=torch.Generator().manual_seed(n)).tolist()
            with torch.no_grad():
                ctx.extend([model.text_item(ids, "prompt")])
                ctx.grow_text(5)
                ctx.grow_text(6)  # warm-up steps
                t0 = time.perf_counter()
                for i in range(tokens):
                    ctx.grow_text(7 + i % 50)
                per_token.append((time.perf_counter() - t0) / tokens)
        rows.append({"context_tokens": n, "per_token_ms": min(per_token) * 1e3})
    base = rows[0]["per_token_ms"]
    spread = max(abs(r["per_token_ms"] / base - 1) for r in rows)
    return {"rows": rows, "max_deviation_from_smallest": spread, "target": TARGET_DECODE_FLATNESS,
            "meets_target": spread <= TARGET_DECODE_FLATNESS}


def flow_step(repeats: int, prompts=PROMPT_LENGTHS, horizons=HORIZONS) -> dict:
    from vla_blocks.model import create_model

    def step_ms(**overrides) -> float:
        torch.manual_seed(0)
        model = create_model("pi05-tiny", **overrides).eval()
        batch = model.demo_batch(1, torch.Generator().manual_seed(0))
        g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        with torch.no_grad():
            model.sample_actions(batch, generator=g(), num_steps=2)
            many = _best_time(lambda: model.sample_actions(batch, generator=g(), num_steps=11), repeats)
            one = _best_time(lambda: model.sample_actions(batch, generator=g(), num_steps=1), repeats)
        return max(many - one, 0.0) / 10 * 1e3

    H0 = horizons[0]
    by_prompt = [{"prompt_tokens": L, "horizon": H0, "step_ms": step_ms(max_token_len=L, action_horizon=H0,
                                                                       **{"backbone.config.max_position_embeddings": 4096})}
                 for L in prompts]
    by_horizon = [{"prompt_tokens": prompts[0], "horizon": H, "step_ms": step_ms(max_token_len=prompts[0], action_horizon=H)}
                  for H in horizons]
    return {"by_prompt": by_prompt, "by_horizon": by_horizon}


# ---------------------------------------------------------------------------------------------- suite
def settings(ctx) -> dict:
    """The suite's ``--set`` options: ``baseline=PATH.json`` (this suite's results on an earlier checkout)."""
    options = getattr(ctx, "options", {}) or {}
    return {"baseline": options.get("baseline")}


def run(ctx) -> dict:
    torch.set_num_threads(1)
    smoke = getattr(ctx, "smoke", False)
    options = settings(ctx)
    repeats = 3 if smoke else 9
    recipes = ("pi0-tiny",) if smoke else RECIPES
    out = {"bookkeeping": [bookkeeping_share(r, repeats) for r in recipes]}
    out["halo_decode"] = halo_decode((40, 120) if smoke else CONTEXT_SIZES, 4 if smoke else 64, 1 if smoke else 5)
    out["flow_step"] = flow_step(repeats, (8, 32) if smoke else PROMPT_LENGTHS, (4, 8) if smoke else HORIZONS)
    if options.get("baseline"):  # the same measurements on an earlier checkout (python benchmarks/composition.py)
        import json
        from pathlib import Path
        out["baseline"] = json.loads(Path(options["baseline"]).read_text())
    out["notes"] = ["one torch thread", "bookkeeping = outermost calls of layout/routing/mask-meta/RoPE/backend "
                    "choice (and PassPlan.build) inside the same instrumented call"]
    return out


def summary_markdown(payload: dict) -> str:
    from vla_blocks.bench import md_table
    base = payload.get("baseline") or {}
    old = {r["recipe"]: r for r in base.get("bookkeeping", [])}
    rows = []
    for r in payload["bookkeeping"]:
        o = old.get(r["recipe"])
        before = f"{o['wall_ms']:.1f} ms, {100 * o['bookkeeping_share']:.1f}%" if o else "–"
        rows.append([r["recipe"], before, f"{r['wall_ms']:.1f}", f"{100 * r['bookkeeping_share']:.1f}%",
                     "yes" if r["meets_target"] else "no"])
    t1 = md_table(["recipe (inference)", "before (wall, bookkeeping)", "wall ms", "bookkeeping share",
                   f"≤ {100 * TARGET_BOOKKEEPING:.0f}%"], rows)
    d = payload["halo_decode"]
    drows = [["decode ms / token"] + [f"{r['per_token_ms']:.2f}" for r in d["rows"]]]
    if base.get("halo_decode"):
        drows.insert(0, ["before"] + [f"{r['per_token_ms']:.2f}" for r in base["halo_decode"]["rows"]])
    t2 = md_table(["HALO context tokens"] + [str(r["context_tokens"]) for r in d["rows"]], drows)
    return (t1 + "\n\n" + t2 + f"\n\nDecode cost deviates at most {100 * d['max_deviation_from_smallest']:.0f}% from "
            f"the smallest context (target ±{100 * TARGET_DECODE_FLATNESS:.0f}%).")


def render_markdown(payload: dict) -> str:
    from vla_blocks.bench import header_markdown, md_table
    f = payload["flow_step"]
    t3 = md_table(["prompt tokens", "chunk", "flow step ms"],
                  [[str(r["prompt_tokens"]), str(r["horizon"]), f"{r['step_ms']:.2f}"]
                   for r in f["by_prompt"] + f["by_horizon"]])
    base = payload.get("baseline")
    before = f"\n\n'before' columns: the same code on the checkout before the change ({base['label']})." \
        if base and base.get("label") else ""
    return (header_markdown(payload) + "\n\n" + summary_markdown(payload) + before + "\n\n## Flow step (pi05-tiny)\n\n" + t3
            + "\n\n" + "\n".join(f"- {n}" for n in payload.get("notes", [])) + "\n")


def plot(payload: dict):
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    bk = payload["bookkeeping"]
    a.bar([r["recipe"] for r in bk], [100 * r["bookkeeping_share"] for r in bk])
    a.axhline(100 * TARGET_BOOKKEEPING, color="k", ls="--", lw=1)
    a.set_ylabel("bookkeeping % of inference")
    d = payload["halo_decode"]["rows"]
    b.plot([r["context_tokens"] for r in d], [r["per_token_ms"] for r in d], marker="o")
    b.set_xlabel("HALO context tokens")
    b.set_ylabel("decode ms / token")
    b.set_ylim(bottom=0)
    fig.tight_layout()
    return fig


if __name__ == "__main__":  # measure any checkout with the same code: python benchmarks/composition.py OUT.json
    import json

    class _Ctx:
        smoke = "--smoke" in sys.argv

    text = json.dumps(run(_Ctx()), indent=1)
    path = next((a for a in sys.argv[1:] if not a.startswith("--")), None)
    if path is None:
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")
