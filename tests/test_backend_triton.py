"""Tests of the Triton backend (cersa_kernels/backends/triton) against the float64 reference.

On a machine without a GPU the kernels run under the Triton interpreter: TRITON_INTERPRET=1 must
be set before triton is first imported in the process (tests/conftest.py does that when no CUDA
device is visible; pytest loads it before this file, also when this file runs alone).  On a GPU the same tests
run the compiled kernels.

Error metric: max |out - ref| / max |ref| (conftest.rel_error; ref computed in float64 from the
same, already rounded, inputs).  Bounds per dtype: fp64 1e-12, fp32 1e-5 (2e-3 when TF32 is on, GPU only), fp16 2e-3,
bf16 1.5e-2 (the intermediates h and dh are stored in the input dtype, like the reference backend).
"""
from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path
from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from cersa_kernels.backends import reference as ref  # noqa: E402
from cersa_kernels.backends import triton as tb  # noqa: E402
from cersa_kernels.backends.triton import kernels as tk  # noqa: E402

from conftest import make_inputs, rel_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_ok, _why = tb.is_available(DEVICE)
pytestmark = pytest.mark.skipif(not _ok, reason=f"Triton backend cannot run here: {_why}")

GRAD_NAMES = ("dx", "dU", "dS", "dVh", "dA", "dB", "dbias")


def tol(dtype: torch.dtype) -> float:
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32:
        return 2e-3 if (DEVICE == "cuda" and tb.tf32_enabled() and not tb.INTERPRETED) else 1e-5
    if dtype == torch.float16:
        return 2e-3
    return 1.5e-2


#: The inputs of these tests (conftest.make_inputs): N(0, 1) factors, not fan-scaled, S uniform in
#: [0.5, 2.5) (positive and spread like singular values), on the device under test.
INPUTS = dict(fan_scaled=False, spectrum=(0.5, 2.5), device=DEVICE)


def d64(t):
    return None if t is None else t.double()


def check_against_reference(x, U, S, Vh, A, B, b, scale, dy=None, needs=(True,) * 7):
    """Run forward+backward of the Triton backend and of the float64 reference; assert every
    output and every needed gradient is within the dtype's bound, and None where not needed."""
    dtype = x.dtype
    if b is None:  # like cersa_kernels.ops: no dbias is asked for when there is no bias
        needs = tuple(needs[:6]) + (False,)
    save_xv = needs[1] or needs[2]
    y, h_k, xv = tb.forward(x, U, S, Vh, A, B, b, scale, save_xv)
    y_r, hk_r, xv_r = ref.forward(*map(d64, (x, U, S, Vh, A, B, b)), scale, True)
    assert y.dtype == dtype and y.shape == (x.shape[0], U.shape[0])
    assert rel_error(y, y_r) <= tol(dtype), f"y: {rel_error(y, y_r)}"
    if A is None:
        assert h_k is None
    else:
        assert h_k.dtype == dtype and rel_error(h_k, hk_r) <= tol(dtype), "h_k"
    if save_xv:
        assert rel_error(xv, xv_r) <= tol(dtype), "xv"
    else:
        assert xv is None
    if dy is None:
        dy = torch.randn(y.shape, dtype=torch.float64).to(dtype).to(DEVICE)
    grads = tb.backward(dy, x, h_k, xv, U, S, Vh, A, B, scale, needs)
    want = ref.backward(dy.double(), x.double(), hk_r, xv_r, *map(d64, (U, S, Vh, A, B)), scale, needs)
    owners = (x, U, S, Vh, A, B, b)
    for name, g, w, need, owner in zip(GRAD_NAMES, grads, want, needs, owners):
        if not need or owner is None:
            assert g is None, f"{name} should be None"
            continue
        assert g is not None, name
        assert g.shape == owner.shape and g.dtype == owner.dtype, (name, g.shape, g.dtype)
        assert torch.isfinite(g).all(), name
        assert rel_error(g, w) <= tol(dtype), f"{name}: {rel_error(g, w)} > {tol(dtype)}"
    return y, grads


# (N rows, n in, m out, r frozen rank, k delta rank); none of them multiples of the block sizes
# except where a segment must span several tiles (the interpreter config uses 16x16x16 tiles).
SHAPES = {
    "odd": (37, 45, 29, 7, 3),
    "one_row": (1, 45, 29, 7, 3),
    "zero_rows": (0, 45, 29, 7, 3),
    "multi_tile": (40, 33, 50, 40, 19),
    "rank0": (5, 20, 18, 0, 4),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
VARIANTS = {"bias+delta": dict(delta=True, bias=True), "nobias": dict(delta=True, bias=False),
            "A=None": dict(delta=False, bias=True)}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_backward_vs_fp64(shape, dtype, variant):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape}/{dtype}/{variant}".encode()))
    x, U, S, Vh, A, B, b = make_inputs(*SHAPES[shape], dtype, generator=gen, **VARIANTS[variant], **INPUTS)
    check_against_reference(x, U, S, Vh, A, B, b, scale=0.75)


def test_float64_matches_reference_tightly():
    gen = torch.Generator().manual_seed(1)
    x, U, S, Vh, A, B, b = make_inputs(37, 45, 29, 7, 3, torch.float64, generator=gen, **INPUTS)
    check_against_reference(x, U, S, Vh, A, B, b, scale=1.3)


@pytest.mark.parametrize("needs", [
    (True, False, False, False, True, True, True),    # typical fine-tuning: x, A, B, bias
    (False, False, False, False, True, True, False),  # first layer: no dx
    (True, False, True, False, False, False, False),  # S trains
    (False, True, False, True, False, False, False),  # frozen factors trained too
    (False, False, False, False, False, False, True),  # only dbias (colsum kernel)
], ids=["x_A_B_bias", "A_B", "x_S", "U_Vh", "bias_only"])
def test_gradient_subsets(needs):
    gen = torch.Generator().manual_seed(2)
    x, U, S, Vh, A, B, b = make_inputs(23, 19, 21, 9, 5, torch.float32, generator=gen, **INPUTS)
    check_against_reference(x, U, S, Vh, A, B, b, scale=0.5, needs=needs)


def _padded_view(t: torch.Tensor, transpose: bool) -> torch.Tensor:
    """A view of t's values inside a NaN-filled buffer with gaps between rows and columns
    (and optionally stored transposed): any unmasked or mis-strided access reads NaN."""
    rows, cols = t.shape
    if transpose:
        buf = torch.full((cols + 3, 2 * rows + 5), float("nan"), dtype=t.dtype, device=t.device)
        v = buf[1:cols + 1, 2:2 + 2 * rows:2].t()
    else:
        buf = torch.full((rows + 3, 2 * cols + 5), float("nan"), dtype=t.dtype, device=t.device)
        v = buf[1:rows + 1, 3:3 + 2 * cols:2]
    v.copy_(t)
    assert not v.is_contiguous() or t.numel() <= 1
    return v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_non_contiguous_inputs_and_grad_output(dtype):
    gen = torch.Generator().manual_seed(3)
    x, U, S, Vh, A, B, b = make_inputs(37, 45, 29, 7, 3, dtype, generator=gen, **INPUTS)
    dy = torch.randn(37, 29, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    views = [_padded_view(x, False), _padded_view(U, True), S, _padded_view(Vh, True),
             _padded_view(A, False), _padded_view(B, True), b]
    y, grads = check_against_reference(*views, scale=0.9, dy=_padded_view(dy, True))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("N, n_forward, n_backward", [(0, 0, 0), (5, 2, 4)], ids=["zero_rows", "five_rows"])
def test_launch_counts(N, n_forward, n_backward):
    """Two launches forward, four backward (every gradient), none at all for zero rows."""
    x, U, S, Vh, A, B, b = make_inputs(N, 45, 29, 7, 3, torch.float32, **INPUTS)
    with mock.patch.object(tk, "run", wraps=tk.run) as run:
        y, h_k, xv = tb.forward(x, U, S, Vh, A, B, b, 0.5, True)
        assert run.call_count == n_forward
        dy = torch.ones(N, 29, device=DEVICE)
        tb.backward(dy, x, h_k, xv, U, S, Vh, A, B, 0.5, (True,) * 7)
        assert run.call_count == n_forward + n_backward


def test_zero_rows_give_empty_outputs_and_zero_gradients():
    x, U, S, Vh, A, B, b = make_inputs(0, 45, 29, 7, 3, torch.float32, **INPUTS)
    y, h_k, xv = tb.forward(x, U, S, Vh, A, B, b, 0.5, True)
    dy = torch.empty(0, 29, device=DEVICE)
    grads = tb.backward(dy, x, h_k, xv, U, S, Vh, A, B, 0.5, (True,) * 7)
    assert y.shape == (0, 29) and h_k.shape == (0, 3) and xv.shape == (0, 7)
    assert grads[0].shape == (0, 45)
    for g, owner in zip(grads[1:], (U, S, Vh, A, B, b)):
        assert g.shape == owner.shape and bool((g == 0).all())


def test_missing_saved_tensor_is_a_clear_error():
    x, U, S, Vh, A, B, b = make_inputs(4, 8, 6, 3, 2, torch.float32, **INPUTS)
    y, h_k, _ = tb.forward(x, U, S, Vh, A, B, b, 1.0, False)
    with pytest.raises(ValueError, match="xv"):
        tb.backward(torch.ones_like(y), x, h_k, None, U, S, Vh, A, B, 1.0,
                    (False, False, True, False, False, False, False))


def test_planned_launches_run_later():
    """With a launcher of its own the eager forward only plans: the outputs stay unwritten until
    the collected launches are run, which then gives the reference's results."""
    gen = torch.Generator().manual_seed(7)
    x, U, S, Vh, A, B, b = make_inputs(37, 45, 29, 7, 3, torch.float32, generator=gen, **INPUTS)
    planned = []
    y, h_k, xv = tb._forward_impl(x, U, S, Vh, A, B, b, 0.75, True, launch=planned.append)
    assert [p.name for p in planned] == ["seg_cols", "seg_k"]
    for t in (y, h_k, xv):
        t.fill_(float("nan"))
    for p in planned:
        tk.run(p, autotune=False)
    want = ref.forward(*map(d64, (x, U, S, Vh, A, B, b)), 0.75, True)
    for got, w in zip((y, h_k, xv), want):
        assert rel_error(got, w) <= tol(torch.float32)
    planned = []
    tb._backward_impl(torch.ones_like(y), x, h_k, xv, U, S, Vh, A, B, 0.75, (True,) * 7, launch=planned.append)
    assert [p.name for p in planned] == ["seg_cols", "seg_k", "seg_rows", "seg_cols"]
    planned = []
    tb._backward_impl(torch.ones_like(y), x, h_k, xv, U, S, Vh, A, B, 0.75, (False,) * 6 + (True,),
                      launch=planned.append)
    assert [p.name for p in planned] == ["colsum"]


def _fake_args(dtype, M):
    return {"P": torch.empty(0, dtype=dtype), "M": M}


@pytest.mark.parametrize("limits", [tk.Limits(232448, 9), tk.Limits(166912, 8)], ids=["sm90", "sm80"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_select_configs_fit_the_device(limits, dtype):
    """On the devices the configurations are made for, every candidate fits in shared memory,
    large M keeps the device's family, small M no tile far taller than M; one without autotuning."""
    esize = torch.empty(0, dtype=dtype).element_size()
    family = tk.HOPPER_CONFIGS if limits.major >= 9 else tk.AMPERE_CONFIGS
    for M in (1, 16, 4096):
        tuned = tk.select_configs(tk.GPU_CONFIGS, _fake_args(dtype, M), limits, autotune=True)
        assert tuned
        for c in tuned:
            assert tk._smem(c, esize) <= limits.smem_per_block, (M, c)
            if M > 256:
                assert any(c is f for f in family), (M, c)  # large M: the device's family only
            else:
                assert c.kwargs["BM"] <= 2 * max(16, M), (M, c)  # small M: no tile far taller than M
        first = tk.select_configs(tk.GPU_CONFIGS, _fake_args(dtype, M), limits, autotune=False)
        assert len(first) == 1 and any(first[0] is c for c in tuned)
    tiny = tk.select_configs(tk.GPU_CONFIGS, _fake_args(dtype, 4096), tk.Limits(1024, 9), autotune=True)
    assert len(tiny) == 1  # nothing fits: the smallest configuration rather than none


def test_autotune_switch():
    """Without autotuning a launch takes the first configuration that fits; results unchanged."""
    before = tb.autotune_enabled()
    tb.set_autotune(False)
    try:
        assert tb.autotune_enabled() is False and tb.settings.autotune is False
        gen = torch.Generator().manual_seed(8)
        x, U, S, Vh, A, B, b = make_inputs(37, 45, 29, 7, 3, torch.float16, generator=gen, **INPUTS)
        check_against_reference(x, U, S, Vh, A, B, b, scale=0.75)
    finally:
        tb.set_autotune(before)
    assert tb.autotune_enabled() is before
    with pytest.raises(TypeError, match="set_autotune"):
        tb.set_autotune(1)
    with pytest.raises(TypeError, match="Settings.autotune"):
        tb.settings.autotune = "no"
    assert tb.autotune_enabled() is before


def test_tf32_switch():
    tb.set_allow_tf32(False)
    try:
        assert tb.tf32_enabled() is False
        tb.set_allow_tf32(True)
        assert tb.tf32_enabled() is True
    finally:
        tb.set_allow_tf32(None)
    assert tb.tf32_enabled() == bool(torch.backends.cuda.matmul.allow_tf32)
    with pytest.raises(TypeError, match="set_allow_tf32"):
        tb.set_allow_tf32("yes")


def test_is_available():
    ok_cpu, why_cpu = tb.is_available("cpu")
    assert ok_cpu == tb.INTERPRETED
    if not ok_cpu:
        assert "TRITON_INTERPRET" in why_cpu
    assert tb.is_available("cuda")[0] == torch.cuda.is_available()
    ok, why = tb.is_available("meta")
    assert not ok and "meta" in why


def test_cpu_unavailable_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from cersa_kernels.backends import triton as t; ok, why = t.is_available('cpu'); "
            "print(ok); print(why)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "False" and "TRITON_INTERPRET" in lines[1]


def test_custom_ops_opcheck():
    """Schema, fake (meta) implementation and AOT dispatch of both custom ops."""
    x, U, S, Vh, A, B, b = make_inputs(9, 13, 11, 5, 3, torch.float32, **INPUTS)
    torch.library.opcheck(torch.ops.cersa_kernels.triton_forward.default, (x, U, S, Vh, A, B, b, 0.5, True))
    torch.library.opcheck(torch.ops.cersa_kernels.triton_forward.default, (x, U, S, Vh, None, None, None, 0.5, False))
    y, h_k, xv = tb.forward(x, U, S, Vh, A, B, b, 0.5, True)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.cersa_kernels.triton_backward.default,
                          (dy, x, h_k, xv, U, S, Vh, A, B, 0.5, [True] * 7))
    torch.library.opcheck(torch.ops.cersa_kernels.triton_backward.default,
                          (dy, None, None, None, U, S, Vh, A, B, 0.5, [True, False, False, False, False, False, True]))


# ------------------------------------------------------------------------------------------------
# through the public op (cersa_kernels.cersa_linear): 3-D input, autograd, gradcheck, torch.compile
# ------------------------------------------------------------------------------------------------

try:
    from cersa_kernels import ops
except ImportError as exc:  # the public op is written in parallel with this backend
    ops = None
needs_ops = pytest.mark.skipif(ops is None, reason="cersa_kernels.ops (cersa_linear) is not importable")


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cersa_linear_3d_non_contiguous(dtype):
    gen = torch.Generator().manual_seed(4)
    _, U, S, Vh, A, B, b = make_inputs(1, 45, 29, 7, 3, dtype, generator=gen, **INPUTS)
    x3 = torch.randn(5, 3, 45, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE).transpose(0, 1)
    leaves = _leaves(x3, U, S, Vh, A, B, b)
    y = ops.cersa_linear(*leaves, scale=0.5, backend="triton")
    leaves64 = _leaves(*map(d64, (x3, U, S, Vh, A, B, b)))
    y64 = ops.cersa_linear(*leaves64, scale=0.5, backend="reference")
    assert y.shape == (3, 5, 29) and y.dtype == dtype
    assert rel_error(y, y64) <= tol(dtype)
    dy = torch.randn(5, 3, 29, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE).transpose(0, 1)
    y.backward(dy)
    y64.backward(dy.double())
    for name, t, t64 in zip(("x", "U", "S", "Vh", "A", "B", "bias"), leaves, leaves64):
        assert t.grad is not None and rel_error(t.grad, t64.grad) <= tol(dtype), name


@needs_ops
def test_cersa_linear_strided_S():
    """A non-contiguous S (stride 2, NaN between its elements): output and dS as the reference."""
    gen = torch.Generator().manual_seed(9)
    t = make_inputs(7, 12, 10, 4, 2, torch.float32, generator=gen, layouts={"S": "strided"}, **INPUTS)
    assert not t.S.is_contiguous()
    S = t.S.detach().requires_grad_(True)
    y = ops.cersa_linear(t.x, t.U, S, t.Vh, t.A, t.B, t.bias, scale=0.5, backend="triton")
    S64 = d64(t.S).detach().requires_grad_(True)
    y64 = ops.cersa_linear(d64(t.x), d64(t.U), S64, d64(t.Vh), d64(t.A), d64(t.B), d64(t.bias), scale=0.5,
                           backend="reference")
    assert rel_error(y, y64) <= tol(torch.float32)
    y.sum().backward()
    y64.sum().backward()
    assert rel_error(S.grad, S64.grad) <= tol(torch.float32)


@needs_ops
def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(5)
    x, U, S, Vh, A, B, b = make_inputs((2, 2), 5, 4, 2, 2, torch.float64, generator=gen, **INPUTS)
    leaves = _leaves(x, U, S, Vh, A, B, b)

    def f(*args):
        return ops.cersa_linear(*args, scale=0.7, backend="triton")

    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_ops
def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(6)
    x, U, S, Vh, A, B, b = make_inputs((2, 3), 13, 11, 5, 3, torch.float32, generator=gen, **INPUTS)
    torch._dynamo.reset()

    def f(x, U, S, Vh, A, B, b):
        return ops.cersa_linear(x, U, S, Vh, A, B, b, scale=0.5, backend="triton")

    eager = _leaves(x, S, A, B, b)
    y = f(eager[0], U, eager[1], Vh, *eager[2:])
    y.square().sum().backward()
    comp = _leaves(x, S, A, B, b)
    yc = torch.compile(f, fullgraph=True)(comp[0], U, comp[1], Vh, *comp[2:])
    yc.square().sum().backward()
    assert rel_error(yc, y.double()) <= 1e-6
    for t, tc in zip(eager, comp):
        assert rel_error(tc.grad, t.grad.double()) <= 1e-6


COMPILE_CHECK = Path(__file__).resolve().parents[1] / "scripts" / "triton_compile_check.py"


def _compile_check(*args, timeout=1200):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, str(COMPILE_CHECK), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_kernels_compile_for_hopper_and_ampere():
    """Every kernel variant the backend launches lowers to a cubin for sm_90 and sm_80 (no GPU needed:
    ahead-of-time compilation with triton's bundled ptxas) and fits in the device's shared memory."""
    out = _compile_check("--arch", "90,80", "--dtype", "bf16,fp16")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "0 failure(s)" in out.stdout
    for name in ("seg_cols", "seg_k", "seg_rows", "colsum"):
        assert f"sm_90 bf16 {name}" in out.stdout and f"sm_80 fp16 {name}" in out.stdout, name


def test_compile_check_names_a_missing_shared_memory_limit():
    out = _compile_check("--arch", "75", "--smem", "80=166912", timeout=300)
    assert out.returncode == 2 and "--arch 75" in out.stderr and "--smem" in out.stderr, out.stderr
