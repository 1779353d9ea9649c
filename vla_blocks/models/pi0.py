"""pi0 and pi0.5 (openpi) as a two-expert Mixture-of-Transformers over a prefix-LM layout.

Per sample the token layout is (DESIGN §2)::

    [ img cam0 | img cam1 | img cam2 | text (max_token_len) ]   one `full` segment, expert `vlm`,
                                                                 per-token validity (masked camera, text padding)
    [ state ]                                                    pi0 only: one `full` token, expert `act`
    [ a_1 … a_H ]                                                the noisy chunk: a `noise` segment, expert `act`

which is exactly openpi's ``make_attn_mask`` (prefix bidirectional; state sees the prefix; the chunk sees
everything and itself bidirectionally; nobody sees the chunk). Time conditioning: pi0 fuses
``[action_in_proj(x_t) ‖ posemb(t)]`` with ``action_time_mlp_in/out`` into the chunk tokens; pi0.5 feeds
``swish(time_mlp_out(swish(time_mlp_in(posemb(t)))))`` to the adaRMS norms of the action expert.

Training runs the prefix once (``return_kv``) and the suffix as one pass reading the prefix cache (with
gradients). Inference runs the prefix once and each of the 10 Euler steps as a suffix pass with
``start=P, cache=…`` (t = 1 noise → t = 0 data, DESIGN §4).

Batch keys (model space is after :class:`~vla_blocks.normalize.Normalizer`; raw values go in):

- ``images`` float [B, n_cam, 3, S, S] in [−1, 1] (uint8 [B, n_cam, S', S', 3] is resized-with-pad),
  ``image_masks`` bool [B, n_cam] (False: a missing camera, its tokens are invalid);
- ``tokenized_prompt`` long [B, L] and ``tokenized_prompt_mask`` bool [B, L] (L = max_token_len; pi0.5's
  discretised state, when used, is part of the prompt text, see :func:`pi05_prompt`; tokenisation is the
  data pipeline's job);
- ``state`` [B, ≤state_dim] (pi0 only); ``actions`` [B, ≥H, ≤action_dim] (training);
- optional ``noise`` [B, H, action_dim] and ``time`` [B] to fix the flow sample (tests).

Example::

    model = vla_blocks.create_model("pi05-tiny")
    batch = model.demo_batch(2)
    loss, metrics = model(batch)
    chunk = model.predict_action_chunk(batch)        # [B, H, real_action_dim], unnormalised
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import MaskMeta
from ..backbones import BackboneConfig, ExpertSpec, build_language_model
from ..conditioning import posemb_sincos
from ..config import register
from ..encoders import Connector, VisionConfig, preprocess_images
from ..flow import FlowMatching, flow_loss, interpolate, time_grid, euler_sample, velocity_target
from ..layout import Layout, Part, Segment
from ..model import VLAModel
from ..mot import MoTOutput, PrefixCache
from ..normalize import Normalizer

__all__ = ["Pi0Config", "Pi0ConfigFields", "Pi0Model", "Prefix", "Suffix", "SuffixPlan", "prefix_segment",
           "suffix_segments", "policy_layout", "discretize_state", "pi05_prompt"]

VLM, ACT = "vlm", "act"


# ---------------------------------------------------------------------------------------------- config
@dataclass
class Pi0ConfigFields:
    """The fields of :class:`Pi0Config` (shared with ACoT's config): pi0 / pi0.5 (``pi05: true``).

    - ``backbone``: the PaliGemma LLM (``hf_causal_lm`` gemma: Gemma-2B for the full recipes), expert ``vlm``.
    - ``vision``: the vision tower (SigLIP So400m/14 at 224 px → 256 tokens per camera); a linear
      ``multi_modal_projector`` maps it to the LLM width.
    - ``action_expert``: the ``act`` expert (gemma_300m: width 1024, mlp 4096); adaRMS is added in pi0.5 mode.
    - ``action_dim`` (padded width, 32), ``action_horizon`` H, ``max_token_len`` (48 pi0, 200 pi0.5),
      ``num_cameras`` (3 slots), ``state_dim`` (pi0's state_proj input; None: action_dim, as openpi pads it).
    - ``flow``: time sampler (Beta(1.5, 1)·0.999 + 0.001), loss (MSE, plain mean over padded dims) and
      Euler grid (10 steps).
    - ``normalization``: ``zscore`` (pi0, ACoT) or ``quantile`` (openpi pi0.5) for state/actions.
    - ``n_action_steps``: actions popped per chunk by ``select_action`` (None: the whole chunk);
      ``real_action_dim``: dims returned by inference (None: action_dim; LIBERO: 7).
    - ``freeze_vlm``: no gradients for the ``vlm`` expert and the token embedding (ACoT trains with
      Gemma-2B frozen; the vision tower stays trainable).
    """

    backbone: BackboneConfig
    vision: VisionConfig
    action_expert: ExpertSpec = field(default_factory=lambda: ExpertSpec(init_from=None))
    pi05: bool = False
    action_dim: int = 32
    action_horizon: int = 50
    max_token_len: int = 48
    num_cameras: int = 3
    state_dim: int | None = None
    flow: FlowMatching = field(default_factory=FlowMatching)
    normalization: Literal["zscore", "quantile"] = "zscore"
    n_action_steps: int | None = None
    real_action_dim: int | None = None
    freeze_vlm: bool = False
    attention_backend: str = "auto"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        for name in ("action_dim", "action_horizon", "num_cameras"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.real_action_dim is not None and not 0 < self.real_action_dim <= self.action_dim:
            raise ValueError(f"real_action_dim must be in [1, action_dim={self.action_dim}], got {self.real_action_dim}")


# ---------------------------------------------------------------------------------------------- prompts
def discretize_state(state: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """openpi pi0.5's state discretisation: ``np.digitize(state, linspace(−1, 1, bins + 1)[:-1]) − 1``
    (state in model space, e.g. normalised to about [−1, 1]) → long bins in [−1, bins − 1]."""
    edges = torch.linspace(-1.0, 1.0, bins + 1, dtype=torch.float64)[:-1]
    return torch.bucketize(torch.as_tensor(state, dtype=torch.float64), edges, right=True) - 1


def pi05_prompt(task: str, state: torch.Tensor | None = None, bins: int = 256) -> str:
    r"""openpi pi0.5's prompt text (tokenise it with BOS and the PaliGemma tokenizer, up to ``max_token_len``):
    ``"Task: <task>, State: <b1 b2 …>;\nAction: "`` with the discretised state, or the cleaned task alone
    (pi0, and ``discrete_state_input=False`` as pi05_libero / ACoT LIBERO: openpi then appends the separately
    tokenised ``"\n"`` as the start-of-answer token)."""
    text = task.strip().replace("_", " ").replace("\n", " ")
    if state is None:
        return text
    state_str = " ".join(str(int(b)) for b in discretize_state(state, bins).reshape(-1))
    return f"Task: {text}, State: {state_str};\nAction: "


# ---------------------------------------------------------------------------------------------- layout
def prefix_segment(image_valid, tokens_per_image: int, text_valid, expert: str = VLM) -> Segment:
    """pi0's image+text prefix of one sample: ONE ``full`` segment, a part per camera (all its tokens valid
    or not) and the text part (per-token validity)."""
    parts = [Part(expert, tokens_per_image, "image", bool(v)) for v in image_valid]
    parts.append(Part(expert, len(text_valid), "text", text_valid))
    return Segment("full", parts)


def suffix_segments(expert: str, label: str, horizon: int, with_state: bool = False, rope: str = "sequential"):
    """A noisy chunk (``noise`` segment) with, in pi0 mode, its state token (``full``) before it.

    ``rope="sequential_hold"`` lets several suffixes share one pass and still start at the same position
    (ACoT's EAR and action chunks: upstream runs them in separate passes, both right after the prefix).
    """
    segs = []
    if with_state:
        segs.append(Segment.of("full", expert, 1, f"{label}.state", rope=rope))
    segs.append(Segment.of("noise", expert, horizon, label, rope=rope))
    return segs


def policy_layout(image_valid: torch.Tensor, tokens_per_image: int, text_valid: torch.Tensor,
                  suffixes: list[tuple[str, str, int, bool]], experts: list[str], prefix_expert: str = VLM) -> Layout:
    """The layout of a batch: prefix (``image_valid [B, n_cam]``, ``text_valid [B, L]``) then each suffix
    ``(expert, label, horizon, with_state)``. With several suffixes their segments use ``sequential_hold``
    RoPE: each starts at the number of valid prefix tokens, as if it followed the prefix alone."""
    if len(suffixes) > 1 and any(with_state for *_, with_state in suffixes):
        raise ValueError("suffixes with a state token (pi0 mode) cannot share a pass: the second state token would "
                         "see the first suffix; run one suffix per pass")
    rope = "sequential_hold" if len(suffixes) > 1 else "sequential"
    image_valid, text_valid = image_valid.cpu(), text_valid.cpu()
    samples = []
    for b in range(image_valid.shape[0]):
        s = [prefix_segment(image_valid[b].tolist(), tokens_per_image, text_valid[b], prefix_expert)]
        for expert, label, horizon, with_state in suffixes:
            s += suffix_segments(expert, label, horizon, with_state, rope)
        samples.append(s)
    return Layout.from_samples(samples, experts)


@dataclass
class Prefix:
    """The embedded prefix of a batch: tokens ``[B, P, D]`` and the validity that builds its layout."""

    tokens: torch.Tensor
    image_valid: torch.Tensor  # [B, n_cam] bool
    text_valid: torch.Tensor  # [B, L] bool
    tokens_per_image: int

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    @property
    def valid(self) -> torch.Tensor:
        """``[B, P]`` bool on the tokens' device."""
        img = self.image_valid.to(self.tokens.device).repeat_interleave(self.tokens_per_image, dim=1)
        return torch.cat([img, self.text_valid.to(self.tokens.device)], dim=1)


@dataclass
class Suffix:
    """The inputs of one chunk in a suffix pass: expert tokens ``[B, H, W]``, its adaRMS cond ``[B, C]``
    (pi0.5) and pi0's state token ``[B, 1, W]``."""

    expert: str
    label: str
    tokens: torch.Tensor
    cond: torch.Tensor | None = None
    state: torch.Tensor | None = None

    @property
    def spec(self) -> tuple[str, str, int, bool]:
        return self.expert, self.label, self.tokens.shape[1], self.state is not None


@dataclass
class SuffixPlan:
    """A suffix layout built once and reused by every Euler step: full layout, suffix sub-layout, mask meta."""

    layout: Layout
    sub: Layout
    meta: MaskMeta
    start: int


# ---------------------------------------------------------------------------------------------- model
class Pi0Model(VLAModel):
    """pi0 / pi0.5 policy. Module names follow openpi/lerobot (``action_in_proj``, ``action_out_proj``,
    ``state_proj``, ``action_time_mlp_in/out``, ``time_mlp_in/out``, ``vision_tower``,
    ``multi_modal_projector``; the LLM and experts are in ``language_model``)."""

    config: "Pi0Config"

    def __init__(self, config: "Pi0Config"):
        super().__init__(config)
        self.n_action_steps = config.n_action_steps
        self.vision_tower = config.vision.build()
        specs = self.expert_specs()
        self.language_model = build_language_model(config.backbone, specs, config.attention_backend,
                                                   config.gradient_checkpointing)
        self.experts = list(specs)
        D = self.width(VLM)
        self.multi_modal_projector = Connector(self.vision_tower.out_dim, D, kind="linear")
        W, A = self.width(ACT), config.action_dim
        self.action_in_proj = nn.Linear(A, W)
        self.action_out_proj = nn.Linear(W, A)
        if config.pi05:
            self.time_mlp_in = nn.Linear(W, W)
            self.time_mlp_out = nn.Linear(W, W)
        else:
            self.state_proj = nn.Linear(config.state_dim or A, W)
            self.action_time_mlp_in = nn.Linear(2 * W, W)
            self.action_time_mlp_out = nn.Linear(W, W)
        self.normalizer = Normalizer(config.normalization)
        if config.freeze_vlm:
            self.freeze_expert(VLM, embeddings=True)

    # -- structure --------------------------------------------------------------------------------
    def _backbone_width(self) -> int:
        return self.config.backbone.spec().expert.hidden_size

    def _with_cond(self, spec: ExpertSpec, base_width: int) -> ExpertSpec:
        width = spec.hidden_size or base_width
        return dataclasses.replace(spec, adarms_cond_dim=width if self.config.pi05 else None)

    def expert_specs(self) -> dict[str, ExpertSpec]:
        """The experts of the stack, in order (``vlm`` first: it holds the backbone)."""
        return {VLM: ExpertSpec(), ACT: self._with_cond(self.config.action_expert, self._backbone_width())}

    def width(self, expert: str) -> int:
        return self.language_model.stack.cfg.experts[expert].hidden_size

    @property
    def stack(self):
        return self.language_model.stack

    def freeze_expert(self, expert: str, embeddings: bool = False):
        """Turn off gradients for one expert's blocks and final norm (and the token embedding)."""
        for layer in self.stack.layers:
            layer.experts[expert].requires_grad_(False)
        self.stack.norms[expert].requires_grad_(False)
        if embeddings:
            self.language_model.embed_tokens.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.action_in_proj.weight.device

    # -- inputs ------------------------------------------------------------------------------------
    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, n_cam, 3, S, S]`` in [−1, 1] (or uint8 ``[B, n_cam, H, W, 3]``) → ``[B·n_cam, 3, S, S]``."""
        if isinstance(images, dict):
            images = torch.stack(list(images.values()), dim=1)
        if images.ndim != 5:
            raise ValueError(f"images must be [B, n_cam, 3, S, S], got shape {tuple(images.shape)}")
        flat = images.flatten(0, 1)
        S = self.vision_tower.image_size
        if flat.dtype == torch.uint8 or tuple(flat.shape[-2:]) != (S, S):
            flat = preprocess_images(flat, size=S, float_range="signed")
        return flat.to(self.device)

    def embed_prefix(self, batch: dict) -> Prefix:
        """Images → vision tower → projector (not scaled), prompt → Gemma embedding (×√D)."""
        images = batch["images"]
        pixels = self._pixels(images)
        B = batch["tokenized_prompt"].shape[0]
        n_cam = pixels.shape[0] // B
        feats = self.multi_modal_projector(self.vision_tower(pixels))  # [B·n_cam, T, D]
        T = feats.shape[1]
        img = feats.reshape(B, n_cam * T, -1)
        ids = batch["tokenized_prompt"].to(self.device)
        text = self.language_model.embed(ids).to(img.dtype)
        masks = batch.get("image_masks")
        image_valid = torch.ones(B, n_cam, dtype=torch.bool) if masks is None else masks.bool()
        text_mask = batch.get("tokenized_prompt_mask")
        text_valid = torch.ones_like(ids, dtype=torch.bool) if text_mask is None else text_mask.bool()
        if tuple(image_valid.shape) != (B, n_cam) or text_valid.shape != ids.shape:
            raise ValueError(f"image_masks must be [B, n_cam] = {(B, n_cam)} and tokenized_prompt_mask "
                             f"{tuple(ids.shape)}; got {tuple(image_valid.shape)}, {tuple(text_valid.shape)}")
        return Prefix(torch.cat([img, text], dim=1), image_valid.cpu(), text_valid.cpu(), T)

    def _prefix_layout(self, prefix: Prefix) -> Layout:
        return policy_layout(prefix.image_valid, prefix.tokens_per_image, prefix.text_valid, [], self.experts
                             ).to(self.device)

    def state_token(self, state: torch.Tensor) -> torch.Tensor:
        """pi0: ``state_proj(state padded to state_dim)`` → ``[B, 1, W]``."""
        sd = self.state_proj.in_features
        if state.shape[-1] > sd:
            raise ValueError(f"state has {state.shape[-1]} dims, more than state_dim={sd}")
        state = F.pad(state.to(self.device, self.state_proj.weight.dtype), (0, sd - state.shape[-1]))
        return self.state_proj(state)[:, None, :]

    def pad_actions(self, x: torch.Tensor) -> torch.Tensor:
        A = self.config.action_dim
        if x.shape[-1] > A:
            raise ValueError(f"actions have {x.shape[-1]} dims, more than action_dim={A}")
        return F.pad(x.to(self.device, torch.float32), (0, A - x.shape[-1]))

    # -- time conditioning -------------------------------------------------------------------------
    @staticmethod
    def time_embedding(t: torch.Tensor, width: int, like: torch.Tensor) -> torch.Tensor:
        return posemb_sincos(t.to(like.device), width, 4e-3, 4.0).to(like.dtype)

    def adarms_cond(self, t: torch.Tensor, mlp_in: nn.Linear, mlp_out: nn.Linear) -> torch.Tensor:
        """pi0.5: ``swish(mlp_out(swish(mlp_in(posemb(t)))))`` → ``[B, W]``."""
        temb = self.time_embedding(t, mlp_in.in_features, mlp_in.weight)
        return F.silu(mlp_out(F.silu(mlp_in(temb))))

    def concat_time(self, tokens: torch.Tensor, t: torch.Tensor, mlp_in: nn.Linear, mlp_out: nn.Linear) -> torch.Tensor:
        """pi0: ``mlp_out(swish(mlp_in([tokens ‖ posemb(t)])))`` → ``[B, H, W]``."""
        temb = self.time_embedding(t, tokens.shape[-1], tokens)[:, None, :].expand_as(tokens)
        return mlp_out(F.silu(mlp_in(torch.cat([tokens, temb], dim=-1))))

    def action_suffix(self, x_t: torch.Tensor, t: torch.Tensor, state_tok: torch.Tensor | None = None,
                      tokens: torch.Tensor | None = None) -> Suffix:
        """The action chunk's suffix inputs at time ``t [B]`` (``tokens`` replaces the chunk tokens, e.g. after
        ACoT's guidance; it must already hold pi0's time fusion)."""
        if tokens is None:
            tokens = self.action_tokens(x_t, t)
        if self.config.pi05:
            return Suffix(ACT, "actions", tokens, cond=self.adarms_cond(t, self.time_mlp_in, self.time_mlp_out))
        return Suffix(ACT, "actions", tokens, state=state_tok)

    def action_tokens(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``action_in_proj(x_t)`` (pi0.5) or its fusion with the time embedding (pi0) → ``[B, H, W]``."""
        a = self.action_in_proj(x_t.to(self.action_in_proj.weight.dtype))
        if self.config.pi05:
            return a
        return self.concat_time(a, t, self.action_time_mlp_in, self.action_time_mlp_out)

    # -- passes ------------------------------------------------------------------------------------
    def run_prefix(self, prefix: Prefix) -> tuple[MoTOutput, PrefixCache]:
        """The prefix pass (once per batch): per-layer K/V kept, with gradients, for the suffix passes."""
        layout = self._prefix_layout(prefix)
        n_img = prefix.image_valid.shape[1] * prefix.tokens_per_image
        hidden = layout.assemble({"image": prefix.tokens[:, :n_img].flatten(0, 1),
                                  "text": prefix.tokens[:, n_img:].flatten(0, 1)})
        out = self.stack(hidden, layout, return_kv=True)
        return out, out.cache(layout)

    def plan_suffixes(self, prefix: Prefix, specs: list[tuple[str, str, int, bool]]) -> SuffixPlan:
        """Layout, sub-layout and mask metadata of a suffix pass over ``specs`` (see :func:`policy_layout`)."""
        layout = policy_layout(prefix.image_valid, prefix.tokens_per_image, prefix.text_valid, specs,
                               self.experts).to(self.device)
        P = prefix.length
        return SuffixPlan(layout, layout.tokens(P), layout.mask_meta(slice(P, layout.seq_len),
                                                                     slice(0, layout.seq_len)), P)

    def run_suffixes(self, prefix: Prefix, cache: PrefixCache, suffixes: list[Suffix],
                     plan: SuffixPlan | None = None) -> dict[str, torch.Tensor]:
        """One pass over several suffixes reading the prefix cache → ``{label: expert outputs [B, H, W]}``."""
        plan = plan or self.plan_suffixes(prefix, [s.spec for s in suffixes])
        embeds, conds = {}, {}
        for s in suffixes:
            B, H, W = s.tokens.shape
            embeds[s.label] = s.tokens.reshape(B * H, W)
            if s.state is not None:
                embeds[f"{s.label}.state"] = s.state.reshape(B, W)
            if s.cond is not None:
                conds[s.label] = s.cond[:, None, :].expand(B, H, -1).reshape(B * H, -1)
                if s.state is not None:
                    conds[f"{s.label}.state"] = s.cond
        hidden = plan.sub.assemble(embeds)
        cond = plan.sub.assemble(conds) if conds else None
        out = self.stack(hidden, plan.layout, start=plan.start, cache=cache, cond=cond, meta=plan.meta)
        return {s.label: plan.sub.extract(out.hidden, s.label).view(s.tokens.shape[0], s.tokens.shape[1], -1)
                for s in suffixes}

    # -- training ----------------------------------------------------------------------------------
    def flow_sample(self, x0: torch.Tensor, batch: dict, noise_key: str, t: torch.Tensor):
        """``(x_t, target u)`` for clean ``x0`` at times ``t`` (noise from ``batch[noise_key]`` if given)."""
        noise = batch.get(noise_key)
        noise = torch.randn_like(x0) if noise is None else noise.to(x0)
        return interpolate(x0, noise, t), velocity_target(x0, noise)

    def sample_time(self, batch: dict, B: int) -> torch.Tensor:
        t = batch.get("time")
        if t is None:
            t = self.config.flow.time_sampler.sample((B,), device=self.device)
        return t.to(self.device, torch.float32)

    def target_actions(self, batch: dict) -> torch.Tensor:
        """Normalised, padded ground-truth chunk ``[B, H, action_dim]`` (the first H frames of ``actions``)."""
        H = self.config.action_horizon
        a = batch["actions"]
        if a.ndim != 3 or a.shape[1] < H:
            raise ValueError(f"actions must be [B, ≥{H}, dims], got {tuple(a.shape)}")
        return self.pad_actions(self.normalizer.normalize("actions", a[:, :H]))

    def forward(self, batch: dict):
        """Flow-matching loss (MSE, plain mean over the padded chunk) → ``(loss, metrics)``."""
        actions = self.target_actions(batch)
        B = actions.shape[0]
        t = self.sample_time(batch, B)
        x_t, u = self.flow_sample(actions, batch, "noise", t)
        prefix = self.embed_prefix(batch)
        _, cache = self.run_prefix(prefix)
        state_tok = None if self.config.pi05 else self.state_token(self.normalizer.normalize("state", batch["state"]))
        h = self.run_suffixes(prefix, cache, [self.action_suffix(x_t, t, state_tok)])["actions"]
        v = self.action_out_proj(h)
        loss = flow_loss(v, u, self.config.flow.loss_kind, reduction=self.config.flow.reduction)
        return loss, {"loss_action": loss.detach()}

    # -- inference ---------------------------------------------------------------------------------
    def grid(self, num_steps: int | None = None) -> torch.Tensor:
        if num_steps is None:
            return self.config.flow.grid(self.device)
        return time_grid(num_steps=num_steps, shift=self.config.flow.shift, device=self.device)

    def _noise(self, shape, noise, generator):
        if noise is not None:
            return noise.to(self.device, torch.float32)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    @torch.no_grad()
    def sample_actions(self, batch: dict, *, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None, num_steps: int | None = None) -> dict:
        """Model-space sampling: prefix once, then ``num_steps`` Euler steps (default: the flow grid, 10),
        each a suffix pass reading the prefix cache. Returns ``{"actions": [B, H, action_dim]}``."""
        prefix = self.embed_prefix(batch)
        _, cache = self.run_prefix(prefix)
        B = prefix.tokens.shape[0]
        state_tok = None if self.config.pi05 else self.state_token(self.normalizer.normalize("state", batch["state"]))
        H, A = self.config.action_horizon, self.config.action_dim
        plan = self.plan_suffixes(prefix, [(ACT, "actions", H, not self.config.pi05)])

        def velocity(x, t):
            s = self.action_suffix(x, t.expand(B), state_tok)
            return self.action_out_proj(self.run_suffixes(prefix, cache, [s], plan)["actions"])

        x = euler_sample(velocity, self._noise((B, H, A), noise, generator), self.grid(num_steps))
        return {"actions": x}

    def _output(self, key: str, x: torch.Tensor) -> torch.Tensor:
        x = self.normalizer.unnormalize(key, x)
        real = self.config.real_action_dim
        return x if real is None else x[..., :real]

    @torch.no_grad()
    def infer(self, batch: dict, **kw) -> dict:
        """Raw-space inference (openpi's ``Policy.infer``): :meth:`sample_actions`, unnormalised and cut to
        ``real_action_dim``."""
        out = self.sample_actions(batch, **kw)
        return {k: self._output(k, v) for k, v in out.items()}

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict, **kw) -> torch.Tensor:
        """``[B, H, real_action_dim]`` unnormalised actions."""
        return self.infer(batch, **kw)["actions"]

    # -- demo --------------------------------------------------------------------------------------
    def demo_batch(self, batch_size: int = 2, generator: torch.Generator | None = None,
                   action_frames: int | None = None) -> dict:
        """Random inputs: ``num_cameras`` images (the last one masked when there are 3, as LIBERO's right
        wrist), prompts of random valid length, state, and a chunk of random actions."""
        c = self.config
        g = generator
        S = self.vision_tower.image_size
        n_cam, L = c.num_cameras, c.max_token_len
        vocab = self.language_model.embed_tokens.num_embeddings
        image_masks = torch.ones(batch_size, n_cam, dtype=torch.bool)
        if n_cam >= 3:
            image_masks[:, -1] = False
        lengths = torch.randint(1, L + 1, (batch_size,), generator=g)
        real = c.real_action_dim or c.action_dim
        return {
            "images": torch.rand(batch_size, n_cam, 3, S, S, generator=g) * 2 - 1,
            "image_masks": image_masks,
            "tokenized_prompt": torch.randint(0, vocab, (batch_size, L), generator=g),
            "tokenized_prompt_mask": torch.arange(L)[None, :] < lengths[:, None],
            "state": torch.randn(batch_size, c.state_dim or c.action_dim, generator=g),
            "actions": torch.randn(batch_size, action_frames or c.action_horizon, real, generator=g),
        }

    def demo_inference(self, batch: dict) -> dict:
        g = torch.Generator().manual_seed(0)
        return self.infer(batch, generator=g)


# ---------------------------------------------------------------------------------------------- registration
# Imported last: the component registry imports every built-in model (ACoT among them, which builds on the
# classes above), so everything ACoT needs must exist before the registry is first imported from here.
from ..components import ModelConfig  # noqa: E402


@register("model", "pi0")
@dataclass
class Pi0Config(ModelConfig, Pi0ConfigFields):
    """pi0 / pi0.5 recipe (type ``pi0``); the fields are documented in :class:`Pi0ConfigFields`."""

    def build(self) -> Pi0Model:
        return Pi0Model(self)
