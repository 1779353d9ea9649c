"""HALO's configuration: the recipe fields, loss weights, condition dropout, inference knobs, and the
prompt / thought text formats (see :mod:`vla_blocks.models.halo`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

from ...backbones import BackboneConfig, ExpertSpec
from ...components import ModelConfig
from ...config import register
from ...encoders import VAEConfig, VisionConfig
from ...flow import LogitNormalTimeSampler, TimeSamplerConfig
from ...tokenization import TokenizerConfig

if TYPE_CHECKING:
    from .modeling import HaloModel

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
        from .modeling import HaloModel
        return HaloModel(self)
