"""Shared pieces of the training tests: a fixed-noise batch source and a 2-process gloo launcher."""

from __future__ import annotations

import os
import socket

import torch

from vla_blocks import create_model
from vla_blocks.train import DemoBatches, TrainConfig


def noise_extra(model):
    """Flow noise and times inside the batch, so every world size sees the same random draws per sample."""
    c = model.config

    def extra(B, g):
        return {"noise": torch.randn(B, c.action_horizon, c.action_dim, generator=g),
                "time": torch.rand(B, generator=g) * 0.9 + 0.05}
    return extra


def build(recipe="pi0-tiny", seed=0):
    torch.manual_seed(seed)
    return create_model(recipe)


def cfg(**kw) -> TrainConfig:
    # eps 1e-6: a few parameters have a mathematically zero gradient (e.g. the key bias of softmax attention);
    # Adam with eps 1e-8 turns their rounding noise into full-size updates that differ between reduction orders
    base = dict(steps=5, batch_size=4, seed=0, optimizer={"lr": 1e-2, "clip_grad_norm": 1.0, "eps": 1e-6},
                schedule={"type": "cosine", "warmup_steps": 2, "decay_steps": 10}, log={"every": 1, "progress": "none",
                                                                     "tensorboard": "off"})
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and v.get("type", base[k].get("type")) == base[k].get("type"):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    from vla_blocks.config import decode
    return decode(TrainConfig, base, "train")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world, *args):
    import torch.multiprocessing as mp
    mp.spawn(_worker, args=(world, free_port(), fn, args), nprocs=world, join=True)


def train_run(rank, world, strategy, out, run_dir=None, steps=5, global_batch=4, accum=1):
    """One training run on this rank; rank 0 saves the final full state dict to ``out``."""
    model = build()
    c = cfg(steps=steps, batch_size=global_batch // world // accum, grad_accum=accum,
            distributed={"strategy": strategy}, checkpoint={"every": steps})
    data = DemoBatches(model, global_batch // accum, seed=3, rank=rank, world_size=world, extra=noise_extra(model))
    from vla_blocks.train import Trainer
    tr = Trainer(model, c, data, run_dir=run_dir)
    tr.fit()
    sd = tr.final_state_dict(use_ema=False)
    if rank == 0:
        torch.save({"state": sd, "history": tr.history}, out)
