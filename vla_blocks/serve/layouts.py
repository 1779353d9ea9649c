"""Observation layouts: which keys of an openpi observation dict become which lerobot-style frame keys.

A client (a simulator loop, a robot) sends a flat or nested dict in openpi's example layouts; the server turns it
into one lerobot-style frame, the input of the model's processor (``vla_blocks.data``):

- ``observation.images.<cam>``: float32 ``[3, H, W]`` in ``[0, 1]`` (uint8 ``HWC``/``CHW`` arrays are scaled by
  1/255; float arrays must already lie in ``[0, 1]``); a 4-D array is a stack of frames, oldest first
  (``[T, 3, H, W]`` out: HALO's history);
- ``observation.state``: float32 ``[S]``, the concatenation of the layout's state keys in order;
- ``task``: the prompt string.

Built-in layouts (openpi's ``examples/*/main.py`` clients):

========  =====================================================================================================
libero    ``observation/image``, ``observation/wrist_image`` (HWC uint8), ``observation/state`` [8], ``prompt``
aloha     ``images/cam_high`` (+ optional ``cam_left_wrist``, ``cam_right_wrist``, ``cam_low``; CHW uint8),
          ``state`` [14], ``prompt``
droid     ``observation/exterior_image_1_left``, ``observation/wrist_image_left`` (HWC uint8),
          ``observation/joint_position`` [7] + ``observation/gripper_position`` [1] → state [8], ``prompt``
========  =====================================================================================================

A ``/`` in a key first looks the whole key up, then walks nested dicts (ALOHA sends ``{"images": {"cam_high":
...}}``). Your own layout is a YAML file::

    name: my-arm
    images:                                   # frame camera name -> observation key (+ optional array layout)
      front: {key: cam/front, layout: hwc}    #   hwc | chw | auto (auto: a last axis of 3 means HWC)
      wrist: cam/wrist
    state: [arm/joints, arm/gripper]          # concatenated in this order
    state_dim: 8                              # optional check
    prompt: instruction                       # optional; without it every request uses the server's --prompt
    optional_images: [wrist]                  # optional cameras: the server masks the slot of a missing one

Every mistake raises :class:`ObservationError` naming the key and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["ObservationError", "ImageSpec", "ObservationLayout", "LAYOUTS", "load_layout", "lookup"]

IMAGE_PREFIX = "observation.images."
STATE_KEY = "observation.state"
TASK_KEY = "task"


class ObservationError(ValueError):
    """An observation that does not match the server's layout (missing key, wrong shape/dtype, NaN...)."""


def lookup(obs: Mapping, key: str) -> Any:
    """``obs[key]``, or for ``a/b/c`` the nested ``obs["a"]["b"]["c"]``; raises :class:`ObservationError`."""
    if not isinstance(obs, Mapping):
        raise ObservationError(f"an observation must be a dict (msgpack map), got {type(obs).__name__}")
    if key in obs:
        return obs[key]
    node: Any = obs
    parts = key.split("/")
    for i, part in enumerate(parts):
        if not isinstance(node, Mapping) or part not in node:
            where = "/".join(parts[:i]) or "the observation"
            have = sorted(map(str, node.keys())) if isinstance(node, Mapping) else type(node).__name__
            raise ObservationError(f"missing observation key {key!r} ({where!s} has {have})")
        node = node[part]
    return node


@dataclass(frozen=True)
class ImageSpec:
    """Where an image is in a client's observation: ``key`` (``a/b`` walks nested dicts) and its ``layout`` (``hwc``,
    ``chw`` or ``auto``: guessed from the shape)."""

    key: str              # observation key (``a/b`` walks nested dicts)
    layout: str = "auto"  # hwc | chw | auto

    def __post_init__(self):
        if self.layout not in ("hwc", "chw", "auto"):
            raise ObservationError(f"image layout of {self.key!r} must be hwc, chw or auto, got {self.layout!r}")


def _as_array(value, key: str) -> np.ndarray:
    if isinstance(value, (int, float, np.generic)) and not isinstance(value, bool):
        value = np.asarray(value)
    if isinstance(value, (list, tuple)):
        try:
            value = np.asarray(value)
        except ValueError as e:
            raise ObservationError(f"observation {key!r}: a ragged list cannot be an array ({e})") from e
    if not isinstance(value, np.ndarray):
        raise ObservationError(f"observation {key!r} must be a numpy array, got {type(value).__name__}")
    if value.dtype.kind not in "biuf":
        raise ObservationError(f"observation {key!r} has dtype {value.dtype}; expected a numeric array")
    return value


def to_chw_float(value, key: str, layout: str = "auto") -> np.ndarray:
    """An image array → float32 ``[3, H, W]`` in ``[0, 1]``; raises :class:`ObservationError` naming ``key``."""
    arr = _as_array(value, key)
    if arr.ndim == 4:  # a stack of frames, oldest first (HALO's history): each converted alike
        if arr.shape[0] == 0:
            raise ObservationError(f"observation {key!r}: an empty stack of frames")
        return np.stack([to_chw_float(a, f"{key}[{t}]", layout) for t, a in enumerate(arr)])
    if arr.ndim != 3:
        raise ObservationError(f"observation {key!r}: an image must have 3 dims (HWC or CHW; a stack of frames 4), "
                               f"got shape {arr.shape}")
    if layout == "auto":
        layout = "hwc" if arr.shape[-1] == 3 else "chw" if arr.shape[0] == 3 else None
        if layout is None:
            raise ObservationError(f"observation {key!r}: shape {arr.shape} has no axis of 3 channels (HWC or CHW)")
    if layout == "hwc":
        if arr.shape[-1] != 3:
            raise ObservationError(f"observation {key!r}: expected HWC with 3 channels, got shape {arr.shape}")
        arr = arr.transpose(2, 0, 1)
    elif arr.shape[0] != 3:
        raise ObservationError(f"observation {key!r}: expected CHW with 3 channels, got shape {arr.shape}")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ObservationError(f"observation {key!r}: empty image of shape {arr.shape}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr, dtype=np.float32) / np.float32(255.0)
    if arr.dtype.kind != "f":
        raise ObservationError(f"observation {key!r}: images must be uint8 (0-255) or float in [0, 1], "
                               f"got {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise ObservationError(f"observation {key!r}: the image contains NaN or infinite values")
    if out.min() < 0.0 or out.max() > 1.0:
        raise ObservationError(f"observation {key!r}: float images must lie in [0, 1], got range "
                               f"[{out.min():.3g}, {out.max():.3g}] (send uint8 for 0-255 pixels)")
    return out


def to_vector(value, key: str) -> np.ndarray:
    """The observation ``value`` at ``key`` as a finite float32 1-D vector (a scalar becomes one value);
    :class:`ObservationError` names the key otherwise."""
    arr = _as_array(value, key)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ObservationError(f"observation {key!r}: expected a 1-D vector, got shape {arr.shape}")
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        bad = np.flatnonzero(~np.isfinite(out)).tolist()
        raise ObservationError(f"observation {key!r} contains NaN or infinite values at {bad}")
    return out


@dataclass(frozen=True)
class ObservationLayout:
    """Maps an openpi observation dict onto a lerobot-style frame (see the module docstring)."""

    name: str
    images: Mapping[str, ImageSpec]           # frame camera name -> where it is in the observation
    state: tuple[str, ...] = ()
    prompt: str | None = "prompt"
    state_dim: int | None = None
    optional_images: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = set(self.optional_images) - set(self.images)
        if unknown:
            raise ObservationError(f"layout {self.name!r}: optional_images {sorted(unknown)} are not among its "
                                   f"images {sorted(self.images)}")

    def spec(self) -> dict:
        """The expected observation keys (printed by ``vla-blocks serve --print-spec``, sent in the metadata)."""
        out: dict[str, Any] = {}
        for cam, im in self.images.items():
            opt = " (optional)" if cam in self.optional_images else ""
            out[im.key] = f"image {im.layout.upper() if im.layout != 'auto' else 'HWC or CHW'}, uint8 or float " \
                          f"in [0,1] -> {IMAGE_PREFIX}{cam}{opt}"
        for k in self.state:
            out[k] = f"float vector -> part of {STATE_KEY}" + (f" [{self.state_dim}]" if self.state_dim else "")
        if self.prompt:
            out[self.prompt] = f"str -> {TASK_KEY}"
        return out

    def frame(self, obs: Mapping, default_prompt: str | None = None) -> dict:
        """One observation → one frame of numpy arrays (float32 CHW images, float32 state) and the task string."""
        if not isinstance(obs, Mapping):
            raise ObservationError(f"an observation must be a dict (msgpack map), got {type(obs).__name__}")
        frame: dict[str, Any] = {}
        for cam, im in self.images.items():
            try:
                value = lookup(obs, im.key)
            except ObservationError:
                if cam in self.optional_images:
                    continue
                raise
            frame[IMAGE_PREFIX + cam] = to_chw_float(value, im.key, im.layout)
        if self.state:
            parts = [to_vector(lookup(obs, k), k) for k in self.state]
            state = np.concatenate(parts) if len(parts) > 1 else parts[0]
            if self.state_dim is not None and state.shape[0] != self.state_dim:
                got = " + ".join(f"{k} [{p.shape[0]}]" for k, p in zip(self.state, parts))
                raise ObservationError(f"layout {self.name!r} expects a state of {self.state_dim} values, got "
                                       f"{state.shape[0]} ({got})")
            frame[STATE_KEY] = state
        if self.prompt:
            try:
                prompt = lookup(obs, self.prompt)
            except ObservationError:
                if default_prompt is None:
                    raise
                prompt = default_prompt
        else:
            prompt = default_prompt
        if prompt is not None:
            if isinstance(prompt, bytes):
                try:
                    prompt = prompt.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ObservationError(f"observation {self.prompt!r}: bytes that are not UTF-8 ({e})") from e
            if isinstance(prompt, np.ndarray) and prompt.dtype.kind in "US" and prompt.size == 1:
                prompt = str(prompt.reshape(()).item())
            if not isinstance(prompt, str):
                raise ObservationError(f"observation {self.prompt!r} must be a string, got {type(prompt).__name__}")
            frame[TASK_KEY] = prompt
        return frame

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping, where: str = "layout") -> "ObservationLayout":
        """A layout from a mapping (``name``, ``images``, ``state``, ``prompt``, ``state_dim``, ``optional_images``);
        errors name ``where`` and the key."""
        if not isinstance(data, Mapping):
            raise ObservationError(f"{where}: a layout must be a mapping, got {type(data).__name__}")
        allowed = {"name", "images", "state", "prompt", "state_dim", "optional_images"}
        unknown = set(data) - allowed
        if unknown:
            raise ObservationError(f"{where}: unknown layout keys {sorted(unknown)} (valid: {sorted(allowed)})")
        images_in = data.get("images") or {}
        if not isinstance(images_in, Mapping):
            raise ObservationError(f"{where}: 'images' must map camera names to observation keys")
        images = {}
        for cam, spec in images_in.items():
            if isinstance(spec, str):
                images[str(cam)] = ImageSpec(spec)
            elif isinstance(spec, Mapping) and "key" in spec and set(spec) <= {"key", "layout"}:
                images[str(cam)] = ImageSpec(str(spec["key"]), str(spec.get("layout", "auto")).lower())
            else:
                raise ObservationError(f"{where}: images.{cam} must be a key or {{key: ..., layout: hwc|chw|auto}}, "
                                       f"got {spec!r}")
        state = data.get("state") or ()
        if isinstance(state, str):
            state = (state,)
        if not isinstance(state, (list, tuple)) or not all(isinstance(s, str) for s in state):
            raise ObservationError(f"{where}: 'state' must be a key or a list of keys, got {state!r}")
        prompt = data.get("prompt", "prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ObservationError(f"{where}: 'prompt' must be a key or null, got {prompt!r}")
        sd = data.get("state_dim")
        if sd is not None and (not isinstance(sd, int) or sd <= 0):
            raise ObservationError(f"{where}: 'state_dim' must be a positive int, got {sd!r}")
        if not images and not state:
            raise ObservationError(f"{where}: a layout needs at least one image or state key")
        return cls(name=str(data.get("name", where)), images=images, state=tuple(state), prompt=prompt,
                   state_dim=sd, optional_images=tuple(data.get("optional_images") or ()))


LAYOUTS: dict[str, ObservationLayout] = {
    "libero": ObservationLayout(
        "libero", {"image": ImageSpec("observation/image", "hwc"),
                   "wrist_image": ImageSpec("observation/wrist_image", "hwc")},
        state=("observation/state",), state_dim=8),
    "aloha": ObservationLayout(
        "aloha", {cam: ImageSpec(f"images/{cam}", "chw")  # openpi's pi0 slots: high, left wrist, right wrist
                  for cam in ("cam_high", "cam_left_wrist", "cam_right_wrist", "cam_low")},
        state=("state",), state_dim=14, optional_images=("cam_low", "cam_left_wrist", "cam_right_wrist")),
    "droid": ObservationLayout(
        "droid", {"exterior_image_1_left": ImageSpec("observation/exterior_image_1_left", "hwc"),
                  "wrist_image_left": ImageSpec("observation/wrist_image_left", "hwc")},
        state=("observation/joint_position", "observation/gripper_position"), state_dim=8),
    # vla_blocks.envs' Meta-World evaluation client (vla-blocks eval --server): the corner4 camera, its state
    "metaworld": ObservationLayout(
        "metaworld", {"corner4": ImageSpec("observation/image", "hwc")}, state=("observation/state",)),
}


def load_layout(name_or_path: str | Path) -> ObservationLayout:
    """A built-in layout by name (``libero``, ``aloha``, ``droid``) or a YAML file."""
    name = str(name_or_path)
    if name in LAYOUTS:
        return LAYOUTS[name]
    path = Path(name)
    if path.suffix.lower() in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ObservationError(f"observation layout file {name!r} does not exist")
        import yaml
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ObservationError(f"{name}: not valid YAML ({e})") from e
        return ObservationLayout.from_dict(data, where=name)
    raise ObservationError(f"unknown observation layout {name!r}: use one of {sorted(LAYOUTS)} or a YAML file")
