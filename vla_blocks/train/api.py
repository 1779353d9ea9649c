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


def build_data(recipe: TrainRecipe, model, rank: int = 0, world_size: int = 1):
    """``(train batches, validation batches or None, processor)`` for the recipe's ``data:`` section."""
    from ..data import LeRobotDataset, make_processor
    d, t = recipe.data, recipe.train
    probe = LeRobotDataset(d.root, decode_video=False)
    meta = probe.meta
    n_ep = int(meta.info["total_episodes"])
    bad = [e for e in list(d.val_episodes) + list(d.episodes or []) if not 0 <= e < n_ep]
    if bad:
        raise ValueError(f"data.episodes/val_episodes: episodes {bad} do not exist in {d.root} ({n_ep} episodes)")
    train_eps = list(d.episodes) if d.episodes is not None else [e for e in range(n_ep) if e not in set(d.val_episodes)]
    proc = make_processor(model, meta, camera_map=d.camera_map)
    delta = d.delta_timestamps or proc.delta_timestamps(fps=meta.fps)
    ds = LeRobotDataset(d.root, delta_timestamps=delta, episodes=train_eps)
    proc.train()
    data = DatasetBatches(ds, t.batch_size, proc, seed=t.seed, shuffle=d.shuffle, rank=rank, world_size=world_size,
                          drop_last=d.drop_last, num_workers=d.num_workers)
    val = None
    if d.val_episodes:
        vproc = make_processor(model, meta, camera_map=d.camera_map).eval()
        vds = LeRobotDataset(d.root, delta_timestamps=delta, episodes=list(d.val_episodes))
        val = _Sequential(vds, t.batch_size, vproc, t.validation.batches)
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
    p.add_argument("recipe", help="train recipe (recipes/train/NAME, a path) or model recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. train.steps=500 train.optimizer.lr=1e-4 data.root=./ds")
    p.add_argument("--output-dir", "-o", help="run folder (default: train.output_dir or runs/<recipe>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest loadable checkpoint of the run")


def run(args) -> int:
    res = train(args.recipe, args.overrides, output_dir=args.output_dir, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        last = res.history[-1] if res.history else {}
        print(f"trained {res.step} steps; final loss {last.get('loss', float('nan')):.4f}; run folder {res.run_dir}; "
              f"model {res.final_dir}")
    return 0


__all__ = ["train", "build_data", "add_arguments", "run"]
