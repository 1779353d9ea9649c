"""A generic Mixture-of-Transformers language model composed from a recipe (``mot-tiny``).

The first expert holds the backbone (token embedding, LM head, causal text); the other experts
take continuous token embeddings at their own width, routed by the layout's labels. This is the
smallest complete model of the toolkit: a custom N-expert MoT is a recipe edit::

    model = vla_blocks.create_model("mot-tiny", **{"experts.gen.hidden_size": 48})
    batch = model.demo_batch()
    loss, metrics = model(batch)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..backbones import BackboneConfig, ExpertSpec, build_language_model
from ..components import ModelConfig
from ..config import register
from ..layout import Layout, Segment
from ..model import VLAModel


@register("model", "mot_lm")
@dataclass
class MoTLMConfig(ModelConfig):
    """``backbone`` builds the first expert; ``experts`` lists every expert (first = backbone expert)."""

    backbone: BackboneConfig  # the LLM whose config and weights make the first expert (``hf_causal_lm``)
    # the experts by name, in order; the first holds the backbone, the others derive from it (ExpertSpec)
    experts: dict[str, ExpertSpec] = field(default_factory=lambda: {"und": ExpertSpec()})
    # attention backend of the MoT stack: auto (first that supports the pass), sdpa, flex, triton, flash_attn, xformers
    attention_backend: str = "auto"
    gradient_checkpointing: bool = False  # recompute each layer in backward: less activation memory, one more forward

    def build(self) -> "MoTLM":
        """The :class:`MoTLM` of this recipe (backbone weights imported into the first expert)."""
        return MoTLM(self)


def next_token_pairs(layout: Layout, label: str = "text") -> tuple[torch.Tensor, torch.Tensor]:
    """(positions in the label's token list whose next token is the target, target positions):
    consecutive valid tokens of the same causal segment of the same row (segment ids restart per row)."""
    idx = layout.index(label)
    if idx.numel() < 2:
        e = idx.new_zeros(0)
        return e, e
    seg = layout.seg_id.reshape(-1)[idx]
    valid = layout.valid.reshape(-1)[idx]
    row = idx // layout.seq_len
    ok = (idx[1:] == idx[:-1] + 1) & (row[1:] == row[:-1]) & (seg[1:] == seg[:-1]) & valid[1:] & valid[:-1]
    src = torch.nonzero(ok).squeeze(-1)
    return src, src + 1


class MoTLM(VLAModel):
    """A plain MoT language model (``mot_lm``): next-token CE on the text tokens of any layout, other labels given as
    embeddings; greedy :meth:`generate` with the prefix cache."""

    def __init__(self, config: MoTLMConfig):
        super().__init__(config)
        self.lm = build_language_model(config.backbone, config.experts, config.attention_backend,
                                       config.gradient_checkpointing)
        self.experts = list(config.experts)

    def hidden_size(self, expert: str) -> int:
        """Hidden width of ``expert``."""
        return self.lm.stack.cfg.experts[expert].hidden_size

    def forward(self, batch: dict):
        """``batch``: ``layout``, ``input_ids`` (ids of the ``text`` tokens in layout order) and
        ``embeds`` ({label: [n, D_e]} for the other labels). Loss: next-token CE on text."""
        layout: Layout = batch["layout"]
        embeds = dict(batch.get("embeds", {}))
        embeds["text"] = self.lm.embed(batch["input_ids"])
        hidden = layout.assemble(embeds)
        out = self.lm(hidden, layout)
        h = layout.extract(out.hidden, "text")
        src, tgt = next_token_pairs(layout, "text")
        logits = self.lm.logits(h[src])
        loss = F.cross_entropy(logits.float(), batch["input_ids"][tgt])
        return loss, {"ce": loss.detach(), "text_tokens": int(src.numel())}

    # -- demo -------------------------------------------------------------------------------------
    def demo_layout(self, batch_size: int = 2, text_len: int = 8, image_len: int = 6, noise_len: int = 4) -> Layout:
        """Per sample: an image (second expert, full), text (first expert, causal), a noise chunk (last expert)."""
        e = self.experts
        samples = []
        for b in range(batch_size):
            s = []
            if len(e) > 1:
                s.append(Segment.of("full", e[1], image_len, "image", rope="block"))
            s.append(Segment.of("causal", e[0], text_len - b, "text"))
            if len(e) > 2:
                s.append(Segment.of("noise", e[-1], noise_len, "noise", rope="block_hold"))
            samples.append(s)
        return Layout.from_samples(samples, e)

    def demo_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict:
        """A random batch on :meth:`demo_layout`: text ids, and random embeddings for the image / noise tokens of the
        other experts."""
        layout = self.demo_layout(batch_size)
        vocab = self.lm.embed_tokens.num_embeddings
        n_text = layout.index("text").numel()
        batch = {"layout": layout, "input_ids": torch.randint(0, vocab, (n_text,), generator=generator), "embeds": {}}
        e = self.experts
        if len(e) > 1:
            batch["embeds"]["image"] = torch.randn(layout.index("image").numel(), self.hidden_size(e[1]), generator=generator)
        if len(e) > 2:
            batch["embeds"]["noise"] = torch.randn(layout.index("noise").numel(), self.hidden_size(e[-1]), generator=generator)
        return batch

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int = 8) -> torch.Tensor:
        """Greedy decoding of one causal prompt with the prefix cache (one appended token per step)."""
        e0 = self.experts[0]
        ids = prompt_ids.reshape(-1)
        P = ids.numel()
        layout = Layout.from_samples([[Segment.of("causal", e0, P, "text")]], self.experts)
        out = self.lm({e0: self.lm.embed(ids)}, layout, return_kv=True)
        cache = out.cache(layout)
        nxt = self.lm.logits(out.hidden[e0][-1:]).argmax(-1)
        generated = [nxt]
        for _ in range(max_new_tokens - 1):
            n = cache.length + 1
            layout = Layout.from_samples([[Segment.of("causal", e0, n, "text")]], self.experts)
            step = self.lm({e0: self.lm.embed(nxt)}, layout, start=n - 1, cache=cache, return_kv=True)
            cache.append(step.keys, step.values, layout)
            nxt = self.lm.logits(step.hidden[e0]).argmax(-1)
            generated.append(nxt)
        return torch.cat(generated)

    def demo_inference(self, batch: dict) -> dict:
        """Greedy generation of 4 tokens from the demo batch's first 4 text ids."""
        ids = batch["input_ids"][:4]
        return {"generated_ids": self.generate(ids, max_new_tokens=4)}
