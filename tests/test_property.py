"""Property-based tests of ``cersa_linear``, with hypothesis.

Random sizes m, n, frozen rank r, delta rank k (including 0 and 1, and no delta at all), leading
dimensions of x (none to three, each possibly 0 or 1), dtypes (fp64, fp32, fp16, bf16), memory
layouts of every tensor and of the incoming gradient (contiguous, transposed storage, a stride-2
slice, a stride-0 broadcast for dy), which tensors require grad, the scale, and every CPU backend
(conftest.cpu_backends, the interpreted Triton included): forward and every requested gradient agree with the
float64 dense reference computed from the same (already rounded) tensors, within the per-dtype
bound of tests/conftest.py (TOL; the derivation is there).  The bound is relative to the size of the
terms summed, not of the result: max|out - ref| <= TOL * max(ref_abs), where ref_abs is the same
reference computed from |x|, |U|, ... , |scale|, |dy| (the standard floating-point error bound of a
sum of products).  A plain max|ref| would fail, falsely, on results that cancel (a bf16 y of one
entry made of 9 terms of mixed sign), which hypothesis finds at once.  At least 200 examples a run.
"""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cersa_kernels import cersa_linear  # noqa: E402

from conftest import GRAD_NAMES, LAYOUTS, cpu_backends, make_inputs  # noqa: E402

BACKENDS = cpu_backends(include_interpreted_triton=True)
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
EXAMPLES = int(__import__("os").environ.get("CERSA_HYP_EXAMPLES", "240"))


@st.composite
def cases(draw):
    size = st.one_of(st.sampled_from([0, 1]), st.integers(2, 37))
    pos = st.one_of(st.just(1), st.integers(2, 37))
    c = {
        "backend": draw(st.sampled_from(BACKENDS)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "m": draw(pos),
        "n": draw(pos),
        "lead": tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 5]), min_size=0, max_size=3))),
        "k": draw(st.one_of(st.none(), st.sampled_from([0, 1]), st.integers(2, 9))),
        "bias": draw(st.booleans()),
        "scale": draw(st.sampled_from([1.0, 0.0, 0.5, -1.25, 2.0])),
        "layouts": {n: draw(st.sampled_from(LAYOUTS)) for n in GRAD_NAMES},
        "dy": draw(st.sampled_from(["contiguous", "transposed", "broadcast"])),
        "grads": {n: draw(st.booleans()) for n in GRAD_NAMES},
        "seed": draw(st.integers(0, 2**31 - 1)),
    }
    c["r"] = draw(st.integers(0, min(c["m"], c["n"])))
    if not c["lead"] and draw(st.booleans()):
        c["lead"] = (draw(size),)  # a plain 2-D x is the common case
    if c["lead"] == () and c["layouts"]["x"] == "transposed":
        c["layouts"]["x"] = "contiguous"  # a 1-D x has no transposed storage
    return c


def _build(c):
    """The case's inputs (N(0, 1) values, S = |N(0, 1)| + 0.1, in the case's layouts) as a dict, and the
    generator they were drawn from (dy is drawn from it next)."""
    gen = torch.Generator().manual_seed(c["seed"])
    t = make_inputs(c["lead"], c["n"], c["m"], c["r"], c["k"] or 0, c["dtype"], delta=c["k"] is not None,
                    bias=c["bias"], generator=gen, fan_scaled=False, spectrum="half-normal", layouts=c["layouts"],
                    requires_grad=[name for name, on in c["grads"].items() if on])
    return t._asdict(), gen


@settings(max_examples=EXAMPLES, deadline=None, derandomize=False, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(c=cases())
def test_matches_float64_reference(c, dense_reference, tol):
    t, gen = _build(c)
    args = [t[name] for name in GRAD_NAMES]
    y = cersa_linear(*args, scale=c["scale"], backend=c["backend"])
    assert y.shape == (*c["lead"], c["m"]) and y.dtype == c["dtype"]
    shape = tuple(y.shape)
    if c["dy"] == "transposed" and len(shape) >= 2:
        dy = torch.randn(*reversed(shape), generator=gen, dtype=torch.float64).to(c["dtype"])
        dy = dy.permute(*reversed(range(len(shape))))
    elif c["dy"] == "broadcast":  # what y.sum().backward() sends: one value, stride 0
        dy = torch.randn((), generator=gen, dtype=torch.float64).to(c["dtype"]).expand(shape)
    else:
        dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(c["dtype"])
    ref = dense_reference(*args, scale=c["scale"], dy=dy)
    mag = dense_reference(*(None if a is None else a.detach().abs() for a in args), scale=abs(c["scale"]),
                          dy=dy.abs())
    bound = tol[c["dtype"]]
    err = _err(y, ref["y"], mag["y"])
    assert err <= bound, f"y: error {err:.3g} (relative to the terms' size) > {bound:g}"
    wanted = [name for name in GRAD_NAMES if t[name] is not None and t[name].requires_grad]
    if not wanted:
        assert not y.requires_grad
        return
    grads = torch.autograd.grad(y, [t[name] for name in wanted], dy, allow_unused=True)
    for name, g in zip(wanted, grads):
        assert g is not None, f"{name}: no gradient"
        assert g.shape == t[name].shape and g.dtype == t[name].dtype, name
        err = _err(g, ref[name], mag[name])
        assert err <= bound, f"d{name}: error {err:.3g} (relative to the terms' size) > {bound:g}"


def _err(out, ref, mag):
    """max|out - ref| / max|mag| in float64 (0 for empty tensors, the absolute error if mag is 0)."""
    assert tuple(out.shape) == tuple(ref.shape)
    if out.numel() == 0:
        return 0.0
    diff = float((out.detach().double() - ref).abs().max())
    scale = float(mag.abs().max())
    return diff / scale if scale > 0 else diff


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend is not available here "
                    "(needs a GPU or TRITON_INTERPRET=1 before triton is imported)")
def test_triton_strided_bias():
    torch.manual_seed(0)
    x, U, S, Vh = torch.randn(3, 4), torch.randn(5, 2), torch.rand(2) + 0.1, torch.randn(2, 4)
    bias = torch.randn(10)[::2]
    y = cersa_linear(x, U, S, Vh, bias=bias, backend="triton")
    ref = cersa_linear(x, U, S, Vh, bias=bias.contiguous(), backend="reference")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
