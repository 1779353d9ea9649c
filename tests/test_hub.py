"""Weights on disk and on the Hub, offline: local folders (tier A), a fake Hub cache (tier B), push with
the upload calls intercepted (tier C); strict/non-strict loads, corrupt files, shards, partial loads."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vla_blocks
from vla_blocks import hub
from vla_blocks.cli import main
from vla_blocks.model import VLAModel, create_model

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _offline(offline_hub):  # every test here runs against an empty offline Hub cache (conftest.offline_hub)
    return offline_hub


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("mot-tiny").eval()


def outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = model.demo_batch(batch_size=2, generator=g)
    with torch.no_grad():
        loss, _ = model(batch)
        gen = model.generate(batch["input_ids"][:4], max_new_tokens=3)
    return loss, gen


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    la, ga = outputs(a)
    lb, gb = outputs(b)
    assert torch.equal(la, lb) and torch.equal(ga, gb)


def assert_sharded(folder: Path, keys) -> list[Path]:
    """``folder`` holds a real sharded checkpoint: several ``model-i-of-n.safetensors`` files (n = their count)
    and no single file, and an index whose ``weight_map`` covers exactly ``keys``, names only existing shards,
    and says truly where each tensor is (read back with safetensors). Returns the shard paths."""
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    assert all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards), [p.name for p in shards]
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map) == set(keys)
    assert set(weight_map.values()) == {p.name for p in shards}
    for p in shards:
        assert set(load_file(p)) == {k for k, f in weight_map.items() if f == p.name}, p.name
    return shards


def fake_cache(cache: Path, repo_id: str, folder: Path, sha: str = SHA, refs=("main",)) -> Path:
    """The Hub cache layout: models--org--name/{refs/<ref>, snapshots/<sha>/<files>} (plain files, no blobs)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir(exist_ok=True)
    for r in refs:
        (repo / "refs" / r).write_text(sha)
    return snap


# ---------------------------------------------------------------------------------------------- tier A
def test_local_round_trip_identical_outputs(tiny, tmp_path):
    out = tiny.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for ref in (f"local-dir:{out}", str(out), out):
        loaded = VLAModel.from_pretrained(ref)
        assert type(loaded) is type(tiny) and not loaded.training
        assert_same_model(tiny, loaded)
    assert_same_model(tiny, create_model(f"local-dir:{out}"))
    assert_same_model(tiny, type(tiny).from_pretrained(out))


def test_config_json_and_model_card(tiny, tmp_path):
    out = tiny.save_pretrained(tmp_path / "m", card_kwargs={"license": "apache-2.0"})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vla_blocks_version"] == vla_blocks.__version__
    assert cfg["type"] == "mot_lm" and cfg["experts"]["act"]["hidden_size"] == 32
    assert vla_blocks.model_config(f"local-dir:{out}") == tiny.config
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: vla_blocks" in front and "- robotics" in front and "- vla" in front
    assert "license: apache-2.0" in front
    from huggingface_hub import ModelCard
    data = ModelCard.load(out / "README.md").data
    assert data.library_name == "vla_blocks" and {"robotics", "vla"} <= set(data.tags)


def test_overrides_on_load_and_wrong_class(tiny, tmp_path):
    out = tiny.save_pretrained(tmp_path / "m")
    m = create_model(f"local-dir:{out}", attention_backend="sdpa")
    assert m.config.attention_backend == "sdpa"
    assert_same_model(tiny, m)

    class Other(VLAModel):
        pass
    with pytest.raises(TypeError, match="holds a MoTLM"):
        Other.from_pretrained(out)


def test_normalisation_stats_round_trip(tiny, tmp_path):
    from vla_blocks.normalize import Normalizer
    model = create_model("mot-tiny")
    model.normalizer = Normalizer("quantile", {"actions": {"q01": [-1.0, 0.0], "q99": [1.0, 2.0]}})
    out = model.save_pretrained(tmp_path / "m")
    data = json.loads((out / "normalization.json").read_text())
    assert data["normalizers"]["normalizer"]["stats"]["actions"]["q99"] == [1.0, 2.0]
    loaded = VLAModel.from_pretrained(out)
    x = torch.tensor([[0.5, 1.0]])
    assert torch.equal(loaded.normalizer.normalize("actions", x), model.normalizer.normalize("actions", x))
    assert loaded.normalizer.mode == "quantile"


def test_portable_config_drops_local_backbone_path(tmp_path):
    """A recipe whose backbone points at a local transformers folder saves its architecture instead of the path."""
    from transformers import AutoConfig, AutoModelForCausalLM
    ckpt = tmp_path / "qwen"
    conf = AutoConfig.for_model("qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    AutoModelForCausalLM.from_config(conf).save_pretrained(ckpt)
    model = create_model("mot-tiny", **{"backbone.pretrained": str(ckpt), "backbone.config": {},
                                        "experts.act.hidden_size": 16})
    out = model.save_pretrained(tmp_path / "m")
    saved = json.loads((out / "config.json").read_text())
    assert saved["backbone"]["pretrained"] is None and saved["backbone"]["config"]["hidden_size"] == 32
    import shutil
    shutil.rmtree(ckpt)
    assert_same_model(model.eval(), VLAModel.from_pretrained(out))


# ---------------------------------------------------------------------------------------------- tier B
def test_fake_hub_cache_identical_outputs(tiny, tmp_path, offline_hub):
    folder = tiny.save_pretrained(tmp_path / "m")
    fake_cache(offline_hub, "vla-blocks/mot-tiny", folder, refs=("main", "v1"))
    for ref in ("hf-hub:vla-blocks/mot-tiny", f"hf-hub:vla-blocks/mot-tiny@{SHA}", "hf-hub:vla-blocks/mot-tiny@v1"):
        assert_same_model(tiny, create_model(ref))
    assert_same_model(tiny, VLAModel.from_pretrained("vla-blocks/mot-tiny"))
    assert vla_blocks.model_config("hf-hub:vla-blocks/mot-tiny") == tiny.config


def test_fake_hub_cache_dir_argument(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "m")
    other = tmp_path / "elsewhere"
    fake_cache(other, "org/tiny", folder)
    assert_same_model(tiny, VLAModel.from_pretrained("hf-hub:org/tiny", cache_dir=str(other)))
    with pytest.raises(FileNotFoundError):
        VLAModel.from_pretrained("hf-hub:org/tiny")  # not in the default cache


def test_fake_hub_cache_sharded(tiny, tmp_path, offline_hub):
    folder = tiny.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    snap = fake_cache(offline_hub, "org/sharded", folder)
    assert_sharded(snap, tiny.state_dict())  # the cached snapshot really is sharded
    assert_same_model(tiny, create_model("hf-hub:org/sharded"))


def test_offline_and_not_cached_says_what_to_do(offline_hub):
    with pytest.raises(FileNotFoundError) as e:
        create_model("hf-hub:org/absent@v2")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE=0" in msg and "hf download org/absent --revision v2" in msg
    assert main(["info", "hf-hub:org/absent"]) == 2
    with pytest.raises(FileNotFoundError, match="no local folder 'runs/ckpt' either"):
        VLAModel.from_pretrained("runs/ckpt")


def test_cached_repo_that_is_not_a_vla_blocks_model(tmp_path, offline_hub):
    up = tmp_path / "up"
    up.mkdir()
    (up / "ema.safetensors").write_bytes(b"")
    fake_cache(offline_hub, "org/upstream", up)
    with pytest.raises(FileNotFoundError, match="config.json"):
        create_model("hf-hub:org/upstream")


# ---------------------------------------------------------------------------------------------- tier C
@pytest.fixture
def fake_upload(monkeypatch):
    from huggingface_hub import HfApi
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        from fnmatch import fnmatch
        folder = Path(kw["folder_path"])
        files = sorted(p.name for p in folder.iterdir() if any(fnmatch(p.name, pat) for pat in kw["allow_patterns"]))
        calls.append(("upload_folder", kw["repo_id"], dict(kw, files=files)))

        class Info:
            commit_url = f"https://huggingface.co/{kw['repo_id']}/commit/{SHA}"
        return Info()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_model_uploads_saved_files(tiny, fake_upload):
    url = tiny.push_to_hub("me/mot-tiny", private=True)
    assert url.endswith(SHA)
    (c1, repo, kw1), (c2, _, kw2) = fake_upload
    assert (c1, repo, kw1["private"], kw1["exist_ok"]) == ("create_repo", "me/mot-tiny", True, True)
    assert c2 == "upload_folder" and kw2["repo_id"] == "me/mot-tiny" and kw2["revision"] is None
    assert kw2["files"] == ["README.md", "config.json", "model.safetensors"]
    assert "model-*-of-*.safetensors" in kw2["delete_patterns"]


def test_push_folder_sharded_with_branch_and_stats(tmp_path, fake_upload):
    from vla_blocks.normalize import Normalizer
    model = create_model("mot-tiny")
    model.normalizer = Normalizer("zscore", {"actions": {"mean": [0.0], "std": [1.0]}})
    folder = model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    shards = [p.name for p in assert_sharded(folder, model.state_dict())]
    (folder / "notes.txt").write_text("not uploaded")
    hub.push_to_hub(folder, "me/sharded", revision="v1", commit_message="first")
    names = [c[0] for c in fake_upload]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    kw = fake_upload[2][2]
    assert kw["revision"] == "v1" and kw["commit_message"] == "first"
    assert sorted(f for f in kw["files"] if f.startswith("model-")) == shards  # every shard, nothing else
    assert "model.safetensors.index.json" in kw["files"] and "normalization.json" in kw["files"]
    assert "notes.txt" not in kw["files"] and "model.safetensors" not in kw["files"]


def test_push_cli(tiny, tmp_path, fake_upload, capsys):
    folder = tiny.save_pretrained(tmp_path / "m")
    assert main(["push", str(folder), "me/cli", "--private", "--revision", "dev"]) == 0
    out = capsys.readouterr().out
    assert "config.json" in out and out.strip().endswith(SHA)
    assert fake_upload[0][2]["private"] is True and fake_upload[1][2]["branch"] == "dev"
    assert main(["push", str(tmp_path), "me/cli"]) == 2
    assert "save_pretrained" in capsys.readouterr().err


def test_push_offline_says_what_to_do(tiny, tmp_path, capsys):
    folder = tiny.save_pretrained(tmp_path / "m")
    with pytest.raises(hub.HubAccessError, match="HF_HUB_OFFLINE=0"):
        hub.push_to_hub(folder, "me/x")
    assert main(["push", str(folder), "me/x"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_cli_help_and_info_on_saved_folder(tiny, tmp_path, capsys):
    for cmd in ("push",):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    folder = tiny.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    assert main(["info", f"local-dir:{folder}"]) == 0
    assert "[expert act]" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- strictness
def _edit_weights(folder: Path, fn):
    f = folder / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def test_strict_missing_unexpected_misshapen(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "m")
    k_missing = "lm.stack.layers.1.experts.gen.mlp.up_proj.weight"

    def edit(sd):
        del sd[k_missing]
        sd["lm.extra.weight"] = torch.zeros(3)
        sd["lm.embed_tokens.weight"] = torch.zeros(7, 64)
    _edit_weights(folder, edit)
    with pytest.raises(hub.WeightsMismatchError) as e:
        VLAModel.from_pretrained(folder)
    msg = str(e.value)
    assert k_missing in msg and "lm.extra.weight" in msg
    assert "lm.embed_tokens.weight: checkpoint [7, 64] vs model [256, 64]" in msg
    assert "strict=False" in msg
    r = e.value.report
    assert r.missing == [k_missing] and r.unexpected == ["lm.extra.weight"] and len(r.mismatched) == 1

    model, report = VLAModel.from_pretrained(folder, strict=False, output_loading_info=True)
    assert report.missing == [k_missing] and report.unexpected == ["lm.extra.weight"]
    sd = model.state_dict()
    for k, v in tiny.state_dict().items():
        if k not in (k_missing, "lm.embed_tokens.weight"):
            assert torch.equal(sd[k], v), k


def test_misshapen_by_override_fails_strict(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "m")
    with pytest.raises(hub.WeightsMismatchError, match="experts.act"):
        create_model(f"local-dir:{folder}", **{"experts.act.hidden_size": 48})


def test_truncated_and_corrupt_files_name_the_file(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "m")
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(hub.CorruptCheckpointError) as e:
        VLAModel.from_pretrained(folder)
    assert str(f) in str(e.value) and "truncated" in str(e.value)
    f.write_bytes(b"not a safetensors file at all")
    with pytest.raises(hub.CorruptCheckpointError, match="model.safetensors"):
        VLAModel.from_pretrained(folder)
    (folder / "config.json").write_text("{ nope")
    with pytest.raises(hub.CorruptCheckpointError, match="config.json"):
        VLAModel.from_pretrained(folder)


def test_sharded_round_trip_and_missing_shard(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    shards = assert_sharded(folder, tiny.state_dict())
    assert_same_model(tiny, VLAModel.from_pretrained(folder))
    shards[-1].unlink()
    with pytest.raises(hub.CorruptCheckpointError, match=shards[-1].name):
        VLAModel.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------- atomic writes
def test_save_is_atomic_on_error(tiny, tmp_path, monkeypatch):
    import huggingface_hub
    folder = tiny.save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def boom(sd, save_directory, **kw):
        (Path(save_directory) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(huggingface_hub, "save_torch_state_dict", boom)
    other = create_model("mot-tiny", **{"experts.act.hidden_size": 16})
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(folder)
    with pytest.raises(OSError):
        other.save_pretrained(tmp_path / "new")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_home", "m"]  # no temp or half-written folders


def test_resave_replaces_stale_shards_and_keeps_other_files(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    (folder / "train_config.yaml").write_text("lr: 1")
    tiny.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                       "train_config.yaml"]
    assert_same_model(tiny, VLAModel.from_pretrained(folder))


# ---------------------------------------------------------------------------------------------- partial loads
def test_only_prefix_loads_the_stack(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "m")
    torch.manual_seed(1)
    other = create_model("mot-tiny", **{"backbone.seed": 1})
    emb_before = other.lm.embed_tokens.weight.clone()
    report = hub.load_weights(other, folder, only=["lm.stack"])
    assert report.ok and not report.unexpected and all(k.startswith("lm.stack.") for k in report.loaded)
    for k, v in tiny.state_dict().items():
        if k.startswith("lm.stack."):
            assert torch.equal(other.state_dict()[k], v)
    assert torch.equal(other.lm.embed_tokens.weight, emb_before)
    assert not torch.equal(emb_before, tiny.lm.embed_tokens.weight)


def test_expert_map_initialises_a_new_expert_from_another(tiny, tmp_path):
    """A 3-expert checkpoint into a 4-expert recipe: the new expert copies the source's act expert."""
    folder = tiny.save_pretrained(tmp_path / "m")
    bigger = create_model("mot-tiny", **{"experts.ear": {"hidden_size": 32, "ffn_ratio": 0.5, "init_from": None}})
    with pytest.raises(hub.WeightsMismatchError, match="experts.ear"):
        hub.load_weights(bigger, folder)
    report = hub.load_weights(bigger, folder, expert_map={"ear": "act"})
    assert report.ok and report.remapped
    sd, src = bigger.state_dict(), tiny.state_dict()
    for k, v in src.items():
        assert torch.equal(sd[k], v), k
        if ".experts.act." in k or ".norms.act." in k:
            assert torch.equal(sd[k.replace(".act.", ".ear.")], v)
    # the same through from_pretrained with another recipe
    m = VLAModel.from_pretrained(folder, recipe="mot-tiny", overrides={"experts.ear": {"hidden_size": 32,
                                                                                        "ffn_ratio": 0.5}},
                                 expert_map={"ear": "act"})
    assert torch.equal(m.lm.stack.layers[0].experts.ear.q_proj.weight,
                       tiny.lm.stack.layers[0].experts.act.q_proj.weight)


def test_key_map_and_allow_missing(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "m")
    src = tiny.state_dict()
    renamed = {k.replace("lm.stack.", "lm.old_stack."): v for k, v in src.items()}
    other = create_model("mot-tiny")
    report = hub.load_weights(other, renamed, key_map={"lm.stack": "lm.old_stack"})
    assert report.ok and len(report.remapped) == sum(k.startswith("lm.stack.") for k in src)
    drop = {k: v for k, v in src.items() if "experts.gen" not in k and "norms.gen" not in k}
    with pytest.raises(hub.WeightsMismatchError):
        hub.load_weights(other, drop)
    report = hub.load_weights(other, drop, allow_missing=[r"\.(experts|norms)\.gen\."])
    assert report.ok and report.allowed_missing and not report.missing
    assert hub.expert_key_map({"ear": "act"})("lm.stack.norms.ear.weight") == "lm.stack.norms.act.weight"
    assert hub.prefix_key_map({"a.b": "x"})("a.b.c") == "x.c"
    assert hub.prefix_key_map({"a.b": "x"})("a.bc") == "a.bc"


def test_recipe_reference_builds_without_weights():
    m = VLAModel.from_pretrained("mot-tiny")
    assert type(m).__name__ == "MoTLM"
    with pytest.raises(vla_blocks.ConfigError, match="hf-hub:org/name"):
        hub.parse_ref("definitely not a thing")


@pytest.mark.parametrize("name", ["pi0-mw", "acot-mw-noear"])
def test_committed_metaworld_checkpoints_load_and_act(name):
    """The Meta-World table's two best policies are committed in the Hub folder layout and load as they are."""
    import vla_blocks
    folder = Path(__file__).resolve().parents[1] / "benchmarks/results/cpu-amd-epyc-2c/metaworld-models" / name
    model = vla_blocks.create_model(f"local-dir:{folder}").eval()
    batch = model.demo_batch(1, torch.Generator().manual_seed(0))
    chunk = model.predict_action_chunk(batch)
    assert chunk.shape == (1, model.config.action_horizon, model.config.real_action_dim or model.config.action_dim)
    assert torch.isfinite(chunk).all()
