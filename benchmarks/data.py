"""Data-loader benchmark: samples/s of ``LeRobotDataset`` + ``DataLoader`` on a 96×96 two-camera video dataset,
and whether the loader keeps a tiny-recipe training loop fed.

1. **Loader**: a generated v3.0 dataset (two AV1 cameras of 96×96, 8-d state, 7-d actions, 10 fps), read with
   the action chunk of ``pi0-tiny`` (``delta_timestamps``), batch 8, with 0 and 2 workers (shuffled by
   ``ShuffleSampler``), frames collated by torch's default collate. samples/s = samples / wall time after one warm-up batch.
2. **Training loop**: ``pi0-tiny`` forward + backward + AdamW on batches from the 2-worker loader whose collate
   function is the processor (so images are resized and prompts tokenised in the workers); data wait = time
   blocked on the loader over the whole step time. Target ≤ 10 %.

Run ``vla-blocks bench data [--smoke]``.
"""

from __future__ import annotations

import shutil
import tempfile
import time

import numpy as np
import torch

from vla_blocks.bench import fmt_num, header_markdown, md_table

TARGET_WAIT = 0.10


def settings(ctx) -> dict:
    if ctx.smoke:
        return dict(episodes=2, length=20, batch=4, batches=3, workers=[0, 2], steps=3, size=96)
    return dict(episodes=10, length=100, batch=8, batches=40, workers=[0, 2], steps=30, size=96)


def make_dataset(root, s) -> None:
    from vla_blocks.data import LeRobotDataset
    size = s["size"]
    feats = {f"observation.images.{c}": {"dtype": "video", "shape": [size, size, 3], "names": ["height", "width", "channels"]}
             for c in ("top", "wrist")}
    feats["observation.state"] = {"dtype": "float32", "shape": [8], "names": None}
    feats["action"] = {"dtype": "float32", "shape": [7], "names": None}
    rng = np.random.default_rng(0)
    w = LeRobotDataset.create(root, fps=10, features=feats)
    for e in range(s["episodes"]):
        for i in range(s["length"]):
            img = np.full((size, size, 3), 30 + 20 * e, np.uint8)
            y, x = (i * 3) % (size - 16), (i * 5) % (size - 16)
            img[y:y + 16, x:x + 16] = 255
            w.add_frame({"observation.images.top": img, "observation.images.wrist": img[::-1].copy(),
                         "observation.state": rng.normal(size=8).astype(np.float32),
                         "action": rng.normal(size=7).astype(np.float32), "task": f"task {e % 3}"})
        w.save_episode()
    w.finalize()


def _loader(ds, batch, workers, seed=0, proc=None):
    """Batches of frames, or, with ``proc`` as the collate function, model batches made in the workers."""
    from vla_blocks.data import ShuffleSampler
    return torch.utils.data.DataLoader(ds, batch_size=batch, sampler=ShuffleSampler(ds, seed=seed), num_workers=workers,
                                       persistent_workers=False, drop_last=True, collate_fn=proc)


def run(ctx) -> dict:
    import vla_blocks
    from vla_blocks.data import LeRobotDataset, make_processor
    from vla_blocks.data.stats import compute_dataset_stats
    s = settings(ctx)
    tmp = tempfile.mkdtemp(prefix="vla-blocks-bench-data-")
    root = f"{tmp}/ds"
    t0 = time.perf_counter()
    make_dataset(root, s)
    write_s = time.perf_counter() - t0
    frames = s["episodes"] * s["length"]
    ctx.log(f"[data] wrote {frames} frames in {write_s:.1f}s")
    model = vla_blocks.create_model("pi0-tiny")
    meta_ds = LeRobotDataset(root, decode_video=False)
    proc = make_processor(model, meta_ds.meta, stats=compute_dataset_stats(meta_ds))
    ds = LeRobotDataset(root, delta_timestamps=proc.delta_timestamps(10))
    loader_rows = []
    for workers in s["workers"]:
        it = iter(_loader(ds, s["batch"], workers))
        next(it)  # warm-up (workers start, first files open)
        t0 = time.perf_counter()
        n = 0
        for _ in range(s["batches"]):
            b = next(it, None)
            if b is None:
                it = iter(_loader(ds, s["batch"], workers, seed=1))
                b = next(it)
            n += len(b["task"])
        dt = time.perf_counter() - t0
        loader_rows.append({"workers": workers, "batch": s["batch"], "samples": n, "seconds": dt,
                            "samples_per_s": n / dt})
        ctx.log(f"[data] workers={workers}: {n / dt:.1f} samples/s")
    # training loop fed by the 2-worker loader
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    it = iter(_loader(ds, s["batch"], max(s["workers"]), seed=2, proc=proc))
    batch = next(it)  # warm-up
    model(batch)[0].backward()
    opt.step()
    opt.zero_grad()
    wait = total = 0.0
    steps = 0
    for _ in range(s["steps"]):
        t0 = time.perf_counter()
        batch = next(it, None)
        if batch is None:
            it = iter(_loader(ds, s["batch"], max(s["workers"]), seed=3 + steps, proc=proc))
            batch = next(it)
        t1 = time.perf_counter()
        loss, _ = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        t2 = time.perf_counter()
        wait += t1 - t0
        total += t2 - t0
        steps += 1
    train = {"recipe": "pi0-tiny", "workers": max(s["workers"]), "batch": s["batch"], "steps": steps,
             "step_ms": total / steps * 1e3, "data_wait_ms": wait / steps * 1e3, "data_wait_fraction": wait / total,
             "target": TARGET_WAIT, "met": wait / total <= TARGET_WAIT}
    ctx.log(f"[data] train step {train['step_ms']:.1f} ms, data wait {100 * train['data_wait_fraction']:.1f}%")
    del it
    shutil.rmtree(tmp, ignore_errors=True)
    return {"settings": s, "dataset": {"frames": frames, "cameras": 2, "size": s["size"], "write_s": write_s,
                                       "codec": ds.meta.features["observation.images.top"]["info"]["video.codec"]},
            "loader": loader_rows, "train": train}


def summary_markdown(payload: dict) -> str:
    rows = [[r["workers"], r["batch"], fmt_num(r["samples_per_s"])] for r in payload["loader"]]
    t = payload["train"]
    return (md_table(["workers", "batch", "samples/s"], rows) + "\n\n"
            f"{t['recipe']} training loop (batch {t['batch']}, {t['workers']} workers): step {t['step_ms']:.1f} ms, "
            f"data wait {t['data_wait_ms']:.1f} ms = {100 * t['data_wait_fraction']:.1f}% "
            f"(target ≤ {100 * t['target']:.0f}%: {'met' if t['met'] else 'not met'})")


def render_markdown(payload: dict) -> str:
    d = payload["dataset"]
    return (header_markdown(payload) + "\n\n"
            f"Dataset: {d['frames']} frames, {d['cameras']} {d['codec']} cameras of {d['size']}×{d['size']} "
            f"(written in {d['write_s']:.1f} s).\n\n" + summary_markdown(payload) + "\n")


def plot(payload: dict):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4, 3))
    rows = payload["loader"]
    ax.bar([str(r["workers"]) for r in rows], [r["samples_per_s"] for r in rows])
    ax.set_xlabel("DataLoader workers")
    ax.set_ylabel("samples/s")
    ax.set_title("LeRobotDataset loader (96×96, 2 video cameras)")
    fig.tight_layout()
    return fig
