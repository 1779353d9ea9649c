"""The benchmark suites run at smoke size and write sane results (so they never rot).

Each suite runs once (one test per suite, so pytest-xdist never runs a suite twice) through the
``vla-blocks bench`` command line, and its JSON is checked against facts computed independently of the
benchmark: allowed pairs by segment arithmetic and from the dense mask, closed forms for causal masks, the
FLOP convention, equality of outputs, and that every backend has either a time or a reason. Timings are
never asserted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vla_blocks.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_smoke(suite: str, out: Path, *sets: str) -> dict:
    argv = ["bench", suite, "--smoke", "--out", str(out), "--quiet", "--device", "cpu"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    payload = json.loads((folder / f"{suite}.json").read_text())
    payload["_folder"] = folder
    return payload


def check_common(p: dict, suite: str):
    assert p["suite"] == suite and p["smoke"] is True
    for k in ("torch", "triton", "transformers", "python"):
        assert k in p["versions"]
    assert p["versions"]["torch"] == torch.__version__
    assert p["device"]["type"] == "cpu" and p["device"]["name"] and p["device"]["slug"] == p["_folder"].name
    assert p["options"]["threads"] >= 1
    md = (p["_folder"] / f"{suite}.md").read_text()
    assert p["device"]["name"] in md
    png = (p["_folder"] / f"{suite}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(p["_folder"].glob(".*.tmp")), "temporary files left behind"
    return md


def close(a, b, rel=1e-9):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def pairs_by_segments(layout) -> int:
    """Allowed pairs by segment arithmetic (DESIGN §2, independent of MaskMeta): a query of segment j sees the
    valid tokens of earlier non-noise segments of its document, plus its own segment — all of it when the
    segment is full/noise, the tokens up to itself when causal."""
    total = 0
    for b in range(layout.batch_size):
        seg, mode = layout.seg_id[b].tolist(), layout.seg_mode[b].tolist()
        doc, valid = layout.doc_id[b].tolist(), layout.valid[b].tolist()
        order, info = [], {}
        for s, m, d, v in zip(seg, mode, doc, valid):
            if s < 0:
                continue
            if s not in info:
                info[s] = [m, d, 0]
                order.append(s)
            info[s][2] += int(v)
        seen: dict[int, int] = {}  # doc -> valid tokens of earlier visible segments
        for s in order:
            m, d, v = info[s]
            prior = seen.get(d, 0)
            total += v * prior + (v * (v + 1) // 2 if m == 0 else v * v)
            if m != 2:  # a noise segment is invisible to every later segment
                seen[d] = prior + v
    return total


def test_attention_smoke(tmp_path):
    from vla_blocks.attention import backends
    from vla_blocks.bench import load_suite
    p = run_smoke("attention", tmp_path)
    md = check_common(p, "attention")
    mod = load_suite("attention")
    s = p["settings"]
    names = [b.name for b in backends()]
    assert p["backends"] == names
    mm = p["reference"]["matmul"]
    for dt, m in mm.items():
        assert close(m["tflops"], 2 * m["n"] ** 3 / (m["time"]["median_ms"] * 1e-3) / 1e12)

    # layouts: allowed pairs against the dense oracle, segment arithmetic and closed forms
    infos = {(li["layout"], li["S"]): li for li in p["layouts"]}
    assert set(infos) == {(lay, S) for lay in s["layouts"] for S in s["seq_lens"]}
    for (lay, S), li in infos.items():
        layout, desc = mod.build_layout(lay, S, li["B"])
        assert layout.seq_len == S and desc["doc_lengths"] == li["doc_lengths"]
        dense_pairs = int(layout.dense_mask().sum())
        assert li["allowed_pairs"] == dense_pairs == pairs_by_segments(layout), lay
        assert li["allowed_pairs_dense_check"] == dense_pairs
        if lay == "causal":
            assert dense_pairs == li["B"] * S * (S + 1) // 2
        if lay == "doc_causal":
            assert sum(li["doc_lengths"]) == S
            assert dense_pairs == li["B"] * sum(n * (n + 1) // 2 for n in li["doc_lengths"])
        tiles = li["tiles"]
        assert sum(tiles.values()) == li["B"] * math.ceil(S / s["tile"]) ** 2
        assert li["issued_pairs"] >= dense_pairs  # tile summaries are conservative
        assert li["memory"]["vectors_bytes"] == 32 * li["B"] * S  # 8 int32 vectors (q and k sides) per token

    # every backend × configuration has a time or a reason; the FLOP convention holds
    att = [r for r in p["rows"] if r["kind"] == "attention"]
    for lay in s["layouts"]:
        for S in s["seq_lens"]:
            B = infos[(lay, S)]["B"]
            for D in s["head_dims"]:
                H = s["hidden"] // D
                for dt in s["dtypes"]:
                    for ps in s["passes"]:
                        got = [r for r in att if (r["layout"], r["S"], r["D"], r["dtype"], r["pass"]) == (lay, S, D, dt, ps)]
                        assert sorted(r["backend"] for r in got) == sorted(names)
                        for r in got:
                            mult = 1.0 if ps == "fwd" else 3.5
                            assert r["B"] == B and r["H"] == H
                            assert r["useful_flops"] == mult * 4 * B * H * D * infos[(lay, S)]["allowed_pairs"]
                            if r["status"] == "ok":
                                t = r["time"]
                                assert t["median_ms"] > 0 and t["q25_ms"] <= t["median_ms"] <= t["q75_ms"]
                                assert close(r["useful_tflops"], r["useful_flops"] / (t["median_ms"] * 1e-3) / 1e12)
                                assert close(r["pct_matmul"], 100 * r["useful_tflops"] / mm[dt]["tflops"])
                            else:
                                assert r["status"] in ("skipped", "error")
                                why = r.get("reasons") or [r.get("error")]
                                assert why and all(why)
                                assert why[0] in md  # the table shows the reason
                        by = {r["backend"]: r for r in got}
                        assert by["sdpa"]["status"] == "ok"  # sdpa runs everywhere
                        if ps == "fwd+bwd":
                            assert by["flex"]["status"] == "skipped"  # no Flex backward on CPU
    for b in names:
        assert f"`{b}`" in md or f"| {b} |" in md
    refs = [r for r in p["rows"] if r["kind"] == "reference"]
    assert refs and all(r["allowed_pairs"] == r["B"] * r["S"] * (r["S"] + 1) // 2 for r in refs)

    # mask preparation rows (their own rows, per layout) and the O(N) scaling section
    for lay in s["layouts"]:
        steps = {r["step"]: r for r in p["mask_prep"] if r["layout"] == lay}
        assert {"mask_meta", "dense mask", "BlockMask from tile summaries"} <= set(steps)
        assert steps["mask_meta"]["status"] == "ok" and steps["mask_meta"]["time"]["median_ms"] > 0
        assert steps["mask_meta"]["bytes"] == 32 * infos[(lay, s["seq_lens"][0])]["B"] * s["seq_lens"][0]
    sc = p["scaling"]
    assert {(r["layout"], r["N"]) for r in sc["rows"]} == {(lay, n) for lay in s["scaling_layouts"]
                                                            for n in s["scaling_lens"]}
    for r in sc["rows"]:
        assert r["memory"]["vectors_bytes"] == 32 * r["N"]
        assert r["memory"]["dense_mask_bytes"] == r["N"] ** 2
        assert r["mask_meta_plus_tile_summary"]["median_ms"] > 0
    per_token = {round(r["bytes_per_token"], 6) for r in sc["rows"]}
    assert len(per_token) == 1  # O(N): the same bytes per token at every N
    assert isinstance(sc["target_met"], bool) and sc["worst_ms"] > 0


def test_inference_smoke(tmp_path):
    p = run_smoke("inference", tmp_path)
    check_common(p, "inference")
    for r in p["prefix_cache"]:
        w, wo = r["time"]["with_cache"]["median_ms"], r["time"]["without_cache"]["median_ms"]
        assert w > 0 and wo > 0 and close(r["speedup"], wo / w)
        assert r["actions_max_abs_diff"] <= 1e-4 * max(1.0, r["actions_max_abs"])  # same actions either way
        assert r["tokens_full"] == r["prefix"] + 1 + r["actions"]
        assert isinstance(r["target_met"], bool)
    recipes = {r["recipe"]: r for r in p["recipes"]}
    assert set(recipes) == set(p["settings"]["recipes"])
    for name, r in recipes.items():
        assert r["status"] == "ok", (name, r.get("reason") or r.get("error"))
        assert r["latency"]["median_ms"] > 0 and r["prefix_ms"] > 0 and r["flow_steps"] >= 1
        tr = r["train"]
        assert tr["mot_tokens"] > 0 and close(tr["tokens_per_s"], tr["mot_tokens"] / (tr["time"]["median_ms"] * 1e-3))
    if "acot-tiny" in recipes:  # the reasoner hooks still find their modules
        a = recipes["acot-tiny"]
        assert a["ear_ms"] > 0 and a["ear_steps"] >= 1 and a["iar_ms"] > 0 and a["agp_ms"] > 0


def test_backbone_smoke(tmp_path):
    p = run_smoke("backbone", tmp_path, "profile=always")
    md = check_common(p, "backbone")
    for r in p["rows"]:
        assert r["params_mot_stack"] == r["params_hf_layers_and_norm"]  # the same weights, imported
        assert r["max_abs_diff"] <= 1e-4 * max(1.0, r["max_abs"])  # the same function
        assert close(r["ratio_fwd"], r["fwd"]["mot"]["median_ms"] / r["fwd"]["hf"]["median_ms"])
        assert close(r["ratio_fwd_bwd"], r["fwd_bwd"]["mot"]["median_ms"] / r["fwd_bwd"]["hf"]["median_ms"])
        assert r["profile"]["fwd_diff"] and "MoT − HF ms" in md


def test_data_smoke(tmp_path):
    pytest.importorskip("pyarrow")
    pytest.importorskip("av")
    p = run_smoke("data", tmp_path)
    md = check_common(p, "data")
    s = p["settings"]
    assert p["dataset"]["frames"] == s["episodes"] * s["length"] and p["dataset"]["cameras"] == 2
    assert [r["workers"] for r in p["loader"]] == s["workers"]
    for r in p["loader"]:
        assert r["samples"] == s["batches"] * s["batch"]
        assert close(r["samples_per_s"], r["samples"] / r["seconds"])
    t = p["train"]
    assert t["steps"] == s["steps"] and 0 <= t["data_wait_fraction"] <= 1
    assert close(t["data_wait_fraction"], t["data_wait_ms"] / t["step_ms"])
    assert "samples/s" in md


def test_readme_shows_the_committed_results():
    """README's Benchmarks section is what `vla-blocks bench render` renders from benchmarks/results."""
    from vla_blocks.bench import README_END, README_START, readme_section
    text = (ROOT / "README.md").read_text()
    if README_START not in text:
        pytest.skip("README has no generated Benchmarks section")
    section = text[text.index(README_START) + len(README_START):text.index(README_END)].strip()
    assert section == readme_section(ROOT / "benchmarks" / "results").strip(), \
        "README is stale: run `vla-blocks bench render`"


def test_update_readme_rewrites_only_the_marked_section(tmp_path):
    from vla_blocks.bench import README_END, README_START, update_readme
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Benchmarks\n\nintro\n\n{README_START}\nold\n{README_END}\n\n## Next\n")
    assert update_readme(readme, tmp_path / "no-results")
    text = readme.read_text()
    assert text.startswith("# x\n\n## Benchmarks\n\nintro\n\n") and text.endswith(f"{README_END}\n\n## Next\n")
    assert "old" not in text and "No results committed yet" in text
    assert not update_readme(readme, tmp_path / "no-results")  # idempotent


def test_composition_smoke(tmp_path):
    p = run_smoke("composition", tmp_path)
    md = check_common(p, "composition")
    for r in p["bookkeeping"]:
        assert 0 < r["bookkeeping_share"] < 1 and r["bookkeeping_calls"] > 0
        assert close(sum(r["share_by_function"].values()), r["bookkeeping_share"])  # outermost calls only
        assert r["meets_target"] == (r["bookkeeping_share"] <= r["target"])
    d = p["halo_decode"]
    base = d["rows"][0]["per_token_ms"]
    assert close(d["max_deviation_from_smallest"], max(abs(r["per_token_ms"] / base - 1) for r in d["rows"]))
    assert [r["horizon"] for r in p["flow_step"]["by_horizon"]] == sorted(r["horizon"] for r in p["flow_step"]["by_horizon"])
    assert "bookkeeping share" in md
