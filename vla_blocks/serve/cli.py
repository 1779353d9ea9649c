"""``vla-blocks serve MODEL``: serve a policy over openpi's websocket protocol."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_arguments", "run", "load_runner"]


def load_runner(model_ref: str, observation: str = "libero", *, device: str = "cpu", prompt: str | None = None,
                seed: int = 0, overrides: list[str] | None = None):
    """Load ``model_ref`` (recipe name/path, ``local-dir:``, ``hf-hub:`` or a saved folder) and build its runner.

    ``observation``: ``batch`` (clients send the model's batch keys; no processor) or a layout name / YAML file
    (``libero``, ``aloha``, ``droid``, ``FILE.yaml``), whose frames go through the model's processor."""
    import torch

    from ..model import create_model
    from .layouts import load_layout
    from .runner import PolicyRunner

    layout = None if observation == "batch" else load_layout(observation)  # a bad layout fails before loading
    ref = f"local-dir:{model_ref}" if os.path.isdir(model_ref) else model_ref
    model = create_model(ref, overrides=list(overrides or [])).to(torch.device(device))
    if layout is None:
        return PolicyRunner(model, None, default_prompt=prompt, seed=seed)
    processor = load_processor(model, model_ref, layout)
    return PolicyRunner(model, processor, layout, default_prompt=prompt, seed=seed)


def layout_features(layout, model) -> dict:
    """lerobot ``features`` of the frames ``layout`` builds, for ``make_processor`` (cameras in layout order)."""
    from .layouts import IMAGE_PREFIX, STATE_KEY
    c = model.config
    size = getattr(getattr(model, "vision_tower", None), "image_size", None)
    feats = {IMAGE_PREFIX + cam: {"dtype": "image", "shape": [3, size, size], "names": ["channel", "height", "width"]}
             for cam in layout.images}
    if layout.state:
        feats[STATE_KEY] = {"dtype": "float32", "shape": [layout.state_dim or c.state_dim or c.action_dim]}
    feats["action"] = {"dtype": "float32", "shape": [c.real_action_dim or c.action_dim]}
    return feats


def load_processor(model, model_ref: str, layout):
    """The model's processor: the one saved beside a model folder (its statistics are installed into the model),
    else one built from the model's recipe for ``layout``'s cameras (in layout order) and state."""
    try:
        from ..data import PolicyProcessor, make_processor
    except ImportError as e:
        raise ValueError(f"the {layout.name!r} observation layout needs the model's processor: "
                         f"pip install 'vla-blocks[data]' ({e}); or use --observation batch") from e
    if os.path.isdir(model_ref):
        try:
            proc = PolicyProcessor.from_pretrained(model_ref, model=model)
        except FileNotFoundError:
            proc = None
        if proc is not None:
            from .layouts import IMAGE_PREFIX
            have = {IMAGE_PREFIX + cam for cam in layout.images}
            missing = [c for c in proc.config.cameras if c is not None and c not in have]
            if missing:
                raise ValueError(f"the processor saved in {model_ref} reads cameras {missing}, which the "
                                 f"{layout.name!r} layout does not provide (it gives {sorted(have)}): pass a layout "
                                 f"YAML that names them")
            return proc.eval()
    state_key = "observation.state" if layout.state else None
    return make_processor(model, layout_features(layout, model), state_key=state_key).eval()


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("model", help="recipe name or path, local-dir:PATH, hf-hub:org/name[@rev], or a saved folder")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--observation", default="libero", metavar="LAYOUT",
                   help="observation layout: libero | aloha | droid | FILE.yaml (frames through the model's "
                        "processor: the one saved in the model folder, else one made from the recipe) or batch "
                        "(clients send the model's batch keys, no processor); default libero")
    p.add_argument("--prompt", default=None, help="task for observations that carry no prompt")
    p.add_argument("--max-batch", type=int, default=8, help="most requests per forward pass (1: no batching)")
    p.add_argument("--batch-timeout-ms", type=float, default=2.0,
                   help="how long a request waits for others to share its forward pass (default 2)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--inference-thread", action="store_true",
                   help="run forward passes on a worker thread (the event loop stays responsive during long GPU "
                        "passes; on a CPU the thread hand-offs cost a few ms per request)")
    p.add_argument("--seed", type=int, default=0, help="seeds the noise of requests that send no noise_seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--print-spec", action="store_true", help="print the expected observation keys and exit")


def run(args) -> int:
    import json

    import torch

    from ..config import ConfigError
    from .layouts import ObservationError

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_batch < 1:
        print(f"error: --max-batch must be >= 1, got {args.max_batch}", file=sys.stderr)
        return 2
    if args.batch_timeout_ms < 0:
        print(f"error: --batch-timeout-ms must be >= 0, got {args.batch_timeout_ms}", file=sys.stderr)
        return 2
    try:
        runner = load_runner(args.model, args.observation, device=args.device, prompt=args.prompt,
                             seed=args.seed, overrides=args.overrides)
    except (ConfigError, ObservationError, ValueError, TypeError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = runner.spec()
    print(f"observation layout {runner.layout_name!r}: expected keys", flush=True)
    for k, v in spec.items():
        print(f"  {k}: {v}", flush=True)
    if args.print_spec:
        return 0
    from .server import PolicyServer
    server = PolicyServer(runner, args.host, args.port, max_batch=args.max_batch,
                          batch_timeout_ms=args.batch_timeout_ms, inference_thread=args.inference_thread,
                          metadata={"model_ref": args.model})

    def ready(port):
        host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
        print(f"serving {args.model} on ws://{host}:{port} (max batch {args.max_batch}, "
              f"batch timeout {args.batch_timeout_ms} ms; GET /healthz)", flush=True)
        print(json.dumps({"port": port}), flush=True)

    try:
        server.serve_forever(on_ready=ready)
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0
