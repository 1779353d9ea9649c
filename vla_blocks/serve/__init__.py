"""Serving policies over openpi's websocket/msgpack protocol (``pip install 'vla-blocks[serve]'``).

- :class:`PolicyServer` — the server (metadata on connect, msgpack-numpy requests, ``/healthz``, error replies,
  request batching); ``vla-blocks serve MODEL`` on the command line;
- :class:`PolicyRunner` — observation → processor → policy → inverse processor, batched; :func:`load_runner` builds
  one from a model reference and a layout name;
- :class:`ObservationLayout` / :func:`load_layout` — openpi's LIBERO / ALOHA / DROID observation keys (or a YAML
  file) mapped onto lerobot-style frame keys;
- :class:`PolicyClient` — a client for evaluation code; ``openpi_client.WebsocketClientPolicy`` works as well;
- :class:`ServerProcess` — ``vla-blocks serve`` in a subprocess on a free loopback port (tests, benchmarks);
- :mod:`vla_blocks.serve.wire` — the msgpack-numpy wire format.
"""

from .layouts import LAYOUTS, ObservationError, ObservationLayout, load_layout
from .process import ServerProcess
from .runner import SEED_KEY, PolicyRunner
from .wire import WireError, packb, unpackb


def __getattr__(name):  # the websocket parts import websockets only when used
    if name == "PolicyServer":
        from .server import PolicyServer
        return PolicyServer
    if name == "load_runner":
        from .cli import load_runner
        return load_runner
    if name in ("PolicyClient", "ServerError", "wait_for_server"):
        from . import client
        return getattr(client, name)
    raise AttributeError(f"module 'vla_blocks.serve' has no attribute {name!r}")


__all__ = ["LAYOUTS", "ObservationError", "ObservationLayout", "load_layout", "SEED_KEY", "PolicyRunner",
           "WireError", "packb", "unpackb", "ServerProcess", "PolicyServer", "PolicyClient", "ServerError", "wait_for_server", "load_runner"]
