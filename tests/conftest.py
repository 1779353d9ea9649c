"""Test-session settings: offline Hub, and one torch thread per xdist worker.

The models under test are tiny: with ``pytest -n 2`` on a 2-core machine, two workers of two threads
each oversubscribe the cores and tiny matmuls slow down several-fold, so each worker uses one thread.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
