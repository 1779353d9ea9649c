"""Per-policy processors: dataset frames (or raw observations) → a model's batch, and model actions → raw actions.

A processor is built from a model (its recipe/config) and a dataset's features and statistics, and is saved
beside the model (``save_pretrained``: ``processor_config.json``, ``processor_stats.json``, ``tokenizer.json``),
so training, evaluation and serving use the same object::

    ds = LeRobotDataset(root, delta_timestamps=proc_delta)               # proc.delta_timestamps(ds.fps)
    proc = make_processor(model, ds.meta, stats=stats)                   # installs stats into model.normalizer
    batch = proc([ds[i] for i in range(8)])                              # the keys of model.demo_batch()
    loss, _ = model(batch)
    raw = proc.postprocess(model.predict_action_chunk(proc(obs)))       # [B, H, dataset action dims]

What each policy gets (the models normalise state/actions themselves with ``model.normalizer``; raw values go in):

- **pi0 / pi0.5 / ACoT** (``Pi0Config`` / ``ACoTConfig``): ``images`` [B, n_cam, 3, S, S] in [0, 1] (camera
  slots filled from ``cameras`` in order, resize-with-pad by :func:`vla_blocks.encoders.preprocess_images`;
  a slot without a camera is black and masked), ``image_masks``, ``tokenized_prompt`` / ``_mask`` (BOS + the
  prompt of :func:`vla_blocks.models.pi0.pi05_prompt`: pi0.5 with ``discrete_state`` puts the state, normalised
  by the model's normaliser and discretised, into the prompt; otherwise the cleaned task and ``"\\n"``),
  ``state`` [B, S] (raw), ``actions`` [B, chunk, A] (raw; the chunk comes from ``delta_timestamps``) and
  ``actions_is_pad``.
- **HALO** (``HaloConfig``): the history of one camera (``history_frames`` frames from ``delta_timestamps``)
  and the task; training batches are ``model.collate`` of reactive :class:`HaloSample` s with actions
  normalised by the processor's own normaliser (HALO's model has none) and zero-padded to ``action_dim``;
  inference batches are ``{"history", "instruction"}`` and :meth:`PolicyProcessor.postprocess` un-normalises.

Statistics (lerobot ``stats.json`` layout, e.g. from ``vla-blocks stats``): ``normalization`` picks
``mean_std`` (z-score), ``quantiles`` (q01/q99) or ``min_max`` (the quantile formula with min/max), per key;
the default follows the model's config (pi0/ACoT z-score, pi0.5 quantiles). lerobot's ``stats.json`` q01/q99
are averages of per-episode quantiles (reference lerobot_dataset.md §7): prefer ``vla-blocks stats`` output.

Augmentation (openpi-style, plain torch, only after :meth:`PolicyProcessor.train`): random crop (``crop_scale``
of the area side) resized back and a small rotation for non-wrist cameras, colour jitter (brightness, contrast,
saturation) for every camera.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders import preprocess_images
from ..normalize import Normalizer

__all__ = ["ProcessorConfig", "PolicyProcessor", "make_processor", "ImageAugmentation", "char_tokenizer",
           "CONFIG_NAME", "STATS_NAME", "TOKENIZER_NAME"]

CONFIG_NAME = "processor_config.json"
STATS_NAME = "processor_stats.json"
TOKENIZER_NAME = "tokenizer.json"
NORM_MODES = {"mean_std": "zscore", "quantiles": "quantile", "min_max": "quantile"}
MODEL_KEYS = {"state": "state", "action": "actions"}  # processor role -> normaliser key of the models


# ---------------------------------------------------------------------------------------------- tokenizers
def char_tokenizer():
    """A character-level tokenizer over printable ASCII and ``\\n`` (ids 3..98; 0 pad, 1 unknown, 2 BOS), for
    models trained from scratch with a small vocabulary (the tiny recipes). A ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, models
    chars = ["[PAD]", "[UNK]", "[BOS]"] + [chr(c) for c in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="[UNK]"))
    return tok


def _bos_id(tok) -> int:
    for name in ("<bos>", "[BOS]", "<s>", "<|im_start|>"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise KeyError("the tokenizer has no BOS token (<bos>, [BOS], <s> or <|im_start|>)")


# ---------------------------------------------------------------------------------------------- augmentation
@dataclass
class ImageAugmentation:
    """openpi-style image augmentation in torch on float [B, 3, H, W] images in [0, 1].

    Non-wrist cameras: a random crop of ``crop_scale`` of each side resized back, and a rotation in
    ``±rotate_deg``; every camera: brightness ``±brightness``, contrast ``±contrast``, saturation ``±saturation``
    (multiplicative factors in [1 − x, 1 + x]), clamped to [0, 1]."""

    crop_scale: float = 0.95
    rotate_deg: float = 5.0
    brightness: float = 0.3
    contrast: float = 0.4
    saturation: float = 0.5

    def __call__(self, x: torch.Tensor, wrist: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        B = x.shape[0]

        def u(lo, hi):
            return torch.rand(B, generator=generator) * (hi - lo) + lo

        if not wrist:
            s = self.crop_scale
            ang = u(-self.rotate_deg, self.rotate_deg) * math.pi / 180
            tx, ty = u(-(1 - s), 1 - s), u(-(1 - s), 1 - s)
            cos, sin = torch.cos(ang) * s, torch.sin(ang) * s
            theta = torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)
            grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = x * u(1 - self.brightness, 1 + self.brightness).to(x)[:, None, None, None]
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * u(1 - self.contrast, 1 + self.contrast).to(x)[:, None, None, None] + mean
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
        x = (x - gray) * u(1 - self.saturation, 1 + self.saturation).to(x)[:, None, None, None] + gray
        return x.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------- config
@dataclass
class ProcessorConfig:
    """Everything a processor needs besides statistics and tokenizer (saved as ``processor_config.json``).

    - ``policy``: ``pi0`` | ``pi05`` | ``acot`` | ``halo``.
    - ``cameras``: dataset camera keys in the model's slot order (``None``: an empty, masked slot).
    - ``state_key`` / ``action_key``: dataset features of the state and actions (``state_key`` None: no state).
    - ``image_size``: the square side images are resized-with-pad to (None: HALO, native sizes).
    - ``num_cameras``, ``max_token_len``, ``chunk_length`` (raw action frames a training sample needs),
      ``action_dim`` (model width), ``real_action_dim`` (the dataset's action width), ``history_frames`` (HALO).
    - ``discrete_state``: pi0.5's state-in-prompt; ``normalization``: ``{role: mean_std|quantiles|min_max}``
      for ``state`` and ``action``; ``augment``: :class:`ImageAugmentation` fields or None; ``wrist_keys``:
      cameras without crop/rotation.
    """

    policy: str
    cameras: list[str | None]
    state_key: str | None = "observation.state"
    action_key: str = "action"
    image_size: int | None = 224
    num_cameras: int = 3
    max_token_len: int = 48
    chunk_length: int = 50
    action_dim: int = 32
    real_action_dim: int | None = None
    state_dim: int | None = None
    history_frames: int = 1
    discrete_state: bool = False
    normalization: dict[str, str] = field(default_factory=lambda: {"state": "mean_std", "action": "mean_std"})
    augment: dict | None = None
    wrist_keys: list[str] = field(default_factory=list)
    prompt_template: str | None = None

    def __post_init__(self):
        if self.policy not in ("pi0", "pi05", "acot", "halo"):
            raise ValueError(f"policy must be pi0, pi05, acot or halo, got {self.policy!r}")
        for role, m in self.normalization.items():
            if m not in NORM_MODES:
                raise ValueError(f"normalization.{role}: {m!r} (valid: {', '.join(NORM_MODES)})")


def _policy_of(model) -> str:
    name = type(model.config).__name__
    if name == "HaloConfig":
        return "halo"
    if name == "ACoTConfig":
        return "acot"
    if name == "Pi0Config":
        return "pi05" if model.config.pi05 else "pi0"
    raise TypeError(f"no processor for {type(model).__name__} ({name}); policies: pi0, pi0.5, ACoT, HALO")


# ---------------------------------------------------------------------------------------------- processor
class PolicyProcessor:
    """Frames → model batch and model actions → raw actions (see the module docstring)."""

    def __init__(self, config: ProcessorConfig, stats: Mapping[str, Mapping[str, Any]] | None = None,
                 tokenizer=None, model=None):
        self.config = config
        self.stats = {k: {s: np.asarray(v, dtype=np.float64) for s, v in st.items()} for k, st in (stats or {}).items()}
        self.tokenizer = tokenizer
        self.model = None
        self.training = False
        self.generator: torch.Generator | None = None
        self.augmentation = ImageAugmentation(**config.augment) if config.augment is not None else None
        self.normalizer = self._build_normalizer()
        if model is not None:
            self.bind(model)

    # -- statistics ------------------------------------------------------------------------------------
    def _role_stats(self, role: str) -> dict | None:
        c = self.config
        key = c.state_key if role == "state" else c.action_key
        if key is None or key not in self.stats:
            return None
        st = self.stats[key]
        mode = c.normalization.get(role, "mean_std")
        if mode == "mean_std":
            need = ("mean", "std")
        elif mode == "quantiles":
            need = ("q01", "q99")
        else:
            need = ("min", "max")
        missing = [s for s in need if s not in st]
        if missing:
            raise ValueError(f"stats of {key!r} lack {missing}, needed for {mode} normalisation of {role} "
                             f"(compute them with `vla-blocks stats DATASET`)")
        out = {s: st[s].reshape(-1) for s in ("mean", "std", "q01", "q99") if s in st}
        if mode == "min_max":  # the quantile formula with min/max in place of q01/q99
            out["q01"], out["q99"] = st["min"].reshape(-1), st["max"].reshape(-1)
        return out

    def _build_normalizer(self) -> Normalizer:
        modes = {MODEL_KEYS[r]: NORM_MODES[m] for r, m in self.config.normalization.items() if r in MODEL_KEYS}
        norm = Normalizer("zscore", modes=modes)
        for role in ("state", "action"):
            st = self._role_stats(role)
            if st is not None:
                norm.set_stats(MODEL_KEYS[role], **st)
        return norm

    def bind(self, model) -> "PolicyProcessor":
        """Use ``model`` (its collate for HALO) and install the statistics into ``model.normalizer``."""
        policy = _policy_of(model)
        if policy != self.config.policy:
            raise ValueError(f"this processor is for {self.config.policy}, the model is {policy}")
        self.model = model
        norm = getattr(model, "normalizer", None)
        if norm is not None:
            for key in self.normalizer.keys():
                norm.modes[key] = self.normalizer.mode_of(key)
                norm.set_stats(key, **self.normalizer.stats(key))
        return self

    # -- modes -----------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "PolicyProcessor":
        """Augmentation on (when configured)."""
        self.training = mode
        return self

    def eval(self) -> "PolicyProcessor":
        """Switch to inference (no augmentation); returns self."""
        return self.train(False)

    def delta_timestamps(self, fps: int) -> dict[str, list[float]]:
        """The ``delta_timestamps`` a dataset needs for this policy's training samples."""
        c = self.config
        out = {c.action_key: [k / fps for k in range(c.chunk_length)]}
        if c.policy == "halo" and c.history_frames > 1 and c.cameras and c.cameras[0]:
            out[c.cameras[0]] = [(k - c.history_frames + 1) / fps for k in range(c.history_frames)]
        return out

    # -- frames -> batch -------------------------------------------------------------------------------
    def _collate(self, frames) -> tuple[dict, int]:
        if isinstance(frames, (list, tuple)):
            if not frames:
                raise ValueError("no frames")
            return torch.utils.data.default_collate(list(frames)), len(frames)
        if not isinstance(frames, Mapping):
            raise TypeError(f"frames must be a frame dict, a list of them or a collated dict, got {type(frames).__name__}")
        task = frames.get("task")
        if isinstance(task, str):  # one frame
            return torch.utils.data.default_collate([dict(frames)]), 1
        if task is None:
            raise KeyError("frames have no 'task' (the prompt)")
        return dict(frames), len(task)

    def _current(self, x: torch.Tensor, frame_ndim: int) -> torch.Tensor:
        """The last step of a windowed value ``[B, T, ...]`` (``frame_ndim`` = dims of one step incl. batch)."""
        x = torch.as_tensor(x)
        return x[:, -1] if x.ndim == frame_ndim + 1 else x

    def _camera(self, batch: dict, key: str) -> torch.Tensor:
        if key not in batch:
            raise KeyError(f"camera {key!r} is not in the frames (have {sorted(k for k in batch if 'image' in k)})")
        return self._current(batch[key], 4).float()

    def _augment(self, x: torch.Tensor, key: str) -> torch.Tensor:
        if self.training and self.augmentation is not None:
            return self.augmentation(x, wrist=key in self.config.wrist_keys, generator=self.generator)
        return x

    def __call__(self, frames) -> dict:
        batch, B = self._collate(frames)
        if self.config.policy == "halo":
            return self._halo_batch(batch, B)
        return self._pi0_batch(batch, B)

    def _pi0_batch(self, batch: dict, B: int) -> dict:
        c = self.config
        S = c.image_size
        images, masks = [], []
        for slot in range(c.num_cameras):
            key = c.cameras[slot] if slot < len(c.cameras) else None
            if key is None:
                images.append(torch.zeros(B, 3, S, S))  # black in [0, 1]
                masks.append(torch.zeros(B, dtype=torch.bool))
                continue
            x = self._augment(self._camera(batch, key), key)
            images.append(preprocess_images(x, size=S, float_range="unit", out_range="unit"))
            masks.append(torch.ones(B, dtype=torch.bool))
        out = {"images": torch.stack(images, 1), "image_masks": torch.stack(masks, 1)}
        state = None
        if c.state_key is not None:
            if c.state_key not in batch:
                raise KeyError(f"state feature {c.state_key!r} is not in the frames")
            state = self._current(batch[c.state_key], 2).float()
            out["state"] = state
        ids, mask = self.tokenize(list(batch["task"]), state)
        out["tokenized_prompt"], out["tokenized_prompt_mask"] = ids, mask
        if c.action_key in batch:
            a = torch.as_tensor(batch[c.action_key]).float()
            if a.ndim == 2:
                a = a[:, None]
            if a.shape[1] < c.chunk_length:
                raise ValueError(f"{c.action_key!r} has {a.shape[1]} steps, the model trains on {c.chunk_length}: "
                                 f"load the dataset with delta_timestamps=proc.delta_timestamps(fps)")
            out["actions"] = a[:, :c.chunk_length]
            pad = batch.get(f"{c.action_key}_is_pad")
            if pad is not None:
                out["actions_is_pad"] = torch.as_tensor(pad)[:, :c.chunk_length]
        return out

    def prompt(self, task: str, state: torch.Tensor | None) -> str:
        """The pi0.5 prompt text of ``task`` (:func:`~vla_blocks.models.pi0.pi05_prompt`): with ``discrete_state``, the
        task and the normalised state in 256 bins, ending in ``Action:``; else the cleaned task and a newline
        (openpi's start-of-answer token)."""
        from ..models.pi0 import pi05_prompt
        if self.config.discrete_state:
            if state is None:
                raise ValueError("pi0.5 with discrete_state needs the state (state_key)")
            return pi05_prompt(task, self.normalizer.normalize("state", state[None])[0])
        return pi05_prompt(task) + "\n"

    def tokenize(self, tasks: Sequence[str], state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """BOS + prompt ids, truncated / zero-padded to ``max_token_len`` → ``(ids [B, L], mask [B, L])``."""
        if self.tokenizer is None:
            raise ValueError("this processor has no tokenizer")
        L = self.config.max_token_len
        bos = _bos_id(self.tokenizer)
        ids = torch.zeros(len(tasks), L, dtype=torch.long)
        mask = torch.zeros(len(tasks), L, dtype=torch.bool)
        for b, task in enumerate(tasks):
            text = self.prompt(task, None if state is None else state[b])
            t = ([bos] + list(self.tokenizer.encode(text, add_special_tokens=False).ids))[:L]
            ids[b, :len(t)] = torch.tensor(t)
            mask[b, :len(t)] = True
        return ids, mask

    def _halo_batch(self, batch: dict, B: int) -> dict:
        from ..models.halo import HaloSample
        c = self.config
        key = c.cameras[0]
        frames = torch.as_tensor(batch[key]).float()
        if frames.ndim == 4:
            frames = frames[:, None]
        T = min(c.history_frames, frames.shape[1])
        hist = frames[:, -T:]
        hist = torch.stack([self._augment(hist[:, t], key) for t in range(T)], 1)
        tasks = list(batch["task"])
        if c.action_key not in batch:
            return {"history": [list(hist[b]) for b in range(B)], "instruction": tasks}
        if self.model is None:
            raise RuntimeError("a HALO training batch needs the model (its collate): make_processor(model, ...) "
                               "or proc.bind(model)")
        a = torch.as_tensor(batch[c.action_key]).float()
        if a.ndim == 2:
            a = a[:, None]
        a = self.normalizer.normalize("actions", a[:, :c.chunk_length])
        if a.shape[-1] > c.action_dim:
            raise ValueError(f"{c.action_key!r} has {a.shape[-1]} dims, HALO's action_dim is {c.action_dim}")
        a = F.pad(a, (0, c.action_dim - a.shape[-1]))
        samples = [HaloSample(list(hist[b]), tasks[b], a[b]) for b in range(B)]
        return self.model.collate(samples)

    def halo_collate(self, samples) -> dict:
        """HALO training batch from :class:`~vla_blocks.models.halo.HaloSample` s with *raw* actions (e.g. the EM-CoT
        samples of :class:`~vla_blocks.emcot.EmcotHaloDataset`): actions normalised and zero-padded to
        ``action_dim`` and history frames augmented as :meth:`__call__` does for reactive frames (the subgoal frame
        is left as it is), then the model's ``collate``."""
        import dataclasses as dc
        if self.config.policy != "halo":
            raise ValueError(f"halo_collate needs a HALO processor, got policy {self.config.policy!r}")
        if self.model is None:
            raise RuntimeError("a HALO training batch needs the model (its collate): make_processor(model, ...) "
                               "or proc.bind(model)")
        c = self.config
        key = c.cameras[0]
        out = []
        for smp in samples:
            a = torch.as_tensor(smp.actions).float()[None, :c.chunk_length]
            a = self.normalizer.normalize("actions", a)[0]
            if a.shape[-1] > c.action_dim:
                raise ValueError(f"sample actions have {a.shape[-1]} dims, HALO's action_dim is {c.action_dim}")
            a = F.pad(a, (0, c.action_dim - a.shape[-1]))
            hist = [self._augment(torch.as_tensor(h).float()[None], key)[0] for h in smp.history]
            out.append(dc.replace(smp, history=hist, actions=a))
        return self.model.collate(out)

    # -- actions -> raw --------------------------------------------------------------------------------
    def postprocess(self, actions):
        """Model output ``[B, H, A_model]`` → raw actions ``[B, H, real_action_dim]`` (numpy in, numpy out).

        pi0/pi0.5/ACoT already un-normalise in ``predict_action_chunk``: only the padded dims are cut. HALO's
        model space is un-normalised here."""
        is_np = isinstance(actions, np.ndarray)
        a = torch.as_tensor(actions)
        if self.config.policy == "halo":
            a = self.normalizer.unnormalize("actions", a.float(), padded=True)  # HALO pads to action_dim
        if self.config.real_action_dim is not None:
            a = a[..., :self.config.real_action_dim]
        return a.numpy() if is_np else a

    # -- files -----------------------------------------------------------------------------------------
    def save_pretrained(self, folder):
        """``processor_config.json``, ``processor_stats.json`` and ``tokenizer.json`` (when there is one)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)

        def write(name, text):
            tmp = folder / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, folder / name)

        write(CONFIG_NAME, json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        write(STATS_NAME, json.dumps({k: {s: v.tolist() for s, v in st.items()} for k, st in self.stats.items()},
                                     indent=2) + "\n")
        if self.tokenizer is not None:
            self.tokenizer.save(str(folder / TOKENIZER_NAME))

    @classmethod
    def from_pretrained(cls, folder, model=None) -> "PolicyProcessor":
        """Load what :meth:`save_pretrained` wrote; with ``model``, install the statistics into it."""
        folder = Path(folder)
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no processor saved here")
        cfg = ProcessorConfig(**json.loads(path.read_text()))
        stats_path = folder / STATS_NAME
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
        tok = None
        if (folder / TOKENIZER_NAME).is_file():
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(str(folder / TOKENIZER_NAME))
        return cls(cfg, stats, tok, model)


# ---------------------------------------------------------------------------------------------- factory
def make_processor(model, dataset_meta_or_features=None, stats=None, camera_map: Sequence[str | None] | Mapping | None = None,
                   tokenizer: str | os.PathLike | None = None, normalization: Mapping[str, str] | None = None,
                   augment: bool | Mapping | None = None, state_key: str | None = "observation.state",
                   action_key: str = "action", wrist_keys: Sequence[str] | None = None,
                   discrete_state: bool | None = None) -> PolicyProcessor:
    """A processor for ``model`` (pi0, pi0.5, ACoT or HALO) and a dataset.

    - ``dataset_meta_or_features``: a :class:`~vla_blocks.data.DatasetMeta` (its ``stats`` are the default
      ``stats``) or a lerobot ``features`` dict.
    - ``camera_map``: dataset camera keys in the model's slot order (a list, or ``{slot: key}``); default: the
      dataset's cameras in feature order (HALO: the first).
    - ``tokenizer``: a ``tokenizer.json`` (e.g. PaliGemma's for pretrained pi0); default: HALO's own, or the
      ASCII :func:`char_tokenizer` for pi0-family models with a small vocabulary.
    - ``normalization``: ``{"state"|"action": "mean_std"|"quantiles"|"min_max"}`` over the model's default.
    - ``augment``: True (openpi defaults) or :class:`ImageAugmentation` fields; active after ``proc.train()``.
    """
    policy = _policy_of(model)
    mc = model.config
    meta = dataset_meta_or_features
    features = getattr(meta, "features", meta)
    if stats is None:
        stats = getattr(meta, "stats", None)
    cams_all = [k for k, f in (features or {}).items() if f.get("dtype") in ("image", "video")]
    n_slots = 1 if policy == "halo" else mc.num_cameras
    if camera_map is None:
        cams: list[str | None] = cams_all[:n_slots]
    elif isinstance(camera_map, Mapping):
        cams = [camera_map.get(i, camera_map.get(str(i))) for i in range(n_slots)]
    else:
        cams = list(camera_map)
    if len(cams) > n_slots:
        raise ValueError(f"{len(cams)} cameras for {n_slots} model slots: {cams}")
    if features:
        bad = [c for c in cams if c is not None and c not in cams_all]
        if bad:
            raise KeyError(f"cameras {bad} are not image/video features of the dataset ({cams_all})")
        if state_key is not None and state_key not in features:
            raise KeyError(f"state_key {state_key!r} is not a dataset feature ({list(features)})")
        if action_key not in features:
            raise KeyError(f"action_key {action_key!r} is not a dataset feature ({list(features)})")
    if not any(cams):
        raise ValueError("no camera: give camera_map or a dataset with image/video features")
    real = int(np.prod(features[action_key]["shape"])) if features and action_key in features else None
    aug = None
    if augment:
        aug = dataclasses.asdict(ImageAugmentation()) if augment is True else dict(augment)
    if policy == "halo":
        norm = {"state": "mean_std", "action": "mean_std", **(normalization or {})}
        cfg = ProcessorConfig("halo", cams, None, action_key, None, 1, 0, mc.chunk_size, mc.action_dim, real,
                              None, mc.history_frames, False, norm, aug, list(wrist_keys or []), mc.prompt_template)
        tok = model.tokenizer.tokenizer
    else:
        default = "quantiles" if mc.normalization == "quantile" else "mean_std"
        norm = {"state": default, "action": default, **(normalization or {})}
        chunk = getattr(mc, "chunk_length", mc.action_horizon)
        ds = policy == "pi05" if discrete_state is None else bool(discrete_state)
        cfg = ProcessorConfig(policy, cams, state_key, action_key, model.vision_tower.image_size, mc.num_cameras,
                              mc.max_token_len, chunk, mc.action_dim, real, mc.state_dim, 1, ds, norm, aug,
                              list(wrist_keys or []))
        vocab = model.language_model.embed_tokens.num_embeddings
        if tokenizer is not None:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(str(Path(tokenizer) / TOKENIZER_NAME if Path(tokenizer).is_dir() else tokenizer))
        elif vocab <= 1024:
            tok = char_tokenizer()
            if tok.get_vocab_size() > vocab:
                raise ValueError(f"the character tokenizer needs {tok.get_vocab_size()} ids; the model has {vocab}")
        else:
            raise ValueError(f"{policy} with a {vocab}-id vocabulary needs its tokenizer: "
                             f"make_processor(..., tokenizer='path/to/paligemma/tokenizer.json')")
    return PolicyProcessor(cfg, stats, tok, model)
