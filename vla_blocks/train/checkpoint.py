"""Atomic training checkpoints: ``run/checkpoints/step-00000010/``.

Each holds the model, EMA, optimizer, the step (the schedule is a function of it), the RNG states of every rank
and the data position. Two formats:

- ``torch`` (one process, DDP): ``state.pt`` written by rank 0 (``torch.save``), RNG per rank in ``rng-R.pt``;
- ``dcp`` (FSDP2/HSDP): a ``torch.distributed.checkpoint`` directory of every rank's shards; it loads on any
  world size (also one process without a process group).

A checkpoint is written into ``.step-N.tmp-*`` and renamed when complete (``meta.json`` last), so a crash never
leaves a half-written ``step-N``. The last ``keep_last`` are kept. Loading tries the newest first; one that fails
to load is reported with a warning and the previous one is used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def rng_state() -> dict:
    import random

    import numpy as np
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict):
    import random

    import numpy as np
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _torch_save(obj, path: Path):
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


class Checkpointer:
    """Writes and finds checkpoints of one run (``root`` = ``run/checkpoints``)."""

    def __init__(self, root: str | os.PathLike, info, keep_last: int = 3, fmt: str = "auto"):
        self.root = Path(root)
        self.info = info
        self.keep_last = keep_last
        self.format = ("dcp" if info.sharded else "torch") if fmt == "auto" else fmt
        if self.format == "torch" and info.sharded:
            raise ValueError("train.checkpoint.format=torch cannot hold FSDP2 shards; use dcp (or auto)")

    # -- save ---------------------------------------------------------------------------------------
    def save(self, step: int, app_state: dict, train_state: dict) -> Path:
        """``app_state``: {"model": module, "optimizer": opt, "ema": {name: tensor} | None} (collective under
        FSDP2); ``train_state``: step, data position (rank 0's) and anything JSON/pickle-able. RNG states are
        taken per rank here."""
        from .distributed import barrier, broadcast_object
        info = self.info
        final = self.root / f"step-{step:08d}"
        tmp = None
        if info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".step-{step:08d}.tmp-", dir=self.root)
        tmp = Path(broadcast_object(tmp, info))
        _torch_save(rng_state(), tmp / f"rng-{info.rank}.pt")
        if self.format == "dcp":
            import torch.distributed.checkpoint as dcp
            dcp.save(self._dcp_state(app_state), checkpoint_id=str(tmp / "dcp"))
            if info.is_main:
                _torch_save(train_state, tmp / "train_state.pt")
        elif info.is_main:
            model = app_state["model"]
            state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                     "optimizer": app_state["optimizer"].state_dict(),
                     "ema": app_state.get("ema"), "train_state": train_state}
            _torch_save(state, tmp / "state.pt")
        barrier(info)
        if info.is_main:
            meta = {"step": step, "format": self.format, "world_size": info.world_size, "strategy": info.strategy}
            (tmp / "meta.json").write_text(json.dumps(meta))
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for old in checkpoint_dirs(self.root)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(info)
        return final

    def _dcp_state(self, app_state: dict) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(app_state["model"], app_state["optimizer"])
        state = {"model": msd, "optimizer": osd}
        if app_state.get("ema") is not None:
            state["ema"] = app_state["ema"]
        return state

    # -- load ---------------------------------------------------------------------------------------
    def load_latest(self, app_state: dict, path: str | os.PathLike | None = None) -> dict | None:
        """Load the newest loadable checkpoint (or ``path``) into ``app_state``; returns its train state (with
        ``rng`` set for this rank), or None when there is none. A broken newest one falls back with a warning."""
        candidates = [Path(path)] if path is not None else list(reversed(checkpoint_dirs(self.root)))
        errors = []
        for ckpt in candidates:
            try:
                return self.load(ckpt, app_state)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
                if path is not None:
                    raise
                errors.append(f"{ckpt.name}: {type(e).__name__}: {e}")
                warnings.warn(f"checkpoint {ckpt} could not be loaded ({type(e).__name__}: {e}); "
                              f"falling back to the previous one", RuntimeWarning, stacklevel=2)
        if errors:
            raise RuntimeError(f"no loadable checkpoint under {self.root}: " + "; ".join(errors))
        return None

    def load(self, ckpt: Path, app_state: dict) -> dict:
        meta_f = ckpt / "meta.json"
        if not meta_f.is_file():
            raise FileNotFoundError(f"{meta_f} is missing (incomplete checkpoint)")
        meta = json.loads(meta_f.read_text())
        if meta["format"] == "dcp":
            train_state = self._load_dcp(ckpt, app_state)
        else:
            train_state = self._load_torch(ckpt, app_state)
        rng_f = ckpt / f"rng-{self.info.rank}.pt"
        if meta["world_size"] == self.info.world_size and rng_f.is_file():
            train_state["rng"] = torch.load(rng_f, weights_only=False)
        else:
            train_state["rng"] = None  # another world size: ranks reseed from the step
        train_state["checkpoint"] = str(ckpt)
        return train_state

    def _load_torch(self, ckpt: Path, app_state: dict) -> dict:
        if self.info.sharded:
            raise ValueError(f"{ckpt} is a torch checkpoint; a sharded run resumes from dcp checkpoints")
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        model = app_state["model"]
        model.load_state_dict(state["model"])
        app_state["optimizer"].load_state_dict(state["optimizer"])
        if app_state.get("ema") is not None:
            if state.get("ema") is None:
                raise KeyError(f"{ckpt}: the run uses EMA but the checkpoint holds none")
            for k, v in app_state["ema"].items():
                v.copy_(state["ema"][k])
        return dict(state["train_state"])

    def _load_dcp(self, ckpt: Path, app_state: dict) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
        state = self._dcp_state(app_state)
        # the optimizer state of a fresh run is materialised for every parameter, while the checkpoint holds none
        # for parameters that never had a gradient (AdamW skips those either way): load partially, but require
        # every model and EMA tensor
        saved = set(FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata)
        for sec in ("model", "ema"):
            missing = [k for k in state.get(sec) or {} if f"{sec}.{k}" not in saved]
            if missing:
                raise KeyError(f"{ckpt}: the checkpoint lacks {sec} tensors {missing[:5]}"
                               f"{' ...' if len(missing) > 5 else ''}")
        dcp.load(state, checkpoint_id=str(ckpt / "dcp"), planner=DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(app_state["model"], app_state["optimizer"], model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        # EMA tensors were loaded in place
        return dict(torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=False))


__all__ = ["Checkpointer", "checkpoint_dirs", "rng_state", "set_rng_state"]
