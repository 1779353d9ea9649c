"""The typed train config: the ``train:`` (and ``data:``) sections of a train recipe.

A train recipe is a model recipe with two more sections, usually written as its own YAML inheriting the
model with ``base:``::

    base: pi0-tiny              # any model recipe (name or path)
    data: {root: ./my_dataset}  # optional: LeRobotDataset + the model's processor, built lazily
    train:
      steps: 300
      batch_size: 8
      optimizer: {lr: 1.0e-3, weight_decay: 1.0e-4}
      schedule: {type: cosine, warmup_steps: 20, decay_steps: 300, decay_lr: 1.0e-4}

The sections are decoded with the recipe machinery of :mod:`vla_blocks.config` (unknown keys, wrong types and
unknown schedule names are errors naming the file, the key path and the closest choices); dotted overrides such
as ``train.optimizer.lr=3e-4`` apply before decoding. Learning-rate schedules are components of the slot
``lr_schedule``; openpi's presets are named schedules (``openpi_cosine``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import (ComponentConfig, ConfigError, _where, apply_overrides, decode, encode, parse_override,
                      read_recipe, register)

TRAIN_KEYS = ("train", "data")


# ---------------------------------------------------------------------------------------------- schedules
class ScheduleConfig(ComponentConfig, slot="lr_schedule"):
    """A learning-rate schedule: ``lr(step)`` for the optimizer step ``step`` (0-based)."""

    def at(self, step: int, peak: float, total: int) -> float:
        """The learning rate of optimizer step ``step``; ``peak`` is ``optimizer.lr``, ``total`` the run's steps."""
        raise NotImplementedError


def _warmup(step: int, warmup_steps: int, peak: float) -> float:
    # optax's warmup_cosine_decay_schedule as openpi uses it: linear from peak/(warmup+1) to peak
    init = peak / (warmup_steps + 1)
    return init + (peak - init) * step / warmup_steps


@register("lr_schedule", "constant")
@dataclass
class ConstantSchedule(ScheduleConfig):
    """Linear warmup over ``warmup_steps``, then ``lr`` (``lr: null`` takes ``optimizer.lr``)."""

    lr: float | None = None  # the constant learning rate after warmup (null: optimizer.lr)
    warmup_steps: int = 0  # optimizer steps of linear warmup from lr/(warmup+1) (optax's warmup), >= 0

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def at(self, step: int, peak: float, total: int) -> float:
        """Learning rate at optimizer step ``step`` (``peak``: ``optimizer.lr``; ``total``: the run's steps)."""
        peak = self.lr if self.lr is not None else peak
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps, peak)
        return peak


@register("lr_schedule", "cosine")
@dataclass
class CosineSchedule(ScheduleConfig):
    """Linear warmup to the peak (``peak_lr``, or ``optimizer.lr`` when null), then a half cosine down to
    ``decay_lr`` reached at step ``decay_steps`` (the floor afterwards): openpi's ``CosineDecaySchedule``."""

    warmup_steps: int = 0  # optimizer steps of linear warmup to the peak, >= 0
    peak_lr: float | None = None  # learning rate at the end of warmup (null: optimizer.lr)
    decay_steps: int | None = None  # step at which the cosine reaches decay_lr (null: the run's total steps)
    decay_lr: float = 0.0  # the floor: learning rate at and after decay_steps

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"decay_steps ({self.decay_steps}) must exceed warmup_steps ({self.warmup_steps})")

    def at(self, step: int, peak: float, total: int) -> float:
        """Learning rate at optimizer step ``step`` (``peak``: ``optimizer.lr``; ``total``: the run's steps)."""
        peak = self.peak_lr if self.peak_lr is not None else peak
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps, peak)
        decay = self.decay_steps or total or (self.warmup_steps + 1)
        frac = min(1.0, (step - self.warmup_steps) / max(1, decay - self.warmup_steps))
        return self.decay_lr + (peak - self.decay_lr) * 0.5 * (1 + math.cos(math.pi * frac))


@register("lr_schedule", "openpi_cosine")
@dataclass
class OpenPICosineSchedule(CosineSchedule):
    """openpi's default train schedule: warmup 1k steps to 2.5e-5, cosine to 2.5e-6 at 30k steps."""

    warmup_steps: int = 1_000  # openpi: 1k warmup steps
    peak_lr: float | None = 2.5e-5  # openpi's peak learning rate
    decay_steps: int | None = 30_000  # openpi: cosine to the floor over 30k steps
    decay_lr: float = 2.5e-6  # openpi's floor


# ---------------------------------------------------------------------------------------------- sections
@dataclass
class OptimizerConfig:
    """AdamW; norms, biases and embeddings get no weight decay. openpi's defaults: betas (0.9, 0.95),
    eps 1e-8, weight decay 1e-10, clip 1.0."""

    lr: float = 2.5e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-10
    clip_grad_norm: float | None = 1.0
    fused: bool | None = None  # null: torch's fused AdamW kernel unless parameters are sharded (FSDP2)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be > 0 or null, got {self.clip_grad_norm}")


@dataclass
class EMAConfig:
    """Exponential moving average of the weights: ``ema = decay·ema + (1−decay)·w`` after every optimizer step
    from ``start_step`` on (a copy of the weights before). ``save_pretrained`` writes the EMA weights unless
    ``use_for_final: false``."""

    decay: float = 0.99
    start_step: int = 0
    use_for_final: bool = True

    def __post_init__(self):
        if not 0 < self.decay < 1:
            raise ValueError(f"decay must lie in (0, 1), got {self.decay}")


@dataclass
class CompileConfig:
    """``torch.compile`` per wrap unit (MoT layer). ``fullgraph: true`` turns every graph break into an error:
    the engine never falls back to eager silently."""

    enabled: bool = False
    backend: str = "inductor"
    mode: str | None = None
    fullgraph: bool = True
    dynamic: bool | None = None


@dataclass
class CheckpointConfig:
    """When checkpoints are written, how many are kept, and their format (torch file or DCP directory)."""
    every: int = 1000          # optimizer steps between checkpoints (0: only at the end)
    keep_last: int = 3         # checkpoints kept (the oldest are deleted)
    format: Literal["auto", "torch", "dcp"] = "auto"  # auto: DCP when sharded (FSDP2/HSDP), else torch

    def __post_init__(self):
        if self.every < 0 or self.keep_last < 1:
            raise ValueError(f"every must be >= 0 and keep_last >= 1, got every={self.every} keep_last={self.keep_last}")


@dataclass
class LogConfig:
    """Metric records (``metrics.jsonl``, TensorBoard, W&B), the progress bar and the FLOP count."""
    every: int = 10                                     # steps between metric records
    progress: Literal["auto", "tqdm", "none"] = "auto"  # auto: a tqdm bar when stderr is a terminal
    tensorboard: bool | Literal["auto"] = "auto"  # auto: when the tensorboard package is installed
    wandb: bool = False                                 # opt-in: needs a login/project
    flops: bool = True      # count the model FLOPs of the first step (FlopCounterMode): TFLOP/s, and MFU on known GPUs
    wandb_project: str | None = None


@dataclass
class ValidationConfig:
    """Periodic validation on held-out batches: flow loss and the error of sampled action chunks."""
    every: int = 0               # steps between validations (0: never)
    batches: int = 2             # held-out batches per validation
    sample_actions: bool = True  # also the action error of sampled chunks (predict_action_chunk)
    seed: int = 1234


@dataclass
class DistributedConfig:
    """``strategy``: ``auto`` (single process without a process group, else DDP), ``ddp``, ``fsdp`` (FSDP2
    ``fully_shard`` per MoT layer then the root), ``hsdp`` (FSDP2 on a 2-D mesh ``(replicate, shard)``)."""

    strategy: Literal["auto", "none", "ddp", "fsdp", "hsdp"] = "auto"
    backend: str | None = None        # null: nccl with CUDA, else gloo
    replicate: int = 1                # hsdp: size of the replicate dimension (nodes)
    reshard_after_forward: bool = True
    # DDP: a static graph tolerates parameters a model never uses in its loss (e.g. a final norm only inference
    # reads) without searching the graph every step; models whose used set changes need find_unused_parameters
    static_graph: bool = True
    find_unused_parameters: bool = False


@dataclass
class TrainConfig:
    """The ``train:`` section of a recipe: steps, batch, optimizer, schedule, precision, EMA, freezing,
    checkpoints, logging and distribution."""
    steps: int = 1000
    batch_size: int = 8                     # per device, per micro-batch
    grad_accum: int = 1
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast, fp32 master weights and optimizer state
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: CosineSchedule())
    ema: EMAConfig | None = None
    freeze: list[str] = field(default_factory=list)  # module paths / globs, or expert:NAME
    activation_checkpointing: bool = False
    compile: CompileConfig = field(default_factory=CompileConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    device: str = "auto"
    output_dir: str | None = None

    def __post_init__(self):
        # the Python API may pass sections as plain mappings: decode them like the YAML ones
        import typing
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, dict) and f.name not in ("freeze",):
                setattr(self, f.name, decode(hints[f.name], v, f"train.{f.name}"))
        for k in ("steps", "batch_size", "grad_accum"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")

    def lr_at(self, step: int) -> float:
        """The scheduled learning rate at optimizer step ``step``."""
        return self.schedule.at(step, self.optimizer.lr, self.steps)


@dataclass
class DataConfig:
    """A LeRobotDataset and the model's processor (``vla_blocks.data``), built when training starts.

    ``root``: a local dataset folder or Hub id (a recipe may leave it null for the command line to give:
    ``data.root=DIR``); ``episodes``: the training episodes (null: all but ``val_episodes``); ``camera_map``:
    model camera slot → dataset camera key."""

    root: str | None = None
    episodes: list[int] | None = None
    val_episodes: list[int] = field(default_factory=list)
    delta_timestamps: dict[str, list[float]] | None = None
    camera_map: dict[str, str] | None = None
    # normalisation statistics installed into the model: "dataset" (the dataset's stats.json), "compute" (one
    # streaming pass over the training episodes: exact-histogram quantiles), or a JSON file (lerobot layout, or
    # openpi's norm_stats.json)
    stats: str = "dataset"
    shuffle: bool = True
    num_workers: int = 0
    drop_last: bool = True
    # HALO only: train on the EM-CoT samples of the dataset's meta/emcot sidecar (vla-blocks annotate): history,
    # thought text, subgoal frame and actions (vla_blocks.emcot.EmcotHaloDataset) instead of reactive frames
    emcot: bool = False


@dataclass
class TrainRecipe:
    """A resolved train recipe: the model config, the train section, the optional data section."""

    model: Any
    train: TrainConfig
    data: DataConfig | None
    file: str | None = None

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (model, ``train`` and ``data`` sections), as written to the run folder."""
        out = encode(self.model)
        out["train"] = encode(self.train)
        if self.data is not None:
            out["data"] = encode(self.data)
        return out


def _decode_model(data: dict, file: str | None):
    from ..components import ModelConfig
    from ..config import _model_fields
    model_fields = {f.name for f in _model_fields(data, file)}
    if "name" in data and "name" not in model_fields:
        data.pop("name")
    return decode(ModelConfig, data, "", file)


def load_train_recipe(ref: str | dict, overrides: dict | list[str] | None = None) -> TrainRecipe:
    """A train recipe (``recipes/train/NAME.yaml``, a path, a model recipe name, or a dict) with dotted overrides.

    A model recipe without a ``train:`` section trains with the defaults of :class:`TrainConfig`."""
    if isinstance(ref, dict):
        from ..config import _deepcopy
        data, file = _deepcopy(ref), "<dict>"
    else:
        data, file = read_recipe(_resolve_train_ref(ref))
    if isinstance(overrides, (list, tuple)):
        overrides = dict(parse_override(o) for o in overrides)
    if overrides:
        data = apply_overrides(data, overrides, file)
    train_data = data.pop("train", None) or {}
    data_sec = data.pop("data", None)
    train = decode(TrainConfig, train_data, "train", file)
    dcfg = None if data_sec is None else decode(DataConfig, data_sec, "data", file)
    model = _decode_model(data, file)
    return TrainRecipe(model=model, train=train, data=dcfg, file=file)


def train_recipe_dir():
    """The folder of the shipped train recipes (``recipes/train/``)."""
    from ..config import recipe_dir
    return recipe_dir() / "train"


def list_train_recipes() -> list[str]:
    """Names of the shipped train recipes."""
    d = train_recipe_dir()
    return sorted(p.stem for p in d.iterdir() if p.suffix in (".yaml", ".yml")) if d.is_dir() else []


def _resolve_train_ref(ref: str) -> str:
    """Train recipes shipped in ``recipes/train/`` come first, then model recipes and paths."""
    for suf in (".yaml", ".yml"):
        f = train_recipe_dir() / f"{ref}{suf}"
        if "/" not in ref and f.is_file():
            return str(f)
    return ref


__all__ = ["TrainConfig", "TrainRecipe", "DataConfig", "OptimizerConfig", "EMAConfig", "CompileConfig",
           "CheckpointConfig", "LogConfig", "ValidationConfig", "DistributedConfig", "ScheduleConfig",
           "ConstantSchedule", "CosineSchedule", "OpenPICosineSchedule", "load_train_recipe", "list_train_recipes",
           "ConfigError", "_where"]
