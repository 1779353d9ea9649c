"""DDP and FSDP2 on CPU (gloo, 2 processes) against the single-process run with the same global batch, and a DCP
checkpoint written by 2 ranks resumed by one process."""

import pytest
import torch

from train_helpers import build, cfg, noise_extra, spawn, train_run
from vla_blocks.train import DemoBatches, Trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "single.pt"
    train_run(0, 1, "none", str(out), steps=8)  # 8 steps; the first 5 are compared after 5 steps below
    out5 = out.parent / "single5.pt"
    train_run(0, 1, "none", str(out5), steps=5)
    return torch.load(out5), torch.load(out)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One 2-rank FSDP2 run of 5 steps (a DCP checkpoint at step 5 and the final save_pretrained folder)."""
    d = tmp_path_factory.mktemp("fsdp")
    spawn(train_run, 2, "fsdp", str(d / "fsdp.pt"), str(d / "run"))
    return d


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(strategy, single, tmp_path, request):
    if strategy == "fsdp":
        tmp_path = request.getfixturevalue("fsdp_run")
    else:
        spawn(train_run, 2, strategy, str(tmp_path / f"{strategy}.pt"), str(tmp_path / "run"))
    got = torch.load(tmp_path / f"{strategy}.pt")
    ref = single[0]
    assert _max_diff(ref["state"], got["state"]) <= 1e-5
    for a, b in zip(ref["history"], got["history"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    # the 2-rank FSDP run wrote a sharded DCP checkpoint
    if strategy == "fsdp":
        ck = tmp_path / "run" / "checkpoints" / "step-00000005"
        assert (ck / "dcp" / ".metadata").is_file()
        assert {p.name for p in ck.glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}
        # the final save_pretrained folder (weights gathered from the shards) loads and matches
        from vla_blocks import create_model
        loaded = create_model(f"local-dir:{tmp_path / 'run' / 'final'}")
        loaded = loaded[0] if isinstance(loaded, tuple) else loaded
        assert _max_diff(ref["state"], {k: v for k, v in loaded.state_dict().items()}) <= 1e-5


def test_dcp_checkpoint_from_two_ranks_resumes_in_one(single, fsdp_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(fsdp_run / "run", run)
    model = build(seed=123)  # other initial weights: everything must come from the checkpoint
    c = cfg(steps=8, checkpoint={"every": 8})
    data = DemoBatches(model, 4, seed=3, extra=noise_extra(model))
    tr = Trainer(model, c, data, run_dir=run)
    resumed = tr.resume()
    assert resumed.endswith("step-00000005") and tr.step == 5 and data.position == 5
    assert _max_diff(torch.load(fsdp_run / "fsdp.pt")["state"], tr.final_state_dict(use_ema=False)) == 0
    tr.fit(resume=True)
    assert tr.step == 8
    assert _max_diff(single[1]["state"], tr.final_state_dict(use_ema=False)) <= 1e-5
