"""HALO's training samples and sequence plans: one :class:`PlanItem` per attention segment (reference
halo_bagel.md §2.2), packing into rows, and collation into a training batch (:class:`HaloPlanner`, mixed into
:class:`~vla_blocks.models.halo.HaloModel`); plus the synthetic samples of tests and the demo."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from ...layout import Layout, Part, RopeSkip, Segment
from .configuration import HaloCondDropout, format_prompt, format_thought

# ---------------------------------------------------------------------------------------------- samples and plans
@dataclass
class HaloSample:
    """One training sample. Frames are float [3, H, W] in [0, 1] or uint8 [H, W, 3] / [3, H, W].

    EM-CoT when ``thought`` or ``goal`` is given (either may be left out for ablations), reactive
    otherwise. ``actions``: [L ≤ chunk_size, action_dim] (short chunks repeat their last action).
    The history frames are used as given (HALO's loader pads a short history by repeating its first frame,
    and its reactive path leaves out the current frame: choose the frames accordingly).
    """

    history: list[torch.Tensor]
    instruction: str
    actions: torch.Tensor | None = None
    thought: str | None = None
    goal: torch.Tensor | None = None

    @property
    def mode(self) -> str:
        """``emcot`` when the sample has a thought or a goal image, else ``reactive``."""
        return "emcot" if (self.thought is not None or self.goal is not None) else "reactive"


@dataclass
class PlanItem:
    """One item of a sequence plan = one attention segment.

    ``kind``: ``text`` (``<|im_start|>`` ids ``<|im_end|>``, causal; ``loss`` = CE), ``vit`` / ``vae``
    (markers around ViT / clean latent tokens, full), ``vae_noisy`` (markers around noisy latent
    tokens, noise, MSE), ``action`` (markers around the chunk, noise, L1), ``skip`` (no tokens: an image
    left out by condition dropout, which still advances RoPE by one). ``grid``: token grid (h, w).
    """

    kind: Literal["text", "vit", "vae", "vae_noisy", "action", "skip"]
    source: str
    ids: list[int] | None = None
    loss: bool = False
    image: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    actions: torch.Tensor | None = None
    chunk: int = 0

    @property
    def num_tokens(self) -> int:
        """Tokens of this item with its two markers: text ids + 2, chunk + 2, or grid h·w + 2."""
        if self.kind == "skip":
            return 0
        if self.kind == "text":
            return len(self.ids) + 2
        if self.kind == "action":
            return self.chunk + 2
        return self.grid[0] * self.grid[1] + 2


def item_segment(item: PlanItem, roles: dict[str, str]) -> Segment | RopeSkip:
    """The attention segment of a plan item (reference §2.1): mode, parts and RoPE policy (a ``skip`` item:
    :class:`~vla_blocks.layout.RopeSkip`)."""
    text = roles["text"]
    if item.kind == "skip":
        return RopeSkip(1)
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


class HaloPlanner:
    """Sequence plans and collation of a HALO model (needs ``tokenizer``, ``config``, ``roles``, ``experts``,
    ``latent_grid`` / ``vit_grid`` and ``training`` from the model it is mixed into)."""

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
        """The plan of one sample, as HALO's ``robotwin_dataset.py`` builds it (``change_format`` and the plan
        loop of ``__iter__``; reference halo_bagel.md §2.2):

        - each history frame: a clean VAE image (only when the sample has a ``goal``, HALO's ``use_goal_image``),
          then a ViT image;
        - the prompt (text); the ``thought`` (text with CE loss) if given;
        - with a ``goal``: the noisy VAE goal (MSE), its clean VAE copy, its ViT image;
        - the action chunk (L1) if given.

        A text whose token list is empty is left out (upstream keeps only non-empty texts). With ``dropout``
        (BAGEL's ``enable_cfg`` items), a dropped prompt disappears and a dropped history ViT / VAE image
        becomes a ``skip`` item (RoPE advances by one, as BAGEL's ``pack_sequence``)."""
        tok = self.tokenizer
        if not sample.history:
            raise ValueError("a sample needs at least one history frame")

        def keep(p: float) -> bool:
            return p <= 0.0 or float(torch.rand((), generator=generator)) >= p

        d = dropout or HaloCondDropout()
        items: list[PlanItem] = []
        goal = sample.goal is not None
        for i, frame in enumerate(sample.history):
            if goal:
                items.append(PlanItem("vae", f"history[{i}]", image=frame, grid=self.latent_grid(frame))
                             if keep(d.vae) else PlanItem("skip", f"history[{i}]"))
            items.append(PlanItem("vit", f"history[{i}]", image=frame, grid=self.vit_grid(frame))
                         if keep(d.vit) else PlanItem("skip", f"history[{i}]"))
        prompt_ids = tok.encode(format_prompt(sample.instruction, self.config.prompt_template))
        if keep(d.text) and prompt_ids:
            items.append(PlanItem("text", "prompt", ids=prompt_ids))
        if sample.thought is not None:
            thought_ids = tok.encode(sample.thought)
            if thought_ids:
                items.append(PlanItem("text", "thought", ids=thought_ids, loss=True))
        if goal:
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
                    if it.kind == "skip":
                        continue
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
