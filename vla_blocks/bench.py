"""Benchmark harness and the ``vla-blocks bench`` command.

The suites live in the source checkout's ``benchmarks/`` folder (``attention.py``, ``inference.py``,
``backbone.py``); this module holds what they share:

- **timing**: on CUDA ``triton.testing.do_bench`` (time budgets in ms, L2 flushed between calls,
  quartiles); on CPU warm-up calls, then repetitions until a count and a time budget are reached,
  garbage collection off, median and inter-quartile range. :func:`time_interleaved` alternates
  candidates call by call so that load from other processes hits both sides of a ratio alike;
- **memory**: ``torch.cuda.max_memory_allocated`` growth on CUDA; on CPU the growth of the resident
  set, sampled every 0.5 ms from ``/proc/self/statm`` during the call after ``malloc_trim`` (a lower
  bound: the allocator may reuse memory it already holds);
- **denominators**: a matmul measured in the same run (bf16 8192³ on CUDA; on CPU a size that takes
  about 0.1 s) and the device's dense peak where known (H100 SXM 989.4 TFLOP/s bf16);
- **hygiene**: device (CPU model and flags from ``/proc/cpuinfo``, or GPU name, clocks and power limit
  from ``nvidia-smi``), versions, thread count, load average before and after, git commit;
- **results**: ``<out>/<device-slug>/<suite>.json`` + ``.md`` + ``.png``, each written atomically
  (temporary file in the same folder, then ``os.replace``).

Command line::

    vla-blocks bench attention|inference|backbone|all [--smoke] [--out DIR] [--device cpu|cuda] [--merge]
    vla-blocks bench render          # re-render benchmarks/results/*/*.md|png from their JSON, and README's tables
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import gc
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .registry import Registry

#: Benchmark suites: name -> the script that runs it (``benchmarks/<name>.py`` of the source checkout, or an
#: importable module ``pkg.module`` registered by a plug-in through the entry-point group ``vla_blocks.bench_suites``).
#: A suite module provides ``run(ctx) -> dict``, ``render_markdown``, ``summary_markdown`` and ``plot`` (optional ``merge``).
SUITES: Registry[str] = Registry("benchmark suite", group="vla_blocks.bench_suites")
for _name in ("attention", "inference", "backbone", "build", "data", "composition", "serve", "train", "metaworld"):
    SUITES.register(_name, f"benchmarks/{_name}.py")
SCHEMA_VERSION = 1

# Dense (non-sparse) tensor-core peaks in TFLOP/s, by GPU name fragment (longest match first).
# H100 SXM5: 132 SMs × 4 tensor cores × 1024 FLOP/clk × 1.83 GHz = 989.4 (reference/attention_kernels.md §2).
GPU_PEAK_TFLOPS = {
    "H100 PCIe": {"bfloat16": 756.0, "float16": 756.0},
    "H100": {"bfloat16": 989.4, "float16": 989.4},  # "NVIDIA H100 80GB HBM3" is the SXM part
    "H200": {"bfloat16": 989.4, "float16": 989.4},
    "A100": {"bfloat16": 312.0, "float16": 312.0},
}


# ---------------------------------------------------------------------------------------------- files
def checkout_root() -> Path | None:
    """The source checkout holding ``benchmarks/`` (an editable install), or None."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "benchmarks").is_dir() else None


def default_results_dir() -> Path:
    """``benchmarks/results`` of the source checkout (``FileNotFoundError`` outside one: pass ``--out``)."""
    root = checkout_root()
    if root is None:
        raise FileNotFoundError("benchmarks/ not found: run from a source checkout (pip install -e .) or pass --out")
    return root / "benchmarks" / "results"


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (readers never see a partial file; parents
    created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, _default_mode())  # mkstemp makes 0600 files; results are meant to be read by others
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_savefig(fig, path: Path) -> None:
    """Save a matplotlib figure as PNG to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, _default_mode())
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_suite(name: str):
    """Import the suite's script (``benchmarks/<name>.py`` of the source checkout) or module."""
    try:
        target = SUITES.get(name)
    except KeyError as e:
        raise ValueError(str(e)) from None
    if not target.endswith(".py"):
        return importlib.import_module(target)
    root = checkout_root()
    if root is None:
        raise FileNotFoundError("benchmarks/ not found: the suites run from a source checkout (pip install -e .)")
    path = root / target
    mod_name = f"vla_blocks_benchmarks_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------- device
def _slug(s: str) -> str:
    s = re.sub(r"\((r|tm|c)\)", "", s.lower())
    s = re.sub(r"\b(cpu|processor)\b", " ", s)
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-")


def _cpuinfo() -> dict:
    info: dict[str, Any] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for key, out in (("model name", "model"), ("cpu MHz", "mhz"), ("flags", "flags"), ("cpu family", "family"),
                     ("model", "model_number"), ("stepping", "stepping")):
        m = re.search(rf"^{re.escape(key)}\s*:\s*(.*)$", text, flags=re.M)
        if m:
            info[out] = m.group(1).strip()
    flags = set(info.pop("flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile",
              "amx_int8", "asimd", "sve")
    info["isa"] = [f for f in wanted if f in flags]
    info["model"] = info.get("model") or platform.processor() or platform.machine()
    info["logical_cpus"] = os.cpu_count()
    with contextlib.suppress(AttributeError):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    info["hypervisor"] = "hypervisor" in flags
    return info


def _nvidia_smi(index: int) -> dict:
    q = ("name,clocks.sm,clocks.max.sm,clocks.mem,power.limit,power.max_limit,temperature.gpu,"
         "pcie.link.gen.current,driver_version,persistence_mode")
    try:
        out = subprocess.run(["nvidia-smi", f"--id={index}", f"--query-gpu={q}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"nvidia-smi unavailable ({type(e).__name__})"}
    if out.returncode != 0:
        return {"error": out.stderr.strip()[:200]}
    vals = [v.strip() for v in out.stdout.strip().split(",")]
    return dict(zip(q.split(","), vals))


def gpu_peak_tflops(name: str, dtype: str) -> float | None:
    """The dense tensor-core peak (TFLOP/s) of a GPU by name fragment for ``dtype`` (``bfloat16``/``float16``); None
    when unknown."""
    for frag in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if frag.lower() in name.lower():
            return GPU_PEAK_TFLOPS[frag].get(dtype)
    return None


def device_info(device: torch.device) -> dict:
    """What the numbers were measured on: CPU model / GPU name, its slug for the results folder, hygiene facts."""
    device = torch.device(device)
    info: dict[str, Any] = {"type": device.type}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_bytes=int(p.total_memory),
                    sm_count=p.multi_processor_count, nvidia_smi=_nvidia_smi(idx),
                    peak_tflops={d: gpu_peak_tflops(p.name, d) for d in ("bfloat16", "float16")},
                    host_cpu=_cpuinfo().get("model"))
        info["slug"] = _slug(p.name)
    else:
        cpu = _cpuinfo()
        cores = cpu.get("usable_cpus") or cpu.get("logical_cpus")
        info.update(name=cpu["model"], cpu=cpu, torch_threads=torch.get_num_threads(),
                    mkldnn=bool(torch.backends.mkldnn.is_available()), peak_tflops=None)
        info["slug"] = f"cpu-{_slug(cpu['model'])}-{cores}c"
    return info


def versions() -> dict:
    """Versions of Python, torch, CUDA and the packages a benchmark depends on (None when not installed)."""
    from importlib import metadata
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("triton", "transformers", "numpy", "flash-attn", "xformers", "vla-blocks"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["cuda"] = torch.version.cuda
    return out


def git_state() -> dict:
    """The checkout's commit and whether tracked files are modified (``{"commit": None}`` outside git)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip() or None, "dirty_tracked_files": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None}


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the OS has none): recorded so a noisy run can be told apart."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class TimerSettings:
    """CPU: ``warmup`` calls, then repetitions until ``min_reps`` and ``min_time_s`` (at most ``max_reps``).
    CUDA: ``do_bench`` budgets ``warmup_ms`` / ``rep_ms``."""

    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 50
    min_time_s: float = 1.0
    warmup_max_s: float = 1.0  # stop warming up early once this much time went into it
    max_time_s: float = 8.0  # slow calls: stop at 3 repetitions once this much time went into them
    warmup_ms: int = 25
    rep_ms: int = 100

    @classmethod
    def smoke(cls) -> "TimerSettings":
        """Settings for ``--smoke`` runs: two repetitions, no warm-up (checks that a suite runs, not its speed)."""
        return cls(warmup=0, min_reps=2, max_reps=2, min_time_s=0.0, warmup_max_s=0.0, max_time_s=0.0,
                   warmup_ms=5, rep_ms=10)


def summarize(times_s: list[float], timer: str) -> dict:
    """Median, quartiles, IQR and minimum (ms) of per-call times in seconds, with the count and the timer's name."""
    ts = sorted(times_s)
    if len(ts) >= 2:
        q = statistics.quantiles(ts, n=4, method="inclusive")
        q25, q75 = q[0], q[2]
    else:
        q25 = q75 = ts[0]
    med = statistics.median(ts)
    return {"median_ms": med * 1e3, "q25_ms": q25 * 1e3, "q75_ms": q75 * 1e3, "iqr_ms": (q75 - q25) * 1e3,
            "min_ms": ts[0] * 1e3, "n": len(ts), "timer": timer}


@contextlib.contextmanager
def _gc_off():
    gc.collect(1)  # young generations only: a full collection of a torch+transformers heap takes ~0.3 s
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, settings: TimerSettings,
            grad_to_none: list[torch.Tensor] | None = None) -> dict:
    """Median (and quartiles) of ``fn()`` in milliseconds."""
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench
        q25, med, q75 = do_bench(fn, warmup=settings.warmup_ms, rep=settings.rep_ms, grad_to_none=grad_to_none,
                                 quantiles=[0.25, 0.5, 0.75])
        return {"median_ms": med, "q25_ms": q25, "q75_ms": q75, "iqr_ms": q75 - q25, "timer": "triton.do_bench",
                "warmup_ms": settings.warmup_ms, "rep_ms": settings.rep_ms}
    res = time_interleaved({"fn": fn}, device, settings, grad_to_none=grad_to_none)
    return res["fn"]


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, settings: TimerSettings,
                     grad_to_none: list[torch.Tensor] | None = None) -> dict[str, dict]:
    """Time several candidates call by call in turn (A B, B A, ...): load spikes hit all of them alike.

    On CUDA each candidate is timed with ``do_bench`` one after another instead.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {k: time_fn(f, device, settings, grad_to_none) for k, f in fns.items()}

    def clear():
        for t in grad_to_none or ():
            t.grad = None

    times: dict[str, list[float]] = {k: [] for k in fns}
    with _gc_off():
        t_start = time.perf_counter()
        for _ in range(settings.warmup):
            for f in fns.values():
                clear()
                f()
            if time.perf_counter() - t_start >= settings.warmup_max_s:
                break
        t_start = time.perf_counter()
        while True:
            n = min(len(v) for v in times.values())
            elapsed = time.perf_counter() - t_start
            if (n >= settings.max_reps or (n >= settings.min_reps and elapsed >= settings.min_time_s)
                    or (n >= min(3, settings.min_reps) and elapsed >= settings.max_time_s)):
                break
            items = list(fns.items())
            for k, f in (items if n % 2 == 0 else items[::-1]):  # A B, B A, ...: no order bias
                clear()
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return {k: summarize(v, "perf_counter") for k, v in times.items()}


# ---------------------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim():
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict:
    """Peak memory growth of one ``fn()`` call over the memory held before it (bytes)."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(device) - base),
                "method": "torch.cuda.max_memory_allocated - memory_allocated before"}
    if not os.path.exists("/proc/self/statm"):
        return {"peak_bytes": None, "method": "unavailable (no /proc/self/statm)"}
    gc.collect(1)
    _malloc_trim()
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    peak[0] = max(peak[0], _rss_bytes())
    return {"peak_bytes": int(peak[0] - base), "method": "RSS growth sampled every 0.5 ms after malloc_trim "
                                                          "(lower bound: the allocator may reuse memory it holds)"}


# ---------------------------------------------------------------------------------------------- matmul
def matmul_reference(device: torch.device, dtype: torch.dtype, settings: TimerSettings, smoke: bool = False,
                     n: int | None = None) -> dict:
    """TFLOP/s of ``a @ b`` (n×n×n) measured now: bf16 8192³ on CUDA; on CPU n calibrated to about 0.1 s."""
    device = torch.device(device)
    if n is None:
        if device.type == "cuda":
            n = 2048 if smoke else 8192
        elif smoke:
            n = 256
        else:
            n = 256
            while True:  # grow until one call takes >= 20 ms, then scale to ~0.1 s
                a = torch.randn(n, n, dtype=dtype)
                t0 = time.perf_counter()
                a @ a
                dt = time.perf_counter() - t0
                if dt >= 0.02 or n >= 8192:
                    break
                n *= 2
            n = int(max(256, min(8192, round(n * (0.1 / max(dt, 1e-6)) ** (1 / 3) / 64) * 64)))
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    t = time_fn(lambda: a @ b, device, settings)
    flops = 2 * n ** 3
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "flops": flops, "time": t,
            "tflops": flops / (t["median_ms"] * 1e-3) / 1e12}


# ---------------------------------------------------------------------------------------------- markdown
def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table of ``rows`` under ``headers`` (floats through :func:`fmt_num`, None as "–")."""
    def cell(x):
        if x is None:
            return "–"
        if isinstance(x, float):
            return fmt_num(x)
        return str(x).replace("|", "\\|").replace("\n", " ")
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt_num(x: float | None, digits: int = 3) -> str:
    """A number with about ``digits`` significant digits for reports ("–" for None)."""
    if x is None:
        return "–"
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.{digits}g}"


def fmt_bytes(n: int | None) -> str:
    """A byte count in GiB / MiB / KiB / B ("–" for None)."""
    if n is None:
        return "–"
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def fmt_ms(t: dict | None) -> str:
    """``median (±IQR/2)`` in ms."""
    if not t:
        return "–"
    return f"{fmt_num(t['median_ms'])} ±{fmt_num(t['iqr_ms'] / 2)}"


def header_markdown(payload: dict) -> str:
    """The Markdown header of a suite report: device, versions, run time, git commit and settings of ``payload``."""
    d, v = payload["device"], payload["versions"]
    lines = [f"# {payload['suite']} benchmark — {d['name']}" + (" (smoke)" if payload.get("smoke") else ""), ""]
    lines.append(f"- device: `{d['slug']}`" + (f", {d['cpu'].get('usable_cpus')} usable CPUs, torch threads "
                                               f"{d.get('torch_threads')}, ISA {', '.join(d['cpu']['isa'])}"
                                               if d["type"] == "cpu" else
                                               f", capability {d.get('capability')}, nvidia-smi {d.get('nvidia_smi')}"))
    lines.append("- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
    lines.append(f"- run: {payload['created']}, git {str(payload['git'].get('commit'))[:10]}"
                 f"{' (dirty)' if payload['git'].get('dirty_tracked_files') else ''}, load average before/after "
                 f"{payload['load_average']['before']} / {payload['load_average']['after']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- running
@dataclass
class BenchContext:
    """What a suite's ``run(ctx)`` gets: the device, the timer settings, the smoke flag, filters, a logger."""

    device: torch.device
    smoke: bool
    timer: TimerSettings
    options: dict = field(default_factory=dict)
    quiet: bool = False

    def log(self, msg: str):
        """Print a progress line (unless ``quiet``)."""
        if not self.quiet:
            print(msg, flush=True)

    def _timer(self, overrides: dict) -> TimerSettings:
        """The run's timer settings, with a suite's overrides (e.g. more repetitions for a ratio) unless smoke."""
        if self.smoke or not overrides:
            return self.timer
        return TimerSettings(**{**vars(self.timer), **overrides})

    def time(self, fn, grad_to_none=None, **timer_overrides) -> dict:
        """:func:`time_fn` of ``fn`` on this run's device and timer settings (``timer_overrides`` ignored in smoke
        runs)."""
        return time_fn(fn, self.device, self._timer(timer_overrides), grad_to_none)

    def time_interleaved(self, fns: dict, grad_to_none=None, **timer_overrides) -> dict:
        """:func:`time_interleaved` of the candidates ``fns`` on this run's device and timer settings."""
        return time_interleaved(fns, self.device, self._timer(timer_overrides), grad_to_none)

    def memory(self, fn) -> dict:
        """:func:`peak_memory` of one ``fn()`` call on this run's device (bytes)."""
        return peak_memory(fn, self.device)

    def sync(self):
        """Wait for the device's queued work (CUDA synchronize; nothing on CPU)."""
        _sync(self.device)


def run_suite(name: str, *, device: str = "cpu", smoke: bool = False, out: str | Path | None = None,
              options: dict | None = None, merge: bool = False, quiet: bool = False) -> dict:
    """Run one suite and write ``<out>/<device-slug>/<suite>.{json,md,png}``; returns the payload (+ ``paths``)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    mod = load_suite(name)
    options = dict(options or {})
    check_options(mod, name, smoke, options)
    threads_before = torch.get_num_threads()
    if dev.type == "cpu":
        # Default 1 thread: on a shared machine OpenMP barriers across oversubscribed cores inflate small ops
        # 20-30x (measured: a 0.4 ms SDPA call took 12 ms with 2 threads under load 5 on 2 cores).
        threads = int(options.get("threads", 1))
        options["threads"] = threads
        torch.set_num_threads(threads)
    try:
        return _run_suite(mod, name, dev, smoke, out, options, merge, quiet)
    finally:
        torch.set_num_threads(threads_before)


class _ReadOptions(dict):
    """Options that remember which keys a suite's settings function asked about."""

    def __init__(self, *a):
        super().__init__(*a)
        self.read: set[str] = set()

    def __contains__(self, k):
        self.read.add(k)
        return super().__contains__(k)

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.read.add(k)
        return super().get(k, default)


def check_options(mod, name: str, smoke: bool, options: dict):
    """``--set`` keys a suite never reads are errors (a typo would silently run the defaults): the suite's
    settings function (``resolve_settings(ctx)`` / ``settings(ctx)``) runs on the options first and every key
    it did not ask about is reported with the keys it did."""
    import difflib

    from .config import ConfigError
    given = [k for k in options if k != "threads"]
    if not given:
        return
    fn = getattr(mod, "resolve_settings", None) or getattr(mod, "settings", None)
    probe = _ReadOptions(options)
    if fn is not None:
        fn(BenchContext(torch.device("cpu"), smoke, TimerSettings.smoke() if smoke else TimerSettings(), probe, True))
    known = sorted(probe.read | {"threads"})
    for k in given:
        if k not in probe.read:
            close = difflib.get_close_matches(k, known, n=2)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"bench {name}: unknown --set key {k!r}{hint} (options of {name}: {', '.join(known)})")


def _run_suite(mod, name, dev, smoke, out, options, merge, quiet) -> dict:
    info = device_info(dev)
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="vla-blocks-bench-")) if smoke else default_results_dir()
    folder = Path(out) / info["slug"]
    ctx = BenchContext(dev, smoke, TimerSettings.smoke() if smoke else TimerSettings(), options, quiet)
    load_before = load_average()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    body = mod.run(ctx)
    payload = {
        "suite": name, "schema": SCHEMA_VERSION, "smoke": smoke,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(), "device": info, "versions": versions(),
        "timer": vars(ctx.timer), "options": ctx.options,
        "load_average": {"before": load_before, "after": load_average()},
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    payload.update(body)
    json_path = folder / f"{name}.json"
    if merge and json_path.exists() and hasattr(mod, "merge"):
        payload = mod.merge(json.loads(json_path.read_text()), payload)
    md = mod.render_markdown(payload)
    atomic_write_text(json_path, json.dumps(payload, indent=1, default=_json_default) + "\n")
    atomic_write_text(folder / f"{name}.md", md)
    paths = {"json": str(json_path), "md": str(folder / f"{name}.md")}
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig = mod.plot(payload)
        if fig is not None:
            atomic_savefig(fig, folder / f"{name}.png")
            plt.close(fig)
            paths["png"] = str(folder / f"{name}.png")
    except ModuleNotFoundError as e:  # matplotlib is the `bench` extra
        ctx.log(f"no plot: {e} (pip install 'vla-blocks[bench]')")
    payload["paths"] = paths
    return payload


def _json_default(o):
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    if isinstance(o, (torch.device, Path)):
        return str(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------------- README
README_START = "<!-- bench:start (generated by `vla-blocks bench render`; edit benchmarks/, not this) -->"
README_END = "<!-- bench:end -->"


def readme_section(results_dir: Path) -> str:
    """The latest summary table of every suite on every device under ``results_dir``."""
    results_dir = Path(results_dir)
    parts = []
    for folder in sorted(p for p in results_dir.iterdir() if p.is_dir()) if results_dir.is_dir() else []:
        blocks = []
        name = None
        for suite in SUITES:
            f = folder / f"{suite}.json"
            if not f.exists():
                continue
            payload = json.loads(f.read_text())
            if payload.get("smoke"):
                continue
            name = payload["device"]["name"]
            mod = load_suite(suite)
            rel = f.relative_to(results_dir.parent.parent) if results_dir.parent.parent in f.parents else f
            blocks.append(f"**{suite}** ({payload['created'][:10]}, torch {payload['versions']['torch']}; "
                          f"full results: [`{rel.with_suffix('.md')}`]({rel.with_suffix('.md')}))\n\n"
                          + mod.summary_markdown(payload))
        if blocks:
            parts.append(f"#### `{folder.name}` — {name}\n\n" + "\n\n".join(blocks))
    return "\n\n".join(parts) if parts else "_No results committed yet._"


def render_results(results_dir: Path) -> list[Path]:
    """Re-render every ``<device>/<suite>.md`` and ``.png`` from its JSON with the current report code."""
    written = []
    for f in sorted(Path(results_dir).glob("*/*.json")):
        if f.stem not in SUITES:
            continue
        payload = json.loads(f.read_text())
        mod = load_suite(f.stem)
        atomic_write_text(f.with_suffix(".md"), mod.render_markdown(payload))
        written.append(f.with_suffix(".md"))
        with contextlib.suppress(ModuleNotFoundError):
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig = mod.plot(payload)
            atomic_savefig(fig, f.with_suffix(".png"))
            plt.close(fig)
            written.append(f.with_suffix(".png"))
    return written


def update_readme(readme: Path, results_dir: Path) -> bool:
    """Rewrite README's generated Benchmarks section (between the bench markers) from ``results_dir``; True if it
    changed."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_START!r} … {README_END!r} markers in its Benchmarks section")
    a = text.index(README_START) + len(README_START)
    b = text.index(README_END)
    new = text[:a] + "\n" + readme_section(results_dir) + "\n" + text[b:]
    if new != text:
        atomic_write_text(readme, new)
        return True
    return False


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser):
    """Options of ``vla-blocks bench``."""
    p.add_argument("suite", choices=list(SUITES) + ["all", "render"],
                   help="attention | inference | backbone | all, or render (re-render the reports under "
                        "benchmarks/results from their JSON and README's Benchmarks tables)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds): what CI runs so the suites never rot")
    p.add_argument("--out", default=None, help="results root; files go to OUT/<device-slug>/ (default: "
                                               "benchmarks/results, or a temporary folder with --smoke)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    p.add_argument("--merge", action="store_true",
                   help="merge rows into the existing results of this device (runs split into parts)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="suite option, e.g. seq_lens=1024,2048 layouts=causal,pi0 head_dims=128 dtypes=bfloat16 "
                        "backends=sdpa,flex recipes=pi0-tiny threads=2 (CPU threads; default 1) (repeatable)")
    p.add_argument("--quiet", action="store_true")


def parse_sets(sets: list[str]) -> dict:
    """``--set KEY=VALUE`` options as a dict of strings (``ValueError`` naming a malformed one)."""
    out = {}
    for s in sets:
        if "=" not in s:
            raise ValueError(f"--set {s!r}: expected KEY=VALUE")
        k, v = s.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_bench(args) -> int:
    """``vla-blocks bench``: run the chosen suites and write their results, or re-render reports and README
    (``render``)."""
    if args.suite == "render":
        root = checkout_root()
        if root is None:
            raise FileNotFoundError("bench render needs a source checkout")
        results = Path(args.out) if args.out else default_results_dir()
        files = render_results(results)
        changed = update_readme(root / "README.md", results)
        print(f"re-rendered {len(files)} report files; README.md Benchmarks section "
              + ("updated" if changed else "already up to date"))
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    options = parse_sets(args.sets)
    for s in suites:
        payload = run_suite(s, device=device, smoke=args.smoke, out=args.out, options=options, merge=args.merge,
                            quiet=args.quiet)
        print(f"[{s}] {payload['wall_s']:.1f}s -> " + ", ".join(payload["paths"].values()))
    return 0



__all__ = ["SUITES", "TimerSettings", "BenchContext", "time_fn", "time_interleaved", "peak_memory", "matmul_reference",
           "device_info", "versions", "run_suite", "md_table", "fmt_num", "fmt_ms", "fmt_bytes", "readme_section",
           "update_readme", "render_results", "atomic_write_text", "gpu_peak_tflops", "load_suite"]
