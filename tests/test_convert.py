"""Converters from upstream checkpoints, offline, on synthetic checkpoints that use the real key names at the
tiny recipes' shapes. The converted models are compared with modules laid out the upstream way (tests/oracles),
written from the reference notes (../shared/reference/halo_bagel.md §1, §6; acot_pi0.md §1-3): a BAGEL/HALO Qwen2-MoT
stack that looks its weights up by their suffixed names and routes tokens with gather/scatter, and an
openpi/lerobot PaliGemma-with-expert stack (concatenated Q/K/V, prefix-LM mask, Gemma and adaRMS norms)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vla_blocks.models.acot import ACOT_FROM_PI05
from vla_blocks import hub
from vla_blocks.cli import main
from vla_blocks.convert import ConversionError, check_mapping, convert
from vla_blocks.layout import Layout, Part, Segment
from vla_blocks.model import VLAModel, create_model, model_config

from oracles.bagel import qwen2_mot_stack
from oracles.openpi import paligemma_with_expert

SHA = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def _offline(offline_hub):  # every test here runs against an empty offline Hub cache (conftest.offline_hub)
    return offline_hub


def rand(*shape, g, scale=0.2, one=False):
    t = torch.randn(*shape, generator=g) * scale
    return (1.0 + t if one else t).to(torch.bfloat16)  # upstream checkpoints are bf16; conversion goes via fp32


# ---------------------------------------------------------------------------------------------- HALO / BAGEL
# halo-tiny: D 64, 4 heads / 2 KV heads of 16, FFN 128, 2 layers; the synthetic checkpoint uses a vocabulary
# of 333 rows and an act FFN of 96 (HALO's action_expert_mlp_ratio): both must be read off the tensors.
D, H, HKV, HD, FFN, FFN_ACT, LAYERS, VOCAB = 64, 4, 2, 16, 128, 96, 2, 333
SUFFIXES = {"": "und", "_moe_gen": "gen", "_moe_act": "act"}


def siglip_shapes(prefix: str, layers: int, width: int, mlp: int, patch: tuple, positions: int):
    """SigLIP vision tower names (shared by SigLIP, BAGEL's NaViT SigLIP and SigLIP2)."""
    shapes = {f"{prefix}embeddings.patch_embedding.weight": (width, *patch),
              f"{prefix}embeddings.patch_embedding.bias": (width,),
              f"{prefix}embeddings.position_embedding.weight": (positions, width),
              f"{prefix}post_layernorm.weight": (width,), f"{prefix}post_layernorm.bias": (width,)}
    for j in range(layers):
        L = f"{prefix}encoder.layers.{j}."
        for n in ("layer_norm1", "layer_norm2"):
            shapes[L + n + ".weight"] = shapes[L + n + ".bias"] = (width,)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[L + f"self_attn.{n}.weight"], shapes[L + f"self_attn.{n}.bias"] = (width, width), (width,)
        shapes[L + "mlp.fc1.weight"], shapes[L + "mlp.fc1.bias"] = (mlp, width), (mlp,)
        shapes[L + "mlp.fc2.weight"], shapes[L + "mlp.fc2.bias"] = (width, mlp), (width,)
    return shapes


def linear(shapes: dict, name: str, out_f: int, in_f: int, bias: bool = True):
    shapes[name + ".weight"] = (out_f, in_f)
    if bias:
        shapes[name + ".bias"] = (out_f,)


def bagel_shapes(L, D, H, HKV, HD, FFN, FFN_ACT, V, vit: dict, vit_side: int, latent_side: int, action_dim: int,
                 latent_ch: int = 16, patch: int = 2) -> dict[str, tuple]:
    """BAGEL/HALO ``ema.safetensors`` names and shapes (halo_bagel.md §1.1, §1.5, §6.2)."""
    sh: dict[str, tuple] = {}
    for i in range(L):
        P = f"language_model.model.layers.{i}"
        for S in SUFFIXES:
            f = FFN_ACT if S == "_moe_act" else FFN
            linear(sh, f"{P}.self_attn.q_proj{S}", H * HD, D)
            linear(sh, f"{P}.self_attn.k_proj{S}", HKV * HD, D)
            linear(sh, f"{P}.self_attn.v_proj{S}", HKV * HD, D)
            linear(sh, f"{P}.self_attn.o_proj{S}", D, H * HD, bias=False)
            sh[f"{P}.self_attn.q_norm{S}.weight"] = sh[f"{P}.self_attn.k_norm{S}.weight"] = (HD,)
            sh[f"{P}.input_layernorm{S}.weight"] = sh[f"{P}.post_attention_layernorm{S}.weight"] = (D,)
            linear(sh, f"{P}.mlp{S}.gate_proj", f, D, bias=False)
            linear(sh, f"{P}.mlp{S}.up_proj", f, D, bias=False)
            linear(sh, f"{P}.mlp{S}.down_proj", D, f, bias=False)
    for S in SUFFIXES:
        sh[f"language_model.model.norm{S}.weight"] = (D,)
    sh["language_model.model.embed_tokens.weight"] = sh["language_model.lm_head.weight"] = (V, D)
    sh.update(siglip_shapes("vit_model.vision_model.", **vit))
    C = vit["width"]
    linear(sh, "connector.fc1", D, C)
    linear(sh, "connector.fc2", D, D)
    sh["vit_pos_embed.pos_embed"] = (vit_side ** 2, D)
    sh["latent_pos_embed.pos_embed"] = (latent_side ** 2, D)
    for te in ("time_embedder", "action_time_embedder"):
        linear(sh, f"{te}.mlp.0", D, 256)
        linear(sh, f"{te}.mlp.2", D, D)
    linear(sh, "vae2llm", D, latent_ch * patch * patch)
    linear(sh, "llm2vae", latent_ch * patch * patch, D)
    linear(sh, "input_linear_layer", D, action_dim)
    linear(sh, "output_linear_layer", action_dim, D)
    return sh


TINY_VIT = dict(layers=2, width=32, mlp=64, patch=(3 * 8 * 8,), positions=16)


def bagel_checkpoint(g: torch.Generator) -> dict[str, torch.Tensor]:
    """A synthetic HALO checkpoint at halo-tiny's shapes (the sin-cos tables hold the real tables)."""
    shapes = bagel_shapes(LAYERS, D, H, HKV, HD, FFN, FFN_ACT, VOCAB, TINY_VIT, vit_side=16, latent_side=8,
                          action_dim=14)
    fresh = create_model("halo-tiny")
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("pos_embed.pos_embed"):
            sd[k] = fresh.state_dict()[k].to(torch.bfloat16)
        else:
            sd[k] = rand(*shape, g=g, one="norm" in k and k.endswith(".weight"))
    return sd


def tiny_vae_diffusers(g) -> dict[str, torch.Tensor]:
    ref = create_model("halo-tiny").state_dict()
    return {k[len("vae.vae."):]: rand(*v.shape, g=g) for k, v in ref.items() if k.startswith("vae.vae.")}


@pytest.fixture(scope="module")
def halo_src(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    d = tmp_path_factory.mktemp("halo_src")
    sd = bagel_checkpoint(g)
    save_file(sd, d / "ema.safetensors")
    save_file(tiny_vae_diffusers(g), d / "vae.safetensors")
    return d, sd


@pytest.fixture(scope="module")
def halo_converted(halo_src, tmp_path_factory):
    d, sd = halo_src
    out, report = convert("halo", d, tmp_path_factory.mktemp("halo_out") / "halo", recipe="halo-tiny",
                          vae=str(d / "vae.safetensors"))
    return out, report, VLAModel.from_pretrained(out)


def test_halo_weights_land_where_bagel_names_say(halo_converted, halo_src):
    out, report, model = halo_converted
    _, sd = halo_src
    own = model.state_dict()
    assert all(v.dtype == torch.float32 for v in own.values())
    assert model.lm.embed_tokens.num_embeddings == VOCAB  # vocabulary size from the tensor
    assert model.config.backbone.config["vocab_size"] == VOCAB
    assert model.lm.stack.layers[0].experts.act.mlp.gate_proj.out_features == FFN_ACT
    checks = {
        "language_model.model.layers.1.self_attn.k_proj_moe_gen.bias": "lm.stack.layers.1.experts.gen.k_proj.bias",
        "language_model.model.layers.0.mlp_moe_act.down_proj.weight":
            "lm.stack.layers.0.experts.act.mlp.down_proj.weight",
        "language_model.model.layers.0.self_attn.q_norm.weight": "lm.stack.layers.0.experts.und.q_norm.weight",
        "language_model.model.norm_moe_act.weight": "lm.stack.norms.act.weight",
        "language_model.lm_head.weight": "lm.lm_head.weight",
        "vit_model.vision_model.encoder.layers.0.self_attn.q_proj.weight":
            "vit_model.model.encoder.layers.0.self_attn.q_proj.weight",
        "connector.fc2.bias": "connector.fc2.bias",
        "action_time_embedder.mlp.2.weight": "action_time_embedder.mlp.2.weight",
    }
    for s, t in checks.items():
        assert report.mapped[s] == t
        assert torch.equal(own[t], sd[s].float()), s
    for s, t in report.mapped.items():
        if ":" not in s:
            assert torch.equal(own[t], sd[s].float()), s
    # every source key is mapped or dropped with a reason; the sin-cos tables are regenerated
    assert not report.unmapped and set(report.mapped) | set(report.dropped) >= set(sd)
    assert set(report.dropped) == {"latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"}
    fresh = create_model("halo-tiny")
    assert torch.equal(own["latent_pos_embed.pos_embed"], fresh.latent_pos_embed.pos_embed)
    assert not any("differs" in n for n in report.notes)
    assert not model.latent_pos_embed.pos_embed.requires_grad
    # the VAE from its own file
    from safetensors.torch import load_file
    vae = load_file(halo_src[0] / "vae.safetensors")
    assert all(torch.equal(own["vae.vae." + k], v.float()) for k, v in vae.items())
    card = (out / "README.md").read_text()
    assert "vla-blocks convert halo" in card and "- converted" in card


def test_halo_mot_stack_matches_bagel_layer(halo_converted, halo_src):
    """The converted MoT stack (3 experts, 2 layers, final norms) equals BAGEL's gather/scatter layer."""
    _, _, model = halo_converted
    _, sd = halo_src
    sample = [Segment.of("causal", "und", 5, "text"),
              Segment("full", [Part("und", 1, "vision_start"), Part("gen", 4, "latent"), Part("und", 1, "vision_end")],
                      rope="block"),
              Segment.of("noise", "act", 3, "action", rope="block_hold")]
    layout = Layout.from_samples([sample], ["und", "gen", "act"])
    N = layout.seq_len
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g)
    idx = layout.expert_indices()
    hidden = {e: x[i] for e, i in idx.items()}
    with torch.no_grad():
        ours = model.lm.stack(hidden, layout).hidden
    groups = {S: idx[e] for S, e in SUFFIXES.items()}
    ref = qwen2_mot_stack(sd, x, groups, layout.position_ids[0], layout.dense_mask()[0], LAYERS, H, HKV, HD)
    for e, i in idx.items():
        torch.testing.assert_close(ours[e], ref[i], rtol=1e-5, atol=1e-5)


def test_halo_unmapped_and_missing_are_reported(halo_src, tmp_path):
    d, sd = halo_src
    src = tmp_path / "src"
    src.mkdir()
    extra = dict(sd)
    extra["language_model.model.layers.0.self_attn.q_proj_moe_und2.weight"] = torch.zeros(2)
    extra["mystery.weight"] = torch.zeros(3)
    save_file(extra, src / "ema.safetensors")
    with pytest.raises(ConversionError) as e:
        convert("halo", src, tmp_path / "out", recipe="halo-tiny", vae=str(d / "vae.safetensors"))
    msg = str(e.value)
    assert "mystery.weight" in msg and "q_proj_moe_und2.weight" in msg and "--allow-unmapped" in msg
    assert not (tmp_path / "out").exists()
    out, report = convert("halo", src, tmp_path / "out", recipe="halo-tiny", vae=str(d / "vae.safetensors"),
                          allow_unmapped=True)
    assert set(report.unmapped) == {"mystery.weight", "language_model.model.layers.0.self_attn.q_proj_moe_und2.weight"}
    # without the VAE file the VAE tensors have no source
    with pytest.raises(ConversionError, match="--vae") as e:
        convert("halo", d, tmp_path / "out2", recipe="halo-tiny")
    assert "vae.vae.encoder.conv_in.weight" in str(e.value)
    _, report = convert("halo", d, tmp_path / "out2", recipe="halo-tiny", allow_missing=["vae"])
    assert not report.missing


def test_halo_overlay_replaces_tensors(halo_src, tmp_path):
    d, sd = halo_src
    ft = {"output_linear_layer.weight": torch.ones_like(sd["output_linear_layer.weight"])}
    save_file(ft, tmp_path / "ft.safetensors")
    out, _ = convert("halo", d, tmp_path / "out", recipe="halo-tiny", vae=str(d / "vae.safetensors"),
                     overlays=[str(tmp_path / "ft.safetensors")])
    m = VLAModel.from_pretrained(out)
    assert torch.equal(m.output_linear_layer.weight, torch.ones(14, D))
    assert torch.equal(m.input_linear_layer.weight, sd["input_linear_layer.weight"].float())


# ---------------------------------------------------------------------------------------------- lerobot pi0 / pi0.5
# pi0-tiny / pi05-tiny: Gemma vlm D 32 (FFN 64, vocab 128), act expert W 16 (FFN 32), 2 heads / 1 KV head of 16,
# 2 layers; SigLIP 16 wide, 1 layer, 28 px / patch 14; action_dim 8.
PD, PW, PH, PHKV, PHD, PFFN, PFFN_A, PL, PV, PA = 32, 16, 2, 1, 16, 64, 32, 2, 128, 8
PALI = "model.paligemma_with_expert.paligemma.model."
EXP = "model.paligemma_with_expert.gemma_expert."


def lerobot_shapes(pi05: bool, L, D, W, H, HKV, HD, F, FA, V, A, vision: dict) -> dict[str, tuple]:
    """lerobot's pi0 / pi0.5 ``model.safetensors`` names and shapes (acot_pi0.md §2.4 target names + ``model.``;
    the adaRMS norms of pi0.5's expert have only ``dense``; both LM heads are present)."""
    sh: dict[str, tuple] = {}
    for i in range(L):
        for prefix, w, f, ada in ((f"{PALI}language_model.layers.{i}.", D, F, False),
                                  (f"{EXP}model.layers.{i}.", W, FA, pi05)):
            linear(sh, prefix + "self_attn.q_proj", H * HD, w, bias=False)
            linear(sh, prefix + "self_attn.k_proj", HKV * HD, w, bias=False)
            linear(sh, prefix + "self_attn.v_proj", HKV * HD, w, bias=False)
            linear(sh, prefix + "self_attn.o_proj", w, H * HD, bias=False)
            linear(sh, prefix + "mlp.gate_proj", f, w, bias=False)
            linear(sh, prefix + "mlp.up_proj", f, w, bias=False)
            linear(sh, prefix + "mlp.down_proj", w, f, bias=False)
            for n in ("input_layernorm", "post_attention_layernorm"):
                if ada:
                    linear(sh, prefix + n + ".dense", 3 * w, w)
                else:
                    sh[prefix + n + ".weight"] = (w,)
    sh[PALI + "language_model.norm.weight"] = (D,)
    if pi05:
        linear(sh, EXP + "model.norm.dense", 3 * W, W)
    else:
        sh[EXP + "model.norm.weight"] = (W,)
    sh[PALI + "language_model.embed_tokens.weight"] = (V, D)
    sh["model.paligemma_with_expert.paligemma.lm_head.weight"] = (V, D)
    sh[EXP + "lm_head.weight"] = (V, W)
    sh.update(siglip_shapes(PALI + "vision_tower.vision_model.", **vision))
    linear(sh, PALI + "multi_modal_projector.linear", D, vision["width"])
    linear(sh, "model.action_in_proj", W, A)
    linear(sh, "model.action_out_proj", A, W)
    if pi05:
        linear(sh, "model.time_mlp_in", W, W)
        linear(sh, "model.time_mlp_out", W, W)
    else:
        linear(sh, "model.state_proj", W, A)
        linear(sh, "model.action_time_mlp_in", W, 2 * W)
        linear(sh, "model.action_time_mlp_out", W, W)
    return sh


def lerobot_checkpoint(pi05: bool, g) -> dict[str, torch.Tensor]:
    """A synthetic lerobot checkpoint at pi0-tiny / pi05-tiny's shapes (the PaliGemma LM head tied)."""
    vision = dict(layers=1, width=16, mlp=32, patch=(3, 14, 14), positions=4)
    shapes = lerobot_shapes(pi05, PL, PD, PW, PH, PHKV, PHD, PFFN, PFFN_A, PV, PA, vision)
    sd = {k: rand(*shape, g=g) for k, shape in shapes.items()}
    sd["model.paligemma_with_expert.paligemma.lm_head.weight"] = sd[PALI + "language_model.embed_tokens.weight"]
    return sd


def write_lerobot(folder: Path, pi05: bool, seed=0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    sd = lerobot_checkpoint(pi05, torch.Generator().manual_seed(seed))
    save_file({k: v.clone() for k, v in sd.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"type": "pi05" if pi05 else "pi0"}))
    stats = {"action.q01": -torch.ones(7), "action.q99": torch.ones(7) * 2, "action.mean": torch.zeros(7),
             "action.std": torch.ones(7), "observation.state.q01": -torch.ones(8),
             "observation.state.q99": torch.ones(8),
             "observation.state.mean": torch.zeros(8), "observation.state.std": torch.ones(8) * 3}
    save_file(stats, folder / "policy_preprocessor_step_3_normalizer_processor.safetensors")
    return sd


@pytest.mark.parametrize("kind", ["pi0", "pi05"])
def test_lerobot_pi_conversion_matches_openpi_layers(kind, tmp_path):
    pi05 = kind == "pi05"
    sd = write_lerobot(tmp_path / "src", pi05)
    out, report = convert(kind, tmp_path / "src", tmp_path / "out", recipe=f"{kind}-tiny")
    model = VLAModel.from_pretrained(out)
    own = model.state_dict()
    assert not report.unmapped and not report.missing
    assert {k for k, r in report.dropped.items()} == {"model.paligemma_with_expert.paligemma.lm_head.weight",
                                                      EXP + "lm_head.weight"}
    for s, t in report.mapped.items():
        assert torch.equal(own[t], sd[s].float()), s
    assert report.mapped[PALI + "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"] == \
        "vision_tower.model.encoder.layers.0.mlp.fc1.weight"
    assert report.mapped[EXP + "model.layers.1.self_attn.o_proj.weight"] == \
        "language_model.stack.layers.1.experts.act.o_proj.weight"
    if pi05:  # adaRMS norms have only the Dense upstream; our fallback scale is filled with zeros
        assert len(report.filled) == 2 * PL + 1
        assert torch.equal(own["language_model.stack.norms.act.weight"], torch.zeros(PW))
    # normalisation statistics carried over from lerobot's processor file
    st = model.normalizer.stats("actions")
    key = ("q01", "q99") if pi05 else ("mean", "std")
    assert torch.equal(st[key[1]], torch.tensor([2.0] * 7) if pi05 else torch.ones(7))
    assert json.loads((out / "normalization.json").read_text())["normalizers"]["normalizer"]["stats"]["state"]

    # the converted MoT stack equals openpi's joint layer
    P, S = 6, 3
    g = torch.Generator().manual_seed(2)
    prefix, suffix = torch.randn(P, PD, generator=g), torch.randn(S, PW, generator=g)
    cond = torch.randn(1, PW, generator=g)
    layout = Layout.from_samples([[Segment.of("full", "vlm", P, "prefix"), Segment.of("noise", "act", S, "actions")]],
                                 ["vlm", "act"])
    with torch.no_grad():
        ours = model.language_model.stack({"vlm": prefix, "act": suffix}, layout,
                                          cond={"act": cond.expand(S, -1)} if pi05 else None).hidden
    ref0, ref1 = paligemma_with_expert(sd, prefix, suffix, cond, pi05, PL, PH, PHKV, PHD, PALI, EXP)
    torch.testing.assert_close(ours["vlm"], ref0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["act"], ref1, rtol=1e-5, atol=1e-5)
    # and the converted policy runs
    batch = model.demo_batch(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        chunk = model.predict_action_chunk(batch)
    assert torch.isfinite(chunk).all()


def test_pi05_from_fake_hub_cache_and_cli(tmp_path, offline_hub, capsys):
    """`vla-blocks convert pi05 hf-hub:lerobot/pi05_base OUT` with the repo in the (offline) Hub cache."""
    src = tmp_path / "src"
    write_lerobot(src, pi05=True)
    repo = offline_hub / "models--lerobot--pi05_base"
    snap = repo / "snapshots" / SHA
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    out = tmp_path / "pi05"
    assert main(["convert", "pi05", "hf-hub:lerobot/pi05_base", str(out), "--recipe", "pi05-tiny"]) == 0
    stdout = capsys.readouterr().out
    assert "tensors mapped" in stdout and "local-dir:" in stdout
    card = (out / "README.md").read_text()
    assert "base_model: lerobot/pi05_base" in card
    m = create_model(f"local-dir:{out}")
    assert type(m).__name__ == "Pi0Model" and m.config.pi05
    # a pi0 checkpoint given as pi05: the error says which converter to use
    write_lerobot(tmp_path / "pi0src", pi05=False)
    assert main(["convert", "pi05", str(tmp_path / "pi0src"), str(tmp_path / "x"), "--recipe", "pi05-tiny"]) == 2
    err = capsys.readouterr().err
    assert "config.json is a pi0 policy; convert it as `pi0`" in err  # lerobot's config.json says so
    (tmp_path / "pi0src" / "config.json").unlink()  # without it, the tensors say so
    assert main(["convert", "pi05", str(tmp_path / "pi0src"), str(tmp_path / "x"), "--recipe", "pi05-tiny"]) == 2
    err = capsys.readouterr().err
    assert "state_proj" in err and "convert pi0" in err
    # not cached and offline
    assert main(["convert", "pi0", "hf-hub:lerobot/pi0_base", str(tmp_path / "y")]) == 2
    assert "HF_HUB_OFFLINE=0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["convert", "--help"])
    assert e.value.code == 0


def test_acot_from_pi05_initialises_new_experts_from_the_action_expert(tmp_path):
    """pi0.5 weights into the ACoT recipe: EAR and final expert both copy pi0.5's action expert, the coarse
    heads copy the action heads (acot_pi0.md §2.3, §2.4)."""
    write_lerobot(tmp_path / "src", pi05=True)
    out, _ = convert("pi05", tmp_path / "src", tmp_path / "pi05", recipe="pi05-tiny")
    pi05 = VLAModel.from_pretrained(out)
    acot, report = VLAModel.from_pretrained(out, recipe="acot-tiny",
                                            overrides={"backbone.config.num_hidden_layers": PL},
                                            output_loading_info=True, **ACOT_FROM_PI05)
    assert type(acot).__name__ != type(pi05).__name__
    assert report.ok and report.allowed_missing
    a, p = acot.state_dict(), pi05.state_dict()
    for k, v in p.items():
        if ".experts.act." in k or ".norms.act." in k:
            assert torch.equal(a[k], v) and torch.equal(a[k.replace(".act.", ".ear.")], v), k
    for c, s in (("coarse_action_in_proj", "action_in_proj"), ("coarse_time_mlp_out", "time_mlp_out")):
        assert torch.equal(a[f"{c}.weight"], p[f"{s}.weight"]) and torch.equal(a[f"{c}.bias"], p[f"{s}.bias"])
    assert torch.equal(a["language_model.embed_tokens.weight"], p["language_model.embed_tokens.weight"])
    assert all(k.startswith(("explicit_", "implicit_", "action_reasoning")) for k in report.allowed_missing)


# ---------------------------------------------------------------------------------------------- full size, names only
def test_full_size_halo_checkpoint_layout_maps_onto_the_halo_recipe():
    """HALO's released layout (Qwen2.5-1.5B × 3 experts, SigLIP so400m NaViT truncated to 26 layers, vocab 151933,
    halo_bagel.md §1.5, §6.2) covers the full ``halo`` recipe exactly (names and shapes; meta device)."""
    vit = dict(layers=26, width=1152, mlp=4304, patch=(588,), positions=4900)
    shapes = bagel_shapes(28, 1536, 12, 2, 128, 8960, 8960, 151933, vit, vit_side=70, latent_side=64, action_dim=14)
    report = check_mapping("halo", shapes, allow_missing=["vae"])
    assert report.inferred == {  # read off the tensors (HALO: Qwen2.5-1.5B, SigLIP so400m truncated to 26 layers)
        "backbone.config.vocab_size": 151933, "backbone.config.hidden_size": 1536,
        "backbone.config.num_hidden_layers": 28,
        "backbone.config.intermediate_size": 8960, "backbone.config.head_dim": 128,
        "backbone.config.num_attention_heads": 12, "backbone.config.num_key_value_heads": 2, "action_dim": 14,
        "vision.config.hidden_size": 1152, "vision.num_layers": 26, "vision.config.intermediate_size": 4304}
    assert not report.unmapped and not report.missing and len(report.mapped) == len(shapes) - 2
    assert sorted(report.regenerated) == ["latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"]


@pytest.mark.parametrize("kind", ["pi0", "pi05"])
def test_full_size_lerobot_checkpoint_layout_maps_onto_the_pi_recipes(kind):
    """lerobot's pi0 / pi0.5 layout (Gemma-2B + gemma_300m, SigLIP so400m/14 at 224 px, action_dim 32) covers the
    full ``pi0`` / ``pi05`` recipe exactly."""
    vision = dict(layers=27, width=1152, mlp=4304, patch=(3, 14, 14), positions=256)
    shapes = lerobot_shapes(kind == "pi05", 18, 2048, 1024, 8, 1, 256, 16384, 4096, 257152, 32, vision)
    report = check_mapping(kind, shapes)
    assert not report.unmapped and not report.missing and len(report.dropped) == 2
    assert len(report.filled) == (37 if kind == "pi05" else 0)
    with pytest.raises(ConversionError, match=f"use `convert {kind}`"):  # the other converter points here
        check_mapping("pi05" if kind == "pi0" else "pi0", shapes)


def test_lerobot_key_map_accepts_transformers_4_and_5_layouts():
    from vla_blocks.convert import lerobot_pi0_key_map
    fn = lerobot_pi0_key_map()
    old = "model.paligemma_with_expert.paligemma."
    assert fn(old + "language_model.model.layers.3.mlp.up_proj.weight")[0] == \
        "language_model.stack.layers.3.experts.vlm.mlp.up_proj.weight"
    assert fn(old + "language_model.model.embed_tokens.weight")[0] == "language_model.embed_tokens.weight"
    assert fn(old + "vision_tower.vision_model.post_layernorm.bias")[0] == "vision_tower.model.post_layernorm.bias"
    assert fn(PALI + "vision_tower.encoder.layers.2.layer_norm1.weight")[0] == \
        "vision_tower.model.encoder.layers.2.layer_norm1.weight"
    assert fn(old + "multi_modal_projector.linear.bias")[0] == "multi_modal_projector.linear.bias"
    assert fn("paligemma_with_expert.gemma_expert.model.norm.dense.bias")[0] == \
        "language_model.stack.norms.act.dense.bias"  # without the policy's `model.` prefix
    assert fn("action_out_proj.weight")[0] == "action_out_proj.weight"
    assert fn(EXP + "model.layers.0.self_attn.rotary_emb.inv_freq") == (None, "RoPE inverse frequencies: recomputed")
    assert fn("model.something_new.weight") == (None, None)


def diffusers_to_ldm(sd: dict, n_blocks: int = 4) -> dict:
    """Our tiny diffusers VAE under the original LDM / FLUX ``ae.safetensors`` names (``encoder.down.{i}.block.{j}``,
    ``mid.block_1``/``attn_1``, ``decoder.up.{i}`` counted from the bottom, 1×1-conv attention projections)."""
    import re
    out = {}
    for k, v in sd.items():
        k2 = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
        k2 = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k2)
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.(.*)$", k2)
        if m:
            i = n_blocks - 1 - int(m[1])
            k2 = f"decoder.up.{i}.block.{m[2]}.{m[3]}" if m[2] is not None else f"decoder.up.{i}.upsample.{m[3]}"
        k2 = k2.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        for a, b in attn.items():
            if f"mid_block.attentions.0.{a}." in k2:
                k2 = k2.replace(f"mid_block.attentions.0.{a}.", f"mid.attn_1.{b}.")
                if a != "group_norm" and v.ndim == 2:
                    v = v[:, :, None, None]
        k2 = k2.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        out[k2] = v
    return out


def test_halo_vae_from_flux_ldm_names(halo_src, tmp_path):
    """HALO's VAE comes from FLUX's ``ae.safetensors`` (LDM names): converted with diffusers' mapping."""
    d, _ = halo_src
    from safetensors.torch import load_file
    vae = load_file(d / "vae.safetensors")
    ldm = diffusers_to_ldm(vae)
    assert "encoder.down.0.block.0.conv1.weight" in ldm and "decoder.up.3.upsample.conv.weight" in ldm
    save_file(ldm, tmp_path / "ae.safetensors")
    out, report = convert("halo", d / "ema.safetensors", tmp_path / "out", recipe="halo-tiny",
                          vae=str(tmp_path / "ae.safetensors"))
    own = VLAModel.from_pretrained(out).state_dict()
    for k, v in vae.items():
        assert torch.equal(own["vae.vae." + k], v.float()), k


def test_full_size_pi05_loads_into_the_acot_recipe_with_the_preset():
    """Names and shapes on the meta device: the full pi05 recipe's weights fill acot-libero through
    ``ACOT_FROM_PI05``; only the new reasoner modules keep their initialisation."""
    with torch.device("meta"):
        pi05 = model_config("pi05").build().state_dict()
        acot = model_config("acot-libero").build()
    report = hub.load_weights(acot, pi05, dry_run=True, **ACOT_FROM_PI05)
    assert report.ok and not report.unexpected
    assert any(".experts.ear." in t and ".experts.act." in s for t, s in report.remapped.items())
    assert report.remapped["coarse_action_out_proj.weight"] == "action_out_proj.weight"
