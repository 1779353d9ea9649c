"""HALO references (its BAGEL-derived sequence plans), re-written from reference/halo_bagel.md §2."""

from __future__ import annotations

import math

import numpy as np


def splits(history, prompt_len, thought_len, vit, lat, chunk):
    """``(length, attn_mode, kind)`` of every split of one HALO training plan (halo_bagel.md §2.2), counted by hand.

    ``history``: number of history frames; ``prompt_len`` / ``thought_len``: token counts of the prompt and the
    thought (``thought_len`` None = a reactive sample); ``vit`` / ``lat`` / ``chunk``: ViT tokens per image, VAE
    latent tokens per image, action tokens. Every image / action split has a start and an end marker (+2), text
    has ``<|im_start|>`` and ``<|im_end|>`` (+2). Reactive: ViT history, prompt, actions; EM-CoT: (clean VAE, ViT)
    per history frame, prompt, thought, the noisy subgoal latent, its clean copy and ViT, actions."""
    v, c, act = (vit + 2, "full", "vit"), (lat + 2, "full", "vae"), (chunk + 2, "noise", "action")
    prompt = (prompt_len + 2, "causal", "text")
    if thought_len is None:
        return [v] * history + [prompt, act]
    thought = (thought_len + 2, "causal", "text")
    return [c, v] * history + [prompt, thought, (lat + 2, "noise", "vae_noisy"), c, v, act]


def rope_ids(plan):
    """RoPE ids of a plan from BAGEL's table (halo_bagel.md §2.1): text consecutive (rope += len); a ViT or clean
    VAE image shares one id and advances by one; a noisy VAE or action split shares one id, no advance."""
    r, out = 0, []
    for n, _, kind in plan:
        if kind == "text":
            out += list(range(r, r + n))
            r += n
        else:
            out += [r] * n
            r += 1 if kind in ("vit", "vae") else 0
    return out


def experts(plan):
    """The expert of every token (halo_bagel.md §2.2): text and ViT on ``und``, VAE latents on ``gen``, actions on
    ``act``; the start / end markers of an image or action split stay on ``und``."""
    out = []
    for n, _, kind in plan:
        inner = {"text": "und", "vit": "und", "vae": "gen", "vae_noisy": "gen", "action": "act"}[kind]
        out += ["und"] * n if kind == "text" else ["und"] + [inner] * (n - 2) + ["und"]
    return out


def sincos_1d(length, dim):
    """HALO ``apply_sinusoidal_pos_embedding`` of the action chunk, numpy: ``[sin ‖ cos]`` with frequencies
    ``exp(−k·log(1e4)/(dim/2 − 1))`` (note ``half − 1``, not the MAE / DiT ``half``)."""
    half = dim // 2
    freqs = np.exp(-np.arange(half) * math.log(10000) / (half - 1))
    args = np.arange(length)[:, None] * freqs[None]
    return np.concatenate([np.sin(args), np.cos(args)], axis=-1)
