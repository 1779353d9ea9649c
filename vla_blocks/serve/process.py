"""``vla-blocks serve`` in a subprocess: for tests, benchmarks and scripts that drive a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

__all__ = ["ServerProcess"]


class ServerProcess:
    """``vla-blocks serve MODEL *args`` in a child process on a free loopback port (one torch thread, offline Hub),
    returned once it listens: ``port`` and ``url`` (``ws://127.0.0.1:PORT``). ``close()`` (or leaving a ``with``
    block) terminates it, killing it after 10 s.

    Example::

        with ServerProcess("./my_policy", "--observation", "libero") as srv:
            client = PolicyClient(srv.url)
    """

    def __init__(self, model, *args: str):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vla_blocks.cli", "serve", str(model), "--host", "127.0.0.1", "--port", "0",
             "--threads", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for line in self.proc.stdout:  # the server prints {"port": N} once it listens
            if line.startswith("{"):
                self.port = json.loads(line)["port"]
                break
        else:
            raise RuntimeError(f"the server did not start: {self.proc.stderr.read()[-2000:]}")
        self.url = f"ws://127.0.0.1:{self.port}"

    def close(self):
        """Terminate the server (kill it if it has not exited after 10 s); a no-op once it has exited."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc):
        self.close()
