"""``PolicyServer``: openpi's websocket policy protocol, with request batching.

Protocol (what ``openpi_client.WebsocketClientPolicy`` speaks):

- on connect the server sends the metadata (msgpack map: model, action horizon/dims, observation layout and spec,
  batching settings);
- each binary message is one msgpack-numpy observation; the reply is a msgpack-numpy map with ``actions``
  [H, A_real] (ACoT also ``coarse_actions``), ``noise_seed`` and ``server_timing`` (``infer_ms``: the forward pass
  that served the request, ``batch_size``: how many requests shared it, ``prev_total_ms``: the previous
  request's time on this connection from receipt to reply);
- a malformed observation (not msgpack, missing / misshapen keys, wrong dtype, NaN) gets a *text* reply naming
  the problem (the client raises it as ``RuntimeError``) and the connection stays usable; any other exception
  sends the traceback as text and closes the connection with status 1011 (internal error), as openpi does.
  Other connections are unaffected;
- ``GET /healthz`` answers 200 ``OK``.

Batching: requests are queued; the batcher takes the first, waits up to ``batch_timeout_ms`` for more (up to
``max_batch``; it stops waiting once every open connection has a request in the batch, so a lone client never
waits), and runs them in one forward pass. Requests that arrive during a pass wait in the socket buffers and go
into the next one. The pass runs on the event-loop thread by default (``inference_thread=False``): on a CPU a hand-off
to a worker thread and back cost several ms per request (measured on a loaded 2-core machine); with
``inference_thread=True`` the loop keeps answering (``/healthz``, new connections) during long GPU passes. A batch that fails is re-run one
request at a time, so one bad request fails alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http
import logging
import threading
import time
import traceback

from .layouts import ObservationError
from .runner import PolicyRunner, Prepared
from .wire import WireError, packb, unpackb

try:
    import websockets
    from websockets.asyncio.server import serve as _ws_serve
except ModuleNotFoundError as e:  # pragma: no cover - exercised only without the extra
    raise ModuleNotFoundError("vla_blocks.serve needs websockets>=13: pip install 'vla-blocks[serve]'") from e

__all__ = ["PolicyServer"]

logger = logging.getLogger(__name__)

INTERNAL_ERROR = 1011


class _Request:
    __slots__ = ("item", "future")

    def __init__(self, item: Prepared, future: asyncio.Future):
        self.item, self.future = item, future


class PolicyServer:
    """Serve a :class:`~vla_blocks.serve.runner.PolicyRunner` over openpi's websocket protocol.

    ``max_batch``: most requests per forward pass (1 disables batching). ``batch_timeout_ms``: how long the first
    request of a batch waits for others. ``max_message_bytes``: the largest observation accepted.
    ``inference_thread``: run forward passes on a worker thread instead of the event loop (see the module docstring).

    Blocking: ``PolicyServer(runner, port=8000).serve_forever()``. In a background thread (tests, notebooks):
    ``server.start()`` returns the bound port (``port=0`` picks a free one), ``server.stop()`` ends it.
    """

    def __init__(self, runner: PolicyRunner, host: str = "0.0.0.0", port: int = 8000, *, max_batch: int = 8,
                 batch_timeout_ms: float = 2.0, max_message_bytes: int = 256 * 2 ** 20,
                 metadata: dict | None = None, inference_thread: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if batch_timeout_ms < 0:
            raise ValueError(f"batch_timeout_ms must be >= 0, got {batch_timeout_ms}")
        self.runner = runner
        self.host, self.port = host, port
        self.max_batch, self.batch_timeout_ms = max_batch, batch_timeout_ms
        self.max_message_bytes = max_message_bytes
        self.metadata = {"server": "vla-blocks", **runner.metadata(), "max_batch": max_batch,
                         "batch_timeout_ms": batch_timeout_ms, **(metadata or {})}
        self._executor = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vla-blocks-infer")
                          if inference_thread else None)
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.stats = {"requests": 0, "batches": 0, "errors": 0}
        self._connections = 0

    # -- lifecycle -----------------------------------------------------------------------------------
    def serve_forever(self, on_ready=None):
        """Run until interrupted (or :meth:`stop`). ``on_ready(port)`` is called once the socket is bound."""
        asyncio.run(self._main(on_ready))

    def start(self, timeout: float = 30.0) -> int:
        """Serve in a daemon thread; returns the bound port once it accepts connections."""
        def target():
            try:
                self.serve_forever()
            except BaseException as e:  # surfaced by start()
                self._error = e
                self._ready.set()
        self._thread = threading.Thread(target=target, name="vla-blocks-serve", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the server did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        return self.port

    def stop(self, timeout: float = 10.0):
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    async def _main(self, on_ready=None):
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._stop = asyncio.Event()
        batcher = asyncio.create_task(self._batcher())
        try:
            async with _ws_serve(self._handler, self.host, self.port, compression=None,
                                 max_size=self.max_message_bytes, process_request=self._http) as server:
                self.port = server.sockets[0].getsockname()[1]
                self._ready.set()
                if on_ready is not None:
                    on_ready(self.port)
                await self._stop.wait()
        finally:
            batcher.cancel()
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)

    # -- HTTP ------------------------------------------------------------------------------------------
    @staticmethod
    def _http(connection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        return None

    # -- connections -----------------------------------------------------------------------------------
    async def _handler(self, ws):
        peer = getattr(ws, "remote_address", None)
        prev_total_ms = None
        self._connections += 1
        try:
            await ws.send(packb(self.metadata))
            async for message in ws:
                t0 = time.perf_counter()
                try:
                    if isinstance(message, str):
                        raise WireError("expected a binary msgpack message, got a text frame")
                    item = self.runner.prepare(unpackb(message))
                except (WireError, ObservationError) as e:
                    self.stats["errors"] += 1
                    await ws.send(f"bad observation: {e}")
                    continue
                fut = self._loop.create_future()
                await self._queue.put(_Request(item, fut))
                try:
                    reply, infer_ms, batch_size = await fut
                except ObservationError as e:
                    self.stats["errors"] += 1
                    await ws.send(f"bad observation: {e}")
                    continue
                except Exception:
                    self.stats["errors"] += 1
                    logger.exception("inference failed for %s", peer)
                    await ws.send(traceback.format_exc())
                    await ws.close(INTERNAL_ERROR, "internal error")
                    return
                reply["server_timing"] = {"infer_ms": infer_ms, "batch_size": batch_size}
                if prev_total_ms is not None:
                    reply["server_timing"]["prev_total_ms"] = prev_total_ms
                await ws.send(packb(reply))
                prev_total_ms = (time.perf_counter() - t0) * 1000.0
        except websockets.ConnectionClosed:
            logger.info("connection from %s closed", peer)
        finally:
            self._connections -= 1

    # -- batching ----------------------------------------------------------------------------------------
    async def _batcher(self):
        q = self._queue
        while True:
            reqs = [await q.get()]
            deadline = self._loop.time() + self.batch_timeout_ms / 1000.0
            while len(reqs) < self.max_batch:
                if not q.empty():
                    reqs.append(q.get_nowait())
                    continue
                if len(reqs) >= self._connections:  # every open connection is in this batch: nobody to wait for
                    break
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    break
                try:
                    reqs.append(await asyncio.wait_for(q.get(), remaining))
                except asyncio.TimeoutError:
                    break
            reqs = [r for r in reqs if not r.future.done()]
            groups: dict[tuple, list[_Request]] = {}
            for r in reqs:
                groups.setdefault(r.item.group, []).append(r)
            for group in groups.values():
                await self._run(group)

    async def _run(self, reqs: list[_Request]):
        items = [r.item for r in reqs]
        t0 = time.perf_counter()
        try:
            if self._executor is not None:
                replies = await self._loop.run_in_executor(self._executor, self.runner.run, items)
            else:
                replies = self.runner.run(items)
        except Exception as e:
            if len(reqs) > 1:  # one bad request must not fail the others: retry them one by one
                for r in reqs:
                    await self._run([r])
                return
            if not reqs[0].future.done():
                reqs[0].future.set_exception(e)
            return
        infer_ms = (time.perf_counter() - t0) * 1000.0
        self.stats["batches"] += 1
        self.stats["requests"] += len(reqs)
        for r, reply in zip(reqs, replies):
            if not r.future.done():
                r.future.set_result((reply, infer_ms, len(reqs)))
