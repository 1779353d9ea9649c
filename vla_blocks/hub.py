"""Weights on the Hugging Face Hub and on disk: save / load / push, strict and partial loads.

A saved model is a folder (the same layout locally and on the Hub)::

    config.json                     the resolved recipe (``config.encode(model.config)``) + ``vla_blocks_version``
    model.safetensors               the state dict (or ``model-0000i-of-0000N.safetensors`` shards +
                                    ``model.safetensors.index.json`` above ``max_shard_size``)
    normalization.json              normalisation statistics of every ``Normalizer`` (if the model has one)
    README.md                       a model card (library ``vla_blocks``, tags ``robotics``, ``vla``)

References (:func:`from_pretrained`, ``create_model``): ``hf-hub:org/name[@revision]``, ``local-dir:path``,
a plain folder path, a recipe name or recipe path (built from the recipe, no weights file). Writes are
atomic: everything goes into a temporary folder beside the destination that is renamed into place.

Loading is strict by default: missing, unexpected or misshapen keys raise :class:`WeightsMismatchError`
listing them; ``strict=False`` loads what matches and returns / logs a :class:`LoadReport`. Partial loads
(:func:`load_weights`) swap parts between models:

- ``only=["lm.stack"]`` / ``exclude=[...]``: key prefixes of the *target* model to fill;
- ``key_map``: ``{target_prefix: source_prefix}`` or a callable ``target_key -> source_key | None``;
- ``expert_map={"ear": "act"}``: fill target expert ``ear`` from source expert ``act`` (every MoT layer and
  the final norm) — how upstream initialises new experts (BAGEL/HALO ``init_moe``, ACoT's EAR from pi0.5's
  action expert); one source tensor may fill several targets;
- ``allow_missing``: regexes of target keys that may stay at their initialisation in strict mode.

Example (offline, a local folder)::

    model = vla_blocks.create_model("mot-tiny")
    model.save_pretrained("/tmp/mot")
    same = vla_blocks.create_model("local-dir:/tmp/mot")      # or VLAModel.from_pretrained("/tmp/mot")
    model.push_to_hub("me/mot-tiny", private=True)            # needs the network and a token
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from .config import ConfigError, encode, load_recipe
from .refs import REPO_ID as _REPO_ID
from .refs import ModelRef, parse_model_ref, parse_ref  # noqa: F401  (re-exported: hub.parse_ref)

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
NORM_NAME = "normalization.json"
CARD_NAME = "README.md"
VERSION_KEY = "vla_blocks_version"
#: files of a saved model (download / upload patterns)
HUB_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "model-*-of-*.safetensors", NORM_NAME, CARD_NAME]
#: weight files a new save replaces (stale shards of an earlier save are removed)
_WEIGHT_PATTERNS = [WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "model-*-of-*.safetensors"]
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SHOW = 20  # keys listed per category in error messages


# ---------------------------------------------------------------------------------------------- errors
class WeightsMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model (strict load); ``.report`` has the details."""

    def __init__(self, message: str, report: "LoadReport"):
        super().__init__(message)
        self.report = report


class CorruptCheckpointError(ValueError):
    """A weights file or index cannot be read (truncated, corrupt, or a shard missing); the message names it."""


class HubAccessError(ConnectionError):
    """The Hub could not be reached or refused the request; the message says what to do."""


# ---------------------------------------------------------------------------------------------- report
@dataclass
class LoadReport:
    """What a load did. ``missing``: target keys with no source tensor (left at their initialisation);
    ``unexpected``: source keys nothing used; ``mismatched``: ``(key, source shape, target shape)``;
    ``allowed_missing``: missing keys matched by ``allow_missing``; ``remapped``: target key -> source key
    where they differ; ``skipped``: target keys outside ``only`` / ``exclude`` / dropped by ``key_map``."""

    source: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    allowed_missing: list[str] = field(default_factory=list)
    remapped: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is missing, unexpected or mismatched."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """Human-readable report: tensors matched, remapped, skipped, and every missing / unexpected / mismatched key.
        """
        parts = [f"{len(self.loaded)} tensors matched in {self.source}"]
        if self.remapped:
            parts.append(f"{len(self.remapped)} remapped")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped by the filters")
        if self.allowed_missing:
            parts.append(f"{len(self.allowed_missing)} allowed missing")
        lines = ["; ".join(parts)]
        lines += _listing("missing (left at initialisation)", self.missing)
        lines += _listing("unexpected (unused)", self.unexpected)
        lines += _listing("shape mismatch", [f"{k}: checkpoint {list(s)} vs model {list(t)}"
                                              for k, s, t in self.mismatched])
        return "\n".join(lines)

    __str__ = summary


def _listing(title: str, items: list[str]) -> list[str]:
    """``  N title:`` then one item per line (at most ``_SHOW``)."""
    if not items:
        return []
    lines = [f"  {len(items)} {title}:"] + [f"    {x}" for x in items[:_SHOW]]
    if len(items) > _SHOW:
        lines.append(f"    ... and {len(items) - _SHOW} more")
    return lines


# ---------------------------------------------------------------------------------------------- references


def _describe(ref: ModelRef) -> str:
    if ref.kind == "hf-hub":
        return f"hf-hub:{ref.target}" + (f"@{ref.revision}" if ref.revision else "")
    return f"{ref.kind}:{ref.target}"


def _not_a_model_folder(where: str) -> str:
    return (f"{where} has no {CONFIG_NAME}: it is not a vla_blocks model saved with save_pretrained. "
            f"For an upstream checkpoint (HALO/BAGEL ema.safetensors, lerobot pi0/pi05) convert it first with "
            f"`vla-blocks convert halo|pi0|pi05 SRC OUT`")


def _offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def resolve_folder(ref: str | os.PathLike | ModelRef, *, revision: str | None = None, cache_dir: str | None = None,
                   local_files_only: bool = False, token: str | bool | None = None,
                   force_download: bool = False) -> Path:
    """The local folder of a saved model: the folder itself, or the Hub snapshot (downloaded if needed).

    Only the files of a saved model are fetched (:data:`HUB_PATTERNS`). Offline (``HF_HUB_OFFLINE=1`` or
    ``local_files_only``) the Hub cache is used; a model not in it raises ``FileNotFoundError`` saying how to
    get it.
    """
    ref = parse_ref(ref)
    if ref.kind == "recipe":
        raise ConfigError(f"{ref.target!r} is a recipe, not a saved model folder")
    if ref.kind == "local-dir":
        folder = Path(ref.target).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"local-dir:{ref.target}: no such folder")
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(_not_a_model_folder(f"local-dir:{ref.target}"))
        return folder
    return _download(ref.target, ref.revision or revision, cache_dir=cache_dir, local_files_only=local_files_only,
                     token=token, force_download=force_download)


def _download(repo_id: str, revision: str | None, *, cache_dir=None, local_files_only=False, token=None,
              force_download=False, patterns: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    from ._version import __version__
    where = f"hf-hub:{repo_id}" + (f"@{revision}" if revision else "")
    rev = f" --revision {revision}" if revision else ""
    how = (f"set HF_HUB_OFFLINE=0 (and drop local_files_only) to download it, or pre-download it while online with "
           f"`hf download {repo_id}{rev}` (or huggingface_hub.snapshot_download) into the same cache "
           f"(HF_HUB_CACHE / cache_dir)")
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                 token=token, force_download=force_download, allow_patterns=patterns or HUB_PATTERNS,
                                 library_name="vla_blocks", library_version=__version__)
    except hf_errors.GatedRepoError as e:
        raise FileNotFoundError(f"{where} is gated: accept its terms at https://huggingface.co/{repo_id} and log in "
                                f"(`hf auth login` or HF_TOKEN)") from e
    except hf_errors.RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{where}: no such Hub repo, or it is private: check the name, or log in with "
                                f"`hf auth login` (or set HF_TOKEN) if it is yours") from e
    except hf_errors.RevisionNotFoundError as e:
        raise FileNotFoundError(f"{where}: revision {revision!r} does not exist in {repo_id}") from e
    except hf_errors.LocalEntryNotFoundError as e:
        state = "HF_HUB_OFFLINE=1" if _offline() else ("local_files_only=True" if local_files_only else
                                                         "the Hub could not be reached")
        raise FileNotFoundError(f"{where} is not in the local Hub cache and {state}: {how}") from e
    except hf_errors.HfHubHTTPError as e:
        raise FileNotFoundError(f"{where}: download failed ({e}); check the network and your token") from e
    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file():
        if _offline() or local_files_only:
            raise FileNotFoundError(f"{where}: the cached snapshot {folder} has no {CONFIG_NAME}; {how}")
        raise FileNotFoundError(_not_a_model_folder(where))
    return folder


# ---------------------------------------------------------------------------------------------- config
def read_config_data(folder: str | os.PathLike) -> dict:
    """The recipe data stored in ``folder/config.json`` (without the version key)."""
    f = Path(folder) / CONFIG_NAME
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{f}: not valid JSON ({e}); save the model again") from e
    if not isinstance(data, dict) or "type" not in data:
        raise ConfigError(f"{f}: not a vla_blocks config (a mapping with a 'type' key naming the model)")
    saved = data.pop(VERSION_KEY, None)
    from ._version import __version__
    if saved and _version_tuple(saved)[:2] > _version_tuple(__version__)[:2]:
        logger.warning("%s was saved by vla_blocks %s, newer than this %s; loading may fail", f, saved, __version__)
    return data


def _version_tuple(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else 0 for x in re.findall(r"\d+", str(v))[:3])


def load_config(ref, overrides: Mapping[str, Any] | list[str] | None = None, *, revision: str | None = None,
                cache_dir: str | None = None, local_files_only: bool = False, token=None, force_download: bool = False):
    """The typed config of a saved model (``hf-hub:``, ``local-dir:``, a folder) or a recipe, with dotted overrides.

    For a Hub model only ``config.json`` is fetched.
    """
    ref = parse_ref(ref)
    if ref.kind == "recipe":
        return load_recipe(ref.target, overrides)
    if ref.kind == "hf-hub":
        folder = _download(ref.target, ref.revision or revision, cache_dir=cache_dir,
                           local_files_only=local_files_only, token=token, force_download=force_download,
                           patterns=[CONFIG_NAME])
    else:
        folder = resolve_folder(ref)
    return _config_from_folder(folder, overrides)


def _config_from_folder(folder: Path, overrides=None):
    data = read_config_data(folder)
    tok = data.get("tokenizer")
    if isinstance(tok, dict) and isinstance(tok.get("path"), str) and not Path(tok["path"]).is_absolute() \
            and (Path(folder) / tok["path"]).exists():  # a tokenizer carried inside the folder (vla-blocks convert)
        tok["path"] = str(Path(folder) / tok["path"])
    try:
        return load_recipe(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{Path(folder) / CONFIG_NAME}: {e}") from e


def portable_config(cfg):
    """A copy of ``cfg`` that needs no local files: ``pretrained`` paths of backbones / vision towers / VAEs
    are replaced by the architecture config they point to (the weights are in the saved state dict)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        if isinstance(cfg, dict):
            return {k: portable_config(v) for k, v in cfg.items()}
        if isinstance(cfg, list):
            return [portable_config(v) for v in cfg]
        return cfg
    changes = {}
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        v = getattr(cfg, f.name)
        nv = portable_config(v)
        if nv is not v:
            changes[f.name] = nv
    names = {f.name for f in dataclasses.fields(cfg)}
    pretrained = getattr(cfg, "pretrained", None)
    if pretrained and "config" in names:
        arch = _architecture_of(cfg, pretrained)
        if arch is not None:
            changes.update(pretrained=None, config=arch)
            if "subfolder" in names:
                changes["subfolder"] = None
        else:
            logger.warning("%s.pretrained=%r could not be made portable: loading the saved model will need that "
                           "path", type(cfg).__name__, pretrained)
    return dataclasses.replace(cfg, **changes) if changes else cfg


_HF_CONFIG_DROP = ("architectures", "transformers_version", "_name_or_path", "model_type", "torch_dtype", "dtype",
                   "_attn_implementation_autoset", "_commit_hash", "output_hidden_states", "use_cache")


def _architecture_of(cfg, pretrained: str) -> dict | None:
    try:
        if hasattr(cfg, "hf_config"):  # transformers causal LM backbone
            d = cfg.hf_config().to_dict()
        else:
            sub = getattr(cfg, "subfolder", None)
            f = Path(pretrained) / (sub or "") / CONFIG_NAME
            d = json.loads(f.read_text())
            if isinstance(d.get("vision_config"), dict):  # a full SigLIP checkpoint: keep the vision part
                d = d["vision_config"]
        extra = getattr(cfg, "config", None) or {}
        d = {k: v for k, v in d.items() if k not in _HF_CONFIG_DROP and not k.startswith("_")}
        d.update(extra)
        return d
    except Exception as e:  # noqa: BLE001 - best effort, reported by the caller
        logger.debug("no architecture config for %s: %s", pretrained, e)
        return None


# ---------------------------------------------------------------------------------------------- checkpoint files
class Checkpoint:
    """Lazy view of a folder's safetensors weights (single file or sharded with an index).

    ``shapes``: key -> shape; ``files``: key -> file; ``tensor(key)``. Unreadable files raise
    :class:`CorruptCheckpointError` naming the file.
    """

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open
        self.folder = Path(folder)
        index = self.folder / WEIGHTS_INDEX_NAME
        single = self.folder / WEIGHTS_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                assert isinstance(weight_map, dict)
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
                raise CorruptCheckpointError(f"{index}: not a valid safetensors index (no 'weight_map'); "
                                             f"save or download the model again") from e
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.folder / n).is_file()]
            if missing:
                raise CorruptCheckpointError(f"{index} lists shards that are not in {self.folder}: {missing}; "
                                             f"the download or copy is incomplete: fetch the folder again")
        elif single.is_file():
            weight_map, names = None, [WEIGHTS_NAME]
        else:
            raise FileNotFoundError(f"{self.folder} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}; "
                                    f"save the model with save_pretrained")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.files: dict[str, Path] = {}
        self._handles = {}
        for n in names:
            path = self.folder / n
            try:
                h = safe_open(str(path), framework="pt", device="cpu")
                keys = list(h.keys())
                for k in keys:
                    sl = h.get_slice(k)
                    self.shapes[k] = tuple(sl.get_shape())
                    self.dtypes[k] = sl.get_dtype()
                    self.files[k] = path
            except Exception as e:  # safetensors raises SafetensorError (not exported uniformly) or OSError
                raise CorruptCheckpointError(f"{path}: cannot read this safetensors file ({e}); it is truncated or "
                                             f"corrupt: delete it and save again, or download again "
                                             f"(force_download=True / `hf download --force-download`)") from e
            self._handles[path] = h
        if weight_map is not None:
            wrong = [k for k, n in weight_map.items() if self.files.get(k) != self.folder / n]
            if wrong:
                raise CorruptCheckpointError(f"{index} does not match its shards for {len(wrong)} keys "
                                             f"(e.g. {wrong[:5]}); save or download the model again")

    def keys(self) -> list[str]:
        """The tensor names of the checkpoint."""
        return list(self.shapes)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def tensor(self, key: str) -> torch.Tensor:
        """Read one tensor; :class:`CorruptCheckpointError` names the file when it cannot be read."""
        path = self.files[key]
        try:
            return self._handles[path].get_tensor(key)
        except Exception as e:
            raise CorruptCheckpointError(f"{path}: cannot read tensor {key!r} ({e}); the file is corrupt: "
                                         f"save or download it again") from e

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the checkpoint, read in full."""
        return {k: self.tensor(k) for k in self.keys()}


class _DictSource:
    """A state dict with the :class:`Checkpoint` interface."""

    def __init__(self, sd: Mapping[str, torch.Tensor], name: str = "<state dict>"):
        self.sd = dict(sd)
        self.folder = name
        self.shapes = {k: tuple(v.shape) for k, v in self.sd.items()}

    def keys(self):
        return list(self.sd)

    def __contains__(self, key):
        return key in self.sd

    def tensor(self, key):
        return self.sd[key]


# ---------------------------------------------------------------------------------------------- key mapping
def expert_key_map(expert_map: Mapping[str, str]) -> Callable[[str], str]:
    """``target key -> source key`` replacing expert names in ``experts.{e}.`` and ``norms.{e}.`` segments.

    ``expert_key_map({"ear": "act"})("lm.stack.layers.3.experts.ear.q_proj.weight")``
    -> ``"lm.stack.layers.3.experts.act.q_proj.weight"``.
    """
    expert_map = dict(expert_map)
    pat = re.compile(r"(^|\.)(experts|norms)\.([^.]+)\.")

    def fn(key: str) -> str:
        return pat.sub(lambda m: f"{m.group(1)}{m.group(2)}.{expert_map.get(m.group(3), m.group(3))}.", key)
    return fn


def prefix_key_map(mapping: Mapping[str, str]) -> Callable[[str], str | None]:
    """``target key -> source key`` from ``{target_prefix: source_prefix}`` (longest prefix wins; a ``None``
    source drops the key)."""
    items = sorted(mapping.items(), key=lambda kv: -len(kv[0]))

    def fn(key: str):
        for t, s in items:
            if key == t or key.startswith(t if t.endswith(".") else t + "."):
                return None if s is None else s + key[len(t):]
        return key
    return fn


def _compose(*fns):
    fns = [f for f in fns if f is not None]

    def fn(key):
        for f in fns:
            key = f(key)
            if key is None:
                return None
        return key
    return fn


def _matches_prefix(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


def _alias_groups(model: nn.Module) -> dict[str, str]:
    """Tied tensors: alias name -> canonical (first) name."""
    seen: dict[int, str] = {}
    out = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for n, t in named:
        i = id(t)
        if i in seen:
            out[n] = seen[i]
        else:
            seen[i] = n
    return out




# ---------------------------------------------------------------------------------------------- loading weights
def _check_filters(target: Mapping[str, Any], **filters):
    """Every ``only`` / ``exclude`` prefix must match at least one key of the target model (a typo such as
    ``only=["lm.stak"]`` would otherwise load or skip nothing and report success)."""
    import difflib
    from .errors import LoadError
    for name, prefixes in filters.items():
        for p in prefixes or []:
            if not isinstance(p, str) or not p:
                raise LoadError(f"{name}={prefixes!r}: prefixes must be non-empty strings", name)
            if not _matches_prefix_any(target, p):
                heads = sorted({".".join(k.split(".")[:n]) for k in target for n in (1, 2, 3)})
                close = difflib.get_close_matches(p, heads, n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise LoadError(f"{name}=[{p!r}] matches no key of the model{hint} (prefixes are dotted module paths, "
                                f"e.g. {', '.join(repr(h) for h in heads[:3])})", name)
    only, exclude = filters.get("only"), filters.get("exclude") or []
    if (only or exclude) and not any((not only or _matches_prefix(k, only)) and not _matches_prefix(k, exclude)
                                     for k in target):
        raise LoadError(f"only={only} / exclude={exclude} leave no key of the model to load", "exclude" if exclude else "only")


def _matches_prefix_any(keys: Iterable[str], prefix: str) -> bool:
    return any(_matches_prefix(k, [prefix]) for k in keys)


def load_weights(model: nn.Module, source, *, strict: bool = True, only: Iterable[str] | None = None,
                 exclude: Iterable[str] | None = None,
                 key_map: Mapping[str, str] | Callable[[str], str | None] | None = None,
                 expert_map: Mapping[str, str] | None = None, allow_missing: Iterable[str] | None = None,
                 progress: bool | None = None, dry_run: bool = False, **resolve_kw) -> LoadReport:
    """Load ``source`` (a saved folder or reference, or a state dict) into ``model`` in place.

    Target keys (the model's state dict, filtered by ``only`` / ``exclude`` prefixes) get the source tensor
    named by ``key_map(expert_map(key))``. Strict (default): any missing (not matched by ``allow_missing``),
    unexpected (source keys nothing used; not counted when ``only`` is given) or misshapen key raises
    :class:`WeightsMismatchError` listing them and nothing is loaded. Non-strict: matching tensors are loaded,
    the rest reported (returned and logged). Tensors are cast to the target's dtype. A model built on the meta
    device is materialised (every target key must then be loaded). ``dry_run``: names and shapes only (the
    report, or the strict error), nothing is read or copied.
    """
    if isinstance(source, Mapping):
        ckpt = _DictSource(source)
    elif isinstance(source, (Checkpoint, _DictSource)):
        ckpt = source
    else:
        ckpt = Checkpoint(resolve_folder(source, **resolve_kw))
    kmap = key_map if callable(key_map) or key_map is None else prefix_key_map(key_map)
    mapper = _compose(expert_key_map(expert_map) if expert_map else None, kmap)
    only = list(only) if only else None
    exclude = list(exclude) if exclude else []
    allow = [re.compile(p) for p in (allow_missing or [])]
    aliases = _alias_groups(model)
    target = model.state_dict(keep_vars=True)
    _check_filters(target, only=only, exclude=exclude)
    report = LoadReport(source=str(ckpt.folder))
    plan: dict[str, str] = {}  # target -> source
    for t, tensor in target.items():
        if (only is not None and not _matches_prefix(t, only)) or _matches_prefix(t, exclude):
            report.skipped.append(t)
            continue
        s = mapper(t)
        if s is None:
            report.skipped.append(t)
            continue
        if s not in ckpt:
            canon = aliases.get(t)
            if canon is not None and canon in target:
                continue  # tied to another key, loaded through it
            if any(p.search(t) for p in allow):
                report.allowed_missing.append(t)
            else:
                report.missing.append(t)
            continue
        if tuple(ckpt.shapes[s]) != tuple(tensor.shape):
            report.mismatched.append((t, tuple(ckpt.shapes[s]), tuple(tensor.shape)))
            continue
        plan[t] = s
        if s != t:
            report.remapped[t] = s
    # a tied key present in the source is consumed even when its alias was planned
    used = set(plan.values()) | {mapper(a) for a in aliases if a in target and mapper(a) is not None}
    used |= {mapper(t) for t, _, _ in report.mismatched}
    if only is None:
        report.unexpected = [k for k in ckpt.keys() if k not in used and not k.endswith("rotary_emb.inv_freq")]
    report.loaded = list(plan)
    if strict and not report.ok:
        raise WeightsMismatchError(
            f"weights in {ckpt.folder} do not match {type(model).__name__}:\n{report.summary()}\n"
            f"Check that the recipe and overrides match the checkpoint; pass strict=False to load what matches "
            f"(only=[prefixes] for a part, key_map/expert_map to rename, allow_missing=[regex] for new modules).",
            report)
    if dry_run:
        return report
    _copy_in(model, target, ckpt, plan, progress)
    if not report.ok:
        logger.warning("non-strict load: %s", report.summary())
    return report


def _progress(it, total: int, desc: str, progress: bool | None):
    from huggingface_hub.utils import tqdm as hf_tqdm
    disable = (not progress) if progress is not None else (total < 2)
    return hf_tqdm(it, total=total, desc=desc, disable=disable or None, leave=False)


@torch.no_grad()
def _copy_in(model: nn.Module, target: dict, ckpt, plan: dict[str, str], progress):
    meta = any(v.is_meta for v in target.values())
    # group by source file so each shard is read once
    order = sorted(plan, key=lambda t: str(getattr(ckpt, "files", {}).get(plan[t], "")))
    if not meta:
        for t in _progress(order, len(order), "loading weights", progress):
            dst = target[t]
            dst.copy_(ckpt.tensor(plan[t]).to(dst.dtype))
        return
    not_loaded = [t for t, v in target.items() if v.is_meta and t not in plan]
    if not_loaded:
        raise WeightsMismatchError(f"the model was built on the meta device and {len(not_loaded)} tensors have no "
                                   f"weights ({not_loaded[:_SHOW]}); load it non-lazily", LoadReport())
    sd = {}
    for t in _progress(order, len(order), "loading weights", progress):
        sd[t] = ckpt.tensor(plan[t]).to(target[t].dtype)
    model.load_state_dict(sd, strict=False, assign=True)


# ---------------------------------------------------------------------------------------------- normalizers
def _normalizers(model: nn.Module) -> dict[str, Any]:
    """Submodules or plain attributes with ``to_dict()`` / ``load_dict()`` (``vla_blocks.normalize.Normalizer``)."""
    try:
        from .normalize import Normalizer
    except ImportError:  # pragma: no cover
        Normalizer = ()  # noqa: N806
    out = {}
    for name, m in model.named_modules():
        if Normalizer and isinstance(m, Normalizer):
            out[name] = m
    for name, v in vars(model).items():
        if not name.startswith("_") and not isinstance(v, nn.Module) and hasattr(v, "to_dict") and \
                hasattr(type(v), "from_dict"):
            out[name] = v
    return out


def _restore_normalizers(model: nn.Module, data: dict):
    from .normalize import Normalizer
    own = _normalizers(model)
    for name, d in (data.get("normalizers") or {}).items():
        if name in own and hasattr(own[name], "load_dict"):
            own[name].load_dict(d)
            continue
        if name in own:
            setattr(model, name, type(own[name]).from_dict(d))
            continue
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            logger.warning("normalisation stats for %r have no place in %s; ignored", name, type(model).__name__)
            continue
        setattr(parent, attr, Normalizer.from_dict(d))


# ---------------------------------------------------------------------------------------------- building + loading
def _build(cfg, lazy: bool, norm_names: set[str]):
    """Build the model; on the meta device when every tensor will come from the checkpoint."""
    if lazy:
        with torch.device("meta"):
            model = cfg.build()
        persistent = set(model.state_dict().keys())
        norm_prefixes = [n for n in norm_names if n]
        derived = [n for n, _ in model.named_buffers() if n not in persistent and
                   not _matches_prefix(n, norm_prefixes)]
        if not derived and not _alias_groups(model):
            return model
        logger.debug("building %s on CPU: non-persistent buffers %s", type(model).__name__, derived[:5])
        del model
    return cfg.build()


def load_model(ref, overrides: Mapping[str, Any] | list[str] | None = None, *, strict: bool = True,
               recipe: str | dict | None = None, only: Iterable[str] | None = None,
               exclude: Iterable[str] | None = None, key_map=None, expert_map: Mapping[str, str] | None = None,
               allow_missing: Iterable[str] | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, revision: str | None = None, cache_dir: str | None = None,
               local_files_only: bool = False, token=None, force_download: bool = False,
               low_cpu_mem_usage: bool = True, output_loading_info: bool = False, progress: bool | None = None):
    """Build the model a saved folder describes (or ``recipe``) and load its weights; returns it in ``eval()``.

    ``ref``: ``hf-hub:org/name[@rev]``, ``local-dir:path``, a folder, or a recipe name/path (built from the
    recipe; no weights). ``overrides``: dotted recipe overrides (shape-changing ones make a strict load fail).
    ``recipe``: build this recipe instead of the saved one and load the saved weights into it (with
    ``expert_map`` / ``key_map`` / ``only`` / ``strict=False`` for a different architecture).
    With ``output_loading_info=True`` returns ``(model, LoadReport)``.
    A full strict load builds the model on the meta device (no random init, one copy of the weights).
    """
    given = ref
    ref = parse_ref(ref)
    if ref.kind == "recipe":
        if recipe is not None:
            raise ConfigError(f"{ref.target!r} is a recipe: pass a saved model as the reference to use recipe=")
        model = load_recipe(ref.target, overrides).build().eval()
        return (model, LoadReport(source=ref.target)) if output_loading_info else model
    try:
        folder = resolve_folder(ref, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                token=token, force_download=force_download)
    except FileNotFoundError as e:
        if isinstance(given, str) and ref.kind == "hf-hub" and not given.startswith("hf-hub:"):
            raise FileNotFoundError(f"{e} (there is no local folder {given!r} either)") from e
        raise
    cfg = load_recipe(recipe, overrides) if recipe is not None else _config_from_folder(folder, overrides)
    norm_data = _read_norm(folder)
    partial = (not strict or only or exclude or key_map or expert_map or allow_missing or recipe is not None)
    model = _build(cfg, low_cpu_mem_usage and not partial, set((norm_data or {}).get("normalizers", {})))
    try:
        report = load_weights(model, Checkpoint(folder), strict=strict, only=only, exclude=exclude, key_map=key_map,
                              expert_map=expert_map, allow_missing=allow_missing, progress=progress)
    except WeightsMismatchError as e:
        raise WeightsMismatchError(f"{_describe(ref)}: {e}", e.report) from None
    report.source = _describe(ref)
    if norm_data:
        _restore_normalizers(model, norm_data)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    model.eval()
    return (model, report) if output_loading_info else model


def from_pretrained(ref, **kwargs):
    """Alias of :func:`load_model` (``overrides=`` and the keyword options)."""
    overrides = kwargs.pop("overrides", None)
    return load_model(ref, overrides, **kwargs)


def _read_norm(folder: Path) -> dict | None:
    f = Path(folder) / NORM_NAME
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{f}: not valid JSON ({e}); save the model again") from e


# ---------------------------------------------------------------------------------------------- saving
def _state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = {}
    for k, v in model.state_dict().items():
        if v.is_meta:
            raise ValueError(f"cannot save {type(model).__name__}: {k!r} is on the meta device (no weights); "
                             f"load or initialise the model first")
        sd[k] = v.detach().cpu()
    return sd


def model_card(model: nn.Module, repo_id: str | None = None, **card_kwargs) -> str:
    """The README.md of a saved model: YAML front matter (library ``vla_blocks``, tags) and a short body."""
    from huggingface_hub import ModelCardData

    from ._version import __version__
    cfg = model.config
    tags = ["robotics", "vla", "vla_blocks", getattr(cfg, "type", "") or type(model).__name__.lower()]
    tags += [t for t in card_kwargs.pop("tags", []) if t not in tags]
    body_extra = card_kwargs.pop("description", None)
    data = ModelCardData(library_name="vla_blocks", tags=tags, pipeline_tag="robotics", **card_kwargs)
    n = sum(p.numel() for p in model.parameters())
    name = repo_id or "ORG/NAME"
    import yaml
    recipe = yaml.safe_dump(encode(portable_config(cfg)), sort_keys=False).rstrip()
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {repo_id or type(model).__name__}", "",
        f"A `{type(model).__name__}` (`type: {getattr(cfg, 'type', '?')}`) saved with "
        f"[vla_blocks](https://github.com/vla-blocks/vla-blocks) {__version__}: {n:,} parameters.", "",
    ]
    if body_extra:
        lines += [body_extra, ""]
    lines += [
        "```python", "import vla_blocks", "", f'model = vla_blocks.create_model("hf-hub:{name}")', "```", "",
        "Files: `config.json` (the resolved recipe), `model.safetensors` (or shards + index)"
        + (", `normalization.json` (normalisation statistics)" if _normalizers(model) else "") + ".", "",
        "<details><summary>Recipe</summary>", "", "```yaml", recipe, "```", "", "</details>", "",
    ]
    return "\n".join(lines)


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, card_kwargs: dict | None = None,
                    push_to_hub: bool = False, repo_id: str | None = None, **push_kwargs) -> Path:
    """Write ``config.json``, ``model.safetensors`` (sharded with an index above ``max_shard_size``),
    ``normalization.json`` and ``README.md`` to ``save_directory``, atomically.

    Files are written into a temporary folder beside the destination, which then replaces it (other files
    already in the destination are kept; weight files of an earlier save are replaced). On error nothing
    changes. ``push_to_hub=True`` uploads the folder to ``repo_id`` afterwards (see :func:`push_to_hub`).
    """
    from huggingface_hub import save_torch_state_dict

    from ._version import __version__
    if not hasattr(model, "config"):
        raise TypeError(f"{type(model).__name__} has no recipe config; only vla_blocks models can be saved")
    dest = Path(save_directory).expanduser().absolute()
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    sd = _state_dict_for_saving(model)
    config = encode(portable_config(model.config))
    config[VERSION_KEY] = __version__
    remove_stale_temporaries(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    try:
        save_torch_state_dict(sd, tmp, max_shard_size=max_shard_size,
                              metadata={"format": "pt", VERSION_KEY: __version__})
        norms = _normalizers(model)
        if norms:
            (tmp / NORM_NAME).write_text(json.dumps(
                {"format": 1, "normalizers": {n: m.to_dict() for n, m in norms.items()}}, indent=2))
        (tmp / CARD_NAME).write_text(model_card(model, repo_id, **(card_kwargs or {})))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s to %s", type(model).__name__, dest)
    if push_to_hub:
        if not repo_id:
            raise ValueError("push_to_hub=True needs repo_id='org/name'")
        push_to_hub(dest, repo_id, **push_kwargs)
    return dest


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or unknown: keep its folder
    return True


def remove_stale_temporaries(dest: str | os.PathLike) -> list[Path]:
    """Remove the hidden ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` folders that an interrupted save of
    ``dest`` left beside it, when the process that made them is gone (or the name carries no pid: folders of
    an older version). Returns the removed paths. Called by :func:`save_pretrained` before each save."""
    dest = Path(dest).expanduser().absolute()
    removed = []
    if not dest.parent.is_dir():
        return removed
    pat = re.compile(rf"^\.{re.escape(dest.name)}\.(tmp|old)-(?:(\d+)-)?")
    for p in dest.parent.iterdir():
        m = pat.match(p.name)
        if not m or not p.is_dir():
            continue
        pid = m.group(2)
        if pid is not None and _pid_alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        logger.info("removed %s, left by an interrupted save", p)
    return removed


def _is_ours(name: str) -> bool:
    from fnmatch import fnmatch
    return any(fnmatch(name, p) for p in HUB_PATTERNS)


def _swap_into_place(tmp: Path, dest: Path):
    """Replace ``dest`` by ``tmp``, carrying over files of ``dest`` that the save did not produce."""
    if not dest.exists():
        os.replace(tmp, dest)
        return
    new = {p.name for p in tmp.iterdir()}
    for p in dest.iterdir():
        if p.name in new or _is_ours(p.name):
            continue  # replaced (or a stale weight file / card of an earlier save)
        os.replace(p, tmp / p.name)
    old = dest.parent / f".{dest.name}.old-{os.getpid()}-{id(tmp)}"
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- push
def check_folder(folder: str | os.PathLike) -> list[str]:
    """Validate a saved folder (config decodes, weights readable); returns the files that would be uploaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(_not_a_model_folder(str(folder)))
    _config_from_folder(folder)
    Checkpoint(folder)
    return sorted(p.name for p in folder.iterdir() if p.is_file() and _is_ours(p.name))


def push_to_hub(model_or_folder: nn.Module | str | os.PathLike, repo_id: str, *, private: bool | None = None,
                revision: str | None = None, commit_message: str | None = None, token: str | bool | None = None,
                create_pr: bool = False, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                card_kwargs: dict | None = None) -> str:
    """Upload a model (saved into a temporary folder first) or a saved folder to ``repo_id``; returns the commit URL.

    Creates the repo if needed (``private``), and the branch ``revision`` if given. Only the files of a saved
    model are uploaded; remote weight files not in this upload (stale shards) are deleted in the same commit.
    """
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors
    if not _REPO_ID.match(repo_id) or "@" in repo_id:
        raise ValueError(f"repo id {repo_id!r} must be of the form org/name (give the branch with revision=)")
    with tempfile.TemporaryDirectory(prefix="vla_blocks_push_") as tmp:
        if isinstance(model_or_folder, nn.Module):
            folder = save_pretrained(model_or_folder, Path(tmp) / "model", max_shard_size=max_shard_size,
                                     card_kwargs=card_kwargs, repo_id=repo_id)
        else:
            folder = Path(model_or_folder)
        files = check_folder(folder)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                     commit_message=commit_message or f"Upload {folder.name} with vla_blocks",
                                     allow_patterns=files, delete_patterns=_WEIGHT_PATTERNS,
                                     create_pr=create_pr or None)
        except hf_errors.OfflineModeIsEnabled as e:
            raise HubAccessError(f"cannot push to {repo_id}: HF_HUB_OFFLINE=1 is set; unset it "
                                 f"(HF_HUB_OFFLINE=0) to upload") from e
        except hf_errors.HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            hint = ("log in with `hf auth login` or set HF_TOKEN to a token with write access"
                    if status in (401, 403) else "check the repo id, your token and the network")
            raise HubAccessError(f"cannot push to {repo_id}: {e}; {hint}") from e
        except (ConnectionError, OSError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise HubAccessError(f"cannot push to {repo_id}: the Hub could not be reached ({e})") from e
    url = getattr(info, "commit_url", None) or getattr(info, "pr_url", None) or str(info)
    logger.info("pushed %s to %s", folder, url)
    return url


# ---------------------------------------------------------------------------------------------- CLI
def add_push_arguments(p):
    """Options of ``vla-blocks push``."""
    p.add_argument("folder", help="a folder written by save_pretrained (or `vla-blocks convert`)")
    p.add_argument("repo_id", help="the Hub repo, org/name (created if missing)")
    p.add_argument("--private", action="store_true", default=None, help="create the repo private")
    p.add_argument("--revision", help="branch to push to (created if missing; default: main)")
    p.add_argument("--commit-message", help="commit message")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")


def run_push(args) -> int:
    """``vla-blocks push``: upload a saved model folder to a Hub repo and print its URL; a Hub error is one line on
    stderr (exit 2)."""
    import sys
    try:
        files = check_folder(args.folder)
        print(f"pushing {len(files)} files from {args.folder} to {args.repo_id}"
              + (f"@{args.revision}" if args.revision else "") + f": {', '.join(files)}")
        url = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                          commit_message=args.commit_message, create_pr=args.create_pr)
    except HubAccessError as e:
        print(f"vla-blocks push: error: {e}", file=sys.stderr)
        return 2
    print(url)
    return 0



__all__ = ["save_pretrained", "from_pretrained", "load_model", "load_config", "load_weights", "push_to_hub",
           "resolve_folder", "check_folder", "parse_ref", "portable_config", "model_card", "Checkpoint",
           "LoadReport", "WeightsMismatchError", "CorruptCheckpointError", "HubAccessError", "expert_key_map",
           "prefix_key_map", "read_config_data", "CONFIG_NAME", "WEIGHTS_NAME",
           "WEIGHTS_INDEX_NAME", "NORM_NAME", "HUB_PATTERNS"]
