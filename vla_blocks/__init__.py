"""vla_blocks: plug-in building blocks for Vision-Language-Action models."""

__version__ = "0.1.0"
