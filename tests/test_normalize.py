"""Normalizer: openpi's z-score and quantile formulas, padded dims, serialisation, device moves."""

import json

import numpy as np
import pytest
import torch

from vla_blocks.normalize import Normalizer, compute_stats


def data(n=500, d=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.linspace(0.1, 3.0, d) + torch.arange(d)


def test_stats_match_numpy():
    x = data()
    st = compute_stats(x.reshape(50, 10, 7))
    xn = x.double().numpy()
    np.testing.assert_allclose(st["mean"].numpy(), xn.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st["std"].numpy(), xn.std(0), rtol=1e-5, atol=1e-6)  # population std, as numpy
    np.testing.assert_allclose(st["q01"].numpy(), np.quantile(xn, 0.01, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st["q99"].numpy(), np.quantile(xn, 0.99, axis=0), rtol=1e-5, atol=1e-6)


def test_zscore_formula_and_inverse():
    x = data()
    norm = Normalizer.from_data({"actions": x}, mode="zscore")
    mean, std = x.double().mean(0), x.double().std(0, correction=0)
    y = torch.randn(4, 10, 7, dtype=torch.float64)
    expect = (y - mean) / (std + 1e-6)  # ACoT / openpi: (x − μ) / (σ + 1e-6)
    got = norm.normalize("actions", y.float())
    assert (got.double() - expect).abs().max() < 1e-5
    assert (norm.unnormalize("actions", got).double() - y).abs().max() < 1e-5
    z = norm.normalize("actions", x)
    assert z.mean(0).abs().max() < 1e-5 and (z.std(0, correction=0) - 1).abs().max() < 1e-4


def test_quantile_formula_and_inverse():
    x = data()
    norm = Normalizer.from_data({"actions": x}, mode="quantile")
    q01 = torch.quantile(x.double(), 0.01, dim=0)
    q99 = torch.quantile(x.double(), 0.99, dim=0)
    y = torch.randn(3, 7, dtype=torch.float64) * 3
    expect = (y - q01) / (q99 - q01 + 1e-6) * 2.0 - 1.0  # openpi _normalize_quantile
    got = norm.normalize("actions", y.float())
    assert (got.double() - expect).abs().max() < 1e-5
    assert (norm.unnormalize("actions", got).double() - y).abs().max() < 1e-4
    # the 1st and 99th percentiles map to −1 and +1
    assert (norm.normalize("actions", q01.float()) + 1).abs().max() < 1e-5
    assert (norm.normalize("actions", q99.float()) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["zscore", "quantile"])
def test_padded_dims_pass_through_and_unknown_keys_are_identity(mode):
    x = data()
    norm = Normalizer.from_data({"actions": x}, mode=mode)
    y = torch.randn(2, 5, 32)  # model space is padded to 32 dims, stats have 7: explicit padded=True
    back = norm.unnormalize("actions", y, padded=True)
    assert torch.equal(back[..., 7:], y[..., 7:])
    assert torch.allclose(back[..., :7], norm.unnormalize("actions", y[..., :7]))
    assert torch.equal(norm.normalize("state", y), y)  # no stats for "state": identity
    from vla_blocks.errors import StatsError
    with pytest.raises(StatsError, match="7 dims but the tensor has 32") as e:  # never silently the first 7
        norm.unnormalize("actions", y)
    assert e.value.key == "actions"
    with pytest.raises(StatsError, match="narrower"):  # fewer dims than the stats: never the leading stats
        norm.normalize("actions", torch.randn(2, 3))
    with pytest.raises(StatsError, match="narrower"):
        norm.normalize("actions", torch.randn(2, 3), padded=True)


def test_to_dict_from_dict_roundtrip_through_json_and_per_key_modes():
    norm = Normalizer.from_data({"actions": data(), "observation.state": data(d=8, seed=1)}, mode="zscore",
                                modes={"actions": "quantile"})
    d = json.loads(json.dumps(norm.to_dict()))
    again = Normalizer.from_dict(d)
    assert again.mode_of("actions") == "quantile" and again.mode_of("observation.state") == "zscore"
    y = torch.randn(4, 8)
    for k, yy in (("actions", y[:, :7]), ("observation.state", y)):
        assert torch.allclose(again.normalize(k, yy), norm.normalize(k, yy))
    # load_dict replaces the statistics of a module in place (the Hub code loads stats into a built model)
    fresh = Normalizer("zscore")
    fresh.load_dict(d)
    assert sorted(fresh.keys()) == sorted(norm.keys())
    assert torch.allclose(fresh.unnormalize("actions", y[:, :7]), norm.unnormalize("actions", y[:, :7]))
    # statistics are not part of the weights (non-persistent buffers), but move with the module
    assert fresh.state_dict() == {}
    assert len(list(fresh.buffers())) == 8


def test_missing_statistics_are_an_error():
    with pytest.raises(ValueError, match="needs statistics"):
        Normalizer("quantile", {"actions": {"mean": [0.0], "std": [1.0]}})
    with pytest.raises(ValueError, match="unknown normalisation mode"):
        Normalizer("minmax")
    with pytest.raises(ValueError, match="different widths"):
        Normalizer("zscore", {"a": {"mean": [0.0, 1.0], "std": [1.0]}})


def test_statistics_follow_the_device_but_stay_float32():
    norm = Normalizer.from_data({"actions": data()}, mode="zscore")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.normalizer = norm
    x = torch.randn(3, 7)
    expect = norm.normalize("actions", x)
    model.to(torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for b in norm.buffers())
    assert torch.equal(norm.normalize("actions", x), expect)
    model.to(device="meta")
    assert all(b.is_meta and b.dtype == torch.float32 for b in norm.buffers())
