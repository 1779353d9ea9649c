"""``vla-blocks stats DATASET``: normalisation statistics of a LeRobotDataset (the CLI of :mod:`.stats`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .dataset import LeRobotDataset
from .stats import HIST_BINS, compute_dataset_stats, stats_to_json, to_openpi


def add_arguments(p: argparse.ArgumentParser):
    """Options of ``vla-blocks stats``."""
    p.add_argument("dataset", help="dataset folder, local-dir:PATH or hf-hub:ORG/NAME[@REV]")
    p.add_argument("--out", default="normalization.json", help="output file (default: normalization.json)")
    p.add_argument("--format", choices=("lerobot", "openpi"), default="lerobot",
                   help="lerobot: stats.json layout for every numeric feature; openpi: norm_stats.json (state/actions)")
    p.add_argument("--keys", default=None, help="comma-separated features (default: every numeric feature)")
    p.add_argument("--episodes", default=None, help="comma-separated episode indices (default: all)")
    p.add_argument("--bins", type=int, default=HIST_BINS, help="histogram bins per dimension (quantile error ≤ range/bins)")


def run(args) -> int:
    """``vla-blocks stats``: compute a dataset's normalisation statistics and write them (lerobot or openpi layout)."""
    episodes = [int(e) for e in args.episodes.split(",")] if args.episodes else None
    ds = LeRobotDataset(args.dataset, episodes=episodes, decode_video=False)
    keys = args.keys.split(",") if args.keys else None
    st = compute_dataset_stats(ds, keys, bins=args.bins)
    data = to_openpi(st) if args.format == "openpi" else stats_to_json(st)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(out)
    n = int(next(iter(st.values()))["count"][0]) if st else 0
    print(f"{len(st)} features over {n} frames -> {out}")
    return 0
