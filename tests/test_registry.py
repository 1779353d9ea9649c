"""One registry mechanism: order, suggestions, duplicates, entry-point plug-ins."""

import sys
import types

import pytest

from vla_blocks.registry import Registry, UnknownNameError


def test_order_before_duplicates_and_suggestions():
    r = Registry("widget")
    r.register("b", 2)
    r.register("c", 3)
    r.register("a", 1, before="c")
    assert r.names() == ["b", "a", "c"] and r["a"] == 1 and "a" in r and len(r) == 3
    with pytest.raises(ValueError, match="already registered"):
        r.register("a", 5)
    r.register("a", 5, replace=True)
    assert r.get("a") == 5
    with pytest.raises(UnknownNameError, match="did you mean 'c'") as e:
        r.get("cc")
    assert isinstance(e.value, KeyError) and "valid: a, b, c" in str(e.value)

    @r.register("d")
    def d():
        return 4
    assert r["d"]() == 4
    with pytest.raises(TypeError):
        r.register("", 1)


def test_check_rejects_bad_entries():
    def check(o):
        if not callable(o):
            raise TypeError(f"{o!r} is not callable")
    r = Registry("hook", check=check)
    with pytest.raises(TypeError, match="not callable"):
        r.register("x", 3)


def test_builtins_and_entry_points_load_once_on_first_lookup(monkeypatch):
    calls = []
    mod = types.ModuleType("fake_plugin_mod")
    r = Registry("thing", group="vla_blocks.things", builtins=("fake_plugin_mod",))
    mod.__dict__["_"] = calls.append("imported") or None
    monkeypatch.setitem(sys.modules, "fake_plugin_mod", mod)

    class EP:
        def __init__(self, name, value, obj):
            self.name, self.value, self.obj = name, value, obj

        def load(self):
            calls.append(self.name)
            return self.obj

    eps = [EP("by_module", "some.module", types.ModuleType("m")), EP("by_object", "pkg.mod:obj", "OBJ")]
    import importlib.metadata as md
    monkeypatch.setattr(md, "entry_points", lambda group: eps if group == "vla_blocks.things" else [])
    assert r.names() == ["by_object"] and r["by_object"] == "OBJ"   # a module entry point registers itself
    r.names()
    assert calls.count("by_object") == 1   # loaded once


def test_components_and_suites_are_registries():
    from vla_blocks.bench import SUITES
    from vla_blocks.config import _REGISTRY, registered
    assert isinstance(SUITES, Registry) and "composition" in SUITES
    assert "pi0" in registered("model") and isinstance(_REGISTRY["model"], Registry)


def test_attention_backends_and_converters_are_registries():
    from vla_blocks.attention import dispatch
    from vla_blocks.convert import CONVERTERS
    assert isinstance(dispatch.BACKENDS, Registry) and isinstance(CONVERTERS, Registry)
    assert dispatch.BACKENDS.names()[-2:] == ["sdpa_blocks", "sdpa"]   # dense sdpa stays last
    assert "pi05-jax" in CONVERTERS
    with pytest.raises(KeyError, match="did you mean 'sdpa'"):
        dispatch.get_backend("sdpx")
