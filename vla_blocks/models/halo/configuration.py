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
from .transforms import BAGEL_MAX_PIXELS

if TYPE_CHECKING:
    from .modeling import HaloModel

#: HALO's names of the action head's modules (BAGEL-style checkpoints keep them).
HALO_ACTION_HEAD_NAMES = {"proj.in_proj": "input_linear_layer", "proj.out_proj": "output_linear_layer",
                          "proj.time_embedder": "action_time_embedder", "time.time_mlp_in": "action_time_mlp_in",
                          "time.time_mlp_out": "action_time_mlp_out"}

PROMPT_TEMPLATE = "You are an embodied agent. Your task is to: {instruction}. Plan and act."
ROLES = ("text", "vit", "latent", "action")


def format_prompt(instruction: str, template: str = PROMPT_TEMPLATE) -> str:
    """HALO's training prompt (``robotwin_dataset.py`` ``change_format``): the instruction lower-cased, then every
    trailing ``.`` stripped, in the template. Whitespace is kept as given (upstream strips none)."""
    return template.format(instruction=instruction.lower().rstrip("."))


def format_thought(plan: Sequence[str], subtask: str, left: str, right: str) -> str:
    r"""HALO's thought text, byte for byte as ``robotwin_dataset.py`` ``parse_hdf5_file`` writes it: plain-text
    markers (not added tokens), each block on its own lines, the plan steps joined with newlines::

        "\n<|plan|>\n" + "\n".join(plan) + "\n<|\ plan|>\n\n"
        "<|subtask|>\n" + subtask + "\n<|\ subtask|>\n\n"
        "<|movement|>\n[LEFT]: " + left + "\n[RIGHT]: " + right + "\n\n<|\ movement|>\n\n"

    ``left`` / ``right`` are the per-arm primitive sentences of the step."""
    if isinstance(plan, str):
        raise TypeError("plan must be a sequence of subtask strings, not one string")
    plan_text = "\n".join(plan)
    return ("\n<|plan|>\n" + plan_text + "\n<|\\ plan|>\n\n"
            + "<|subtask|>\n" + subtask + "\n<|\\ subtask|>\n\n"
            + "<|movement|>\n[LEFT]: " + left + "\n[RIGHT]: " + right + "\n\n<|\\ movement|>\n\n")


# ---------------------------------------------------------------------------------------------- config
@dataclass
class HaloLossWeights:
    """``ce·CE + mse·MSE + l1·L1``, each term a global per-token mean."""

    ce: float = 1.0  # weight of the next-token CE on the thought text (HALO stage 1: 0.25, stage 2: 1)
    mse: float = 1.0  # weight of the subgoal-latent flow MSE (HALO stage 1: 0.5, stage 2: 1)
    l1: float = 1.0  # weight of the action flow loss (L1 in HALO; stage 1 and 2: 1)


def _default_stage_weights() -> dict[str, HaloLossWeights]:
    # HALO README: stage 1 (versatile pre-training) 0.25·CE + 0.5·MSE + 1.0·L1; stage 2 (EM-CoT) 1 : 1 : 1
    return {"pretrain": HaloLossWeights(0.25, 0.5, 1.0), "emcot": HaloLossWeights(1.0, 1.0, 1.0)}


@dataclass
class HaloCondDropout:
    """Training-time condition dropout (BAGEL's ``enable_cfg`` items): each prompt text, history ViT image
    and history VAE image is left out of the plan with these probabilities, so the no-text / no-image
    contexts of classifier-free guidance are in distribution. BAGEL pre-training: text 0.1, ViT 0.3,
    VAE 0.3; HALO's RoboTwin fine-tune: off. Targets (thought, goal, action) are never dropped.

    As in BAGEL's ``pack_sequence``, a dropped ViT or VAE image still advances the RoPE counter by one (a
    :class:`~vla_blocks.layout.RopeSkip` in the plan), so the tokens after it keep the ids they have with the
    image; a dropped text advances nothing. Inference differs, as BAGEL's inferencer does: its no-image CFG
    context is built from the text alone, so there the text starts at RoPE id 0."""

    text: float = 0.0  # probability that the prompt text is left out (BAGEL pre-training: 0.1)
    vit: float = 0.0  # probability that a history ViT image is left out (BAGEL pre-training: 0.3)
    vae: float = 0.0  # probability that a history VAE image is left out (BAGEL pre-training: 0.3)


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

    # emcot: reasoning text -> subgoal image -> action; reactive: action only; mixed: emcot with prob. cot_prob
    mode: Literal["emcot", "reactive", "mixed"] = "emcot"
    cot_prob: float = 0.2  # probability of the EM-CoT chain in ``mixed`` mode (HALO's policy: 0.2)
    max_new_tokens: int = 1000  # most thought tokens decoded greedily before the subgoal (HALO: 1000)
    latent_points: int = 50  # subgoal grid points linspace(1, 0, n): n − 1 Euler steps (BAGEL/HALO: 50)
    latent_shift: float = 3.0  # time shift of the subgoal grid (BAGEL/HALO: 3.0)
    cfg_text_scale: float = 4.0  # subgoal text-CFG scale (BAGEL/HALO: 4.0; ≤ 1 turns all guidance off)
    cfg_img_scale: float = 2.0  # subgoal image-CFG scale, nested in text guidance (HALO/BAGEL editing: 2.0)
    cfg_interval: tuple[float, float] = (0.4, 1.0)  # subgoal CFG applies while lo < t ≤ hi (BAGEL/HALO: [0.4, 1])
    # renorm of the guided velocity: global (whole tensor), channel (per token), text_channel (BAGEL editing), none
    cfg_renorm: Literal["global", "channel", "text_channel", "none"] = "global"
    cfg_renorm_min: float = 0.0  # lower clamp of the renorm factor ‖v_cond‖/‖v_cfg‖ (BAGEL: 0)
    action_points: int = 10  # action grid points, unshifted: n − 1 Euler steps (HALO: 10, i.e. 9 steps)
    action_cfg_text_scale: float = 6.0  # action text-CFG scale (HALO: 6.0)
    action_cfg_img_scale: float = 6.0  # action image-CFG scale (HALO: 6.0)
    action_cfg_interval: tuple[float, float] = (0.4, 1.0)  # action CFG interval in EM-CoT mode (HALO: [0.4, 1])
    # action CFG interval in reactive mode (HALO: [1, 1], which turns action CFG off)
    reactive_action_cfg_interval: tuple[float, float] = (1.0, 1.0)
    action_cfg_renorm: Literal["global", "channel", "text_channel", "none"] = "global"  # as cfg_renorm, for actions
    decode_scale: float = 1.0  # the sampled latent is divided by this before VAE decoding (HALO: 1.4; BAGEL: 1.0)
    # also insert the decoded subgoal as a ViT image, as the training plan has it (HALO inserts only the latent)
    subgoal_vit: bool = True


@register("model", "halo")
@dataclass
class HaloConfig(ModelConfig):
    """HALO. ``backbone`` holds the ``und`` expert (Qwen2.5 + q/k norm); ``experts`` lists all three
    (``act.ffn_ratio`` is HALO's ``action_expert_mlp_ratio``); ``roles`` routes token kinds to experts.

    Images: VAE inputs are sized by BAGEL's ``ImageTransform`` rule
    (:func:`~vla_blocks.models.halo.transforms.bagel_resize_size`: longer side ≤ ``vae_max_side``, shorter ≥
    ``vae_min_side``, stride 16 = VAE ×8 · patch 2, at most ``image_max_pixels``). ViT inputs: ``vit_resize:
    navit`` lets the NaViT encoder size them (native aspect ratio, ≤ its ``max_num_patches``); ``bagel`` sizes
    them by the same rule as HALO's ViT transform (``vit_max_size`` 980, ``vit_min_size`` 378, stride = patch).
    ``latent_time`` / ``action_time``: training time samplers (logit-normal; HALO uses no shift).
    ``action_time_conditioning``: how the action expert sees the flow time — ``additive`` (HALO:
    ``action_time_embedder(t)`` added to every action token) or ``adarms`` (pi0.5's adaRMS: the act expert's
    norms are conditioned on ``swish(action_time_mlp_out(swish(action_time_mlp_in(posemb(t)))))``).
    ``action_loss``: ``l1`` (HALO) or ``mse``; mean over channels, then over action tokens.
    ``stage`` picks ``loss_weights[stage]``.
    """

    backbone: BackboneConfig  # the LLM of the ``und`` expert (HALO: Qwen2.5-1.5B with q/k norm)
    vision: VisionConfig  # the ViT tower (HALO: SigLIP so400m/14 NaViT, 26 layers)
    vae: VAEConfig  # the image autoencoder of the subgoal latents (HALO: the FLUX VAE)
    # the three experts in order: und (text + ViT, holds the backbone), gen (VAE latents), act (actions);
    # ``act.ffn_ratio`` is HALO's action_expert_mlp_ratio (released: 1.0)
    experts: dict[str, ExpertSpec] = field(default_factory=lambda: {"und": ExpertSpec(), "gen": ExpertSpec(),
                                                                     "act": ExpertSpec(ffn_ratio=1.0)})
    # token kind -> expert: text, vit, latent, action (text must go to the first expert, which has the LM head)
    roles: dict[str, str] = field(default_factory=lambda: {"text": "und", "vit": "und", "latent": "gen",
                                                           "action": "act"})
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # text tokenizer (HALO: Qwen2.5's + markers)
    action_dim: int = 14  # action width (HALO RoboTwin aloha-agilex: 2 × (6 joints + gripper) = 14; raw joints)
    chunk_size: int = 16  # actions per chunk, one token each (HALO RoboTwin: 16; real world: 50)
    n_action_steps: int | None = None  # actions popped per chunk by ``select_action`` (None: the whole chunk)
    history_frames: int = 3  # camera frames of history in each sample (HALO: 3 of cam_high)
    # ViT features -> LLM width: mlp (BAGEL/HALO: fc1, GELU-tanh, fc2) or linear
    connector: Literal["mlp", "linear"] = "mlp"
    vit_max_side: int = 70  # side of the ViT 2-D position table, in patches (BAGEL/HALO: 70); larger grids fail
    # ViT input sizing: navit (the encoder's native-aspect patch budget) or bagel (BAGEL's ImageTransform rule)
    vit_resize: Literal["navit", "bagel"] = "navit"
    vit_max_size: int = 980  # bagel ViT resize: longer side at most this many pixels (BAGEL: 980)
    vit_min_size: int = 378  # bagel ViT resize: shorter side at least this many pixels (BAGEL: 378)
    image_max_pixels: int = BAGEL_MAX_PIXELS  # bagel resize: cap on height·width, by the area ratio (BAGEL's max_pixels)
    max_latent_size: int = 64  # side of the latent 2-D position table, in patches (HALO inference: 64; BAGEL: 32)
    latent_patch_size: int = 2  # VAE latent patch p: one token per p×p latents, 16×16 pixels (BAGEL/HALO: 2)
    vae_max_side: int = 1024  # longer side of a VAE input at most this many pixels (HALO: 1024)
    vae_min_side: int = 512  # shorter side of a VAE input at least this many pixels (HALO: 512)
    # training time sampler of the subgoal latents (BAGEL/HALO: logit-normal, shift 1)
    latent_time: TimeSamplerConfig = field(default_factory=LogitNormalTimeSampler)
    # training time sampler of the actions (HALO: logit-normal, no shift)
    action_time: TimeSamplerConfig = field(default_factory=LogitNormalTimeSampler)
    # additive: a time embedding added to every action token (HALO); adarms: pi0.5's adaRMS on the act expert's norms
    action_time_conditioning: Literal["additive", "adarms"] = "additive"
    action_loss: Literal["l1", "mse"] = "l1"  # action flow loss, mean over channels then action tokens (HALO: l1)
    stage: str = "pretrain"  # training stage: the key of ``loss_weights`` in use (pretrain or emcot)
    # loss weights per stage (HALO: pretrain 0.25 CE + 0.5 MSE + 1.0 L1; emcot 1 : 1 : 1)
    loss_weights: dict[str, HaloLossWeights] = field(default_factory=_default_stage_weights)
    cond_dropout: HaloCondDropout = field(default_factory=HaloCondDropout)  # training-time dropout of conditions
    prompt_template: str = PROMPT_TEMPLATE  # the prompt text; ``{instruction}`` is the lower-cased task
    freeze_vae: bool = True  # no gradients for the VAE, kept in eval mode (default: the VAE is not trained)
    freeze_vit: bool = False  # no gradients for the ViT tower
    # attention backend of the MoT stack: auto (first that supports the pass), sdpa, flex, triton, flash_attn, xformers
    attention_backend: str = "auto"
    gradient_checkpointing: bool = False  # recompute each layer in backward: less activation memory, one more forward
    inference: HaloInferenceConfig = field(default_factory=HaloInferenceConfig)  # sampling and CFG settings

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
        if self.vit_resize not in ("navit", "bagel"):
            raise ValueError(f"vit_resize: {self.vit_resize!r} is not one of ['navit', 'bagel']")
        if self.action_dim <= 0 or self.chunk_size <= 0:
            raise ValueError("action_dim and chunk_size must be positive")

    def build(self) -> "HaloModel":
        """The :class:`~vla_blocks.models.halo.HaloModel` of this recipe."""
        from .modeling import HaloModel
        return HaloModel(self)
