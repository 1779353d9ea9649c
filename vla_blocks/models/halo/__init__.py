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

from .configuration import (HALO_ACTION_HEAD_NAMES, PROMPT_TEMPLATE, ROLES, HaloCondDropout, HaloConfig,
                            HaloInferenceConfig, HaloLossWeights, format_prompt, format_thought)
from .context import ContextItem, HaloContext, HaloTrace
from .modeling import HaloModel
from .plans import HaloPlanner, HaloSample, PlanItem, item_segment, pack_rows, synthetic_sample

__all__ = ["HaloConfig", "HaloLossWeights", "HaloCondDropout", "HaloInferenceConfig", "HaloSample", "PlanItem", "HaloModel",
           "HaloContext", "ContextItem", "HaloTrace", "pack_rows", "format_prompt", "format_thought",
           "synthetic_sample", "PROMPT_TEMPLATE", "ROLES", "HaloPlanner", "item_segment", "HALO_ACTION_HEAD_NAMES"]
