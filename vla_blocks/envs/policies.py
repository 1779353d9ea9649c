"""Policies the evaluation loop drives: a trained model through its processor (HALO with its frame history), a
policy server, and the references (the suite's scripted expert, uniform random actions, 1-nearest-neighbour
behaviour cloning).

Every policy has ``needs_images`` (render only when it is queried), ``reset(seed)`` (per-episode randomness,
so results do not depend on which worker ran an episode) and ``act(env, obs) -> (chunk [K, A] raw actions,
trace or None)``. :func:`load_policy` builds one from the ``MODEL`` argument of ``vla-blocks eval``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ExpertPolicy", "RandomPolicy", "NearestNeighbourPolicy", "ModelPolicy", "HaloPolicy", "ServerPolicy", "load_policy",
           "check_ref", "call_seed",
           "POLICY_HELP"]

POLICY_HELP = ("a saved model folder (local-dir:PATH, a path, or a train run folder: its final/), hf-hub:org/name, "
               "a policy server ws://HOST:PORT (vla-blocks serve MODEL --observation metaworld), "
               "or a reference: 'expert' (scripted), 'random' (uniform actions), 'nn:DATASET' (1-nearest-neighbour "
               "behaviour cloning on observation.state of a demos dataset)")


class ExpertPolicy:
    """The suite's scripted expert (one action per query)."""

    name = "expert"
    needs_images = False
    chunk = 1

    def reset(self, seed: int):
        """Nothing to reset: the expert is stateless."""
        pass

    def act(self, env, obs):
        """Actions ``[n, action_dim]`` to execute for ``obs`` (and a trace or None)."""
        return env.expert_action(obs)[None], None


class RandomPolicy:
    """Uniform actions in the env's bounds (one per query), from a per-episode generator."""

    name = "random"
    needs_images = False
    chunk = 1

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def reset(self, seed: int):
        """Start an episode: a fresh action generator seeded with ``seed``."""
        self.rng = np.random.default_rng(seed)

    def act(self, env, obs):
        """Actions ``[n, action_dim]`` to execute for ``obs`` (and a trace or None)."""
        return self.rng.uniform(env.action_low, env.action_high, size=(1, env.action_dim)).astype(np.float32), None


class NearestNeighbourPolicy:
    """1-NN behaviour cloning: the action of the demonstration frame of the same task whose ``key`` vector
    (default ``observation.state``) is nearest (Euclidean, after z-scoring each dimension over the dataset)."""

    needs_images = False
    chunk = 1

    def __init__(self, root, key: str = "observation.state"):
        from ..data import LeRobotDataset
        ds = LeRobotDataset(root, decode_video=False)
        if key not in ds.features:
            raise KeyError(f"{root}: no feature {key!r} for the nearest-neighbour policy (have {list(ds.features)})")
        cols = {k: [] for k in (key, "action", "task_index")}
        for batch in ds.iter_columns(list(cols)):
            for k in cols:
                cols[k].append(np.asarray(batch[k]))
        x = np.concatenate(cols[key]).astype(np.float64).reshape(-1, int(np.prod(ds.features[key]["shape"])))
        a = np.concatenate(cols["action"]).astype(np.float32).reshape(x.shape[0], -1)
        ti = np.concatenate(cols["task_index"]).reshape(-1).astype(int)
        tasks = ds.meta.tasks if hasattr(ds.meta, "tasks") else None
        names = _task_names(ds.meta)
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        z = (x - self.mean) / self.std
        self.by_task = {names[i]: (z[ti == i], a[ti == i]) for i in np.unique(ti)}
        self.key, self.root = key, str(root)
        self.name = f"nn:{Path(root).name}"
        del tasks

    def reset(self, seed: int):
        """Nothing to reset: the nearest neighbour depends on the observation alone."""
        pass

    def act(self, env, obs):
        """Actions ``[n, action_dim]`` to execute for ``obs`` (and a trace or None)."""
        if env.instruction not in self.by_task:
            raise KeyError(f"{self.root}: no demonstrations for {env.instruction!r} (have {sorted(self.by_task)})")
        z, a = self.by_task[env.instruction]
        v = obs.state if self.key == "observation.state" else obs.raw
        q = (np.asarray(v, dtype=np.float64).reshape(-1) - self.mean) / self.std
        return a[int(np.argmin(((z - q) ** 2).sum(1)))][None].copy(), None


def _task_names(meta) -> dict[int, str]:
    tasks = getattr(meta, "tasks", None)
    if isinstance(tasks, dict):
        return {int(k): v for k, v in tasks.items()} if all(isinstance(v, str) for v in tasks.values()) \
            else {int(v): k for k, v in tasks.items()}
    if isinstance(tasks, (list, tuple)):
        return dict(enumerate(tasks))
    raise TypeError(f"cannot read task names from {type(meta).__name__}.tasks ({type(tasks).__name__})")


class ModelPolicy:
    """A model and its processor: observation → frame → batch → ``predict_action_chunk`` → raw actions, of
    which ``n_action_steps`` are executed. Flow noise comes from a generator re-seeded per episode."""

    needs_images = True

    def __init__(self, model, processor, n_action_steps: int | None = None, name: str = "model",
                 trace: bool = False):
        import torch
        self.model = model.eval()
        self.processor = processor.eval()
        if processor.model is None:
            processor.bind(model)
        cfg = model.config
        horizon = getattr(cfg, "action_horizon", None) or getattr(cfg, "chunk_size", None)
        n = n_action_steps or getattr(cfg, "n_action_steps", None) or horizon
        if horizon is not None and n > horizon:
            raise ValueError(f"n_action_steps={n} exceeds the model's chunk of {horizon} actions")
        self.chunk = int(n)
        self.name = name
        self.trace = trace
        self.generator = torch.Generator().manual_seed(0)
        self.seed, self.calls = 0, 0
        self.is_halo = processor.config.policy == "halo"
        if self.is_halo:
            raise ValueError("HALO policies are HaloPolicy (load_policy builds one)")

    def reset(self, seed: int):
        """Start an episode: per-query noise seeds derive from ``seed``."""
        self.seed, self.calls = int(seed), 0

    def act(self, env, obs):
        """Actions ``[n, action_dim]`` to execute for ``obs`` (and a trace or None)."""
        import torch
        frame = env.frame(obs)
        policy_trace = None
        self.generator.manual_seed(call_seed(self.seed, self.calls))  # as a policy server seeds a request
        self.calls += 1
        with torch.no_grad():
            dev = next(self.model.parameters()).device
            batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in self.processor(frame).items()}
            if self.trace:
                from ..trace import recording
                with recording(self.model) as rec:
                    out = self.model.predict_action_chunk(batch, generator=self.generator)
                tr = rec.traces()
                policy_trace = tr[0] if tr else None
            else:
                out = self.model.predict_action_chunk(batch, generator=self.generator)
        raw = self.processor.postprocess(out.float().cpu())[0].numpy()
        return raw[:self.chunk], policy_trace


class HaloPolicy:
    """HALO closed-loop: the last ``history_frames`` camera frames of the episode (consecutive env steps; the
    episode's first frame repeated before it starts, as HALO's loader pads) and the instruction go to
    ``model.infer(history, instruction, mode=...)``; the chunk (HALO's normalised action space) is un-normalised by
    the processor's :meth:`~vla_blocks.data.PolicyProcessor.postprocess` and its first ``n_action_steps`` actions are
    executed. ``mode``: ``reactive``, ``emcot`` or ``mixed`` (default: the model's ``inference.mode``). The
    evaluation loop renders the ``frames_before_query`` steps before each query and hands every rendered
    observation to :meth:`observe`. Flow noise (and ``mixed``'s coin) come from a generator re-seeded per query
    with :func:`call_seed`. With ``trace``, each query's reasoning, subgoal image and actions are recorded
    (:func:`vla_blocks.trace.from_halo`)."""

    needs_images = True

    def __init__(self, model, processor, n_action_steps: int | None = None, name: str = "halo",
                 trace: bool = False, mode: str | None = None):
        import torch
        if processor.config.policy != "halo":
            raise ValueError(f"HaloPolicy needs a HALO processor, got policy {processor.config.policy!r}")
        self.model = model.eval()
        self.processor = processor.eval()
        if processor.model is None:
            processor.bind(model)
        cfg = model.config
        horizon = int(cfg.chunk_size)
        n = n_action_steps or cfg.n_action_steps or horizon
        if n > horizon:
            raise ValueError(f"n_action_steps={n} exceeds the model's chunk of {horizon} actions")
        self.mode = mode or cfg.inference.mode
        if self.mode not in ("reactive", "emcot", "mixed"):
            raise ValueError(f"HALO mode {self.mode!r} is not one of ['reactive', 'emcot', 'mixed']")
        self.chunk = int(n)
        self.history_frames = int(processor.config.history_frames)
        self.frames_before_query = self.history_frames
        self.camera = processor.config.cameras[0]
        self.name, self.trace = name, trace
        self.generator = torch.Generator().manual_seed(0)
        self.seed, self.calls = 0, 0
        self.frames: list = []  # the last history_frames observed camera frames (float CHW in [0, 1])

    def reset(self, seed: int):
        """Start an episode: the frame history is cleared; per-query noise seeds derive from ``seed``."""
        self.seed, self.calls = int(seed), 0
        self.frames = []

    def observe(self, env, obs):
        """Keep the camera frame of a rendered observation (called by the loop after reset and each step)."""
        if not obs.images:
            return
        frame = env.frame(obs)
        if self.camera not in frame:
            raise KeyError(f"camera {self.camera!r} (the HALO processor's) is not rendered by the env "
                           f"(have {sorted(k for k in frame if 'image' in k)})")
        self.frames = (self.frames + [frame[self.camera]])[-self.history_frames:]

    def history(self, env, obs) -> list:
        """The ``history_frames`` frames of this query, oldest first (the first one repeated while too few)."""
        if not self.frames:  # a caller that does not call observe(): the current observation alone
            self.observe(env, obs)
        if not self.frames:
            raise ValueError("HALO needs the camera frames: the observation was not rendered")
        frames = list(self.frames)
        return [frames[0]] * (self.history_frames - len(frames)) + frames

    def act(self, env, obs):
        """Actions ``[n, action_dim]`` to execute for ``obs`` (and the HALO trace or None)."""
        import torch
        hist = self.history(env, obs)
        batch = self.processor({self.camera: torch.stack(hist), "task": env.instruction})
        self.generator.manual_seed(call_seed(self.seed, self.calls))
        self.calls += 1
        with torch.no_grad():
            tr = self.model.infer(batch["history"][0], batch["instruction"][0], mode=self.mode,
                                  generator=self.generator)
        raw = self.processor.postprocess(tr.actions.float().cpu()[None])[0].numpy()
        policy_trace = None
        if self.trace:
            from ..trace import from_halo
            policy_trace = from_halo(tr, batch["history"][0], batch["instruction"][0])
        return raw[:self.chunk], policy_trace


def call_seed(episode_seed: int, call: int) -> int:
    """The flow-noise seed of the ``call``-th query of an episode (in-process and through a server alike)."""
    return (int(episode_seed) * 100_003 + int(call)) % (2 ** 62)


class ServerPolicy:
    """A policy server speaking openpi's protocol (``vla-blocks serve MODEL --observation metaworld``). Each
    query sends ``observation/image`` (the env's first camera, uint8 HWC), ``observation/state``, ``prompt`` and
    a ``noise_seed`` (:func:`call_seed`), so results equal the in-process model's."""

    needs_images = True

    def __init__(self, url: str, n_action_steps: int | None = None, connect_timeout: float = 30.0):
        from ..serve import PolicyClient
        self.client = PolicyClient(url, connect_timeout=connect_timeout)
        horizon = int(self.client.metadata.get("action_horizon", 0)) or None
        n = n_action_steps or horizon
        if n is None:
            raise ValueError(f"{url}: the server's metadata has no action_horizon; pass n_action_steps")
        if horizon is not None and n > horizon:
            raise ValueError(f"n_action_steps={n} exceeds the server's chunk of {horizon} actions")
        self.chunk = int(n)
        self.name = url
        self.seed, self.calls = 0, 0

    def reset(self, seed: int):
        """Start an episode: per-query noise seeds (sent to the server) derive from ``seed``."""
        self.seed, self.calls = int(seed), 0

    def act(self, env, obs):
        """Actions ``[n, action_dim]`` to execute for ``obs`` (and a trace or None)."""
        msg = {"observation/image": obs.images[env.cameras[0]], "observation/state": np.asarray(obs.state, np.float32),
               "prompt": env.instruction, "noise_seed": call_seed(self.seed, self.calls)}
        self.calls += 1
        actions = np.asarray(self.client.infer(msg)["actions"], dtype=np.float32)
        return actions[:self.chunk], None


def _model_folder(ref: str) -> Path | None:
    p = Path(ref[len("local-dir:"):] if ref.startswith("local-dir:") else ref)
    if p.is_dir():
        if (p / "final").is_dir() and not (p / "config.json").is_file():
            return p / "final"
        return p
    return None


def check_ref(ref: str) -> None:
    """Fail early (before spawning workers) when ``ref`` names no policy."""
    if ref in ("expert", "random") or ref.startswith(("hf-hub:", "ws://", "wss://")):
        return
    if ref.startswith("nn:"):
        if not Path(ref[3:]).is_dir():
            raise FileNotFoundError(f"nn: dataset {ref[3:]!r} is not a folder")
        return
    folder = _model_folder(ref)
    if folder is None:
        raise FileNotFoundError(f"model {ref!r}: not a folder, an hf-hub: reference or a reference policy "
                                f"({POLICY_HELP})")
    if not (folder / "processor_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no processor_config.json beside the model (train with a data: "
                                "section, or save the processor with PolicyProcessor.save_pretrained)")


def load_policy(ref: str, n_action_steps: int | None = None, trace: bool = False, device: str = "cpu") -> Any:
    """The policy named by ``ref`` (see :data:`POLICY_HELP`)."""
    if ref == "expert":
        return ExpertPolicy()
    if ref == "random":
        return RandomPolicy()
    if ref.startswith("nn:"):
        return NearestNeighbourPolicy(ref[3:])
    if ref.startswith(("ws://", "wss://")):
        return ServerPolicy(ref, n_action_steps)
    from .. import create_model
    from ..data import PolicyProcessor
    folder = _model_folder(ref)
    if folder is None and not ref.startswith("hf-hub:"):
        raise FileNotFoundError(f"model {ref!r}: not a folder, an hf-hub: reference or a reference policy "
                                f"({POLICY_HELP})")
    if folder is not None:
        model = create_model(f"local-dir:{folder}")
        proc_dir = folder
    else:
        from huggingface_hub import snapshot_download
        proc_dir = Path(snapshot_download(ref[len("hf-hub:"):]))
        model = create_model(ref)
    if not (Path(proc_dir) / "processor_config.json").is_file():
        raise FileNotFoundError(f"{proc_dir}: no processor_config.json beside the model (train with a data: "
                                "section, or save the processor with PolicyProcessor.save_pretrained)")
    model = model.to(device)
    proc = PolicyProcessor.from_pretrained(proc_dir, model)
    if proc.config.policy == "halo":
        return HaloPolicy(model, proc, n_action_steps, name=str(ref), trace=trace)
    return ModelPolicy(model, proc, n_action_steps, name=str(ref), trace=trace)
