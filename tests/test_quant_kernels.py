"""The C++ CPU kernels for quantized frozen factors (cersa::linear_forward_q / linear_backward_q,
csrc/cpu/cersa_cpu_quant.cpp) and the path of cersa_linear that uses them.

Ground truth: the float64 dense reference (tests/conftest.py ``dense_reference``) computed from the
factors as ``QuantizedMatrix.dequantize`` decodes them, which the kernels must reproduce exactly
(their decoding is bit-identical: test_kernels_decode_exactly).  Error bounds: TOL of conftest per
dtype (the error against the unquantized factors is 180x the fp32 bound, so a decoding mistake
cannot pass in fp32 or fp64).

Sizes: the kernels decode a factor in panels of at most 2^18 numbers (kPanelElems in
csrc/cpu/cersa_cpu_quant.cpp) and run rows in blocks of 384 (column-major h / dh from 128 rows), so
the shapes below include factors above 2^18 numbers with odd widths (panels starting inside a
byte of NF4 codes), N = 130 and N = 800.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import cersa_kernels as ck
from cersa_kernels.backends import cpp
from cersa_kernels.quant import QuantizedMatrix, nf4_levels
from conftest import make_inputs, rel_error

CPU_OK = cpp.has_quantized_kernels("cpu")
pytestmark = pytest.mark.skipif(not CPU_OK, reason="the C++ extension with the quantized-factor kernels "
                                                   "(cersa::linear_forward_q) is not loaded")

KINDS = [("int8", False), ("nf4", False), ("nf4", True), ("int8", True)]
#: above the kernels' panel of 2^18 numbers: U (700, 391) and Vh (391, 721) are two panels each way.
BIG = dict(m=700, r=391, n=721)
NAMES = ("x", "S", "A", "B", "bias")


def quantized(N, n, m, r, k, dtype, quant_type, double_quant, block=64, *, delta=True, bias=True, seed=0,
              layouts=None):
    """make_inputs(...) with U and Vh replaced by QuantizedMatrix (decoding to ``dtype``); also the
    decoded U, Vh the reference uses.  Returns (inputs, Uq, Vhq, U, Vh)."""
    t = make_inputs(N, n, m, r, k, dtype, delta=delta, bias=bias, seed=seed, layouts=layouts)
    Uq = QuantizedMatrix.quantize(t.U, quant_type, block, double_quant, dtype=dtype)
    Vhq = QuantizedMatrix.quantize(t.Vh, quant_type, block, double_quant, dtype=dtype)
    return t, Uq, Vhq, Uq.dequantize(dtype), Vhq.dequantize(dtype)


class OpLog(TorchDispatchMode):
    """Records every op dispatched below autograd and the shapes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((str(func), [tuple(o.shape) for o in flat if isinstance(o, torch.Tensor)]))
        return out

    def names(self) -> list[str]:
        return [name for name, _ in self.ops]

    def shapes(self) -> set[tuple[int, ...]]:
        return {s for _, shapes in self.ops for s in shapes}


def run_and_compare(t, Uq, Vhq, U, Vh, dtype, tol, scale=0.7, lead=None):
    """cersa_linear(backend="cpp") with quantized factors vs the float64 reference: y and the
    gradients of x, S (trained), A, B, bias; asserts the quantized kernels ran."""
    # x keeps its layout (a detached view), the others are fresh leaves
    leaves = {name: (v.detach() if name == "x" else v.detach().clone()).requires_grad_(True)
              for name in NAMES if (v := getattr(t, name)) is not None}
    x = leaves["x"]
    args = (x, Uq, leaves["S"], Vhq, leaves.get("A"), leaves.get("B"), leaves.get("bias"))
    with OpLog() as log:
        y = ck.cersa_linear(*args, scale=scale, backend="cpp")
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        y.backward(dy)
    assert "cersa.linear_forward_q.default" in log.names() and "cersa.linear_backward_q.default" in log.names()
    ref = _reference(t, U, Vh, scale, dy)
    b = tol[dtype]
    assert y.dtype == dtype and y.shape == ref["y"].shape
    assert rel_error(y, ref["y"]) <= b, ("y", rel_error(y, ref["y"]))
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.dtype == dtype, name
        err = rel_error(leaf.grad, ref[name])
        assert err <= b, (name, err)
    return log


def _reference(t, U, Vh, scale, dy):
    from conftest import dense_reference

    return dense_reference(t.x, U, t.S, Vh, t.A, t.B, t.bias, scale=scale, dy=dy)


# ------------------------------------------------------------------------------ forward + gradients
SHAPES = [  # (N, n, m, r, k, block): sizes not multiples of the block, odd numbers of NF4 codes
    (7, 45, 33, 13, 4, 16),
    (1, 30, 70, 9, 3, 64),
    (0, 20, 12, 5, 2, 32),
    (130, 50, 37, 21, 5, 8),     # column-major h / dh, one block of rows
    (800, 97, 83, 31, 6, 64),    # three blocks of rows (384, 384, 32)
    (9, 20, 12, 0, 3, 32),       # r = 0
    (5, 19, 1, 7, 2, 2),         # one output feature, the smallest block
]


@pytest.mark.parametrize("quant_type,double_quant", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("N,n,m,r,k,block", SHAPES)
def test_forward_and_gradients_match_reference(quant_type, double_quant, dtype, N, n, m, r, k, block, tol):
    t, Uq, Vhq, U, Vh = quantized(N, n, m, r, k, dtype, quant_type, double_quant, block, seed=N + r)
    run_and_compare(t, Uq, Vhq, U, Vh, dtype, tol)


@pytest.mark.parametrize("quant_type,double_quant", KINDS[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N", [1, 400])
def test_factors_larger_than_a_panel(quant_type, double_quant, dtype, N, tol):
    """U (700, 391) and Vh (391, 721): each GEMM that reads a factor runs over two panels, decoded
    again for each of the two blocks of rows at N = 400."""
    t, Uq, Vhq, U, Vh = quantized(N, BIG["n"], BIG["m"], BIG["r"], 8, dtype, quant_type, double_quant, seed=3)
    run_and_compare(t, Uq, Vhq, U, Vh, dtype, tol)


@pytest.mark.parametrize("delta,bias", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("N", [3, 150])
def test_no_delta_no_bias(delta, bias, N, tol):
    t, Uq, Vhq, U, Vh = quantized(N, 40, 29, 11, 4, torch.float32, "nf4", False, 32, delta=delta, bias=bias)
    run_and_compare(t, Uq, Vhq, U, Vh, torch.float32, tol)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("N", [(2, 3), (3, 50)])
def test_three_d_and_non_contiguous_inputs(layout, N, tol):
    t, Uq, Vhq, U, Vh = quantized(N, 37, 26, 10, 3, torch.float32, "int8", False, 16, layouts={"x": layout})
    assert not t.x.is_contiguous()
    run_and_compare(t, Uq, Vhq, U, Vh, torch.float32, tol)


def test_expanded_grad_output(tol):
    """y.sum().backward(): dy is expanded with stride 0."""
    t, Uq, Vhq, U, Vh = quantized(140, 33, 21, 9, 3, torch.float32, "nf4", True, 16)
    leaves = [v.detach().clone().requires_grad_(True) for v in (t.x, t.S, t.A, t.B, t.bias)]
    x, S, A, B, b = leaves
    ck.cersa_linear(x, Uq, S, Vhq, A, B, b, scale=1.5, backend="cpp").sum().backward()
    ref = _reference(t, U, Vh, 1.5, torch.ones(140, 21))
    for name, leaf in zip(NAMES, leaves):
        assert rel_error(leaf.grad, ref[name]) <= tol[torch.float32], name


# ------------------------------------------------------------------- the ops: needs, exact decoding
@pytest.mark.parametrize("needs", [
    (True, True, True, True, True),
    (False, False, True, True, False),   # the first layer: only the delta trains
    (False, True, False, False, False),  # dS alone
    (True, False, False, False, True),   # dx and dbias
    (False, False, False, False, False),
])
@pytest.mark.parametrize("N", [0, 11, 200])
def test_backward_op_computes_what_needs_asks(needs, N, tol):
    t, Uq, Vhq, U, Vh = quantized(N, 23, 17, 6, 3, torch.float32, "nf4", False, 8, seed=N)
    args = (Uq.codes, Uq.scales(), t.S, Vhq.codes, Vhq.scales(), t.A, t.B)
    y, h_k, xv = cpp.forward_quantized(t.x, *args[:5], t.A, t.B, t.bias, (17, 23), "nf4", 8, 0.5, needs[1])
    assert (xv is not None) == needs[1] and h_k is not None
    dy = torch.randn(N, 17, generator=torch.Generator().manual_seed(5))
    grads = cpp.backward_quantized(dy, t.x, h_k, xv, *args, (17, 23), "nf4", 8, 0.5, needs)
    ref = _reference(t, U, Vh, 0.5, dy)
    assert rel_error(y, ref["y"]) <= tol[torch.float32]
    for name, need, g in zip(NAMES, needs, grads):
        if not need:
            assert g is None, name
        else:
            assert g.shape == ref[name].shape and rel_error(g, ref[name]) <= tol[torch.float32], name


def test_backward_op_without_delta_has_no_dA_dB():
    t, Uq, Vhq, _, _ = quantized(4, 10, 8, 3, 0, torch.float32, "int8", False, 16, delta=False)
    dy = torch.randn(4, 8)
    grads = cpp.backward_quantized(dy, t.x, None, None, Uq.codes, Uq.scales(), t.S, Vhq.codes, Vhq.scales(),
                                   None, None, (8, 10), "int8", 16, 1.0, (True, False, True, True, True))
    assert grads[0] is not None and grads[2] is None and grads[3] is None and grads[4] is not None


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("big", [False, True])
def test_kernels_decode_exactly(quant_type, dtype, big):
    """With the other factor the identity, S = 1 and x (or dy) the identity, the products are the
    decoded factors themselves: the forward (row panels) gives Vh^T or U^T, the backward (column
    panels) Vh or U, bit-identical to QuantizedMatrix.dequantize(dtype).  The factors draw their
    numbers from every NF4 level (int8: every code / 127) at a scale per row, so every code occurs."""
    m, r, n = (BIG["m"], BIG["r"], BIG["n"]) if big else (37, 23, 41)
    g = torch.Generator().manual_seed(7)

    def quantize(F):
        return QuantizedMatrix.quantize(F, quant_type, 32, dtype=dtype)

    def factor(rows, cols):
        levels = nf4_levels(torch.float32) if quant_type == "nf4" else torch.arange(-127, 128) / 127.0
        idx = torch.randint(0, levels.numel(), (rows, cols), generator=g)
        return levels[idx] * (torch.rand(rows, 1, generator=g) * 3 + 0.1)

    eye = quantize(torch.eye(r))
    assert torch.equal(eye.dequantize(dtype), torch.eye(r, dtype=dtype))
    S = torch.ones(r, dtype=dtype)
    Vq, Uq = quantize(factor(r, n)), quantize(factor(m, r))
    # (U, Vh, shape (m, n) of the layer, the decoded factor under test)
    for U_q, Vh_q, shape, dense in ((eye, Vq, (r, n), Vq.dequantize(dtype)), (Uq, eye, (m, r), Uq.dequantize(dtype))):
        factors = (U_q.codes, U_q.scales(), S, Vh_q.codes, Vh_q.scales())
        x, dy = torch.eye(shape[1], dtype=dtype), torch.eye(shape[0], dtype=dtype)
        y = cpp.forward_quantized(x, *factors, None, None, None, shape, quant_type, 32, 1.0, False)[0]
        assert torch.equal(y, dense.t()), "forward"
        dx = cpp.backward_quantized(dy, None, None, None, *factors, None, None, shape, quant_type, 32, 1.0,
                                    (True, False, False, False, False))[0]
        assert torch.equal(dx, dense), "backward"


# ------------------------------------------------------------------------- what is saved / formed
@pytest.mark.parametrize("train_S", [False, True])
def test_nothing_dense_of_a_factor_is_saved_or_formed(train_S):
    """The graph saves x and h_k (N, k) (plus xv (N, r) when S trains) and the codes and scales:
    nothing of size (m, r) or (r, n); and no op of the call produces such a tensor."""
    N, n, m, r, k = 12, 40, 36, 14, 3
    t, Uq, Vhq, _, _ = quantized(N, n, m, r, k, torch.float32, "nf4", True, 16)
    x = t.x.clone().requires_grad_(True)
    S = t.S.clone().requires_grad_(train_S)
    A, B = t.A.clone().requires_grad_(True), t.B.clone().requires_grad_(True)
    saved = []

    def pack(v):
        saved.append((tuple(v.shape), v.dtype))
        return v

    with OpLog() as log:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            y = ck.cersa_linear(x, Uq, S, Vhq, A, B, t.bias, backend="cpp")
        y.sum().backward()
    blocks = lambda numel: -(-numel // 16)  # noqa: E731
    allowed = {(N, n), (N, k), (r,), (k, n), (m, k), (-(-m * r // 2),), (-(-r * n // 2),), (blocks(m * r),),
               (blocks(r * n),)} | ({(N, r)} if train_S else set())
    shapes = {s for s, _ in saved}
    assert shapes <= allowed, shapes - allowed
    assert ((N, r) in shapes) == train_S and (N, k) in shapes and (N, n) in shapes
    produced = log.shapes()
    assert not {(m, r), (r, n), (r, m), (n, r)} & produced
    assert "cersa.linear_forward_q.default" in log.names()


def test_mixed_formats_keep_the_decoding_path(tol):
    """U int8 with Vh nf4 (or a dense Vh): no quantized kernel for that pair, so the factors are
    decoded for the call and the dense kernels run; the results match the reference too."""
    t = make_inputs(9, 30, 22, 7, 3, torch.float32, seed=4)
    Uq = QuantizedMatrix.quantize(t.U, "int8", 16)
    for Vh_arg in (QuantizedMatrix.quantize(t.Vh, "nf4", 16), QuantizedMatrix.quantize(t.Vh, "int8", 32), t.Vh):
        Vh = Vh_arg.dequantize() if isinstance(Vh_arg, QuantizedMatrix) else Vh_arg
        x = t.x.clone().requires_grad_(True)
        with OpLog() as log:
            y = ck.cersa_linear(x, Uq, t.S, Vh_arg, t.A, t.B, t.bias, backend="cpp")
            y.sum().backward()
        assert "cersa.linear_forward_q.default" not in log.names()
        ref = _reference(t, Uq.dequantize(), Vh, 1.0, torch.ones(9, 22))
        assert rel_error(y, ref["y"]) <= tol[torch.float32] and rel_error(x.grad, ref["x"]) <= tol[torch.float32]


def test_cpp_fused_matches_reference_backend():
    """The reference backend keeps decoding the factors; the cpp kernels agree with it to fp32
    rounding."""
    t, Uq, Vhq, _, _ = quantized(33, 50, 44, 12, 4, torch.float32, "nf4", False, 64)
    outs = []
    for backend in ("reference", "cpp"):
        x = t.x.clone().requires_grad_(True)
        A = t.A.clone().requires_grad_(True)
        y = ck.cersa_linear(x, Uq, t.S, Vhq, A, t.B, t.bias, scale=0.3, backend=backend)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), x.grad, A.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


# ------------------------------------------------------------------------------ gradcheck, opcheck
@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
@pytest.mark.parametrize("N", [4, 130])
def test_gradcheck_fp64(quant_type, N):
    t, Uq, Vhq, _, _ = quantized(N, 6 if N > 100 else 10, 8, 3, 2, torch.float64, quant_type, False, 8)
    inputs = tuple(v.detach().clone().requires_grad_(True) for v in (t.x, t.S, t.A, t.B, t.bias))
    assert torch.autograd.gradcheck(  # fast mode (random projections) for the 130-row case
        lambda x, S, A, B, b: ck.cersa_linear(x, Uq, S, Vhq, A, B, b, scale=0.5, backend="cpp"), inputs,
        fast_mode=N > 100)


@pytest.mark.parametrize("delta,bias,save_xv,N", [(True, True, True, 9), (False, False, False, 0),
                                                  (True, False, False, 140)])
def test_opcheck_forward_q(delta, bias, save_xv, N):
    t, Uq, Vhq, _, _ = quantized(N, 10, 8, 4, 3, torch.float32, "nf4", False, 4, delta=delta, bias=bias)
    torch.library.opcheck(torch.ops.cersa.linear_forward_q.default,
                          (t.x, Uq.codes, Uq.scales(), t.S, Vhq.codes, Vhq.scales(), t.A, t.B, t.bias, 8, 10,
                           "nf4", 4, 0.5, save_xv))


@pytest.mark.parametrize("needs", [[True] * 5, [False, True, False, True, False], [False] * 5])
@pytest.mark.parametrize("N", [0, 11])
def test_opcheck_backward_q(needs, N):
    t, Uq, Vhq, _, _ = quantized(N, 10, 8, 4, 3, torch.float32, "int8", False, 16)
    codes = (Uq.codes, Uq.scales(), t.S, Vhq.codes, Vhq.scales())
    _, h_k, xv = cpp.forward_quantized(t.x, *codes, t.A, t.B, t.bias, (8, 10), "int8", 16, 0.5, True)
    dy = torch.randn(N, 8)
    torch.library.opcheck(torch.ops.cersa.linear_backward_q.default,
                          (dy, t.x, h_k, xv, *codes, t.A, t.B, 8, 10, "int8", 16, 0.5, needs))


# ------------------------------------------------------------------------------------- compile
@pytest.fixture()
def _fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("_fresh_dynamo")
def test_compile_fullgraph_traces_a_quantized_layer():
    """torch.compile(fullgraph=True, dynamic=True) of a converted model with NF4 factors: no graph
    break, no recompile across lengths, the quantized kernels in the traced graph, the eager
    outputs and gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40), nn.GELU(), nn.Linear(40, 24))
    ck.convert(model, energy=0.9, delta_rank=4, quantize="nf4", double_quant=True, progress=False,
               max_frozen_ratio=None, backend="cpp")
    assert isinstance(model[0].U, QuantizedMatrix) and isinstance(model[2].Vh, QuantizedMatrix)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))
        return gm.forward

    torch.compile(model, backend=capture, fullgraph=True, dynamic=True)(torch.randn(3, 5, 48))
    assert len(graphs) == 1 and "linear_forward_q" in graphs[0]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for seq in (5, 9, 2):
        x = torch.randn(3, seq, 48)
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye = model(xe)
        ye.backward(torch.ones_like(ye))
        eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        yc = compiled(xc)
        yc.backward(torch.ones_like(yc))
        torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-4, atol=1e-5, msg=n)
        model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------ bad input
def _good(N=5):
    t, Uq, Vhq, _, _ = quantized(N, 10, 8, 4, 3, torch.float32, "nf4", False, 4)
    return dict(x=t.x, U_codes=Uq.codes, U_scales=Uq.scales(), S=t.S, Vh_codes=Vhq.codes, Vh_scales=Vhq.scales(),
                A=t.A, B=t.B, bias=t.bias, out_features=8, in_features=10, quant_type="nf4", block_size=4,
                scale=1.0, save_xv=False)


@pytest.mark.parametrize("change,pattern", [
    (dict(quant_type="fp4"), r"quant_type: expected 'int8' or 'nf4', got 'fp4'"),
    (dict(block_size=6), r"block_size: expected a power of two >= 2, got 6"),
    (dict(U_codes=torch.zeros(16, dtype=torch.int8)),
     r"U_codes: expected dtype torch.uint8 \(quant_type 'nf4'\), got torch.int8"),
    (dict(U_codes=torch.zeros(15, dtype=torch.uint8)), r"U_codes: expected 16 codes for a \(8, 4\) nf4 factor"),
    (dict(Vh_scales=torch.ones(9)), r"Vh_scales: expected 10 scales"),
    (dict(Vh_scales=torch.ones(10, dtype=torch.float64)), r"Vh_scales: expected dtype torch.float32"),
    (dict(in_features=11), r"x: expected size 11 in dim 1"),
    (dict(out_features=-1), r"out_features: expected >= 0, got -1"),
    (dict(bias=torch.zeros(7)), r"bias: expected size 8 in dim 0"),
    (dict(S=torch.ones(4, dtype=torch.float64)), r"S: expected dtype torch.float32 \(x's dtype\)"),
    (dict(B=None), r"A and B: expected both or neither"),
])
def test_bad_input_names_the_argument(change, pattern):
    args = _good()
    args.update(change)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.cersa.linear_forward_q(*args.values())


def test_bad_backward_input_names_the_argument():
    args = _good()
    dy = torch.randn(5, 8)
    common = (args["U_codes"], args["U_scales"], args["S"], args["Vh_codes"], args["Vh_scales"], args["A"],
              args["B"], 8, 10, "nf4", 4, 1.0)
    with pytest.raises(RuntimeError, match=r"x: expected the saved input \(needed for dA\), got None"):
        torch.ops.cersa.linear_backward_q(dy, None, None, None, *common, [False, False, True, False, False])
    with pytest.raises(RuntimeError, match=r"xv: expected the saved x Vh\^T \(needed for dS\), got None"):
        torch.ops.cersa.linear_backward_q(dy, None, None, None, *common, [False, True, False, False, False])
    with pytest.raises(RuntimeError, match=r"dy: expected size 8 in dim 1"):
        torch.ops.cersa.linear_backward_q(torch.randn(5, 7), None, None, None, *common, [True] + [False] * 4)


# ------------------------------------------------------------------------------------ bench tool
def test_bench_quant_ratios_are_medians_of_per_file_ratios(tmp_path):
    """bench/bench_quant.py's ratio table: per file the ratio of median times, then the median over
    the files (synthetic pytest-benchmark JSON)."""
    import json
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench.bench_quant import ratios

    def bench(method, median):
        return {"extra_info": {"bench": "quant", "method": method, "shape": "384x384", "rank": 176, "N": 512},
                "stats": {"median": median}}

    paths = []
    for i, (cpp_t, nf4_t, lora_t) in enumerate([(1.0, 1.1, 2.0), (2.0, 2.0, 2.0), (1.0, 1.5, 4.0)]):
        path = tmp_path / f"run{i}.json"
        others = [{"extra_info": {"m": 384, "method": "cpp"}, "stats": {"median": 9.0}}]  # bench_linear rows
        path.write_text(json.dumps({"benchmarks": [bench("cpp", cpp_t), bench("cpp-nf4", nf4_t),
                                                   bench("dense+lora", lora_t)] + others}))
        paths.append(str(path))
    (row,) = ratios(paths)
    assert (row["shape"], row["rank"], row["N"], row["files"]) == ("384x384", 176, 512, 3)
    assert row["cpp-nf4 / cpp"] == pytest.approx(1.1)  # median of 1.1, 1.0, 1.5
    assert row["cpp / dense+lora"] == pytest.approx(0.5)  # median of 0.5, 1.0, 0.25
    assert row["cpp ms"] == pytest.approx(1000.0)
    assert "cpp-int8 / cpp" not in row


# ------------------------------------------------------------------------------------------ CUDA
CUDA_OK = torch.cuda.is_available() and cpp.has_quantized_kernels("cuda")


@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and the CUDA extension with the quantized-factor "
                                        "kernels (cersa_kernels._C_cuda)")
@pytest.mark.parametrize("quant_type,double_quant", KINDS[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("N,n,m,r,k,block", [SHAPES[0], SHAPES[2], SHAPES[4], SHAPES[5],
                                             (300, BIG["n"], BIG["m"], BIG["r"], 8, 64)])
def test_cuda_kernels_match_reference(quant_type, double_quant, dtype, N, n, m, r, k, block, tol):
    """The CUDA schedule (csrc/cuda/cersa_cuda_ops.cpp): forward and every gradient against the
    float64 reference (computed on the CPU), with exact decoding of both factors."""
    t, Uq, Vhq, U, Vh = quantized(N, n, m, r, k, dtype, quant_type, double_quant, block, seed=N + r)
    dev = torch.device("cuda")
    leaves = {name: getattr(t, name).detach().to(dev).requires_grad_(True) for name in NAMES}
    Uc, Vhc = Uq.to(dev), Vhq.to(dev)
    y = ck.cersa_linear(leaves["x"], Uc, leaves["S"], Vhc, leaves["A"], leaves["B"], leaves["bias"], scale=0.7)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    y.backward(dy.to(dev))
    ref = _reference(t, U, Vh, 0.7, dy)
    assert rel_error(y.cpu(), ref["y"]) <= tol[dtype]
    for name, leaf in leaves.items():
        assert rel_error(leaf.grad.cpu(), ref[name]) <= tol[dtype], name
    if dtype != torch.bfloat16 and r > 0 and N > 0:  # decoding: Vh^T through an identity U and x
        eye = QuantizedMatrix.quantize(torch.eye(r), quant_type, block, dtype=dtype).to(dev)
        yv = cpp.forward_quantized(torch.eye(n, dtype=dtype, device=dev), eye.codes, eye.scales(),
                                   torch.ones(r, dtype=dtype, device=dev), Vhc.codes, Vhc.scales(), None, None, None,
                                   (r, n), quant_type, block, 1.0, False)[0]
        assert torch.equal(yv.cpu(), Vh.t())
