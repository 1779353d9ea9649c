"""Vision towers (SigLIP, SigLIP2 NaViT), the vision→LLM connector, image preprocessing and the FLUX VAE.

transformers / diffusers are imported lazily (inside functions), so ``import vla_blocks`` stays light.
Nothing here downloads weights: give a config dict (tiny models in tests) or a local pretrained path.

Example::

    vision = SiglipVision(config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, image_size=28, patch_size=14)).build()
    feats = vision(preprocess_images(images_uint8, size=28))      # [B, 4, 32]
    vae = FluxVAE(config=TINY_VAE_CONFIG).build()
    latent = vae.encode(pixels)                                   # 0.3611·(mean − 0.1159)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import ComponentConfig, register

__all__ = ["VisionConfig", "SiglipVision", "Siglip2NaViT", "SiglipVisionEncoder", "Siglip2NaViTEncoder",
           "Connector", "preprocess_images", "patchify_images_navit", "VAEConfig", "FluxVAE", "FluxVAEAdapter",
           "FLUX_VAE_CONFIG"]


# ---------------------------------------------------------------------------------------------- preprocessing
def preprocess_images(images: torch.Tensor, size: int | tuple[int, int] = 224, float_range: str = "unit",
                      pad_value: float = -1.0) -> torch.Tensor:
    """Resize-with-pad (keep the aspect ratio, pad centred) and scale to [−1, 1]; torch only.

    ``images``: uint8 [B, H, W, 3] (or [B, 3, H, W]) in [0, 255], or float in [0, 1]
    (``float_range="unit"``) or already in [−1, 1] (``"signed"``). Returns float32 [B, 3, h, w].
    Padding is ``pad_value`` (−1, black, as openpi). Resizing is bilinear with antialiasing.

    Example: ``pixels = preprocess_images(obs["image"], size=224)``.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------------------------- vision slot
class VisionConfig(ComponentConfig, slot="vision"):
    """Slot base of vision towers; ``build()`` returns an ``nn.Module`` with ``out_dim``."""


@register("vision", "siglip")
@dataclass
class SiglipVision(VisionConfig):
    """Fixed-resolution SigLIP (transformers ``SiglipVisionModel``): 224 px, patch 14 → 256 tokens.

    ``config``: a ``SiglipVisionConfig`` dict (tiny tests); ``pretrained``: a local path.
    ``num_layers``: keep only the first n encoder layers. ``post_layernorm``: apply it (PaliGemma: yes).
    Output: features [B, T, C].

    Example: ``SiglipVision(pretrained="/ckpt/siglip-so400m", num_layers=26).build()(pixels)``.
    """

    config: dict[str, Any] | None = None
    pretrained: str | None = None
    num_layers: int | None = None
    post_layernorm: bool = True

    def build(self):
        return SiglipVisionEncoder(self)


@register("vision", "siglip2_navit")
@dataclass
class Siglip2NaViT(VisionConfig):
    """Native-aspect-ratio SigLIP2 (transformers ``Siglip2VisionModel``), variable patches per image.

    Returns packed features [N_total, C] plus per-image token counts and (h, w) grids.
    Example: ``feats, counts, grids = Siglip2NaViT(config=cfg).build()(images_list)``.
    """

    config: dict[str, Any] | None = None
    pretrained: str | None = None
    num_layers: int | None = None
    max_num_patches: int = 256
    post_layernorm: bool = True

    def build(self):
        return Siglip2NaViTEncoder(self)


class SiglipVisionEncoder(nn.Module):
    """Wrapper over ``SiglipVisionModel``: pixels [B, 3, H, W] in [−1, 1] → [B, T, C]."""

    def __init__(self, cfg: SiglipVision):
        super().__init__()
        raise NotImplementedError


def patchify_images_navit(images, patch_size: int, max_num_patches: int):
    """SigLIP2-style patchification of a list of images at native aspect ratio (see Siglip2NaViTEncoder)."""
    raise NotImplementedError


class Siglip2NaViTEncoder(nn.Module):
    """Wrapper over ``Siglip2VisionModel``: list of images → (packed [N, C], counts [n_img], grids [n_img, 2])."""

    def __init__(self, cfg: Siglip2NaViT):
        super().__init__()
        raise NotImplementedError


class Connector(nn.Module):
    """Vision features → LLM width. ``kind="mlp"`` (BAGEL): fc1 C→D, GELU-tanh, fc2 D→D;
    ``kind="linear"`` (PaliGemma ``multi_modal_projector``): ``linear`` C→D.

    Example: ``Connector(1152, 2048, kind="linear")(feats)``.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp"):
        super().__init__()
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- VAE slot
class VAEConfig(ComponentConfig, slot="vae"):
    """Slot base of image autoencoders; ``build()`` returns a module with ``encode`` / ``decode``."""


FLUX_VAE_CONFIG: dict[str, Any] = {}


@register("vae", "flux_vae")
@dataclass
class FluxVAE(VAEConfig):
    """FLUX VAE over diffusers ``AutoencoderKL``: 16 latent channels, ×8 downsampling,
    ``latent = scaling·(posterior_mean − shift)`` with scaling 0.3611 and shift 0.1159; decode inverts.

    Example: ``FluxVAE(pretrained="/ckpt/flux-vae").build().encode(pixels)``.
    """

    config: dict[str, Any] | None = None
    pretrained: str | None = None
    subfolder: str | None = None
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    def build(self):
        return FluxVAEAdapter(self)


class FluxVAEAdapter(nn.Module):
    """``encode(pixels [B, 3, H, W] in [−1, 1]) → latent [B, 16, H/8, W/8]``; ``decode`` inverts."""

    def __init__(self, cfg: FluxVAE):
        super().__init__()
        raise NotImplementedError
