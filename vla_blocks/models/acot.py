"""ACoT-VLA: pi0.5 with an explicit (EAR) and an implicit (IAR) action reasoner fused by AGP.

Three experts share one attention per layer: ``vlm`` (PaliGemma's Gemma-2B), ``ear`` (the explicit action
reasoner, a gemma_300m) and ``act`` (the final action expert, a gemma_300m). Per batch:

1. the image+text prefix runs **once** (its per-layer K/V, K after RoPE, are kept with gradients);
2. IAR: an extractor (``iar`` slot) turns the K/V of every layer into one token per layer, Z_im [B, L, W];
3. EAR: a coarse flow head over the reference trajectory (``ear.horizon`` steps, stride ``ear.stride``),
   tokens ``coarse_action_in_proj(x_t^ref)``, time via ``coarse_time_mlp_in/out`` (adaRMS);
4. AGP: the action tokens ``a = action_in_proj(x_t)`` cross-attend to Z_ex = ``coarse_action_in_proj(coarse)``
   (``explicit_action_reasoner``) and to Z_im (``implicit_action_reasoner_interact``); ``[a ‖ S_ex]`` and
   ``[a ‖ S_im]`` are projected (``explicit/implicit_action_reason_proj``) and fused by a self-attention
   (``action_reasoning_fusion``) whose output **replaces** the action tokens (a 3-layer MLP fusion when
   only one reasoner is on); time enters the action expert through adaRMS (``time_mlp_in/out``).

Training (teacher forcing): the action head is conditioned on the ground-truth coarse trajectory; one time
sample is shared by both heads; loss = ear.loss_weight·MSE(EAR) + MSE(action), plain means over padded dims
(``loss_dims: real``: over the real dims).
Upstream runs the LLM three times per step ([prefix], [prefix+EAR], [prefix+action]); here the prefix runs
once and both suffixes go in ONE pass as two noise segments that both start at the prefix's valid length
(RoPE ``sequential_hold``), reading the prefix cache with gradients: same loss and gradients (tested).
In pi0 mode (``pi05: false``) each suffix carries its own state token, so the two suffixes take one
cache-reading pass each (the prefix still runs once).

Inference: prefix once, the EAR Euler loop (``ear.num_steps``, default 10), then the action Euler loop
conditioned on the EAR sample; returns ``actions`` and ``coarse_actions``.

Ablations are recipe overrides: ``ear=null`` (EAR off), ``iar=null`` (IAR off),
``iar.type=learnable_query`` / ``attention_pooling`` (extractor), ``iar.mask_padding=true`` (masked IAR).

Known differences from upstream (both only touch invalid prefix tokens, which no valid token attends):
a query row with nothing to attend returns 0 here (DESIGN §2) where upstream's softmax over all-masked
logits averages every value; and invalid *leading* tokens get RoPE position 0 where upstream gives −1.
The action outputs are unaffected, but with the upstream default ``iar.mask_padding: false`` the IAR
also reads the K/V of those invalid positions, which differ from upstream's in layers ≥ 1 (every valid
position matches, and invalid ones match in layer 0 unless they lead the prefix). LIBERO's masked camera
is the last slot, so only text padding and that camera are concerned. ``iar.mask_padding: true`` removes
the dependence.

Batch keys: those of :mod:`vla_blocks.models.pi0`, with ``actions`` either the raw chunk of
``reference_chunk_length`` frames (the EAR reference is sliced from it) or the H-step chunk together with
``coarse_actions`` [B, ear.horizon, ≤action_dim]; optional ``coarse_noise`` fixes the EAR flow sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..backbones import ExpertSpec
from ..batch import BatchSchema, Field
from ..components import ModelConfig
from ..config import register
from ..heads import FlowHead
from ..reasoners import (DownsampleIAR, EARConfig, FusionMLP, IARConfig, UnifiedAttentionModule, coarse_reference,
                         reference_chunk_length, stack_prefix_kv)
from .pi0 import ACT, VLM, Pi0ConfigFields, Pi0Model, Prefix, openpi_head_names

__all__ = ["ACoTConfig", "ACoTVLA", "EAR"]

EAR = "ear"


@register("model", "acot")
@dataclass
class ACoTConfig(ModelConfig, Pi0ConfigFields):
    """ACoT-VLA: the pi0/pi0.5 fields plus

    - ``ear``: :class:`~vla_blocks.reasoners.EARConfig` (expert, coarse horizon 15, stride 2), or null;
    - ``iar``: an ``iar`` component (``downsample`` default, ``learnable_query``, ``attention_pooling``;
      ``mask_padding``), or null;
    - ``agp_num_heads``: heads of the AGP attention modules (4; hidden width = the action expert's).
    """

    pi05: bool = True  # ACoT builds on pi0.5 (adaRMS time conditioning, no state token)
    action_horizon: int = 10  # actions per chunk H (ACoT LIBERO: 10)
    max_token_len: int = 200  # prompt tokens (openpi pi0.5: 200)
    ear: EARConfig | None = field(default_factory=EARConfig)
    iar: IARConfig | None = field(default_factory=DownsampleIAR)
    agp_num_heads: int = 4

    def build(self) -> "ACoTVLA":
        """The :class:`ACoTVLA` of this recipe (random init; weights come from a checkpoint or a converter)."""
        return ACoTVLA(self)

    @property
    def chunk_length(self) -> int:
        """Frames of raw actions a training sample needs (upstream LIBERO: max(15·2, 10·1) = 30)."""
        if self.ear is None:
            return self.action_horizon
        return reference_chunk_length(self.ear.horizon, self.ear.stride, self.action_horizon)


class ACoTVLA(Pi0Model):
    """ACoT-VLA policy; module names follow upstream (``coarse_action_in_proj``, ``coarse_action_out_proj``,
    ``coarse_time_mlp_in/out``, ``explicit_action_reasoner``, ``implicit_action_reasoner``,
    ``implicit_action_reasoner_interact``, ``explicit_action_reason_proj``, ``implicit_action_reason_proj``,
    ``action_reasoning_fusion``; experts ``vlm``/``ear``/``act`` = upstream suffixes ``""``/``_1``/``_2``)."""

    config: ACoTConfig
    batch_schema = BatchSchema("acot", [*Pi0Model.batch_schema.fields.values(),
                                        Field("coarse_actions", ("B", "E", "<=A"), modes=("train",), optional=True),
                                        Field("coarse_noise", ("B", "E", "A"), modes=("train",), optional=True)])

    def batch_dims(self) -> dict:
        """pi0's batch sizes plus the EAR's coarse horizon E (with an EAR)."""
        ear = self.config.ear
        return {**super().batch_dims(), **({"E": ear.horizon} if ear is not None else {})}

    def __init__(self, config: ACoTConfig):
        super().__init__(config)
        c = config
        W, A = self.width(ACT), c.action_dim
        heads = c.agp_num_heads
        if c.ear is not None:
            We = self.width(EAR)
            if not c.pi05 and We != W:
                raise ValueError(f"pi0 mode feeds state_proj's token to the EAR expert: its width ({We}) must equal "
                                 f"the action expert's ({W})")
            # the EAR coarse head: a second instance of the action head's class, its own flow recipe
            self.add_flow_head("coarse_actions", EAR, FlowHead(A, We, time=self.time_conditioning,
                                                               flow=c.ear.flow or c.flow),
                               openpi_head_names("coarse_", state=False))
            self.explicit_action_reasoner = UnifiedAttentionModule(W, We, W, hidden_dim=W, num_heads=heads)
        if c.iar is not None:
            mot = self.stack.cfg
            self.implicit_action_reasoner = c.iar.build(mot.num_layers, mot.num_kv_heads * mot.head_dim, W,
                                                        mot.num_heads, mot.head_dim)
            self.implicit_action_reasoner_interact = UnifiedAttentionModule(W, W, W, hidden_dim=W, num_heads=heads)
        if c.ear is not None and c.iar is not None:
            self.explicit_action_reason_proj = nn.Linear(2 * W, W)
            self.implicit_action_reason_proj = nn.Linear(2 * W, W)
            self.action_reasoning_fusion = UnifiedAttentionModule(2 * W, 2 * W, W, hidden_dim=W, num_heads=heads)
        elif c.ear is not None or c.iar is not None:
            self.action_reasoning_fusion = FusionMLP(2 * W, W, W, activate=False)

    def expert_specs(self) -> dict[str, ExpertSpec]:
        """The experts of the stack in upstream order: ``vlm``, ``ear`` (with an EAR), ``act``."""
        specs = super().expert_specs()
        if self.config.ear is None:
            return specs
        return {VLM: specs[VLM], EAR: self._with_cond(self.config.ear.expert, self._backbone_width()), ACT: specs[ACT]}

    # -- reasoners ---------------------------------------------------------------------------------
    def implicit_tokens(self, prefix: Prefix, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor | None:
        """IAR: Z_im ``[B, L, W]`` from the prefix K/V of every layer (None when IAR is off)."""
        if self.config.iar is None:
            return None
        K, V = stack_prefix_kv(keys, values)
        mask = prefix.valid if self.config.iar.mask_padding else None
        return self.implicit_action_reasoner(K, V, mask)

    def guide(self, a: torch.Tensor, coarse: torch.Tensor | None, z_im: torch.Tensor | None) -> torch.Tensor:
        """AGP: action tokens ``a [B, H, W]`` conditioned on the clean coarse trajectory ``[B, Hc, A]`` (model
        space) and on Z_im; the result replaces ``a`` (no residual)."""
        c = self.config
        if c.ear is None and c.iar is None:
            return a
        if c.ear is not None:
            z_ex = self.flow_heads["coarse_actions"].project(coarse)
            s_ex = self.explicit_action_reasoner(a, z_ex)
        if c.iar is not None:
            s_im = self.implicit_action_reasoner_interact(a, z_im.to(a.dtype))
        if c.ear is not None and c.iar is not None:
            a_ex = self.explicit_action_reason_proj(torch.cat([a, s_ex], dim=-1))
            a_im = self.implicit_action_reason_proj(torch.cat([a, s_im], dim=-1))
            f = torch.cat([a_ex, a_im], dim=-1)
            return self.action_reasoning_fusion(f, f)
        s = s_ex if c.ear is not None else s_im
        return self.action_reasoning_fusion(torch.cat([a, s], dim=-1))

    def agp(self, coarse: torch.Tensor | None, z_im: torch.Tensor | None):
        """The action head's token rewrite for :meth:`head_suffix` (``guide``): AGP with these contexts."""
        if self.config.ear is None and self.config.iar is None:
            return None
        return lambda tokens: self.guide(tokens, coarse, z_im)

    # -- targets -----------------------------------------------------------------------------------
    def coarse_key(self) -> str:
        """Normalisation key of the coarse trajectory: its own stats when given, else the actions'."""
        return "coarse_actions" if self.normalizer.has("coarse_actions") else "actions"

    def target_coarse(self, batch: dict) -> torch.Tensor:
        """Normalised, padded EAR target ``[B, ear.horizon, action_dim]``: ``batch["coarse_actions"]`` or the
        strided slice of the raw chunk ``batch["actions"]``."""
        e = self.config.ear
        coarse = batch.get("coarse_actions")
        if coarse is None:
            coarse = coarse_reference(batch["actions"], e.horizon, e.stride)
        elif coarse.shape[1] != e.horizon:
            raise ValueError(f"coarse_actions must have {e.horizon} steps, got {tuple(coarse.shape)}")
        return self.pad_actions(self.normalizer.normalize(self.coarse_key(), coarse))

    # -- training ----------------------------------------------------------------------------------
    def forward(self, batch: dict):
        """One prefix pass, one suffix pass (EAR + action chunks) → ``(loss, metrics)``."""
        c = self.config
        heads = self.flow_heads
        actions = self.target_actions(batch)
        t = self.sample_time(batch, actions.shape[0])  # ONE time sample shared by both heads
        x_t, u = heads["actions"].training_pair(actions, t, batch.get("noise"))
        prefix = self.embed_prefix(batch)
        out, cache = self.run_prefix(prefix)
        z_im = self.implicit_tokens(prefix, out.keys, out.values)
        state_tok = self.state_token(batch)
        suffixes, targets = [], {"actions": u}
        coarse = None
        if c.ear is not None:
            coarse = self.target_coarse(batch)
            x_ref, targets["coarse_actions"] = heads["coarse_actions"].training_pair(coarse, t, batch.get("coarse_noise"))
            suffixes.append(self.head_suffix("coarse_actions", x_ref, t, state_tok))
        # teacher forcing: the action head is conditioned on the ground-truth coarse trajectory
        suffixes.append(self.head_suffix("actions", x_t, t, state_tok, self.agp(coarse, z_im)))
        if c.pi05:
            hidden = self.run_suffixes(prefix, cache, suffixes)
        else:  # each suffix has its own state token: one cache-reading pass per suffix
            hidden = {}
            for s in suffixes:
                hidden.update(self.run_suffixes(prefix, cache, [s]))
        dim_mask = self.loss_dim_mask()
        losses = {k: heads[k].loss(heads[k].decode(hidden[k]), targets[k], dim_mask=dim_mask) for k in targets}
        metrics = {"loss_action": losses["actions"].detach()}
        loss = losses["actions"]
        if c.ear is not None:
            loss = c.ear.loss_weight * losses["coarse_actions"] + loss
            metrics["loss_ear"] = losses["coarse_actions"].detach()
        return loss, metrics

    # -- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_actions(self, batch: dict, *, noise: torch.Tensor | None = None,
                       coarse_noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       num_steps: int | None = None, ear_num_steps: int | None = None) -> dict:
        """Model space: prefix once; the EAR Euler loop; the action Euler loop conditioned on its sample.
        Returns ``{"actions": [B, H, A], "coarse_actions": [B, Hc, A]}`` (no coarse without EAR)."""
        c = self.config
        prefix = self.embed_prefix(batch)
        out, cache = self.run_prefix(prefix)
        B, A = prefix.tokens.shape[0], c.action_dim
        z_im = self.implicit_tokens(prefix, out.keys, out.values)
        state_tok = self.state_token(batch)
        result = {}
        coarse = None
        if c.ear is not None:
            Hc = c.ear.horizon
            plan = self.plan_suffixes(prefix, [(EAR, "coarse_actions", Hc, not c.pi05)])
            velocity = self.head_velocity("coarse_actions", prefix, cache, plan, state_tok)
            coarse = self.flow_heads["coarse_actions"].sample(
                velocity, self._noise((B, Hc, A), coarse_noise, generator),
                self.grid(ear_num_steps or c.ear.num_steps, "coarse_actions"))
            result["coarse_actions"] = coarse
        H = c.action_horizon
        plan = self.plan_suffixes(prefix, [(ACT, "actions", H, not c.pi05)])
        velocity = self.head_velocity("actions", prefix, cache, plan, state_tok, self.agp(coarse, z_im))
        result["actions"] = self.flow_heads["actions"].sample(velocity, self._noise((B, H, A), noise, generator),
                                                              self.grid(num_steps))
        return result

    def _output(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return super()._output(self.coarse_key() if key == "coarse_actions" else key, x)

    # -- demo --------------------------------------------------------------------------------------
    def demo_batch(self, batch_size: int = 2, generator: torch.Generator | None = None,
                   action_frames: int | None = None) -> dict:
        """pi0's demo inputs with a raw chunk of ``chunk_length`` frames (the EAR reference is sliced from it)."""
        return super().demo_batch(batch_size, generator, action_frames or self.config.chunk_length)


#: Loading a pi0.5 checkpoint into an ACoT recipe as upstream initialises ACoT from pi0.5: the EAR expert and the
#: final action expert both copy pi0.5's action expert, the ``coarse_*`` heads copy the action heads, and the
#: reasoner modules (new in ACoT) keep their initialisation.
#: ``VLAModel.from_pretrained("local-dir:pi05", recipe="acot-libero", **ACOT_FROM_PI05)``
ACOT_FROM_PI05: dict = {
    "expert_map": {"ear": "act"},
    "key_map": {"coarse_action_in_proj": "action_in_proj", "coarse_action_out_proj": "action_out_proj",
                "coarse_time_mlp_in": "time_mlp_in", "coarse_time_mlp_out": "time_mlp_out"},
    "allow_missing": [r"^(explicit_action_reasoner|implicit_action_reasoner|implicit_action_reasoner_interact|"
                      r"explicit_action_reason_proj|implicit_action_reason_proj|action_reasoning_fusion)\."],
}
