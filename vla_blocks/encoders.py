"""Vision towers (SigLIP, SigLIP2 NaViT), the vision→LLM connector, image preprocessing and the FLUX VAE.

transformers / diffusers are imported lazily (inside functions), so ``import vla_blocks`` stays light.
Nothing here downloads weights: give a config dict (tiny models in tests) or a local pretrained path.

Example::

    vision = SiglipVision(config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, image_size=28, patch_size=14)).build()
    feats = vision(preprocess_images(images_uint8, size=28))      # [B, 4, 32]
    vae = FluxVAE(config=FLUX_VAE_CONFIG).build()                 # or pretrained="/local/flux-vae"
    latent = vae.encode(pixels)                                   # 0.3611·(mean − 0.1159)
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ComponentConfig, register

__all__ = ["VisionConfig", "SiglipVision", "Siglip2NaViT", "SiglipVisionEncoder", "Siglip2NaViTEncoder",
           "Connector", "preprocess_images", "patchify_images_navit", "navit_size", "NaViTFeatures", "VAEConfig", "FluxVAE", "FluxVAEAdapter",
           "FLUX_VAE_CONFIG"]


# ---------------------------------------------------------------------------------------------- preprocessing
def preprocess_images(images: torch.Tensor, size: int | tuple[int, int] = 224, float_range: str = "unit",
                      pad_value: float = -1.0, antialias: bool = False, out_range: str = "signed") -> torch.Tensor:
    """Resize-with-pad (keep the aspect ratio, pad centred) and scale to [−1, 1]; torch only.

    ``images``: uint8 [B, H, W, 3] (or [B, 3, H, W]) in [0, 255], or float in [0, 1]
    (``float_range="unit"``) or already in [−1, 1] (``"signed"``). Returns float32 [B, 3, h, w].
    Padding is ``pad_value`` (−1, black, as openpi). Resizing is bilinear (``align_corners=False``;
    ``antialias=True`` comes closer to PIL, which openpi's JAX pipeline uses).

    uint8 images follow openpi's torch ``resize_with_pad``: resized in float, rounded back to uint8
    levels, padded with 0 (black), then scaled with ``x/255·2 − 1``.

    ``out_range="unit"`` returns the same pixels mapped to [0, 1] (``(x + 1) / 2``: what policies take as
    float images, see :mod:`vla_blocks.batch`).

    Example: ``pixels = preprocess_images(obs["image"], size=224)``.
    """
    if float_range not in ("unit", "signed"):
        raise ValueError(f"unknown float_range {float_range!r} (valid: 'unit', 'signed')")
    if out_range not in ("unit", "signed"):
        raise ValueError(f"unknown out_range {out_range!r} (valid: 'unit', 'signed')")
    if out_range == "unit":
        # clamped: bilinear weights summing to 1 − ε take a −1 pixel to −1.0000001, i.e. −6e-8 in [0, 1]
        return ((preprocess_images(images, size, float_range, pad_value, antialias) + 1.0) * 0.5).clamp_(0.0, 1.0)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, 3] or [B, 3, H, W], got shape {tuple(images.shape)}")
    if images.shape[-1] == 3:
        x = images.permute(0, 3, 1, 2)
    elif images.shape[1] == 3:
        x = images
    else:
        raise ValueError(f"images must have 3 channels (first or last), got shape {tuple(images.shape)}")
    th, tw = (size, size) if isinstance(size, int) else tuple(size)
    is_uint8 = x.dtype == torch.uint8
    if not is_uint8 and not x.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {x.dtype}")
    x = x.float()
    if not is_uint8:
        if torch.isnan(x).any():
            raise ValueError("images contain NaN")
        if float_range == "unit":
            x = x * 2.0 - 1.0
    B, _, H, W = x.shape
    if (H, W) != (th, tw):
        ratio = max(W / tw, H / th)
        rh, rw = max(1, int(H / ratio)), max(1, int(W / ratio))
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=antialias)
        if is_uint8:
            x = x.round().clamp(0, 255)
        ph, pw = th - rh, tw - rw
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0 if is_uint8 else pad_value)
    if is_uint8:
        x = x / 255.0 * 2.0 - 1.0
    return x


# ---------------------------------------------------------------------------------------------- vision slot
class VisionConfig(ComponentConfig, slot="vision"):
    """Slot base of vision towers; ``build()`` returns an ``nn.Module`` with ``out_dim``.

    Example (a recipe field ``vision: VisionConfig``)::

        vision = decode(VisionConfig, {"type": "siglip", "pretrained": "/ckpt/siglip", "num_layers": 26})
    """


@register("vision", "siglip")
@dataclass
class SiglipVision(VisionConfig):
    """Fixed-resolution SigLIP (transformers ``SiglipVisionModel``): 224 px, patch 14 → 256 tokens.

    ``config``: a ``SiglipVisionConfig`` dict (tiny tests); ``pretrained``: a local path.
    ``num_layers``: keep only the first n encoder layers. ``post_layernorm``: apply it (PaliGemma: yes).
    Output: features [B, T, C].

    Example: ``SiglipVision(pretrained="/ckpt/siglip-so400m", num_layers=26).build()(pixels)``.
    """

    family_keys: ClassVar[dict] = {"pretrained": ("config",)}  # a new checkpoint drops an inherited config
    # transformers SiglipVisionConfig kwargs (random init; so400m/14: hidden 1152, 27 layers, image 224);
    # exactly one of ``config`` / ``pretrained``
    config: dict[str, Any] | None = None
    pretrained: str | None = None  # local folder of a transformers SigLIP checkpoint (weights + config)
    num_layers: int | None = None  # keep only the first n encoder layers (None: all)
    post_layernorm: bool = True  # apply the final post_layernorm (PaliGemma: yes); false: last layer's raw output

    def build(self):
        """The :class:`SiglipVisionEncoder` of this config (random init from ``config``, or ``pretrained``)."""
        return SiglipVisionEncoder(self)


@register("vision", "siglip2_navit")
@dataclass
class Siglip2NaViT(VisionConfig):
    """Native-aspect-ratio SigLIP2 (transformers ``Siglip2VisionModel``), variable patches per image.

    Returns packed features [N_total, C] plus per-image token counts and (h, w) grids.
    Note: transformers' SigLIP2 *interpolates* a learned square position grid to each (h, w); BAGEL/HALO's
    own ``siglip_navit`` (SigLIP-so400m, Linear patch embed, 70×70 learned ids ``h·70 + w``) is a different
    tower and is not reproduced here.
    Example: ``feats, counts, grids = Siglip2NaViT(config=cfg).build()(images_list)``.
    """

    family_keys: ClassVar[dict] = {"pretrained": ("config",)}  # a new checkpoint drops an inherited config
    # transformers Siglip2VisionConfig kwargs (random init); exactly one of ``config`` / ``pretrained``
    config: dict[str, Any] | None = None
    pretrained: str | None = None  # local folder of a transformers SigLIP2 checkpoint (weights + config)
    num_layers: int | None = None  # keep only the first n encoder layers (None: all; BAGEL keeps 26 of 27)
    # patch budget per image: each image is resized (aspect kept) to at most this many patches (SigLIP2: 256)
    max_num_patches: int = 256
    post_layernorm: bool = True  # apply the final post_layernorm (BAGEL/HALO: yes); false: last layer's raw output

    def build(self):
        """The :class:`Siglip2NaViTEncoder` of this config (random init from ``config``, or ``pretrained``)."""
        return Siglip2NaViTEncoder(self)


def _truncate_layers(model: nn.Module, num_layers: int | None):
    if num_layers is None:
        return
    enc = getattr(model, "vision_model", model).encoder
    n = len(enc.layers)
    if not 0 < num_layers <= n:
        raise ValueError(f"num_layers must be in [1, {n}], got {num_layers}")
    enc.layers = enc.layers[:num_layers]
    model.config.num_hidden_layers = num_layers


def _load_hf_vision(model_cls, config_cls, cfg, defaults: dict):
    if (cfg.config is None) == (cfg.pretrained is None):
        raise ValueError(f"{type(cfg).__name__}: give exactly one of `config` (a dict) or `pretrained` (a local path)")
    if cfg.pretrained is not None:
        return model_cls.from_pretrained(cfg.pretrained, local_files_only=True)
    conf = {**defaults, **cfg.config}
    known = set(inspect.signature(config_cls.__init__).parameters) | set(config_cls().to_dict())
    known |= {"attn_implementation"}
    unknown = sorted(k for k in conf if k not in known)
    if unknown:  # transformers configs swallow unknown keys silently
        close = {k: difflib.get_close_matches(k, sorted(known), n=1) for k in unknown}
        hints = ", ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
        raise ValueError(f"{type(cfg).__name__}: bad config: unknown {config_cls.__name__} keys {hints}")
    try:
        hf_cfg = config_cls(**conf)
    except TypeError as e:
        raise ValueError(f"{type(cfg).__name__}: bad config: {e}") from e
    return model_cls(hf_cfg)


class SiglipVisionEncoder(nn.Module):
    """Wrapper over ``SiglipVisionModel`` (in ``self.model``): pixels [B, 3, S, S] in [−1, 1] → [B, T, C],
    T = (S / patch)². ``out_dim`` = C, ``num_tokens`` = T, ``image_size`` = S.

    Example: ``feats = SiglipVision(config=cfg).build()(preprocess_images(imgs, size=cfg["image_size"]))``.
    """

    def __init__(self, cfg: SiglipVision):
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel
        self.model = _load_hf_vision(SiglipVisionModel, SiglipVisionConfig, cfg, {"vision_use_head": False})
        _truncate_layers(self.model, cfg.num_layers)
        c = self.model.config
        self.post_layernorm = cfg.post_layernorm
        self.out_dim, self.image_size, self.patch_size = c.hidden_size, c.image_size, c.patch_size
        self.num_tokens = (c.image_size // c.patch_size) ** 2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features [B, T, C] of pixels [B, 3, S, S] in [−1, 1] (S = ``image_size``; see :func:`preprocess_images`)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
        if tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"pixel_values must be {self.image_size}×{self.image_size} (use preprocess_images), "
                             f"got {tuple(pixel_values.shape[-2:])}")
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=not self.post_layernorm)
        return out.last_hidden_state if self.post_layernorm else out.hidden_states[-1]


def navit_size(height: int, width: int, patch_size: int, max_num_patches: int, eps: float = 1e-5) -> tuple[int, int]:
    """SigLIP2's target size: the largest scale (binary search) whose patch-rounded-up size
    ``max(p, ceil(s·side / p)·p)`` keeps ``(h/p)·(w/p) ≤ max_num_patches``. Returns (height, width) in pixels.

    Example: ``navit_size(480, 640, 16, 256)`` → ``(224, 288)`` (14×18 = 252 patches).
    """
    def scaled(scale, side):
        return int(max(patch_size, math.ceil(side * scale / patch_size) * patch_size))

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (scaled(mid, height) / patch_size) * (scaled(mid, width) / patch_size) <= max_num_patches:
            lo = mid
        else:
            hi = mid
    return scaled(lo, height), scaled(lo, width)


def patchify_images_navit(images, patch_size: int, max_num_patches: int, antialias: bool = True,
                          sizes: Sequence[tuple[int, int]] | None = None):
    """Patchify a list of images at native aspect ratio, SigLIP2-style.

    Each image (uint8 [H, W, 3] / [3, H, W], or float in [0, 1]) is resized to :func:`navit_size`, scaled to
    [−1, 1] and cut into p×p patches flattened in (p, q, c) order. Returns ``(pixel_values [N, M, p²·3],
    pixel_attention_mask [N, M] bool, spatial_shapes [N, 2])`` with M = ``max_num_patches``.

    ``sizes``: the (height, width) in pixels of each image instead of :func:`navit_size` (multiples of the patch
    size, at most ``max_num_patches`` patches; e.g. BAGEL's ``ImageTransform`` sizes).

    Example: ``pv, mask, shapes = patchify_images_navit([img_a, img_b], 16, 256)``.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = [images]
        elif images.ndim == 4:
            images = list(images)
    if len(images) == 0:
        raise ValueError("no images given")
    if sizes is not None and len(sizes) != len(images):
        raise ValueError(f"sizes has {len(sizes)} entries for {len(images)} images")
    p = patch_size
    pv = torch.zeros(len(images), max_num_patches, p * p * 3)
    mask = torch.zeros(len(images), max_num_patches, dtype=torch.bool)
    shapes = torch.zeros(len(images), 2, dtype=torch.long)
    for i, img in enumerate(images):
        if img.ndim != 3 or 3 not in (img.shape[0], img.shape[-1]):
            raise ValueError(f"image {i} must be [H, W, 3] or [3, H, W], got {tuple(img.shape)}")
        x = img.permute(2, 0, 1) if img.shape[-1] == 3 and img.shape[0] != 3 else img
        x = x.float() / 255.0 if img.dtype == torch.uint8 else x.float()
        H, W = x.shape[-2:]
        if sizes is None:
            th, tw = navit_size(H, W, p, max_num_patches)
        else:
            th, tw = (int(v) for v in sizes[i])
            if th % p or tw % p or th <= 0 or tw <= 0 or (th // p) * (tw // p) > max_num_patches:
                raise ValueError(f"sizes[{i}] = {(th, tw)} must be positive multiples of the patch size {p} with at "
                                 f"most max_num_patches={max_num_patches} patches")
        if sizes is None or (th, tw) != (H, W):
            x = F.interpolate(x[None], size=(th, tw), mode="bilinear", align_corners=False, antialias=antialias)[0]
        x = x * 2.0 - 1.0
        h, w = th // p, tw // p
        patches = x.reshape(3, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(h * w, p * p * 3)
        pv[i, : h * w] = patches
        mask[i, : h * w] = True
        shapes[i] = torch.tensor([h, w])
    return pv, mask, shapes


class NaViTFeatures(NamedTuple):
    """Output of :class:`Siglip2NaViTEncoder`: packed features [N_total, C], counts [n_img], grids [n_img, 2]."""

    features: torch.Tensor
    counts: torch.Tensor
    grids: torch.Tensor


class Siglip2NaViTEncoder(nn.Module):
    """Wrapper over ``Siglip2VisionModel`` (in ``self.model``) at native aspect ratio.

    ``forward(images)`` takes a list of images (see :func:`patchify_images_navit`) — or already patchified
    ``(pixel_values, pixel_attention_mask, spatial_shapes)`` via :meth:`forward_patches` — and returns
    :class:`NaViTFeatures` with the valid tokens of all images packed in order.

    Example: ``feats, counts, grids = Siglip2NaViT(config=cfg, max_num_patches=64).build()([img_a, img_b])``.
    """

    def __init__(self, cfg: Siglip2NaViT):
        super().__init__()
        from transformers import Siglip2VisionConfig, Siglip2VisionModel
        self.model = _load_hf_vision(Siglip2VisionModel, Siglip2VisionConfig, cfg, {"vision_use_head": False})
        _truncate_layers(self.model, cfg.num_layers)
        c = self.model.config
        self.post_layernorm = cfg.post_layernorm
        self.out_dim, self.patch_size, self.max_num_patches = c.hidden_size, c.patch_size, cfg.max_num_patches

    def forward_patches(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor,
                        spatial_shapes: torch.Tensor) -> NaViTFeatures:
        """Features of already patchified images (the three outputs of :func:`patchify_images_navit`):
        the valid tokens of every image packed in order, with per-image counts and (h, w) grids."""
        if pixel_values.ndim != 3 or pixel_values.shape[-1] != 3 * self.patch_size ** 2:
            raise ValueError(f"pixel_values must be [N, M, {3 * self.patch_size ** 2}], got {tuple(pixel_values.shape)}")
        dtype = next(self.model.parameters()).dtype
        mask = pixel_attention_mask.bool()
        out = self.model(pixel_values=pixel_values.to(dtype), pixel_attention_mask=mask.long(),
                         spatial_shapes=spatial_shapes, output_hidden_states=not self.post_layernorm)
        h = out.last_hidden_state if self.post_layernorm else out.hidden_states[-1]
        return NaViTFeatures(h[mask], mask.sum(1), spatial_shapes)

    def forward(self, images) -> NaViTFeatures:
        """Patchify ``images`` (a list, or a [N, ...] tensor; see :func:`patchify_images_navit`) and encode them."""
        pv, mask, shapes = patchify_images_navit(images, self.patch_size, self.max_num_patches)
        dev = next(self.model.parameters()).device
        return self.forward_patches(pv.to(dev), mask.to(dev), shapes.to(dev))


class Connector(nn.Module):
    """Vision features → LLM width. ``kind="mlp"`` (BAGEL): fc1 C→D, GELU-tanh, fc2 D→D;
    ``kind="linear"`` (PaliGemma ``multi_modal_projector``): ``linear`` C→D.

    Example: ``Connector(1152, 2048, kind="linear")(feats)``.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp"):
        super().__init__()
        if kind not in ("mlp", "linear"):
            raise ValueError(f"unknown connector kind {kind!r} (valid: 'mlp', 'linear')")
        self.kind, self.in_dim, self.out_dim = kind, in_dim, out_dim
        if kind == "mlp":
            self.fc1 = nn.Linear(in_dim, out_dim)
            self.act = nn.GELU(approximate="tanh")
            self.fc2 = nn.Linear(out_dim, out_dim)
        else:
            self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project vision features [..., in_dim] to the LLM width [..., out_dim]."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"features last dim must be {self.in_dim}, got {tuple(x.shape)}")
        if self.kind == "linear":
            return self.linear(x)
        return self.fc2(self.act(self.fc1(x)))


# ---------------------------------------------------------------------------------------------- VAE slot
class VAEConfig(ComponentConfig, slot="vae"):
    """Slot base of image autoencoders; ``build()`` returns a module with ``encode`` / ``decode``.

    Example: ``vae = decode(VAEConfig, {"type": "flux_vae", "pretrained": "/ckpt/FLUX.1-dev/vae"}).build()``.
    """


#: diffusers ``AutoencoderKL`` config of the FLUX.1 VAE (``ch_mult`` [1, 2, 4, 4] ×128, 16 latent channels).
FLUX_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "act_fn": "silu", "use_quant_conv": False, "use_post_quant_conv": False,
    "scaling_factor": 0.3611, "shift_factor": 0.1159,
}


@register("vae", "flux_vae")
@dataclass
class FluxVAE(VAEConfig):
    """FLUX VAE over diffusers ``AutoencoderKL``: 16 latent channels, ×8 downsampling,
    ``latent = scaling·(posterior_mean − shift)`` with scaling 0.3611 and shift 0.1159; decode inverts.

    ``pretrained`` is a local diffusers-format folder (``config.json`` + weights). BAGEL/HALO ship the VAE
    as ``ae.safetensors`` in the original FLUX (BFL) key names, which need a key conversion first.

    Example: ``FluxVAE(pretrained="/ckpt/flux-vae").build().encode(pixels)``.
    """

    family_keys: ClassVar[dict] = {"pretrained": ("config",)}  # a new checkpoint drops an inherited config
    # diffusers AutoencoderKL kwargs (random init; FLUX's: ``FLUX_VAE_CONFIG``); exactly one of config / pretrained
    config: dict[str, Any] | None = None
    pretrained: str | None = None  # local diffusers-format folder (config.json + weights)
    subfolder: str | None = None  # the VAE's subfolder inside ``pretrained`` (e.g. "vae" of a FLUX.1 pipeline)
    scaling_factor: float = 0.3611  # latent = scaling·(posterior mean − shift) (FLUX/BAGEL: 0.3611)
    shift_factor: float = 0.1159  # subtracted from the posterior mean before scaling (FLUX/BAGEL: 0.1159)

    def build(self):
        """The :class:`FluxVAEAdapter` of this config (random init from ``config``, or ``pretrained``)."""
        return FluxVAEAdapter(self)


class FluxVAEAdapter(nn.Module):
    """Adapter over diffusers ``AutoencoderKL`` (in ``self.vae``).

    ``encode(pixels [B, 3, H, W] in [−1, 1]) → scaling·(posterior_mean − shift)`` [B, C, H/f, W/f];
    ``decode(latent) → vae.decode(latent / scaling + shift)`` in [−1, 1] (not clamped).
    ``latent_channels`` = C, ``downsample`` = f (8 for FLUX).

    Example: ``vae = FluxVAE(config=FLUX_VAE_CONFIG).build(); x = vae.decode(vae.encode(pixels))``.
    """

    def __init__(self, cfg: FluxVAE):
        super().__init__()
        from diffusers import AutoencoderKL
        if (cfg.config is None) == (cfg.pretrained is None):
            raise ValueError("FluxVAE: give exactly one of `config` (a dict) or `pretrained` (a local path)")
        if cfg.pretrained is not None:
            kw = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
            self.vae = AutoencoderKL.from_pretrained(cfg.pretrained, local_files_only=True, **kw)
        else:
            try:
                self.vae = AutoencoderKL(**cfg.config)
            except TypeError as e:
                raise ValueError(f"FluxVAE: bad config: {e}") from e
        self.scaling_factor, self.shift_factor = cfg.scaling_factor, cfg.shift_factor
        self.latent_channels = self.vae.config.latent_channels
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _dtype(self):
        return next(self.vae.parameters()).dtype

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, H/f, W/f] = scaling·(posterior mean − shift) of pixels [B, 3, H, W] in [−1, 1]
        (H, W multiples of f; deterministic: the posterior mean, as BAGEL encodes)."""
        if pixels.ndim != 4 or pixels.shape[1] != self.vae.config.in_channels:
            raise ValueError(f"pixels must be [B, {self.vae.config.in_channels}, H, W], got {tuple(pixels.shape)}")
        f = self.downsample
        if pixels.shape[-2] % f or pixels.shape[-1] % f:
            raise ValueError(f"image size {tuple(pixels.shape[-2:])} must be a multiple of {f}")
        z = self.vae.encode(pixels.to(self._dtype())).latent_dist.mean
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, h·f, w·f] (about [−1, 1], not clamped) of latents [B, C, h, w]; inverts :meth:`encode`."""
        if latent.ndim != 4 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"latent must be [B, {self.latent_channels}, h, w], got {tuple(latent.shape)}")
        z = latent.to(self._dtype()) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`encode`."""
        return self.encode(pixels)
