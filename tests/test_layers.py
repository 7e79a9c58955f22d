"""Tests of cersa_kernels.CersaLinear (cersa_kernels/layers/linear.py).

References: numpy/torch float64 SVD of the same weight (the rank-r truncation W_r), and the layer's
own definition y = x (U diag(S) Vh + s B A)^T + bias evaluated densely in float64.
"""
from __future__ import annotations

import copy
import io
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from cersa_kernels import CersaLinear

from conftest import TOL, cpu_backends, make_inputs, rel_error
from helpers import spectrum_matrix

# Small SVDs: one thread is as fast and avoids spin-waiting on a busy CI machine (conftest).
pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = cpu_backends(include_interpreted_triton=False)


def decaying_linear(n_in=48, n_out=40, seed=0, dtype=torch.float32, bias=True):
    """An nn.Linear whose weight has a decaying, well separated spectrum (so energy ranks are stable)."""
    g = torch.Generator().manual_seed(seed)
    sig = 10.0 * 0.85 ** torch.arange(min(n_in, n_out), dtype=torch.float64)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(spectrum_matrix(n_out, n_in, sig, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=g))
    return lin.to(dtype)


def truncation64(W: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def loop_rank(W: torch.Tensor, tau: float) -> int:
    s2 = np.linalg.svd(W.detach().double().numpy(), compute_uv=False) ** 2
    c = np.cumsum(s2)
    return int(np.argmax(c >= tau * c[-1]) + 1) if c[-1] > 0 else 0


def dense_of(layer: CersaLinear) -> torch.Tensor:
    """U diag(S) Vh + s B A in float64 from the layer's tensors."""
    U, S, Vh, A, B = (t.detach().double() for t in (layer.U, layer.S, layer.Vh, layer.A, layer.B))
    return (U * S) @ Vh + layer.scale * (B @ A)


#: The leading dimensions of the layers' inputs (3-D x).
LEAD = (5, 3)


# ------------------------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("init", ["principal", "lora"])
@pytest.mark.parametrize("tau", [0.5, 0.9, 0.99, 1.0])
def test_init_reproduces_rank_r_truncation(init, tau):
    lin = decaying_linear()
    layer = CersaLinear.from_linear(lin, energy=tau, delta_rank=4, init=init)
    r = loop_rank(lin.weight, tau)
    assert layer.rank == r
    Wr = truncation64(lin.weight, r)
    assert rel_error(dense_of(layer), Wr) <= 1e-5
    x = make_inputs(LEAD, 48).x
    y = layer(x)
    ref = x.double() @ Wr.t() + lin.bias.detach().double()
    assert y.shape == (5, 3, 40) and y.dtype == torch.float32
    assert rel_error(y, ref) <= TOL[torch.float32]
    s = np.linalg.svd(lin.weight.detach().double().numpy(), compute_uv=False)
    assert math.isclose(layer.energy, float((s[:r] ** 2).sum() / (s ** 2).sum()), rel_tol=1e-6)
    assert layer.energy >= tau - 1e-12


def test_principal_moves_top_components():
    lin = decaying_linear()
    k = 5
    layer = CersaLinear.from_linear(lin, energy=0.99, delta_rank=k, init="principal", split_scale=1.0)
    r = layer.rank
    U64, S64, Vh64 = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
    A, B = layer.A.detach().double(), layer.B.detach().double()
    assert layer.scale == 1.0 and layer.frozen_rank == r - k and layer.delta_rank == k
    # B A is the top-k part, and A = sqrt(S_k) Vh_k, B = U_k sqrt(S_k) up to the sign of each pair
    top = (U64[:, :k] * S64[:k]) @ Vh64[:k]
    assert rel_error(B @ A, top) <= 1e-5
    assert torch.allclose(A @ A.t(), torch.diag(S64[:k]), atol=1e-5 * float(S64[0]))
    assert torch.allclose(B.t() @ B, torch.diag(S64[:k]), atol=1e-5 * float(S64[0]))
    signs = torch.sign((A * Vh64[:k]).sum(1))
    assert torch.allclose(A, signs[:, None] * S64[:k].sqrt()[:, None] * Vh64[:k], atol=1e-5)
    assert torch.allclose(B, U64[:, :k] * (signs * S64[:k].sqrt())[None, :], atol=1e-5)
    # the frozen factors keep components k .. r-1
    np.testing.assert_allclose(layer.S.detach().double().numpy(), S64[k:r].numpy(), rtol=1e-5)


def test_principal_with_delta_rank_above_rank():
    """k > r: all r components move, the extra delta rows start as LoRA (B columns zero)."""
    lin = decaying_linear()
    layer = CersaLinear.from_linear(lin, rank=3, energy=None, delta_rank=8, init="principal")
    assert layer.rank == 3 and layer.frozen_rank == 0 and layer.U.shape == (40, 0)
    assert torch.count_nonzero(layer.B[:, 3:]) == 0
    assert torch.count_nonzero(layer.A[3:]) > 0
    assert rel_error(dense_of(layer), truncation64(lin.weight, 3)) <= 1e-5


def test_lora_init():
    lin = decaying_linear()
    layer = CersaLinear.from_linear(lin, energy=0.9, delta_rank=6, init="lora", alpha=12)
    assert layer.scale == 2.0
    assert layer.frozen_rank == layer.rank == loop_rank(lin.weight, 0.9)
    assert torch.count_nonzero(layer.B) == 0
    bound = 1.0 / math.sqrt(48)  # kaiming_uniform(a=sqrt(5)) on fan_in 48
    A = layer.A.detach()
    assert float(A.abs().max()) <= bound + 1e-7 and float(A.std()) > 0.2 * bound
    s = np.linalg.svd(lin.weight.detach().double().numpy(), compute_uv=False)
    np.testing.assert_allclose(layer.S.detach().double().numpy(), s[:layer.rank], rtol=1e-5)


def test_requires_grad_flags():
    lin = decaying_linear()
    layer = CersaLinear.from_linear(lin, energy=0.9, delta_rank=4)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"A", "B"}
    layer = CersaLinear.from_linear(lin, energy=0.9, delta_rank=4, train_S=True, train_bias=True)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"A", "B", "S", "bias"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_forward_backward_matches_dense(backend):
    lin = decaying_linear()
    layer = CersaLinear.from_linear(lin, energy=0.95, delta_rank=4, init="lora", alpha=8, train_S=True,
                                    train_bias=True, backend=backend)
    with torch.no_grad():
        layer.B.normal_()
    x = make_inputs(LEAD, 48, requires_grad=("x",)).x
    y = layer(x)
    W = dense_of(layer).requires_grad_(True)
    b = layer.bias.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    ref = x64 @ W.t() + b
    assert rel_error(y, ref) <= TOL[torch.float32]
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy.double())
    assert rel_error(x.grad, x64.grad) <= TOL[torch.float32]
    assert rel_error(layer.bias.grad, b.grad) <= TOL[torch.float32]
    # dA = s B^T dW, dB = s dW A^T, dS = diag(U^T dW Vh^T) for the dense weight gradient dW
    dW = W.grad
    A, B = layer.A.detach().double(), layer.B.detach().double()
    assert rel_error(layer.A.grad, layer.scale * B.t() @ dW) <= TOL[torch.float32]
    assert rel_error(layer.B.grad, layer.scale * dW @ A.t()) <= TOL[torch.float32]
    dS = torch.diag(layer.U.detach().double().t() @ dW @ layer.Vh.detach().double().t())
    assert rel_error(layer.S.grad, dS) <= TOL[torch.float32]
    assert layer.U.grad is None and layer.Vh.grad is None


# ----------------------------------------------------------------------------- special weights
@pytest.mark.parametrize("tau", [1e-6, 0.5, 0.93, 1.0])
def test_rank_one_weight(tau):
    lin = nn.Linear(9, 7)
    with torch.no_grad():
        lin.weight.copy_(torch.outer(torch.tensor([1.0, -2, 3, 0.5, 4, -1, 2]),
                                     torch.tensor([2.0, 1, -0.5, 3, -4, 1, 0.25, 8, -2])))
    layer = CersaLinear.from_linear(lin, energy=tau, delta_rank=2)
    assert layer.rank == 1
    x = make_inputs(LEAD, 9).x
    assert rel_error(layer(x), lin(x)) <= TOL[torch.float32]


@pytest.mark.parametrize("init", ["principal", "lora"])
def test_all_zero_weight_layer_works(init):
    lin = nn.Linear(12, 10)
    with torch.no_grad():
        lin.weight.zero_()
    layer = CersaLinear.from_linear(lin, energy=0.93, delta_rank=3, init=init)
    assert layer.rank == 0 and layer.frozen_rank == 0 and layer.energy == 0.0
    x = make_inputs(LEAD, 12, requires_grad=("x",)).x
    y = layer(x)
    assert torch.equal(y, lin.bias.detach().expand_as(y))  # B = 0 at init: output = bias
    with torch.no_grad():
        layer.B.normal_()
    y = layer(x)
    ref = x.detach().double() @ (layer.scale * layer.B.detach().double() @ layer.A.detach().double()).t() \
        + lin.bias.detach().double()
    assert rel_error(y, ref) <= TOL[torch.float32]
    y.sum().backward()
    assert layer.A.grad is not None and layer.B.grad is not None and x.grad is not None
    merged = layer.merge()
    assert rel_error(merged(x), ref) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_weights(dtype):
    lin = decaying_linear(dtype=dtype)
    layer = CersaLinear.from_linear(lin, energy=1.0, delta_rank=4)
    for name, p in layer.named_parameters():
        assert p.dtype == dtype, name
    x = make_inputs(LEAD, 48, dtype=dtype).x
    y = layer(x)
    assert y.dtype == dtype
    ref = x.double() @ lin.weight.detach().double().t() + lin.bias.detach().double()
    assert rel_error(y, ref) <= TOL[dtype]


def test_huge_fp16_weight_does_not_overflow():
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(48, 64).half()
    with torch.no_grad():
        lin.weight.copy_((torch.rand(64, 48, generator=g) * 2 - 1) * 60000)
        lin.bias.zero_()
    for init in ("principal", "lora"):
        layer = CersaLinear.from_linear(lin, energy=1.0, delta_rank=2, init=init)
        for name, p in layer.named_parameters():
            assert torch.isfinite(p).all(), f"{init}: {name} overflowed fp16"
        W = layer.merged_weight(torch.float32)
        assert torch.isfinite(W).all()
        assert rel_error(W, lin.weight.float()) <= TOL[torch.float16]
        x = (torch.randn(4, 48, generator=g) * 1e-3).half()
        ref = x.double() @ lin.weight.detach().double().t()
        assert rel_error(layer(x), ref) <= TOL[torch.float16]


# ------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("bias", [True, False])
def test_merge_gives_equal_linear(bias):
    lin = decaying_linear(bias=bias)
    layer = CersaLinear.from_linear(lin, energy=0.9, delta_rank=4, init="lora", alpha=2)
    with torch.no_grad():
        layer.B.normal_()
    merged = layer.merge()
    assert type(merged) is nn.Linear
    assert (merged.in_features, merged.out_features) == (48, 40) and (merged.bias is None) == (not bias)
    assert rel_error(merged.weight, dense_of(layer)) <= 1e-6
    x = make_inputs(LEAD, 48).x
    assert rel_error(merged(x), layer(x).double()) <= TOL[torch.float32]
    if bias:
        assert torch.equal(merged.bias, layer.bias)


def test_merge_fp16_is_rounded_once():
    lin = decaying_linear(dtype=torch.float16)
    layer = CersaLinear.from_linear(lin, energy=0.9, delta_rank=4, init="lora", alpha=4)
    with torch.no_grad():
        layer.B.normal_()
    merged = layer.merge()
    assert merged.weight.dtype == torch.float16
    exact = dense_of(layer)  # float64
    once = exact.half()
    diff = (merged.weight.double() - once.double()).abs()
    ulp = (once.double().abs() * 2.0 ** -10).clamp_min(2.0 ** -24)
    assert bool((diff <= ulp + 1e-12).all()), "merged fp16 weight is more than 1 ulp off the exact product"
    assert float((diff > 0).double().mean()) < 0.01


# --------------------------------------------------------------------------- dtype/device, copies
def test_to_half_double_follow_every_tensor():
    layer = CersaLinear.from_linear(decaying_linear(), energy=0.9, delta_rank=4, train_S=True)
    flags = {n: p.requires_grad for n, p in layer.named_parameters()}
    for conv, dtype in ((lambda m: m.half(), torch.float16), (lambda m: m.double(), torch.float64),
                        (lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.float(), torch.float32)):
        layer = conv(layer)
        for n, p in layer.named_parameters():
            assert p.dtype == dtype, n
            assert p.requires_grad == flags[n], n
        assert layer(make_inputs(LEAD, 48, dtype=dtype).x).dtype == dtype


def test_mixed_dtype_input_is_cast():
    """A bf16 layer fed fp32 input computes in fp32 (output = x's dtype), grads in bf16."""
    layer = CersaLinear.from_linear(decaying_linear(), energy=0.9, delta_rank=4).to(torch.bfloat16)
    x = make_inputs(LEAD, 48).x
    y = layer(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert layer.A.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = CersaLinear.from_linear(decaying_linear(), energy=0.9, delta_rank=4)(x)
    assert y2.dtype == torch.bfloat16


def _same_layer(a: CersaLinear, b: CersaLinear):
    assert type(a) is type(b)
    for attr in ("in_features", "out_features", "rank", "frozen_rank", "delta_rank", "scale", "init", "backend"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert a.energy == b.energy or (math.isnan(a.energy) and math.isnan(b.energy))
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n], pb[n]) and pa[n].dtype == pb[n].dtype, n
        assert pa[n].requires_grad == pb[n].requires_grad, n
    x = make_inputs(LEAD, a.in_features).x
    assert torch.equal(a(x), b(x))


def test_deepcopy_pickle_and_state_dict_round_trip():
    layer = CersaLinear.from_linear(decaying_linear(), energy=0.9, delta_rank=4, init="lora", alpha=8,
                                    train_S=True)
    with torch.no_grad():
        layer.B.normal_()
    _same_layer(layer, copy.deepcopy(layer))
    _same_layer(layer, pickle.loads(pickle.dumps(layer)))
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    _same_layer(layer, torch.load(buf, weights_only=False))
    empty = CersaLinear.from_config(layer.cersa_config())
    missing, unexpected = empty.load_state_dict(layer.state_dict(), strict=True)
    assert not missing and not unexpected
    _same_layer(layer, empty)
    assert set(layer.state_dict()) == {"U", "S", "Vh", "A", "B", "bias"}


def test_state_dict_into_wrong_rank_fails():
    layer = CersaLinear.from_linear(decaying_linear(), energy=0.9, delta_rank=4)
    other = CersaLinear.from_linear(decaying_linear(), energy=0.5, delta_rank=4)
    assert other.frozen_rank != layer.frozen_rank
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(layer.state_dict())


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,exc,pattern", [
    ({"delta_rank": 0}, ValueError, r"^delta_rank.*0"),
    ({"delta_rank": -2}, ValueError, r"^delta_rank"),
    ({"delta_rank": 2.0}, TypeError, r"^delta_rank"),
    ({"delta_rank": True}, TypeError, r"^delta_rank"),
    ({"init": "pissa"}, ValueError, r"^init: .*pissa"),
    ({"init": "principal", "alpha": 32}, ValueError, r"^alpha"),
    ({"init": "lora", "alpha": float("nan")}, TypeError, r"^alpha"),
    ({"energy": 0.0}, ValueError, r"energy"),
    ({"energy": 1.5}, ValueError, r"energy"),
    ({"energy": None, "rank": 41}, ValueError, r"rank"),
    ({"energy": 0.9, "rank": 4}, ValueError, r"exactly one"),
])
def test_bad_arguments(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        CersaLinear.from_linear(decaying_linear(), **kw)


def test_not_a_linear():
    with pytest.raises(TypeError, match=r"^linear: .*Conv2d"):
        CersaLinear.from_linear(nn.Conv2d(3, 4, 3))


@pytest.mark.parametrize("case,exc,pattern", [
    ("nan", ValueError, r"^enc\.q\.weight: .*non-finite"),
    ("empty", ValueError, r"^enc\.q\.weight: .*empty"),
    ("meta", ValueError, r"^enc\.q\.weight: .*meta"),
    ("int", TypeError, r"^enc\.q\.weight: .*floating"),
])
def test_unusable_weight_names_the_layer(case, exc, pattern):
    if case == "empty":
        lin = nn.Linear(0, 4)
    elif case == "meta":
        lin = nn.Linear(6, 4, device="meta")
    else:
        lin = nn.Linear(6, 4)
        if case == "nan":
            with torch.no_grad():
                lin.weight[1, 2] = float("nan")
        else:
            lin.weight = nn.Parameter(torch.ones(4, 6, dtype=torch.int64), requires_grad=False)
    with pytest.raises(exc, match=pattern):
        CersaLinear.from_linear(lin, energy=0.9, name="enc.q")


def test_repr_mentions_ranks():
    layer = CersaLinear.from_linear(decaying_linear(), energy=0.9, delta_rank=4)
    text = repr(layer)
    assert f"rank={layer.rank}" in text and f"frozen_rank={layer.frozen_rank}" in text and "delta_rank=4" in text
