"""HALO: a three-expert Mixture-of-Transformers with embodied multimodal chain-of-thought.

One shared-attention MoT stack (Qwen2.5 backbone with q/k norm) and three experts:

- ``und``: text (every token id, including the ``<|vision_*|>`` / ``<|action_*|>`` markers) and
  SigLIP2-NaViT tokens (``vit_model`` → ``connector`` → ``+ vit_pos_embed``); causal LM with CE;
- ``gen``: FLUX-VAE latents, 2×2-patchified (``vae2llm(x_t) + time_embedder(t) + latent_pos_embed``,
  read out by ``llm2vae``); flow matching with MSE;
- ``act``: the action chunk, one token per step (``input_linear_layer(a_t) + action_time_embedder(t)
  + sincos_1d(arange(L))``, read out by ``output_linear_layer``); flow matching with L1.

Which token kind goes to which expert is the recipe's ``roles`` mapping. A sample is a *sequence
plan* (reference halo_bagel.md §2.2), each item one attention segment:

- reactive: every history frame as a ViT image, the prompt, the action (noise);
- EM-CoT: every history frame as a clean VAE image and a ViT image, the prompt, the thought
  (CE), the goal frame as noisy VAE (MSE), clean VAE and ViT, then the action (noise) — so the
  action attends to the clean subgoal and never to the noisy one.

Images and actions take one RoPE id per block; noisy blocks do not advance it. Several samples pack
into one row as documents (:meth:`HaloModel.collate` with ``max_tokens``).

Inference (:meth:`HaloModel.infer`) runs the EM-CoT chain on KV caches — greedy reasoning text,
the subgoal latent by flow matching with text/image classifier-free guidance over three contexts
(full, no-text, no-image: each its own cache, none aliasing another), the subgoal re-inserted as a
clean latent (and ViT image), then the action chunk — or the reactive mode, and returns a
:class:`HaloTrace` with the reasoning, the decoded subgoal, the actions and per-stage timings::

    model = vla_blocks.create_model("halo-tiny")
    batch = model.collate([HaloSample(history=[frame0, frame1], instruction="stack the cups",
                                      actions=chunk, thought="...", goal=goal_frame)])
    loss, metrics = model(batch)
    trace = model.infer([frame0, frame1], "stack the cups")
    trace.reasoning, trace.subgoal_image, trace.actions, trace.timings
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from ..backbones import BackboneConfig, ExpertSpec, build_language_model
from ..components import ModelConfig
from ..config import register
from ..encoders import Connector, VAEConfig, VisionConfig, navit_size
from ..flow import (FlowMatching, LogitNormalTimeSampler, TimeSamplerConfig, cfg_in_interval, cfg_velocity, euler_sample,
                    flow_loss, time_grid)
from ..heads import FlowHead, PositionEmbedding2D, VisualLatentHead
from ..layout import Layout, Part, Segment
from ..model import VLAModel
from ..mot import PrefixCache
from ..tokenization import HaloTokenizer, TokenizerConfig

__all__ = ["HaloConfig", "HaloLossWeights", "HaloCondDropout", "HaloInferenceConfig", "HaloSample", "PlanItem", "HaloModel",
           "HaloContext", "ContextItem", "HaloTrace", "pack_rows", "format_prompt", "format_thought",
           "synthetic_sample", "PROMPT_TEMPLATE", "ROLES"]

#: HALO's names of the action head's modules (BAGEL-style checkpoints keep them).
HALO_ACTION_HEAD_NAMES = {"proj.in_proj": "input_linear_layer", "proj.out_proj": "output_linear_layer",
                          "proj.time_embedder": "action_time_embedder", "time.time_mlp_in": "action_time_mlp_in",
                          "time.time_mlp_out": "action_time_mlp_out"}

PROMPT_TEMPLATE = "You are an embodied agent. Your task is to: {instruction}. Plan and act."
ROLES = ("text", "vit", "latent", "action")


def format_prompt(instruction: str, template: str = PROMPT_TEMPLATE) -> str:
    """HALO's training prompt: the instruction lower-cased with its trailing '.' stripped, in the template."""
    return template.format(instruction=instruction.strip().rstrip(".").lower())


def format_thought(plan: Sequence[str], subtask: str, left: str, right: str) -> str:
    """HALO's thought text (plain-text markers, not added tokens)."""
    return (f"<|plan|>{' '.join(plan)}<|\\ plan|><|subtask|>{subtask}<|\\ subtask|>"
            f"<|movement|>[LEFT]: {left} [RIGHT]: {right}<|\\ movement|>")


# ---------------------------------------------------------------------------------------------- config
@dataclass
class HaloLossWeights:
    """``ce·CE + mse·MSE + l1·L1``, each term a global per-token mean."""

    ce: float = 1.0
    mse: float = 1.0
    l1: float = 1.0


def _default_stage_weights() -> dict[str, HaloLossWeights]:
    # HALO README: stage 1 (versatile pre-training) 0.25·CE + 0.5·MSE + 1.0·L1; stage 2 (EM-CoT) 1 : 1 : 1
    return {"pretrain": HaloLossWeights(0.25, 0.5, 1.0), "emcot": HaloLossWeights(1.0, 1.0, 1.0)}


@dataclass
class HaloCondDropout:
    """Training-time condition dropout (BAGEL's ``enable_cfg`` items): each prompt text, history ViT image
    and history VAE image is left out of the plan with these probabilities, so the no-text / no-image
    contexts of classifier-free guidance are in distribution. BAGEL pre-training: text 0.1, ViT 0.3,
    VAE 0.3; HALO's RoboTwin fine-tune: off. Targets (thought, goal, action) are never dropped."""

    text: float = 0.0
    vit: float = 0.0
    vae: float = 0.0


@dataclass
class HaloInferenceConfig:
    """Inference knobs (defaults: HALO's released inference settings).

    Subgoal: ``latent_points``-point grid with ``latent_shift``, text/image CFG scales on
    ``cfg_interval`` (``lo < t ≤ hi``) with ``cfg_renorm``; as in BAGEL, image guidance is nested in
    text guidance (no guidance at all unless the text scale is > 1). Action: ``action_points``-point unshifted
    grid, CFG on ``action_cfg_interval`` in EM-CoT mode and on ``reactive_action_cfg_interval`` in
    reactive mode (HALO: [1, 1], i.e. off). ``decode_scale``: the sampled latent is divided by it
    before VAE decoding (HALO hard-codes 1.4; BAGEL 1.0). ``subgoal_vit``: the decoded subgoal is also
    inserted as a ViT image, as in the training plan (HALO inserts only the latent). ``mode: mixed``
    runs the EM-CoT chain with probability ``cot_prob`` and acts reactively otherwise (HALO's policy: 0.2).
    """

    mode: Literal["emcot", "reactive", "mixed"] = "emcot"
    cot_prob: float = 0.2
    max_new_tokens: int = 1000
    latent_points: int = 50
    latent_shift: float = 3.0
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 2.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm: Literal["global", "channel", "text_channel", "none"] = "global"
    cfg_renorm_min: float = 0.0
    action_points: int = 10
    action_cfg_text_scale: float = 6.0
    action_cfg_img_scale: float = 6.0
    action_cfg_interval: tuple[float, float] = (0.4, 1.0)
    reactive_action_cfg_interval: tuple[float, float] = (1.0, 1.0)
    action_cfg_renorm: Literal["global", "channel", "text_channel", "none"] = "global"
    decode_scale: float = 1.0
    subgoal_vit: bool = True


@register("model", "halo")
@dataclass
class HaloConfig(ModelConfig):
    """HALO. ``backbone`` holds the ``und`` expert (Qwen2.5 + q/k norm); ``experts`` lists all three
    (``act.ffn_ratio`` is HALO's ``action_expert_mlp_ratio``); ``roles`` routes token kinds to experts.

    Images: ViT inputs are resized by the NaViT encoder (native aspect ratio, ≤ its
    ``max_num_patches``); VAE inputs keep their aspect ratio with the longer side ≤ ``vae_max_side``
    and the shorter ≥ ``vae_min_side``, rounded to multiples of 16 (VAE ×8 · patch 2).
    ``latent_time`` / ``action_time``: training time samplers (logit-normal; HALO uses no shift).
    ``action_time_conditioning``: how the action expert sees the flow time — ``additive`` (HALO:
    ``action_time_embedder(t)`` added to every action token) or ``adarms`` (pi0.5's adaRMS: the act expert's
    norms are conditioned on ``swish(action_time_mlp_out(swish(action_time_mlp_in(posemb(t)))))``).
    ``action_loss``: ``l1`` (HALO) or ``mse``; mean over channels, then over action tokens.
    ``stage`` picks ``loss_weights[stage]``.
    """

    backbone: BackboneConfig
    vision: VisionConfig
    vae: VAEConfig
    experts: dict[str, ExpertSpec] = field(default_factory=lambda: {"und": ExpertSpec(), "gen": ExpertSpec(),
                                                                     "act": ExpertSpec(ffn_ratio=1.0)})
    roles: dict[str, str] = field(default_factory=lambda: {"text": "und", "vit": "und", "latent": "gen",
                                                           "action": "act"})
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    action_dim: int = 14
    chunk_size: int = 16
    n_action_steps: int | None = None
    history_frames: int = 3
    connector: Literal["mlp", "linear"] = "mlp"
    vit_max_side: int = 70
    max_latent_size: int = 64
    latent_patch_size: int = 2
    vae_max_side: int = 1024
    vae_min_side: int = 512
    latent_time: TimeSamplerConfig = field(default_factory=LogitNormalTimeSampler)
    action_time: TimeSamplerConfig = field(default_factory=LogitNormalTimeSampler)
    action_time_conditioning: Literal["additive", "adarms"] = "additive"
    action_loss: Literal["l1", "mse"] = "l1"
    stage: str = "pretrain"
    loss_weights: dict[str, HaloLossWeights] = field(default_factory=_default_stage_weights)
    cond_dropout: HaloCondDropout = field(default_factory=HaloCondDropout)
    prompt_template: str = PROMPT_TEMPLATE
    freeze_vae: bool = True
    freeze_vit: bool = False
    attention_backend: str = "auto"
    gradient_checkpointing: bool = False
    inference: HaloInferenceConfig = field(default_factory=HaloInferenceConfig)

    def __post_init__(self):
        missing = [r for r in ROLES if r not in self.roles]
        if missing:
            raise ValueError(f"roles: missing {missing} (need an expert for each of {list(ROLES)})")
        for r, e in self.roles.items():
            if r not in ROLES:
                raise ValueError(f"roles.{r}: unknown token kind (valid: {list(ROLES)})")
            if e not in self.experts:
                raise ValueError(f"roles.{r}: {e!r} is not an expert ({list(self.experts)})")
        if self.roles["text"] != next(iter(self.experts)):
            raise ValueError("roles.text must be the first expert (the backbone expert with the LM head)")
        if self.stage not in self.loss_weights:
            raise ValueError(f"stage {self.stage!r} has no loss_weights entry ({list(self.loss_weights)})")
        if self.action_dim <= 0 or self.chunk_size <= 0:
            raise ValueError("action_dim and chunk_size must be positive")

    def build(self) -> "HaloModel":
        return HaloModel(self)


# ---------------------------------------------------------------------------------------------- samples and plans
@dataclass
class HaloSample:
    """One training sample. Frames are float [3, H, W] in [0, 1] or uint8 [H, W, 3] / [3, H, W].

    EM-CoT when ``thought`` or ``goal`` is given (either may be left out for ablations), reactive
    otherwise. ``actions``: [L ≤ chunk_size, action_dim] (short chunks repeat their last action).
    """

    history: list[torch.Tensor]
    instruction: str
    actions: torch.Tensor | None = None
    thought: str | None = None
    goal: torch.Tensor | None = None

    @property
    def mode(self) -> str:
        return "emcot" if (self.thought is not None or self.goal is not None) else "reactive"


@dataclass
class PlanItem:
    """One item of a sequence plan = one attention segment.

    ``kind``: ``text`` (``<|im_start|>`` ids ``<|im_end|>``, causal; ``loss`` = CE), ``vit`` / ``vae``
    (markers around ViT / clean latent tokens, full), ``vae_noisy`` (markers around noisy latent
    tokens, noise, MSE), ``action`` (markers around the chunk, noise, L1). ``grid``: token grid (h, w).
    """

    kind: Literal["text", "vit", "vae", "vae_noisy", "action"]
    source: str
    ids: list[int] | None = None
    loss: bool = False
    image: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    actions: torch.Tensor | None = None
    chunk: int = 0

    @property
    def num_tokens(self) -> int:
        if self.kind == "text":
            return len(self.ids) + 2
        if self.kind == "action":
            return self.chunk + 2
        return self.grid[0] * self.grid[1] + 2


def item_segment(item: PlanItem, roles: dict[str, str]) -> Segment:
    """The attention segment of a plan item (reference §2.1): mode, parts and RoPE policy."""
    text = roles["text"]
    if item.kind == "text":
        return Segment.of("causal", text, item.num_tokens, "text", rope="sequential")

    def marked(expert, n, label, mode, rope):
        return Segment(mode, [Part(text, 1, "text"), Part(expert, n, label), Part(text, 1, "text")], rope)

    if item.kind == "vit":
        return marked(roles["vit"], item.grid[0] * item.grid[1], "vit", "full", "block")
    if item.kind == "vae":
        return marked(roles["latent"], item.grid[0] * item.grid[1], "latent", "full", "block")
    if item.kind == "vae_noisy":
        return marked(roles["latent"], item.grid[0] * item.grid[1], "latent_noisy", "noise", "block_hold")
    if item.kind == "action":
        return marked(roles["action"], item.chunk, "action", "noise", "block_hold")
    raise ValueError(f"unknown plan item kind {item.kind!r}")


def pack_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Greedy packing in order: each row takes samples until the next would exceed ``max_tokens``.

    Returns rows of sample indices; a sample longer than ``max_tokens`` is an error.
    """
    rows: list[list[int]] = []
    cur, used = [], 0
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"sample {i} has {n} tokens, more than max_tokens={max_tokens}")
        if cur and used + n > max_tokens:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


def _as_unit_chw(img: torch.Tensor) -> torch.Tensor:
    """A frame as float [3, H, W] in [0, 1] (from uint8 HWC/CHW or float CHW/HWC in [0, 1])."""
    if not isinstance(img, torch.Tensor) or img.ndim != 3:
        raise ValueError(f"a frame must be a 3-D tensor [3, H, W] or [H, W, 3], got {getattr(img, 'shape', img)}")
    x = img.permute(2, 0, 1) if img.shape[-1] == 3 and img.shape[0] != 3 else img
    return x.float() / 255.0 if img.dtype == torch.uint8 else x.float()


# ---------------------------------------------------------------------------------------------- inference contexts
@dataclass
class ContextItem:
    """A segment held in a :class:`HaloContext` with the embeddings it was run with (by label)."""

    kind: str
    source: str
    segment: Segment
    embeds: dict[str, torch.Tensor]
    ids: list[int] = field(default_factory=list)
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # per-label adaRMS condition (action tokens)


def _segment_key(seg: Segment) -> tuple:
    """A hashable description of a segment's structure (mode, RoPE policy, parts with validity)."""
    return (seg.mode, seg.rope, tuple((p.expert, p.length, p.label,
                                       p.valid if isinstance(p.valid, bool) else tuple(p.valid_tensor().tolist()))
                                      for p in seg.parts))


class HaloContext:
    """A KV-cached prefix of segments (batch 1): the unit of BAGEL's ``gen_context`` /
    ``cfg_text_context`` / ``cfg_img_context``. Each context owns its cache; :meth:`clone` copies it.

    :meth:`extend` runs new segments over the cache and appends their K/V; :meth:`grow_text` appends one
    token to the last (causal text) segment; :meth:`suffix` runs a segment (noisy latent or action)
    without touching the cache.
    """

    def __init__(self, model: "HaloModel", name: str = "context"):
        self.model = model
        self.name = name
        self.items: list[ContextItem] = []
        self.cache: PrefixCache | None = None
        self._layout: Layout | None = None  # the layout of the cached tokens (grown in place while decoding)
        self._suffix_plan: tuple | None = None  # (key, PassPlan) of the last suffix structure

    @property
    def segments(self) -> list[Segment]:
        return [it.segment for it in self.items]

    @property
    def length(self) -> int:
        return 0 if self.cache is None else self.cache.length

    def sources(self) -> list[str]:
        return [f"{it.source}:{it.kind}" for it in self.items]

    def layout(self, extra: Sequence[Segment] = ()) -> Layout:
        return Layout.from_samples([self.segments + list(extra)], self.model.experts)

    def _run(self, layout: Layout, items: Sequence[ContextItem]):
        """Run ``items`` (the tokens of ``layout`` after the cached ones) and append their K/V to the cache."""
        P = self.length
        plan = self.model.lm.stack.plan(layout, start=P)
        embeds: dict[str, list[torch.Tensor]] = {}
        for it in items:
            for k, v in it.embeds.items():
                embeds.setdefault(k, []).append(v)
        hidden = plan.sub.assemble({k: torch.cat(v) for k, v in embeds.items()})
        out = self.model.lm.stack(hidden, plan=plan, cache=self.cache if P else None, return_kv=True)
        if self.cache is None:
            self.cache = out.cache(layout)
        else:
            self.cache.append(out.keys, out.values, layout)
        self._layout = layout
        return out, plan.sub

    def extend(self, items: Sequence[ContextItem]):
        """Append ``items`` (their K/V go into the cache). Returns (MoTOutput of the new tokens, their layout)."""
        layout = Layout.from_samples([self.segments + [it.segment for it in items]], self.model.experts)
        out = self._run(layout, items)
        self.items.extend(items)
        return out

    def grow_text(self, token_id: int):
        """Append one token to the last segment (causal text), as the decoding step of greedy generation.

        The context's layout grows by one token (:meth:`Layout.grow`) and the K/V go into the cache's
        preallocated buffers: a step's bookkeeping and copies do not grow with the context."""
        last = self.items[-1]
        if last.kind != "text":
            raise ValueError("grow_text needs a text segment at the end of the context")
        m = self.model
        seg = Segment.of("causal", m.roles["text"], last.segment.length + 1, "text")
        new_tok = ContextItem("text", last.source, seg, {"text": m.embed_text([token_id])}, [token_id])
        out = self._run(self._layout.grow(1, "text"), [new_tok])
        self.items[-1] = ContextItem("text", last.source, seg, {"text": torch.cat([last.embeds["text"],
                                                                                   new_tok.embeds["text"]])},
                                     last.ids + [token_id])
        return out

    def suffix(self, item: ContextItem):
        """Run ``item`` after the cached prefix without writing to the cache (flow-matching steps).

        The layout, routing sub-layout and mask metadata are built once per (prefix length, suffix
        structure) and reused by every step of a flow loop."""
        key = (self.length, _segment_key(item.segment))
        if self._suffix_plan is None or self._suffix_plan[0] != key:
            layout = Layout.from_samples([self.segments + [item.segment]], self.model.experts)
            self._suffix_plan = (key, self.model.lm.stack.plan(layout, start=self.length))
        plan = self._suffix_plan[1]
        hidden = plan.sub.assemble(item.embeds)
        cond = plan.sub.assemble(item.cond, partial=True) if item.cond else None
        out = self.model.lm.stack(hidden, plan=plan, cache=self.cache if plan.start else None, cond=cond)
        return out, plan.sub

    def clone(self, name: str) -> "HaloContext":
        c = HaloContext(self.model, name)
        c.items = list(self.items)
        c.cache = None if self.cache is None else self.cache.clone()
        c._layout = self._layout
        return c


@dataclass
class HaloTrace:
    """What one inference call did: reasoning text, subgoal (latent and decoded image in [0, 1]),
    actions [L, A], per-stage wall-clock seconds, and the contexts it used."""

    mode: str
    actions: torch.Tensor
    timings: dict[str, float]
    reasoning: str | None = None
    reasoning_ids: list[int] | None = None
    subgoal_latent: torch.Tensor | None = None
    subgoal_image: torch.Tensor | None = None
    contexts: dict[str, HaloContext] = field(default_factory=dict)

    def summary(self) -> dict:
        out = {"mode": self.mode}
        if self.mode == "emcot":
            out["reasoning"] = repr(self.reasoning)
            out["subgoal_image"] = self.subgoal_image
        out["actions"] = self.actions
        out["timings"] = {k: round(v, 4) for k, v in self.timings.items()}
        out["contexts"] = {k: f"{c.length} tokens: {' '.join(c.sources())}" for k, c in self.contexts.items()}
        return out


# ---------------------------------------------------------------------------------------------- model
class HaloModel(VLAModel):
    """HALO built from a :class:`HaloConfig` (see the module docstring).

    Modules under upstream names (a converter maps prefixes only): ``lm`` (``embed_tokens``, the MoT
    ``stack`` with experts ``und`` / ``gen`` / ``act``, ``lm_head``), ``vit_model``, ``connector``,
    ``vit_pos_embed``, ``vae``, ``vae2llm``, ``llm2vae``, ``time_embedder``, ``latent_pos_embed``,
    ``input_linear_layer``, ``output_linear_layer``, ``action_time_embedder``.

    Training: ``loss, metrics = model(model.collate(samples))``. Inference: :meth:`infer` (a trace),
    :meth:`predict_action_chunk` / ``select_action`` (lerobot names). ``model.tokenizer`` may be replaced
    by any :class:`~vla_blocks.tokenization.HaloTokenizer` whose ids fit the vocabulary.
    """

    def __init__(self, config: HaloConfig):
        super().__init__(config)
        cfg = config
        self.n_action_steps = cfg.n_action_steps
        self.roles = dict(cfg.roles)
        self.experts = list(cfg.experts)
        self.stage = cfg.stage
        self.tokenizer: HaloTokenizer = cfg.tokenizer.build()
        self.lm = build_language_model(cfg.backbone, self.expert_specs(), cfg.attention_backend,
                                       cfg.gradient_checkpointing)
        if self.tokenizer.max_id >= self.lm.embed_tokens.num_embeddings:
            raise ValueError(f"the tokenizer ({self.tokenizer}) has ids up to {self.tokenizer.max_id}, beyond the "
                             f"backbone's vocab_size {self.lm.embed_tokens.num_embeddings}")
        width = {e: c.hidden_size for e, c in self.lm.stack.cfg.experts.items()}
        d_vit, d_lat, d_act = width[self.roles["vit"]], width[self.roles["latent"]], width[self.roles["action"]]
        # understanding: SigLIP2 NaViT → connector → + 2-D sincos table (BAGEL's vit_pos_embed)
        self.vit_model = cfg.vision.build()
        self.connector = Connector(self.vit_model.out_dim, d_vit, kind=cfg.connector)
        self.vit_pos_embed = PositionEmbedding2D(cfg.vit_max_side, d_vit)
        # generation: FLUX VAE (frozen by default) and the latent head, its modules under BAGEL's names
        self.vae = cfg.vae.build()
        self.expose(VisualLatentHead(d_lat, self.vae.latent_channels, cfg.latent_patch_size, cfg.max_latent_size),
                    {n: n for n in ("vae2llm", "llm2vae", "time_embedder", "latent_pos_embed")}, as_attr="latent_head")
        # action: a FlowHead (HALO's input/output linear layers, output zero-initialised, its own time
        # embedder and the 1-D sincos table; or pi0.5's adaRMS time MLP)
        act_head = FlowHead(cfg.action_dim, d_act, time=cfg.action_time_conditioning, pos_embed="sincos",
                            zero_init_out=True, flow=FlowMatching(cfg.action_time, cfg.action_loss, "token_mean",
                                                                  num_steps=None, points=cfg.inference.action_points))
        act_head.label, act_head.expert = "action", self.roles["action"]
        self.flow_heads["action"] = self.expose(act_head, HALO_ACTION_HEAD_NAMES)
        if cfg.freeze_vae:
            self.vae.requires_grad_(False)
        if cfg.freeze_vit:
            self.vit_model.requires_grad_(False)
        self.latent_stride = self.vae.downsample * cfg.latent_patch_size

    # ------------------------------------------------------------------ basics
    def expert_specs(self) -> dict[str, ExpertSpec]:
        """The recipe's experts; with adaRMS time conditioning the action expert's norms take the condition."""
        specs = dict(self.config.experts)
        if self.config.action_time_conditioning == "adarms":
            act = self.roles["action"]
            width = specs[act].hidden_size or self.config.backbone.spec().expert.hidden_size
            specs[act] = dataclasses.replace(specs[act], adarms_cond_dim=width)
        return specs

    @property
    def device(self) -> torch.device:
        return self.lm.embed_tokens.weight.device

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_vae:
            self.vae.eval()
        return self

    def _generator(self, batch: dict) -> torch.Generator | None:
        g = batch.get("generator")
        if g is None and batch.get("seed") is not None:
            g = torch.Generator().manual_seed(int(batch["seed"]))
        return g

    # ------------------------------------------------------------------ image geometry
    def vae_size(self, height: int, width: int) -> tuple[int, int]:
        """Pixel size of a frame for the VAE: aspect kept, longer side ≤ vae_max_side, shorter ≥ vae_min_side,
        rounded to multiples of 16."""
        c, s = self.config, self.latent_stride
        scale = 1.0
        if max(height, width) * scale > c.vae_max_side:
            scale = c.vae_max_side / max(height, width)
        if min(height, width) * scale < c.vae_min_side:
            scale = c.vae_min_side / min(height, width)
        return (max(s, int(round(height * scale / s)) * s), max(s, int(round(width * scale / s)) * s))

    def latent_grid(self, image: torch.Tensor) -> tuple[int, int]:
        H, W = _as_unit_chw(image).shape[-2:]
        h, w = self.vae_size(H, W)
        return h // self.latent_stride, w // self.latent_stride

    def vit_grid(self, image: torch.Tensor) -> tuple[int, int]:
        H, W = _as_unit_chw(image).shape[-2:]
        p = self.vit_model.patch_size
        th, tw = navit_size(H, W, p, self.vit_model.max_num_patches)
        return th // p, tw // p

    # ------------------------------------------------------------------ embeddings
    def embed_text(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        return self.lm.embed(ids)

    def embed_vit(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Frames → ViT tokens at the ``vit`` expert width: ``connector(vit_model(x)) + vit_pos_embed``."""
        feats = self.vit_model([_as_unit_chw(im) for im in images])
        x = self.connector(feats.features.to(self.connector_dtype))
        m = self.config.vit_max_side
        ids = []
        for h, w in feats.grids.tolist():
            if h > m or w > m:
                raise ValueError(f"ViT grid {h}×{w} exceeds vit_max_side={m}")
            ids.append((torch.arange(h)[:, None] * m + torch.arange(w)[None, :]).reshape(-1))
        ids = torch.cat(ids).to(x.device)
        return x + self.vit_pos_embed(ids).to(x.dtype)

    @property
    def connector_dtype(self):
        return next(self.connector.parameters()).dtype

    @torch.no_grad()
    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels)

    def encode_latents(self, images: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Frames → (patch tokens [h·w, p²C], grid (h, w)) each; frames of one size are encoded together."""
        out: list = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        pix = []
        for i, im in enumerate(images):
            x = _as_unit_chw(im)
            size = self.vae_size(*x.shape[-2:])
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
            pix.append(x * 2.0 - 1.0)
            groups.setdefault(size, []).append(i)
        for size, idx in groups.items():
            px = torch.stack([pix[i] for i in idx]).to(self.device)
            enc = self._vae_encode if self.config.freeze_vae else self.vae.encode
            lat = enc(px)
            tok = self.latent_head.patchify(lat)
            grid = (size[0] // self.latent_stride, size[1] // self.latent_stride)
            for j, i in enumerate(idx):
                out[i] = (tok[j], grid)
        return out

    def latent_position_ids(self, grid: tuple[int, int]) -> torch.Tensor:
        return self.latent_head.position_ids(grid[0], grid[1], device=self.device)

    def embed_latent(self, x: torch.Tensor, t: torch.Tensor, pos_ids: torch.Tensor) -> torch.Tensor:
        """Latent patch tokens [n, p²C] at times t [n] → ``vae2llm(x) + time_embedder(t) + latent_pos_embed``."""
        return self.latent_head.embed(x, t, pos_ids)

    def embed_action(self, a_t: torch.Tensor, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Noisy chunks [n, L, A] at times t [n] → ``({"action": tokens [n·L, D]}, {"action": cond [n·L, D]}
        or {})``: ``input_linear_layer(a_t) + action_time_embedder(t) + sincos_1d(arange(L))`` (HALO), or the
        projected tokens + table with the adaRMS condition of every action token."""
        n, L, _ = a_t.shape
        h, cond = self.flow_heads["action"].embed(a_t, t.to(self.device))
        if cond is None:
            return {"action": h.reshape(n * L, -1)}, {}
        return {"action": h.reshape(n * L, -1)}, {"action": cond[:, None, :].expand(n, L, -1).reshape(n * L, -1)}

    # ------------------------------------------------------------------ sequence plans
    def _chunk(self, actions: torch.Tensor | None) -> torch.Tensor | None:
        if actions is None:
            return None
        a = torch.as_tensor(actions, dtype=torch.float32)
        L, A = self.config.chunk_size, self.config.action_dim
        if a.ndim != 2 or a.shape[1] != A:
            raise ValueError(f"actions must be [L, {A}], got {tuple(a.shape)}")
        if a.shape[0] > L:
            raise ValueError(f"action chunk has {a.shape[0]} steps, more than chunk_size={L}")
        if a.shape[0] < L:  # HALO pads short chunks by repeating the last action
            a = torch.cat([a, a[-1:].expand(L - a.shape[0], A)])
        return a

    def sequence_plan(self, sample: HaloSample, dropout: HaloCondDropout | None = None,
                      generator: torch.Generator | None = None) -> list[PlanItem]:
        """The plan of one sample (reference §2.2; see the module docstring), with conditions left out at the
        ``dropout`` probabilities (none by default)."""
        tok = self.tokenizer
        if not sample.history:
            raise ValueError("a sample needs at least one history frame")

        def keep(p: float) -> bool:
            return p <= 0.0 or float(torch.rand((), generator=generator)) >= p

        d = dropout or HaloCondDropout()
        items: list[PlanItem] = []
        emcot = sample.mode == "emcot"
        for i, frame in enumerate(sample.history):
            if emcot and keep(d.vae):
                items.append(PlanItem("vae", f"history[{i}]", image=frame, grid=self.latent_grid(frame)))
            if keep(d.vit):
                items.append(PlanItem("vit", f"history[{i}]", image=frame, grid=self.vit_grid(frame)))
        if keep(d.text):
            items.append(PlanItem("text", "prompt", ids=tok.encode(format_prompt(sample.instruction,
                                                                                    self.config.prompt_template))))
        if sample.thought is not None:
            items.append(PlanItem("text", "thought", ids=tok.encode(sample.thought), loss=True))
        if sample.goal is not None:
            g = self.latent_grid(sample.goal)
            items.append(PlanItem("vae_noisy", "goal", image=sample.goal, grid=g))
            items.append(PlanItem("vae", "goal", image=sample.goal, grid=g))
            items.append(PlanItem("vit", "goal", image=sample.goal, grid=self.vit_grid(sample.goal)))
        if sample.actions is not None:
            items.append(PlanItem("action", "action", actions=self._chunk(sample.actions),
                                  chunk=self.config.chunk_size))
        return items

    def collate(self, samples: Sequence[HaloSample], max_tokens: int | None = None, pack: bool = True,
                pad: bool = False, cond_dropout: bool | None = None,
                generator: torch.Generator | None = None) -> dict:
        """Samples → a training batch. ``pack=True`` puts samples as documents into rows (all into one row,
        or greedily up to ``max_tokens`` per row); ``pack=False`` gives one row per sample. ``pad`` pads
        rows to ``max_tokens``. ``cond_dropout`` applies ``config.cond_dropout`` (default: when training).
        Per-token payloads are in layout order of their labels."""
        if not samples:
            raise ValueError("no samples")
        drop = self.training if cond_dropout is None else cond_dropout
        plans = [self.sequence_plan(s, self.config.cond_dropout if drop else None, generator) for s in samples]
        lengths = [sum(it.num_tokens for it in p) for p in plans]
        if not pack:
            rows = [[i] for i in range(len(samples))]
        elif max_tokens is not None:
            rows = pack_rows(lengths, max_tokens)
        else:
            rows = [list(range(len(samples)))]
        tok = self.tokenizer
        ids, targets, vit_images, vae_images = [], [], [], []
        vae_index: dict[int, int] = {}
        latent_refs, noisy_refs, actions, row_samples = [], [], [], []
        for row in rows:
            for si in row:
                row_samples.append(si)
                for it in plans[si]:
                    if it.kind == "text":
                        ids += [tok.bos_id] + it.ids + [tok.eos_id]
                        targets += (it.ids + [tok.eos_id, -100]) if it.loss else [-100] * (len(it.ids) + 2)
                        continue
                    start, end = ((tok.action_start_id, tok.action_end_id) if it.kind == "action"
                                  else (tok.vision_start_id, tok.vision_end_id))
                    ids += [start, end]
                    targets += [-100, -100]
                    if it.kind == "vit":
                        vit_images.append(it.image)
                    elif it.kind == "action":
                        actions.append(it.actions)
                    else:
                        key = id(it.image)
                        if key not in vae_index:
                            vae_index[key] = len(vae_images)
                            vae_images.append(it.image)
                        (latent_refs if it.kind == "vae" else noisy_refs).append(vae_index[key])
        layout = Layout.from_samples([[[item_segment(it, self.roles) for it in plans[i]] for i in row] for row in rows],
                                     self.experts, pad_to=max_tokens if pad else None)
        return {"layout": layout, "input_ids": torch.tensor(ids, dtype=torch.long),
                "text_targets": torch.tensor(targets, dtype=torch.long), "vit_images": vit_images,
                "vae_images": vae_images, "latent_refs": latent_refs, "noisy_refs": noisy_refs,
                "actions": torch.stack(actions) if actions else None, "rows": rows, "samples": list(samples),
                "plans": plans}

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict):
        """Training loss ``w_ce·CE + w_mse·MSE + w_l1·L1`` (weights of ``batch.get('stage', self.stage)``).

        ``batch`` from :meth:`collate`; optional ``generator`` / ``seed`` make noise and times reproducible.
        """
        cfg = self.config
        layout: Layout = batch["layout"].to(self.device)
        g = self._generator(batch)
        dev = self.device
        embeds = {"text": self.embed_text(batch["input_ids"])}
        if batch["vit_images"]:
            embeds["vit"] = self.embed_vit(batch["vit_images"])
        latents = self.encode_latents(batch["vae_images"]) if batch["vae_images"] else []
        if batch["latent_refs"]:
            x0 = torch.cat([latents[i][0] for i in batch["latent_refs"]])
            pos = torch.cat([self.latent_position_ids(latents[i][1]) for i in batch["latent_refs"]])
            embeds["latent"] = self.embed_latent(x0, torch.zeros(x0.shape[0], device=dev), pos)
        mse_pair = None
        if batch["noisy_refs"]:
            refs = batch["noisy_refs"]
            x0 = torch.cat([latents[i][0] for i in refs])
            counts = torch.tensor([latents[i][0].shape[0] for i in refs])
            pos = torch.cat([self.latent_position_ids(latents[i][1]) for i in refs])
            t = cfg.latent_time.sample((len(refs),), generator=g).to(dev)
            t_tok = torch.repeat_interleave(t, counts.to(dev))
            x_t, mse_pair = FlowHead.training_pair(x0, t_tok, generator=g)
            embeds["latent_noisy"] = self.embed_latent(x_t, t_tok, pos)
        l1_target, cond = None, {}
        if batch["actions"] is not None:
            a0 = batch["actions"].to(dev)
            t = self.flow_heads["action"].flow.time_sampler.sample((a0.shape[0],), generator=g).to(dev)
            a_t, l1_target = FlowHead.training_pair(a0, t, generator=g)
            act_embeds, cond = self.embed_action(a_t, t)
            embeds.update(act_embeds)
        out = self.lm(layout.assemble(embeds), layout, cond=layout.assemble(cond, partial=True) if cond else None)
        zero = sum(h.sum() for h in out.hidden.values()) * 0.0
        metrics = {}
        # CE: global mean over the target tokens
        targets = batch["text_targets"].to(dev)
        sel = targets >= 0
        if bool(sel.any()):
            h = layout.extract(out.hidden, "text")[sel]
            ce = F.cross_entropy(self.lm.logits(h).float(), targets[sel])
        else:
            ce = zero
        # MSE on the noisy latents, L1 on the actions: mean over channels, then over tokens
        if mse_pair is not None:
            v = self.latent_head.decode(layout.extract(out.hidden, "latent_noisy"))
            mse = flow_loss(v, mse_pair, "mse", reduction="token_mean")
        else:
            mse = zero
        if l1_target is not None:
            head = self.flow_heads["action"]
            l1 = head.loss(head.decode(layout.extract(out.hidden, "action").view(*l1_target.shape[:2], -1)), l1_target)
        else:
            l1 = zero
        w = cfg.loss_weights[batch.get("stage", self.stage)]
        loss = w.ce * ce + w.mse * mse + w.l1 * l1
        metrics.update(ce=ce.detach(), mse=mse.detach(), l1=l1.detach(), ce_tokens=int(sel.sum()),
                       mse_tokens=0 if mse_pair is None else int(mse_pair.shape[0]),
                       l1_tokens=0 if l1_target is None else int(l1_target.shape[0] * l1_target.shape[1]))
        return loss, metrics

    # ------------------------------------------------------------------ inference building blocks
    def _marker_item(self, kind: str, source: str, segment: Segment, label: str, x: torch.Tensor,
                     start: int, end: int) -> ContextItem:
        return ContextItem(kind, source, segment, {"text": self.embed_text([start, end]), label: x}, [start, end])

    def text_item(self, ids: Sequence[int], source: str) -> ContextItem:
        tok = self.tokenizer
        full = [tok.bos_id] + list(ids) + [tok.eos_id]
        seg = Segment.of("causal", self.roles["text"], len(full), "text")
        return ContextItem("text", source, seg, {"text": self.embed_text(full)}, full)

    def vit_item(self, image: torch.Tensor, source: str) -> ContextItem:
        x = self.embed_vit([image])
        seg = item_segment(PlanItem("vit", source, grid=(x.shape[0], 1)), self.roles)
        return self._marker_item("vit", source, seg, "vit", x, self.tokenizer.vision_start_id,
                                 self.tokenizer.vision_end_id)

    def latent_item(self, tokens: torch.Tensor, grid: tuple[int, int], source: str, t: float | None = None) -> ContextItem:
        """A clean latent (``t=None``: t = 0, full segment) or a noisy one (noise segment at time t)."""
        noisy = t is not None
        tt = torch.full((tokens.shape[0],), 0.0 if t is None else float(t), device=self.device)
        x = self.embed_latent(tokens.to(self.device), tt, self.latent_position_ids(grid))
        kind = "vae_noisy" if noisy else "vae"
        seg = item_segment(PlanItem(kind, source, grid=grid), self.roles)
        return self._marker_item(kind, source, seg, "latent_noisy" if noisy else "latent", x,
                                 self.tokenizer.vision_start_id, self.tokenizer.vision_end_id)

    def action_item(self, a_t: torch.Tensor, t: float) -> ContextItem:
        embeds, cond = self.embed_action(a_t[None].to(self.device), torch.full((1,), float(t), device=self.device))
        seg = item_segment(PlanItem("action", "action", chunk=a_t.shape[0]), self.roles)
        item = self._marker_item("action", "action", seg, "action", embeds["action"], self.tokenizer.action_start_id,
                                 self.tokenizer.action_end_id)
        item.cond = cond
        return item

    @torch.no_grad()
    def generate_text(self, ctx: HaloContext, max_new_tokens: int, source: str = "thought") -> list[int]:
        """Greedy decoding into ``ctx``: ``<|im_start|>`` then one cached step per token until ``<|im_end|>``
        (appended, so the cache holds the same segment a prefill of the text would). Returns the text ids."""
        tok = self.tokenizer
        seg = Segment.of("causal", self.roles["text"], 1, "text")
        out, _ = ctx.extend([ContextItem("text", source, seg, {"text": self.embed_text([tok.bos_id])}, [tok.bos_id])])
        text_expert = self.roles["text"]
        ids: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(self.lm.logits(out.hidden[text_expert][-1:]).argmax(-1))
            out, _ = ctx.grow_text(nxt)
            if nxt == tok.eos_id:
                break
            ids.append(nxt)
        else:
            ctx.grow_text(tok.eos_id)  # out of budget: close the segment as training does
        return ids

    def _velocity(self, ctx: HaloContext, item: ContextItem, label: str) -> torch.Tensor:
        out, sub = ctx.suffix(item)
        h = sub.extract(out.hidden, label)
        return self.latent_head.decode(h) if label == "latent_noisy" else self.flow_heads["action"].decode(h[None])[0]

    def _guided(self, make_item, label: str, contexts: dict[str, HaloContext | None], text_scale: float,
                image_scale: float, interval, renorm: str, renorm_min: float):
        full, no_text, no_image = contexts["full"], contexts.get("no_text"), contexts.get("no_image")

        def velocity(x, t):
            item = make_item(x, t)
            v = self._velocity(full, item, label)
            # BAGEL nests image guidance inside text guidance: nothing runs unless text_scale > 1
            if text_scale > 1 and no_text is not None and cfg_in_interval(t, interval):
                v_nt = self._velocity(no_text, item, label)
                v_ni = self._velocity(no_image, item, label) if no_image is not None and image_scale > 1 else None
                v = cfg_velocity(v, v_nt, v_ni, text_scale, image_scale, renorm=renorm, renorm_min=renorm_min)
            return v.reshape(x.shape).to(x.dtype)
        return velocity

    @torch.no_grad()
    def sample_latent(self, contexts: dict[str, HaloContext | None], grid: tuple[int, int],
                      generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Subgoal latent tokens [h·w, p²C] by Euler flow matching with text/image CFG."""
        inf = self.config.inference
        n = grid[0] * grid[1]
        x = noise if noise is not None else torch.randn(n, self.latent_head.patch_dim, generator=generator)
        fn = self._guided(lambda x, t: self.latent_item(x, grid, "subgoal", t=t), "latent_noisy", contexts,
                          inf.cfg_text_scale, inf.cfg_img_scale, inf.cfg_interval, inf.cfg_renorm, inf.cfg_renorm_min)
        return euler_sample(fn, x.to(self.device), time_grid(points=inf.latent_points, shift=inf.latent_shift))

    @torch.no_grad()
    def sample_action(self, contexts: dict[str, HaloContext | None], interval, generator=None,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """Action chunk [L, A] by Euler flow matching (unshifted grid) with optional CFG."""
        inf = self.config.inference
        L, A = self.config.chunk_size, self.config.action_dim
        x = noise if noise is not None else torch.randn(L, A, generator=generator)
        fn = self._guided(lambda x, t: self.action_item(x, t), "action", contexts, inf.action_cfg_text_scale,
                          inf.action_cfg_img_scale, interval, inf.action_cfg_renorm, inf.cfg_renorm_min)
        return self.flow_heads["action"].sample(fn, x.to(self.device))

    @torch.no_grad()
    def decode_latent(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent tokens → (latent [C, 2h, 2w], image [3, 16h, 16w] in [0, 1])."""
        lat = self.latent_head.unpatchify(tokens[None].to(self.device), grid[0], grid[1])
        img = self.vae.decode(lat / self.config.inference.decode_scale)
        return lat[0], ((img[0].float() + 1.0) / 2.0).clamp(0.0, 1.0)

    @staticmethod
    def _guidance_on(text_scale, interval) -> bool:
        return text_scale > 1 and interval[0] < interval[1]

    @torch.no_grad()
    def infer(self, history: Sequence[torch.Tensor], instruction: str, mode: str | None = None,
              generator: torch.Generator | None = None, max_new_tokens: int | None = None) -> HaloTrace:
        """One policy call on the last ``history_frames`` frames. ``mode``: ``emcot`` (reasoning → subgoal →
        action), ``reactive`` (action only) or ``mixed`` (EM-CoT with probability ``inference.cot_prob``);
        default ``inference.mode``. Returns a :class:`HaloTrace` (timings synchronise CUDA)."""
        inf = self.config.inference
        mode = mode or inf.mode
        if mode not in ("emcot", "reactive", "mixed"):
            raise ValueError(f"unknown inference mode {mode!r} (valid: 'emcot', 'reactive', 'mixed')")
        if mode == "mixed":
            mode = "emcot" if float(torch.rand((), generator=generator)) < inf.cot_prob else "reactive"
        frames = list(history)[-self.config.history_frames:]
        if not frames:
            raise ValueError("infer needs at least one history frame")
        timings: dict[str, float] = {}
        t_start = clock = time.perf_counter()

        def lap(name):
            nonlocal clock
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            timings[name] = now - clock
            clock = now

        tok = self.tokenizer
        prompt_ids = tok.encode(format_prompt(instruction, self.config.prompt_template))
        full = HaloContext(self, "full")
        emcot = mode == "emcot"
        action_interval = inf.action_cfg_interval if emcot else inf.reactive_action_cfg_interval
        cfg_latent = emcot and self._guidance_on(inf.cfg_text_scale, inf.cfg_interval)
        cfg_action = self._guidance_on(inf.action_cfg_text_scale, action_interval)
        need_cfg = cfg_latent or cfg_action
        need_no_image = (cfg_latent and inf.cfg_img_scale > 1) or (cfg_action and inf.action_cfg_img_scale > 1)
        # observations: each history frame once (VAE + ViT in EM-CoT mode, ViT only when reactive)
        latents = self.encode_latents(frames) if emcot else None
        obs = []
        for i, frame in enumerate(frames):
            if emcot:
                obs.append(self.latent_item(latents[i][0], latents[i][1], f"history[{i}]"))
            obs.append(self.vit_item(frame, f"history[{i}]"))
        full.extend(obs)
        contexts: dict[str, HaloContext | None] = {"full": full}
        if need_cfg:
            contexts["no_text"] = full.clone("no_text")  # images only: a copy, never an alias of `full`
        full.extend([self.text_item(prompt_ids, "prompt")])
        lap("prefill")
        trace = HaloTrace(mode, actions=torch.empty(0), timings=timings, contexts=contexts)
        if emcot:
            ids = self.generate_text(full, inf.max_new_tokens if max_new_tokens is None else max_new_tokens)
            trace.reasoning_ids, trace.reasoning = ids, tok.decode(ids)
            lap("reasoning")
        if need_no_image:  # text only: the prompt (and the reasoning), no image
            contexts["no_image"] = HaloContext(self, "no_image")
            texts = [self.text_item(prompt_ids, "prompt")]
            if emcot:
                texts.append(self.text_item(trace.reasoning_ids, "thought"))
            contexts["no_image"].extend(texts)
        if emcot:
            grid = latents[-1][1]
            x = self.sample_latent(contexts, grid, generator)
            lap("subgoal")
            trace.subgoal_latent, trace.subgoal_image = self.decode_latent(x, grid)
            # the generated subgoal goes back in as a clean latent (+ ViT, as in the training plan)
            for ctx in (full, contexts.get("no_text")):
                if ctx is None:
                    continue
                items = [self.latent_item(x, grid, "subgoal")]
                if inf.subgoal_vit:
                    items.append(self.vit_item(trace.subgoal_image, "subgoal"))
                ctx.extend(items)
            lap("subgoal_insert")
        trace.actions = self.sample_action(contexts, action_interval, generator)
        lap("action")
        timings["total"] = clock - t_start
        return trace

    # ------------------------------------------------------------------ policy API
    def predict_action_chunk(self, batch: dict) -> torch.Tensor:
        """``batch``: ``history`` (per sample a list of frames, or a tensor [B, T, ...]) and ``instruction``
        (list of strings); optional ``mode``. Returns [B, chunk_size, action_dim]."""
        hist = batch["history"]
        instr = batch["instruction"]
        instr = [instr] if isinstance(instr, str) else list(instr)
        out = [self.infer(list(h), s, mode=batch.get("mode"), generator=batch.get("generator")).actions
               for h, s in zip(hist, instr)]
        return torch.stack(out)

    # ------------------------------------------------------------------ demo
    def demo_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict:
        """Synthetic samples (EM-CoT and reactive alternating) packed as documents into one row."""
        size = max(self.config.vae_min_side, self.latent_stride)
        samples = [synthetic_sample("emcot" if i % 2 == 0 else "reactive", self.config.action_dim,
                                    self.config.chunk_size, image_size=size, generator=generator)
                   for i in range(batch_size)]
        return self.collate(samples)

    def demo_inference(self, batch: dict) -> dict:
        s = batch["samples"][0]
        g = torch.Generator().manual_seed(0)
        return self.infer(s.history, s.instruction, mode="emcot", generator=g).summary()


# ---------------------------------------------------------------------------------------------- synthetic data
_COLORS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.2), "blue": (0.1, 0.2, 1.0)}


def synthetic_sample(mode: str = "emcot", action_dim: int = 14, chunk_size: int = 16, image_size: int = 32,
                     generator: torch.Generator | None = None, history: int = 2) -> HaloSample:
    """A random EM-CoT or reactive sample: a coloured square moving toward a target on a grey table.

    The subgoal frame is the square at the target; the thought names the colour and the direction;
    the actions interpolate the square's position (first two dims; the rest are a function of them).
    """
    def draw(color, cy, cx):
        img = torch.full((3, image_size, image_size), 0.5)
        s = max(2, image_size // 6)
        y, x = int(cy * (image_size - s)), int(cx * (image_size - s))
        img[:, y:y + s, x:x + s] = torch.tensor(color)[:, None, None]
        return img

    names = list(_COLORS)
    c = names[int(torch.randint(len(names), (1,), generator=generator))]
    start = torch.rand(2, generator=generator)
    goal = torch.rand(2, generator=generator)
    frames = [draw(_COLORS[c], *(start * (k + 1) / history).tolist()) for k in range(history)]
    pos0 = start
    traj = pos0[None] + (goal - pos0)[None] * torch.linspace(0, 1, chunk_size)[:, None]
    feats = torch.cat([traj, torch.sin(3 * traj), torch.cos(3 * traj)], -1)
    actions = feats.repeat(1, math.ceil(action_dim / feats.shape[1]))[:, :action_dim]
    dy, dx = (goal - pos0).tolist()
    move = f"{'down' if dy > 0 else 'up'} {'right' if dx > 0 else 'left'}"
    instruction = f"Move the {c} block."
    if mode == "reactive":
        return HaloSample(frames, instruction, actions)
    thought = format_thought([f"move the {c} block"], f"move the {c} block", move, "stay")
    return HaloSample(frames, instruction, actions, thought=thought, goal=draw(_COLORS[c], *goal.tolist()))
