"""Training-engine benchmark: the engine's own overhead per optimizer step against the model's forward+backward.

For ``acot-tiny`` (and ``pi0-tiny``), batch 8, fp32, one batch reused (data wait excluded), timed call by call in
turn (A B, B A, ...):

- ``fwd_bwd``: ``loss, _ = model(batch); loss.backward()`` (gradients set to None before each call);
- ``fwd_bwd_adamw``: the same plus ``AdamW.step()`` and ``zero_grad`` (the update any loop pays);
- ``engine``: ``Trainer.train_step([batch])``: the schedule, forward+backward, the global grad norm, clipping,
  AdamW, ``zero_grad`` and the metric bookkeeping;
- ``engine_ema``: the same with EMA on.

Engine overhead = ``engine − fwd_bwd_adamw`` (what the engine adds to a hand-written loop), as a fraction of
``fwd_bwd``; target ≤ 5 %. ``engine − fwd_bwd`` (overhead including the optimizer) is reported too.
Run ``vla-blocks bench train [--smoke]``.
"""

from __future__ import annotations

import torch

from vla_blocks.bench import fmt_num, header_markdown, md_table

TARGET = 0.05


def settings(ctx) -> dict:
    return dict(recipes=["acot-tiny"] if ctx.smoke else ["acot-tiny", "pi0-tiny"], batch=8)


def _measure(ctx, recipe: str, batch_size: int) -> dict:
    from vla_blocks import create_model
    from vla_blocks.train import Trainer, TrainConfig
    from vla_blocks.train.config import EMAConfig, LogConfig
    torch.manual_seed(0)
    model = create_model(recipe)
    batch = model.demo_batch(batch_size=batch_size, generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-10)
    cfg = TrainConfig(steps=10**9, batch_size=batch_size, log=LogConfig(progress="none", tensorboard=False))
    tr = Trainer(model, cfg, [])
    cfg_ema = TrainConfig(steps=10**9, batch_size=batch_size, ema=EMAConfig(decay=0.99),
                          log=LogConfig(progress="none", tensorboard=False))
    tr_ema = Trainer(model, cfg_ema, [])
    model.train()

    def fwd_bwd():
        loss, _ = model(batch)
        loss.backward()

    def fwd_bwd_adamw():
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def engine():
        tr.train_step([batch])

    def engine_ema():
        tr_ema.train_step([batch])

    t = ctx.time_interleaved({"fwd_bwd": fwd_bwd, "fwd_bwd_adamw": fwd_bwd_adamw, "engine": engine,
                              "engine_ema": engine_ema}, grad_to_none=params, min_reps=40, max_reps=120, min_time_s=8.0,
                              max_time_s=90)
    fb = t["fwd_bwd"]["median_ms"]
    over = t["engine"]["median_ms"] - t["fwd_bwd_adamw"]["median_ms"]
    ctx.log(f"[train] {recipe}: fwd+bwd {fb:.2f} ms, +AdamW {t['fwd_bwd_adamw']['median_ms']:.2f} ms, engine "
            f"{t['engine']['median_ms']:.2f} ms (overhead {100 * over / fb:.1f}% of fwd+bwd), engine+EMA "
            f"{t['engine_ema']['median_ms']:.2f} ms")
    return {"recipe": recipe, "batch": batch_size, "params": model.num_parameters(), "timings": t,
            "fwd_bwd_ms": fb, "engine_overhead_ms": over, "engine_overhead_fraction": over / fb,
            "engine_minus_fwd_bwd_fraction": (t["engine"]["median_ms"] - fb) / fb,
            "ema_ms": t["engine_ema"]["median_ms"] - t["engine"]["median_ms"],
            "target": TARGET, "met": over / fb <= TARGET}


def run(ctx) -> dict:
    s = settings(ctx)
    return {"settings": s, "results": [_measure(ctx, r, s["batch"]) for r in s["recipes"]]}


def summary_markdown(payload: dict) -> str:
    rows = []
    for r in payload["results"]:
        t = r["timings"]
        rows.append([r["recipe"], r["batch"], fmt_num(r["fwd_bwd_ms"]), fmt_num(t["fwd_bwd_adamw"]["median_ms"]),
                     fmt_num(t["engine"]["median_ms"]), fmt_num(t["engine_ema"]["median_ms"]),
                     f"{100 * r['engine_overhead_fraction']:.1f}%",
                     f"{'met' if r['met'] else 'not met'} (≤ {100 * r['target']:.0f}%)"])
    return md_table(["recipe", "batch", "fwd+bwd ms", "+AdamW ms", "engine step ms", "engine+EMA ms",
                     "engine overhead / fwd+bwd", "target"], rows)


def render_markdown(payload: dict) -> str:
    return header_markdown(payload) + "\n\n" + summary_markdown(payload) + "\n"


def plot(payload: dict):
    return None
