"""Tests of the functional op ``cersa_kernels.cersa_linear`` (cersa_kernels/ops.py) on every CPU backend.

Every case draws fresh random tensors, rounds them to the dtype under test, and compares the op's
output and every gradient with the float64 dense reference of tests/conftest.py (autograd through
the dense W = U diag(S) Vh + s B A, computed from the same rounded inputs).  Error metric and
per-dtype bounds: conftest.rel_error / conftest.TOL.

The matrix runs over every CPU backend (conftest.cpu_backends), so a new CPU backend is tested by
the same cases.  Triton under the CPU interpreter is too slow for this matrix (seconds per call) and
is left to tests/test_backend_triton.py.  Inputs: conftest.make_inputs (fan-scaled, O(1) outputs).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cersa_kernels
from cersa_kernels import cersa_linear

from conftest import GRAD_NAMES, TOL, cpu_backends, dense_reference, make_inputs, rel_error

BACKENDS = cpu_backends(include_interpreted_triton=False)

#: The tensors that train in fine-tuning (x: for the layer below).
TRAINED = ("x", "S", "A", "B", "bias")


def run_and_check(t, backend, scale=0.7, dy=None, *, tol=None):
    """Run the op on the OpInputs t, backprop dy, compare y and each gradient with the float64
    dense reference."""
    x = t.x
    dtype = x.dtype
    tol = TOL[dtype] if tol is None else tol
    y = cersa_linear(*t, scale, backend=backend)
    m = t.U.shape[0]
    assert y.shape == (*x.shape[:-1], m)
    assert y.dtype == dtype
    if dy is None:
        dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = dense_reference(*t, scale, dy=dy)
    assert rel_error(y, ref["y"]) <= tol, f"y: rel error {rel_error(y, ref['y']):.3e} > {tol:g}"
    if y.requires_grad:
        y.backward(dy)
    for name, leaf in zip(GRAD_NAMES, t):
        if leaf is None:
            continue
        if not leaf.requires_grad:
            assert leaf.grad is None, f"{name} does not require grad but got a gradient"
            continue
        assert leaf.grad is not None, f"d{name} missing"
        assert leaf.grad.dtype == leaf.dtype, f"d{name} dtype {leaf.grad.dtype} != {leaf.dtype}"
        assert leaf.grad.shape == leaf.shape
        err = rel_error(leaf.grad, ref[name])
        assert err <= tol, f"d{name}: rel error {err:.3e} > {tol:g} ({backend}, {dtype})"
    return y


# ------------------------------------------------------------------------------------ the matrix
SHAPES = {
    # name: (leading dims N, n, m, r, k)
    "one_row": (1, 20, 24, 7, 3),
    "zero_rows": (0, 20, 24, 7, 3),
    "3d": ((2, 3), 20, 24, 7, 3),
    "4d_with_zero_dim": ((2, 0, 3), 20, 24, 7, 3),
    "1d_x": ((), 20, 24, 7, 3),
    "odd": (13, 29, 37, 11, 5),
    "k_gt_r": (9, 19, 17, 2, 6),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_forward_and_grads_fp32(backend, shape):
    run_and_check(make_inputs(*SHAPES[shape], requires_grad=TRAINED), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[1])
def test_dtypes(backend, dtype):
    run_and_check(make_inputs(33, 36, 40, 12, 4, dtype, seed=3, requires_grad=TRAINED), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_frozen_factors_get_gradients_when_asked(backend, dtype):
    t = make_inputs((3, 5), 18, 21, 6, 4, dtype, seed=4, requires_grad=GRAD_NAMES)
    run_and_check(t, backend, scale=1.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["no_delta", "no_bias", "no_delta_no_bias", "rank0", "rank0_no_bias",
                                     "scale1", "scale0", "only_x_grad", "only_B_grad", "nothing_requires_grad"])
def test_optional_arguments(backend, variant):
    kw = dict(N=11, n=23, m=19, r=5, k=3)
    grads = TRAINED
    scale = 0.7
    if variant.startswith("rank0"):
        kw["r"] = 0
    if variant == "only_x_grad":
        grads = ("x",)
    if variant == "only_B_grad":
        grads = ("B",)
    if variant == "nothing_requires_grad":
        grads = ()
    if variant == "scale1":
        scale = 1.0
    if variant == "scale0":
        scale = 0.0
    t = make_inputs(**kw, bias="no_bias" not in variant, delta="no_delta" not in variant, seed=5,
                    requires_grad=grads)
    y = run_and_check(t, backend, scale=scale)
    assert y.requires_grad == bool(grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank0_no_delta_is_bias(backend):
    """r = 0 and no delta: y is the bias broadcast over rows (the zero-weight layer)."""
    t = make_inputs((4, 2), 7, 9, 0, 1, delta=False, seed=6, requires_grad=TRAINED)
    y = cersa_linear(t.x, t.U, t.S, t.Vh, bias=t.bias, backend=backend)
    assert torch.equal(y, t.bias.detach().expand(4, 2, 9))
    y.sum().backward()
    assert torch.equal(t.x.grad, torch.zeros_like(t.x))
    assert torch.equal(t.bias.grad, torch.full((9,), 8.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["x_transposed", "x_sliced", "x_expanded", "dy_sliced", "dy_transposed",
                                    "dy_expanded", "factors_transposed"])
def test_non_contiguous(backend, layout):
    N, n, m, r, k = 15, 22, 26, 8, 4
    layouts = {"x_transposed": {"x": "transposed"}, "x_sliced": {"x": "strided"},
               "factors_transposed": dict.fromkeys(("U", "Vh", "A", "B"), "transposed")}.get(layout, {})
    grads = ("S", "A", "B", "bias") + (() if layout == "x_expanded" else ("x",))
    t = make_inputs(N, n, m, r, k, seed=7, layouts=layouts, requires_grad=grads)
    g = torch.Generator().manual_seed(8)
    if layout == "x_expanded":  # an expanded leaf cannot take a gradient in place; use a non-leaf
        base = torch.randn(1, n, generator=g).requires_grad_(True)
        t = t._replace(x=base.expand(N, n))
    else:
        assert t.x.is_contiguous() == (layout.startswith("dy") or layout == "factors_transposed")
    if layout == "factors_transposed":
        assert not any(f.is_contiguous() for f in (t.U, t.Vh, t.A, t.B))
    dy = None
    if layout == "dy_sliced":
        dy = torch.randn(N, 3 * m, generator=g)[:, ::3]
    elif layout == "dy_transposed":
        dy = torch.randn(m, N, generator=g).t()
    elif layout == "dy_expanded":
        dy = torch.randn(1, m, generator=g).expand(N, m)
    if dy is not None:
        assert not dy.is_contiguous()
    y = cersa_linear(*t, 0.7, backend=backend)
    if dy is None:
        dy = torch.randn(y.shape, generator=g)
    ref = dense_reference(*t, 0.7, dy=dy)
    assert rel_error(y, ref["y"]) <= TOL[torch.float32]
    y.backward(dy)
    for name in ("S", "A", "B", "bias"):
        assert rel_error(getattr(t, name).grad, ref[name]) <= TOL[torch.float32], name
    if layout == "x_expanded":
        assert rel_error(base.grad, ref["x"].sum(0, keepdim=True)) <= TOL[torch.float32]
    else:
        assert rel_error(t.x.grad, ref["x"]) <= TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_big_odd_sizes(backend):
    """x (1000, 1001) -> 999 outputs, r = 173, k = 17 (no size a multiple of 16)."""
    t = make_inputs(1000, 1001, 999, 173, 17, seed=9, requires_grad=TRAINED)
    run_and_check(t, backend, scale=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    args = tuple(make_inputs((2, 3), 6, 7, 3, 2, torch.float64, seed=10, requires_grad=GRAD_NAMES))
    assert torch.autograd.gradcheck(lambda *a: cersa_linear(*a, scale=0.6, backend=backend), args)
    args0 = tuple(make_inputs(4, 6, 5, 0, 2, torch.float64, seed=11, requires_grad=GRAD_NAMES))  # rank 0
    assert torch.autograd.gradcheck(lambda *a: cersa_linear(*a, scale=1.5, backend=backend), args0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused(backend):
    """The backward is once_differentiable: a second derivative must raise, never be silently wrong."""
    args = make_inputs(3, 8, 5, 2, 3, torch.float64, seed=12, requires_grad=GRAD_NAMES[:-1])[:-1]  # no bias
    y = cersa_linear(*args, scale=0.7, backend=backend)
    (gx,) = torch.autograd.grad(y.square().sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        gx.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivative_through_saved_inputs_is_refused(backend):
    """Gradients taken with create_graph=True must not be silently incomplete: a penalty on dx
    from y.sum() (dy needs no grad) or autograd.grad of it with respect to U must raise."""
    args = tuple(make_inputs(4, 6, 5, 3, 2, torch.float64, seed=13, requires_grad=GRAD_NAMES))
    y = cersa_linear(*args, scale=0.5, backend=backend)
    (gx,) = torch.autograd.grad(y.sum(), args[0], create_graph=True)  # dy = ones: no grad
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (y.sum() + gx.square().sum()).backward()
    y = cersa_linear(*args, scale=0.5, backend=backend)
    (gx,) = torch.autograd.grad(y.square().sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(gx.square().sum(), args[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_first_derivatives_are_exact(backend):
    args = tuple(make_inputs(4, 6, 5, 3, 2, torch.float64, seed=15, requires_grad=GRAD_NAMES))
    g1 = torch.autograd.grad(cersa_linear(*args, scale=0.5, backend=backend).square().sum(), args,
                             create_graph=True)
    g0 = torch.autograd.grad(cersa_linear(*args, scale=0.5, backend=backend).square().sum(), args)
    for a, b in zip(g1, g0):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_is_refused_not_zero(backend):
    """No jvp is implemented: a dual input or torch.func.jvp raises rather than dropping the tangent."""
    import torch.autograd.forward_ad as fwAD

    args = list(make_inputs(4, 6, 5, 3, 2, torch.float64, seed=16))
    with fwAD.dual_level():
        dual = fwAD.make_dual(args[0], torch.randn_like(args[0]))
        with pytest.raises((RuntimeError, NotImplementedError), match="jvp"):
            cersa_linear(dual, *args[1:], scale=0.5, backend=backend)
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.jvp(lambda v: cersa_linear(v, *args[1:], scale=0.5, backend=backend),
                       (args[0],), (args[0],))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()], ids=["2d", "3d", "1d"])
def test_zero_in_features(backend, lead):
    """in_features n = 0: y is the bias (or zeros), dx is empty, for 1-D, 2-D and 3-D x."""
    x, U, S, Vh, _, _, bias = make_inputs(lead, 0, 4, 2, delta=False, requires_grad=("x",))
    y = cersa_linear(x, U, S, Vh, bias=bias, backend=backend)
    assert y.shape == (*lead, 4)
    assert torch.equal(y, bias.expand(*lead, 4))
    y.sum().backward()
    assert x.grad.shape == x.shape


# ---------------------------------------------------------------------------- dtype rules, autocast
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ac_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_output_dtype_and_grads(backend, ac_dtype):
    t = make_inputs((2, 5), 14, 18, 6, 3, torch.float32, seed=14, requires_grad=GRAD_NAMES)
    with torch.autocast("cpu", dtype=ac_dtype):
        y = cersa_linear(*t, 0.7, backend=backend)
    assert y.dtype == ac_dtype
    # reference from the inputs rounded to the autocast dtype, as the op computes them
    rounded = [v.detach().to(ac_dtype) for v in t]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(ac_dtype)
    ref = dense_reference(*rounded, scale=0.7, dy=dy)
    assert rel_error(y, ref["y"]) <= TOL[ac_dtype]
    y.backward(dy)
    for name, leaf in zip(GRAD_NAMES, t):
        assert leaf.grad.dtype == torch.float32, f"d{name} should come back in the leaf's dtype"
        assert rel_error(leaf.grad, ref[name]) <= TOL[ac_dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_disabled_inside_does_not_cast(backend):
    t = make_inputs(4, 5, 6, 2, 2, torch.float32, seed=15)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        y = cersa_linear(*t, backend=backend)
    assert y.dtype == torch.float32


# ------------------------------------------------------------------------------ memory-lean saving
class _Saved:
    """Records the shape of every tensor autograd saves for backward."""

    def __init__(self):
        self.shapes = []

    def pack(self, t):
        self.shapes.append(tuple(t.shape))
        return t

    @staticmethod
    def unpack(t):
        return t


class _OpShapes(TorchDispatchMode):
    """Records every aten/custom op called and the shapes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.ops, self.out_shapes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor):
                self.out_shapes.append(tuple(o.shape))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train_S", [False, True], ids=["S_frozen", "S_trained"])
def test_saves_only_x_and_hk(backend, train_S):
    N, n, m, r, k = 11, 20, 24, 7, 3
    grads = ("x", "A", "B", "bias") + (("S",) if train_S else ())
    t = make_inputs(N, n, m, r, k, seed=16, requires_grad=grads)
    rec = _Saved()
    with torch.autograd.graph.saved_tensors_hooks(rec.pack, rec.unpack):
        y = cersa_linear(*t, scale=0.7, backend=backend)
    assert (m, n) not in rec.shapes, f"an (m, n) tensor was saved: {rec.shapes}"
    assert ((N, r) in rec.shapes) == train_S, f"(N, r) saved iff S trains; saved {rec.shapes}"
    activations = [s for s in rec.shapes if s and s[0] == N]
    assert sorted(activations) == sorted([(N, n), (N, k)] + ([(N, r)] if train_S else [])), rec.shapes
    y.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_dense_weight_and_no_concat(backend):
    """Neither forward nor backward makes an (m, n) tensor or concatenates factors."""
    N, n, m, r, k = 11, 20, 24, 7, 3
    t = make_inputs(N, n, m, r, k, seed=17, requires_grad=GRAD_NAMES)
    mode = _OpShapes()
    with mode:
        y = cersa_linear(*t, scale=0.7, backend=backend)
        y.backward(torch.ones_like(y))
    assert mode.ops, "the dispatch mode saw no op (the test would be vacuous)"
    assert (m, n) not in mode.out_shapes and (n, m) not in mode.out_shapes, mode.ops
    assert not any("cat" in op for op in mode.ops), mode.ops


# ---------------------------------------------------------------------------------- backend choice
def test_available_backends_contract():
    assert "reference" in cersa_kernels.available_backends("cpu")
    assert cersa_kernels.available_backends("cpu") == cersa_kernels.available_backends("cpu")
    assert set(cersa_kernels.available_backends()) >= {"reference"}


def test_default_backend_matches_named(monkeypatch):
    monkeypatch.delenv("CERSA_BACKEND", raising=False)
    args = list(make_inputs(5, 8, 9, 3, 2, seed=18))
    y_default = cersa_linear(*args, scale=0.7)
    from cersa_kernels.backends import default_backend
    y_named = cersa_linear(*args, scale=0.7, backend=default_backend("cpu"))
    assert torch.equal(y_default, y_named)


def test_meta_tensors_give_shapes():
    meta = [None if v is None else v.to("meta") for v in make_inputs((2, 3), 8, 9, 3, 2, seed=19)]
    y = cersa_linear(*meta)
    assert y.device.type == "meta" and y.shape == (2, 3, 9)


# ------------------------------------------------------------------------------------ bad inputs
def _bad(case):
    t = make_inputs(4, 5, 6, 3, 2, seed=20)._asdict()
    kw = {"scale": 0.5, "backend": None}
    if case == "x_last_dim":
        t["x"] = torch.randn(4, 7)
    elif case == "x_0d":
        t["x"] = torch.tensor(1.0)
    elif case == "x_int":
        t["x"] = torch.ones(4, 5, dtype=torch.int64)
    elif case == "x_list":
        t["x"] = [[1.0] * 5] * 4
    elif case == "U_1d":
        t["U"] = torch.randn(6)
    elif case == "S_shape":
        t["S"] = torch.randn(4)
    elif case == "S_2d":
        t["S"] = torch.randn(3, 1)
    elif case == "Vh_shape":
        t["Vh"] = torch.randn(2, 5)
    elif case == "A_without_B":
        t["B"] = None
    elif case == "B_without_A":
        t["A"] = None
    elif case == "A_shape":
        t["A"] = torch.randn(2, 4)
    elif case == "B_shape":
        t["B"] = torch.randn(6, 3)
    elif case == "bias_shape":
        t["bias"] = torch.randn(5)
    elif case == "U_dtype":
        t["U"] = t["U"].double()
    elif case == "bias_dtype":
        t["bias"] = t["bias"].half()
    elif case == "U_device":
        t["U"] = t["U"].to("meta")
    elif case == "scale_nan":
        kw["scale"] = float("nan")
    elif case == "scale_tensor":
        kw["scale"] = torch.tensor(0.5)
    elif case == "scale_bool":
        kw["scale"] = True
    elif case == "backend_unknown":
        kw["backend"] = "fortran"
    elif case == "backend_not_str":
        kw["backend"] = 3
    elif case == "backend_cuda_on_cpu":
        kw["backend"] = "cuda"
    return t, kw


BAD = {
    # case: (exception, regex the message must match: the argument, and expected/received value)
    "x_last_dim": (ValueError, r"^x: .*5.*\(4, 7\)"),
    "x_0d": (ValueError, r"^x: "),
    "x_int": (TypeError, r"^x: .*int64"),
    "x_list": (TypeError, r"^x: .*Tensor.*list"),
    "U_1d": (ValueError, r"^U: .*2-D.*\(6,\)"),
    "S_shape": (ValueError, r"^S: .*\(3,\).*\(4,\)"),
    "S_2d": (ValueError, r"^S: .*1-D.*\(3, 1\)"),
    "Vh_shape": (ValueError, r"^Vh: .*\(3, 5\).*\(2, 5\)"),
    "A_without_B": (ValueError, r"A and B"),
    "B_without_A": (ValueError, r"A and B"),
    "A_shape": (ValueError, r"^A: .*\(2, 5\).*\(2, 4\)"),
    "B_shape": (ValueError, r"^B: .*\(6, 2\).*\(6, 3\)"),
    "bias_shape": (ValueError, r"^bias: .*\(6,\).*\(5,\)"),
    "U_dtype": (TypeError, r"^U: .*float32.*float64"),
    "bias_dtype": (TypeError, r"^bias: .*float32.*float16"),
    "U_device": (ValueError, r"^U: .*cpu.*meta"),
    "scale_nan": (TypeError, r"^scale: .*nan"),
    "scale_tensor": (TypeError, r"^scale: .*Tensor"),
    "scale_bool": (TypeError, r"^scale: "),
    "backend_unknown": (ValueError, r"^backend: .*fortran"),
    "backend_not_str": (TypeError, r"^backend: "),
    "backend_cuda_on_cpu": (RuntimeError, r"backend.*cuda.*cpu"),
}


@pytest.mark.parametrize("case,exc,pattern", [pytest.param(case, *spec, id=case) for case, spec in BAD.items()])
def test_bad_inputs_raise_naming_the_argument(case, exc, pattern):
    t, kw = _bad(case)
    with pytest.raises(exc, match=pattern):
        cersa_linear(t["x"], t["U"], t["S"], t["Vh"], t["A"], t["B"], t["bias"], **kw)


def test_cersa_backend_env_override(monkeypatch):
    monkeypatch.setenv("CERSA_BACKEND", "fortran")
    from cersa_kernels.backends import default_backend
    assert default_backend("cpu") == "fortran"
    with pytest.raises(ValueError, match=r"^CERSA_BACKEND: .*fortran"):
        cersa_linear(*make_inputs(3, 5, 4, 2, 1, seed=21))
