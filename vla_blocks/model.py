"""Base class of composed models and ``create_model`` (timm's grammar for references).

``create_model(ref, **overrides)`` with ``ref``:

- a recipe name shipped with the package (``acot-tiny``) or a path to a recipe YAML;
- ``hf-hub:org/name[@revision]``: a model saved with ``save_pretrained`` on the Hugging Face Hub;
- ``local-dir:path``: a model folder saved with ``save_pretrained``.

Overrides are dotted keys (``create_model("mot-tiny", **{"experts.act.hidden_size": 512})``, or
``overrides=["experts.act.hidden_size=512"]``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .config import ConfigError, load_recipe


class VLAModel(nn.Module):
    """A model built from a recipe. Training: ``forward(batch) -> (loss, metrics)``.

    Policies also implement lerobot's inference names: ``predict_action_chunk(batch)`` returns
    ``[B, H, A]``; ``select_action(batch)`` pops one action per call from a queue refilled with a
    new chunk when empty; ``reset()`` clears the queue.

    Parallelism surface (lerobot's names): ``_fsdp_wrap_modules`` names the unit to wrap with
    ``fully_shard`` and to checkpoint — the MoT layer, which owns every expert's block of a layer so
    the shared attention never reads another unit's parameters; ``_fsdp_forward_methods`` are the
    entry points besides ``forward`` to register with ``register_fsdp_forward_method``.
    """

    config: Any
    n_action_steps: int | None = None
    _fsdp_wrap_modules: tuple[str, ...] = ("MoTLayer",)
    _fsdp_forward_methods: tuple[str, ...] = ("select_action", "predict_action_chunk")
    supports_gradient_checkpointing: bool = True

    def __init__(self, config):
        super().__init__()
        self.config = config
        self._action_queue: deque = deque()
        # flow heads by output label (``actions``, ``coarse_actions``): blocks whose modules are registered
        # under upstream names with :meth:`expose`, so the dict itself is not a registered child
        self.__dict__["flow_heads"] = {}

    # -- lerobot-style inference API ------------------------------------------------------------
    def predict_action_chunk(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is not a policy")

    @torch.no_grad()
    def select_action(self, batch: dict) -> torch.Tensor:
        if not self._action_queue:
            chunk = self.predict_action_chunk(batch)  # [B, H, A]
            n = self.n_action_steps or chunk.shape[1]
            self._action_queue.extend(chunk[:, :n].transpose(0, 1))
        return self._action_queue.popleft()

    def reset(self):
        self._action_queue.clear()

    # -- weights on disk and on the Hub (vla_blocks.hub) ------------------------------------------
    def save_pretrained(self, save_directory, **kwargs):
        """Write config.json + safetensors (+ stats, model card) atomically: :func:`vla_blocks.hub.save_pretrained`."""
        from . import hub
        return hub.save_pretrained(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, ref, **kwargs) -> "VLAModel":
        """Load ``hf-hub:org/name[@rev]``, ``local-dir:path`` or a folder: :func:`vla_blocks.hub.load_model`."""
        from . import hub
        model = hub.from_pretrained(ref, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model
        if cls is not VLAModel and not isinstance(loaded, cls):
            raise TypeError(f"{ref} holds a {type(loaded).__name__}, not a {cls.__name__}")
        return model

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Save into a temporary folder and upload it to ``repo_id``: :func:`vla_blocks.hub.push_to_hub`."""
        from . import hub
        return hub.push_to_hub(self, repo_id, **kwargs)

    # -- composition ----------------------------------------------------------------------------
    def expose(self, block: nn.Module, names: dict[str, str], as_attr: str | None = None) -> nn.Module:
        """Register ``block``'s sub-modules on this model under upstream names, so checkpoints keep the
        upstream keys while ``block`` does the computing.

        ``names`` maps a sub-module path inside ``block`` to its name on the model
        (``{"proj.in_proj": "action_in_proj"}``); paths whose sub-module is absent (a head without a state
        projection) are skipped. Every parameter and buffer of ``block`` must end up registered: a block
        with an unnamed tensor is an error, never a tensor missing from the checkpoint. ``block`` is kept as
        a plain attribute ``as_attr`` (not a registered child, so each tensor has exactly one key).
        """
        covered: set[int] = set()
        for path, name in names.items():
            try:
                sub = block.get_submodule(path)
            except AttributeError:
                continue
            if sub is None:
                continue
            setattr(self, name, sub)
            covered.update(id(t) for t in (*sub.parameters(), *sub.buffers()))
        left = [n for n, t in (*block.named_parameters(), *block.named_buffers()) if id(t) not in covered]
        if left:
            raise ValueError(f"{type(block).__name__}: tensors {left} have no upstream name in {names}")
        if as_attr is not None:
            self.__dict__[as_attr] = block
        return block

    # -- introspection --------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def demo_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict:
        """A random batch of the right shapes for this model (demo, tests, benchmarks)."""
        raise NotImplementedError

    def demo_inference(self, batch: dict) -> dict:
        """One inference call on ``batch``; returns named outputs for the demo report."""
        raise NotImplementedError


@dataclass
class ModelRef:
    kind: str  # "recipe" | "hf-hub" | "local-dir"
    target: str
    revision: str | None = None


def parse_model_ref(ref: str) -> ModelRef:
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"model reference must be a non-empty string, got {ref!r}")
    if ref.startswith("hf-hub:"):
        target = ref[len("hf-hub:"):]
        rev = None
        if "@" in target:
            target, rev = target.split("@", 1)
            if not rev:
                raise ConfigError(f"{ref!r}: empty revision after '@'")
        if target.count("/") != 1 or not all(target.split("/")):
            raise ConfigError(f"{ref!r}: expected hf-hub:org/name[@revision]")
        return ModelRef("hf-hub", target, rev)
    if ref.startswith("local-dir:"):
        target = ref[len("local-dir:"):]
        if not target:
            raise ConfigError(f"{ref!r}: expected local-dir:path")
        return ModelRef("local-dir", target)
    return ModelRef("recipe", ref)


def _split_overrides(overrides: dict) -> dict:
    extra = overrides.pop("overrides", None)
    out = dict(overrides)
    if extra:
        from .config import parse_override
        for o in extra:
            k, v = parse_override(o)
            out[k] = v
    return out


def create_model(ref: str, **overrides) -> VLAModel:
    """Build a model from a recipe name/path, or load one from ``hf-hub:`` / ``local-dir:``."""
    parsed = parse_model_ref(ref)
    overrides = _split_overrides(overrides)
    if parsed.kind == "recipe":
        cfg = load_recipe(parsed.target, overrides)
        return cfg.build()
    from . import hub
    return hub.load_model(parsed, overrides)


def model_config(ref: str, **overrides):
    """The typed config of a recipe (no weights allocated)."""
    parsed = parse_model_ref(ref)
    if parsed.kind != "recipe":
        from . import hub
        return hub.load_config(parsed, _split_overrides(overrides))
    return load_recipe(parsed.target, _split_overrides(overrides))
