"""Tests of the C++ extension: the cersa:: ops, the "cpp" backend and cersa_linear(backend="cpp").

Ground truth: the dense float64 product y = x (U diag(S) Vh + s B A)^T + bias and its autograd
gradients, computed from the same (already rounded) inputs.  Error metric:
max |out - ref| / max |ref|.  Bounds per dtype: fp64 1e-12, fp32 1e-5, fp16 5e-3, bf16 3e-2
(the intermediates h and dh are stored in the input dtype, as in the reference backend).
The C++ op and the reference backend agree to fp32 rounding (2e-6 on fp32).
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

import cersa_kernels
from cersa_kernels.backends import _cpp_ops, available_backends
from cersa_kernels.backends import cpp
from cersa_kernels.backends import reference as ref

CPU_OK, CPU_WHY = cpp.is_available("cpu")
needs_ext = pytest.mark.skipif(not CPU_OK, reason=f"C++ extension not loaded: {CPU_WHY}")

GRAD_NAMES = ("dx", "dU", "dS", "dVh", "dA", "dB", "dbias")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    assert out.shape == want.shape, (tuple(out.shape), tuple(want.shape))
    if want.numel() == 0:
        return 0.0
    scale = want.abs().max().item()
    return (out.double() - want.double()).abs().max().item() / (scale if scale > 0 else 1.0)


def make(N, n, m, r, k, dtype, *, delta=True, bias=True, seed=0):
    """Fresh random factors (never zeros), magnitudes ~1 so fp16 does not overflow."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, fan=1):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) / fan ** 0.5).to(dtype)

    x = rnd(N, n)
    U, Vh = rnd(m, r, fan=max(r, 1)), rnd(r, n, fan=n)
    S = (torch.rand(r, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    A = rnd(k, n, fan=n) if delta else None
    B = rnd(m, k, fan=max(k, 1)) if delta else None
    b = rnd(m) if bias else None
    return x, U, S, Vh, A, B, b


def dense_reference(x, U, S, Vh, A, B, b, scale, dy):
    """y and all 7 gradients of the dense float64 formula (autograd on the dense W)."""
    ts = [None if t is None else t.detach().double().requires_grad_(True) for t in (x, U, S, Vh, A, B, b)]
    x6, U6, S6, Vh6, A6, B6, b6 = ts
    W = (U6 * S6) @ Vh6
    if A6 is not None:
        W = W + scale * (B6 @ A6)
    y = x6 @ W.t()
    if b6 is not None:
        y = y + b6
    y.backward(dy.double())
    grads = [None if t is None else (t.grad if t.grad is not None else torch.zeros_like(t)) for t in ts]
    return y.detach(), grads


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values in a column-major layout with a padded leading dimension."""
    N, c = t.shape
    big = torch.empty(c + 3, N, dtype=t.dtype)
    big[:c] = t.t()
    return big[:c].t()


def every_other_column(t: torch.Tensor) -> torch.Tensor:
    """The same values with column stride 2 (no unit stride: not BLAS-ready as it is)."""
    N, c = t.shape
    big = torch.empty(N, 2 * c, dtype=t.dtype)
    big[:, ::2] = t
    return big[:, ::2]


def run_backend(mod, x, U, S, Vh, A, B, b, scale, dy, needs):
    save_xv = needs[1] or needs[2]
    y, h_k, xv = mod.forward(x, U, S, Vh, A, B, b, scale, save_xv)
    grads = mod.backward(dy, x, h_k, xv, U, S, Vh, A, B, scale, needs)
    return y, h_k, xv, grads


SHAPES = [  # (N, n, m, r, k)
    (37, 29, 23, 11, 5),   # odd sizes, none a multiple of 16
    (1, 33, 17, 7, 3),     # one row
    (0, 19, 13, 6, 2),     # no rows
    (130, 64, 96, 40, 16),  # N >= 128: h and dh are column-major inside the kernels
    (257, 35, 29, 17, 3),   # column-major with odd sizes
    (901, 21, 19, 9, 5),    # several blocks of rows (blocked schedule), a short last block
    (9, 12, 10, 0, 4),     # rank 0: only the delta
]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N%d_n%d_m%d_r%d_k%d" % s)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_backend_matches_dense_float64(dtype, shape, layout):
    N, n, m, r, k = shape
    x, U, S, Vh, A, B, b = make(N, n, m, r, k, dtype, seed=N + n + m)
    dy = torch.randn(N, m, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    if layout == "noncontiguous":
        x, dy = every_other_column(x), (noncontig(dy) if N > 1 else every_other_column(dy))
        assert N == 0 or (not x.is_contiguous() and not dy.is_contiguous())
    scale = 0.75
    y, h_k, xv, grads = run_backend(cpp, x, U, S, Vh, A, B, b, scale, dy, (True,) * 7)
    y_ref, g_ref = dense_reference(x, U, S, Vh, A, B, b, scale, dy)
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (N, m)
    assert rel_err(y, y_ref) <= tol
    assert rel_err(h_k, scale * x.double() @ A.double().t()) <= tol
    assert rel_err(xv, x.double() @ Vh.double().t()) <= tol
    for name, got, want in zip(GRAD_NAMES, grads, g_ref):
        assert got is not None, name
        assert got.dtype == dtype, name
        assert rel_err(got, want) <= tol, (name, rel_err(got, want))


# Factor layouts for the GEMMs' operand handling: fp32 / fp64 GEMMs call BLAS directly on any
# operand with a unit stride in one dimension (read transposed when it is column-major) and
# fall back to ATen's kernels otherwise; single rows and columns take either layout.
FACTOR_LAYOUTS = {"colmajor": noncontig, "strided": every_other_column}
UNIT_SHAPES = [  # (N, n, m, r, k): sizes of 1 in every position, below and above 128 rows
    (1, 1, 1, 1, 1), (3, 1, 5, 1, 2), (2, 6, 1, 3, 1), (1, 40, 30, 12, 4),
    (150, 7, 1, 1, 1), (140, 1, 9, 2, 3),
]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", UNIT_SHAPES, ids=lambda s: "N%d_n%d_m%d_r%d_k%d" % s)
@pytest.mark.parametrize("layout", sorted(FACTOR_LAYOUTS))
def test_factor_layouts_and_unit_sizes(dtype, shape, layout):
    N, n, m, r, k = shape
    x, U, S, Vh, A, B, b = make(N, n, m, r, k, dtype, seed=3 * N + n + 7 * m)
    dy = torch.randn(N, m, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    lay = FACTOR_LAYOUTS[layout]
    U2, Vh2, A2, B2, x2 = (lay(t) for t in (U, Vh, A, B, x))
    for t, t2 in zip((U, Vh, A, B, x), (U2, Vh2, A2, B2, x2)):
        assert torch.equal(t, t2)
    scale = 1.25
    y, h_k, xv, grads = run_backend(cpp, x2, U2, S, Vh2, A2, B2, b, scale, dy, (True,) * 7)
    y_ref, g_ref = dense_reference(x, U, S, Vh, A, B, b, scale, dy)
    tol = TOL[dtype]
    assert rel_err(y, y_ref) <= tol
    for name, got, want in zip(GRAD_NAMES, grads, g_ref):
        assert rel_err(got, want) <= tol, (name, rel_err(got, want))


_ONEDNN_PROBE = """
import sys, torch
from cersa_kernels.backends import cpp
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x, dy = torch.randn(64, 96, generator=g), torch.randn(64, 80, generator=g)
U, Vh = torch.randn(80, 32, generator=g), torch.randn(32, 96, generator=g)
S, A, B = torch.rand(32, generator=g) + 0.5, torch.randn(8, 96, generator=g), torch.randn(80, 8, generator=g)
torch.backends.mkldnn.matmul.fp32_precision = sys.argv[1]
print("=== torch.mm", flush=True)
torch.mm(x, Vh.t())
print("=== cersa", flush=True)
y, h_k, xv = cpp.forward(x, U, S, Vh, A, B, None, 0.5, True)
cpp.backward(dy, x, h_k, xv, U, S, Vh, A, B, 0.5, (True,) * 7)
print("=== end", flush=True)
"""


def _onednn_matmuls(precision: str) -> dict[str, int]:
    """oneDNN matmul executions per section of _ONEDNN_PROBE, run with ONEDNN_VERBOSE=1."""
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    out = subprocess.run([sys.executable, "-c", _ONEDNN_PROBE, precision], env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    counts, section = {}, None
    for line in out.splitlines():
        if line.startswith("=== "):
            section = line[4:]
            counts[section] = 0
        elif section and line.startswith("onednn_verbose") and ",exec," in line and ",matmul," in line:
            counts[section] += 1
    return counts


@needs_ext
def test_fp32_reduced_precision_setting_leaves_the_gemms_to_aten():
    """The fp32 GEMMs call sgemm_ directly at full precision, but with torch's fp32 matmul precision
    set to bf16 they go through ATen, which runs them in oneDNN as the setting asks."""
    low = _onednn_matmuls("bf16")
    if low.get("torch.mm", 0) == 0:
        pytest.skip("torch does not run fp32 matmuls through oneDNN here even at bf16 precision "
                    "(no bf16-capable CPU), so there is no setting to honour")
    assert low["cersa"] > 0
    assert _onednn_matmuls("ieee")["cersa"] == 0


@needs_ext
@pytest.mark.parametrize("N", [5, 300])
def test_fp32_under_reduced_matmul_precision_setting(N):
    """Under the bf16 setting (the ATen path for fp32) the results stay within the bf16 bound."""
    x, U, S, Vh, A, B, b = make(N, 37, 29, 11, 4, torch.float32, seed=N)
    dy = torch.randn(N, 29, generator=torch.Generator().manual_seed(2))
    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        y, h_k, xv, grads = run_backend(cpp, x, U, S, Vh, A, B, b, 0.5, dy, (True,) * 7)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before
    y_ref, g_ref = dense_reference(x, U, S, Vh, A, B, b, 0.5, dy)
    assert rel_err(y, y_ref) <= TOL[torch.bfloat16]
    for name, got, want in zip(GRAD_NAMES, grads, g_ref):
        assert rel_err(got, want) <= TOL[torch.bfloat16], name


@needs_ext
@pytest.mark.parametrize("junk", [torch.empty(0), torch.tensor(1.0), torch.empty(2, 3, 4)],
                         ids=["empty", "0-D", "3-D"])
def test_backward_ignores_saved_tensors_it_does_not_need_whatever_their_shape(junk):
    x, U, S, Vh, A, B, _ = make(6, 5, 4, 3, 2, torch.float32)
    dy = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    y, h_k, xv = cpp.forward(x, U, S, Vh, A, B, None, 0.5, True)
    cases = [  # (needs, which saved tensor is not needed)
        ((True, True, True, True, True, False, True), "h_k"),   # no dB: h_k unused
        ((True, False, False, False, False, True, True), "x"),  # no dVh, dA: x unused
        ((True, False, False, True, True, True, True), "xv"),   # no dU, dS: xv unused
    ]
    for needs, unused in cases:
        args = {"x": x, "h_k": h_k, "xv": xv}
        want = cpp.backward(dy, args["x"], args["h_k"], args["xv"], U, S, Vh, A, B, 0.5, needs)
        args[unused] = junk
        got = cpp.backward(dy, args["x"], args["h_k"], args["xv"], U, S, Vh, A, B, 0.5, needs)
        for name, g, w in zip(GRAD_NAMES, got, want):
            assert (g is None and w is None) or torch.equal(g, w), (unused, name)


@needs_ext
@pytest.mark.skipif(not (hasattr(torch, "_lazy_clone") and hasattr(torch._C, "_is_cow_tensor")),
                    reason="this torch has no copy-on-write tensors (torch._lazy_clone)")
@pytest.mark.parametrize("N", [3, 200])
def test_inputs_are_only_read(N):
    """Copy-on-write inputs stay copy-on-write through forward and backward: the kernels read
    them through const pointers and never ask for write access."""
    x, U, S, Vh, A, B, b = make(N, 9, 7, 4, 2, torch.float32)
    dy = torch.randn(N, 7, generator=torch.Generator().manual_seed(3))
    cow = [torch._lazy_clone(t) for t in (x, U, S, Vh, A, B, b, dy)]
    x2, U2, S2, Vh2, A2, B2, b2, dy2 = cow
    y, h_k, xv, grads = run_backend(cpp, x2, U2, S2, Vh2, A2, B2, b2, 0.5, dy2, (True,) * 7)
    assert all(torch._C._is_cow_tensor(t) for t in cow)
    y_ref, _ = dense_reference(x, U, S, Vh, A, B, b, 0.5, dy)
    assert rel_err(y, y_ref) <= TOL[torch.float32]


@needs_ext
@pytest.mark.parametrize("delta,bias", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("needs", [
    (True,) * 7,
    (True, False, False, False, True, True, True),    # the usual fine-tuning case
    (False, False, False, False, True, True, False),  # adapter only
    (False, False, True, False, False, False, False),  # S only
    (True, False, False, False, False, False, False),  # dx only
    (False, True, False, True, False, False, False),   # frozen factors unfrozen
])
@pytest.mark.parametrize("N", [45, 150, 800], ids=["rowmajor", "colmajor", "blocks"])
def test_backend_agrees_with_reference_fp32(delta, bias, needs, N):
    """Both internal layouts of h / dh (row-major below 128 rows, column-major from 128 on) and
    the blocked schedule (several blocks of 384 rows, weight gradients summed block by block)."""
    x, U, S, Vh, A, B, b = make(N, 38, 27, 13, 6, torch.float32, delta=delta, bias=bias, seed=3)
    dy = torch.randn(N, 27, generator=torch.Generator().manual_seed(1))
    needs = tuple(needs[:4]) + (needs[4] and delta, needs[5] and delta, needs[6] and bias)
    out_c = run_backend(cpp, x, U, S, Vh, A, B, b, 0.5, dy, needs)
    out_r = run_backend(ref, x, U, S, Vh, A, B, b, 0.5, dy, needs)
    for name, got, want in zip(("y", "h_k", "xv") + GRAD_NAMES, out_c[:3] + tuple(out_c[3]),
                               out_r[:3] + tuple(out_r[3])):
        assert (got is None) == (want is None), name
        if got is not None:
            assert rel_err(got, want) <= 2e-6, (name, rel_err(got, want))
    for flag, g in zip(needs, out_c[3]):
        assert (g is not None) == bool(flag)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("needs", [
    (True, False, False, False, False, False, False),   # dx only: dh stays one block
    (False, False, False, False, False, True, True),    # dB, dbias: no dh at all
    (True, False, True, False, True, True, True),       # dS and dA: dh over all rows
], ids=["dx", "dB_dbias", "dS_dA"])
def test_blocked_schedule_16bit_partial_needs(dtype, needs):
    """16-bit dtypes over several blocks of rows, where the weight gradients run over all rows
    at once: every combination of what dh is kept for."""
    x, U, S, Vh, A, B, b = make(777, 26, 22, 10, 4, dtype, seed=17)
    dy = torch.randn(777, 22, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    y, h_k, xv, grads = run_backend(cpp, x, U, S, Vh, A, B, b, 0.5, dy, needs)
    y_ref, g_ref = dense_reference(x, U, S, Vh, A, B, b, 0.5, dy)
    assert rel_err(y, y_ref) <= TOL[dtype]
    for name, flag, got, want in zip(GRAD_NAMES, needs, grads, g_ref):
        assert (got is not None) == flag, name
        if flag:
            assert rel_err(got, want) <= TOL[dtype], (name, rel_err(got, want))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_expanded_grad_output_and_transposed_x(dtype):
    """dy with strides (0, 0) (the grad of y.sum()) and x stored transposed."""
    x, U, S, Vh, A, B, b = make(23, 18, 14, 7, 3, dtype, seed=4)
    x = x.t().contiguous().t()
    dy = torch.randn(1, 1, dtype=torch.float64).to(dtype).expand(23, 14)
    assert dy.stride() == (0, 0) and x.stride(0) == 1
    y, h_k, xv, grads = run_backend(cpp, x, U, S, Vh, A, B, b, 1.25, dy, (True,) * 7)
    y_ref, g_ref = dense_reference(x, U, S, Vh, A, B, b, 1.25, dy)
    assert rel_err(y, y_ref) <= TOL[dtype]
    for name, got, want in zip(GRAD_NAMES, grads, g_ref):
        assert rel_err(got, want) <= TOL[dtype], name


@needs_ext
def test_backward_without_saved_tensors_it_does_not_need():
    """ops.py passes x=None unless dVh/dA are needed, h_k=None unless dB, xv=None unless dU/dS."""
    x, U, S, Vh, A, B, b = make(20, 16, 12, 5, 3, torch.float32, seed=11)
    dy = torch.randn(20, 12)
    y, h_k, xv = cpp.forward(x, U, S, Vh, A, B, b, 1.5, False)
    assert xv is None
    got = cpp.backward(dy, None, None, None, U, S, Vh, A, B, 1.5, (True, False, False, False, False, False, True))
    want = ref.backward(dy, x, h_k, None, U, S, Vh, A, B, 1.5, (True, False, False, False, False, False, True))
    assert rel_err(got[0], want[0]) <= 2e-6 and rel_err(got[6], want[6]) <= 2e-6
    with pytest.raises(RuntimeError, match="x: expected the saved input"):
        cpp.backward(dy, None, h_k, None, U, S, Vh, A, B, 1.5, (False,) * 4 + (True, False, False))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cersa_linear_cpp_3d_input_all_gradients(dtype):
    x, U, S, Vh, A, B, b = make(2 * 7, 21, 15, 8, 4, dtype, seed=5)
    x3 = x.reshape(2, 7, 21)
    dy = torch.randn(2, 7, 15, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (x3, U, S, Vh, A, B, b)]
    y = cersa_kernels.cersa_linear(*leaves[:4], leaves[4], leaves[5], leaves[6], scale=2.0, backend="cpp")
    assert y.shape == (2, 7, 15) and y.dtype == dtype
    y.backward(dy)
    y_ref, g_ref = dense_reference(x, U, S, Vh, A, B, b, 2.0, dy.reshape(14, 15))
    assert rel_err(y.reshape(14, 15), y_ref) <= TOL[dtype]
    for name, t, want in zip(GRAD_NAMES, leaves, g_ref):
        assert rel_err(t.grad.reshape(want.shape), want) <= TOL[dtype], name


@needs_ext
def test_cersa_linear_cpp_matches_reference_backend():
    x, U, S, Vh, A, B, b = make(64, 48, 40, 20, 8, torch.float32, seed=9)
    outs = {}
    for backend in ("cpp", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (x, U, S, Vh, A, B, b)]
        y = cersa_kernels.cersa_linear(*leaves, scale=0.3, backend=backend)
        y.backward(torch.ones_like(y))
        outs[backend] = [y.detach()] + [t.grad for t in leaves]
    for got, want in zip(outs["cpp"], outs["reference"]):
        assert rel_err(got, want) <= 2e-6


@needs_ext
@pytest.mark.parametrize("with_delta", [True, False])
def test_gradcheck_float64(with_delta):
    x, U, S, Vh, A, B, b = make(6, 7, 5, 3, 2, torch.float64, delta=with_delta, seed=13)
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in (x, U, S, Vh, A, B, b)]
    inputs = tuple(t for t in leaves if t is not None)

    def f(*ts):
        it = iter(ts)
        args = [next(it) if t is not None else None for t in leaves]
        return cersa_kernels.cersa_linear(*args, scale=0.7, backend="cpp")

    assert torch.autograd.gradcheck(f, inputs)


def _opcheck_cases():
    for delta, bias, save_xv, N in itertools.product((True, False), (True, False), (True, False), (0, 9)):
        yield delta, bias, save_xv, N


@needs_ext
@pytest.mark.parametrize("delta,bias,save_xv,N", list(_opcheck_cases()))
def test_opcheck_linear_forward(delta, bias, save_xv, N):
    x, U, S, Vh, A, B, b = make(N, 10, 8, 4, 3, torch.float32, delta=delta, bias=bias, seed=N)
    torch.library.opcheck(torch.ops.cersa.linear_forward.default, (x, U, S, Vh, A, B, b, 0.5, save_xv))


@needs_ext
@pytest.mark.parametrize("needs", [
    [True] * 7,
    [True, False, False, False, True, True, True],
    [False, False, True, False, False, False, False],
    [False] * 7,
])
@pytest.mark.parametrize("delta", [True, False])
@pytest.mark.parametrize("N", [0, 11])
def test_opcheck_linear_backward(needs, delta, N):
    x, U, S, Vh, A, B, b = make(N, 10, 8, 4, 3, torch.float32, delta=delta, seed=N + 1)
    _, h_k, xv = cpp.forward(x, U, S, Vh, A, B, b, 0.5, True)
    dy = torch.randn(N, 8)
    torch.library.opcheck(torch.ops.cersa.linear_backward.default,
                          (noncontig(dy) if N else dy, x, h_k, xv, U, S, Vh, A, B, 0.5, needs))


@needs_ext
@pytest.mark.parametrize("delta,bias", [(True, True), (False, False)])
@pytest.mark.parametrize("grads", ["all", "delta", "none"])
@pytest.mark.parametrize("N", [0, 9, 140])
def test_opcheck_linear(delta, bias, grads, N):
    """cersa::linear, the differentiable op with the C++ autograd: schema, fake kernel, autograd
    registration and AOT dispatch (opcheck's tests), with and without inputs that need grad."""
    t = list(make(N, 10, 8, 4, 3, torch.float32, delta=delta, bias=bias, seed=N + 2))
    want = {"all": range(7), "delta": (0, 4, 5), "none": ()}[grads]
    for i in want:
        if t[i] is not None:
            t[i].requires_grad_(True)
    torch.library.opcheck(torch.ops.cersa.linear.default, (*t, 0.5))


@needs_ext
def test_cpp_backend_autograd_runs_in_cpp_and_matches_without_grad():
    """cersa_linear(backend="cpp") records the C++ autograd node, not a Python Function, and the
    op gives the same y under no_grad and inference_mode (where no node is made)."""
    x, U, S, Vh, A, B, b = make(19, 14, 11, 5, 3, torch.float32, seed=31)
    A.requires_grad_(True)
    y = cersa_kernels.cersa_linear(x, U, S, Vh, A, B, b, scale=0.5, backend="cpp")
    assert "CppNode" in y.grad_fn.name() and "LinearFunction" in y.grad_fn.name()
    with torch.no_grad():
        y0 = cersa_kernels.cersa_linear(x, U, S, Vh, A, B, b, scale=0.5, backend="cpp")
    with torch.inference_mode():
        y1 = cersa_kernels.cersa_linear(x, U, S, Vh, A, B, b, scale=0.5, backend="cpp")
    assert y0.grad_fn is None and torch.equal(y0, y.detach()) and torch.equal(y1, y.detach())


@needs_ext
def test_torch_compile_fullgraph_dynamic_no_recompile():
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    _, U, S, Vh, A, B, b = make(1, 24, 16, 6, 4, torch.float32, seed=21)
    A.requires_grad_(True)
    B.requires_grad_(True)

    @torch.compile(fullgraph=True, dynamic=True, backend=counter)
    def step(x):
        return cersa_kernels.cersa_linear(x, U, S, Vh, A, B, b, scale=0.5, backend="cpp").square().sum()

    for N in (5, 9, 33):
        x = torch.randn(N, 24, requires_grad=True)
        loss = step(x)
        loss.backward()
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B)]
        want = cersa_kernels.cersa_linear(leaves[0], U, S, Vh, leaves[1], leaves[2], b, scale=0.5,
                                          backend="reference").square().sum()
        want.backward()
        assert rel_err(loss.detach(), want.detach()) <= 1e-5
        for got, w in zip((x.grad, A.grad, B.grad), (t.grad for t in leaves)):
            assert rel_err(got, w) <= 1e-5
        A.grad = B.grad = None
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for 3 sequence lengths"
    torch._dynamo.reset()


@needs_ext
def test_torch_compile_converted_model_no_graph_break_no_recompile():
    """convert(model, backend="cpp") then torch.compile(fullgraph=True, dynamic=True): one frame
    for every sequence length, and the same loss and gradients as the uncompiled model."""
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 12))
    with torch.no_grad():  # weights of rank 6, so energy truncation shrinks them
        for lin in (model[0], model[2]):
            lin.weight.copy_(torch.randn(lin.out_features, 6) @ torch.randn(6, lin.in_features) / 6)
    cersa_kernels.convert(model, energy=0.9, delta_rank=4, backend="cpp", progress=False)
    assert any(isinstance(mod, cersa_kernels.CersaLinear) for mod in model.modules())
    for mod in model.modules():  # a non-zero delta, so dA and dB are both exercised
        if isinstance(mod, cersa_kernels.CersaLinear):
            torch.nn.init.normal_(mod.B, std=0.1)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    params = [p for p in model.parameters() if p.requires_grad]
    frames = []
    for T in (3, 8, 17):
        x = torch.randn(2, T, 24)
        model.zero_grad()
        loss = compiled(x).square().mean()
        loss.backward()
        got = [p.grad.clone() for p in params]
        model.zero_grad()
        want = model(x).square().mean()
        want.backward()
        assert rel_err(loss.detach(), want.detach()) <= 1e-5
        for g, p in zip(got, params):
            assert rel_err(g, p.grad) <= 1e-5
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames == [frames[0]] * 3, f"recompiled across sequence lengths: {frames}"
    torch._dynamo.reset()


@needs_ext
def test_op_errors_name_the_argument():
    x, U, S, Vh, A, B, b = make(4, 6, 5, 3, 2, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match=r"x: expected size 6 in dim 1"):
        torch.ops.cersa.linear_forward(x[:, :5], U, S, Vh, A, B, b, 1.0, False)
    with pytest.raises(RuntimeError, match=r"S: expected size 3"):
        torch.ops.cersa.linear_forward(x, U, S[:2], Vh, A, B, b, 1.0, False)
    with pytest.raises(RuntimeError, match=r"B: expected dtype torch.float32 \(x's dtype\), got torch.float64"):
        torch.ops.cersa.linear_forward(x, U, S, Vh, A, B.double(), b, 1.0, False)
    with pytest.raises(RuntimeError, match=r"A and B: expected both or neither"):
        torch.ops.cersa.linear_forward(x, U, S, Vh, A, None, b, 1.0, False)
    with pytest.raises(RuntimeError, match=r"bias: expected size 5"):
        torch.ops.cersa.linear_forward(x, U, S, Vh, A, B, b[:4], 1.0, False)
    with pytest.raises(RuntimeError, match=r"x: expected dtype torch.float32, torch.float64, torch.float16 or torch.bfloat16, got Int"):
        torch.ops.cersa.linear_forward(x.int(), U.int(), S.int(), Vh.int(), None, None, None, 1.0, False)


def test_extension_is_built():
    """CI builds the extension: a missing or broken _C must fail loudly, not just skip tests.
    Set CERSA_BUILD_CPP=0 to build and test without it."""
    if os.environ.get("CERSA_BUILD_CPP") == "0":
        pytest.skip("CERSA_BUILD_CPP=0: the extension is deliberately not built")
    assert CPU_OK, CPU_WHY
    assert "cpp" in available_backends("cpu")


def test_missing_extension_falls_back_with_one_warning():
    """With _C unloadable, the package warns once with the reason and runs on the reference path."""
    code = r"""
import sys, warnings
sys.modules["cersa_kernels._C"] = None   # makes `import cersa_kernels._C` raise ImportError
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as w:
    import torch, cersa_kernels
    from cersa_kernels.backends import available_backends, default_backend
    names = available_backends("cpu")
    names2 = available_backends("cpu")
    from cersa_kernels.backends import cpp
    ok, why = cpp.is_available("cpu")
    y = cersa_kernels.cersa_linear(torch.randn(3, 4), torch.randn(2, 1), torch.rand(1), torch.randn(1, 4))
msgs = [str(x.message) for x in w if "C++ extension unavailable" in str(x.message)]
assert len(msgs) == 1, msgs
assert "cersa_kernels._C failed to load" in msgs[0], msgs[0]
assert names == names2 and "cpp" not in names and "reference" in names, names
assert not ok and "ModuleNotFoundError" in why, why
assert default_backend("cpu") == "reference"
assert y.shape == (3, 2)
print("OK")
"""
    env = {k: v for k, v in os.environ.items() if k != "CERSA_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(_cpp_ops.CUDA_ERROR is not None, reason=f"CUDA extension not loaded: {_cpp_ops.CUDA_ERROR}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N%d_n%d_m%d_r%d_k%d" % s)
def test_cuda_backend_matches_dense_float64(dtype, shape):
    N, n, m, r, k = shape
    x, U, S, Vh, A, B, b = make(N, n, m, r, k, dtype, seed=N + 1)
    dy = torch.randn(N, m, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    dev = [t.cuda() for t in (x, U, S, Vh, A, B, b)]
    with _no_tf32():  # fp32 GEMMs in full fp32, so the fp32 bound holds
        y, h_k, xv, grads = run_backend(cpp, *dev, 0.75, noncontig(dy).cuda() if N else dy.cuda(), (True,) * 7)
    y_ref, g_ref = dense_reference(x, U, S, Vh, A, B, b, 0.75, dy)
    assert rel_err(y.cpu(), y_ref) <= TOL[dtype]
    for name, got, want in zip(GRAD_NAMES, grads, g_ref):
        assert rel_err(got.cpu(), want) <= TOL[dtype], name


class _no_tf32:
    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old
