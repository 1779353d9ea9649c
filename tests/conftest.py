"""Test-session settings: offline Hub, and one torch thread per xdist worker.

The models under test are tiny: with ``pytest -n 2`` on a 2-core machine, two workers of two threads
each oversubscribe the cores and tiny matmuls slow down several-fold, so each worker uses one thread.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Triton's interpreter mode is fixed when triton is first imported: without a GPU, import it here in interpreter
# mode (TRITON_INTERPRET=1, restored afterwards), before any test module or the library imports it.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    _prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    finally:
        if _prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _prev


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network: HF_HUB_OFFLINE=1 and an empty temporary Hub cache (huggingface_hub reads its environment at
    import, so the constants are patched too). Returns the cache folder."""
    from huggingface_hub import constants
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return cache


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU run faster (and steadier) on one torch thread; restores the count after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
