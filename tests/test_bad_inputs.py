"""Property-based bad-input suite (hypothesis), one family per test: policy batches (pi0 / ACoT / HALO),
normalisation statistics, recipes and overrides, checkpoints and loads, the command line.

Every generated case ends in either a correct result (compared with an independent reference: the clean
batch's output, a numpy formula, the saved tensors) or an error of the project's own types carrying the
offending key; never a bare KeyError / IndexError / ZeroDivisionError, never a silent wrong result.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vla_blocks
from vla_blocks.config import ConfigError
from vla_blocks.errors import BatchError, LoadError, StatsError
from vla_blocks.normalize import Normalizer, compute_stats, convert_stats

FAST = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=True)


# ---------------------------------------------------------------------------------------------- batches
@pytest.fixture(scope="module")
def pi0():
    torch.manual_seed(0)
    m = vla_blocks.create_model("pi0-tiny").eval()
    b = m.demo_batch(2, torch.Generator().manual_seed(1))
    b["image_masks"][1, 0] = False
    noise = torch.randn(2, m.config.action_horizon, m.config.action_dim, generator=torch.Generator().manual_seed(2))
    ref = m.sample_actions(b, noise=noise)["actions"]
    return m, b, noise, ref


def _copy(batch):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


KEYS = ["images", "image_masks", "tokenized_prompt", "tokenized_prompt_mask", "state"]
MUTATIONS = ["drop", "nan", "inf", "scale255", "int64", "signed", "batch1", "batch0", "ndim", "token_high",
             "token_neg", "masked_nan", "masked_garbage", "masked_token", "mask_dtype", "uint8_ok", "list"]


@settings(FAST, max_examples=60)
@given(kind=st.sampled_from(MUTATIONS), key=st.sampled_from(KEYS), seed=st.integers(0, 2 ** 16))
def test_pi0_batches_error_with_the_key_or_give_the_clean_result(pi0, kind, key, seed):
    m, clean, noise, ref = pi0
    b = _copy(clean)
    g = torch.Generator().manual_seed(seed)
    expect_key = key
    same_as_clean = False
    if kind == "drop":
        del b[key]
        if key in ("image_masks", "tokenized_prompt_mask"):
            out = m.sample_actions(b, noise=noise)["actions"]  # optional: every camera / token valid
            assert torch.isfinite(out).all()
            return
    elif kind in ("nan", "inf"):
        if not b[key].is_floating_point():
            expect_key = key
            b[key] = b[key].float() * float("nan")  # a float mask / float token ids: a dtype error
        else:
            flat = b[key].view(-1)
            # a valid position: camera 0 of row 0 / any state entry
            flat[int(torch.randint(0, flat.numel() // (4 if key == "images" else 1), (1,), generator=g))] = \
                float("nan") if kind == "nan" else float("inf")
    elif kind == "scale255":
        b["images"] = b["images"] * 255.0
        expect_key = "images"
    elif kind == "int64":
        b["images"] = (b["images"] * 255).long()
        expect_key = "images"
    elif kind == "signed":
        b["images"] = b["images"] * 2 - 1
        expect_key = "images"
    elif kind == "batch1":
        b[key] = b[key][:1]
    elif kind == "batch0":
        for k in KEYS:
            b[k] = b[k][:0]
        expect_key = None
    elif kind == "ndim":
        b[key] = b[key][None]
    elif kind in ("token_high", "token_neg"):
        b["tokenized_prompt"][0, 0] = 10 ** 6 if kind == "token_high" else -1
        expect_key = "tokenized_prompt"
    elif kind == "masked_nan":  # camera 0 of row 1 is masked: NaN there must not reach any action
        b["images"][1, 0] = float("nan")
        same_as_clean = True
    elif kind == "masked_garbage":
        b["images"][1, 0] = torch.rand(b["images"][1, 0].shape, generator=g)
        same_as_clean = True
    elif kind == "masked_token":
        pad = ~b["tokenized_prompt_mask"]
        b["tokenized_prompt"][pad] = 10 ** 6  # out of vocabulary, but padding: zeroed
        same_as_clean = True
    elif kind == "mask_dtype":
        b["image_masks"] = b["image_masks"].float()
        expect_key = "image_masks"
    elif kind == "uint8_ok":  # the same pixels as uint8 HWC: resized and scaled by the model, finite output
        b["images"] = (b["images"] * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).contiguous()
        out = m.sample_actions(b, noise=noise)["actions"]
        assert out.shape == ref.shape and torch.isfinite(out).all()
        return
    elif kind == "list":
        b[key] = b[key].tolist()
    try:
        out = m.sample_actions(b, noise=noise)["actions"]
    except BatchError as e:
        assert not same_as_clean, f"{kind}: {e}"
        if expect_key is not None:
            assert e.key == expect_key or expect_key in str(e), (kind, key, e.key, str(e))
        else:
            assert "batch size 0" in str(e)
        return
    assert same_as_clean, f"{kind} on {key}: no error and not a case with a defined result"
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_nonfinite_opt_out_and_select_action_batch_change(pi0):
    m, clean, noise, ref = pi0
    b = _copy(clean)
    b["state"][0, 0] = float("nan")
    m.allow_nonfinite = True
    try:
        assert torch.isnan(m.sample_actions(b, noise=noise)["actions"][0]).any()  # the user asked for it
    finally:
        m.allow_nonfinite = False
    m.reset()
    m.select_action(clean)
    with pytest.raises(BatchError, match="reset"):
        m.select_action({k: v[:1] for k, v in clean.items()})
    m.reset()
    assert m.select_action({k: v[:1] for k, v in clean.items()}).shape[0] == 1
    for n in (0, -1, 10 ** 3, 1.5):
        m.reset()
        m.n_action_steps = n
        with pytest.raises(ConfigError, match="n_action_steps"):
            m.select_action(clean)
    m.n_action_steps = None
    m.reset()


@pytest.fixture(scope="module")
def halo():
    torch.manual_seed(0)
    return vla_blocks.create_model("halo-tiny").eval()


@settings(FAST, max_examples=30)
@given(kind=st.sampled_from(["one_instr_two_hist", "str_two_hist", "nan", "float255", "int", "empty", "dims",
                             "not_list", "instr_not_str", "train_ids", "train_nan_action"]),
       seed=st.integers(0, 1000))
def test_halo_bad_inputs_error_with_the_key(halo, kind, seed):
    g = torch.Generator().manual_seed(seed)
    frame = torch.rand(3, 32, 32, generator=g)
    batch = {"history": [[frame], [frame.clone()]], "instruction": ["pick", "place"], "mode": "reactive"}
    key = "history"
    if kind == "one_instr_two_hist":
        batch["instruction"], key = ["pick"], "instruction"
    elif kind == "str_two_hist":
        batch["instruction"], key = "pick", "instruction"
    elif kind == "nan":
        batch["history"][1][0][0, 0, 0] = float("nan")
    elif kind == "float255":
        batch["history"][0] = [frame * 255]
    elif kind == "int":
        batch["history"][0] = [(frame * 255).long()]
    elif kind == "empty":
        batch["history"][1] = []
    elif kind == "dims":
        batch["history"][0] = [frame[0]]
    elif kind == "not_list":
        batch["history"] = frame
    elif kind == "instr_not_str":
        batch["instruction"], key = [1, 2], "instruction"
    if kind in ("train_ids", "train_nan_action"):
        from vla_blocks.models.halo import synthetic_sample
        s = synthetic_sample("reactive", halo.config.action_dim, halo.config.chunk_size, image_size=32, generator=g)
        tb = halo.collate([s])
        if kind == "train_ids":
            tb["input_ids"] = tb["input_ids"].clone()
            tb["input_ids"][0], key = 10 ** 6, "input_ids"
        else:
            tb["actions"] = tb["actions"].clone()
            tb["actions"][0, 0, 0], key = float("inf"), "actions"
        with pytest.raises(BatchError) as e:
            halo(tb)
    else:
        with pytest.raises(BatchError) as e:
            halo.predict_action_chunk(batch)
    assert e.value.key == key, (kind, e.value.key, str(e.value))


# ---------------------------------------------------------------------------------------------- statistics
def _oracle_zscore(x, mean, std):
    return (x - mean) / (std + 1e-6)


@settings(FAST, max_examples=80)
@given(d=st.integers(1, 6), n=st.integers(0, 8), bad=st.sampled_from(["none", "nan", "inf", "neg_std", "q_order",
                                                                     "wider", "narrower", "ragged"]),
       layout=st.sampled_from(["ours", "openpi", "lerobot"]), seed=st.integers(0, 1000))
def test_stats_load_apply_or_refuse_with_the_key(d, n, bad, layout, seed):
    rng = np.random.default_rng(seed)
    mean, std = rng.normal(size=d), rng.uniform(0.1, 2.0, size=d)
    q01, q99 = mean - 2 * std, mean + 2 * std
    stats = {"mean": mean.tolist(), "std": std.tolist(), "q01": q01.tolist(), "q99": q99.tolist()}
    if bad == "nan":
        stats["mean"][0] = float("nan")
    elif bad == "inf":
        stats["q99"][-1] = float("inf")
    elif bad == "neg_std":
        stats["std"][-1] = -0.5
    elif bad == "q_order":
        stats["q01"][0], stats["q99"][0] = 1.0, -1.0
    elif bad == "ragged":
        stats["std"] = stats["std"] + [1.0]
    key = "actions"
    data = {"ours": {"mode": "zscore", "stats": {key: stats}}, "openpi": {"norm_stats": {key: stats}},
            "lerobot": {"action": stats, "observation.images.top": {"mean": [[[0.5]]] * 3}}}[layout]
    width = d + 1 if bad == "wider" else max(d - 1, 0) if bad == "narrower" else d
    x = torch.as_tensor(rng.normal(size=(n + 1, width)), dtype=torch.float32)
    norm = Normalizer("zscore")
    try:
        norm.load_dict(json.loads(json.dumps(data, allow_nan=True)))
        y = norm.normalize(key, x)
    except StatsError as e:
        assert bad != "none", str(e)
        assert e.key == key, (bad, e.key, str(e))
        return
    assert bad == "none", bad  # every damaged case (q99 < q01 included) must have been refused
    np.testing.assert_allclose(y.numpy(), _oracle_zscore(x.double().numpy(), mean, std), rtol=1e-5, atol=1e-5)


@settings(FAST, max_examples=30)
@given(data=st.one_of(st.none(), st.integers(), st.lists(st.floats(allow_nan=False)),
                      st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
                      st.dictionaries(st.sampled_from(["norm_stats", "stats"]), st.integers(), min_size=1)))
def test_unknown_stats_layouts_are_refused(data):
    norm = Normalizer("zscore", {"actions": {"mean": [0.0], "std": [1.0]}})
    with pytest.raises(StatsError):
        norm.load_dict(data)
    assert norm.keys() == ["actions"]  # a refused load changes nothing


@settings(FAST, max_examples=20)
@given(pos=st.integers(0, 39), value=st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_stats_of_nonfinite_data_are_refused(pos, value):
    x = torch.randn(10, 4)
    x.view(-1)[pos] = value
    with pytest.raises(StatsError, match="NaN/Inf") as e:
        Normalizer.from_data({"actions": x})
    assert e.value.key == "actions"
    with pytest.raises(StatsError):
        compute_stats(x)


def test_convert_stats_reads_openpi_and_lerobot_to_the_same_normaliser():
    st_ = {"mean": [1.0, 2.0], "std": [0.5, 0.25], "q01": [0.0, 1.0], "q99": [2.0, 3.0]}
    a = convert_stats({"norm_stats": {"actions": st_, "state": st_}})
    b = convert_stats({"action": {**st_, "min": [0, 0], "max": [3, 3]}, "observation.state": st_,
                       "timestamp": {"mean": [0.0]}})
    assert a["stats"].keys() == b["stats"].keys() == {"actions", "state"}
    for k in ("actions", "state"):
        for s in st_:
            np.testing.assert_array_equal(np.asarray(a["stats"][k][s], float), np.asarray(b["stats"][k][s], float))


# ---------------------------------------------------------------------------------------------- recipes
@settings(FAST, max_examples=40)
@given(key=st.sampled_from(["experts.act.hidden_sise", "backbone.typo", "action_horizn", "flow.kind", "nope",
                            "action_horizon", "normalization", "flow.time_sampler.type", "vision.type"]),
       value=st.sampled_from(["abc", "[1, 2]", "-3", "{a: 1}", "null", "zzz_component"]))
def test_recipe_overrides_error_with_the_key_path(key, value):
    try:
        cfg = vla_blocks.model_config("pi0-tiny", overrides=[f"{key}={value}"])
    except ConfigError as e:
        assert key.split(".")[-1] in str(e) or key.split(".")[0] in str(e), (key, value, str(e))
        return
    except ValueError as e:  # a dataclass __post_init__ range check (action_horizon=-3): names the field
        assert key.split(".")[-1] in str(e), (key, value, str(e))
        return
    # accepted: the value really is in the config
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node is None or str(node) in (value, str(value))


# ---------------------------------------------------------------------------------------------- loads
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    m = vla_blocks.create_model("mot-tiny")
    folder = m.save_pretrained(tmp_path_factory.mktemp("m") / "mot")
    return m, folder


@settings(FAST, max_examples=40)
@given(prefix=st.one_of(st.sampled_from(["lm.stak", "lm", "embed", "", "lm.stack.layers.0", "x.y", "lm_head"]),
                        st.text(alphabet="abcdefghijklmnopqrstuvwxyz._0123456789", min_size=1, max_size=12)),
       which=st.sampled_from(["only", "exclude"]))
def test_load_filters_that_match_nothing_are_errors(saved, prefix, which):
    from vla_blocks.hub import _matches_prefix, load_weights
    m, folder = saved
    target = vla_blocks.create_model("mot-tiny")
    keys = list(target.state_dict())
    matches = prefix and any(_matches_prefix(k, [prefix]) for k in keys)
    left = [k for k in keys if _matches_prefix(k, [prefix]) == (which == "only")] if matches else []
    try:
        report = load_weights(target, folder, strict=False, **{which: [prefix]})
    except LoadError as e:
        assert (not matches or not left) and e.key == which, (prefix, str(e))
        return
    assert matches and left
    sd, ref = target.state_dict(), m.state_dict()
    for k in report.loaded:
        assert torch.equal(sd[k], ref[k])
    assert report.loaded and all(_matches_prefix(k, [prefix]) == (which == "only") for k in report.loaded)


@settings(FAST, max_examples=15)
@given(damage=st.sampled_from(["truncate_weights", "bad_json", "no_type", "empty_config", "delete_weights"]))
def test_damaged_checkpoints_raise_project_errors(saved, tmp_path_factory, damage):
    import shutil
    from vla_blocks.hub import CorruptCheckpointError
    _, folder = saved
    bad = tmp_path_factory.mktemp("bad") / "m"
    shutil.copytree(folder, bad)
    w = bad / "model.safetensors"
    if damage == "truncate_weights":
        w.write_bytes(w.read_bytes()[:100])
    elif damage == "bad_json":
        (bad / "config.json").write_text("{not json")
    elif damage == "no_type":
        (bad / "config.json").write_text("{}")
    elif damage == "empty_config":
        (bad / "config.json").write_text("[]")
    else:
        w.unlink()
    with pytest.raises((CorruptCheckpointError, ConfigError, FileNotFoundError)):
        vla_blocks.create_model(f"local-dir:{bad}")


def test_ref_grammar_and_load_options_through_create_model(saved, tmp_path):
    m, folder = saved
    for ref in (str(folder), f"local-dir:{folder}", folder):
        got = vla_blocks.create_model(ref, strict=False)
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), m.state_dict().values()))
    with pytest.raises(LoadError) as e:
        vla_blocks.create_model("mot-tiny", strict=False)
    assert e.value.key == "strict"
    # a stale temporary folder of an interrupted save (a dead pid, or an older version's name) is removed
    dest = tmp_path / "out"
    (tmp_path / ".out.tmp-999999999-abc").mkdir()
    (tmp_path / ".out.tmp-xyz").mkdir()
    (tmp_path / ".other.tmp-1-abc").mkdir()
    m.save_pretrained(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1-abc", "out"]


# ---------------------------------------------------------------------------------------------- CLI
@settings(FAST, max_examples=25)
@given(argv=st.sampled_from([["info", "nope"], ["info", "pi0-tiny", "experts.act.hidden_sise=3"],
                             ["info", "pi0-tiny", "novalue"], ["bench", "attention", "--smoke", "--set", "seq_len=64"],
                             ["bench", "backbone", "--smoke", "--set", "widht=3"], ["info", "local-dir:/nonexistent"],
                             ["info", "hf-hub:bad"], ["stats", "/nonexistent"], ["push", "/nonexistent", "org/x"],
                             ["info", "pi0-tiny", "action_horizon=-1"]]))
def test_cli_errors_are_one_line_and_exit_2(argv, capsys):
    from vla_blocks.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and err.startswith(f"vla-blocks {argv[0]}: error:"), err


# ---------------------------------------------------------------------------------------------- recipe sizes
# key path -> the keys an error about it may name instead (a rule between two keys reports one of them)
_HEADS = ("num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim")
SIZE_KEYS = {
    "pi0-tiny": ["backbone.config.hidden_size", "backbone.config.intermediate_size", "backbone.config.num_hidden_layers",
                 "backbone.config.num_attention_heads", "backbone.config.num_key_value_heads", "backbone.config.head_dim",
                 "backbone.config.vocab_size", "action_expert.hidden_size", "action_expert.intermediate_size",
                 "action_expert.ffn_ratio", "action_expert.adarms_cond_dim", "action_horizon", "action_dim",
                 "n_action_steps", "max_token_len", "num_cameras", "state_dim", "flow.num_steps", "flow.points",
                 "vision.config.hidden_size", "vision.config.num_attention_heads", "vision.config.patch_size",
                 "vision.num_layers"],
    "acot-tiny": ["ear.horizon", "ear.stride", "ear.num_steps", "ear.expert.hidden_size", "ear.expert.intermediate_size",
                  "ear.expert.ffn_ratio", "agp_num_heads", "iar.num_heads", "iar.group_size", "n_action_steps",
                  "real_action_dim", "backbone.config.num_key_value_heads"],
    "halo-tiny": ["experts.act.ffn_ratio", "experts.gen.hidden_size", "experts.act.intermediate_size", "chunk_size",
                  "n_action_steps", "history_frames", "inference.action_points", "inference.latent_points",
                  "inference.max_new_tokens", "latent_patch_size", "max_latent_size", "vision.max_num_patches",
                  "backbone.config.num_attention_heads", "backbone.config.num_key_value_heads"],
}
COUPLED = {"n_action_steps": ("action_horizon", "chunk_size"), "action_horizon": ("n_action_steps",),
           "real_action_dim": ("action_dim",), "action_dim": ("real_action_dim",), "flow.points": ("flow",),
           "flow.num_steps": ("flow",), "ear.horizon": ("ear",), "ear.stride": ("ear",)}
EXPERT_OF = {"action_expert": "act", "ear.expert": "ear", "experts.act": "act", "experts.gen": "gen"}


def _accepted_keys(key: str) -> set[str]:
    parent, leaf = key.rpartition(".")[0], key.rpartition(".")[2]
    out = {key, *COUPLED.get(key, ())}
    if leaf in _HEADS:
        out |= {f"{parent}.{h}" for h in _HEADS}
    return out


def _value_at(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _stack_cfg(model):
    lm = getattr(model, "language_model", None) or model.lm
    return lm.stack.cfg


@settings(FAST, max_examples=90)
@given(recipe=st.sampled_from(sorted(SIZE_KEYS)), data=st.data(),
       value=st.sampled_from([0, -1, -16, 1, 2, 3, 5, 7, 16, 0.5, 0.0, -0.5, 1.5]))
def test_recipe_sizes_build_correctly_or_error_with_the_key_path(recipe, data, value):
    """Sizes 0 / negative / non-divisible / fractional at every size key of the tiny recipes: either a
    ConfigError whose ``key`` is the key path (or the key of the rule it breaks), or a model built with exactly
    that value (an expert width that silently fell back to the backbone's would fail here)."""
    key = data.draw(st.sampled_from(SIZE_KEYS[recipe]))
    if key.endswith("ffn_ratio") and isinstance(value, int):
        value = float(value)
    try:
        cfg = vla_blocks.model_config(recipe, overrides=[f"{key}={value}"])
        torch.manual_seed(0)
        model = cfg.build()
    except ConfigError as e:
        assert e.key in _accepted_keys(key), (key, value, e.key, str(e))
        assert e.key in str(e) or e.key.rpartition(".")[2] in str(e), str(e)
        return
    except Exception as e:  # noqa: BLE001 - anything else is the bug this test looks for
        raise AssertionError(f"{recipe} {key}={value!r}: {type(e).__name__}: {e}") from e
    assert _value_at(model.config, key) == value, (key, value)  # the value is used, not replaced
    assert not isinstance(value, bool) and value > 0, (key, value)  # no zero / negative size was accepted
    parent = key.rpartition(".")[0]
    if parent in EXPERT_OF:  # the built expert has the size the recipe asked for
        e = _stack_cfg(model).experts[EXPERT_OF[parent]]
        leaf = key.rpartition(".")[2]
        if leaf in ("hidden_size", "intermediate_size", "adarms_cond_dim"):
            assert getattr(e, leaf) == value, (key, value, e)
    if key.startswith("backbone.config."):
        assert getattr(cfg.backbone.hf_config(), key.rpartition(".")[2]) == value


def test_backbone_config_typo_and_zero_kv_heads_are_config_errors():
    with pytest.raises(ConfigError, match="num_hidden_layers") as e:  # did-you-mean
        vla_blocks.model_config("pi0-tiny", overrides=["backbone.config.num_hiden_layers=7"])
    assert e.value.key == "backbone"  # the backbone's own check names backbone.config.<key> in the message
    assert "backbone.config.num_hiden_layers" in str(e.value)
    with pytest.raises(ConfigError) as e:
        vla_blocks.model_config("pi0-tiny", overrides=["backbone.config.num_key_value_heads=0"])
    assert e.value.key == "backbone.config.num_key_value_heads"


# ---------------------------------------------------------------------------------------------- duplicate YAML keys
_DUP_SITES = [  # (key path, the YAML lines around it): the duplicated line is marked with {dup}
    ("action_dim", ["action_dim: 8", "{dup}action_dim: 6"]),
    ("action_expert.hidden_size", ["action_expert:", "  hidden_size: 16", "  {dup}hidden_size: 8",
                                   "  intermediate_size: 32"]),
    ("backbone.config.hidden_size", ["backbone:", "  config: !replace", "    hidden_size: 32",
                                     "    {dup}hidden_size: 64"]),
    ("flow.num_steps", ["flow:", "  num_steps: 4", "  {dup}num_steps: 5"]),
]


@settings(FAST, max_examples=30)
@given(site=st.integers(0, len(_DUP_SITES) - 1), duplicate=st.booleans(), pad=st.integers(0, 3))
def test_duplicate_yaml_keys_are_errors_with_file_line_and_key_path(tmp_path_factory, site, duplicate, pad):
    key, lines = _DUP_SITES[site]
    body = ["base: pi0-tiny"] + ["# a comment"] * pad
    dup_line = None
    for ln in lines:
        if "{dup}" in ln:
            if not duplicate:
                continue
            dup_line = len(body) + 1
        body.append(ln.replace("{dup}", ""))
    f = tmp_path_factory.mktemp("dup") / "r.yaml"
    f.write_text("\n".join(body) + "\n")
    try:
        cfg = vla_blocks.model_config(str(f))
    except ConfigError as e:
        assert duplicate, str(e)
        assert e.key == key and f"{f}:{dup_line}:" in str(e) and "duplicate key" in str(e), str(e)
        return
    assert not duplicate, f"duplicate {key} accepted"
    leaf = key.rpartition(".")[2]
    want = next(int(ln.split(":")[1]) for ln in lines if "{dup}" not in ln and ln.strip().startswith(leaf + ":"))
    assert _value_at(cfg, key) == want, key


def test_duplicate_keys_in_an_override_value_are_errors():
    with pytest.raises(ConfigError) as e:
        vla_blocks.model_config("pi0-tiny", overrides=["action_expert={hidden_size: 8, hidden_size: 16}"])
    assert e.value.key == "action_expert.hidden_size"


# ---------------------------------------------------------------------------------------------- attention backends
@pytest.fixture(scope="module")
def backend_names():
    from vla_blocks.attention.dispatch import backends
    return [b.name for b in backends()] + ["auto"]


@settings(FAST, max_examples=25)
@given(name=st.one_of(st.sampled_from(["sdpx", "SDPA", "flash", "triton ", "", "auto", "sdpa", "flex", "triton",
                                       "sdpa_blocks", "xformers", "flash_attn"]),
                      st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)))
def test_unknown_attention_backend_fails_at_build_with_the_valid_names(backend_names, name):
    cfg = vla_blocks.model_config("mot-tiny", overrides=[f"attention_backend={name!r}"])
    try:
        model = cfg.build()
    except ConfigError as e:
        assert name not in backend_names, (name, str(e))
        assert e.key == "attention_backend" and all(n in str(e) for n in backend_names), str(e)
        return
    assert name in backend_names
    assert _stack_cfg(model).attention_backend == name
