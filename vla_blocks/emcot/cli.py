"""``vla-blocks annotate DATASET``: HALO's EM-CoT stages A–C over a LeRobotDataset, into ``DATASET/meta/emcot``.

    vla-blocks annotate DATA --state-layout layout.json --annotator rules --templates phases.yaml
    vla-blocks annotate DATA --state-layout layout.json --annotator openai --base-url http://localhost:8000/v1 \\
        --model Qwen/Qwen3-VL-30B-A3B-Instruct-FP8 --camera observation.images.top --concurrency 8

Prints a summary (episodes, subtasks per episode, cache hits, failures with their reasons) and exits with 1 when
an episode failed (the others are written; failures are listed in the summary and in ``meta/emcot/info.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

import numpy as np

from .annotators import AnnotationCache, EpisodeInput, OpenAIAnnotator, RulesAnnotator, annotate_episodes
from .primitives import PrimitiveConfig, StateLayout
from .samples import SIDECAR_DIR, frame_samples, write_sidecar


def add_arguments(p: argparse.ArgumentParser):
    """Options of ``vla-blocks annotate``."""
    p.add_argument("dataset", help="LeRobotDataset folder (or local-dir:path / hf-hub:org/name)")
    p.add_argument("--state-layout", required=True, metavar="JSON|FILE",
                   help='arms in the state vector: {"left": {"xyz": [0,1,2], "gripper": 6, "gripper_closed": 0, '
                        '"gripper_open": 1}, "right": {...}, "key": "observation.state"} inline or a .json/.yaml file')
    p.add_argument("--annotator", choices=["openai", "rules"], default="rules")
    p.add_argument("--templates", metavar="FILE", help="rules: YAML/JSON {task or '*': [subtask, ...]}")
    p.add_argument("--base-url", help="openai: chat-completions endpoint base, e.g. http://localhost:8000/v1")
    p.add_argument("--model", help="openai: model name served at --base-url")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: environment variable with the API key")
    p.add_argument("--camera", help="openai: camera feature whose frames are sent (default: the first camera)")
    p.add_argument("--max-images", type=int, default=16, help="openai: frames per call, evenly sub-sampled")
    p.add_argument("--scene", action="store_true", help="openai: also ask for a scene description (call 3)")
    p.add_argument("--max-retries", type=int, default=5, help="openai: HTTP retries per request")
    p.add_argument("--concurrency", type=int, default=4, help="episodes annotated at once")
    p.add_argument("--cache", help=f"cache folder (default: DATASET/{SIDECAR_DIR}/cache)")
    p.add_argument("--episodes", type=int, nargs="*", help="episode indices (default: all)")
    p.add_argument("--plan-mode", choices=["remaining", "full"], default="remaining",
                   help="plan in the thought: the subtasks from the current one on, or all")
    p.add_argument("--moving-key", help="feature whose first change (> 1e-2) starts the training frames "
                                        "(default: the state-layout key)")
    p.add_argument("--primitive", nargs="*", default=[], metavar="KEY=VALUE",
                   help="stage-A thresholds, e.g. velocity_threshold=0.005 min_idle_frames=4")
    p.add_argument("--no-progress", action="store_true")


def _load_mapping(text: str, what: str) -> dict:
    path = Path(text)
    if path.suffix in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"{what}: {path} does not exist")
        text = path.read_text()
        if path.suffix != ".json":
            import yaml
            out = yaml.safe_load(text)
            if not isinstance(out, dict):
                raise ValueError(f"{what}: {path} must hold a mapping")
            return out
    try:
        out = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: not JSON and not a .json/.yaml file ({e.msg})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{what}: must be a JSON object")
    return out


def _primitive_config(items) -> PrimitiveConfig:
    kv = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--primitive {it!r}: expected KEY=VALUE")
        k, v = it.split("=", 1)
        kv[k] = v if k == "unknown_sentence" else (int(v) if k == "min_idle_frames" else float(v))
    return PrimitiveConfig.from_mapping(kv)


_READ_LOCK = threading.Lock()


def _locked_frame(ds, i: int, camera: str):
    # annotators run episodes on worker threads; the reader's decoded-file cache is not thread-safe
    with _READ_LOCK:
        return ds[i][camera]


def load_episodes(ds, layout: StateLayout, moving_key: str, camera: str | None, frames_ds=None):
    """(EpisodeInput, moving states, global start index) per episode of ``ds`` (a LeRobotDataset without video
    decoding); ``frames_ds`` (with video) provides ``frame(t)`` of ``camera``."""
    meta = ds.meta
    for key in {layout.key, moving_key}:
        if key not in meta.features:
            raise KeyError(f"{ds.root}: no feature {key!r} (features: {list(meta.features)})")
    eps = meta.episodes
    starts = {int(e): int(a) for e, a in zip(eps["episode_index"], eps["dataset_from_index"])}
    position = 0
    for e, cols in zip(ds.episodes, ds.iter_columns([layout.key, moving_key], batch_rows=1 << 40)):
        states = np.asarray(cols[layout.key], dtype=np.float64).reshape(len(cols[layout.key]), -1)
        moving = np.asarray(cols[moving_key], dtype=np.float64).reshape(len(states), -1)
        task = ds[position]["task"]
        frame = None
        if frames_ds is not None and camera is not None:
            frame = (lambda base: (lambda t: _locked_frame(frames_ds, base + t, camera)))(position)
        yield EpisodeInput(int(e), task, float(meta.fps), states, frame=frame), moving, starts[int(e)]
        position += len(states)


def run(args) -> int:
    """``vla-blocks annotate``: primitives, subtask annotation (rules or an OpenAI-compatible VLM) and subgoals of a
    dataset, written to its ``meta/emcot`` sidecar."""
    from ..data import LeRobotDataset
    layout = StateLayout.from_mapping(_load_mapping(args.state_layout, "--state-layout"))
    cfg = _primitive_config(args.primitive)
    ds = LeRobotDataset(args.dataset, episodes=args.episodes, decode_video=False)
    camera = None
    frames_ds = None
    if args.annotator == "openai":
        if not args.base_url or not args.model:
            raise ValueError("--annotator openai needs --base-url and --model")
        cams = ds.meta.camera_keys
        camera = args.camera or (cams[0] if cams else None)
        if camera is not None and camera not in cams:
            raise KeyError(f"--camera {camera!r} is not a camera of {ds.root} ({cams})")
        frames_ds = LeRobotDataset(args.dataset, episodes=args.episodes) if camera else None
        annotator = OpenAIAnnotator(args.base_url, args.model, api_key_env=args.api_key_env,
                                    max_images=args.max_images, scene=args.scene, max_retries=args.max_retries)
    else:
        templates = _load_mapping(args.templates, "--templates") if args.templates else None
        annotator = RulesAnnotator(templates)
    moving_key = args.moving_key or layout.key
    episodes, moving, starts = [], {}, {}
    for ep, mv, start in load_episodes(ds, layout, moving_key, camera, frames_ds):
        episodes.append(ep.with_primitives(layout, cfg))
        moving[ep.episode_index], starts[ep.episode_index] = mv, start
    cache = AnnotationCache(args.cache or Path(ds.root) / SIDECAR_DIR / "cache")
    result = annotate_episodes(episodes, annotator, cache, concurrency=args.concurrency,
                               progress=not args.no_progress, num_episodes=len(episodes))
    frames, kept = [], []
    by_index = {ep.episode_index: ep for ep in episodes}
    for idx in sorted(result.annotations):
        ann = result.annotations[idx]
        frames += frame_samples(ann, by_index[idx].primitives, moving[idx], args.plan_mode, starts[idx])
        kept.append(ann)
    summary = result.summary()
    summary["frames"] = len(frames)
    summary["training_frames"] = sum(f.train for f in frames)
    if hasattr(annotator, "stats"):
        summary["requests"] = dict(annotator.stats)
    info = {"annotator": annotator.identity(), "primitive_config": cfg.to_dict(), "state_layout": layout.to_dict(),
            "plan_mode": args.plan_mode, "moving_key": moving_key, "camera": camera, "summary": summary,
            "failures": summary["failures"]}
    folder = write_sidecar(ds.root, kept, frames, info)
    spe = summary["subtasks_per_episode"]
    print(f"annotate ({annotator.name}): {summary['annotated']}/{summary['episodes']} episodes annotated, "
          f"{summary['cache_hits']} from the cache, {summary['failed']} failed")
    if spe:
        print(f"  subtasks per episode: min {spe['min']}, mean {spe['mean']}, max {spe['max']}")
    print(f"  frames: {summary['frames']} ({summary['training_frames']} training frames) -> {folder}")
    if "requests" in summary:
        r = summary["requests"]
        print(f"  requests: {r['requests']} ({r['http_retries']} HTTP retries, {r['repairs']} repair rounds)")
    for e, why in summary["failures"].items():
        print(f"  FAILED episode {e}: {why}", file=sys.stderr)
    return 1 if summary["failed"] else 0
