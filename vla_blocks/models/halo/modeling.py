"""The HALO model: encoders, the three-expert MoT stack, the latent and action flow heads, training loss
and the EM-CoT / reactive inference chain (see :mod:`vla_blocks.models.halo`)."""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import torch
import torch.nn.functional as F

from ...backbones import ExpertSpec, build_language_model
from ...batch import BatchSchema, Field
from ...encoders import Connector, navit_size, patchify_images_navit
from ...flow import FlowMatching, cfg_in_interval, cfg_velocity, euler_sample, flow_loss, time_grid
from ...heads import FlowHead, PositionEmbedding2D, VisualLatentHead
from ...layout import Layout, Segment
from ...model import VLAModel
from ...tokenization import HaloTokenizer
from .configuration import HALO_ACTION_HEAD_NAMES, HaloConfig, format_prompt
from .context import ContextItem, HaloContext, HaloTrace
from .plans import HaloPlanner, PlanItem, _as_unit_chw, item_segment, synthetic_sample
from .transforms import bagel_resize_size

# ---------------------------------------------------------------------------------------------- model
class HaloModel(HaloPlanner, VLAModel):
    """HALO built from a :class:`HaloConfig` (see the module docstring).

    Modules under upstream names (a converter maps prefixes only): ``lm`` (``embed_tokens``, the MoT
    ``stack`` with experts ``und`` / ``gen`` / ``act``, ``lm_head``), ``vit_model``, ``connector``,
    ``vit_pos_embed``, ``vae``, ``vae2llm``, ``llm2vae``, ``time_embedder``, ``latent_pos_embed``,
    ``input_linear_layer``, ``output_linear_layer``, ``action_time_embedder``.

    Training: ``loss, metrics = model(model.collate(samples))``. Inference: :meth:`infer` (a trace),
    :meth:`predict_action_chunk` / ``select_action`` (lerobot names). ``model.tokenizer`` may be replaced
    by any :class:`~vla_blocks.tokenization.HaloTokenizer` whose ids fit the vocabulary.
    """

    batch_schema = BatchSchema("halo", [  # checked at every entry point (vla_blocks.batch)
        Field("layout", kind="object", type_=Layout, modes=("train",), doc="a Layout (model.collate)"),
        Field("input_ids", ("N",), ("int",), range=(0, "max_id"), modes=("train",)),
        Field("text_targets", ("N",), ("int",), range=(-100, "max_id"), modes=("train",)),
        Field("vit_images", kind="frames", modes=("train",), doc="list of images [3, H, W], uint8 or float [0, 1]"),
        Field("vae_images", kind="frames", modes=("train",), doc="list of images [3, H, W], uint8 or float [0, 1]"),
        Field("actions", ("*", "chunk", "A"), modes=("train",), optional=True),
        Field("history", kind="history", modes=("infer",), doc="per sample a list of frames, uint8 or float [0, 1]"),
        Field("instruction", kind="text", modes=("infer",), doc="one instruction string per sample")])
    batch_entry_points = {**VLAModel.batch_entry_points, "infer": "episode"}

    def batch_dims(self) -> dict:
        """The sizes the batch schema binds: chunk length, action width A and the largest token id."""
        return {"chunk": self.config.chunk_size, "A": self.config.action_dim,
                "max_id": self.lm.embed_tokens.num_embeddings - 1}

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
        """The device of the model's parameters."""
        return self.lm.embed_tokens.weight.device

    def train(self, mode: bool = True):
        """Set training mode; a frozen VAE (``freeze_vae``) stays in eval mode."""
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
        """Pixel size of a frame for the VAE, by HALO's VAE transform (BAGEL ``ImageTransform``: longer side ≤
        ``vae_max_side``, shorter ≥ ``vae_min_side``, stride 16; see :mod:`~vla_blocks.models.halo.transforms`)."""
        c = self.config
        return bagel_resize_size(int(height), int(width), c.vae_max_side, c.vae_min_side, self.latent_stride,
                                 c.image_max_pixels)

    def latent_grid(self, image: torch.Tensor) -> tuple[int, int]:
        """The latent token grid (h, w) of an image once resized for the VAE (:meth:`vae_size`)."""
        H, W = _as_unit_chw(image).shape[-2:]
        h, w = self.vae_size(H, W)
        return h // self.latent_stride, w // self.latent_stride

    def vit_size(self, height: int, width: int) -> tuple[int, int]:
        """Pixel size of a frame for the ViT: NaViT's own sizing (``vit_resize: navit``) or HALO's ViT transform
        (``bagel``: ``vit_max_size`` / ``vit_min_size``, stride = the patch size)."""
        c, p = self.config, self.vit_model.patch_size
        if c.vit_resize == "bagel":
            th, tw = bagel_resize_size(int(height), int(width), c.vit_max_size, c.vit_min_size, p, c.image_max_pixels)
            if (th // p) * (tw // p) > self.vit_model.max_num_patches:
                raise ValueError(f"vit_resize=bagel: a {height}×{width} frame becomes {th // p}×{tw // p} ViT "
                                 f"patches, more than vision.max_num_patches={self.vit_model.max_num_patches}")
            return th, tw
        return navit_size(int(height), int(width), p, self.vit_model.max_num_patches)

    def vit_grid(self, image: torch.Tensor) -> tuple[int, int]:
        """The ViT patch grid (h, w) of an image at native aspect ratio within the encoder's patch budget."""
        H, W = _as_unit_chw(image).shape[-2:]
        p = self.vit_model.patch_size
        th, tw = self.vit_size(H, W)
        return th // p, tw // p

    # ------------------------------------------------------------------ embeddings
    def embed_text(self, ids) -> torch.Tensor:
        """Token embeddings ``[n, D]`` of token ids (flattened)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        return self.lm.embed(ids)

    def embed_vit(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Frames → ViT tokens at the ``vit`` expert width: ``connector(vit_model(x)) + vit_pos_embed``."""
        frames = [_as_unit_chw(im) for im in images]
        if self.config.vit_resize == "bagel":  # resize here; NaViT then keeps the size (it fits max_num_patches)
            frames = [F.interpolate(x[None], size=self.vit_size(*x.shape[-2:]), mode="bilinear", align_corners=False,
                                    antialias=True)[0] for x in frames]
            pv, mask, shapes = patchify_images_navit(frames, self.vit_model.patch_size, self.vit_model.max_num_patches,
                                                     sizes=[tuple(x.shape[-2:]) for x in frames])
            dev = self.device
            feats = self.vit_model.forward_patches(pv.to(dev), mask.to(dev), shapes.to(dev))
        else:
            feats = self.vit_model(frames)
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
        """The dtype of the ViT connector's weights (ViT features are cast to it)."""
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
        """Flattened 2-D position ids ``[h·w]`` of a latent token grid (row-major, ``i·max_latent_size + j``)."""
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
        """A context item for text ``ids`` wrapped in ``<|im_start|>`` / ``<|im_end|>`` (one causal segment)."""
        tok = self.tokenizer
        full = [tok.bos_id] + list(ids) + [tok.eos_id]
        seg = Segment.of("causal", self.roles["text"], len(full), "text")
        return ContextItem("text", source, seg, {"text": self.embed_text(full)}, full)

    def vit_item(self, image: torch.Tensor, source: str) -> ContextItem:
        """A context item for an image's ViT tokens between the vision markers (one full segment)."""
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
        """The noisy action chunk ``a_t [L, A]`` at time ``t`` as a context item between the action markers (a noise
        segment, with its adaRMS condition when used)."""
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
        """An EM-CoT inference call on the first demo sample (seed 0), summarised (:meth:`HaloTrace.summary`)."""
        s = batch["samples"][0]
        g = torch.Generator().manual_seed(0)
        return self.infer(s.history, s.instruction, mode="emcot", generator=g).summary()
