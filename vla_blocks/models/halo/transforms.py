"""HALO / BAGEL image geometry: the pixel size a frame is resized to before the VAE or the ViT.

BAGEL's ``ImageTransform`` (HALO ``data/transforms.py``) keeps the aspect ratio with the longer side at most
``max_size`` and the shorter at least ``min_size``, then caps the pixel count and the longer side again.
Every candidate size is computed in three roundings, in this order: the scaled side is rounded to a whole pixel,
that is rounded (half to even, Python's ``round``) to a multiple of ``stride``, and at least one stride is kept.
So for aspect ratios above ``max_size / min_size`` the long side ends at ``max_size`` and the short side below
``min_size`` (HALO's VAE transform: 73×194 → 384×1024).

HALO's settings: VAE ``max 1024, min 512, stride 16``; ViT ``max 980, min 378, stride 14``; ``max_pixels`` is
BAGEL's default ``14·14·9·1024`` for both.
"""

from __future__ import annotations

#: BAGEL's default pixel cap of ``ImageTransform`` (``14·14·9·1024``).
BAGEL_MAX_PIXELS = 14 * 14 * 9 * 1024


def _divisible(value: int, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def _scaled(height: int, width: int, scale: float, stride: int) -> tuple[int, int]:
    return _divisible(round(height * scale), stride), _divisible(round(width * scale), stride)


def bagel_resize_size(height: int, width: int, max_size: int, min_size: int, stride: int,
                      max_pixels: int = BAGEL_MAX_PIXELS, img_num: int = 1) -> tuple[int, int]:
    """``(height, width)`` in pixels that BAGEL's ``MaxLongEdgeMinShortEdgeResize`` gives a ``height × width``
    frame (see the module docstring). ``img_num`` divides ``max_pixels`` as upstream's argument of that name.

    Example: ``bagel_resize_size(240, 320, 1024, 512, 16)`` → ``(512, 688)`` (43×32 latent patches).
    """
    for name, v in (("height", height), ("width", width), ("max_size", max_size), ("min_size", min_size),
                    ("stride", stride), ("max_pixels", max_pixels), ("img_num", img_num)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    h, w = _scaled(height, width, scale, stride)
    if w * h > max_pixels / img_num:
        h, w = _scaled(h, w, max_pixels / img_num / (w * h), stride)
    if max(w, h) > max_size:
        h, w = _scaled(h, w, max_size / max(w, h), stride)
    return h, w
