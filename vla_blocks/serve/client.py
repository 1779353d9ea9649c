"""A client for policy servers that speak openpi's protocol (ours or openpi's), for evaluation code.

Same wire format and connection settings as ``openpi_client.WebsocketClientPolicy`` (no compression, no message
size limit), without its extra dependencies, plus what an evaluation loop needs: a connection timeout instead of
waiting forever, :class:`ServerError` for error replies, and ``predict_action_chunk`` returning one chunk::

    from vla_blocks.serve import PolicyClient
    with PolicyClient("ws://127.0.0.1:8000") as policy:
        print(policy.metadata["action_horizon"])
        chunk = policy.predict_action_chunk(obs)        # np.ndarray [H, A]; obs as the server's layout expects
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np

from .wire import packb, unpackb

try:
    import websockets
    import websockets.sync.client as _sync_client
except ModuleNotFoundError as e:  # pragma: no cover
    raise ModuleNotFoundError("vla_blocks.serve needs websockets>=13: pip install 'vla-blocks[serve]'") from e

__all__ = ["PolicyClient", "ServerError", "wait_for_server"]


class ServerError(RuntimeError):
    """The server answered with an error (a text frame) or closed the connection with an error status."""


def _uri(url: str, port: int | None = None) -> str:
    uri = url if url.startswith(("ws://", "wss://")) else f"ws://{url}"
    return uri if port is None else f"{uri}:{port}"


class PolicyClient:
    """A synchronous connection to a policy server. ``url``: ``ws://host:port`` (or ``host`` with ``port``).
    ``connect_timeout``: seconds to keep retrying while the server starts (``0``: one attempt).
    ``api_key``: sent as openpi does (``Authorization: Api-Key ...``)."""

    def __init__(self, url: str, port: int | None = None, *, connect_timeout: float = 30.0,
                 api_key: str | None = None):
        self.uri = _uri(url, port)
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self._ws = _sync_client.connect(self.uri, compression=None, max_size=None,
                                                additional_headers=headers, open_timeout=max(1.0, connect_timeout))
                break
            except (OSError, websockets.InvalidHandshake) as e:
                if time.monotonic() >= deadline:
                    raise ConnectionError(f"no policy server at {self.uri}: {e}") from e
                time.sleep(0.2)
        self.metadata: dict = unpackb(self._ws.recv())

    def infer(self, obs: Mapping[str, Any]) -> dict:
        """Send one observation; returns the reply dict (``actions``, ``server_timing``, ...)."""
        try:
            self._ws.send(packb(dict(obs)))
            reply = self._ws.recv()
        except websockets.ConnectionClosed as e:
            raise ServerError(f"{self.uri} closed the connection ({e})") from e
        if isinstance(reply, str):
            raise ServerError(f"{self.uri}: {reply}")
        return unpackb(reply)

    def predict_action_chunk(self, obs: Mapping[str, Any]) -> np.ndarray:
        """The ``actions`` chunk [H, A] for one observation."""
        return np.asarray(self.infer(obs)["actions"])

    def reset(self):
        """Nothing to reset on the server (each request is independent); kept for the policy interface."""

    def close(self):
        self._ws.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def wait_for_server(url: str, timeout: float = 30.0) -> dict:
    """Connect until the server answers (or ``timeout``), return its metadata and disconnect."""
    with PolicyClient(url, connect_timeout=timeout) as c:
        return c.metadata
