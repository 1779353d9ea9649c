"""The vla-blocks command line."""

import pytest
import torch

from vla_blocks.cli import main


def test_recipes_lists_one_per_line(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.split()
    assert "mot-tiny" in lines and lines == sorted(lines)


def _printed_total(out: str) -> int:
    return int(out.strip().splitlines()[-1].split("(")[-1].rstrip(")").replace(",", ""))


def qwen2_mot_params(D, L, H, Hkv, hd, V, experts, qk_norm=True):
    """Analytic parameter count of mot-tiny's MoT on a Qwen2 backbone: per expert ``(width De, FFN Fe)`` and layer,
    q/k/v with bias, o without, q/k norms, two norms, SwiGLU; a final norm per expert; untied embedding and LM
    head on the backbone width ``D``."""
    total = 2 * V * D
    for De, Fe in experts:
        attn = De * H * hd + H * hd + 2 * (De * Hkv * hd + Hkv * hd) + H * hd * De + (2 * hd if qk_norm else 0)
        total += L * (attn + 2 * De + 3 * De * Fe) + De
    return total


def test_info_counts_parameters_without_allocating(capsys):
    assert main(["info", "mot-tiny", "experts.act.hidden_size=48"]) == 0
    out = capsys.readouterr().out
    # mot-tiny: Qwen2 D 64, FFN 128, 2 layers, 4 heads / 2 KV heads of 16, vocab 256; und, gen at 64;
    # act at 48 wide with ffn_ratio 0.5 of the backbone's FFN
    expect = qwen2_mot_params(64, 2, 4, 2, 16, 256, [(64, 128), (64, 128), (48, 64)])
    assert _printed_total(out) == expect
    from vla_blocks.model import create_model  # and the materialised model holds exactly that many numbers
    assert sum(p.numel() for p in create_model("mot-tiny", **{"experts.act.hidden_size": 48}).parameters()) == expect
    assert "[expert act]" in out and "[expert und]" in out


def test_info_with_misspelled_override_fails_and_suggests(capsys):
    assert main(["info", "mot-tiny", "experts.act.hiden_size=32"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'hidden_size'" in err


def test_info_large_recipe_is_cheap(capsys):
    """A multi-billion-parameter override set is counted on the meta device."""
    args = ["info", "mot-tiny", "backbone.config.hidden_size=2048", "backbone.config.intermediate_size=16384",
            "backbone.config.num_hidden_layers=18", "backbone.config.num_attention_heads=8",
            "backbone.config.num_key_value_heads=1", "backbone.config.head_dim=256",
            "backbone.config.vocab_size=257152", "experts.act.hidden_size=1024"]
    assert main(args) == 0
    total = _printed_total(capsys.readouterr().out)
    assert total == qwen2_mot_params(2048, 18, 8, 1, 256, 257152, [(2048, 16384), (2048, 16384), (1024, 8192)])
    assert total > 3e9


def test_demo_runs_a_tiny_recipe(capsys):
    assert main(["demo", "--recipes", "mot-tiny"]) == 0
    out = capsys.readouterr().out
    assert "[ok] mot-tiny" in out and "1/1" in out


def test_help_for_every_subcommand(capsys):
    from vla_blocks.cli import make_parser
    parser = make_parser()
    sub = [a for a in parser._actions if a.dest == "command"][0]
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0


def test_every_tiny_recipe_declares_its_fsdp_wrap_unit():
    """The declared wrap unit exists in every composed model and holds all of its experts' blocks."""
    from vla_blocks.config import list_recipes
    from vla_blocks.model import model_config
    for name in [r for r in list_recipes() if r.endswith("-tiny")]:
        with torch.device("meta"):
            model = model_config(name).build()
        units = [m for m in model.modules() if type(m).__name__ in model._fsdp_wrap_modules]
        assert units, name
        experts = set(units[0].cfg.experts)
        assert all(set(u.experts) == experts for u in units) and len(experts) >= 1
