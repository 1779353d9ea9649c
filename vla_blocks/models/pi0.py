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

- ``images`` float [B, n_cam, 3, S, S] in [0, 1] (mapped to [−1, 1] by ``_pixels``) or uint8
  [B, n_cam, S', S', 3] in [0, 255] (resized-with-pad), ``image_masks`` bool [B, n_cam] (False: a missing
  camera, its tokens are invalid and its pixels zeroed); the full contract is ``Pi0Model.batch_schema``;
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

from ..backbones import BackboneConfig, ExpertSpec, build_language_model
from ..batch import IMAGE_DTYPES, BatchSchema, Field
from ..config import register
from ..encoders import Connector, VisionConfig, preprocess_images
from ..flow import FlowMatching, time_grid
from ..heads import FlowHead
from ..layout import Layout, Part, Segment
from ..model import VLAModel
from ..mot import MoTOutput, PassPlan, PrefixCache
from ..normalize import Normalizer

__all__ = ["Pi0Config", "Pi0ConfigFields", "Pi0Model", "Prefix", "Suffix", "prefix_segment", "openpi_head_names",
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
    - ``loss_dims``: which action dims the flow loss averages over: ``padded`` (openpi: every padded dim) or
      ``real`` (lerobot ``PI0Policy.forward``: only the first ``real_action_dim``); ACoT's EAR loss too.
    - ``freeze_vlm``: no gradients for the ``vlm`` expert and the token embedding (ACoT trains with
      Gemma-2B frozen; the vision tower stays trainable).
    """

    backbone: BackboneConfig
    vision: VisionConfig
    action_expert: ExpertSpec = field(default_factory=lambda: ExpertSpec(init_from=None))
    # pi0.5 mode: no state token (the state may enter the prompt as text, see the processor's discrete_state) and
    # the action expert's norms are adaRMS-conditioned on the time; false: pi0 (a state token, and the time embedding
    # concatenated to each action token through an MLP)
    pi05: bool = False
    action_dim: int = 32  # padded action (and state) width A the model works in (openpi: 32)
    action_horizon: int = 50  # actions per chunk H (openpi pi0/pi0.5: 50; ACoT LIBERO: 10)
    max_token_len: int = 48  # prompt tokens, padded/truncated to this (openpi: 48 pi0, 200 pi0.5)
    num_cameras: int = 3  # image slots of the prefix (openpi: 3: base, left wrist, right wrist); missing ones masked
    state_dim: int | None = None  # width of pi0's state_proj input (None: action_dim, as openpi pads the state)
    flow: FlowMatching = field(default_factory=FlowMatching)
    normalization: Literal["zscore", "quantile"] = "zscore"
    n_action_steps: int | None = None
    real_action_dim: int | None = None  # action dims returned by inference (None: action_dim; LIBERO: 7)
    # loss over the padded chunk (openpi: mean over all action_dim dims) or the real dims (lerobot; needs real_action_dim)
    loss_dims: Literal["padded", "real"] = "padded"
    freeze_vlm: bool = False
    # attention backend of the MoT stack: auto (first that supports the pass), sdpa, flex, triton, flash_attn, xformers
    attention_backend: str = "auto"
    gradient_checkpointing: bool = False  # recompute each layer in backward: less activation memory, one more forward

    def __post_init__(self):
        for name in ("action_dim", "action_horizon", "num_cameras"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.real_action_dim is not None and not 0 < self.real_action_dim <= self.action_dim:
            raise ValueError(f"real_action_dim must be in [1, action_dim={self.action_dim}], got {self.real_action_dim}")
        if self.loss_dims not in ("padded", "real"):
            raise ValueError(f"loss_dims: {self.loss_dims!r} is not one of ['padded', 'real']")
        if self.loss_dims == "real" and self.real_action_dim is None:
            raise ValueError("loss_dims: real needs real_action_dim (the dims lerobot's loss averages over)")


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
        """Number of prefix tokens P (image tokens of every camera, then the text)."""
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
        """What fixes the layout of this suffix: ``(expert, label, horizon, has a state token)``."""
        return self.expert, self.label, self.tokens.shape[1], self.state is not None


# ---------------------------------------------------------------------------------------------- model
def openpi_head_names(prefix: str = "", state: bool = True) -> dict[str, str]:
    """Upstream (openpi / lerobot / ACoT) names of a :class:`~vla_blocks.heads.FlowHead`'s modules:
    ``action_in_proj``, ``action_out_proj``, ``state_proj``, pi0's ``action_time_mlp_in/out``, pi0.5's
    ``time_mlp_in/out``; ``prefix="coarse_"`` gives ACoT's EAR head names."""
    names = {"proj.in_proj": f"{prefix}action_in_proj", "proj.out_proj": f"{prefix}action_out_proj",
             "time.time_mlp_in": f"{prefix}time_mlp_in", "time.time_mlp_out": f"{prefix}time_mlp_out",
             "time.action_time_mlp_in": f"{prefix}action_time_mlp_in",
             "time.action_time_mlp_out": f"{prefix}action_time_mlp_out"}
    if state:
        names["proj.state_proj"] = f"{prefix}state_proj"
    return names


class Pi0Model(VLAModel):
    """pi0 / pi0.5 policy: a prefix (vision tower + projector, prompt embedding) and flow heads
    (:class:`~vla_blocks.heads.FlowHead`, one per suffix chunk: ``flow_heads["actions"]`` here, ACoT adds
    ``"coarse_actions"``). Module names follow openpi/lerobot (``action_in_proj``, ``action_out_proj``,
    ``state_proj``, ``action_time_mlp_in/out``, ``time_mlp_in/out``, ``vision_tower``,
    ``multi_modal_projector``; the LLM and experts are in ``language_model``): the heads' modules are
    registered under those names (:meth:`~vla_blocks.model.VLAModel.expose`)."""

    config: "Pi0Config"
    batch_schema = BatchSchema("pi0", [  # checked at every entry point (vla_blocks.batch)
        Field("images", ("B", "n_cam", "*", "*", "*"), IMAGE_DTYPES, kind="image", mask="image_masks",
              doc="float → 2x − 1 in _pixels"),
        Field("image_masks", ("B", "n_cam"), ("bool",), optional=True),
        Field("tokenized_prompt", ("B", "L"), ("int",), range=(0, "max_id"), mask="tokenized_prompt_mask"),
        Field("tokenized_prompt_mask", ("B", "L"), ("bool",), optional=True),
        Field("state", ("B", "<=state_dim"), required_if="state_token"),
        Field("actions", ("B", ">=H", "<=A"), modes=("train",)),
        Field("noise", ("B", "H", "A"), modes=("train",), optional=True),
        Field("time", ("B",), range=(0.0, 1.0), modes=("train",), optional=True)])

    def batch_dims(self) -> dict:
        """The sizes the batch schema binds: horizon H, padded action width A, state width, the largest token id and
        whether a state token is used (pi0)."""
        c = self.config
        return {"H": c.action_horizon, "A": c.action_dim, "state_dim": c.state_dim or c.action_dim,
                "max_id": self.language_model.embed_tokens.num_embeddings - 1, "state_token": not c.pi05}

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
        A = config.action_dim
        self.add_flow_head("actions", ACT, FlowHead(
            A, self.width(ACT), time=self.time_conditioning, flow=config.flow,
            state_dim=None if config.pi05 else (config.state_dim or A)), openpi_head_names())
        self.normalizer = Normalizer(config.normalization)
        if config.freeze_vlm:
            self.freeze_expert(VLM, embeddings=True)

    # -- structure --------------------------------------------------------------------------------
    @property
    def time_conditioning(self) -> str:
        """``adarms`` (pi0.5) or ``concat`` (pi0): how every flow head of this model sees the time."""
        return "adarms" if self.config.pi05 else "concat"

    def add_flow_head(self, label: str, expert: str, head: FlowHead, names: dict[str, str]) -> FlowHead:
        """Attach a flow head producing ``label`` on ``expert`` (its modules registered under ``names``)."""
        head.label, head.expert = label, expert
        self.flow_heads[label] = self.expose(head, names)
        return head

    def _backbone_width(self) -> int:
        return self.config.backbone.spec().expert.hidden_size

    def _with_cond(self, spec: ExpertSpec, base_width: int) -> ExpertSpec:
        width = spec.hidden_size or base_width
        return dataclasses.replace(spec, adarms_cond_dim=width if self.config.pi05 else None)

    def expert_specs(self) -> dict[str, ExpertSpec]:
        """The experts of the stack, in order (``vlm`` first: it holds the backbone)."""
        return {VLM: ExpertSpec(), ACT: self._with_cond(self.config.action_expert, self._backbone_width())}

    def width(self, expert: str) -> int:
        """Hidden width of ``expert`` in the stack."""
        return self.language_model.stack.cfg.experts[expert].hidden_size

    @property
    def stack(self):
        """The :class:`~vla_blocks.mot.MoTStack` of the language model."""
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
        """The device of the model's parameters."""
        return self.multi_modal_projector.parameters().__next__().device

    # -- inputs ------------------------------------------------------------------------------------
    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, n_cam, 3, S, S]`` in [0, 1] (or uint8 ``[B, n_cam, H, W, 3]``) → ``[B·n_cam, 3, S, S]`` in [−1, 1]."""
        if isinstance(images, dict):
            images = torch.stack(list(images.values()), dim=1)
        if images.ndim != 5:
            raise ValueError(f"images must be [B, n_cam, 3, S, S], got shape {tuple(images.shape)}")
        flat = images.flatten(0, 1)
        S = self.vision_tower.image_size
        if flat.dtype == torch.uint8 or tuple(flat.shape[-2:]) != (S, S):
            flat = preprocess_images(flat, size=S, float_range="unit")
        else:
            flat = flat * 2.0 - 1.0  # float [0, 1] (checked by batch_schema) -> [-1, 1]
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

    def state_token(self, batch: dict) -> torch.Tensor | None:
        """pi0: the normalised state through the action head's ``state_proj`` → ``[B, 1, W]``; None in
        pi0.5 (the state is in the prompt)."""
        if self.config.pi05:
            return None
        state = self.normalizer.normalize("state", batch["state"])
        return self.flow_heads["actions"].embed_state(state.to(self.device))

    def pad_actions(self, x: torch.Tensor) -> torch.Tensor:
        """Actions ``[B, H, a]`` zero-padded to ``[B, H, action_dim]`` (float32, on the model's device)."""
        return self.flow_heads["actions"].proj.pad(x.to(self.device, torch.float32))

    def head_suffix(self, label: str, x_t: torch.Tensor, t: torch.Tensor, state_tok: torch.Tensor | None = None,
                    guide=None) -> Suffix:
        """The suffix inputs of head ``label`` at time ``t [B]``: its tokens, adaRMS cond and pi0's state token.
        ``guide(tokens)`` replaces the embedded tokens (ACoT's AGP guidance; in pi0 mode it sees the tokens
        after the concat-MLP time fusion, as upstream)."""
        head = self.flow_heads[label]
        tokens, cond = head.embed(x_t, t)
        if guide is not None:
            tokens = guide(tokens)
        return Suffix(head.expert, label, tokens, cond=cond, state=state_tok)

    # -- passes ------------------------------------------------------------------------------------
    def run_prefix(self, prefix: Prefix) -> tuple[MoTOutput, PrefixCache]:
        """The prefix pass (once per batch): per-layer K/V kept, with gradients, for the suffix passes."""
        layout = self._prefix_layout(prefix)
        n_img = prefix.image_valid.shape[1] * prefix.tokens_per_image
        hidden = layout.assemble({"image": prefix.tokens[:, :n_img].flatten(0, 1),
                                  "text": prefix.tokens[:, n_img:].flatten(0, 1)})
        out = self.stack(hidden, layout, return_kv=True)
        return out, out.cache(layout)

    def plan_suffixes(self, prefix: Prefix, specs: list[tuple[str, str, int, bool]]) -> PassPlan:
        """The plan of a suffix pass over ``specs`` (see :func:`policy_layout`), built once and reused by
        every Euler step: layout, sub-layout, routing, RoPE tables and mask metadata."""
        layout = policy_layout(prefix.image_valid, prefix.tokens_per_image, prefix.text_valid, specs,
                               self.experts).to(self.device)
        return self.stack.plan(layout, start=prefix.length)

    def run_suffixes(self, prefix: Prefix, cache: PrefixCache, suffixes: list[Suffix],
                     plan: PassPlan | None = None) -> dict[str, torch.Tensor]:
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
        cond = plan.sub.assemble(conds, partial=True) if conds else None
        out = self.stack(hidden, plan=plan, cache=cache, cond=cond)
        return {s.label: plan.sub.extract(out.hidden, s.label).view(s.tokens.shape[0], s.tokens.shape[1], -1)
                for s in suffixes}

    def head_velocity(self, label: str, prefix: Prefix, cache: PrefixCache, plan: PassPlan,
                      state_tok: torch.Tensor | None = None, guide=None):
        """``velocity(x, t)`` of head ``label`` for its Euler loop: one cached suffix pass per call
        (``guide`` as in :meth:`head_suffix`)."""
        head = self.flow_heads[label]

        def velocity(x, t):
            s = self.head_suffix(label, x, t.expand(x.shape[0]), state_tok, guide)
            return head.decode(self.run_suffixes(prefix, cache, [s], plan)[label])

        return velocity

    # -- training ----------------------------------------------------------------------------------
    def sample_time(self, batch: dict, B: int) -> torch.Tensor:
        """One flow time per sample (``batch["time"]`` or the action head's sampler), shared by every head."""
        t = batch.get("time")
        if t is None:
            t = self.flow_heads["actions"].flow.time_sampler.sample((B,), device=self.device)
        return t.to(self.device, torch.float32)

    def target_actions(self, batch: dict) -> torch.Tensor:
        """Normalised, padded ground-truth chunk ``[B, H, action_dim]`` (the first H frames of ``actions``)."""
        H = self.config.action_horizon
        a = batch["actions"]
        if a.ndim != 3 or a.shape[1] < H:
            raise ValueError(f"actions must be [B, ≥{H}, dims], got {tuple(a.shape)}")
        return self.pad_actions(self.normalizer.normalize("actions", a[:, :H]))

    def forward(self, batch: dict):
        """Flow-matching loss of the action head (the recipe's kind and reduction) → ``(loss, metrics)``."""
        head = self.flow_heads["actions"]
        actions = self.target_actions(batch)
        t = self.sample_time(batch, actions.shape[0])
        x_t, u = head.training_pair(actions, t, batch.get("noise"))
        prefix = self.embed_prefix(batch)
        _, cache = self.run_prefix(prefix)
        h = self.run_suffixes(prefix, cache, [self.head_suffix("actions", x_t, t, self.state_token(batch))])
        loss = head.loss(head.decode(h["actions"]), u, dim_mask=self.loss_dim_mask())
        return loss, {"loss_action": loss.detach()}

    def loss_dim_mask(self) -> torch.Tensor | None:
        """The flow loss's dim mask of ``loss_dims``: None (``padded``) or the first ``real_action_dim`` dims."""
        c = self.config
        if c.loss_dims == "padded":
            return None
        return torch.arange(c.action_dim, device=self.device) < c.real_action_dim

    # -- inference ---------------------------------------------------------------------------------
    def grid(self, num_steps: int | None = None, label: str = "actions") -> torch.Tensor:
        """Head ``label``'s Euler grid (its recipe's, or ``num_steps`` uniform steps with its shift)."""
        flow = self.flow_heads[label].flow
        if num_steps is None:
            return flow.grid(self.device)
        return time_grid(num_steps=num_steps, shift=flow.shift, device=self.device, numerics=flow.numerics)

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
        H, A = self.config.action_horizon, self.config.action_dim
        plan = self.plan_suffixes(prefix, [(ACT, "actions", H, not self.config.pi05)])
        velocity = self.head_velocity("actions", prefix, cache, plan, self.state_token(batch))
        x = self.flow_heads["actions"].sample(velocity, self._noise((B, H, A), noise, generator), self.grid(num_steps))
        return {"actions": x}

    def _output(self, key: str, x: torch.Tensor) -> torch.Tensor:
        real = self.config.real_action_dim
        x = x if real is None else x[..., :real]
        return self.normalizer.unnormalize(key, x, padded=True)  # past the stats' width: model-space padding

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
            "images": torch.rand(batch_size, n_cam, 3, S, S, generator=g),  # float in [0, 1] (vla_blocks.batch)
            "image_masks": image_masks,
            "tokenized_prompt": torch.randint(0, vocab, (batch_size, L), generator=g),
            "tokenized_prompt_mask": torch.arange(L)[None, :] < lengths[:, None],
            "state": torch.randn(batch_size, c.state_dim or c.action_dim, generator=g),
            "actions": torch.randn(batch_size, action_frames or c.action_horizon, real, generator=g),
        }

    def demo_inference(self, batch: dict) -> dict:
        """:meth:`infer` on a batch with a fixed generator (seed 0), for ``vla-blocks demo``."""
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
        """The :class:`Pi0Model` of this recipe (random init; weights come from a checkpoint or a converter)."""
        return Pi0Model(self)
