"""The ``build`` benchmark suite (peak memory of ``create_model``) runs at smoke size and reports sane figures."""

from __future__ import annotations

import pytest
import torch

from vla_blocks.model import create_model
from test_benchmarks import check_common, run_smoke


@pytest.mark.slow  # two fresh processes import torch + transformers (~20 s on 2 shared cores)
def test_build_smoke(tmp_path):
    p = run_smoke("build", tmp_path)
    md = check_common(p, "build")
    (row,) = p["rows"]
    model = create_model(p["settings"]["recipe"])  # the same recipe, built here: the weights it must report
    tensors = list(model.parameters()) + list(model.buffers())
    assert row["weight_bytes"] == sum(t.numel() * t.element_size() for t in tensors)
    assert row["params"] == sum(t.numel() for t in model.parameters())
    assert row["peak_growth"] == row["peak_rss"] - row["base_rss"] and row["peak_rss"] >= row["rss_after"] > 0
    assert row["ratio"] == row["peak_growth"] / row["weight_bytes"]
    assert row["target_met"] == (row["ratio"] <= 1.2)
    assert "peak / weights" in md and torch.get_num_threads() >= 1
