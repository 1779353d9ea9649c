"""Process groups, wrapping (DDP / FSDP2 / HSDP) and full state dicts, with PyTorch's own stack.

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...); a single process
without those variables trains without a process group. FSDP2 shards each module of the classes the model
names in ``_fsdp_wrap_modules`` (the MoT layer: it owns every expert's block, so the shared attention never
reads another unit's parameters), then the root; the model's ``_fsdp_forward_methods`` are registered with
``register_fsdp_forward_method`` so inference entry points gather parameters too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import DistributedConfig


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"          # none | ddp | fsdp | hsdp
    owns_group: bool = False        # the engine created the process group (and destroys it)
    mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.strategy in ("fsdp", "hsdp")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(cfg: DistributedConfig, device: str = "auto") -> DistInfo:
    """Join (or create, under torchrun) the default process group and choose the strategy."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    owns = False
    if not dist.is_initialized() and env_world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device, local)
        backend = cfg.backend or ("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend)
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    else:
        rank, world, local = 0, 1, 0
    dev = resolve_device(device, local)
    strategy = cfg.strategy
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy != "none" and not dist.is_initialized():
        raise ValueError(f"train.distributed.strategy={strategy!r} needs a process group: launch with torchrun "
                         f"(or strategy: none for one process)")
    info = DistInfo(rank, world, local, dev, strategy, owns)
    if strategy in ("fsdp", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        if strategy == "hsdp":
            if world % cfg.replicate:
                raise ValueError(f"train.distributed.replicate={cfg.replicate} does not divide the world size {world}")
            info.mesh = init_device_mesh(dev.type, (cfg.replicate, world // cfg.replicate),
                                         mesh_dim_names=("replicate", "shard"))
        else:
            info.mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("shard",))
    return info


def wrap_units(model: nn.Module) -> list[nn.Module]:
    """The modules of the classes the model declares in ``_fsdp_wrap_modules`` (in module order)."""
    names = set(getattr(model, "_fsdp_wrap_modules", ()) or ())
    return [m for m in model.modules() if type(m).__name__ in names or
            any(c.__name__ in names for c in type(m).__mro__[1:2])]


def wrap_model(model: nn.Module, info: DistInfo, cfg: DistributedConfig, precision: str) -> nn.Module:
    """DDP, or FSDP2 per wrap unit then the root. Returns the module to call for training."""
    if info.strategy == "none":
        return model
    if info.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids, static_graph=cfg.static_graph,
                   find_unused_parameters=cfg.find_unused_parameters)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    units = wrap_units(model)
    if not units:
        raise ValueError(f"{type(model).__name__}._fsdp_wrap_modules = {getattr(model, '_fsdp_wrap_modules', None)!r} "
                         f"matches no submodule; FSDP2 needs a wrap unit")
    kw = dict(mesh=info.mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    for m in units:
        fully_shard(m, **kw)
    fully_shard(model, **kw)
    for name in getattr(model, "_fsdp_forward_methods", ()) or ():
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return model


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and isinstance(module, nn.parallel.DistributedDataParallel) \
        else module


def full_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The unsharded fp32 state dict on CPU (a collective under FSDP2: every rank must call it)."""
    model = unwrap(model)
    if info.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def full_tensor(t):
    """A DTensor's full value (collective), a plain tensor unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    if info.world_size == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    t /= info.world_size
    return dict(zip(keys, t.tolist()))


def barrier(info: DistInfo):
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    if info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
