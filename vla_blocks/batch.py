"""The batch contract of a policy: declared once per model class, checked once per public call.

A model class declares ``batch_schema`` (a :class:`BatchSchema` of :class:`Field` s) and ``batch_dims()``
(the sizes its shape patterns name: ``S`` the image side, ``L`` the prompt length, ``H`` the horizon…).
:class:`~vla_blocks.model.VLAModel` checks the batch at every public entry point (``forward``,
``sample_actions``, ``infer``, ``predict_action_chunk``, ``select_action``) before the model sees it; a call
from one entry point into another does not check again (the checked batch is a :class:`CheckedBatch`).

What a check does, in order, for each field of the call's mode (``train`` or ``infer``):

The check returns a shallow copy with masked entries zeroed; it never rescales.

1. presence: a required key that is missing (or None) is a :class:`~vla_blocks.errors.BatchError`;
2. type and dtype: tensors of the declared dtypes; images are **uint8 in [0, 255] or float in [0, 1]**, any
   other dtype or a float outside [0, 1] is an error (float images in [0, 255], int64 images, [−1, 1] images);
3. shape: the pattern's names are bound on first sight (``B`` by the first key) and must agree across keys
   (images of batch 4 with prompts of batch 2 is an error naming both); ``>=H`` / ``<=A`` bound the size;
   a batch of size 0 is an error;
4. masks: entries whose mask is False (a missing camera, prompt padding) are **zeroed** first, so NaN or
   garbage there never reaches the model, and are skipped by the checks below;
5. values: NaN or Inf is an error naming the key (opt out with ``model.allow_nonfinite = True``); integer
   ranges (token ids in ``[0, vocab)``) and float ranges (``time`` in [0, 1]) are checked;
6. the model converts images explicitly (pi0: float ``x·2 − 1``; uint8 resized with openpi's rounding, then
   ``x/255·2 − 1``; HALO: ``x/255`` for uint8), never guessing a range from the values.

The schema is printed by ``vla-blocks info RECIPE --batch``; ``BatchSchema.describe(dims)`` gives the lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from .errors import BatchError, MissingKeyError

__all__ = ["Field", "BatchSchema", "CheckedBatch", "IMAGE_DTYPES"]

IMAGE_DTYPES = ("uint8", "float")
_DTYPE_GROUPS = {
    "float": lambda t: t.is_floating_point(),
    "uint8": lambda t: t.dtype == torch.uint8,
    "bool": lambda t: t.dtype == torch.bool,
    "int": lambda t: not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool,
}
_KINDS = ("tensor", "image", "frames", "history", "text", "object")


@dataclass(frozen=True)
class Field:
    """One batch key.

    - ``shape``: a pattern, one entry per dim: an int, a name (``"B"``, ``"S"``: bound on first sight or given
      by the model's ``batch_dims()``), ``"*"`` (any), ``">=H"`` / ``"<=A"`` (bounded by a named size).
    - ``dtypes``: any of ``float``, ``uint8``, ``bool``, ``int``.
    - ``range``: inclusive ``(low, high)``, each a number, a dims name or None (unbounded).
    - ``modes``: the entry points' modes the field belongs to (``train``: ``forward``; ``infer``: inference).
    - ``optional``: may be absent (or None); ``required_if``: a boolean dims name, required only when it is true.
    - ``mask``: the key of a bool tensor whose shape is a prefix of this field's; False entries are zeroed and
      not checked.
    - ``kind``: ``tensor``; ``image`` (a tensor [..., 3, h, w] or [..., h, w, 3], uint8 or float in [0, 1]);
      ``frames`` (a list of such 3-D images); ``history`` (per sample a list of frames, or a tensor [B, T, …]);
      ``text`` (a list of strings, one per sample); ``object`` (any value of type ``type_``).
    """

    key: str
    shape: tuple = ()
    dtypes: tuple[str, ...] = ("float",)
    range: tuple[Any, Any] | None = None
    modes: tuple[str, ...] = ("train", "infer")
    optional: bool = False
    required_if: str | None = None
    mask: str | None = None
    kind: str = "tensor"
    type_: type | tuple | None = None
    doc: str = ""

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"Field {self.key!r}: unknown kind {self.kind!r} (valid: {', '.join(_KINDS)})")
        unknown = set(self.dtypes) - set(_DTYPE_GROUPS)
        if unknown:
            raise ValueError(f"Field {self.key!r}: unknown dtypes {sorted(unknown)} (valid: {', '.join(_DTYPE_GROUPS)})")


class CheckedBatch(dict):
    """A batch after :meth:`BatchSchema.check`: masked entries zeroed, ``checked`` (keys already checked),
    ``dims`` (the sizes bound, ``dims["B"]`` the batch size) and ``modes`` (modes it was checked for)."""

    checked: frozenset = frozenset()
    dims: dict = {}
    dims_by: dict = {}
    modes: frozenset = frozenset()

    @property
    def batch_size(self) -> int | None:
        """The batch size B bound by the check (None when no field has a batch dimension)."""
        return self.dims.get("B")


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


class _Binder:
    """Names of a shape pattern bound to sizes, remembering which key bound each."""

    def __init__(self, dims: Mapping[str, Any]):
        self.values: dict[str, int] = {k: v for k, v in dims.items() if isinstance(v, int) and not isinstance(v, bool)}
        self.by: dict[str, str] = {}

    def bind(self, name: str, size: int, key: str, what: str):
        if name in self.values:
            if self.values[name] != size:
                src = self.by.get(name)
                came = f"{key} has {name} = {size}"
                want = f"{src} has {name} = {self.values[name]}" if src else f"the model's {name} is {self.values[name]}"
                extra = " (batch sizes differ across keys)" if name == "B" else ""
                raise BatchError(f"batch key {key!r}: {what}: {came} but {want}{extra}", key)
        else:
            self.values[name] = size
            self.by[name] = key
        if name == "B" and size == 0:
            raise BatchError(f"batch key {key!r}: batch size 0 (a policy call needs at least one sample)", key)


def _pattern(shape: tuple) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


class BatchSchema:
    """The declared batch of a model: fields by key (see :class:`Field`) and a name for messages."""

    def __init__(self, name: str, fields: Iterable[Field]):
        self.name = name
        self.fields: dict[str, Field] = {}
        for f in fields:
            if f.key in self.fields:
                raise ValueError(f"BatchSchema {name!r}: field {f.key!r} declared twice")
            self.fields[f.key] = f

    def for_mode(self, mode: str) -> list[Field]:
        """The fields of this schema that ``mode`` (``train``, ``infer``, ...) reads."""
        return [f for f in self.fields.values() if mode in f.modes]

    # -- checking -----------------------------------------------------------------------------------------
    def check(self, batch: Mapping, mode: str, dims: Mapping[str, Any] | None = None, *,
              allow_nonfinite: bool = False) -> CheckedBatch:
        """Check ``batch`` for ``mode`` (``train`` / ``infer``) → a :class:`CheckedBatch` (a shallow copy with
        masked entries zeroed). Raises :class:`~vla_blocks.errors.BatchError`."""
        if not isinstance(batch, Mapping):
            raise BatchError(f"{self.name}: a batch must be a dict of named inputs, got {type(batch).__name__}")
        dims = dict(dims or {})
        done = batch.checked if isinstance(batch, CheckedBatch) else frozenset()
        out = CheckedBatch(batch)
        binder = _Binder(dims)
        if isinstance(batch, CheckedBatch):
            for k, v in batch.dims.items():
                binder.values.setdefault(k, v)
        checked = set(done)
        for f in self.for_mode(mode):
            if f.key in done:
                continue
            value = batch.get(f.key)
            if value is None:
                needed = not f.optional and (f.required_if is None or bool(dims.get(f.required_if)))
                if needed:
                    have = ", ".join(sorted(map(str, batch))) or "none"
                    raise MissingKeyError(f"{self.name} batch ({mode}): missing key {f.key!r} "
                                     f"({self._expect(f)}); keys given: {have}", f.key)
                continue
            out[f.key] = self._check_field(f, value, batch, binder, allow_nonfinite)
            checked.add(f.key)
        out.checked = frozenset(checked)
        out.dims = dict(binder.values)
        out.dims_by = {**getattr(batch, "dims_by", {}), **binder.by}
        out.modes = frozenset(getattr(batch, "modes", frozenset())) | {mode}
        return out

    def _expect(self, f: Field) -> str:
        if f.kind == "image":
            return f"uint8 in [0, 255] or float in [0, 1], {_pattern(f.shape)}"
        if f.kind in ("frames", "history", "text", "object"):
            return f.doc or f.kind
        rng = f" in [{f.range[0]}, {f.range[1]}]" if f.range else ""
        return f"{'/'.join(f.dtypes)} {_pattern(f.shape)}{rng}"

    def _check_field(self, f: Field, value, batch: Mapping, binder: _Binder, allow_nonfinite: bool):
        if f.kind == "object":
            if f.type_ is not None and not isinstance(value, f.type_):
                raise BatchError(f"batch key {f.key!r}: expected {f.doc or f.type_}, got {type(value).__name__}", f.key)
            return value
        if f.kind == "text":
            return self._check_text(f, value, binder)
        if f.kind == "frames":
            if not isinstance(value, (list, tuple)):
                raise BatchError(f"batch key {f.key!r}: expected a list of images, got {type(value).__name__}", f.key)
            for i, img in enumerate(value):
                self._check_image_tensor(f, img, f"{f.key}[{i}]", allow_nonfinite, frame=True)
            return value
        if f.kind == "history":
            return self._check_history(f, value, binder, allow_nonfinite)
        if not isinstance(value, torch.Tensor):
            raise BatchError(f"batch key {f.key!r}: expected a torch.Tensor ({self._expect(f)}), got "
                             f"{type(value).__name__}", f.key)
        if f.kind == "image":
            return self._check_image_field(f, value, batch, binder, allow_nonfinite)
        if not any(_DTYPE_GROUPS[d](value) for d in f.dtypes):
            raise BatchError(f"batch key {f.key!r}: expected dtype {'/'.join(f.dtypes)}, got {_dtype_name(value)}",
                             f.key)
        self._check_shape(f, value, binder)
        value = self._apply_mask(f, value, batch)
        valid = self._valid_values(f, value, batch)
        if value.is_floating_point() and not allow_nonfinite and not torch.isfinite(valid).all():
            bad = "NaN" if torch.isnan(valid).any() else "Inf"
            raise BatchError(f"batch key {f.key!r} contains {bad} (set model.allow_nonfinite = True to let it pass)",
                             f.key)
        self._check_range(f, valid, binder)
        return value

    def _check_shape(self, f: Field, value: torch.Tensor, binder: _Binder, what: str | None = None):
        shape = tuple(value.shape)
        key = what or f.key
        if len(shape) != len(f.shape):
            raise BatchError(f"batch key {key!r}: expected shape {_pattern(f.shape)}, got {list(shape)}", f.key)
        for spec, size in zip(f.shape, shape):
            if isinstance(spec, int):
                if size != spec:
                    raise BatchError(f"batch key {key!r}: expected shape {_pattern(f.shape)}, got {list(shape)}", f.key)
            elif spec == "*":
                continue
            elif spec.startswith((">=", "<=")):
                name = spec[2:]
                bound = binder.values.get(name)
                if bound is None:
                    continue
                ok = size >= bound if spec.startswith(">=") else size <= bound
                if not ok:
                    raise BatchError(f"batch key {key!r}: shape {list(shape)} breaks {_pattern(f.shape)} "
                                     f"({name} = {bound})", f.key)
            else:
                binder.bind(spec, size, key, f"shape {list(shape)} vs {_pattern(f.shape)}")

    def _mask_of(self, f: Field, value: torch.Tensor, batch: Mapping) -> torch.Tensor | None:
        if f.mask is None or batch.get(f.mask) is None:
            return None
        m = batch[f.mask]
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise BatchError(f"batch key {f.mask!r}: expected a bool tensor (the mask of {f.key!r}), got "
                             f"{getattr(m, 'dtype', type(m).__name__)}", f.mask)
        if tuple(m.shape) != tuple(value.shape[:m.ndim]):
            raise BatchError(f"batch key {f.mask!r}: shape {list(m.shape)} is not the leading shape of "
                             f"{f.key!r} {list(value.shape)}", f.mask)
        return m.to(value.device).reshape(*m.shape, *([1] * (value.ndim - m.ndim)))

    def _apply_mask(self, f: Field, value: torch.Tensor, batch: Mapping) -> torch.Tensor:
        m = self._mask_of(f, value, batch)
        if m is None:
            return value
        return torch.where(m, value, torch.zeros((), dtype=value.dtype, device=value.device))

    def _valid_values(self, f: Field, value: torch.Tensor, batch: Mapping) -> torch.Tensor:
        m = self._mask_of(f, value, batch)
        return value if m is None else value[m.expand_as(value)]

    def _check_range(self, f: Field, valid: torch.Tensor, binder: _Binder, what: str | None = None):
        if f.range is None or valid.numel() == 0 or valid.dtype == torch.bool:
            return
        lo, hi = (binder.values.get(b, None) if isinstance(b, str) else b for b in f.range)
        key = what or f.key
        v = valid.float() if valid.is_floating_point() else valid
        if lo is not None and (v < lo).any():
            raise BatchError(f"batch key {key!r}: values must be ≥ {lo}{self._name_of(f.range[0])}; got "
                             f"min {v.min().item()}", f.key)
        if hi is not None and (v > hi).any():
            raise BatchError(f"batch key {key!r}: values must be ≤ {hi}{self._name_of(f.range[1])}; got "
                             f"max {v.max().item()}", f.key)

    @staticmethod
    def _name_of(b) -> str:
        return f" ({b})" if isinstance(b, str) else ""

    # -- images ---------------------------------------------------------------------------------------------
    def _check_image_tensor(self, f: Field, img, what: str, allow_nonfinite: bool, frame: bool = False):
        if not isinstance(img, torch.Tensor):
            raise BatchError(f"batch key {what!r}: expected an image tensor, got {type(img).__name__}", f.key)
        if frame and (img.ndim != 3 or 3 not in (img.shape[0], img.shape[-1])):
            raise BatchError(f"batch key {what!r}: an image must be [3, H, W] or [H, W, 3], got {list(img.shape)}",
                             f.key)
        if img.dtype == torch.uint8:
            return
        if not img.is_floating_point():
            raise BatchError(f"batch key {what!r}: images must be uint8 in [0, 255] or float in [0, 1]; got "
                             f"{_dtype_name(img)}", f.key)
        if img.numel() == 0:
            return
        if not allow_nonfinite and not torch.isfinite(img).all():
            bad = "NaN" if torch.isnan(img).any() else "Inf"
            raise BatchError(f"batch key {what!r} contains {bad} (set model.allow_nonfinite = True to let it pass)",
                             f.key)
        finite = img[torch.isfinite(img)]
        if finite.numel():
            lo, hi = finite.min().item(), finite.max().item()
            if lo < 0.0 or hi > 1.0:
                hint = (" (looks like [0, 255]: pass uint8, or divide by 255)" if hi > 1.0 and lo >= 0.0 else
                        " (looks like [−1, 1]: pass (x + 1) / 2)" if lo >= -1.0 and hi <= 1.0 else "")
                raise BatchError(f"batch key {what!r}: float images must be in [0, 1], got [{lo:.4g}, {hi:.4g}]{hint}",
                                 f.key)

    def _check_image_field(self, f: Field, value: torch.Tensor, batch: Mapping, binder: _Binder,
                           allow_nonfinite: bool) -> torch.Tensor:
        if value.ndim != len(f.shape):
            raise BatchError(f"batch key {f.key!r}: expected shape {_pattern(f.shape)} with 3 channels first or last, "
                             f"got {list(value.shape)}", f.key)
        if 3 not in (value.shape[-3], value.shape[-1]):
            raise BatchError(f"batch key {f.key!r}: images need 3 channels (dim -3 or -1), got {list(value.shape)}",
                             f.key)
        lead = Field(f.key, f.shape[:-3], ("uint8", "float"))
        self._check_shape(lead, value[(..., 0, 0, 0)], binder)
        if value.dtype != torch.uint8 and not value.is_floating_point():
            self._check_image_tensor(f, value, f.key, allow_nonfinite)  # raises: wrong dtype
        value = self._apply_mask(f, value, batch)
        self._check_image_tensor(f, value, f.key, allow_nonfinite)
        return value

    def _check_history(self, f: Field, value, binder: _Binder, allow_nonfinite: bool):
        if isinstance(value, torch.Tensor):
            if value.ndim != 5:
                raise BatchError(f"batch key {f.key!r}: a history tensor must be [B, T, 3, H, W] or [B, T, H, W, 3], "
                                 f"got {list(value.shape)}", f.key)
            binder.bind("B", value.shape[0], f.key, "history batch")
            for b in range(value.shape[0]):
                for t in range(value.shape[1]):
                    self._check_image_tensor(f, value[b, t], f"{f.key}[{b}][{t}]", allow_nonfinite, frame=True)
            if value.shape[1] == 0:
                raise BatchError(f"batch key {f.key!r}: every sample needs at least one history frame", f.key)
            return value
        if not isinstance(value, (list, tuple)):
            raise BatchError(f"batch key {f.key!r}: expected per sample a list of frames (or a tensor [B, T, …]), "
                             f"got {type(value).__name__}", f.key)
        binder.bind("B", len(value), f.key, "number of histories")
        for b, frames in enumerate(value):
            frames = list(frames) if isinstance(frames, torch.Tensor) and frames.ndim == 4 else frames
            if not isinstance(frames, (list, tuple)) or not frames:
                raise BatchError(f"batch key {f.key!r}[{b}]: expected a non-empty list of frames, got "
                                 f"{type(frames).__name__}{'' if frames else ' (empty)'}", f.key)
            for t, img in enumerate(frames):
                self._check_image_tensor(f, img, f"{f.key}[{b}][{t}]", allow_nonfinite, frame=True)
        return value

    def _check_text(self, f: Field, value, binder: _Binder):
        if isinstance(value, str):
            n = binder.values.get("B")
            if n not in (None, 1):
                raise BatchError(f"batch key {f.key!r}: one string for {n} samples; pass a list of {n} strings", f.key)
            binder.bind("B", 1, f.key, "number of strings")
            return [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
            raise BatchError(f"batch key {f.key!r}: expected a list of strings, got {type(value).__name__}", f.key)
        binder.bind("B", len(value), f.key, "number of strings")
        return list(value)

    # -- documentation --------------------------------------------------------------------------------------
    def describe(self, dims: Mapping[str, Any] | None = None) -> list[str]:
        """One line per field and mode: key, dtypes, shape pattern, range, required/optional, mask; then the sizes."""
        dims = dict(dims or {})
        lines = []
        width = max((len(k) for k in self.fields), default=4)
        for f in self.fields.values():
            need = "optional" if f.optional else (f"required if {f.required_if}" if f.required_if else "required")
            if f.required_if is not None and f.required_if in dims and not f.optional:
                need = "required" if dims[f.required_if] else "not used"
            if f.kind == "image":
                what = f"uint8 [0, 255] | float [0, 1] {_pattern(f.shape)}" + (f" ({f.doc})" if f.doc else "")
            elif f.kind in ("frames", "history", "text", "object"):
                what = f.doc or f.kind
            else:
                rng = f" in [{f.range[0]}, {f.range[1]}]" if f.range else ""
                what = f"{'/'.join(f.dtypes)} {_pattern(f.shape)}{rng}"
            extra = f"; entries where {f.mask} is False are zeroed" if f.mask else ""
            lines.append(f"{f.key:<{width}}  {what}  [{'/'.join(f.modes)}; {need}{extra}]"
                         + (f"  {f.doc}" if f.doc and f.kind == "tensor" else ""))
        sizes = ", ".join(f"{k}={v}" for k, v in dims.items() if not isinstance(v, bool) and isinstance(v, int))
        if sizes:
            lines.append(f"sizes: {sizes}; B is the batch size (≥ 1, the same for every key)")
        return lines


def fields_of(*groups: Sequence[Field]) -> list[Field]:
    """Concatenate field groups (a subclass's schema = its parent's fields + its own)."""
    return [f for g in groups for f in g]
