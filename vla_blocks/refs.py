"""Model references, parsed one way everywhere (timm's grammar): a recipe name or YAML path, a saved folder,
``local-dir:path``, ``hf-hub:org/name[@revision]`` or a bare ``org/name`` Hub id.

:func:`parse_ref` is what :func:`vla_blocks.create_model`, :func:`vla_blocks.hub.load_model` and the CLI use;
:func:`parse_model_ref` parses the explicit prefixed forms alone (no file-system or recipe lookup).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, list_recipes

__all__ = ["ModelRef", "parse_model_ref", "parse_ref", "REPO_ID"]

#: A Hub repository id ``org/name`` with an optional ``@revision``.
REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+(@[\w.\-/]+)?$")


@dataclass
class ModelRef:
    """A parsed model reference: ``kind`` (``recipe``, ``hf-hub`` or ``local-dir``), ``target`` (recipe name/path,
    ``org/name`` or folder) and the Hub ``revision``."""
    kind: str  # "recipe" | "hf-hub" | "local-dir"
    target: str
    revision: str | None = None


def parse_model_ref(ref: str) -> ModelRef:
    """Parse ``"NAME"`` / ``"path.yaml"``, ``"hf-hub:org/name[@revision]"`` or ``"local-dir:path"`` into a
    :class:`ModelRef`; ``ConfigError`` on a malformed reference."""
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"model reference must be a non-empty string, got {ref!r}")
    if ref.startswith("hf-hub:"):
        target = ref[len("hf-hub:"):]
        rev = None
        if "@" in target:
            target, rev = target.split("@", 1)
            if not rev:
                raise ConfigError(f"{ref!r}: empty revision after '@'")
        if target.count("/") != 1 or not all(target.split("/")):
            raise ConfigError(f"{ref!r}: expected hf-hub:org/name[@revision]")
        return ModelRef("hf-hub", target, rev)
    if ref.startswith("local-dir:"):
        target = ref[len("local-dir:"):]
        if not target:
            raise ConfigError(f"{ref!r}: expected local-dir:path")
        return ModelRef("local-dir", target)
    return ModelRef("recipe", ref)


def parse_ref(ref: str | os.PathLike | ModelRef) -> ModelRef:
    """A :class:`ModelRef` from ``hf-hub:`` / ``local-dir:`` strings, folders, recipe names/paths, ``org/name``."""
    if isinstance(ref, ModelRef):
        return ref
    if isinstance(ref, os.PathLike):
        return ModelRef("local-dir", os.fspath(ref))
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"model reference must be a non-empty string or path, got {ref!r}")
    if ref.startswith(("hf-hub:", "local-dir:")):
        return parse_model_ref(ref)
    p = Path(ref).expanduser()
    if p.is_dir():
        return ModelRef("local-dir", str(p))
    if p.suffix in (".yaml", ".yml") or ref in list_recipes():
        return ModelRef("recipe", ref)
    if REPO_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return parse_model_ref("hf-hub:" + ref)
    raise ConfigError(f"{ref!r} is not a folder, a recipe or a Hub repo id; use hf-hub:org/name[@revision], "
                      f"local-dir:path or a recipe name ({', '.join(list_recipes())})")
