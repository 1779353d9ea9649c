"""A synthetic rollout traced end to end: ``python docs/trace_demo.py OUT [--screenshot PNG]``.

A red block slides across a grey table for ``--steps`` steps; ``acot-tiny`` (random weights) is called every
``--every`` steps on the current frame through :func:`vla_blocks.trace.recording`, and the episode
(frames, executed actions, policy traces, success) goes through :class:`vla_blocks.trace.TraceRecorder` into
``OUT/episode_0000``. View it with ``vla-blocks trace view OUT/episode_0000``. ``--screenshot`` also renders the
report and photographs it in headless Chromium (Playwright), as the README's picture was made.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import vla_blocks
from vla_blocks.trace import TraceRecorder, recording
from vla_blocks.trace.view import render_html, screenshot


def frame(step: int, size: int = 96) -> np.ndarray:
    img = np.full((size, size, 3), 150, np.uint8)
    img[size * 2 // 3:, :] = (110, 90, 70)  # table edge
    x = 8 + step * 10
    img[40:58, x:x + 18] = (210, 40, 40)
    img[30:70, 74:78] = (40, 160, 60)  # the goal post
    return img


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--screenshot", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = vla_blocks.create_model("acot-tiny").eval()
    batch = model.demo_batch(1, generator=torch.Generator().manual_seed(0))
    rec = TraceRecorder(args.out, mode="all")
    rec.start_episode(task="push the red block to the green post", env="synthetic", policy="acot-tiny")
    chunk, start = None, 0
    for i in range(args.steps):
        img = frame(i)
        policy = None
        if i % args.every == 0:
            cam = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0  # float images in [0, 1]
            batch["images"] = cam[None, None].repeat(1, model.config.num_cameras, 1, 1, 1)
            with recording(model) as r:
                chunk = model.predict_action_chunk(batch)[0]
            policy, start = r.traces()[0], i
        rec.record_step({"corner": img}, action=chunk[i - start], policy=policy, reward=float(i == args.steps - 1),
                        success=i == args.steps - 1)
    path = rec.end_episode(success=True)
    print(f"wrote {path}")
    if args.screenshot:
        html = Path(args.out) / "report.html"
        html.write_text(render_html(vla_blocks.trace.load(path)))
        screenshot(html, args.screenshot)
        print(f"wrote {args.screenshot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
