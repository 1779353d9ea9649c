"""Recipes and the registry: typed decoding, errors that name file/key/suggestion, overrides, plugins."""


import pytest

from vla_blocks import config as C
from vla_blocks.config import ConfigError, encode, load_recipe
from vla_blocks.model import create_model, parse_model_ref


def test_recipe_by_name_and_path_with_overrides(tmp_path):
    cfg = load_recipe("mot-tiny", {"experts.act.hidden_size": 48, "backbone.config.num_hidden_layers": 1})
    assert cfg.experts["act"].hidden_size == 48 and cfg.backbone.config["num_hidden_layers"] == 1
    assert list(cfg.experts) == ["und", "gen", "act"]
    p = tmp_path / "r.yaml"
    p.write_text("base: mot-tiny\nexperts:\n  und: {}\n  act: {hidden_size: 24}\n")
    cfg2 = load_recipe(str(p))
    assert cfg2.experts["act"].hidden_size == 24 and cfg2.backbone.model_type == "qwen2"
    # the resolved recipe round-trips through encode/decode
    again = load_recipe(encode(cfg2))
    assert encode(again) == encode(cfg2)


@pytest.mark.parametrize("override, pattern", [
    ({"experts.act.hiden_size": 3}, r"mot-tiny\.yaml: experts\.act\.hiden_size: unknown key .*did you mean 'hidden_size'"),
    ({"experts.act.hidden_size": "wide"}, r"experts\.act\.hidden_size: expected an integer, got str"),
    ({"backbone.type": "hf_causal"}, r"backbone\.type: unknown backbone component 'hf_causal'; did you mean 'hf_causal_lm'"),
    ({"attention_backendd": "sdpa"}, r"unknown key 'attention_backendd'.*did you mean 'attention_backend'"),
    ({"backbone.model_type": "qwen"}, r"model_type 'qwen' is not supported \(did you mean 'qwen2'\?\)"),
])
def test_errors_name_file_key_and_suggestion(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_recipe("mot-tiny", override)


def test_malformed_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("type: mot_lm\nexperts: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(str(bad))
    nomodel = tmp_path / "n.yaml"
    nomodel.write_text("experts: {}\n")
    with pytest.raises(ConfigError, match=r"n\.yaml: type: missing field 'type'.*mot_lm"):
        load_recipe(str(nomodel))
    missing = tmp_path / "m.yaml"
    missing.write_text("type: mot_lm\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: backbone: missing required field 'backbone'"):
        load_recipe(str(missing))
    with pytest.raises(ConfigError, match="did you mean 'mot-tiny'"):
        load_recipe("mot-tyni")
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"))
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop\n")
    with pytest.raises(ConfigError, match="loops"):
        load_recipe(str(loop))


def test_model_refs():
    assert parse_model_ref("hf-hub:org/name@v1").revision == "v1"
    assert parse_model_ref("local-dir:/x").kind == "local-dir"
    assert parse_model_ref("acot-tiny").kind == "recipe"
    for bad in ("hf-hub:org", "hf-hub:org/name@", "local-dir:"):
        with pytest.raises(ConfigError):
            parse_model_ref(bad)


def test_third_party_component_through_entry_point(tmp_path, monkeypatch):
    """A plugin module named in the entry-point group registers a new component before the first lookup."""
    plugin = tmp_path / "my_vla_plugin.py"
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "from vla_blocks.config import register\n"
        "from vla_blocks.backbones import BackboneConfig\n"
        "@register('backbone', 'my_backbone')\n"
        "@dataclass\n"
        "class MyBackbone(BackboneConfig):\n"
        "    width: int = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    class EP:
        name = "my"
        value = "my_vla_plugin"

        def load(self):
            import importlib
            return importlib.import_module("my_vla_plugin")

    import importlib.metadata as md
    monkeypatch.setattr(md, "entry_points", lambda group=None: [EP()] if group == C.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(C._REGISTRY["backbone"], "_loaded", False)  # plug-ins load on the next lookup
    try:
        cls = C.component_class("backbone", "my_backbone")
        assert cls.__name__ == "MyBackbone"
        assert C.decode(C._SLOTS["backbone"], {"type": "my_backbone", "width": 5}).width == 5
    finally:  # the plug-in's component must not outlive this test (other tests scan the registry)
        if "my_backbone" in C._REGISTRY["backbone"]:
            C._REGISTRY["backbone"].unregister("my_backbone")


def test_create_model_overrides_from_python():
    m = create_model("mot-tiny", overrides=["experts.act.hidden_size=16"])
    assert m.lm.stack.layers[0].experts["act"].q_proj.in_features == 16
