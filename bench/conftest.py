"""Options and helpers of ``pytest bench/``.

Options (also as environment variables, the option wins):
  --bench-size {ci,default,full}   (CERSA_BENCH_SIZE) the shape matrix, see bench/shapes.py.
        Default: "ci" under --benchmark-disable (every benchmark function runs once on small
        cases, for CI), else "default".
  --bench-device {auto,cpu,cuda}   (CERSA_BENCH_DEVICE) "auto" = cuda when available.
  --bench-dtype {float32,bfloat16,float16}  (CERSA_BENCH_DTYPE) default float32.
  --bench-budget SECONDS           (CERSA_BENCH_BUDGET) time spent per benchmark, default 0.4
        (rounds = budget / time per call, between 3 and 200; tiny calls are looped per round).
  --bench-memory-batch / --bench-memory-seq / --bench-memory-steps   the MiniLM memory benchmark's
        batch, sequence length and training steps (16, 128, 4; 2, 16, 2 at size "ci").
  --bench-threads N                (CERSA_BENCH_THREADS) torch CPU threads, 0 = torch's default.
  --bench-triton-interpreter       time Triton on the CPU through TRITON_INTERPRET (very slow;
        skipped by default: the interpreter is a correctness tool, not a performance path).
"""
from __future__ import annotations

import math
import os
import time

import pytest


def pytest_addoption(parser):
    g = parser.getgroup("cersa bench")
    g.addoption("--bench-size", default=os.environ.get("CERSA_BENCH_SIZE"),
                choices=("ci", "default", "full"), help="benchmark matrix (bench/shapes.py)")
    g.addoption("--bench-device", default=os.environ.get("CERSA_BENCH_DEVICE", "auto"),
                choices=("auto", "cpu", "cuda"), help="device of the benchmarks")
    g.addoption("--bench-dtype", default=os.environ.get("CERSA_BENCH_DTYPE", "float32"),
                choices=("float32", "bfloat16", "float16"), help="dtype of the benchmarks")
    g.addoption("--bench-budget", type=float, default=float(os.environ.get("CERSA_BENCH_BUDGET", "0.4")),
                help="seconds of timing per benchmark")
    for name, default in (("batch", 16), ("seq", 128), ("steps", 4)):
        g.addoption(f"--bench-memory-{name}", type=int, default=None,
                    help=f"memory benchmark {name} (default {default}; smaller at --bench-size=ci)")
    g.addoption("--bench-triton-interpreter", action="store_true", default=False,
                help="also time Triton on the CPU (TRITON_INTERPRET=1): very slow")
    g.addoption("--bench-threads", type=int, default=int(os.environ.get("CERSA_BENCH_THREADS", "0")),
                help="torch CPU threads for the benchmarks (0 = torch's default).  1 gives repeatable "
                     "ratios on a shared machine, where a descheduled second thread stalls a GEMM")


def bench_size(config) -> str:
    size = config.getoption("--bench-size")
    if size:
        return size
    return "ci" if config.getoption("benchmark_disable", default=False) else "default"


def bench_device(config) -> str:
    dev = config.getoption("--bench-device")
    if dev == "auto":
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return dev


def bench_dtype(config):
    import torch

    return getattr(torch, config.getoption("--bench-dtype"))


def backend_names(device: str) -> list[str]:
    """Every CERSA backend that may serve ``device`` (available or not; "reference" first)."""
    from cersa_kernels.backends import BACKENDS

    names = [b.name for b in BACKENDS if device in b.devices]
    return sorted(names, key=lambda b: (b != "reference", b))


def backend_skip_reason(config, name: str, device: str) -> str:
    """"" when backend ``name`` runs here, else why it is skipped."""
    from cersa_kernels.backends import backend_status

    ok, why = backend_status(name, device)
    if not ok:
        return f"backend {name!r} not available on {device}: {why}"
    if name == "triton" and device == "cpu" and not config.getoption("--bench-triton-interpreter"):
        return ("Triton on the CPU runs only in the TRITON_INTERPRET interpreter, a correctness tool "
                "far slower than compiled code; pass --bench-triton-interpreter to time it anyway")
    return ""


def pytest_report_header(config):
    try:
        return (f"cersa bench: size={bench_size(config)} device={bench_device(config)} "
                f"dtype={config.getoption('--bench-dtype')} budget={config.getoption('--bench-budget')}s")
    except Exception as exc:  # the header must never break collection
        return f"cersa bench: {exc}"


@pytest.fixture(scope="session")
def device(pytestconfig):
    return bench_device(pytestconfig)


@pytest.fixture(scope="session")
def dtype(pytestconfig):
    return bench_dtype(pytestconfig)


def timed(benchmark, fn, budget: float, device: str) -> None:
    """Time fn() with pytest-benchmark: warm-up calls, then rounds sized to ``budget`` seconds.

    Calls shorter than 1 ms are repeated within a round (iterations) so the timer resolves them.
    Under --benchmark-disable fn runs exactly once.  On CUDA each call ends with a synchronize.
    """
    if device == "cuda":
        import torch

        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()
    if benchmark.disabled:
        benchmark.pedantic(fn, rounds=1, iterations=1)
        return
    fn()
    # the fastest of 3-5 calls: a call stalled on a shared machine (e.g. an OpenMP thread
    # descheduled at a barrier) must not shrink the number of rounds
    t, spent = math.inf, 0.0
    for i in range(5):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        t, spent = min(t, dt), spent + dt
        if i >= 2 and spent > budget / 2:
            break
    t = max(t, 1e-7)
    iterations = 1 if t >= 1e-3 else min(1000, math.ceil(1e-3 / t))
    rounds = int(max(3, min(200, budget / (t * iterations))))
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)


_LOAD_AT_START: tuple[float, float, float] | None = None


def pytest_sessionstart(session):
    global _LOAD_AT_START
    threads = session.config.getoption("--bench-threads")
    if threads and threads > 0:
        import torch

        torch.set_num_threads(threads)
    try:
        _LOAD_AT_START = os.getloadavg()
    except OSError:
        _LOAD_AT_START = None


def machine_facts() -> dict:
    """CPU model, cores, memory, torch build and threads, load average: stamped into the JSON."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    facts = {"cpu_model": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "torch": torch.__version__,
             "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
             "loadavg_start": _LOAD_AT_START}
    try:
        facts["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    try:
        from cersa_kernels.backends import available_backends

        facts["backends"] = available_backends()
    except Exception as exc:  # never break the JSON for a broken backend
        facts["backends_error"] = repr(exc)
    return facts


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["cersa"] = machine_facts()
    machine_info["cersa"].update(bench_size=bench_size(config), bench_device=bench_device(config),
                                 bench_dtype=config.getoption("--bench-dtype"),
                                 bench_budget_s=config.getoption("--bench-budget"))
