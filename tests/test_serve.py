"""Policy server: openpi's wire format and protocol, checked with the real ``openpi-client`` from PyPI.

Servers run in subprocesses (``python -m vla_blocks.cli serve``) on free loopback ports; the actions they return are
compared with the in-process model's ``infer`` on the same observation and noise seed (the oracle), and the wire
format with ``openpi_client.msgpack_numpy``.
"""

from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("websockets")
pytest.importorskip("msgpack")
# openpi's real client from PyPI; .ci/run installs it with --no-deps (its numpy<2 pin conflicts with pyarrow)
openpi_client = pytest.importorskip("openpi_client", reason="pip install --no-deps openpi-client")
from openpi_client import msgpack_numpy as oc_msgpack  # noqa: E402
from openpi_client.websocket_client_policy import WebsocketClientPolicy  # noqa: E402
import websockets.sync.client as ws_client  # noqa: E402

from vla_blocks import create_model  # noqa: E402
from vla_blocks.serve import (LAYOUTS, ObservationError, PolicyClient, PolicyRunner, PolicyServer,  # noqa: E402
                              ServerError, ServerProcess, WireError, load_layout, packb, unpackb)

RECIPE = "acot-tiny"  # pi0 structure + EAR (coarse actions) + IAR: the most outputs of any servable model


# ---------------------------------------------------------------------------------------------- wire format
def test_wire_roundtrip_with_openpi_client():
    obs = {"observation/image": np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3),
           "observation/state": np.linspace(-1, 1, 8).astype(np.float32),
           "nested": {"x": np.int64(7), "y": np.array([True, False])}, "prompt": "pick", "n": 3, "f": 0.5}
    ours = unpackb(oc_msgpack.packb(obs))
    theirs = oc_msgpack.unpackb(packb(obs))
    for got in (ours, theirs):
        np.testing.assert_array_equal(got["observation/image"], obs["observation/image"])
        assert got["observation/image"].dtype == np.uint8
        np.testing.assert_array_equal(got["observation/state"], obs["observation/state"])
        assert got["nested"]["x"] == 7 and got["nested"]["x"].dtype == np.int64
        np.testing.assert_array_equal(got["nested"]["y"], [True, False])
        assert (got["prompt"], got["n"], got["f"]) == ("pick", 3, 0.5)
    # torch tensors go out as arrays; non-contiguous arrays keep their logical order
    t = torch.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(oc_msgpack.unpackb(packb({"t": t.T}))["t"], t.T.numpy())


@pytest.mark.parametrize("payload, needle", [
    (b"\xc1", "not a msgpack message"),
    (b"\x92\x01", "not a msgpack message"),                                        # truncated list
    (oc_msgpack.packb({"a": np.zeros(3, np.float32)})[:-2], "not a msgpack message"),
    (packb({b"__ndarray__": True, b"data": b"\x00" * 5, b"dtype": "<f4", b"shape": [2]}), "needs 8 bytes, got 5"),
    (packb({b"__ndarray__": True, b"data": b"", b"dtype": "|O", b"shape": [0]}), "dtype object"),
    (packb({b"__ndarray__": True, b"data": b"", b"dtype": "nonsense", b"shape": [0]}), "unknown array dtype"),
    (packb({b"__ndarray__": True, b"data": b"", b"dtype": "<f4"}), "'shape'"),
])
def test_wire_rejects_malformed(payload, needle):
    with pytest.raises(WireError, match=needle):
        unpackb(payload)


# ---------------------------------------------------------------------------------------------- layouts
def _img(rng, h=6, w=5, chw=False):
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return a.transpose(2, 0, 1).copy() if chw else a


def test_layouts_map_openpi_keys_to_frames():
    rng = np.random.default_rng(0)
    img, wrist, state = _img(rng), _img(rng), rng.normal(size=8).astype(np.float32)
    f = LAYOUTS["libero"].frame({"observation/image": img, "observation/wrist_image": wrist,
                                 "observation/state": state, "prompt": "put the bowl"})
    # oracle: HWC uint8 -> CHW float in [0, 1] by hand
    np.testing.assert_allclose(f["observation.images.image"], img.transpose(2, 0, 1) / 255.0, rtol=1e-6)
    np.testing.assert_allclose(f["observation.images.wrist_image"], wrist.transpose(2, 0, 1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(f["observation.state"], state)
    assert f["task"] == "put the bowl" and f["observation.images.image"].dtype == np.float32

    high = _img(rng, chw=True)  # ALOHA: nested dict, CHW, only cam_high required
    f = LAYOUTS["aloha"].frame({"images": {"cam_high": high}, "state": np.zeros(14), "prompt": "fold"})
    assert sorted(f) == ["observation.images.cam_high", "observation.state", "task"]
    np.testing.assert_allclose(f["observation.images.cam_high"], high / 255.0, rtol=1e-6)

    jp, gp = rng.normal(size=7), np.array([0.3])  # DROID: state = joints ++ gripper
    f = LAYOUTS["droid"].frame({"observation/exterior_image_1_left": img, "observation/wrist_image_left": wrist,
                                "observation/joint_position": jp, "observation/gripper_position": gp,
                                "prompt": "wipe"})
    np.testing.assert_allclose(f["observation.state"], np.concatenate([jp, gp]).astype(np.float32))


@pytest.mark.parametrize("change, needle", [
    (lambda o: o.pop("observation/state"), "missing observation key 'observation/state'"),
    (lambda o: o.update({"observation/image": np.zeros((4, 4), np.uint8)}), "'observation/image'.*3 dims"),
    (lambda o: o.update({"observation/image": np.zeros((4, 4, 4), np.uint8)}), "'observation/image'.*HWC"),
    (lambda o: o.update({"observation/image": np.full((4, 4, 3), 2.0, np.float32)}), r"\[0, 1\]"),
    (lambda o: o.update({"observation/state": np.full(8, np.nan)}), "'observation/state'.*NaN"),
    (lambda o: o.update({"observation/state": np.zeros(9)}), "state of 8 values, got 9"),
    (lambda o: o.update({"observation/state": np.array(["a"] * 8)}), "'observation/state' has dtype"),
    (lambda o: o.update({"prompt": 3}), "'prompt' must be a string"),
])
def test_layout_errors_name_the_key(change, needle):
    rng = np.random.default_rng(1)
    obs = {"observation/image": _img(rng), "observation/wrist_image": _img(rng),
           "observation/state": np.zeros(8, np.float32), "prompt": "x"}
    change(obs)
    with pytest.raises(ObservationError, match=needle):
        LAYOUTS["libero"].frame(obs)


def test_layout_from_yaml(tmp_path):
    p = tmp_path / "arm.yaml"
    p.write_text("name: arm\nimages:\n  front: {key: cam/front, layout: chw}\nstate: [q, g]\nstate_dim: 3\n"
                 "prompt: null\n")
    lay = load_layout(str(p))
    rng = np.random.default_rng(2)
    front = _img(rng, chw=True)
    f = lay.frame({"cam": {"front": front}, "q": [1.0, 2.0], "g": 0.5}, default_prompt="go")
    np.testing.assert_array_equal(f["observation.state"], [1.0, 2.0, 0.5])
    assert f["task"] == "go" and "cam/front" in lay.spec()
    bad = tmp_path / "bad.yaml"
    bad.write_text("images: {front: cam}\nstates: [q]\n")
    with pytest.raises(ObservationError, match=r"bad.yaml: unknown layout keys \['states'\]"):
        load_layout(str(bad))
    with pytest.raises(ObservationError, match="unknown observation layout 'libro'"):
        load_layout("libro")


# ---------------------------------------------------------------------------------------------- servers
STATS = {"observation.state": {"mean": np.linspace(-0.5, 0.5, 8), "std": np.linspace(0.5, 2.0, 8)},
         "action": {"mean": np.linspace(1.0, -1.0, 7), "std": np.linspace(0.2, 3.0, 7)}}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """acot-tiny with its processor (LIBERO cameras, dataset statistics) saved in one folder, as training leaves it."""
    from vla_blocks.data import make_processor
    from vla_blocks.serve.cli import layout_features
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("serve") / "model"
    model = create_model(RECIPE)
    proc = make_processor(model, layout_features(LAYOUTS["libero"], model), stats=STATS)  # installs the stats
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(saved_model):
    """The in-process policy: the saved model and processor, loaded independently of the server code."""
    from vla_blocks.data import PolicyProcessor
    model = create_model(f"local-dir:{saved_model}").eval()
    return model, PolicyProcessor.from_pretrained(saved_model, model=model).eval()


@pytest.fixture(scope="module")
def server(saved_model):
    s = ServerProcess(saved_model, "--observation", "libero", "--max-batch", "8", "--batch-timeout-ms", "2")
    yield s
    s.close()


def libero_obs(seed: int, size=(40, 36)) -> dict:
    """What openpi's LIBERO client sends: two HWC uint8 images, an 8-d state, the task."""
    rng = np.random.default_rng(seed)
    return {"observation/image": rng.integers(0, 256, (*size, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (*size, 3), dtype=np.uint8),
            "observation/state": rng.normal(size=8).astype(np.float32),
            "prompt": ["put the bowl on the plate", "open the drawer", "pick up the mug"][seed % 3]}


def expected(reference, obs: dict, noise_seed: int) -> dict:
    """In-process: the LIBERO frame built by hand (HWC uint8 -> CHW float / 255), the processor, ``model.infer``
    with a generator seeded ``noise_seed``, the processor's inverse."""
    model, proc = reference
    frame = {"observation.images.image": torch.from_numpy(obs["observation/image"]).permute(2, 0, 1).float() / 255,
             "observation.images.wrist_image":
                 torch.from_numpy(obs["observation/wrist_image"]).permute(2, 0, 1).float() / 255,
             "observation.state": torch.from_numpy(obs["observation/state"]), "task": obs["prompt"]}
    out = model.infer(proc(frame), generator=torch.Generator().manual_seed(noise_seed))
    return {k: proc.postprocess(v)[0].numpy() for k, v in out.items()}


def test_metadata_and_healthz(server, reference):
    client = WebsocketClientPolicy(server.url)
    md = client.get_server_metadata()
    c = reference[0].config
    assert md["server"] == "vla-blocks" and md["model"] == "ACoTVLA"
    assert (md["action_horizon"], md["action_dim"], md["coarse_horizon"]) == (c.action_horizon, 7, c.ear.horizon)
    assert md["observation_layout"] == "libero" and "observation/wrist_image" in md["observation_spec"]
    assert md["outputs"] == ["actions", "coarse_actions"] and md["max_batch"] == 8
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:
        assert r.status == 200 and r.read() == b"OK\n"


def test_actions_equal_in_process(server, reference):
    client = WebsocketClientPolicy(server.url)
    H = reference[0].config.action_horizon
    for seed, noise_seed in ((1, 11), (2, 12)):
        obs = libero_obs(seed)
        want = expected(reference, obs, noise_seed)
        got = client.infer({**obs, "noise_seed": noise_seed})
        assert got["actions"].shape == (H, 7) and got["actions"].dtype == np.float32
        np.testing.assert_allclose(got["actions"], want["actions"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["coarse_actions"], want["coarse_actions"], rtol=1e-5, atol=1e-5)
        assert got["noise_seed"] == noise_seed
        assert got["server_timing"]["infer_ms"] > 0 and got["server_timing"]["batch_size"] == 1
    # the dataset statistics are in play: actions come out in the raw space (mean 1 .. -1, std 0.2 .. 3)
    assert np.abs(got["actions"]).max() > 0.5
    again = client.infer({**obs, "noise_seed": 12})
    np.testing.assert_array_equal(again["actions"], got["actions"])
    drawn = client.infer(obs)  # no seed: the server draws one and reports it
    np.testing.assert_allclose(drawn["actions"], expected(reference, obs, drawn["noise_seed"])["actions"],
                               rtol=1e-5, atol=1e-5)
    assert "prev_total_ms" in drawn["server_timing"]


def test_bad_messages_get_error_replies_and_connection_survives(server, reference):
    obs = libero_obs(3)
    bad = [
        ({k: v for k, v in obs.items() if k != "observation/state"}, "missing observation key 'observation/state'"),
        ({**obs, "observation/image": obs["observation/image"][..., 0]}, "'observation/image'.*3 dims"),
        ({**obs, "observation/image": obs["observation/image"][..., :2]}, "'observation/image'.*3 channels"),
        ({**obs, "observation/image": obs["observation/image"] * 2.0}, r"'observation/image'.*\[0, 1\]"),
        ({**obs, "observation/state": np.array(["x"] * 8)}, "'observation/state' has dtype"),
        ({**obs, "observation/state": np.full(8, np.nan, np.float32)}, "'observation/state' contains NaN"),
        ({**obs, "observation/state": np.zeros(6, np.float32)}, "state of 8 values, got 6"),
        ({**obs, "prompt": 7}, "'prompt' must be a string"),
        ({**obs, "noise_seed": -1}, "'noise_seed' must be an int"),
        ([1, 2, 3], "must be a dict"),
    ]
    client = WebsocketClientPolicy(server.url)
    for message, needle in bad:
        with pytest.raises(RuntimeError, match=needle):
            client.infer(message)
    # openpi's packer refuses complex arrays itself: a hand-made tagged map; raw bytes that are not msgpack; text
    complex_state = packb({**obs, "observation/state": {b"__ndarray__": True, b"data": b"\x00" * 64,
                                                        b"dtype": "<c8", b"shape": [8]}})
    for raw, needle in ((complex_state, "complex"), (b"\xc1\xc1", "not a msgpack message"),
                        ("hello", "text frame")):
        client._ws.send(raw)
        reply = client._ws.recv()
        assert isinstance(reply, str) and needle in reply, reply
    got = client.infer({**obs, "noise_seed": 5})  # still usable, and still right
    np.testing.assert_allclose(got["actions"], expected(reference, obs, 5)["actions"], rtol=1e-5, atol=1e-5)


def test_disconnect_mid_request_does_not_disturb_the_server(server, reference):
    obs = libero_obs(4)
    for _ in range(3):
        ws = ws_client.connect(server.url, compression=None, max_size=None)
        ws.recv()  # metadata
        ws.send(packb({**obs, "noise_seed": 1}))
        ws.close()  # gone before the reply
    ws = ws_client.connect(server.url, compression=None, max_size=None)
    ws.recv()
    ws.send(oc_msgpack.packb({**obs, "noise_seed": 1}))
    ws.socket.close()  # abrupt: no closing handshake
    with PolicyClient(server.url) as c:  # the helper evaluation code uses
        np.testing.assert_allclose(c.predict_action_chunk({**obs, "noise_seed": 9}),
                                   expected(reference, obs, 9)["actions"], rtol=1e-5, atol=1e-5)
        with pytest.raises(ServerError, match="missing observation key"):
            c.infer({})
    assert server.proc.poll() is None


def test_eight_concurrent_clients_share_one_forward_pass(saved_model, reference):
    # a long batch timeout: the first request waits until all 8 arrived, so the batch is full by construction
    srv = ServerProcess(saved_model, "--max-batch", "8", "--batch-timeout-ms", "20000")
    try:
        n = 8
        clients = [WebsocketClientPolicy(srv.url) for _ in range(n)]
        cases = [libero_obs(100 + i) for i in range(n)]
        results: list = [None] * n
        barrier = threading.Barrier(n)

        def work(i):
            barrier.wait()
            results[i] = clients[i].infer({**cases[i], "noise_seed": 1000 + i})

        threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i, r in enumerate(results):
            assert r is not None, f"client {i} got no reply"
            assert r["server_timing"]["batch_size"] == n
            want = expected(reference, cases[i], 1000 + i)
            np.testing.assert_allclose(r["actions"], want["actions"], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(r["coarse_actions"], want["coarse_actions"], rtol=1e-4, atol=1e-4)
    finally:
        srv.close()


# ---------------------------------------------------------------------------------------------- in-process
def batch_obs(model, seed):
    b = model.demo_batch(1, generator=torch.Generator().manual_seed(seed))
    return {k: v[0].numpy() for k, v in b.items() if k != "actions"}, {k: v for k, v in b.items() if k != "actions"}


class _FailingRunner(PolicyRunner):
    """Raises inside the forward pass for one noise seed: an internal error, not a bad observation."""

    def run(self, items):
        if any(it.seed == 666 for it in items):
            raise RuntimeError("boom in the forward pass")
        return super().run(items)


@pytest.mark.parametrize("inference_thread", [False, True])
def test_internal_error_closes_with_1011_and_spares_other_clients(reference, inference_thread):
    model = reference[0]
    server = PolicyServer(_FailingRunner(model), "127.0.0.1", 0, max_batch=4, batch_timeout_ms=2000,
                          inference_thread=inference_thread)
    port = server.start()
    try:
        obs, batch = batch_obs(model, 5)
        want = model.infer(batch, generator=torch.Generator().manual_seed(3))["actions"][0].numpy()
        good, badc = WebsocketClientPolicy(f"127.0.0.1:{port}"), WebsocketClientPolicy(f"127.0.0.1:{port}")
        out: dict = {}

        def send_good():
            out["good"] = good.infer({**obs, "noise_seed": 3})

        t = threading.Thread(target=send_good)
        t.start()
        with pytest.raises(RuntimeError, match="boom in the forward pass"):
            badc.infer({**obs, "noise_seed": 666})   # same batch as the good request, which is re-run alone
        t.join(60)
        np.testing.assert_allclose(out["good"]["actions"], want, rtol=1e-5, atol=1e-6)
        import websockets
        with pytest.raises(websockets.ConnectionClosedError) as e:
            badc._ws.recv()
        assert e.value.rcvd.code == 1011
        np.testing.assert_allclose(good.infer({**obs, "noise_seed": 3})["actions"], want, rtol=1e-5, atol=1e-6)
    finally:
        server.stop()


def test_batch_layout_runner(reference):
    """``--observation batch``: clients send the model's own batch keys; checked against ``model.demo_batch``."""
    model = reference[0]
    runner = PolicyRunner(model)
    assert set(runner.spec()) == {"images", "image_masks", "tokenized_prompt", "tokenized_prompt_mask", "state",
                                  "noise_seed"}
    cases = [batch_obs(model, 20 + i) for i in range(3)]
    items = [runner.prepare({**o, "noise_seed": 50 + i}) for i, (o, _) in enumerate(cases)]
    for (o, b), r, i in zip(cases, runner.run(items), range(3)):  # batched = each alone with its seed
        want = model.infer(b, generator=torch.Generator().manual_seed(50 + i))
        np.testing.assert_allclose(r["actions"], want["actions"][0].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r["coarse_actions"], want["coarse_actions"][0].numpy(), rtol=1e-4, atol=1e-5)
    o = cases[0][0]
    for change, needle in (({"images": o["images"][:2]}, "'images' has shape"),
                           ({"image_masks": o["image_masks"].astype(np.float32)}, "must be a bool array"),
                           ({"state": np.full(8, np.inf, np.float32)}, "'state' contains NaN or infinite"),
                           ({"tokenized_prompt": o["tokenized_prompt"] + 10_000}, "ids outside")):
        with pytest.raises(ObservationError, match=needle):
            runner.prepare({**o, **change})


def test_processor_rejection_is_an_observation_error(reference):
    from vla_blocks.serve.layouts import ImageSpec, ObservationLayout
    model, proc = reference
    only_front = ObservationLayout("front", {"image": ImageSpec("observation/image")}, ("observation/state",))
    runner = PolicyRunner(model, proc, only_front)  # the processor also wants the wrist camera
    with pytest.raises(ObservationError, match="processor rejected.*wrist_image"):
        runner.infer(libero_obs(0))


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_print_spec_and_errors(saved_model, capsys):
    from vla_blocks.cli import main
    assert main(["serve", str(saved_model), "--print-spec", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "observation/wrist_image: image HWC" in out and "observation.images.wrist_image" in out
    assert main(["serve", str(saved_model), "--print-spec", "--observation", "batch"]) == 0
    out = capsys.readouterr().out
    assert "tokenized_prompt: int64 array [8]" in out and "noise_seed" in out
    for args, needle in ((["no-such-recipe"], "no-such-recipe"),
                         ([str(saved_model), "--max-batch", "0"], "--max-batch must be >= 1"),
                         ([str(saved_model), "--observation", "libro"], "unknown observation layout 'libro'")):
        assert main(["serve", *args, "--print-spec"]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------- benchmark
@pytest.mark.slow
def test_bench_serve_smoke(tmp_path):
    """``vla-blocks bench serve --smoke`` writes consistent results (timings are recorded, never asserted)."""
    from vla_blocks.cli import main
    assert main(["bench", "serve", "--smoke", "--out", str(tmp_path), "--quiet", "--set", "requests=8"]) == 0
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    p = json.loads((folder / "serve.json").read_text())
    assert p["suite"] == "serve" and p["smoke"] is True and (folder / "serve.md").is_file()
    o, th = p["overhead"], p["throughput"]
    assert o["max_abs_diff_vs_in_process"] == 0.0  # the server's reply is the in-process runner's, bit for bit
    assert o["overhead_ms"] == pytest.approx(o["round_trip"]["median_ms"] - o["in_process"]["median_ms"])
    for name, clients in (("sequential", 1), ("concurrent_batching", 8), ("concurrent_no_batching", 8)):
        r = th[name]
        assert r["clients"] == clients and r["requests"] == 8
        assert r["req_per_s"] == pytest.approx(r["requests"] / r["wall_s"])
    assert th["sequential"]["max_batch_seen"] == 1 and th["concurrent_no_batching"]["max_batch_seen"] == 1
    assert 1 <= th["concurrent_batching"]["mean_batch"] <= 8
    assert th["ratio"] == pytest.approx(th["concurrent_batching"]["req_per_s"] / th["sequential"]["req_per_s"])


def test_absent_optional_camera_is_masked_like_an_empty_slot():
    """ALOHA sim sends only ``cam_high``: the other cameras' slots are masked for that request, which must give
    the actions of a processor whose other slots are empty (masked) by construction."""
    from vla_blocks.data import make_processor
    from vla_blocks.serve.cli import layout_features
    torch.manual_seed(0)
    model = create_model("pi0-tiny", state_dim=14).eval()
    feats = layout_features(LAYOUTS["aloha"], model)
    runner = PolicyRunner(model, make_processor(model, feats).eval(), LAYOUTS["aloha"])
    assert runner.processor.config.cameras == ["observation.images.cam_high", "observation.images.cam_left_wrist",
                                               "observation.images.cam_right_wrist"]
    only_high = make_processor(model, feats, camera_map=["observation.images.cam_high", None, None]).eval()
    rng = np.random.default_rng(0)
    high = rng.integers(0, 256, (3, 30, 40), dtype=np.uint8)
    state = rng.normal(size=14).astype(np.float32)
    full = runner.prepare({"images": {"cam_high": high, "cam_left_wrist": high}, "state": state, "prompt": "fold",
                           "noise_seed": 4})
    sim = runner.prepare({"images": {"cam_high": high}, "state": state, "prompt": "fold", "noise_seed": 4})
    got_sim, got_full = runner.run([sim, full])  # one batch: the mask applies to its own request only
    frame = {"observation.images.cam_high": torch.from_numpy(high).float() / 255,
             "observation.state": torch.from_numpy(state), "task": "fold"}
    want = model.infer(only_high(frame), generator=torch.Generator().manual_seed(4))["actions"][0].numpy()
    np.testing.assert_allclose(got_sim["actions"], want, rtol=1e-4, atol=1e-5)
    assert np.abs(got_full["actions"] - want).max() > 1e-3  # the wrist cameras do count when they are sent


def test_halo_served_with_trace_on_request():
    """HALO through its processor: a 2-frame history stack in, the actions of ``model.infer`` with the request's
    seed out (raw space), and the trace summary only when asked."""
    from vla_blocks.data import make_processor
    from vla_blocks.serve.layouts import ImageSpec, ObservationLayout
    torch.manual_seed(0)
    model = create_model("halo-tiny").eval()
    layout = ObservationLayout("cam", {"image": ImageSpec("observation/image")}, prompt="prompt")
    feats = {"observation.images.image": {"dtype": "image", "shape": [3, 32, 32]},
             "action": {"dtype": "float32", "shape": [model.config.action_dim]}}
    stats = {"action": {"mean": np.linspace(-1, 1, model.config.action_dim),
                        "std": np.linspace(0.5, 2, model.config.action_dim)}}
    proc = make_processor(model, feats, stats=stats, state_key=None).eval()
    runner = PolicyRunner(model, proc, layout)
    md = runner.metadata()
    assert md["action_horizon"] == model.config.chunk_size and md["outputs"] == ["actions", "trace"]
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)  # oldest first
    got = runner.infer({"observation/image": frames, "prompt": "push the red block", "noise_seed": 7,
                        "return_trace": True})
    history = [torch.from_numpy(f).permute(2, 0, 1).float() / 255 for f in frames]
    trace = model.infer(history, "push the red block", generator=torch.Generator().manual_seed(7))
    want = trace.actions.float().numpy() * stats["action"]["std"] + stats["action"]["mean"]  # z-score, by hand
    np.testing.assert_allclose(got["actions"], want, rtol=1e-5, atol=1e-5)
    assert got["trace"]["mode"] == trace.mode and "actions" not in got["trace"]
    assert unpackb(packb(got))["trace"]["timings"].keys() == trace.summary()["timings"].keys()  # it travels
    plain = runner.infer({"observation/image": frames, "prompt": "push the red block", "noise_seed": 7})
    assert "trace" not in plain
    with pytest.raises(ObservationError, match="'return_trace' must be a bool"):
        runner.prepare({"observation/image": frames, "prompt": "x", "return_trace": "yes"})
