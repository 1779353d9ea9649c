"""Typed component configs, the registry, and the model-recipe loader.

A *slot* is a family of interchangeable components (``model``, ``time_sampler``, ``vision``…).
Its base is a dataclass declared with ``class TimeSamplerConfig(ComponentConfig, slot="time_sampler")``;
implementations register under a name::

    @register("time_sampler", "beta")
    @dataclass
    class BetaTimeSampler(TimeSamplerConfig):
        alpha: float = 1.5

A field typed with a slot base is read from a mapping with a ``type:`` key naming the component.
Recipes are YAML files (``recipes/*.yaml`` shipped with the package, or any path), optionally
inheriting from another recipe with ``base: <name>``; dotted overrides (``experts.act.hidden_size=512``)
apply on top. Every error names the file, the key path and the closest valid choices.

How a recipe combines with its base (and overrides with the recipe):

- mappings merge key by key, recursively; a mapping tagged ``!replace`` replaces the inherited one
  instead (``config: !replace {hidden_size: 64}``; ``config: !replace {}`` clears it). A dotted
  override always replaces the value at its key;
- changing a component's ``type`` starts from that component: inherited keys it does not have are
  dropped;
- changing a *family key* of a component drops the inherited fields that belong to the old family.
  A component declares them in ``family_keys`` (``{key: fields to drop}``): for ``hf_causal_lm``
  changing ``model_type`` drops the inherited ``config``, and changing ``pretrained`` drops the
  inherited ``config`` and ``model_type`` (both are read from the checkpoint). Such fields set next to
  the change (in the same recipe, or by any override) are taken as given, not merged into the old
  ones; overrides that switch ``type`` or a family key apply before the others, whatever their order.
Third-party packages add components through the entry-point group ``vla_blocks.components``
(each entry point is a module imported before the first lookup).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .errors import ConfigError
from .registry import Registry

ENTRY_POINT_GROUP = "vla_blocks.components"


def _where(file: str | None, path: str) -> str:
    loc = path or "<root>"
    return f"{file}: {loc}" if file else loc


def _suggest(word: str, choices) -> str:
    choices = sorted(str(c) for c in choices)
    close = difflib.get_close_matches(str(word), choices, n=3, cutoff=0.5)
    s = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return s + f" (valid: {', '.join(choices)})"


# ---------------------------------------------------------------------------------------------- registry
_SLOTS: dict[str, type] = {}
_REGISTRY: dict[str, Registry[type]] = {}  # slot -> its components (vla_blocks.registry: one mechanism for all)


def _slot_registry(slot: str) -> Registry[type]:
    return Registry(f"{slot} component", group=ENTRY_POINT_GROUP, builtins=("vla_blocks.components",))


class ComponentConfig:
    """Base of every slot base. ``type`` is the registered name of the concrete class.

    ``family_keys`` maps a field to the fields that belong to its value: when a recipe or an override
    changes that field, the inherited values of those fields are dropped (see the module docstring).
    """

    type: typing.ClassVar[str] = ""
    slot: typing.ClassVar[str] = ""
    family_keys: typing.ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init_subclass__(cls, slot: str | None = None, **kw):
        super().__init_subclass__(**kw)
        if slot is not None:
            cls.slot = slot
            cls._slot_base = cls
            _SLOTS[slot] = cls
            _REGISTRY.setdefault(slot, _slot_registry(slot))

    def build(self, *args, **kwargs):
        """The module (or object) this component config describes; components that build nothing raise."""
        raise NotImplementedError(f"{type(self).__name__} does not build a module")


def register(slot: str, name: str):
    """Class decorator: register a config dataclass as component ``name`` of ``slot``."""
    def deco(cls):
        if slot not in _SLOTS:
            raise KeyError(f"unknown slot {slot!r}{_suggest(slot, _SLOTS)}")
        if not issubclass(cls, _SLOTS[slot]):
            raise TypeError(f"{cls.__name__} must subclass {_SLOTS[slot].__name__} to register in slot {slot!r}")
        cls.type = name
        _REGISTRY[slot].register(name, cls, replace=True)
        return cls
    return deco


def _load_plugins():
    """Import the built-in components and the entry-point plug-ins (each slot's registry does it once)."""
    importlib.import_module("vla_blocks.components")  # defines the slots that live there
    for reg in list(_REGISTRY.values()):
        reg.names()


def registered(slot: str) -> dict[str, type]:
    """The components of ``slot``: name -> config class (built-ins and entry-point plug-ins loaded first)."""
    _load_plugins()
    if slot not in _REGISTRY:
        raise KeyError(f"unknown slot {slot!r}{_suggest(slot, _REGISTRY)}")
    return dict(_REGISTRY[slot].items())


def component_class(slot: str, name: str, *, file: str | None = None, path: str = "type") -> type:
    """The config class registered as ``name`` in ``slot``; :class:`ConfigError` names the file, key path and closest
    names otherwise."""
    reg = registered(slot)
    if not isinstance(name, str):
        raise ConfigError(f"{_where(file, path)}: a {slot} component name must be a string, got {name!r} "
                          f"(valid: {', '.join(sorted(reg))})")
    if name not in reg:
        raise ConfigError(f"{_where(file, path)}: unknown {slot} component {name!r}{_suggest(name, reg)}")
    return reg[name]


# ---------------------------------------------------------------------------------------------- decoding
def _is_slot_base(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, ComponentConfig) and getattr(tp, "_slot_base", None) is tp


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def decode(tp, data, path: str = "", file: str | None = None):
    """Decode plain data (from YAML) into the annotated type ``tp``; strict about keys and types."""
    origin = get_origin(tp)
    if tp is Any:
        return data
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if data is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return decode(a, data, path, file)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{_where(file, path)}: {data!r} matches none of {_type_name(tp)}", key=path or None)
    if origin is Literal:
        choices = get_args(tp)
        if data not in choices:
            raise ConfigError(f"{_where(file, path)}: {data!r} is not allowed{_suggest(data, choices)}",
                              key=path or None)
        return data
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(data, (list, tuple)):
            raise ConfigError(f"{_where(file, path)}: expected a list, got {type(data).__name__} {data!r}",
                              key=path or None)
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(data):
                raise ConfigError(f"{_where(file, path)}: expected {len(args)} items, got {len(data)}",
                                  key=path or None)
            return tuple(decode(a, d, f"{path}[{i}]", file) for i, (a, d) in enumerate(zip(args, data)))
        item = args[0] if args else Any
        out = [decode(item, d, f"{path}[{i}]", file) for i, d in enumerate(data)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(data, dict):
            raise ConfigError(f"{_where(file, path)}: expected a mapping, got {type(data).__name__} {data!r}",
                              key=path or None)
        kt, vt = get_args(tp) or (str, Any)
        return {k: decode(vt, v, f"{path}.{k}" if path else str(k), file) for k, v in data.items()}
    if _is_slot_base(tp):
        if isinstance(data, tp):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"{_where(file, path)}: expected a {tp.slot} mapping with a 'type' key, got {data!r}",
                              key=path or None)
        if "type" not in data:
            raise ConfigError(f"{_where(file, path)}: missing field 'type' (the {tp.slot} component name)"
                              f"{_suggest('', registered(tp.slot))}", key=path or None)
        cls = component_class(tp.slot, data["type"], file=file, path=f"{path}.type" if path else "type")
        return _decode_dataclass(cls, {k: v for k, v in data.items() if k != "type"}, path, file)
    if is_dataclass(tp):
        if isinstance(data, tp):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"{_where(file, path)}: expected a mapping for {tp.__name__}, got {data!r}",
                              key=path or None)
        return _decode_dataclass(tp, data, path, file)
    if tp is bool:
        if not isinstance(data, bool):
            raise ConfigError(f"{_where(file, path)}: expected true/false, got {type(data).__name__} {data!r}",
                              key=path or None)
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise ConfigError(f"{_where(file, path)}: expected an integer, got {type(data).__name__} {data!r}",
                              key=path or None)
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            if isinstance(data, str):
                try:
                    return float(data)  # YAML reads 1e-6 as a string
                except ValueError:
                    pass
            raise ConfigError(f"{_where(file, path)}: expected a number, got {type(data).__name__} {data!r}",
                              key=path or None)
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            raise ConfigError(f"{_where(file, path)}: expected a string, got {type(data).__name__} {data!r}",
                              key=path or None)
        return data
    return data


def _decode_dataclass(cls, data: dict, path: str, file: str | None):
    hints = typing.get_type_hints(cls)
    flds = {f.name: f for f in fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        sub = f"{path}.{k}" if path else str(k)
        if k not in flds:
            raise ConfigError(f"{_where(file, sub)}: unknown key {k!r} for {cls.__name__}{_suggest(k, flds)}")
        kwargs[k] = decode(hints[k], v, sub, file)
    for name, f in flds.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_where(file, f'{path}.{name}' if path else name)}: missing required field "
                              f"{name!r} of {cls.__name__}")
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a check that names its key (relative to this mapping)
        key = f"{path}.{e.key}" if path and e.key else (e.key or path or None)
        raise ConfigError(f"{_where(file, path)}: {e}", key=key) from e
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{_where(file, path)}: {e}", key=path or None) from e


def encode(obj) -> Any:
    """The inverse of :func:`decode`: plain data with ``type`` tags, ready for YAML/JSON."""
    if is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        if isinstance(obj, ComponentConfig) and obj.type:
            out["type"] = obj.type
        for f in fields(obj):
            if f.init:
                out[f.name] = encode(getattr(obj, f.name))
        return out
    if isinstance(obj, (list, tuple)):
        return [encode(x) for x in obj]
    if isinstance(obj, dict):
        return {k: encode(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------- recipes
RECIPE_SUFFIXES = (".yaml", ".yml")


def recipe_dir() -> Path:
    """The folder of the recipes shipped with the package."""
    import vla_blocks.recipes as r
    return Path(r.__file__).parent


def list_recipes() -> list[str]:
    """Names of the shipped recipes (file stems), sorted."""
    return sorted(p.stem for p in recipe_dir().iterdir() if p.suffix in RECIPE_SUFFIXES)


def _resolve_recipe_file(ref: str) -> Path:
    p = Path(ref)
    if p.suffix in RECIPE_SUFFIXES or os.sep in ref or "/" in ref:
        if not p.is_file():
            raise ConfigError(f"recipe file {ref!r} does not exist")
        return p
    for suf in RECIPE_SUFFIXES:
        f = recipe_dir() / f"{ref}{suf}"
        if f.is_file():
            return f
    raise ConfigError(f"unknown recipe {ref!r}{_suggest(ref, list_recipes())}")


class Replace(dict):
    """A mapping tagged ``!replace`` in a recipe: it replaces the inherited mapping instead of merging into it."""


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader plus the ``!replace`` tag on mappings (duplicate keys: :func:`load_yaml`)."""


def _construct_replace(loader, node):
    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(None, None, "!replace applies to a mapping ({...})", node.start_mark)
    return Replace(loader.construct_mapping(node, deep=True))


_RecipeLoader.add_constructor("!replace", _construct_replace)


class DuplicateKeyError(yaml.YAMLError):
    """A key repeated in one YAML mapping (plain YAML loaders keep the last value without a word).

    ``path`` is the key path (``backbone.config.hidden_size``), ``line`` / ``first_line`` 1-based lines."""

    def __init__(self, path: str, line: int, first_line: int):
        super().__init__(f"line {line}: duplicate key {path!r} (first set at line {first_line})")
        self.path, self.line, self.first_line = path, line, first_line


def _check_duplicate_keys(node, path: str = "", _done: set | None = None):
    _done = set() if _done is None else _done
    if id(node) in _done:  # an alias of a node already checked
        return
    _done.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                sub = f"{path}.{k.value}" if path else k.value
                if (k.tag, k.value) in seen:
                    raise DuplicateKeyError(sub, k.start_mark.line + 1, seen[k.tag, k.value])
                seen[k.tag, k.value] = k.start_mark.line + 1
            else:
                sub = path
            _check_duplicate_keys(v, sub, _done)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _check_duplicate_keys(v, f"{path}[{i}]", _done)


def load_yaml(text: str):
    """Parse recipe YAML (safe loader + the ``!replace`` tag); a repeated key raises :class:`DuplicateKeyError`."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _plain(x):
    """``x`` without :class:`Replace` markers (plain dicts and lists)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def _component_classes(name) -> list[type]:
    """Registered classes named ``name`` (in any slot)."""
    if not isinstance(name, str):
        return []
    _load_plugins()
    return [reg[name] for reg in _REGISTRY.values() if name in reg]


def _family_resets(type_name, changed: set[str]) -> set[str]:
    """Fields to drop from the inherited mapping of component ``type_name`` when ``changed`` keys change."""
    drop: set[str] = set()
    for cls in _component_classes(type_name):
        for key, dependents in getattr(cls, "family_keys", {}).items():
            if key in changed:
                drop.update(dependents)
    return drop


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        old = out.get(k)
        if isinstance(v, Replace) or not isinstance(v, dict) or not isinstance(old, dict):
            out[k] = _plain(v) if isinstance(v, Replace) else v
        elif v.get("type", old.get("type")) != old.get("type"):
            out[k] = v  # another component: start from it
        else:
            changed = {f for f in v if f not in old or v[f] != old[f]}
            drop = _family_resets(old.get("type"), changed)  # what ``v`` sets of them lands unmerged
            out[k] = _merge({f: x for f, x in old.items() if f not in drop}, v)
    return out


def read_recipe(ref: str, _seen: tuple = ()) -> tuple[dict, str]:
    """Raw recipe data with ``base:`` inheritance resolved, and the file it came from."""
    f = _resolve_recipe_file(ref)
    if str(f) in _seen:
        raise ConfigError(f"{f}: recipe inheritance loops through {' -> '.join(_seen)}")
    try:
        data = load_yaml(f.read_text())
    except DuplicateKeyError as e:
        raise ConfigError(f"{f}:{e.line}: duplicate key {e.path!r} (first set at line {e.first_line}); "
                          f"a YAML mapping keeps only the last value, so say it once", key=e.path) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{f}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{f}: a recipe must be a mapping, got {type(data).__name__}")
    if "base" in data:
        base_ref = str(data.pop("base"))
        sibling = f.parent / f"{base_ref}.yaml"
        base_data, _ = read_recipe(str(sibling) if sibling.is_file() else base_ref, _seen + (str(f),))
        data = _merge(base_data, data)
    return data, str(f)


def parse_override(item: str) -> tuple[str, Any]:
    """``'a.b.c=value'`` -> ``('a.b.c', yaml value)``."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, val = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        return key, _plain(load_yaml(val))
    except DuplicateKeyError as e:
        raise ConfigError(f"override {item!r}: duplicate key {key}.{e.path}", key=f"{key}.{e.path}") from e
    except yaml.YAMLError:
        return key, val


def apply_overrides(data: dict, overrides: dict[str, Any], file: str | None = None) -> dict:
    """Set dotted keys in raw recipe data (validation happens when it is decoded).

    An override replaces the value at its key. Overrides that switch a component (``type``) or a family key
    (e.g. ``backbone.model_type``) apply first and drop the fields of the old component / family; the
    other overrides then apply on top, whatever their order.
    """
    data = _deepcopy(data)
    def switches(key: str) -> bool:
        return key.split(".")[-1] == "type" or any(key.split(".")[-1] in getattr(c, "family_keys", {})
                                                   for reg in _REGISTRY.values() for c in reg.values())
    _load_plugins()
    items = sorted(overrides.items(), key=lambda kv: not switches(kv[0]))  # stable: switches first
    for key, val in items:
        parts = key.split(".")
        node = data
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node, dict):
                raise ConfigError(f"{_where(file, '.'.join(parts[:i]))}: cannot set {key!r}: not a mapping")
            if p not in node or node[p] is None:
                node[p] = {}
            node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"{_where(file, '.'.join(parts[:-1]))}: cannot set {key!r}: not a mapping")
        last = parts[-1]
        if last == "type" and node.get("type") != val:
            # switching component: keep only fields the new component also has
            if not isinstance(val, str):
                node.clear()
            else:
                _keep_fields_of(node, node.get("type"), val)
        elif last not in node or node[last] != val:
            for f in _family_resets(node.get("type"), {last}):
                node.pop(f, None)
        node[last] = val
    return _plain(data)


def _keep_fields_of(node: dict, old_type, new_type: str):
    """Drop the keys of ``node`` that the component ``new_type`` (of the slot that also has ``old_type``) lacks."""
    _load_plugins()
    for reg in _REGISTRY.values():
        if old_type in reg and new_type in reg:
            keep = {f.name for f in fields(reg[new_type]) if f.init}
            for k in [k for k in node if k != "type" and k not in keep]:
                del node[k]
            return


def _deepcopy(x):
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}  # drops Replace markers too
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def load_recipe(ref: str | dict, overrides: dict[str, Any] | list[str] | None = None):
    """Load a model recipe (name, path or raw dict) with dotted overrides into a typed model config."""
    _load_plugins()
    ModelConfig = _SLOTS["model"]  # noqa: N806  (the model slot base, defined in vla_blocks.components)
    if isinstance(ref, dict):
        data, file = _deepcopy(ref), "<dict>"
    else:
        data, file = read_recipe(ref)
        data = _plain(data)
    if isinstance(overrides, (list, tuple)):
        overrides = dict(parse_override(o) for o in overrides)
    if overrides:
        data = apply_overrides(data, overrides, file)
    model_fields = {f.name for f in _model_fields(data, file)}  # also checks the 'type' key
    if "name" in data and "name" not in model_fields:
        data.pop("name")  # a recipe's display name, not a field of the model config
    from .validate import check_config  # sizes and policy knobs, each error naming its key path
    return check_config(decode(ModelConfig, data, "", file), file=file)


def _model_fields(data, file):
    if not isinstance(data, dict) or "type" not in data:
        raise ConfigError(f"{_where(file, 'type')}: missing field 'type' (the model component name)"
                          f"{_suggest('', registered('model'))}")
    return fields(component_class("model", data["type"], file=file))


def dump_recipe(cfg) -> str:
    """A resolved config as recipe YAML (``type`` tags included) that :func:`load_recipe` reads back to an equal config.
    """
    return yaml.safe_dump(encode(cfg), sort_keys=False)


__all__ = ["ComponentConfig", "ConfigError", "register", "registered", "component_class", "decode", "encode",
           "load_recipe", "read_recipe", "load_yaml", "Replace", "list_recipes", "apply_overrides", "parse_override", "dump_recipe",
           "dataclass", "DuplicateKeyError"]


# ---------------------------------------------------------------------------------------------- field help
def field_docs(cls) -> dict[str, str]:
    """Help text of each field of the config dataclass ``cls`` (and its bases), found next to the field:

    - the comment lines directly above the field and a trailing ``# comment`` on its line (lerobot's style);
    - or a ``- ``name``: text`` item of the class docstring (continuation lines indented).
    The nearest class in the MRO that documents a field wins.
    """
    import inspect
    import re
    import textwrap
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if is_dataclass(k)]):
        own: dict[str, str] = {}
        text = inspect.getdoc(klass) or ""
        for m in re.finditer(r"^- ``(\w+)``(?: / ``(\w+)``)*:\s*(.*(?:\n(?!- ``|\n).+)*)", text, re.M):
            body = " ".join(line.strip() for line in m.group(3).splitlines())
            for name in (m.group(1), m.group(2)):
                if name:
                    own[name] = body
        try:
            src = textwrap.dedent(inspect.getsource(klass)).splitlines()
        except (OSError, TypeError):
            src = []
        comments: list[str] = []
        for line in src[1:]:
            s = line.strip()
            if s.startswith("#"):
                comments.append(s.lstrip("#").strip())
                continue
            m = re.match(r"^    (\w+)\s*:[^=#]*(?:=[^#]*)?(?:#\s*(.*))?$", line)
            if m and not line.startswith("     "):
                parts = comments + ([m.group(2)] if m.group(2) else [])
                if parts:
                    own[m.group(1)] = " ".join(parts)
            comments = []
        docs.update(own)
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in docs.items() if k in names}


def describe_fields(cfg, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key path, value, help)`` for every field of a config tree, nested components included."""
    rows = []
    docs = field_docs(type(cfg))
    for f in fields(cfg):
        if not f.init:
            continue
        val = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(val):
            kind = getattr(val, "type", "") or type(val).__name__
            rows.append((key, f"<{kind}>", docs.get(f.name, "")))
            rows += describe_fields(val, key + ".")
        else:
            shown = repr(val)
            rows.append((key, shown if len(shown) <= 60 else shown[:57] + "...", docs.get(f.name, "")))
    return rows
