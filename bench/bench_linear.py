"""Microbenchmarks of one CERSA linear layer against dense+PEFT LoRA, the rebuild-W layer and a
plain dense GEMM, at real model shapes (bench/shapes.py), for every CERSA backend.

Groups: one per shape / token count N / pass ("384x384 N=512 forward+backward (...)"); inside a
group one row per method (dense-gemm, dense+lora, rebuild, reference, cpp, triton, ...) and
rank.  Backends are those ``cersa_kernels.backends`` knows for the device; the ones that cannot
run here are skipped with the reason.  Only times are recorded here, nothing is asserted about
speed; bench/report.py turns the JSON (--benchmark-json) into ratios.
"""
from __future__ import annotations

import pytest

from .baselines import BASELINES, build
from .conftest import backend_names, backend_skip_reason, bench_device, bench_size, timed
from .shapes import cases


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    pass_ = metafunc.function.pass_
    config = metafunc.config
    size, device = bench_size(config), bench_device(config)
    params = []
    try:
        all_cases = cases(size, backend_names(device), pass_)
    except (ImportError, FileNotFoundError) as exc:  # the MiniLM weights package is missing
        metafunc.parametrize("case", [pytest.param(None, marks=pytest.mark.skip(
            reason=f"cannot build the benchmark matrix: {exc}"))], ids=["matrix"])
        return
    for c in all_cases:
        if pass_ == "fwdbwd" and c.method == "dense-gemm":
            continue
        why = c.skip
        if not why and c.method not in BASELINES:
            why = backend_skip_reason(config, c.method, device)
        marks = [pytest.mark.skip(reason=why)] if why else []
        params.append(pytest.param(c, id=c.id, marks=marks))
    metafunc.parametrize("case", params)


def _prepare(benchmark, case, device, dtype):
    benchmark.group = case.group
    benchmark.extra_info.update(case.extra_info())
    benchmark.extra_info["device"] = device
    benchmark.extra_info["dtype"] = str(dtype).replace("torch.", "")
    return build(case, device, dtype)


def _budget(request):
    return request.config.getoption("--bench-budget")


def test_forward(benchmark, case, device, dtype, request):
    """Forward in training mode (autograd records the graph; x requires grad)."""
    layer, x, _ = _prepare(benchmark, case, device, dtype)
    timed(benchmark, lambda: layer(x), _budget(request), device)


test_forward.pass_ = "fwd"


def test_backward(benchmark, case, device, dtype, request):
    """Backward only: one forward outside the timer, then y.backward(dy, retain_graph=True) per
    call (gradients of x, A, B accumulate, the same extra add for every method)."""
    if case.method == "dense-gemm":
        pytest.skip("dense-gemm is forward only")
    layer, x, dy = _prepare(benchmark, case, device, dtype)
    y = layer(x)
    timed(benchmark, lambda: y.backward(dy, retain_graph=True), _budget(request), device)


test_backward.pass_ = "bwd"


def test_forward_backward(benchmark, case, device, dtype, request):
    """One training step of the layer: forward then backward (dx, dA, dB)."""
    layer, x, dy = _prepare(benchmark, case, device, dtype)
    timed(benchmark, lambda: layer(x).backward(dy), _budget(request), device)


test_forward_backward.pass_ = "fwdbwd"
