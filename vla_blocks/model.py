"""Base class of composed models and ``create_model`` (timm's grammar for references).

``create_model(ref, **overrides)`` with ``ref`` (parsed by :func:`vla_blocks.hub.parse_ref`, one grammar):

- a recipe name shipped with the package (``acot-tiny``) or a path to a recipe YAML;
- ``hf-hub:org/name[@revision]`` (or plain ``org/name`` when no such folder exists): a model saved with
  ``save_pretrained`` on the Hugging Face Hub;
- ``local-dir:path`` or a folder path: a model folder saved with ``save_pretrained``.

Load options (``strict=False``, ``only=[...]``, ``revision=``…) pass through to :func:`vla_blocks.hub.load_model`.

Overrides are dotted keys (``create_model("mot-tiny", **{"experts.act.hidden_size": 512})``, or
``overrides=["experts.act.hidden_size=512"]``).
"""

from __future__ import annotations

import functools
from collections import deque
from typing import Any

import torch
import torch.nn as nn

from .batch import BatchSchema, CheckedBatch
from .config import ConfigError, load_recipe
from .refs import ModelRef, parse_model_ref  # noqa: F401  (re-exported: vla_blocks.model.ModelRef)
from .errors import BatchError


class VLAModel(nn.Module):
    """A model built from a recipe. Training: ``forward(batch) -> (loss, metrics)``.

    Policies also implement lerobot's inference names: ``predict_action_chunk(batch)`` returns
    ``[B, H, A]``; ``select_action(batch)`` pops one action per call from a queue refilled with a
    new chunk when empty; ``reset()`` clears the queue.

    Parallelism surface (lerobot's names): ``_fsdp_wrap_modules`` names the unit to wrap with
    ``fully_shard`` and to checkpoint — the MoT layer, which owns every expert's block of a layer so
    the shared attention never reads another unit's parameters; ``_fsdp_forward_methods`` are the
    entry points besides ``forward`` to register with ``register_fsdp_forward_method``.

    Batch contract (:mod:`vla_blocks.batch`): a subclass declares ``batch_schema`` and ``batch_dims()``; the
    methods named in ``batch_entry_points`` (``forward``: mode ``train``; ``sample_actions``, ``infer``,
    ``predict_action_chunk``: mode ``infer``; ``episode``: HALO's ``infer(history, instruction)``) and
    ``select_action`` check their batch once (a nested call does not check again) and raise
    :class:`~vla_blocks.errors.BatchError` naming the key. ``allow_nonfinite = True`` lets NaN/Inf pass.
    """

    config: Any
    n_action_steps: int | None = None
    batch_schema: BatchSchema | None = None
    allow_nonfinite: bool = False
    batch_entry_points: dict[str, str] = {"forward": "train", "sample_actions": "infer", "infer": "infer",
                                          "predict_action_chunk": "infer"}
    _fsdp_wrap_modules: tuple[str, ...] = ("MoTLayer",)
    _fsdp_forward_methods: tuple[str, ...] = ("select_action", "predict_action_chunk")
    supports_gradient_checkpointing: bool = True

    def __init__(self, config):
        super().__init__()
        from .validate import check_config
        self.config = check_config(config)  # sizes and knobs (a config made in Python skips load_recipe)
        self._action_queue: deque = deque()
        # flow heads by output label (``actions``, ``coarse_actions``): blocks whose modules are registered
        # under upstream names with :meth:`expose`, so the dict itself is not a registered child
        self.__dict__["flow_heads"] = {}
        self.__dict__["_batch_depth"] = 0
        self.__dict__["_queue_batch_size"] = None

    # -- batch contract (vla_blocks.batch) --------------------------------------------------------
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, mode in cls.batch_entry_points.items():
            fn = cls.__dict__.get(name)
            if callable(fn) and not getattr(fn, "_checks_batch", False):
                setattr(cls, name, _checked_entry(fn, mode))

    def batch_dims(self) -> dict:
        """The sizes the schema's shape patterns name (``H``, ``A``, ``max_id``…) and its boolean switches."""
        return {}

    def check_batch(self, batch, mode: str = "infer"):
        """``batch`` checked against ``batch_schema`` for ``mode`` → a :class:`~vla_blocks.batch.CheckedBatch`
        (masked entries zeroed); the batch itself when the model declares no schema."""
        schema = type(self).batch_schema
        if schema is None:
            return batch
        return schema.check(batch, mode, self.batch_dims(), allow_nonfinite=self.allow_nonfinite)

    # -- lerobot-style inference API ------------------------------------------------------------
    def predict_action_chunk(self, batch: dict) -> torch.Tensor:
        """An action chunk ``[B, H, A]`` for an observation batch (policies override this; plain models raise)."""
        raise NotImplementedError(f"{type(self).__name__} is not a policy")

    @torch.no_grad()
    def select_action(self, batch: dict) -> torch.Tensor:
        """One action ``[B, A]`` per call from a queue of the first ``n_action_steps`` actions of a chunk.
        The batch size must stay the same until :meth:`reset` (a new episode)."""
        with _entry(self) as outer:
            if outer:
                batch = self.check_batch(batch, "infer")
            B = batch.batch_size if isinstance(batch, CheckedBatch) else None
            if self._action_queue and B is not None and B != self._queue_batch_size:
                raise BatchError(f"select_action: the batch size changed from {self._queue_batch_size} to {B} with "
                                 f"{len(self._action_queue)} queued actions; call reset() between episodes",
                                 batch.dims_by.get("B"))
            if not self._action_queue:
                chunk = self.predict_action_chunk(batch)  # [B, H, A]
                n = self.n_action_steps
                if n is None:
                    n = chunk.shape[1]
                if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= chunk.shape[1]:
                    raise ConfigError(f"n_action_steps must be an int in [1, {chunk.shape[1]}] (the chunk length) "
                                      f"or None (the whole chunk), got {n!r}")
                self._action_queue.extend(chunk[:, :n].transpose(0, 1))
                self.__dict__["_queue_batch_size"] = chunk.shape[0]
            return self._action_queue.popleft()

    def reset(self):
        """Start a new episode: drop the queued actions of :meth:`select_action` (the batch size may change after)."""
        self._action_queue.clear()
        self.__dict__["_queue_batch_size"] = None

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
        """Total number of parameter elements."""
        return sum(p.numel() for p in self.parameters())

    def demo_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict:
        """A random batch of the right shapes for this model (demo, tests, benchmarks)."""
        raise NotImplementedError

    def demo_inference(self, batch: dict) -> dict:
        """One inference call on ``batch``; returns named outputs for the demo report."""
        raise NotImplementedError


class _entry:
    """Depth of public entry-point calls on a model: only the outermost one checks the batch."""

    def __init__(self, model):
        self.model = model

    def __enter__(self) -> bool:
        d = self.model.__dict__.get("_batch_depth", 0)
        self.model.__dict__["_batch_depth"] = d + 1
        return d == 0

    def __exit__(self, *exc):
        self.model.__dict__["_batch_depth"] -= 1
        return False


def _checked_entry(fn, mode: str):
    """Wrap an entry point so the outermost call checks its batch (``mode`` ``episode``: the arguments are
    HALO's ``(history, instruction)`` of one sample)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with _entry(self) as outer:
            if outer and type(self).batch_schema is not None:
                if mode == "episode":
                    names = ("history", "instruction")
                    vals = [args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names)]
                    if not isinstance(vals[1], str):
                        raise BatchError(f"instruction must be a string, got {type(vals[1]).__name__}", "instruction")
                    self.check_batch({"history": [vals[0]], "instruction": [vals[1]]}, "infer")
                elif args:
                    args = (self.check_batch(args[0], mode), *args[1:])
                elif "batch" in kwargs:
                    kwargs["batch"] = self.check_batch(kwargs["batch"], mode)
            return fn(self, *args, **kwargs)

    wrapper._checks_batch = True
    return wrapper


def _split_overrides(overrides: dict) -> dict:
    extra = overrides.pop("overrides", None)
    out = dict(overrides)
    if extra:
        from .config import parse_override
        for o in extra:
            k, v = parse_override(o)
            out[k] = v
    return out


def _load_options() -> set[str]:
    """The keyword options of :func:`vla_blocks.hub.load_model` (everything after ``ref`` and ``overrides``)."""
    import inspect

    from . import hub
    return {n for n, p in inspect.signature(hub.load_model).parameters.items() if p.kind is p.KEYWORD_ONLY}


#: load options that also apply to a model built from a recipe (no weights are read)
_RECIPE_OPTIONS = ("device", "dtype")


def create_model(ref, **overrides) -> VLAModel:
    """Build a model from a recipe name/path, or load a saved one. ``ref`` is parsed by
    :func:`vla_blocks.hub.parse_ref`, the same grammar everywhere: a recipe name or YAML path, ``hf-hub:org/name[@rev]``,
    ``local-dir:path``, a folder, or ``org/name``.

    Keyword arguments are dotted recipe overrides, except the options of :func:`vla_blocks.hub.load_model`
    (``strict``, ``only``, ``exclude``, ``key_map``, ``expert_map``, ``allow_missing``, ``recipe``, ``revision``,
    ``device``, ``dtype``…), which go to the load. Load options that read weights are a
    :class:`~vla_blocks.errors.LoadError` for a recipe (there are no weights); ``device`` / ``dtype`` apply to both.
    """
    from . import hub
    from .errors import LoadError
    parsed = hub.parse_ref(ref)
    names = _load_options()
    options = {k: overrides.pop(k) for k in list(overrides) if k in names}
    overrides = _split_overrides(overrides)
    if parsed.kind == "recipe":
        bad = sorted(k for k in options if k not in _RECIPE_OPTIONS)
        if bad:
            raise LoadError(f"{bad[0]}=: a load option, but {parsed.target!r} is a recipe (no weights to load); "
                            f"use a saved model (local-dir:path, hf-hub:org/name or a folder)", bad[0])
        model = load_recipe(parsed.target, overrides).build()
        if options:
            model.to(device=options.get("device"), dtype=options.get("dtype"))
        return model
    return hub.load_model(ref, overrides, **options)


def model_config(ref, **overrides):
    """The typed config of a recipe or a saved model (no weights allocated); ``ref`` as in :func:`create_model`."""
    from . import hub
    parsed = hub.parse_ref(ref)
    if parsed.kind != "recipe":
        return hub.load_config(parsed, _split_overrides(overrides))
    return load_recipe(parsed.target, _split_overrides(overrides))
