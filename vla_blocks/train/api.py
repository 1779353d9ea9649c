"""``vla_blocks.train.train(...)`` and ``vla-blocks train RECIPE [KEY=VALUE ...]``.

``RECIPE`` is a train recipe (``recipes/train/NAME.yaml``, a path) or a model recipe (default train section).
With a ``data:`` section the run reads a LeRobotDataset through the model's processor (``vla_blocks.data``);
without one it trains on ``model.demo_batch`` batches (a smoke run). The run folder (``--output-dir``,
``train.output_dir`` or ``runs/<recipe>``) holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and ``final/``
(``save_pretrained`` + processor). ``--resume`` continues from the newest loadable checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from ..errors import ConfigError
from .config import TrainRecipe, load_train_recipe
from .data import DatasetBatches, DemoBatches
from .engine import Trainer, TrainResult


class _Sequential:
    """Held-out batches in order (re-iterable; the same batches at every validation)."""

    def __init__(self, dataset, batch_size: int, collate, limit: int):
        self.dataset, self.batch_size, self.collate, self.limit = dataset, batch_size, collate, limit

    def __iter__(self):
        n = len(self.dataset)
        for b in range(min(self.limit, -(-n // self.batch_size))):
            rows = range(b * self.batch_size, min(n, (b + 1) * self.batch_size))
            yield self.collate([self.dataset[i] for i in rows])


def _stats(d, train_eps: list[int]):
    """The statistics ``data.stats`` names (None: the dataset's own, which make_processor reads from its meta)."""
    if d.stats == "dataset":
        return None
    from ..data import LeRobotDataset
    from ..data.stats import compute_dataset_stats, from_openpi, stats_from_json
    if d.stats == "compute":
        return compute_dataset_stats(LeRobotDataset(d.root, episodes=train_eps, decode_video=False))
    path = Path(d.stats)
    if not path.is_file():
        raise FileNotFoundError(f"data.stats: {d.stats!r} is neither 'dataset', 'compute' nor a statistics JSON file")
    import json
    raw = json.loads(path.read_text())
    return from_openpi(raw) if "norm_stats" in raw else stats_from_json(raw)


def build_data(recipe: TrainRecipe, model, rank: int = 0, world_size: int = 1):
    """``(train batches, validation batches or None, processor)`` for the recipe's ``data:`` section."""
    from ..data import LeRobotDataset, make_processor
    d, t = recipe.data, recipe.train
    if not d.root:
        raise ConfigError("data.root: the recipe names no dataset; give one, e.g. `vla-blocks train RECIPE "
                          "data.root=DIR`", key="data.root")
    probe = LeRobotDataset(d.root, decode_video=False)
    meta = probe.meta
    n_ep = int(meta.info["total_episodes"])
    bad = [e for e in list(d.val_episodes) + list(d.episodes or []) if not 0 <= e < n_ep]
    if bad:
        raise ValueError(f"data.episodes/val_episodes: episodes {bad} do not exist in {d.root} ({n_ep} episodes)")
    train_eps = list(d.episodes) if d.episodes is not None else [e for e in range(n_ep) if e not in set(d.val_episodes)]
    stats = _stats(d, train_eps)
    proc = make_processor(model, meta, stats=stats, camera_map=d.camera_map)
    if d.emcot:
        return _emcot_data(recipe, model, proc, probe.root, meta, stats, train_eps, rank, world_size)
    delta = d.delta_timestamps or proc.delta_timestamps(fps=meta.fps)
    ds = LeRobotDataset(d.root, delta_timestamps=delta, episodes=train_eps)
    proc.train()
    data = DatasetBatches(ds, t.batch_size, proc, seed=t.seed, shuffle=d.shuffle, rank=rank, world_size=world_size,
                          drop_last=d.drop_last, num_workers=d.num_workers)
    val = None
    if d.val_episodes:
        vproc = make_processor(model, meta, stats=stats, camera_map=d.camera_map).eval()
        vds = LeRobotDataset(d.root, delta_timestamps=delta, episodes=list(d.val_episodes))
        val = _Sequential(vds, t.batch_size, vproc, t.validation.batches)
    return data, val, proc


class _Subset(torch.utils.data.Dataset):
    def __init__(self, ds, rows):
        self.ds, self.rows = ds, list(rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.ds[self.rows[i]]


def _emcot_data(recipe: TrainRecipe, model, proc, root, meta, stats, train_eps, rank, world_size):
    """``data.emcot: true``: HALO's EM-CoT samples (``EmcotHaloDataset`` over the ``meta/emcot`` sidecar) of the
    training / validation episodes through :meth:`PolicyProcessor.halo_collate`."""
    from ..data import make_processor
    from ..emcot.halo_data import EmcotHaloDataset
    from ..emcot.samples import SIDECAR_DIR
    d, t = recipe.data, recipe.train
    if proc.config.policy != "halo":
        raise ValueError(f"data.emcot: EM-CoT samples train HALO only (this recipe's model is {proc.config.policy})")
    if d.delta_timestamps is not None:
        raise ValueError("data.emcot: delta_timestamps are not used (the history and chunk come from the model)")
    side = Path(root) / SIDECAR_DIR
    if not (side / "info.json").is_file():
        raise FileNotFoundError(f"data.emcot: {side} has no EM-CoT annotations (run vla-blocks annotate "
                                f"{d.root} first)")
    c = proc.config
    full = EmcotHaloDataset(root, camera=c.cameras[0], history=c.history_frames, chunk_size=c.chunk_length,
                            action_key=c.action_key)
    by_ep: dict[int, list[int]] = {}
    for i, (e, _, _) in enumerate(full.items):
        by_ep.setdefault(int(e), []).append(i)
    train_rows = [i for e in train_eps for i in by_ep.get(e, [])]
    if not train_rows:
        raise ValueError(f"data.emcot: no annotated training frames in episodes {train_eps} of {d.root}")
    proc.train()
    data = DatasetBatches(_Subset(full, train_rows), t.batch_size, proc.halo_collate, seed=t.seed,
                          shuffle=d.shuffle, rank=rank, world_size=world_size, drop_last=d.drop_last,
                          num_workers=d.num_workers)
    val = None
    if d.val_episodes:
        vproc = make_processor(model, meta, stats=stats, camera_map=d.camera_map).eval()
        rows = [i for e in d.val_episodes for i in by_ep.get(e, [])]
        val = _Sequential(_Subset(full, rows), t.batch_size, vproc.halo_collate, t.validation.batches)
    return data, val, proc


def train(ref: str | dict, overrides: dict | list[str] | None = None, *, output_dir: str | os.PathLike | None = None,
          resume: bool | str = False, data: Iterable | None = None, val_data: Iterable | None = None,
          model=None) -> TrainResult:
    """Train a recipe (see the module docstring). ``data``/``val_data``/``model`` replace what the recipe builds."""
    recipe = load_train_recipe(ref, overrides)
    t = recipe.train
    run_dir = Path(output_dir or t.output_dir or Path("runs") / (Path(str(ref)).stem if isinstance(ref, str) else "run"))
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    if model is None:
        model = recipe.model.build()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    proc = None
    if data is None:
        if recipe.data is not None:
            data, val, proc = build_data(recipe, model, rank, world)
            val_data = val if val_data is None else val_data
        else:
            data = DemoBatches(model, t.batch_size * world, seed=t.seed, rank=rank, world_size=world)
    tr = Trainer(model, t, data, run_dir=run_dir, val_data=val_data, processor=proc, config_dict=recipe.to_dict())
    try:
        return tr.fit(resume=resume)
    finally:
        tr.close()


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p):
    """Options of ``vla-blocks train RECIPE [KEY=VALUE ...]``."""
    p.add_argument("recipe", help="train recipe (recipes/train/NAME, a path) or model recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. train.steps=500 train.optimizer.lr=1e-4 data.root=./ds")
    p.add_argument("--output-dir", "-o", help="run folder (default: train.output_dir or runs/<recipe>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest loadable checkpoint of the run")


def run(args) -> int:
    """``vla-blocks train``: resolve the train recipe with the overrides, train, print where the run folder is; exit status."""
    res = train(args.recipe, args.overrides, output_dir=args.output_dir, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        last = res.history[-1] if res.history else {}
        print(f"trained {res.step} steps; final loss {last.get('loss', float('nan')):.4f}; run folder {res.run_dir}; "
              f"model {res.final_dir}")
    return 0


__all__ = ["train", "build_data", "add_arguments", "run"]


# ---------------------------------------------------------------------------------------------- demo
def make_demo_dataset(root, episodes: int = 6, length: int = 20, seed: int = 0) -> str:
    """A small LeRobotDataset (one 32×32 image camera, 8-d state, 7-d actions that follow the state) for demos."""
    import numpy as np

    from ..data import LeRobotDataset
    feats = {"observation.images.top": {"dtype": "image", "shape": [32, 32, 3], "names": ["height", "width", "channels"]},
             "observation.state": {"dtype": "float32", "shape": [8], "names": None},
             "action": {"dtype": "float32", "shape": [7], "names": None}}
    rng = np.random.default_rng(seed)
    w = LeRobotDataset.create(root, fps=10, features=feats)
    for e in range(episodes):
        for t in range(length):
            s = rng.normal(size=8).astype(np.float32)
            img = np.full((32, 32, 3), 30 * e, np.uint8)
            img[:, : 1 + t] = 255
            w.add_frame({"observation.images.top": img, "observation.state": s,
                         "action": (0.5 * s[:7] + 0.05 * t).astype(np.float32), "task": "push the block"})
        w.save_episode()
    w.finalize()
    return str(root)


def demo_training(steps: int = 200, seed: int = 0) -> dict:
    """``vla-blocks demo``'s training run: ``pi0-tiny-demo`` for ``steps`` steps on a generated dataset (random
    demo batches when the data extra is missing), with the progress bar. Returns the first/last logged losses."""
    import tempfile
    tmp = tempfile.mkdtemp(prefix="vla-blocks-demo-train-")
    overrides = [f"train.steps={steps}", f"train.seed={seed}", "train.checkpoint.every=0", "train.log.progress=tqdm",
                 "train.log.tensorboard=false", f"train.schedule.decay_steps={steps}"]
    source = "random demo batches"
    try:
        import av  # noqa: F401
        import pyarrow  # noqa: F401
        overrides += [f"data.root={make_demo_dataset(Path(tmp) / 'dataset', seed=seed)}"]
        source = "a generated LeRobotDataset (6 episodes)"
    except ImportError:
        pass
    res = train("pi0-tiny-demo", overrides, output_dir=Path(tmp) / "run")
    losses = [r["loss"] for r in res.history]
    k = max(1, len(losses) // 5)
    return {"source": source, "steps": res.step, "loss_start": sum(losses[:k]) / k, "loss_end": sum(losses[-k:]) / k,
            "run_dir": str(res.run_dir)}
