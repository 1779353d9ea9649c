"""Converters from upstream checkpoints to ``save_pretrained`` folders (``vla-blocks convert``).

- ``halo``: HALO / BAGEL ``ema.safetensors`` (BAGEL's Qwen2-MoT names: the und expert keeps Qwen2's names,
  the others carry ``_moe_gen`` / ``_moe_act`` suffixes) → the ``halo`` recipe (experts und / gen / act).
  The vocabulary size (and the action width, the act expert's FFN size) is taken from the tensors; the fixed
  sin-cos tables ``latent_pos_embed.pos_embed`` / ``vit_pos_embed.pos_embed`` are regenerated, not loaded
  (and compared with the checkpoint's). The FLUX VAE is not in ``ema.safetensors``: ``--vae ae.safetensors``
  (FLUX/LDM names, converted with diffusers' mapping, or diffusers names).
- ``pi0`` / ``pi05``: lerobot's PyTorch pi0 / pi0.5 ``model.safetensors`` (``model.paligemma_with_expert.
  paligemma.model.{vision_tower, multi_modal_projector, language_model}``, ``...gemma_expert.model.layers``,
  ``model.action_in_proj`` …; transformers 4.x and 5.x layouts) → the ``pi0`` / ``pi05`` recipes (experts
  vlm / act). Normalisation statistics next to the weights (lerobot's normalizer-processor safetensors, or
  openpi's ``norm_stats.json``) are carried over.
- ``pi0-jax`` / ``pi05-jax`` / ``acot-jax``: openpi / ACoT-VLA JAX ``params`` trees (a ``.npz`` of the flattened
  ``/`` names, or an orbax folder with ``vla-blocks[orbax]``; :mod:`vla_blocks.models.openpi_convert`) → the
  ``pi0`` / ``pi05`` / ``acot-libero`` recipes, with ``flow.numerics: jax`` by default.

Recipe fields come from the upstream config files beside the weights (lerobot's ``config.json``: chunk size,
tokenizer length, cameras, state / action dims, normalisation, pi0 vs pi0.5; BAGEL's ``llm_config.json`` /
``vit_config.json``) and from the tensors (widths, depths, heads, head_dim, vocabulary), then the overrides; two of
them disagreeing on a field is an error listing every such field (:func:`recipe_fields`). A tokenizer in the
source folder is copied into ``OUT/tokenizer`` (HALO's recipe points at it), so the folder needs nothing else.
The model-specific knowledge lives beside each model (:mod:`vla_blocks.models.halo.convert`,
:mod:`vla_blocks.models.pi0_convert`, :mod:`vla_blocks.models.openpi_convert`); the old names stay importable here.

Every source key is mapped, dropped for a stated reason (regenerated table, tied LM head, unused expert LM
head, RoPE buffer), or reported: unmapped keys are an error listing them unless ``allow_unmapped``. Target
tensors no source key fills are an error too (unless ``allow_missing`` prefixes). Tensors go through fp32;
the model is built on the meta device (no random initialisation), loaded strictly and saved with
:func:`vla_blocks.hub.save_pretrained`. Example::

    vla-blocks convert pi05 hf-hub:lerobot/pi05_base ./pi05_base
    vla-blocks convert halo hf-hub:qshou-coder/halo_pt_weight ./halo --vae hf-hub:ByteDance-Seed/BAGEL-7B-MoT
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from .config import ConfigError, load_recipe, parse_override
from .hub import CorruptCheckpointError, _matches_prefix, _progress, load_weights, save_pretrained
from .registry import Registry

logger = logging.getLogger(__name__)


class ConversionError(ValueError):
    """Source keys without a mapping, target tensors without a source, or shape mismatches; the message lists them."""


# ---------------------------------------------------------------------------------------------- sources
class SourceCheckpoint:
    """Lazy reader over one or more safetensors files; later files override earlier ones (a fine-tune over a
    pre-train). ``tensor(key)`` returns fp32 for floating tensors."""

    def __init__(self, files: Iterable[Path]):
        from safetensors import safe_open
        self.files = [Path(f) for f in files]
        if not self.files:
            raise FileNotFoundError("no safetensors files to convert")
        self._where: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for f in self.files:
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
                for k in h.keys():
                    sl = h.get_slice(k)
                    self.shapes[k] = tuple(sl.get_shape())
                    self.dtypes[k] = sl.get_dtype()
                    self._where[k] = (h, f)
            except Exception as e:
                raise CorruptCheckpointError(f"{f}: cannot read this safetensors file ({e}); it is truncated or "
                                             f"corrupt: download it again") from e

    def keys(self) -> list[str]:
        """The tensor names of the source checkpoint (every file)."""
        return list(self.shapes)

    def __contains__(self, key) -> bool:
        return key in self.shapes

    def tensor(self, key: str) -> torch.Tensor:
        """Read one tensor (floating point as float32); :class:`CorruptCheckpointError` names the file when it cannot be
        read."""
        h, f = self._where[key]
        try:
            t = h.get_tensor(key)
        except Exception as e:
            raise CorruptCheckpointError(f"{f}: cannot read tensor {key!r} ({e})") from e
        return t.float() if t.is_floating_point() else t

    def __repr__(self):
        return " + ".join(str(f) for f in self.files)


#: small files fetched beside the weights (configs, normalisation statistics)
_SIDE_PATTERNS = ["*.json", "policy_*processor*.safetensors", "assets/*/norm_stats.json"]


def source_files(src: str | os.PathLike, prefer: Iterable[str] = ("ema.safetensors", "model.safetensors"),
                 *, revision: str | None = None, cache_dir: str | None = None) -> list[Path]:
    """The weight files of ``src``: a ``.safetensors`` file, a folder (an index's shards, or one of ``prefer``),
    or ``hf-hub:org/name[@rev]`` (downloaded; offline: from the cache)."""
    src = str(src)
    if src.startswith("hf-hub:"):
        from .model import parse_model_ref
        ref = parse_model_ref(src)
        folder = _download_any(ref.target, ref.revision or revision, cache_dir, prefer)
    else:
        folder = Path(src).expanduser()
        if folder.is_file():
            return [folder]
        if not folder.exists():
            raise FileNotFoundError(f"{src}: no such file or folder (give a .safetensors file, a folder or "
                                    f"hf-hub:org/name)")
    for name in prefer:
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorruptCheckpointError(f"{index}: not a valid safetensors index") from e
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CorruptCheckpointError(f"{index} lists shards missing from {folder}: {missing}")
            return [folder / s for s in shards]
        if (folder / name).is_file():
            return [folder / name]
    found = sorted(folder.glob("*.safetensors"))
    weights = [f for f in found if not f.name.startswith(("policy_", "ae."))]
    if len(weights) == 1:
        return weights
    raise FileNotFoundError(f"{folder}: expected one of {list(prefer)} (or their .index.json); found "
                            f"{[f.name for f in found] or 'no safetensors files'}")


def _download_any(repo_id: str, revision: str | None, cache_dir: str | None, prefer: Iterable[str]) -> Path:
    """Download only the first of ``prefer`` the repo has (with its index and shards) plus the small side files;
    offline, the cached snapshot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    from .hub import _offline
    rev = f" --revision {revision}" if revision else ""
    try:
        folder = None
        for name in prefer:
            stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
            folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                            allow_patterns=[name, f"{name}.index.json", f"{stem}-*-of-*.safetensors",
                                                            *_SIDE_PATTERNS], library_name="vla_blocks"))
            if (folder / name).is_file() or (folder / f"{name}.index.json").is_file():
                break
        return folder
    except hf_errors.LocalEntryNotFoundError as e:
        state = "HF_HUB_OFFLINE=1" if _offline() else "the Hub could not be reached"
        raise FileNotFoundError(f"hf-hub:{repo_id} is not in the local Hub cache and {state}: set HF_HUB_OFFLINE=0 "
                                f"to download it, or pre-download it while online with `hf download {repo_id}{rev}`"
                                ) from e
    except hf_errors.RepositoryNotFoundError as e:
        raise FileNotFoundError(f"hf-hub:{repo_id}: no such Hub repo, or it is private/gated: check the name and "
                                f"log in (`hf auth login` or HF_TOKEN)") from e
    except hf_errors.HfHubHTTPError as e:
        raise FileNotFoundError(f"hf-hub:{repo_id}: download failed ({e})") from e


# ---------------------------------------------------------------------------------------------- key maps
# A key map returns (target_key, None) to map, (None, reason) to drop with a reason, (None, None) if unmapped.
KeyMap = Callable[[str], "tuple[str | None, str | None]"]

_ROPE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# the model-specific knowledge lives beside each model; re-exported here under the old names
from .models.halo.convert import (HALO_CONFIG_FILES, QWEN2_TOKENIZER_FILES, halo_key_map,  # noqa: E402
                                  infer_halo, read_halo_configs)
from .models.openpi_convert import EXPERTS, JaxTreeSource, infer_openpi, read_jax_tree  # noqa: E402
from .models.pi0_convert import (PALIGEMMA_TOKENIZER_FILES, infer_pi0, lerobot_pi0_key_map,  # noqa: E402
                                 read_lerobot_config)


# ---------------------------------------------------------------------------------------------- specs
@dataclass
class ConverterSpec:
    """One upstream format: the default recipe, the key map, the recipe fields read from the upstream config files
    (``read_config(folder) -> (fields, facts)``) and off the tensors (``infer(shapes, facts)``), and extras.
    ``tokenizer_files``: tokenizer files carried into the converted folder when the source has them;
    ``tokenizer_field``: the recipe field that then points at them (None: the model takes no tokenizer)."""

    name: str
    recipe: str
    key_map: Callable[[Any, Any], KeyMap]  # (model config, source) -> key map
    infer: Callable[[Mapping[str, tuple], dict], dict[str, Any]]
    read_config: Callable[[Path], tuple[dict[str, Any], dict[str, Any]]] | None = None
    prefer: tuple[str, ...] = ("model.safetensors",)
    base_models: tuple[str, ...] = ()
    regenerate: tuple[str, ...] = ()  # target tensors rebuilt by their module's reset_parameters()
    tokenizer_files: tuple[str, ...] = ()
    tokenizer_field: str | None = None
    load_source: Callable[[str], Any] | None = None  # a non-safetensors source (openpi / ACoT JAX trees)
    defaults: dict[str, Any] = field(default_factory=dict)  # recipe fields below config / tensors / overrides
    description: str = ""


def _halo_config(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    return read_halo_configs(folder), {}


def _jax_source(src: str) -> JaxTreeSource:
    return JaxTreeSource(read_jax_tree(src), label=str(src))


def _jax_spec(name: str, recipe: str, acot: bool, description: str) -> ConverterSpec:
    experts = EXPERTS["acot" if acot else "pi0"]
    return ConverterSpec(name, recipe, lambda cfg, src: src.key_map(experts),
                         lambda shapes, facts: infer_openpi(shapes, acot), load_source=_jax_source,
                         defaults={"flow.numerics": "jax"}, description=description)


#: Checkpoint converters by kind (a :class:`~vla_blocks.registry.Registry`: plug-ins add kinds through the entry-point
#: group ``vla_blocks.converters``, e.g. a module calling ``CONVERTERS.register("my-kind", ConverterSpec(...))``).
CONVERTERS: Registry[ConverterSpec] = Registry("converter", group="vla_blocks.converters")
_BUILTIN_CONVERTERS = {
    "halo": ConverterSpec(
        "halo", "halo", lambda cfg, src: halo_key_map(list(cfg.experts)), lambda shapes, facts: infer_halo(shapes),
        read_config=_halo_config, prefer=("ema.safetensors", "model.safetensors"),
        base_models=("qshou-coder/halo_pt_weight",),
        regenerate=("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"),
        tokenizer_files=QWEN2_TOKENIZER_FILES, tokenizer_field="tokenizer.path",
        description="HALO / BAGEL checkpoint (BAGEL Qwen2-MoT names, `_moe_gen` / `_moe_act` experts)"),
    "pi0": ConverterSpec(
        "pi0", "pi0", lambda cfg, src: lerobot_pi0_key_map(),
        lambda shapes, facts: infer_pi0(shapes, facts.get("head_dim")), read_config=read_lerobot_config,
        base_models=("lerobot/pi0_base",), tokenizer_files=PALIGEMMA_TOKENIZER_FILES,
        description="lerobot PyTorch pi0 checkpoint"),
    "pi05": ConverterSpec(
        "pi05", "pi05", lambda cfg, src: lerobot_pi0_key_map(),
        lambda shapes, facts: infer_pi0(shapes, facts.get("head_dim")), read_config=read_lerobot_config,
        base_models=("lerobot/pi05_base",), tokenizer_files=PALIGEMMA_TOKENIZER_FILES,
        description="lerobot PyTorch pi0.5 checkpoint"),
    "pi0-jax": _jax_spec("pi0-jax", "pi0", False, "openpi JAX pi0 params tree"),
    "pi05-jax": _jax_spec("pi05-jax", "pi05", False, "openpi JAX pi0.5 params tree"),
    "acot-jax": _jax_spec("acot-jax", "acot-libero", True, "ACoT-VLA JAX params tree (`_1` EAR, `_2` action expert)"),
}
for _kind, _spec in _BUILTIN_CONVERTERS.items():
    CONVERTERS.register(_kind, _spec)


def converter(kind: str) -> ConverterSpec:
    """The registered converter ``kind``; a :class:`ConfigError` naming the closest kinds otherwise."""
    try:
        return CONVERTERS.get(kind)
    except KeyError as e:
        raise ConfigError(str(e)) from None


def recipe_fields(kind: str, shapes: Mapping[str, Iterable[int]], config_dir: str | os.PathLike | None = None,
                  overrides: Mapping[str, Any] | list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The recipe fields a conversion sets: read from the upstream config files in ``config_dir`` (lerobot's
    ``config.json``; BAGEL's ``llm_config.json`` / ``vit_config.json``), off the tensor ``shapes``, and the
    ``overrides``, merged in that order → ``(fields, facts)``. A field two of them set to different values is a
    :class:`ConversionError` listing every such field with its values."""
    spec = converter(kind)
    if isinstance(overrides, (list, tuple)):
        overrides = dict(parse_override(o) for o in overrides)
    overrides = dict(overrides or {})
    from_config, facts = ({}, {})
    if config_dir is not None and spec.read_config is not None:
        try:
            from_config, facts = spec.read_config(Path(config_dir))
        except ValueError as e:
            raise ConversionError(str(e)) from e
    if "pi05" in from_config and kind in ("pi0", "pi05") and from_config["pi05"] != (kind == "pi05"):
        raise ConversionError(f"{config_dir}: config.json is a {facts.get('type')} policy; convert it as "
                              f"`{facts.get('type')}`, not `{kind}`")
    from_tensors = spec.infer({k: tuple(v) for k, v in shapes.items()}, facts)
    if kind in ("pi0-jax", "pi05-jax") and "pi05" in from_tensors and from_tensors["pi05"] != (kind == "pi05-jax"):
        right = "pi05-jax" if from_tensors["pi05"] else "pi0-jax"
        raise ConversionError(f"the tree's action expert has {'adaRMS' if from_tensors['pi05'] else 'plain RMS'} "
                              f"norms: it is a {right[:-4]} tree; convert it as `{right}`, not `{kind}`")
    sources = {"config": from_config, "tensors": from_tensors, "override": overrides}
    conflicts = []
    for key in sorted(set().union(*sources.values())):
        vals = {name: src[key] for name, src in sources.items() if key in src}
        if len({json.dumps(v, sort_keys=True, default=str) if not isinstance(v, (int, float)) or isinstance(v, bool)
                else float(v) for v in vals.values()}) > 1:
            conflicts.append(f"  {key}: " + ", ".join(f"{n}={v!r}" for n, v in vals.items()))
    if conflicts:
        raise ConversionError("the upstream config, the tensors and the overrides disagree:\n" + "\n".join(conflicts))
    return {**spec.defaults, **from_config, **from_tensors, **overrides}, facts


# ---------------------------------------------------------------------------------------------- report
@dataclass
class ConversionReport:
    """What a conversion did: source key → target key, dropped source keys with reasons, unmapped source keys,
    target keys regenerated / filled / left missing, shape mismatches, recipe overrides read off the tensors."""

    source: str
    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    regenerated: list[str] = field(default_factory=list)
    filled: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, str, tuple, tuple]] = field(default_factory=list)
    inferred: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """Human-readable report: tensors mapped, recipe values read off the tensors, dropped and filled tensors grouped
        by reason, regenerated ones, unmapped source keys, missing model tensors, shape mismatches and notes."""
        from .hub import _listing
        lines = [f"{len(self.mapped)} tensors mapped from {self.source}"
                 + (f"; recipe values read from the upstream config and tensors: {self.inferred}"
                    if self.inferred else "")]
        reasons: dict[str, int] = {}
        for r in self.dropped.values():
            reasons[r] = reasons.get(r, 0) + 1
        for r, n in reasons.items():
            lines.append(f"  {n} dropped: {r}")
        if self.regenerated:
            lines.append(f"  {len(self.regenerated)} regenerated: {', '.join(self.regenerated)}")
        fills: dict[str, int] = {}
        for r in self.filled.values():
            fills[r] = fills.get(r, 0) + 1
        for r, n in fills.items():
            lines.append(f"  {n} filled: {r}")
        lines += _listing("source keys without a mapping", self.unmapped)
        lines += _listing("model tensors without a source", self.missing)
        lines += _listing("shape mismatch", [f"{s} -> {t}: checkpoint {list(a)} vs model {list(b)}"
                                              for s, t, a, b in self.mismatched])
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = summary


# ---------------------------------------------------------------------------------------------- VAE
def convert_vae_state(sd: Mapping[str, torch.Tensor], vae_module: nn.Module) -> dict[str, torch.Tensor]:
    """A FLUX / LDM-style VAE state dict (``encoder.down.0.block.0...``, ``first_stage_model.`` or ``vae.``
    prefixes allowed) or a diffusers one (``encoder.down_blocks...``) → diffusers ``AutoencoderKL`` names."""
    keys = list(sd)
    if any(".down_blocks." in k or ".up_blocks." in k for k in keys):
        return dict(sd)
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    cfg = dict(vae_module.config)
    return convert_ldm_vae_checkpoint(dict(sd), cfg)


def _vae_files(vae: str) -> list[Path]:
    return source_files(vae, prefer=("ae.safetensors", "vae/diffusion_pytorch_model.safetensors",
                                     "diffusion_pytorch_model.safetensors"))


# ---------------------------------------------------------------------------------------------- normalisation
_STAT_NAMES = ("mean", "std", "q01", "q99")
_FEATURES = {"action": "actions", "actions": "actions", "observation.state": "state", "state": "state"}


def read_norm_stats(path: str | os.PathLike) -> dict[str, dict[str, list[float]]] | None:
    """Normalisation statistics: openpi's ``norm_stats.json`` (``{"norm_stats": {key: {mean, std, q01, q99}}}``)
    or lerobot's ``policy_*processor*normaliz*.safetensors`` (``<feature>.<stat>`` keys); ``path`` is such a file
    or a folder holding them. Features ``action(s)`` → ``actions``, ``observation.state`` / ``state`` →
    ``state``."""
    from safetensors.torch import load_file
    path = Path(path)
    if path.is_file():
        jsons = [path] if path.suffix == ".json" else []
        tensors = [path] if path.suffix == ".safetensors" else []
    else:
        jsons = sorted(path.glob("**/norm_stats.json"))[:1]
        tensors = sorted(path.glob("policy_*processor*normaliz*.safetensors"))
    out: dict[str, dict[str, list[float]]] = {}
    for f in jsons:
        data = json.loads(f.read_text())
        for k, st in (data.get("norm_stats", data) or {}).items():
            if k in _FEATURES and isinstance(st, dict):
                out[_FEATURES[k]] = {s: [float(x) for x in st[s]] for s in _STAT_NAMES if st.get(s) is not None}
    for f in tensors:
        for k, t in load_file(f).items():
            feat, _, stat = k.rpartition(".")
            if feat in _FEATURES and stat in _STAT_NAMES:
                out.setdefault(_FEATURES[feat], {})[stat] = t.float().reshape(-1).tolist()
    return out or None


def _apply_norm_stats(model: nn.Module, stats: dict, report: ConversionReport):
    from .normalize import STATS_OF_MODE, Normalizer
    norm = getattr(model, "normalizer", None)
    if not isinstance(norm, Normalizer):
        report.notes.append(f"normalisation statistics found for {sorted(stats)} but the model has no normalizer")
        return
    for key, st in stats.items():
        need = STATS_OF_MODE[norm.mode_of(key)]
        if not all(s in st for s in need):
            report.notes.append(f"statistics of {key!r} lack {list(need)} ({norm.mode_of(key)} mode): not used")
            continue
        norm.set_stats(key, **st)
    if norm.keys():
        report.notes.append(f"normalisation statistics carried over for {norm.keys()}")


# ---------------------------------------------------------------------------------------------- convert
def _adarms_fill(model: nn.Module, missing: list[str]) -> dict[str, str]:
    """Targets that legitimately have no upstream tensor: the fallback scale of adaRMS norms (upstream adaRMS
    norms have only the Dense; ours keeps an unused-with-cond ``weight`` that zero makes the identity)."""
    from .mot import AdaRMSNorm
    out = {}
    for k in missing:
        mod, _, name = k.rpartition(".")
        try:
            m = model.get_submodule(mod)
        except AttributeError:
            continue
        if isinstance(m, AdaRMSNorm) and name == "weight":
            out[k] = "adaRMS norm scale (upstream adaRMS norms have only the Dense): zeros"
    return out


def _regenerate(model: nn.Module, key: str) -> torch.Tensor:
    mod, _, name = key.rpartition(".")
    m = model.get_submodule(mod)
    if not hasattr(m, "reset_parameters"):
        raise ConversionError(f"{key}: its module {type(m).__name__} cannot regenerate it (no reset_parameters)")
    if any(t.is_meta for t in m.parameters(recurse=False)) or any(t.is_meta for t in m.buffers(recurse=False)):
        m.to_empty(device="cpu", recurse=False)
    m.reset_parameters()
    return getattr(m, name).detach().float().clone()


class ShapeSource:
    """Names and shapes only (no tensors): for :func:`check_mapping`."""

    def __init__(self, shapes: Mapping[str, Iterable[int]], dtypes: Mapping[str, str] | None = None):
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.dtypes = dict(dtypes or {})

    def keys(self) -> list[str]:
        """The tensor names."""
        return list(self.shapes)

    def __contains__(self, key) -> bool:
        return key in self.shapes


@dataclass
class _Plan:
    cfg: Any
    model: nn.Module  # on the meta device
    target: dict[str, tuple]
    plan: dict[str, str]  # target key -> source key
    regen: list[str]
    fills: dict[str, str]
    keep: list[str]
    report: ConversionReport


def _plan(kind: str, source, label: str, *, recipe: str | None, overrides, allow_unmapped: bool,
          allow_missing: Iterable[str], vae: Callable[[nn.Module, dict, ConversionReport], dict] | None = None,
          config_dir: Path | None = None) -> tuple[_Plan, dict[str, torch.Tensor]]:
    """Names and shapes: map every source key, or drop it with a reason, or report it; then account for every
    model tensor. Raises :class:`ConversionError` listing the problems."""
    spec = converter(kind)
    report = ConversionReport(source=label)
    if isinstance(overrides, (list, tuple)):
        overrides = dict(parse_override(o) for o in overrides)
    fields, report.facts = recipe_fields(kind, getattr(source, "raw_shapes", source.shapes), config_dir, overrides)
    report.inferred = {k: v for k, v in fields.items() if k not in (overrides or {}) and k not in spec.defaults}
    cfg = load_recipe(recipe or spec.recipe, fields)
    allow_missing = list(allow_missing)
    with torch.device("meta"):
        model = cfg.build()
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    key_map = spec.key_map(cfg, source)
    plan: dict[str, str] = {}
    for k in source.keys():
        t, reason = key_map(k)
        if t is None:
            if reason:
                report.dropped[k] = reason
            else:
                report.unmapped.append(k)
        elif t not in target:
            report.unmapped.append(k)
        elif tuple(source.shapes[k]) != target[t]:
            report.mismatched.append((k, t, tuple(source.shapes[k]), target[t]))
        else:
            plan[t] = k
            report.mapped[k] = t
    extra = vae(model, target, report) if vae is not None else {}
    # model tensors without a source: regenerated tables, adaRMS scales, allowed (kept), or missing
    todo = [t for t in target if t not in plan and t not in extra]
    regen = [t for t in todo if t in spec.regenerate]
    fills = _adarms_fill(model, [t for t in todo if t not in regen])
    keep = [t for t in todo if t not in regen and t not in fills and _matches_prefix(t, allow_missing)]
    report.missing = [t for t in todo if t not in regen and t not in fills and t not in keep]
    report.filled = fills
    problems = []
    if report.unmapped and not allow_unmapped:
        problems.append("unmapped source keys (pass --allow-unmapped / allow_unmapped=True to drop them)")
        hint = _kind_hint(kind, source)
        if hint:
            problems.append(hint)
    if report.missing:
        problems.append("model tensors with no source (a wrong --recipe? HALO's VAE needs --vae; pass "
                        "--allow-missing PREFIX to keep the recipe's initialisation for them)")
    if report.mismatched:
        problems.append("shape mismatches (a wrong --recipe or overrides?)")
    if problems:
        raise ConversionError(f"cannot convert {label} as {kind} into recipe "
                              f"{recipe or spec.recipe}: {'; '.join(problems)}\n{report.summary()}")
    return _Plan(cfg, model, target, plan, regen, fills, keep, report), extra


def check_mapping(kind: str, shapes: Mapping[str, Iterable[int]], *, recipe: str | None = None,
                  overrides: Mapping[str, Any] | list[str] | None = None, allow_unmapped: bool = False,
                  allow_missing: Iterable[str] = (), config_dir: str | os.PathLike | None = None) -> ConversionReport:
    """The names-and-shapes pass of :func:`convert` on ``{source key: shape}`` (no tensors, the model on the meta
    device): check that a full-size checkpoint layout maps onto a recipe (``config_dir``: a folder with the
    upstream config files). Raises :class:`ConversionError`."""
    if kind in CONVERTERS and CONVERTERS[kind].load_source is not None:  # a JAX tree: zero-stride stand-ins
        import numpy as np
        src = JaxTreeSource({k: np.broadcast_to(np.float32(0), tuple(v)) for k, v in shapes.items()}, "<shapes>")
    else:
        src = ShapeSource(shapes)
    p, _ = _plan(kind, src, "<shapes>", recipe=recipe, overrides=overrides,
                 allow_unmapped=allow_unmapped, allow_missing=allow_missing,
                 config_dir=Path(config_dir) if config_dir is not None else None)
    p.report.regenerated = list(p.regen)
    return p.report


def convert(kind: str, src: str | os.PathLike, out: str | os.PathLike, *, recipe: str | None = None,
            overrides: Mapping[str, Any] | list[str] | None = None, overlays: Iterable[str] = (),
            vae: str | None = None, norm_stats: str | None = None, allow_unmapped: bool = False,
            allow_missing: Iterable[str] = (), max_shard_size: int | str = "5GB", progress: bool | None = None,
            revision: str | None = None, cache_dir: str | None = None) -> tuple[Path, ConversionReport]:
    """Convert an upstream checkpoint (``kind`` in :data:`CONVERTERS`) into a ``save_pretrained`` folder ``out``.

    ``src``: a ``.safetensors`` file, a folder, or ``hf-hub:org/name[@rev]``; ``overlays``: more sources whose
    tensors replace ``src``'s (HALO's fine-tune over the pre-train). ``recipe`` (default: the kind's full recipe)
    plus ``overrides``; the vocabulary size and a few widths are read off the tensors first (overrides win).
    ``vae``: a VAE checkpoint (HALO). ``norm_stats``: a folder / file with normalisation statistics (default:
    looked for beside ``src``). Raises :class:`ConversionError` listing unmapped source keys (unless
    ``allow_unmapped``), model tensors without a source (unless under ``allow_missing`` prefixes, which keep
    the recipe's initialisation) and shape mismatches. Returns the folder and a :class:`ConversionReport`.
    """
    spec = converter(kind)
    if spec.load_source is not None:
        if overlays or vae:
            raise ConversionError(f"{kind}: overlays and --vae are not used by JAX trees")
        source = spec.load_source(str(src))
        p_src = Path(src).expanduser()
        files = [p_src if p_src.is_file() else p_src / "params"]
    else:
        files = source_files(src, spec.prefer, revision=revision, cache_dir=cache_dir)
        for o in overlays:
            files += source_files(o, spec.prefer, cache_dir=cache_dir)
        source = SourceCheckpoint(files)
    label = str(src) + "".join(f" + {o}" for o in overlays)

    def vae_from_file(model, target, report):
        from safetensors.torch import load_file
        raw = {}
        for f in _vae_files(vae):
            raw.update(load_file(f))
        vae_mod = _find_vae(model)
        prefix = _module_name(model, vae_mod) + "."
        out_state = {}
        for k, v in convert_vae_state(raw, vae_mod).items():
            t = prefix + k
            if t not in target:
                report.unmapped.append(f"{vae}:{k}")
            elif tuple(v.shape) != target[t]:
                report.mismatched.append((f"{vae}:{k}", t, tuple(v.shape), target[t]))
            else:
                out_state[t] = v.float()
                report.mapped[f"{vae}:{k}"] = t
        return out_state

    src_dir = files[0].parent
    tok_files = [src_dir / f for f in spec.tokenizer_files if (src_dir / f).is_file()]
    if isinstance(overrides, (list, tuple)):
        overrides = dict(parse_override(o) for o in overrides)
    overrides = dict(overrides or {})
    if tok_files and spec.tokenizer_field and spec.tokenizer_field not in overrides:
        overrides[spec.tokenizer_field] = str(src_dir)  # build with the source's tokenizer; saved as ./tokenizer
    p, vae_state = _plan(kind, source, label, recipe=recipe, overrides=overrides, allow_unmapped=allow_unmapped,
                         allow_missing=allow_missing, vae=vae_from_file if vae is not None else None,
                         config_dir=src_dir)
    cfg, model, target, plan, regen, fills, keep, report = (p.cfg, p.model, p.target, p.plan, p.regen, p.fills,
                                                            p.keep, p.report)

    # 4. tensors (fp32), then a strict load into the model
    if keep:  # these keep the recipe's own initialisation: build the model for real
        model = cfg.build()
    state: dict[str, torch.Tensor] = {}
    order = list(plan.items())
    for t, k in _progress(order, len(order), f"converting {kind}", progress):
        state[t] = source.tensor(k)
    state.update(vae_state)
    for t in regen:
        state[t] = _regenerate(model, t)
        report.regenerated.append(t)
        if t in source:
            _compare_table(source, t, state[t], report)
    for t in fills:
        state[t] = torch.zeros(target[t])
    load_weights(model, state, strict=True, only=None if not keep else [t for t in target if t not in keep],
                 progress=False)
    # 5. normalisation statistics and checks
    stats = read_norm_stats(norm_stats if norm_stats else files[0].parent)
    if stats:
        _apply_norm_stats(model, stats, report)
    _check_tied_head(source, report)
    card = {"tags": ["converted", kind],
            "description": f"Converted with `vla-blocks convert {kind}` from {report.source} "
                           f"({spec.description}).\n\n```text\n{report.summary()}\n```"}
    if spec.base_models and str(src).startswith("hf-hub:"):
        card["base_model"] = str(src)[len("hf-hub:"):].split("@")[0]
    folder = save_pretrained(model, out, max_shard_size=max_shard_size, card_kwargs=card)
    if tok_files:
        _carry_tokenizer(folder, tok_files, spec, report)
    logger.info("converted %s: %s", kind, report.summary())
    return folder, report


def _carry_tokenizer(folder: Path, files: list[Path], spec: ConverterSpec, report: ConversionReport):
    """Copy the source's tokenizer files into ``folder/tokenizer`` and point the saved config at them (a path
    relative to the folder, resolved when the folder is loaded)."""
    import shutil
    dest = Path(folder) / "tokenizer"
    dest.mkdir(exist_ok=True)
    for f in files:
        shutil.copyfile(f, dest / f.name)
    report.notes.append(f"tokenizer carried: {', '.join(f.name for f in files)} -> tokenizer/")
    if spec.tokenizer_field:
        cfg_path = Path(folder) / "config.json"
        data = json.loads(cfg_path.read_text())
        node = data
        *parents, leaf = spec.tokenizer_field.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = "tokenizer"
        cfg_path.write_text(json.dumps(data, indent=2))


def _kind_hint(kind: str, source: SourceCheckpoint) -> str | None:
    keys = " ".join(source.keys())
    if kind == "pi05" and ("state_proj." in keys or "action_time_mlp_in." in keys):
        return "this looks like a pi0 checkpoint (state_proj / action_time_mlp_*): use `convert pi0`"
    if kind == "pi0" and "time_mlp_in." in keys.replace("action_time_mlp_in.", ""):
        return "this looks like a pi0.5 checkpoint (time_mlp_in, adaRMS norms): use `convert pi05`"
    if kind in ("pi0", "pi05") and "_moe_gen" in keys:
        return "this looks like a HALO/BAGEL checkpoint: use `convert halo`"
    if kind == "halo" and "paligemma_with_expert" in keys:
        return "this looks like a lerobot pi0/pi0.5 checkpoint: use `convert pi0` or `convert pi05`"
    return None


def _compare_table(source: SourceCheckpoint, key: str, table: torch.Tensor, report: ConversionReport):
    if tuple(source.shapes[key]) != tuple(table.shape):
        report.notes.append(f"{key}: the checkpoint's table is {list(source.shapes[key])}, the regenerated one "
                            f"{list(table.shape)} (the recipe's max size differs); the regenerated one is used")
        return
    diff = (source.tensor(key) - table).abs().max().item()
    tol = 1e-2 if source.dtypes[key] in ("BF16", "F16") else 1e-4
    if diff > tol:
        report.notes.append(f"{key}: the checkpoint's table differs from the regenerated one (max |diff| "
                            f"{diff:.3g}); the regenerated one is used")


def _check_tied_head(source: SourceCheckpoint, report: ConversionReport):
    heads = [k for k, r in report.dropped.items() if "tied to embed_tokens" in r]
    embeds = [k for k, t in report.mapped.items() if t.endswith("embed_tokens.weight")]
    if heads and embeds and source.shapes[heads[0]] == source.shapes[embeds[0]]:
        if not torch.equal(source.tensor(heads[0]), source.tensor(embeds[0])):
            report.notes.append(f"{heads[0]} differs from {embeds[0]}; the tied embedding is used for both")


def _find_vae(model: nn.Module) -> nn.Module:
    vae = getattr(model, "vae", None)
    if vae is None:
        raise ConfigError(f"{type(model).__name__} has no VAE (`vae` attribute); drop --vae")
    return getattr(vae, "vae", vae)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for n, m in model.named_modules():
        if m is module:
            return n
    raise KeyError("module not found in the model")


# ---------------------------------------------------------------------------------------------- CLI
def add_cli_arguments(p):
    """Options of ``vla-blocks convert``."""
    p.add_argument("kind", choices=sorted(CONVERTERS), help="upstream format: halo (HALO/BAGEL ema.safetensors), "
                   "pi0 / pi05 (lerobot PyTorch checkpoints), pi0-jax / pi05-jax / acot-jax (openpi / ACoT-VLA "
                   "JAX params trees)")
    p.add_argument("src", help="a .safetensors file, a folder, or hf-hub:org/name[@revision]; JAX kinds: a .npz of "
                   "the flattened tree or an orbax checkpoint folder")
    p.add_argument("out", help="output folder (written atomically, loadable with local-dir:OUT)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted recipe overrides")
    p.add_argument("--recipe", help="recipe to convert into (default: halo, pi0, pi05 or acot-libero)")
    p.add_argument("--overlay", action="append", default=[], metavar="SRC",
                   help="more weights whose tensors replace SRC's (e.g. HALO's fine-tune over the pre-train)")
    p.add_argument("--vae", help="VAE weights for halo (FLUX ae.safetensors, a folder or hf-hub:org/name)")
    p.add_argument("--norm-stats", help="normalisation statistics (openpi norm_stats.json or lerobot processor "
                   "safetensors; default: looked for beside SRC)")
    p.add_argument("--allow-unmapped", action="store_true", help="drop source keys that have no mapping")
    p.add_argument("--allow-missing", action="append", default=[], metavar="PREFIX",
                   help="model tensors under PREFIX may have no source (they keep the recipe's initialisation)")
    p.add_argument("--max-shard-size", default="5GB", help="shard the output above this size (default 5GB)")


def run_cli(args) -> int:
    """``vla-blocks convert``: convert an upstream checkpoint into a saved model folder, print the report and how to
    load it; a conversion error is one line on stderr (exit 2)."""
    import sys
    try:
        folder, report = convert(args.kind, args.src, args.out, recipe=args.recipe, overrides=args.overrides,
                                 overlays=args.overlay, vae=args.vae, norm_stats=args.norm_stats,
                                 allow_unmapped=args.allow_unmapped, allow_missing=args.allow_missing,
                                 max_shard_size=args.max_shard_size)
    except ConversionError as e:
        print(f"vla-blocks convert: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"wrote {folder}; load it with vla_blocks.create_model('local-dir:{folder}')")
    return 0



__all__ = ["convert", "converter", "check_mapping", "HALO_CONFIG_FILES", "ShapeSource", "CONVERTERS", "ConverterSpec", "ConversionReport", "ConversionError", "SourceCheckpoint",
           "source_files", "halo_key_map", "lerobot_pi0_key_map", "convert_vae_state", "read_norm_stats"]
