"""HALO references (its BAGEL-derived sequence plans), re-written from reference/halo_bagel.md §2."""

from __future__ import annotations

import math

import numpy as np


def robotwin_elements(n_images, use_subtask, use_goal_image):
    """HALO ``data/robotwin_dataset.py`` ``change_format`` (halo_bagel.md §5.3): the element types of one sample
    from ``n_images`` loaded frames (the history, plus the goal frame last when ``use_goal_image``).

    Every image but the last becomes a history ``image`` (so without a goal the current frame is left out), then
    the prompt ``text``, the thought ``text+loss`` when ``use_subtask``, the ``goal_image`` when
    ``use_goal_image``, and the ``action``."""
    out = ["image"] * (n_images - 1) + ["text"]
    if use_subtask:
        out.append("text+loss")
    if use_goal_image:
        out.append("goal_image")
    return out + ["action"]


def robotwin_plan(elements, use_goal_image, text_lens):
    """The plan loop of HALO's ``HDF5IterableDataset.__iter__``: BAGEL ``sequence_plan`` items ``(type, loss)`` of
    the elements of :func:`robotwin_elements`. ``text_lens``: the token count of each text element in order (a
    text with no tokens is left out). A history image is a clean ``vae_image`` only when ``use_goal_image``, then
    a ``vit_image``; the goal is a noisy ``vae_image`` (loss), a clean ``vae_image`` and a ``vit_image``."""
    lens = list(text_lens)
    plan = []
    for e in elements:
        if e in ("text", "text+loss"):
            if lens.pop(0) > 0:
                plan.append(("text", int(e == "text+loss")))
        elif e == "image":
            if use_goal_image:
                plan.append(("vae_image", 0))
            plan.append(("vit_image", 0))
        elif e == "goal_image":
            plan += [("vae_image", 1), ("vae_image", 0), ("vit_image", 0)]
        else:
            plan.append(("action", 1))
    return plan


def splits(history, prompt_len, thought_len, vit, lat, chunk, goal=None):
    """``(length, attn_mode, kind)`` of every split of one HALO training plan, counted by hand from
    :func:`robotwin_plan` (``history`` frames kept; ``thought_len`` None: no thought; ``goal`` defaults to
    "there is a thought"). ``vit`` / ``lat`` / ``chunk``: ViT tokens per image, VAE latent tokens per image,
    action tokens. Every image / action split has a start and an end marker (+2), text has ``<|im_start|>`` and
    ``<|im_end|>`` (+2)."""
    goal = (thought_len is not None) if goal is None else goal
    # HALO loads history + 1 frames either way: with a goal the last is the goal, without one the current frame
    # that change_format leaves out; both keep ``history`` history images
    elements = robotwin_elements(history + 1, thought_len is not None, goal)
    lens = [prompt_len] + ([thought_len] if thought_len is not None else [])
    out = []
    for kind, loss in robotwin_plan(elements, goal, lens):
        if kind == "text":
            out.append(((thought_len if loss else prompt_len) + 2, "causal", "text"))
        elif kind == "vit_image":
            out.append((vit + 2, "full", "vit"))
        elif kind == "vae_image":
            out.append((lat + 2, "noise", "vae_noisy") if loss else (lat + 2, "full", "vae"))
        else:
            out.append((chunk + 2, "noise", "action"))
    return out


def rope_ids(plan):
    """RoPE ids of a plan of :func:`splits` triples, by BAGEL's ``pack_sequence``
    (:func:`oracles.bagel.pack_positions`); a ``(0, None, "skip")`` entry is an image left out by condition dropout."""
    from .bagel import pack_positions
    return pack_positions([(kind, n) for n, _, kind in plan])


def experts(plan):
    """The expert of every token (halo_bagel.md §2.2): text and ViT on ``und``, VAE latents on ``gen``, actions on
    ``act``; the start / end markers of an image or action split stay on ``und``."""
    out = []
    for n, _, kind in plan:
        if kind == "skip":
            continue
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


def robotwin_prompt(instruction):
    """HALO ``robotwin_dataset.py`` ``change_format`` prompt: the instruction lower-cased, then trailing dots
    stripped (nothing else), inside the fixed sentence."""
    body = instruction.lower()
    while body.endswith("."):
        body = body[:-1]
    return "You are an embodied agent. Your task is to: " + body + ". Plan and act."


def robotwin_thought(plan, subtask, left, right):
    """HALO ``robotwin_dataset.py`` ``parse_hdf5_file`` thought string (``use_subtask``), built line by line:
    a leading empty line, then three marker blocks, each opened and closed on its own line and followed by an
    empty line; the plan steps one per line (an empty line when there are none); the movement block holds
    ``[LEFT]: …`` and ``[RIGHT]: …`` lines and
    one more empty line before its closing marker."""
    lines = ["", "<|plan|>", "\n".join(plan), "<|\\ plan|>", "",
             "<|subtask|>", subtask, "<|\\ subtask|>", "",
             "<|movement|>", f"[LEFT]: {left}", f"[RIGHT]: {right}", "", "<|\\ movement|>", "", ""]
    return "\n".join(lines)
