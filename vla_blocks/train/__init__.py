"""Training: the typed train config, the engine (one process, DDP, FSDP2/HSDP), checkpoints and resumable data.

See :class:`Trainer` and :func:`train` (the Python API behind ``vla-blocks train``)."""

from .config import (CheckpointConfig, CompileConfig, ConstantSchedule, CosineSchedule, DataConfig,
                     DistributedConfig, EMAConfig, LogConfig, OpenPICosineSchedule, OptimizerConfig, ScheduleConfig,
                     TrainConfig, TrainRecipe, ValidationConfig, list_train_recipes, load_train_recipe)
from .data import DatasetBatches, DemoBatches
from .api import build_data, train
from .engine import Trainer, TrainResult, freeze_modules, param_groups

__all__ = ["TrainConfig", "TrainRecipe", "DataConfig", "OptimizerConfig", "EMAConfig", "CompileConfig",
           "CheckpointConfig", "LogConfig", "ValidationConfig", "DistributedConfig", "ScheduleConfig",
           "ConstantSchedule", "CosineSchedule", "OpenPICosineSchedule", "load_train_recipe", "list_train_recipes",
           "DemoBatches", "DatasetBatches", "train", "build_data", "Trainer", "TrainResult", "freeze_modules", "param_groups"]
