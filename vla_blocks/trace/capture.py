"""Recording traces at inference without touching the models' code paths.

pi0 / pi0.5 / ACoT: :func:`recording` attaches forward hooks to modules the policy already calls and
removes them on exit, so nothing is computed or stored when no recording is open. What each hook reads:

- ``vision_tower`` (input / output): the camera pixels the model saw and its tokens per camera (one
  policy call starts here); ``language_model.embed_tokens`` (input): the prompt ids;
- the stack's first pass of a call (its ``Layout``): which prefix tokens are valid (masked camera, padding);
- ``action_in_proj`` input / ``action_out_proj`` output: x_t and the velocity of every Euler step of the
  action chunk (the denoising trajectory); ``coarse_action_in_proj`` / ``coarse_action_out_proj``: the same
  for ACoT's EAR loop, and the clean coarse trajectory that guides the action loop;
- ``implicit_action_reasoner`` (input K, V of every layer): the IAR softmax weights over the prefix,
  recomputed by :meth:`~vla_blocks.reasoners.DownsampleExtractor.attention_weights` from the same inputs;
- AGP: the outputs of ``explicit_action_reasoner`` / ``implicit_action_reasoner_interact`` (S_ex, S_im)
  and of ``explicit_action_reason_proj`` / ``implicit_action_reason_proj`` (a_ex, a_im).

The final sample is the last Euler update ``x + (t_{n} − t_{n−1})·v`` on the model's grid (the same float32
arithmetic as :func:`~vla_blocks.flow.euler_sample`), unnormalised as ``infer`` does.

HALO already returns everything in its :class:`~vla_blocks.models.halo.HaloTrace`; :func:`from_halo`
turns it into a :class:`~vla_blocks.trace.Trace`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch

from .record import Trace, as_image

__all__ = ["recording", "Recording", "from_halo", "trace_inference"]


class _Call:
    """Raw tensors of one policy call (batch B), filled by the hooks."""

    def __init__(self):
        self.pixels: torch.Tensor | None = None  # [B·n_cam, 3, S, S] in [−1, 1]
        self.tokens_per_image: int | None = None
        self.prompt_ids: torch.Tensor | None = None  # [B, L]
        self.prefix_valid: torch.Tensor | None = None  # [B, P]
        self.x: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.ear_x: list[torch.Tensor] = []
        self.ear_v: list[torch.Tensor] = []
        self.coarse: torch.Tensor | None = None  # the clean coarse trajectory that guides the action loop
        self.iar: torch.Tensor | None = None  # [B, L, heads, Q, T]
        self.agp: dict[str, list[torch.Tensor]] = {}


class Recording:
    """The hooks' collector; :meth:`traces` turns a recorded call into one :class:`Trace` per sample."""

    def __init__(self, model):
        from ..models.acot import ACoTVLA
        from ..models.pi0 import Pi0Model
        if not isinstance(model, Pi0Model):
            raise TypeError(f"recording() supports pi0 / pi0.5 / ACoT models, got {type(model).__name__} "
                            "(HALO: use vla_blocks.trace.from_halo(model.infer(...)))")
        self.model = model
        self.is_acot = isinstance(model, ACoTVLA)
        self.calls: list[_Call] = []
        self._handles = []

    # -- hooks -------------------------------------------------------------------------------------
    def _call(self) -> _Call:
        if not self.calls:
            raise RuntimeError("a policy module ran before the vision tower: recording() only sees whole calls")
        return self.calls[-1]

    def _attach(self):
        m = self.model
        hook = lambda mod, fn: self._handles.append(mod.register_forward_hook(fn))  # noqa: E731

        def on_vision(mod, args, out):
            c = _Call()
            c.pixels = args[0].detach()
            c.tokens_per_image = None
            self.calls.append(c)

        def on_projector(mod, args, out):
            if self.calls and self.calls[-1].tokens_per_image is None:
                self.calls[-1].tokens_per_image = int(out.shape[1])

        def on_embed(mod, args, out):
            if self.calls and self.calls[-1].prompt_ids is None:
                self.calls[-1].prompt_ids = args[0].detach()

        def on_stack(mod, args, kwargs):
            if self.calls and self.calls[-1].prefix_valid is None and kwargs.get("cache") is None:
                layout = args[1] if len(args) > 1 else kwargs["layout"]
                self.calls[-1].prefix_valid = layout.valid.detach().cpu()

        hook(m.vision_tower, on_vision)
        hook(m.multi_modal_projector, on_projector)
        hook(m.language_model.embed_tokens, on_embed)
        self._handles.append(m.stack.register_forward_pre_hook(on_stack, with_kwargs=True))
        hook(m.action_in_proj, lambda mod, a, o: self._call().x.append(a[0].detach().float()))
        hook(m.action_out_proj, lambda mod, a, o: self._call().v.append(o.detach().float()))
        if not self.is_acot:
            return
        c = m.config
        if c.ear is not None:
            def on_coarse_in(mod, args, out):
                call = self._call()
                if call.x:  # the action loop has started: this is the clean coarse trajectory (AGP's Z_ex)
                    call.coarse = args[0].detach().float()
                else:
                    call.ear_x.append(args[0].detach().float())
            hook(m.coarse_action_in_proj, on_coarse_in)
            hook(m.coarse_action_out_proj, lambda mod, a, o: self._call().ear_v.append(o.detach().float()))
        if c.iar is not None:
            def on_iar(mod, args, out):
                K, _, *rest = args
                mask = rest[0] if rest else None
                self._call().iar = mod.attention_weights(K, mask).detach()
            hook(m.implicit_action_reasoner, on_iar)

        def agp(name):
            return lambda mod, a, o: self._call().agp.setdefault(name, []).append(o.detach().float())
        for name, attr in (("s_ex", "explicit_action_reasoner"), ("s_im", "implicit_action_reasoner_interact"),
                           ("a_ex", "explicit_action_reason_proj"), ("a_im", "implicit_action_reason_proj")):
            if hasattr(m, attr):
                hook(getattr(m, attr), agp(name))

    def close(self):
        """Remove the forward hooks this recording installed."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- records -----------------------------------------------------------------------------------
    def _trajectory(self, xs: list[torch.Tensor], vs: list[torch.Tensor], what: str):
        """``(x at every grid point [n+1, B, H, A], grid [n+1])`` from the per-step inputs and velocities."""
        if not xs or len(xs) != len(vs):
            raise RuntimeError(f"{what}: recorded {len(xs)} inputs and {len(vs)} velocities (need equal, ≥ 1): "
                               "was the call inside recording()?")
        grid = self.model.grid(len(xs)).float().cpu()
        x_last = xs[-1].cpu()
        dt = grid[-1] - grid[-2]
        final = (x_last.float() + dt * vs[-1].cpu().float()).to(x_last.dtype)
        return torch.stack([x.cpu() for x in xs] + [final]), grid

    def traces(self, call: int = -1) -> list[Trace]:
        """One :class:`Trace` per sample of recorded call ``call`` (default: the last)."""
        if not self.calls:
            raise RuntimeError("nothing recorded: run the policy (sample_actions / infer / predict_action_chunk) "
                               "inside `with recording(model) as rec:`")
        c = self.calls[call]
        m = self.model
        cfg = m.config
        out_fn = m._output
        x, grid = self._trajectory(c.x, c.v, "action chunk")
        B = x.shape[1]
        n_cam = c.pixels.shape[0] // B
        T = c.tokens_per_image
        L = c.prompt_ids.shape[1]
        actions = out_fn("actions", x[-1].to(m.device)).cpu()
        kind = "acot" if self.is_acot else ("pi05" if cfg.pi05 else "pi0")
        ear = None
        if self.is_acot and c.ear_x:
            ear = self._trajectory(c.ear_x, c.ear_v, "EAR coarse trajectory")
            coarse_raw = out_fn("coarse_actions", ear[0][-1].to(m.device)).cpu()
        traces = []
        for b in range(B):
            meta = {"model_type": type(m).__name__, "action_horizon": cfg.action_horizon,
                    "action_dim": cfg.action_dim, "real_action_dim": cfg.real_action_dim or cfg.action_dim,
                    "num_steps": len(c.x), "num_cameras": n_cam, "tokens_per_image": T, "prompt_length": L}
            arrays = {"actions": actions[b], "denoise_x": x[:, b], "denoise_t": grid,
                      "denoise_v": torch.stack([v[b].cpu() for v in c.v]),
                      "prompt_ids": c.prompt_ids[b].cpu()}
            images = {f"camera{i}": as_image(c.pixels[b * n_cam + i].float(), signed=True) for i in range(n_cam)}
            if c.prefix_valid is not None:
                valid = c.prefix_valid[b, :n_cam * T + L]
                arrays["prefix_valid"] = valid
                meta["camera_valid"] = [bool(valid[i * T:(i + 1) * T].any()) for i in range(n_cam)]
            if ear is not None:
                ex, eg = ear
                meta.update(ear_horizon=cfg.ear.horizon, ear_stride=cfg.ear.stride, ear_num_steps=len(c.ear_x))
                arrays.update(coarse_actions=coarse_raw[b], ear_x=ex[:, b], ear_t=eg)
                if c.coarse is not None:
                    arrays["coarse_guide"] = c.coarse[b].cpu()
            if c.iar is not None:
                w = c.iar[b].float().cpu()  # [L_layers, heads, Q, P]
                per_layer = w.mean(dim=(1, 2))  # [L_layers, P]
                meta["iar_shape"] = list(w.shape)
                arrays["iar_weights"] = per_layer
                g = math.isqrt(T)
                for i in range(n_cam):
                    cam = per_layer[:, i * T:(i + 1) * T]
                    arrays[f"iar_camera{i}"] = cam.reshape(-1, g, g) if g * g == T else cam[:, None, :]
                arrays["iar_text"] = per_layer[:, n_cam * T:n_cam * T + L]
            if c.agp:
                for name, outs in c.agp.items():  # per action Euler step: L2 norm per action token
                    arrays[f"agp_{name}_norm"] = torch.stack([o[b].norm(dim=-1).cpu() for o in outs])
                if "a_ex" in c.agp and "a_im" in c.agp:
                    ne, ni = arrays["agp_a_ex_norm"], arrays["agp_a_im_norm"]
                    arrays["agp_explicit_share"] = ne / (ne + ni).clamp_min(1e-12)
            traces.append(Trace(kind, meta, {}, arrays, images, {}))
        return traces


@contextmanager
def recording(model) -> Iterator[Recording]:
    """Record every policy call of a pi0 / pi0.5 / ACoT ``model`` made inside the block::

        with vla_blocks.trace.recording(model) as rec:
            chunk = model.predict_action_chunk(batch)
        trace = rec.traces()[0]          # sample 0 of the last call
        trace.save("traces/call0")

    Hooks exist only inside the block: with no recording open the model runs exactly as before.
    """
    rec = Recording(model)
    rec._attach()
    try:
        yield rec
    finally:
        rec.close()


def from_halo(trace, history: Sequence[torch.Tensor] = (), instruction: str | None = None) -> Trace:
    """A HALO :class:`~vla_blocks.models.halo.HaloTrace` (what ``HaloModel.infer`` returns) as a :class:`Trace`:
    reasoning text, decoded subgoal image, subgoal latent, actions, stage timings, the history frames and a
    one-line summary of each KV context."""
    meta = {"mode": trace.mode,
            "contexts": {k: f"{c.length} tokens: {' '.join(c.sources())}" for k, c in trace.contexts.items()}}
    text = {}
    if instruction is not None:
        text["instruction"] = instruction
    if trace.reasoning is not None:
        text["reasoning"] = trace.reasoning
    arrays = {"actions": trace.actions}
    if trace.reasoning_ids is not None:
        arrays["reasoning_ids"] = np.asarray(trace.reasoning_ids, dtype=np.int64)
    if trace.subgoal_latent is not None:
        arrays["subgoal_latent"] = trace.subgoal_latent
    images = {f"history{i}": as_image(f) for i, f in enumerate(history)}
    if trace.subgoal_image is not None:
        images["subgoal"] = as_image(trace.subgoal_image)
    return Trace("halo", meta, text, arrays, images, dict(trace.timings))


def trace_inference(model, inputs, **kw) -> list[Trace]:
    """Run one inference call and return its traces (one per sample).

    pi0 / pi0.5 / ACoT: ``inputs`` is the model batch, ``kw`` go to ``sample_actions`` (noise, generator,
    num_steps…). HALO: ``inputs`` is ``{"history": [frames], "instruction": str}`` (one sample) and ``kw`` go
    to ``infer`` (mode, generator, max_new_tokens)."""
    from ..models.halo import HaloModel
    if isinstance(model, HaloModel):
        history, instruction = list(inputs["history"]), inputs["instruction"]
        frames = history[-model.config.history_frames:]
        return [from_halo(model.infer(history, instruction, **kw), frames, instruction)]
    with torch.no_grad(), recording(model) as rec:
        model.sample_actions(inputs, **kw)
    return rec.traces()
