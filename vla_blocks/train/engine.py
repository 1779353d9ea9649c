"""The training engine: one loop for every recipe, one process to FSDP2.

The engine knows a model only through ``forward(batch) -> (loss, metrics)``, the wrap unit it declares
(``_fsdp_wrap_modules``: FSDP2 unit, activation-checkpointing unit, ``torch.compile`` region), its extra
forward methods (``_fsdp_forward_methods``) and ``predict_action_chunk`` (validation). Data is any iterable of
batches (see :mod:`vla_blocks.train.data` for resumable sources)::

    from vla_blocks import create_model
    from vla_blocks.train import Trainer, TrainConfig, DemoBatches
    model = create_model("pi0-tiny")
    cfg = TrainConfig(steps=100, batch_size=4)
    Trainer(model, cfg, DemoBatches(model, 4), run_dir="runs/demo").fit()
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from ..config import ConfigError, encode
from .checkpoint import Checkpointer, set_rng_state
from .config import TrainConfig
from .distributed import (DistInfo, all_reduce_mean, barrier, full_state_dict, full_tensor, init_distributed, unwrap,
                          wrap_model, wrap_units)


# ---------------------------------------------------------------------------------------------- model surgery
def freeze_modules(model: nn.Module, patterns: list[str]) -> list[str]:
    """Turn off gradients of the parameters under each pattern: a module path (``vision_tower``), a glob over
    parameter names (``language_model.stack.layers.*.experts.vlm``), or ``expert:NAME`` (that expert's blocks
    and final norm in every MoT stack). Returns the frozen parameter names. A pattern matching nothing is an
    error naming it."""
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    frozen = []
    for i, pat in enumerate(patterns):
        if pat.startswith("expert:"):
            e = pat[len("expert:"):]
            hit = [n for n in names if f".experts.{e}." in f".{n}" or f".norms.{e}." in f".{n}"]
        else:
            hit = [n for n in names if fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n, pat + ".*")]
        if not hit:
            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"train.freeze[{i}]: {pat!r} matches no parameter of {type(model).__name__} "
                              f"(top-level modules: {', '.join(tops)}; or expert:NAME)")
        for n in hit:
            params[n].requires_grad_(False)
        frozen += hit
    return sorted(set(frozen))


NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices of linear/conv layers; none on biases, norm scales (any module whose
    class name contains ``Norm``), embeddings and other vectors."""
    decay, no_decay = [], []
    seen = set()
    for mname, mod in model.named_modules():
        is_norm = isinstance(mod, NO_DECAY_MODULES) or "Norm" in type(mod).__name__ or isinstance(mod, nn.Embedding)
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            (no_decay if is_norm or p.ndim < 2 or pname.endswith("bias") else decay).append((full, p))
    groups = [{"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
              {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every wrap unit (composable ``checkpoint``: parameter names unchanged, FSDP2-compatible)."""
    from torch.distributed._composable import checkpoint
    units = wrap_units(model)
    if not units:
        raise ValueError(f"activation checkpointing: {type(model).__name__}._fsdp_wrap_modules matches no submodule")
    for m in units:
        checkpoint(m)
    return len(units)


def apply_compile(model: nn.Module, cfg) -> int:
    """``torch.compile`` each wrap unit in place. Errors are never suppressed (``fullgraph`` makes graph breaks
    errors too): a compile failure stops training with the compiler's message."""
    import torch._dynamo
    torch._dynamo.config.suppress_errors = False
    units = wrap_units(model)
    if not units:
        raise ValueError(f"torch.compile: {type(model).__name__}._fsdp_wrap_modules matches no submodule")
    for m in units:
        m.compile(backend=cfg.backend, mode=cfg.mode, fullgraph=cfg.fullgraph, dynamic=cfg.dynamic)
    return len(units)


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# ---------------------------------------------------------------------------------------------- logging
class MetricsLogger:
    """metrics.jsonl in the run folder, TensorBoard (when installed, or on request) and W&B (opt-in)."""

    def __init__(self, run_dir: Path | None, cfg, info: DistInfo, config_dict: dict | None):
        self.f = None
        self.tb = None
        self.wandb = None
        if not info.is_main:
            return
        if run_dir is not None:
            self.f = open(run_dir / "metrics.jsonl", "a")
            if cfg.tensorboard != "off":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.tb = SummaryWriter(str(run_dir / "tensorboard"))
                except ImportError:
                    if cfg.tensorboard == "on":
                        raise ImportError("train.log.tensorboard=on needs the tensorboard package: "
                                          "pip install vla-blocks[train]") from None
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ImportError("train.log.wandb=true needs wandb: pip install wandb") from None
            self.wandb = wandb.init(project=cfg.wandb_project or "vla-blocks", config=config_dict,
                                    dir=str(run_dir) if run_dir else None)

    def log(self, record: dict):
        if self.f is not None:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self):
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _progress(cfg, total: int, initial: int, info: DistInfo):
    if not info.is_main or cfg.progress == "none" or (cfg.progress == "auto" and not sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, unit="step")


# ---------------------------------------------------------------------------------------------- engine
@dataclass
class TrainResult:
    step: int
    run_dir: Path | None
    final_dir: Path | None
    history: list[dict] = field(default_factory=list)  # the logged records (rank 0)
    resumed_from: str | None = None


class Trainer:
    """Trains ``model`` on ``data`` (an iterable of this rank's micro-batches) as ``cfg`` says.

    ``run_dir`` (optional) receives ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step-N/`` and ``final/``
    (``save_pretrained`` of the EMA weights if EMA is on, with the processor when one is given).
    ``val_data``: an iterable of held-out batches (re-iterated at each validation)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, data: Iterable, *, run_dir: str | os.PathLike | None = None,
                 val_data: Iterable | None = None, processor: Any = None, config_dict: dict | None = None):
        self.cfg = cfg
        self.data = data
        self.val_data = val_data
        self.processor = processor
        self.config_dict = config_dict if config_dict is not None else {"train": encode(cfg)}
        self.run_dir = Path(run_dir) if run_dir is not None else (Path(cfg.output_dir) if cfg.output_dir else None)
        self.info = init_distributed(cfg.distributed, cfg.device)
        info = self.info
        self.base = model
        model.to(info.device)
        if info.world_size > 1 and info.strategy in ("fsdp", "hsdp"):
            self._broadcast_from_rank0(model)  # every rank shards the same initial weights
        self.frozen = freeze_modules(model, list(cfg.freeze)) if cfg.freeze else []
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        if cfg.compile.enabled:
            apply_compile(model, cfg.compile)
        self.model = wrap_model(model, info, cfg.distributed, cfg.precision)
        o = cfg.optimizer
        groups = param_groups(self.base, o.weight_decay)
        if not groups:
            raise ValueError("no trainable parameters (everything is frozen)")
        self.trainable = [(n, p) for g in groups for n, p in zip(g["names"], g["params"])]
        self.optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                           lr=cfg.lr_at(0), betas=tuple(o.betas), eps=o.eps)
        self.ema = None
        if cfg.ema is not None:
            self.ema = {n: p.detach().clone().float() for n, p in self.trainable}
        self.step = 0
        self.consumed = 0  # micro-batches taken from the data iterable on this rank
        self.checkpointer = None
        if self.run_dir is not None:
            self.checkpointer = Checkpointer(self.run_dir / "checkpoints", info, cfg.checkpoint.keep_last,
                                             cfg.checkpoint.format)
        self._autocast = (torch.autocast(info.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                          else contextlib.nullcontext())
        self.history: list[dict] = []

    # -- setup helpers ------------------------------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def _broadcast_from_rank0(model: nn.Module):
        import torch.distributed as dist
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)

    def _app_state(self) -> dict:
        return {"model": self.base if not self.info.sharded else self.model, "optimizer": self.optimizer,
                "ema": self.ema}

    def describe(self) -> str:
        c, i = self.cfg, self.info
        eff = c.batch_size * i.world_size * c.grad_accum
        n_train = sum(p.numel() for _, p in self.trainable)
        return (f"effective batch = {c.batch_size} per device × {i.world_size} device(s) × {c.grad_accum} "
                f"accumulation = {eff}; strategy {i.strategy} on {i.device}; precision {c.precision}; "
                f"{n_train:,} trainable parameters ({len(self.frozen)} frozen tensors)")

    # -- resume -------------------------------------------------------------------------------------
    def resume(self, path: str | os.PathLike | None = None) -> str | None:
        """Load the newest checkpoint of the run (or ``path``): weights, EMA, optimizer, step, RNG, data position."""
        if self.checkpointer is None and path is None:
            raise ValueError("resume needs a run folder (run_dir or train.output_dir)")
        ck = self.checkpointer or Checkpointer(Path(path).parent, self.info, self.cfg.checkpoint.keep_last)
        st = ck.load_latest(self._app_state(), path)
        if st is None:
            return None
        self.step = int(st["step"])
        self.consumed = int(st.get("consumed", 0))
        if st.get("rng") is not None:
            set_rng_state(st["rng"])
        else:
            torch.manual_seed(self.cfg.seed + 7919 * self.info.rank + 104729 * self.step)
        data_state = st.get("data")
        if data_state is not None and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(data_state)
            self._skip = 0
        else:
            self._skip = self.consumed
        return st["checkpoint"]

    def save_checkpoint(self) -> Path:
        data_state = self.data.state_dict() if hasattr(self.data, "state_dict") else None
        train_state = {"step": self.step, "consumed": self.consumed, "data": data_state,
                       "config": self.config_dict}
        return self.checkpointer.save(self.step, self._app_state(), train_state)

    # -- one optimizer step -------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict]) -> dict:
        """Forward/backward over the micro-batches (gradients averaged), clip, AdamW, EMA. Returns tensors
        (``loss``, ``grad_norm``, the model's metrics) without synchronising."""
        cfg, info = self.cfg, self.info
        self.model.train()
        n = len(micro_batches)
        lr = cfg.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        total = None
        sums: dict[str, torch.Tensor] = {}
        for i, b in enumerate(micro_batches):
            last = i == n - 1
            sync = contextlib.nullcontext()
            if info.strategy == "ddp" and not last:
                sync = self.model.no_sync()
            elif info.sharded and n > 1:
                self.model.set_requires_gradient_sync(last)
            with sync:
                with self._autocast:
                    loss, metrics = self.model(to_device(b, info.device))
                (loss / n).backward()
            total = loss.detach() if total is None else total + loss.detach()
            for k, v in metrics.items():
                if isinstance(v, torch.Tensor) and v.numel() == 1:
                    sums[k] = sums.get(k, 0) + v.detach().float()
        params = [p for _, p in self.trainable]
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        norm = full_tensor(norm)
        if cfg.optimizer.clip_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.optimizer.clip_grad_norm, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self._update_ema()
        out = {"loss": total / n, "grad_norm": norm, "lr": lr}
        out.update({k: v / n for k, v in sums.items()})
        return out

    @torch.no_grad()
    def _update_ema(self):
        e = self.cfg.ema
        ema = list(self.ema.values())
        cur = [p.detach() for _, p in self.trainable]
        if self.step <= e.start_step:
            torch._foreach_copy_(ema, cur)
        else:
            torch._foreach_lerp_(ema, cur, 1.0 - e.decay)

    # -- validation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Flow loss and the error of sampled action chunks (``predict_action_chunk`` vs the dataset's actions,
        raw space) on the held-out batches, under a fixed seed that leaves the training RNG untouched."""
        v = self.cfg.validation
        if self.val_data is None:
            return {}
        self.model.eval()
        losses, mse, mae = [], [], []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(v.seed)
            for i, b in enumerate(self.val_data):
                if i >= v.batches:
                    break
                b = to_device(b, self.info.device)
                with self._autocast:
                    loss, _ = self.model(b)
                losses.append(float(loss))
                if v.sample_actions and hasattr(self.base, "predict_action_chunk") and "actions" in b:
                    with self._autocast:
                        pred = self.model.predict_action_chunk(b) if self.info.sharded else \
                            self.base.predict_action_chunk(b)
                    if self.processor is not None and hasattr(self.processor, "postprocess"):
                        pred = torch.as_tensor(self.processor.postprocess(pred))  # the dataset's action space
                    tgt = b["actions"][:, :pred.shape[1]].to(pred)
                    if tgt.shape != pred.shape:  # model-space padding beyond the real action dims
                        pred = pred[..., :tgt.shape[-1]]
                    mse.append(float(((pred.float() - tgt.float()) ** 2).mean()))
                    mae.append(float((pred.float() - tgt.float()).abs().mean()))
        self.model.train()
        out = {"val_loss": sum(losses) / max(1, len(losses))}
        if mse:
            out["val_action_mse"] = sum(mse) / len(mse)
            out["val_action_mae"] = sum(mae) / len(mae)
        return all_reduce_mean(out, self.info)

    # -- the loop -----------------------------------------------------------------------------------
    def _batches(self):
        it = iter(self.data)
        for _ in range(getattr(self, "_skip", 0)):
            next(it)
        self._skip = 0
        return it

    def fit(self, resume: bool | str | os.PathLike = False) -> TrainResult:
        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.seed + 7919 * info.rank)
        resumed = None
        if resume:
            resumed = self.resume(None if resume is True else resume)
        if self.run_dir is not None and info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            import yaml
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.config_dict, sort_keys=False))
        barrier(info)
        if info.is_main:
            print(("resumed from " + resumed + "; " if resumed else "") + self.describe(), file=sys.stderr)
        logger = MetricsLogger(self.run_dir, cfg.log, info, self.config_dict)
        bar = _progress(cfg.log, cfg.steps, self.step, info)
        it = self._batches()
        per_step = cfg.batch_size * info.world_size * cfg.grad_accum
        t_last, s_last = time.perf_counter(), self.step
        try:
            while self.step < cfg.steps:
                micro = []
                for _ in range(cfg.grad_accum):
                    try:
                        micro.append(next(it))
                    except StopIteration:
                        raise RuntimeError(f"the data ran out after {self.consumed} micro-batches, before step "
                                           f"{cfg.steps}") from None
                    self.consumed += 1
                out = self.train_step(micro)
                if bar is not None:
                    bar.update(1)
                log_now = self.step % cfg.log.every == 0 or self.step == cfg.steps
                val_now = cfg.validation.every and (self.step % cfg.validation.every == 0 or self.step == cfg.steps)
                if log_now or val_now:
                    rec = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
                    rec = all_reduce_mean({k: v for k, v in rec.items() if k != "lr"}, info) | {"lr": out["lr"]}
                    now = time.perf_counter()
                    rec["samples_per_s"] = per_step * (self.step - s_last) / max(now - t_last, 1e-9)
                    t_last, s_last = now, self.step
                    if val_now:
                        rec.update(self.validate())
                    rec = {"step": self.step, **rec}
                    if not all(math.isfinite(v) for k, v in rec.items() if k in ("loss", "grad_norm")):
                        raise FloatingPointError(f"step {self.step}: non-finite loss/grad norm {rec}")
                    self.history.append(rec)
                    logger.log(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                        gnorm=f"{rec['grad_norm']:.3f}", sps=f"{rec['samples_per_s']:.1f}")
                ck = cfg.checkpoint.every
                if self.checkpointer is not None and ((ck and self.step % ck == 0) or self.step == cfg.steps):
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        final = self.save_final() if self.run_dir is not None else None
        return TrainResult(self.step, self.run_dir, final, self.history, resumed)

    # -- the final model ----------------------------------------------------------------------------
    def final_state_dict(self, use_ema: bool | None = None) -> dict[str, torch.Tensor]:
        """The full fp32 state dict (EMA weights for the trained parameters when EMA is on and ``use_ema``
        is not False). A collective under FSDP2."""
        sd = full_state_dict(self.model, self.info)
        use_ema = (self.cfg.ema is not None and self.cfg.ema.use_for_final) if use_ema is None else use_ema
        if use_ema and self.ema is not None:
            for n, v in self.ema.items():
                sd[n] = full_tensor(v).detach().cpu().to(sd[n].dtype)
        return sd

    def save_final(self, directory: str | os.PathLike | None = None) -> Path | None:
        """``save_pretrained`` of the final weights into ``run/final`` (with the processor when given)."""
        dest = Path(directory) if directory is not None else self.run_dir / "final"
        sd = self.final_state_dict()
        if self.info.is_main:
            model = self.base
            if self.info.sharded:
                with torch.device("meta"):
                    model = self.base.config.build()
                model.load_state_dict(sd, assign=True)
            else:
                backup = {k: v.detach().clone() for k, v in self.base.state_dict().items()}
                self.base.load_state_dict(sd)
            try:
                model.save_pretrained(dest)
            finally:
                if not self.info.sharded:
                    self.base.load_state_dict(backup)
            if self.processor is not None and hasattr(self.processor, "save_pretrained"):
                self.processor.save_pretrained(dest)
        barrier(self.info)
        return dest

    def close(self):
        import torch.distributed as dist
        if self.info.owns_group and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["Trainer", "TrainResult", "freeze_modules", "param_groups", "apply_activation_checkpointing",
           "apply_compile"]
