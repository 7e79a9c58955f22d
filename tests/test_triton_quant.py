"""The Triton kernels for quantized frozen factors (cersa_kernels::triton_forward_q / triton_backward_q,
cersa_kernels/backends/triton) and the path of cersa_linear that uses them.

The kernels decode the int8 / NF4 codes of U and Vh in their tile loads (kernels.QuantOperand).
Ground truth: the float64 dense reference (tests/conftest.py ``dense_reference``) computed from the
factors as ``QuantizedMatrix.dequantize`` decodes them, which the kernels must reproduce exactly
(test_kernels_decode_exactly).  Error bounds: TOL of conftest per dtype.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py), which tiles by 16 (kernels.INTERP_CONFIG): the sizes below span several tiles with
ragged edges, blocks of the codes straddle the rows of the factors (block sizes that do not divide
a row) and odd numbers of numbers per row put the two NF4 codes of a byte in different rows.  On a
GPU the same tests run the compiled kernels.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton", reason="triton is not installed")

import cersa_kernels as ck  # noqa: E402
from cersa_kernels.backends import triton as tb  # noqa: E402
from cersa_kernels.backends.triton import kernels as tk  # noqa: E402
from cersa_kernels.quant import QuantizedMatrix, nf4_levels  # noqa: E402

from conftest import dense_reference, make_inputs, rel_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_ok, _why = tb.is_available(DEVICE)
pytestmark = pytest.mark.skipif(not _ok, reason=f"Triton backend cannot run here: {_why}")

KINDS = [("int8", False), ("nf4", False), ("nf4", True), ("int8", True)]
NAMES = ("x", "S", "A", "B", "bias")
FWD_Q, BWD_Q = "cersa_kernels.triton_forward_q.default", "cersa_kernels.triton_backward_q.default"


def quantized(N, n, m, r, k, dtype, quant_type, double_quant, block=64, *, delta=True, bias=True, seed=0,
              layouts=None):
    """make_inputs(...) on DEVICE with U and Vh replaced by QuantizedMatrix (decoding to ``dtype``);
    also the decoded U, Vh the reference uses.  Returns (inputs, Uq, Vhq, U, Vh)."""
    t = make_inputs(N, n, m, r, k, dtype, delta=delta, bias=bias, seed=seed, layouts=layouts, device=DEVICE)
    Uq = QuantizedMatrix.quantize(t.U, quant_type, block, double_quant, dtype=dtype)
    Vhq = QuantizedMatrix.quantize(t.Vh, quant_type, block, double_quant, dtype=dtype)
    return t, Uq, Vhq, Uq.dequantize(dtype), Vhq.dequantize(dtype)


class OpLog(TorchDispatchMode):
    """Records every op dispatched below autograd with the shapes and dtypes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[tuple[tuple[int, ...], torch.dtype]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((str(func), [(tuple(o.shape), o.dtype) for o in flat if isinstance(o, torch.Tensor)]))
        return out

    def names(self) -> list[str]:
        return [name for name, _ in self.ops]

    def float_numels(self) -> set[int]:
        """The sizes of every floating tensor the logged ops produced."""
        return {torch.Size(s).numel() for _, outs in self.ops for s, dt in outs if dt.is_floating_point}


def _reference(t, U, Vh, scale, dy):
    return dense_reference(t.x, U, t.S, Vh, t.A, t.B, t.bias, scale=scale, dy=dy)


def run_and_compare(t, Uq, Vhq, U, Vh, dtype, tol, scale=0.7, train_S=True):
    """cersa_linear(backend="triton") with quantized factors vs the float64 reference: y and the
    gradients of x, S (when train_S), A, B, bias; asserts that the quantized kernels ran."""
    leaves = {name: (v.detach() if name == "x" else v.detach().clone()).requires_grad_(name != "S" or train_S)
              for name in NAMES if (v := getattr(t, name)) is not None}
    x = leaves["x"]
    with OpLog() as log:
        y = ck.cersa_linear(x, Uq, leaves["S"], Vhq, leaves.get("A"), leaves.get("B"), leaves.get("bias"),
                            scale=scale, backend="triton")
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        y.backward(dy.to(DEVICE))
    assert FWD_Q in log.names() and BWD_Q in log.names()
    ref = _reference(t, U, Vh, scale, dy)
    b = tol[dtype]
    assert y.dtype == dtype and y.shape == ref["y"].shape
    assert rel_error(y, ref["y"]) <= b, ("y", rel_error(y, ref["y"]))
    for name, leaf in leaves.items():
        if name == "S" and not train_S:
            assert leaf.grad is None
            continue
        assert leaf.grad is not None and leaf.grad.dtype == dtype, name
        err = rel_error(leaf.grad, ref[name])
        assert err <= b, (name, err)


# ------------------------------------------------------------------------------ forward + gradients
SHAPES = [  # (N, n, m, r, k, block)
    (7, 45, 33, 13, 4, 16),   # odd rows of Vh (45) and U (13): blocks and NF4 bytes straddle rows
    (37, 19, 23, 17, 5, 8),   # three row tiles, two column tiles of r, two K tiles of n
    (1, 30, 21, 9, 3, 64),    # one row; a block longer than a row of either factor
    (0, 20, 12, 5, 2, 32),    # no rows
    (5, 19, 1, 7, 2, 2),      # one output feature, the smallest block
    (9, 20, 12, 0, 3, 32),    # r = 0
]


@pytest.mark.parametrize("quant_type,double_quant", KINDS)
@pytest.mark.parametrize("N,n,m,r,k,block", SHAPES)
def test_forward_and_gradients_match_reference_fp32(quant_type, double_quant, N, n, m, r, k, block, tol):
    t, Uq, Vhq, U, Vh = quantized(N, n, m, r, k, torch.float32, quant_type, double_quant, block, seed=N + r)
    run_and_compare(t, Uq, Vhq, U, Vh, torch.float32, tol)


#: (dtype, formats): every format in fp64; in 16 bits int8 and nf4 with double quantization (which
#: changes only the scales the kernels receive).
OTHER_DTYPES = [(torch.float64, KINDS), (torch.bfloat16, [KINDS[0], KINDS[2]]), (torch.float16, [KINDS[0], KINDS[2]])]


@pytest.mark.parametrize("dtype,quant_type,double_quant",
                         [(dt, q, dq) for dt, kinds in OTHER_DTYPES for q, dq in kinds],
                         ids=lambda v: str(v).split(".")[-1])
@pytest.mark.parametrize("N,n,m,r,k,block", SHAPES[:2])
def test_forward_and_gradients_match_reference_other_dtypes(quant_type, double_quant, dtype, N, n, m, r, k, block,
                                                            tol):
    """fp64 (fp64 accumulation) and the 16-bit dtypes (decoded to the dtype, then upcast to fp32
    for tl.dot under the interpreter, whose 16-bit dot is wrong: kernels.py "Numerics")."""
    t, Uq, Vhq, U, Vh = quantized(N, n, m, r, k, dtype, quant_type, double_quant, block, seed=N + r)
    run_and_compare(t, Uq, Vhq, U, Vh, dtype, tol)


@pytest.mark.parametrize("delta,bias", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("train_S", [False, True])
def test_no_delta_no_bias_frozen_S(delta, bias, train_S, tol):
    t, Uq, Vhq, U, Vh = quantized(19, 40, 29, 11, 4, torch.float32, "nf4", False, 32, delta=delta, bias=bias)
    run_and_compare(t, Uq, Vhq, U, Vh, torch.float32, tol, train_S=train_S)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("N", [(2, 3), (3, 7)])
def test_three_d_and_non_contiguous_inputs(layout, N, tol):
    t, Uq, Vhq, U, Vh = quantized(N, 37, 26, 10, 3, torch.float32, "int8", False, 16, layouts={"x": layout})
    assert not t.x.is_contiguous() and t.x.dim() == 3
    run_and_compare(t, Uq, Vhq, U, Vh, torch.float32, tol)


def test_expanded_grad_output(tol):
    """y.sum().backward(): dy is expanded with stride 0."""
    t, Uq, Vhq, U, Vh = quantized(21, 33, 21, 9, 3, torch.float32, "nf4", True, 16)
    leaves = [v.detach().clone().requires_grad_(True) for v in (t.x, t.S, t.A, t.B, t.bias)]
    x, S, A, B, b = leaves
    ck.cersa_linear(x, Uq, S, Vhq, A, B, b, scale=1.5, backend="triton").sum().backward()
    ref = _reference(t, U, Vh, 1.5, torch.ones(21, 21))
    for name, leaf in zip(NAMES, leaves):
        assert rel_error(leaf.grad, ref[name]) <= tol[torch.float32], name


# ------------------------------------------------------------------- the ops: needs, exact decoding
def _codes(Uq, S, Vhq):
    return (Uq.codes, Uq.scales(), S, Vhq.codes, Vhq.scales())


@pytest.mark.parametrize("needs", [
    (True, True, True, True, True),
    (False, False, True, True, False),   # the first layer: only the delta trains
    (False, True, False, False, False),  # dS alone
    (True, False, False, False, True),   # dx and dbias
    (False, False, False, False, False),
])
@pytest.mark.parametrize("N", [0, 11])
def test_backward_op_computes_what_needs_asks(needs, N, tol):
    t, Uq, Vhq, U, Vh = quantized(N, 23, 17, 6, 3, torch.float32, "nf4", False, 8, seed=N)
    codes = _codes(Uq, t.S, Vhq)
    y, h_k, xv = tb.forward_quantized(t.x, *codes, t.A, t.B, t.bias, (17, 23), "nf4", 8, 0.5, needs[1])
    assert (xv is not None) == needs[1] and h_k is not None
    dy = torch.randn(N, 17, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    grads = tb.backward_quantized(dy, t.x, h_k, xv, *codes, t.A, t.B, (17, 23), "nf4", 8, 0.5, needs)
    ref = _reference(t, U, Vh, 0.5, dy)
    assert rel_error(y, ref["y"]) <= tol[torch.float32]
    for name, need, g in zip(NAMES, needs, grads):
        if not need:
            assert g is None, name
        else:
            assert g.shape == ref[name].shape and rel_error(g, ref[name]) <= tol[torch.float32], name


def test_backward_op_without_delta_has_no_dA_dB():
    t, Uq, Vhq, _, _ = quantized(4, 10, 8, 3, 0, torch.float32, "int8", False, 16, delta=False)
    dy = torch.randn(4, 8).to(DEVICE)
    grads = tb.backward_quantized(dy, t.x, None, None, *_codes(Uq, t.S, Vhq), None, None, (8, 10), "int8", 16, 1.0,
                                  (True, False, True, True, True))
    assert grads[0] is not None and grads[1:4] == (None, None, None) and grads[4] is not None


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["float32", "float64", "bfloat16", "float16"])
def test_kernels_decode_exactly(quant_type, dtype):
    """With the other factor the identity, S = 1 and x (or dy) the identity, the products are the
    decoded factors themselves: forward launch 1 gives Vh^T, forward launch 2 U^T, backward launch 1
    U (through dx = U I) and backward launch 2 Vh, bit-identical to QuantizedMatrix.dequantize(dtype).
    The factors draw their numbers from every NF4 level (int8: every code / 127) at a scale per row,
    in blocks of 32 that straddle their rows (23, 41 and 37 numbers each)."""
    m, r, n = 37, 23, 41
    g = torch.Generator().manual_seed(7)

    def quantize(F):
        return QuantizedMatrix.quantize(F.to(DEVICE), quant_type, 32, dtype=dtype)

    def factor(rows, cols):
        levels = nf4_levels(torch.float32) if quant_type == "nf4" else torch.arange(-127, 128) / 127.0
        idx = torch.randint(0, levels.numel(), (rows, cols), generator=g)
        return levels[idx] * (torch.rand(rows, 1, generator=g) * 3 + 0.1)

    eye = quantize(torch.eye(r))
    assert torch.equal(eye.dequantize(dtype), torch.eye(r, dtype=dtype, device=DEVICE))
    S = torch.ones(r, dtype=dtype, device=DEVICE)
    Vq, Uq = quantize(factor(r, n)), quantize(factor(m, r))
    codes_used = set()
    # (U, Vh, shape (m, n) of the layer, the decoded factor under test)
    for U_q, Vh_q, shape, dense in ((eye, Vq, (r, n), Vq.dequantize(dtype)), (Uq, eye, (m, r), Uq.dequantize(dtype))):
        codes_used |= set(dense.float().unique().tolist())
        factors = _codes(U_q, S, Vh_q)
        x, dy = (torch.eye(s, dtype=dtype, device=DEVICE) for s in (shape[1], shape[0]))
        y, _, xv = tb.forward_quantized(x, *factors, None, None, None, shape, quant_type, 32, 1.0, True)
        assert torch.equal(y, dense.t()), "forward"
        dx = tb.backward_quantized(dy, None, None, None, *factors, None, None, shape, quant_type, 32, 1.0,
                                   (True, False, False, False, False))[0]
        assert torch.equal(dx, dense), "backward"
    assert len(codes_used) > (100 if quant_type == "int8" else 30)  # many distinct decoded numbers


def test_quantized_launches_decode_the_frozen_operand_only():
    """The planned launches: forward 1 (Vh^T) and 2 (U^T), backward 1 (U) and 2 (Vh) read the codes
    (QUANT of the format, codes and scales as Q1 / QS1, no tensor of a factor's size); backward 3
    and 4 only for dA / dB / dbias, with no dVh / dU segment."""
    N, n, m, r, k = 9, 21, 19, 7, 3
    t, Uq, Vhq, _, _ = quantized(N, n, m, r, k, torch.float32, "nf4", False, 8)
    codes = _codes(Uq, t.S, Vhq)
    planned = []
    y, h_k, xv = tb._forward_q_impl(t.x, *codes, t.A, t.B, t.bias, m, n, "nf4", 8, 0.5, True,
                                    launch=planned.append)
    assert [p.name for p in planned] == ["seg_cols", "seg_k"]
    for p in planned:
        named = p.named_args
        assert p.constexprs["QUANT"] == tk.QUANT_NF4 and p.constexprs["Q_SHIFT"] == 3
        assert named["Q1"].dtype == torch.uint8 and named["QS1"] is not None
    assert planned[0].named_args["Q1"] is Vhq.codes and planned[1].named_args["Q1"] is Uq.codes
    # Vh^T: element [i, j] is Vh[j, i] (strides (1, n)); U^T likewise (1, r)
    assert (planned[0].named_args["s_q1k"], planned[0].named_args["s_q1n"]) == (1, n)
    assert (planned[1].named_args["s_q1k"], planned[1].named_args["s_q1n"]) == (1, r)
    planned = []
    tb._backward_q_impl(torch.ones_like(y), t.x, h_k, xv, *codes, t.A, t.B, m, n, "nf4", 8, 0.5, (True,) * 5,
                        launch=planned.append)
    assert [p.name for p in planned] == ["seg_cols", "seg_k", "seg_rows", "seg_cols"]
    assert [p.constexprs.get("QUANT") for p in planned] == [tk.QUANT_NF4, tk.QUANT_NF4, None, tk.QUANT_NONE]
    assert (planned[0].named_args["s_q1k"], planned[0].named_args["s_q1n"]) == (r, 1)  # U
    assert (planned[1].named_args["s_q1k"], planned[1].named_args["s_q1n"]) == (n, 1)  # Vh
    assert planned[2].named_args["M1"] == 0 and planned[3].named_args["N1"] == 0  # no dVh, no dU
    for p in planned:
        for v in p.args:
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.numel() not in (m * r, r * n), (p.name, tuple(v.shape))


@pytest.mark.parametrize("train_S", [False, True])
def test_nothing_dense_of_a_factor_is_saved_or_formed(train_S):
    """cersa_linear with quantized factors goes through triton_forward_q / triton_backward_q; the graph
    saves x, h_k (N, k) (plus xv (N, r) when S trains) and the codes and scales; no op of the call,
    inside the ops' implementations included, produces a floating tensor of a factor's size."""
    N, n, m, r, k = 12, 40, 36, 14, 3
    t, Uq, Vhq, _, _ = quantized(N, n, m, r, k, torch.float32, "nf4", True, 16)
    x = t.x.clone().requires_grad_(True)
    S = t.S.clone().requires_grad_(train_S)
    A, B = t.A.clone().requires_grad_(True), t.B.clone().requires_grad_(True)
    saved = []

    def pack(v):
        saved.append(tuple(v.shape))
        return v

    with OpLog() as log:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            y = ck.cersa_linear(x, Uq, S, Vhq, A, B, t.bias, backend="triton")
        y.sum().backward()
    blocks = lambda numel: -(-numel // 16)  # noqa: E731
    allowed = {(N, n), (N, k), (r,), (k, n), (m, k), (-(-m * r // 2),), (-(-r * n // 2),), (blocks(m * r),),
               (blocks(r * n),)} | ({(N, r)} if train_S else set())
    assert set(saved) <= allowed, set(saved) - allowed
    assert ((N, r) in saved) == train_S and (N, k) in saved and (N, n) in saved
    assert FWD_Q in log.names() and BWD_Q in log.names()
    assert not {m * r, r * n} & log.float_numels()
    # inside the implementations (what the custom ops run): no decoded factor either
    with OpLog() as inner:
        y, h_k, xv = tb._forward_q_impl(t.x, *_codes(Uq, t.S, Vhq), t.A, t.B, t.bias, m, n, "nf4", 16, 1.0, True)
        tb._backward_q_impl(torch.ones_like(y), t.x, h_k, xv, *_codes(Uq, t.S, Vhq), t.A, t.B, m, n, "nf4", 16,
                            1.0, (True,) * 5)
    assert inner.ops and not {m * r, r * n} & inner.float_numels()


def test_mixed_formats_keep_the_decoding_path(tol):
    """U int8 with Vh nf4 (or a dense Vh): no quantized kernel for that pair, so the factors are
    decoded for the call and the dense Triton kernels run; the results match the reference too."""
    t = make_inputs(9, 30, 22, 7, 3, torch.float32, seed=4, device=DEVICE)
    Uq = QuantizedMatrix.quantize(t.U, "int8", 16)
    for Vh_arg in (QuantizedMatrix.quantize(t.Vh, "nf4", 16), QuantizedMatrix.quantize(t.Vh, "int8", 32), t.Vh):
        Vh = Vh_arg.dequantize() if isinstance(Vh_arg, QuantizedMatrix) else Vh_arg
        x = t.x.clone().requires_grad_(True)
        with OpLog() as log:
            y = ck.cersa_linear(x, Uq, t.S, Vh_arg, t.A, t.B, t.bias, backend="triton")
            y.sum().backward()
        assert FWD_Q not in log.names() and "cersa_kernels.triton_forward.default" in log.names()
        ref = _reference(t, Uq.dequantize(), Vh, 1.0, torch.ones(9, 22))
        assert rel_error(y, ref["y"]) <= tol[torch.float32] and rel_error(x.grad, ref["x"]) <= tol[torch.float32]


def test_quantized_layer_uses_the_triton_kernels(tol):
    """A model converted with quantize="nf4" and backend="triton": its CersaLinear layers run
    triton_forward_q / triton_backward_q, with the outputs and gradients of the reference backend."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 20), nn.GELU(), nn.Linear(20, 12)).to(DEVICE)
    ck.convert(model, energy=0.9, delta_rank=4, quantize="nf4", double_quant=True, progress=False,
               max_frozen_ratio=None, backend="triton")
    assert isinstance(model[0].U, QuantizedMatrix) and isinstance(model[2].Vh, QuantizedMatrix)
    x = torch.randn(3, 5, 24, device=DEVICE)
    with OpLog() as log:
        y = model(x)
        y.square().sum().backward()
    assert log.names().count(FWD_Q) == 2 and log.names().count(BWD_Q) == 2
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    for layer in (model[0], model[2]):
        layer.backend = "reference"
    with OpLog() as log_ref:
        y_ref = model(x)
        y_ref.square().sum().backward()
    assert FWD_Q not in log_ref.names()
    assert rel_error(y, y_ref.detach()) <= tol[torch.float32]
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rel_error(grads[name], p.grad) <= 2 * tol[torch.float32], name


# ------------------------------------------------------------------------------ gradcheck, opcheck
@pytest.mark.parametrize("quant_type,fast", [("int8", False), ("nf4", True)])
def test_gradcheck_fp64(quant_type, fast):
    """Full Jacobians for int8; random projections (fast mode) for nf4, to keep the interpreted
    kernel calls few."""
    t, Uq, Vhq, _, _ = quantized(2, 3, 3, 2, 1, torch.float64, quant_type, False, 2)
    inputs = tuple(v.detach().clone().requires_grad_(True) for v in (t.x, t.S, t.A, t.B, t.bias))
    assert torch.autograd.gradcheck(
        lambda x, S, A, B, b: ck.cersa_linear(x, Uq, S, Vhq, A, B, b, scale=0.5, backend="triton"), inputs,
        fast_mode=fast)


@pytest.mark.parametrize("delta,bias,save_xv,N", [(True, True, True, 9), (False, False, False, 0)])
def test_opcheck_forward_q(delta, bias, save_xv, N):
    t, Uq, Vhq, _, _ = quantized(N, 10, 8, 4, 3, torch.float32, "nf4", False, 4, delta=delta, bias=bias)
    torch.library.opcheck(torch.ops.cersa_kernels.triton_forward_q.default,
                          (t.x, *_codes(Uq, t.S, Vhq), t.A, t.B, t.bias, 8, 10, "nf4", 4, 0.5, save_xv))


@pytest.mark.parametrize("needs", [[True] * 5, [False, True, False, True, False]])
def test_opcheck_backward_q(needs):
    t, Uq, Vhq, _, _ = quantized(11, 10, 8, 4, 3, torch.float32, "int8", False, 16)
    codes = _codes(Uq, t.S, Vhq)
    _, h_k, xv = tb.forward_quantized(t.x, *codes, t.A, t.B, t.bias, (8, 10), "int8", 16, 0.5, True)
    dy = torch.randn(11, 8).to(DEVICE)
    torch.library.opcheck(torch.ops.cersa_kernels.triton_backward_q.default,
                          (dy, t.x, h_k, xv, *codes, t.A, t.B, 8, 10, "int8", 16, 0.5, needs))


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces cersa_linear with quantized factors through the custom
    ops (their fakes) without a graph break; the compiled forward and backward (AOTAutograd with
    the eager kernels, backend "aot_eager": Inductor's C++ compile of the graph around the opaque
    ops takes ~35 s on 2 CPU cores, see test_torch_compile_inductor) equal the eager ones."""
    import torch._dynamo

    t, Uq, Vhq, _, _ = quantized((2, 3), 13, 11, 5, 3, torch.float32, "int8", True, 8)
    torch._dynamo.reset()

    def f(x, S, A, B, b):
        return ck.cersa_linear(x, Uq, S, Vhq, A, B, b, scale=0.5, backend="triton")

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))
        return gm.forward

    torch.compile(f, backend=capture, fullgraph=True)(t.x, t.S, t.A, t.B, t.bias)
    assert len(graphs) == 1 and "triton_forward_q" in graphs[0]
    torch._dynamo.reset()
    eager = [v.detach().clone().requires_grad_(True) for v in (t.x, t.S, t.A, t.B, t.bias)]
    y = f(*eager)
    y.square().sum().backward()
    comp = [v.detach().clone().requires_grad_(True) for v in (t.x, t.S, t.A, t.B, t.bias)]
    yc = torch.compile(f, fullgraph=True, backend="aot_eager")(*comp)
    yc.square().sum().backward()
    torch._dynamo.reset()
    assert torch.equal(yc, y)
    for a, c in zip(eager, comp):
        assert torch.equal(c.grad, a.grad)


@pytest.mark.skipif(DEVICE == "cpu", reason="Inductor's C++ compile of the graph around the opaque custom ops "
                    "takes ~35 s on 2 CPU cores; test_torch_compile_fullgraph traces the same graph (aot_eager)")
def test_torch_compile_inductor():
    import torch._dynamo

    t, Uq, Vhq, _, _ = quantized((2, 3), 13, 11, 5, 3, torch.float32, "nf4", False, 8)
    torch._dynamo.reset()

    def f(x, S, A, B, b):
        return ck.cersa_linear(x, Uq, S, Vhq, A, B, b, scale=0.5, backend="triton")

    eager = [v.detach().clone().requires_grad_(True) for v in (t.x, t.S, t.A, t.B, t.bias)]
    y = f(*eager)
    y.square().sum().backward()
    comp = [v.detach().clone().requires_grad_(True) for v in (t.x, t.S, t.A, t.B, t.bias)]
    yc = torch.compile(f, fullgraph=True)(*comp)
    yc.square().sum().backward()
    torch._dynamo.reset()
    assert rel_error(yc, y.double()) <= 1e-6
    for a, c in zip(eager, comp):
        assert rel_error(c.grad, a.grad.double()) <= 1e-6


# ----------------------------------------------------------------------------- tile configurations
@pytest.mark.parametrize("limits", [tk.Limits(232448, 9), tk.Limits(166912, 8)], ids=["sm90", "sm80"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("code_dtype", [torch.int8, torch.uint8], ids=["int8", "nf4"])
def test_select_configs_for_quantized_launches(limits, dtype, code_dtype):
    """A launch whose Q1 is a factor's codes gets candidates that fit the device with the codes'
    pipeline bytes (kernels._smem with the quantized tile size), QUANT_CONFIGS among them for large
    M; a dense launch never gets QUANT_CONFIGS."""
    esize = torch.empty(0, dtype=dtype).element_size()
    quant_ids = {id(c) for c in tk.QUANT_CONFIGS}
    for M in (1, 16, 4096):
        args = {"P": torch.empty(0, dtype=dtype), "Q1": torch.empty(0, dtype=code_dtype), "M": M}
        qsize = tk._quant_bytes(args)
        assert qsize is not None and qsize > esize // 2
        tuned = tk.select_configs(tk.GPU_CONFIGS, args, limits, autotune=True)
        assert tuned
        for c in tuned:
            assert tk._smem(c, esize, qsize) <= limits.smem_per_block, (M, c)
        first = tk.select_configs(tk.GPU_CONFIGS, args, limits, autotune=False)
        assert len(first) == 1 and any(first[0] is c for c in tuned)
        if M == 4096 and dtype == torch.bfloat16:
            assert any(id(c) in quant_ids for c in tuned)
        dense = tk.select_configs(tk.GPU_CONFIGS, {"P": args["P"], "M": M}, limits, autotune=True)
        assert dense and not any(id(c) in quant_ids for c in dense)


# ------------------------------------------------------------------------------------ bad input
def _good(N=5):
    t, Uq, Vhq, _, _ = quantized(N, 10, 8, 4, 3, torch.float32, "nf4", False, 4)
    return dict(x=t.x, U_codes=Uq.codes, U_scales=Uq.scales(), S=t.S, Vh_codes=Vhq.codes, Vh_scales=Vhq.scales(),
                A=t.A, B=t.B, bias=t.bias, out_features=8, in_features=10, quant_type="nf4", block_size=4,
                scale=1.0, save_xv=False)


@pytest.mark.parametrize("change,error,pattern", [
    (dict(quant_type="fp4"), ValueError, r"quant_type: expected 'int8' or 'nf4', got 'fp4'"),
    (dict(block_size=6), ValueError, r"block_size: expected a power of two >= 2, got 6"),
    (dict(U_codes=torch.zeros(16, dtype=torch.int8)), ValueError,
     r"U_codes: expected a torch.uint8 tensor of shape \(16,\) for a nf4 \(8, 4\) factor in blocks of 4, "
     r"got torch.int8 \(16,\)"),
    (dict(U_codes=torch.zeros(15, dtype=torch.uint8)), ValueError, r"U_codes: expected .* shape \(16,\)"),
    (dict(Vh_scales=torch.ones(9)), ValueError, r"Vh_scales: expected a torch.float32 tensor of shape \(10,\)"),
    (dict(Vh_scales=torch.ones(10, dtype=torch.float64)), ValueError,
     r"Vh_scales: expected a torch.float32 tensor .* got torch.float64"),
    (dict(in_features=11), ValueError, r"x: expected shape \(N, in_features = 11\), got \(5, 10\)"),
    (dict(out_features=-1), ValueError, r"out_features, in_features: expected sizes >= 0, got \(-1, 10\)"),
])
def test_bad_input_names_the_argument(change, error, pattern):
    args = _good()
    args.update({key: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for key, v in change.items()})
    with pytest.raises(error, match=pattern):
        tb._forward_q_impl(*args.values())


def test_bad_backward_input_names_the_argument():
    args = _good()
    codes = (args["U_codes"], args["U_scales"], args["S"], args["Vh_codes"], args["Vh_scales"], args["A"], args["B"])
    with pytest.raises(ValueError, match=r"dy: expected shape \(N, out_features = 8\), got \(5, 7\)"):
        tb._backward_q_impl(torch.randn(5, 7).to(DEVICE), None, None, None, *codes, 8, 10, "nf4", 4, 1.0,
                            (True,) + (False,) * 4)
    with pytest.raises(ValueError, match=r"xv"):  # dS needs the saved x Vh^T
        tb._backward_q_impl(torch.randn(5, 8).to(DEVICE), None, None, None, *codes, 8, 10, "nf4", 4, 1.0,
                            (False, True, False, False, False))
