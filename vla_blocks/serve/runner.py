"""``PolicyRunner``: observation dicts → one batched forward pass → per-request replies.

The server (:mod:`vla_blocks.serve.server`) owns the transport; the runner owns what happens to a request:

1. :meth:`PolicyRunner.prepare` (per request, before batching): check the observation against the layout and turn
   it into one sample — a lerobot-style frame for the model's processor, or, in the ``batch`` layout (no processor),
   one row of the model's own batch (the keys of ``model.demo_batch()`` except ``actions``). Every problem raises
   :class:`~vla_blocks.serve.layouts.ObservationError` naming the key.
2. :meth:`PolicyRunner.run` (per batch): processor(frames) → ``model.infer(batch, noise=...)`` → the processor's
   inverse → one reply per request (``actions`` [H, A_real] float32; ACoT adds ``coarse_actions``).

Noise: each request has a ``noise_seed`` (sent by the client as ``noise_seed``, or drawn by the server). Its flow
noise is drawn from ``torch.Generator().manual_seed(noise_seed)`` exactly as ``model.infer(batch_of_one,
generator=that_generator)`` draws it (ACoT: the EAR's coarse noise first, then the action noise), so a request's
actions do not depend on which other requests share its forward pass and equal the in-process call's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from .layouts import ObservationError, ObservationLayout

__all__ = ["PolicyRunner", "Prepared", "SEED_KEY"]

SEED_KEY = "noise_seed"
_MAX_SEED = 2 ** 63 - 1


@dataclass
class Prepared:
    """One checked request, ready to be batched."""

    sample: dict            # a frame (processor) or one row of the model batch (``batch`` layout)
    seed: int
    group: tuple            # requests with equal groups can share a forward pass
    extra: dict = field(default_factory=dict)


def _batch_schema(model) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    demo = model.demo_batch(batch_size=1, generator=torch.Generator().manual_seed(0))
    return {k: (tuple(v.shape[1:]), v.dtype) for k, v in demo.items()
            if isinstance(v, torch.Tensor) and k != "actions"}


class PolicyRunner:
    """Runs a pi0 / pi0.5 / ACoT-VLA policy on batches of observations.

    ``model``: a built or loaded :class:`~vla_blocks.model.VLAModel` policy (set to eval mode here).
    ``processor``: the model's processor (``vla_blocks.data.PolicyProcessor``): ``processor(frames) -> batch`` and
    ``processor.postprocess(actions)``; ``None`` serves the model's batch directly (the ``batch`` layout: clients
    send ``images``, ``image_masks``, ``tokenized_prompt``(``_mask``), ``state`` per sample, unbatched).
    ``layout``: the observation layout frames are built with (required with a processor).
    ``default_prompt``: the task for observations without a prompt. ``seed``: seeds the server's draws of
    ``noise_seed`` for requests that do not send one.
    """

    def __init__(self, model, processor=None, layout: ObservationLayout | None = None, *,
                 default_prompt: str | None = None, seed: int = 0):
        if not hasattr(model, "infer") or not hasattr(model.config, "action_horizon"):
            raise TypeError(f"{type(model).__name__} cannot be served: the server runs pi0 / pi0.5 / ACoT-VLA "
                            f"policies (models with infer(batch, noise=...) and an action_horizon)")
        if processor is not None and layout is None:
            raise ValueError("a processor consumes frames: give the observation layout that builds them")
        self.model = model.eval()
        self.processor = processor
        self.layout = layout
        self.default_prompt = default_prompt
        self._rng = random.Random(seed)
        self._schema = _batch_schema(model) if processor is None else None
        ear = getattr(model.config, "ear", None)
        self.coarse_horizon: int | None = ear.horizon if ear is not None else None

    # -- description -------------------------------------------------------------------------------
    @property
    def layout_name(self) -> str:
        return self.layout.name if self.processor is not None else "batch"

    def spec(self) -> dict:
        """The observation keys this runner expects, with what each must be."""
        if self.processor is None:
            out = {k: f"{str(dt).replace('torch.', '')} array {list(shape)}" for k, (shape, dt) in self._schema.items()}
        else:
            out = self.layout.spec()
        out[SEED_KEY] = "optional int: the flow-noise seed (drawn by the server when absent)"
        return out

    def metadata(self) -> dict:
        c = self.model.config
        outputs = ["actions"] + (["coarse_actions"] if self.coarse_horizon else [])
        return {
            "model": type(self.model).__name__,
            "action_horizon": int(c.action_horizon),
            "action_dim": int(getattr(getattr(self.processor, "config", None), "real_action_dim", None)
                              or c.real_action_dim or c.action_dim),
            "coarse_horizon": self.coarse_horizon,
            "observation_layout": self.layout_name,
            "observation_spec": self.spec(),
            "outputs": outputs,
        }

    # -- per request ---------------------------------------------------------------------------------
    def _seed(self, obs: Mapping) -> int:
        if SEED_KEY not in obs:
            return self._rng.randrange(_MAX_SEED)
        s = obs[SEED_KEY]
        if isinstance(s, np.ndarray) and s.ndim == 0:
            s = s.item()
        if isinstance(s, np.integer):
            s = int(s)
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= _MAX_SEED:
            raise ObservationError(f"observation {SEED_KEY!r} must be an int in [0, 2**63), got {s!r}")
        return s

    def prepare(self, obs: Any) -> Prepared:
        """Check one observation; raises :class:`ObservationError` naming the problem."""
        if not isinstance(obs, Mapping):
            raise ObservationError(f"an observation must be a dict (msgpack map), got {type(obs).__name__}")
        seed = self._seed(obs)
        if self.processor is not None:
            frame = self.layout.frame(obs, self.default_prompt)
            missing = self._fill_missing_cameras(frame)
            group = tuple(sorted((k, v.shape) for k, v in frame.items() if isinstance(v, np.ndarray)))
            return Prepared(frame, seed, group, {"missing_cameras": missing} if missing else {})
        row = {}
        for key, (shape, dtype) in self._schema.items():
            if key not in obs:
                raise ObservationError(f"missing observation key {key!r} (the 'batch' layout expects "
                                       f"{sorted(self._schema)})")
            value = obs[key]
            if isinstance(value, (list, tuple, bool, int, float)):
                value = np.asarray(value)
            if not isinstance(value, np.ndarray):
                raise ObservationError(f"observation {key!r} must be a numpy array, got {type(value).__name__}")
            if tuple(value.shape) != shape:
                raise ObservationError(f"observation {key!r} has shape {tuple(value.shape)}, expected {shape}")
            if dtype == torch.bool:
                if value.dtype.kind != "b":
                    raise ObservationError(f"observation {key!r} must be a bool array, got {value.dtype}")
            elif dtype.is_floating_point:
                if value.dtype.kind not in "fiu":
                    raise ObservationError(f"observation {key!r} must be a float array, got {value.dtype}")
                if value.dtype.kind == "f" and not np.isfinite(value).all():
                    raise ObservationError(f"observation {key!r} contains NaN or infinite values")
            elif value.dtype.kind not in "iu":
                raise ObservationError(f"observation {key!r} must be an integer array, got {value.dtype}")
            row[key] = torch.from_numpy(np.array(value)).to(dtype)
        if "tokenized_prompt" in row:
            vocab = self.model.language_model.embed_tokens.num_embeddings
            ids = row["tokenized_prompt"]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise ObservationError(f"observation 'tokenized_prompt' holds ids outside [0, {vocab})")
        return Prepared(row, seed, ())

    def _fill_missing_cameras(self, frame: dict) -> list[str]:
        """An optional camera the observation lacks (ALOHA sim sends ``cam_high`` only) becomes a black image whose
        slot is masked out after the processor (openpi's convention); returns the frame keys filled."""
        from .layouts import IMAGE_PREFIX
        cams = [c for c in getattr(self.processor.config, "cameras", []) if c is not None]
        absent = [c for c in cams if c not in frame and c[len(IMAGE_PREFIX):] in self.layout.optional_images]
        if absent and getattr(self.processor.config, "policy", None) == "halo":
            raise ObservationError(f"HALO needs its camera {absent[0][len(IMAGE_PREFIX):]!r}")
        present = [v for k, v in frame.items() if k.startswith(IMAGE_PREFIX)]
        shape = present[0].shape if present else (3, 1, 1)  # as its neighbours: requests alike still batch together
        for c in absent:
            frame[c] = np.zeros(shape, np.float32)
        return absent

    # -- per batch -----------------------------------------------------------------------------------
    def noise(self, seeds: list[int]) -> dict[str, torch.Tensor]:
        """Per-request flow noise, drawn as ``model.infer`` draws it for a batch of one with that seed."""
        c = self.model.config
        H, A = c.action_horizon, c.action_dim
        coarse, fine = [], []
        for s in seeds:
            g = torch.Generator().manual_seed(int(s))
            if self.coarse_horizon is not None:
                coarse.append(torch.randn((1, self.coarse_horizon, A), generator=g, dtype=torch.float32))
            fine.append(torch.randn((1, H, A), generator=g, dtype=torch.float32))
        out = {"noise": torch.cat(fine)}
        if coarse:
            out["coarse_noise"] = torch.cat(coarse)
        return out

    def collate(self, samples: list[dict]) -> dict:
        if self.processor is not None:
            return self.processor([dict(s) for s in samples])
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}

    def _to_device(self, batch: dict) -> dict:
        dev = next(self.model.parameters()).device
        return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @torch.no_grad()
    def run(self, items: list[Prepared]) -> list[dict]:
        """One forward pass over ``items`` (same group); one reply dict of numpy arrays per item."""
        if not items:
            return []
        try:
            batch = self.collate([it.sample for it in items])
        except (KeyError, ValueError, TypeError) as e:  # the processor names what it could not use
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise ObservationError(f"the processor rejected the observation: {msg}") from e
        for i, it in enumerate(items):  # absent optional cameras: their slots are masked for that request only
            for cam in it.extra.get("missing_cameras", ()):
                batch["image_masks"][i, self.processor.config.cameras.index(cam)] = False
        out = self.model.infer(self._to_device(batch), **self.noise([it.seed for it in items]))
        if self.processor is not None:  # model space -> the dataset's raw action space
            out = {k: self.processor.postprocess(v) if k in ("actions", "coarse_actions") else v
                   for k, v in out.items()}
        replies = []
        for i, it in enumerate(items):
            reply = {}
            for k, v in out.items():
                v = v[i]
                reply[k] = (v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor)
                            else np.asarray(v, dtype=np.float32))
            reply[SEED_KEY] = it.seed
            replies.append(reply)
        return replies

    def infer(self, obs: Mapping) -> dict:
        """In-process equivalent of one server request (no transport, no batching)."""
        return self.run([self.prepare(obs)])[0]
