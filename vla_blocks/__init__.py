"""vla_blocks: plug-in building blocks for Vision-Language-Action models.

``vla_blocks.create_model(ref, **overrides)`` builds a model from a recipe name or path, or loads one
from ``hf-hub:org/name[@rev]`` / ``local-dir:path``; ``vla_blocks.list_recipes()`` lists the recipes
shipped with the package.
"""

from ._version import __version__
from .config import ConfigError, list_recipes, load_recipe, register  # noqa: E402
from .model import VLAModel, create_model, model_config  # noqa: E402

__all__ = ["__version__", "create_model", "model_config", "list_recipes", "load_recipe", "register", "ConfigError",
           "VLAModel"]
