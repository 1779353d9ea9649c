"""Slot bases of the built-in component families, and the import list of built-in components.

Each module in ``BUILTIN_MODULES`` registers its components when imported; the registry imports
them all (and the third-party entry points) before the first lookup.
"""

from __future__ import annotations

import importlib

from .config import ComponentConfig


class ModelConfig(ComponentConfig, slot="model"):
    """A complete model recipe; ``build()`` returns a :class:`vla_blocks.model.VLAModel`."""


BUILTIN_MODULES = [
    "vla_blocks.backbones",  # backbone import (hf_causal_lm)
    "vla_blocks.flow",  # time samplers, flow matching
    "vla_blocks.conditioning",  # time conditioning, sinusoidal tables
    "vla_blocks.heads",  # action head, visual-latent head
    "vla_blocks.encoders",  # SigLIP / SigLIP2 vision towers, connector, FLUX VAE
    "vla_blocks.reasoners",  # ACoT EAR / IAR / AGP
    "vla_blocks.models.mot_lm",  # generic MoT language model (recipes mot-*)
    "vla_blocks.models.pi0",  # pi0 / pi0.5
    "vla_blocks.models.acot",  # ACoT-VLA
    "vla_blocks.models.halo",  # HALO
]

for _m in BUILTIN_MODULES:
    importlib.import_module(_m)
