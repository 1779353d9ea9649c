"""pi0-tiny trained from a generated local LeRobotDataset through its processor, by the CLI, and resumed."""

import json

import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("av")

from vla_blocks.cli import main  # noqa: E402

FEATURES = {
    "observation.images.top": {"dtype": "image", "shape": [32, 32, 3], "names": ["height", "width", "channels"]},
    "observation.state": {"dtype": "float32", "shape": [8], "names": None},
    "action": {"dtype": "float32", "shape": [7], "names": None},
}


def make_dataset(root, episodes=4, length=12):
    """Actions follow the state (a learnable signal); images differ by episode."""
    from vla_blocks.data import LeRobotDataset
    rng = np.random.default_rng(0)
    w = LeRobotDataset.create(root, fps=10, features=FEATURES)
    for e in range(episodes):
        for t in range(length):
            s = rng.normal(size=8).astype(np.float32)
            w.add_frame({"observation.images.top": np.full((32, 32, 3), 40 * e + 3 * t, np.uint8),
                         "observation.state": s, "action": (0.5 * s[:7] + 0.1 * t).astype(np.float32),
                         "task": "push the block"})
        w.save_episode()
    w.finalize()
    return str(root)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds") / "ds")


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_trains_pi0_tiny_on_a_dataset_and_resumes(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["pi0-tiny-demo", f"data.root={dataset}", "data.val_episodes=[3]", "train.batch_size=4",
              "train.checkpoint.every=5", "train.validation.every=10", "train.log.every=5"]
    assert main(["train", *common, "train.steps=10", "-o", str(run)]) == 0
    assert main(["train", *common, "train.steps=20", "-o", str(run), "--resume"]) == 0
    recs = _records(run)
    assert [r["step"] for r in recs] == [5, 10, 15, 20]
    assert "val_loss" in recs[1] and "val_action_mse" in recs[-1]
    # the uninterrupted run gives the same losses (data position, RNG and state restored)
    ref = tmp_path / "ref"
    assert main(["train", *common, "train.steps=20", "-o", str(ref)]) == 0
    assert [r["loss"] for r in _records(ref)] == [r["loss"] for r in recs]
    final = run / "final"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    from vla_blocks.data import PolicyProcessor
    from vla_blocks import create_model
    model = create_model(f"local-dir:{final}")
    model = model[0] if isinstance(model, tuple) else model
    proc = PolicyProcessor.from_pretrained(final, model)
    from vla_blocks.data import LeRobotDataset
    ds = LeRobotDataset(dataset, delta_timestamps=proc.delta_timestamps(fps=10))
    batch = proc.eval()([ds[0], ds[1]])
    raw = proc.postprocess(model.predict_action_chunk(batch))
    assert tuple(raw.shape) == (2, model.config.action_horizon, 7)
    assert "effective batch = 4 per device" in capsys.readouterr().err


def test_data_section_errors_name_the_key(dataset, tmp_path):
    from vla_blocks.config import ConfigError
    from vla_blocks.train import train
    with pytest.raises(ConfigError, match=r"data.val_episode: unknown key"):
        train("pi0-tiny-demo", [f"data.root={dataset}", "data.val_episode=[3]"], output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"episodes \[9\] do not exist"):
        train("pi0-tiny-demo", [f"data.root={dataset}", "data.val_episodes=[9]"], output_dir=tmp_path)
