"""Tests of the delta inits of CERSA layers (``CersaLayer.from_factors``, cersa_kernels/layers/base.py)
and of their options in ``CersaConfig`` (cersa_kernels/config.py).

Every init must make the layer compute, at init, exactly the matrix it promises (docs/design.md
"Initialisation"): the rank-r truncation U_r diag(S_r) Vh_r for "principal" and "lora", the
truncation plus the next e = min(k, available) singular components of W for "residual".  The
reference is the float64 SVD of fresh random matrices (odd shapes, r = 0, r < k, r > k, zero
singular values); the layer is built in float64 and compared with a float64 dense evaluation.
Quantized layers are compared with their dequantized frozen factors (the codes themselves are
tested in tests/test_quant.py).
"""
from __future__ import annotations

import math

import pytest
import torch

from cersa_kernels import CersaLinear
from cersa_kernels.config import INITS, QUANT_INITS, SPLIT_INITS, CersaConfig
from cersa_kernels.layers.base import AUTO_LORA_SCALE

from conftest import TOL, rel_error

# Small SVDs: one thread is as fast and avoids spin-waiting on a busy CI machine (conftest).
pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
#: (out_features m, in_features n) including a single row / column and sizes that are no multiple of 16.
SHAPES = [(30, 20), (1, 7), (7, 1), (17, 33)]


def random_svd(m, n, seed, zeros=0):
    """A random (m, n) float64 matrix (with ``zeros`` trailing zero singular values) and its SVD."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=F64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    if zeros:
        S = S.clone()
        S[S.numel() - zeros:] = 0.0
        W = (U * S) @ Vh
    return W, U, S, Vh


def part(U, S, Vh, lo, hi):
    """The matrix of the singular components [lo, hi)."""
    return (U[:, lo:hi] * S[lo:hi]) @ Vh[lo:hi]


def dense(layer):
    """U diag(S) Vh + s B A of the layer, densely in float64 (the dequantized factors when quantized)."""
    U, S, Vh = layer.dequantized_factors(F64)
    return (U * S) @ Vh + layer.scale * (layer.B.detach().double() @ layer.A.detach().double())


def build(U, S, Vh, r, k, init, **options):
    q = U.shape[1]
    return CersaLinear.from_factors(U[:, :q], S[:q], Vh[:q], truncation_rank=r, init=init, delta_rank=k,
                                    dtype=F64, **options)


def cases():
    for m, n in SHAPES:
        p = min(m, n)
        for r in sorted({0, min(1, p), p // 2, p}):
            for k in (1, 3, 8):
                yield m, n, r, k


# ------------------------------------------------------------------------ function at init, every init
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("m,n,r,k", list(cases()))
def test_function_at_init_is_the_intended_matrix(init, m, n, r, k):
    W, U, S, Vh = random_svd(m, n, seed=m * 100 + n + r + k)
    p = min(m, n)
    e = min(k, p - r) if init == "residual" else 0
    q = r + e
    torch.manual_seed(0)
    layer = build(U[:, :q], S[:q], Vh[:q], r, k, init)
    intended = part(U, S, Vh, 0, r + e)
    assert rel_error(dense(layer), intended) <= TOL[F64] or float(intended.abs().max()) == 0.0
    assert float((dense(layer) - intended).abs().max()) <= 1e-12 * max(1.0, float(S[0]))
    assert layer.rank == r and layer.delta_rank == k
    assert layer.A.shape == (k, n) and layer.B.shape == (m, k)
    moved = min(k, r) if init == "principal" else e
    assert layer.frozen_rank == r - (moved if init == "principal" else 0)
    # forward on a 3-D input against the float64 map of the intended matrix
    x = torch.randn(2, 3, n, dtype=F64)
    ref = x @ intended.t() + layer.bias.detach() if layer.bias is not None else x @ intended.t()
    assert rel_error(layer(x), ref) <= TOL[F64] or float(ref.abs().max()) == 0.0


@pytest.mark.parametrize("init", SPLIT_INITS)
def test_split_factors_are_balanced_and_scaled(init):
    """A = sqrt(S / c) Vh, B = U sqrt(S / c), scale c, for the moved components; the other rows of A
    are Kaiming-uniform / c with zero columns of B."""
    m, n, r, k = 26, 19, 6, 4
    _, U, S, Vh = random_svd(m, n, seed=3)
    lo = 0 if init == "principal" else r
    moved = slice(lo, lo + k)
    for c in (1.0, 0.05, 7.0):
        layer = build(U[:, :r + k], S[:r + k], Vh[:r + k], r, k, init, split_scale=c)
        A, B = layer.A.detach(), layer.B.detach()
        assert layer.scale == c
        root = (S[moved] / c).sqrt()
        signs = torch.sign((A * Vh[moved]).sum(1))
        assert torch.allclose(A, signs[:, None] * root[:, None] * Vh[moved], atol=1e-12)
        assert torch.allclose(B, U[:, moved] * (signs * root)[None, :], atol=1e-12)
        assert torch.allclose(A @ A.t(), torch.diag(S[moved] / c), atol=1e-11)
        assert torch.allclose(B.t() @ B, torch.diag(S[moved] / c), atol=1e-11)
    # k > what can move: the extra rows of A are Kaiming-uniform (bound 1 / sqrt(n)) divided by c
    r_small = 2
    q = r_small + (0 if init == "principal" else 1)
    layer = build(U[:, :q], S[:q], Vh[:q], r_small, 5, init, split_scale=0.25)
    e = r_small if init == "principal" else 1
    A, B = layer.A.detach(), layer.B.detach()
    assert torch.count_nonzero(B[:, e:]) == 0 and torch.count_nonzero(B[:, :e]) > 0
    bound = 1.0 / math.sqrt(n) / 0.25
    assert float(A[e:].abs().max()) <= bound * (1 + 1e-12) and float(A[e:].std()) > 0.2 * bound


@pytest.mark.parametrize("init", SPLIT_INITS)
@pytest.mark.parametrize("m,n", [(40, 24), (9, 31)])
def test_auto_split_scale_matches_lora_first_adam_step(init, m, n):
    """split_scale="auto": with sign steps dA, dB of size lr (Adam's first step),
    ||c dB A||^2 + ||c B dA||^2 equals lr^2 s_L^2 m e / 3, LoRA's E||s_L dB A_kaiming||^2 at its
    scale s_L = AUTO_LORA_SCALE."""
    r, k = 5, 4
    _, U, S, Vh = random_svd(m, n, seed=m + n)
    layer = build(U[:, :r + k], S[:r + k], Vh[:r + k], r, k, init)
    lo = 0 if init == "principal" else r
    c = layer.scale
    sl = AUTO_LORA_SCALE
    assert math.isclose(c, sl ** 2 * m * k / (3 * (m + n) * float(S[lo:lo + k].sum())), rel_tol=1e-12)
    lr = 1e-3
    g = torch.Generator().manual_seed(1)
    dA = lr * torch.sign(torch.randn(k, n, generator=g, dtype=F64))
    dB = lr * torch.sign(torch.randn(m, k, generator=g, dtype=F64))
    A, B = layer.A.detach(), layer.B.detach()
    step = float((c * dB @ A).square().sum() + (c * B @ dA).square().sum())
    assert math.isclose(step, lr ** 2 * sl ** 2 * m * k / 3, rel_tol=1e-9)
    # and it is LoRA's first step on the same matrices: with B = 0 only dB moves, and for random
    # signs E||s_L dB A||^2 = lr^2 s_L^2 m tr(A A^T), averaged here over 50 Kaiming draws of A
    lora_steps = []
    for seed in range(50):
        torch.manual_seed(seed)
        lora = build(U[:, :r], S[:r], Vh[:r], r, k, "lora", alpha=sl * k)
        assert lora.scale == sl
        lora_steps.append(lr ** 2 * lora.scale ** 2 * m * float(lora.A.detach().square().sum()))
    assert math.isclose(step, sum(lora_steps) / len(lora_steps), rel_tol=0.05)


@pytest.mark.parametrize("init", INITS)
def test_zero_singular_values_are_not_moved(init):
    """W of rank 3 with a rank-6 truncation: only components with sigma > 0 start in the delta."""
    m, n, r, k = 14, 11, 6, 4
    W, U, S, Vh = random_svd(m, n, seed=7, zeros=11 - 3)
    q = min(r + k, 11) if init == "residual" else r
    layer = build(U[:, :q], S[:q], Vh[:q], r, k, init)
    assert rel_error(dense(layer), W) <= TOL[F64]
    assert torch.isfinite(layer.A).all() and torch.isfinite(layer.B).all()
    moved = 3 if init == "principal" else 0
    assert layer.frozen_rank == r - moved
    assert torch.count_nonzero(layer.B[:, moved:]) == 0
    if init != "principal":  # nothing moved: the split inits fall back to scale 1
        assert layer.scale == 1.0


def test_all_zero_factors_with_every_init():
    U = torch.linalg.qr(torch.randn(8, 3, dtype=F64))[0]
    Vh = torch.linalg.qr(torch.randn(5, 3, dtype=F64))[0].t()
    S = torch.zeros(3, dtype=F64)
    for init in INITS:
        layer = build(U, S, Vh, 2, 2, init)
        assert float(dense(layer).abs().max()) == 0.0
        assert layer.scale == 1.0


def test_residual_uses_the_components_after_the_truncation():
    """The delta of "residual" holds exactly components [r, r + e); fewer given than k: e = given."""
    m, n, r, k = 21, 16, 5, 4
    W, U, S, Vh = random_svd(m, n, seed=11)
    layer = build(U[:, :r + k], S[:r + k], Vh[:r + k], r, k, "residual")
    assert layer.frozen_rank == r
    assert rel_error(layer.scale * layer.B.detach() @ layer.A.detach(), part(U, S, Vh, r, r + k)) <= TOL[F64]
    Uf, Sf, Vhf = layer.dequantized_factors(F64)
    assert rel_error((Uf * Sf) @ Vhf, part(U, S, Vh, 0, r)) <= TOL[F64]
    # only 2 extra components given
    layer = build(U[:, :r + 2], S[:r + 2], Vh[:r + 2], r, k, "residual")
    assert rel_error(dense(layer), part(U, S, Vh, 0, r + 2)) <= TOL[F64]
    assert torch.count_nonzero(layer.B[:, 2:]) == 0
    # the other inits ignore extra components
    for init in ("principal", "lora"):
        other = build(U[:, :r + k], S[:r + k], Vh[:r + k], r, k, init)
        assert rel_error(dense(other), part(U, S, Vh, 0, r)) <= TOL[F64]


@pytest.mark.parametrize("m,n", [(40, 48), (5, 3)])
def test_residual_from_linear_is_closer_to_the_weight(m, n):
    """Through from_linear (the decomposition asks for extra_components): the truncation plus the
    next min(k, p - r) components of W, and so never farther from W than the truncation."""
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(n, m).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, n, generator=g, dtype=F64))
    U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    k = 4
    for r in (0, 2):
        layer = CersaLinear.from_linear(lin, rank=r, energy=None, delta_rank=k, init="residual")
        e = min(k, min(m, n) - r)
        assert layer.rank == r and layer.frozen_rank == r
        assert rel_error(dense(layer), part(U, S, Vh, 0, r + e)) <= 1e-10
        trunc = CersaLinear.from_linear(lin, rank=r, energy=None, delta_rank=k, init="lora")
        W = lin.weight.detach()
        assert float((dense(layer) - W).norm()) <= float((dense(trunc) - W).norm()) + 1e-12


def test_lora_init_unchanged():
    _, U, S, Vh = random_svd(12, 10, seed=4)
    layer = build(U[:, :5], S[:5], Vh[:5], 5, 3, "lora", alpha=6.0)
    assert layer.scale == 2.0 and layer.frozen_rank == 5
    assert torch.count_nonzero(layer.B) == 0
    bound = 1.0 / math.sqrt(10)
    assert float(layer.A.detach().abs().max()) <= bound * (1 + 1e-12)


def test_explicit_scale_is_the_split_scale():
    _, U, S, Vh = random_svd(12, 10, seed=5)
    for init in SPLIT_INITS:
        layer = CersaLinear.from_factors(U[:, :7], S[:7], Vh[:7], truncation_rank=4, init=init, delta_rank=3,
                                         scale=0.5, dtype=F64)
        assert layer.scale == 0.5
        assert rel_error(dense(layer), part(U, S, Vh, 0, 4 + (3 if init == "residual" else 0))) <= TOL[F64]
    with pytest.raises(ValueError, match=r"^scale: expected a finite number > 0.*got -1"):
        CersaLinear.from_factors(U, S, Vh, truncation_rank=4, init="principal", delta_rank=3, scale=-1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("init", SPLIT_INITS)
def test_auto_split_fits_half_precision(dtype, init):
    """Huge singular values: the auto c is raised so that A, B and 1/c stay finite in the layer's dtype."""
    _, U, S, Vh = random_svd(24, 16, seed=6)
    S = S * 3e6
    layer = CersaLinear.from_factors(U[:, :8].float(), S[:8].float(), Vh[:8].float(), truncation_rank=4,
                                     init=init, delta_rank=4, dtype=dtype)
    for name, p in layer.named_parameters():
        assert torch.isfinite(p).all(), name
    intended = part(U, S, Vh, 0, 4 + (4 if init == "residual" else 0))
    assert rel_error(dense(layer), intended) <= TOL[dtype]


# ------------------------------------------------------------------------------------ quantized factors
@pytest.mark.parametrize("quantize", ["int8", "nf4"])
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_delta_is_the_best_rank_k_fit_of_the_quantization_error(quantize, init, iters):
    """quant_init="loftq": c B A is the best rank-k approximation of (intended - Q), Q the
    dequantized frozen part, so the layer is at least as close to the intended matrix as without."""
    m, n, r, k = 70, 45, 12, 4
    _, U, S, Vh = random_svd(m, n, seed=8)
    q = r + k if init == "residual" else r
    intended = part(U, S, Vh, 0, r + (k if init == "residual" else 0))
    torch.manual_seed(0)
    plain = build(U[:, :q], S[:q], Vh[:q], r, k, init, quantize=quantize, quant_init=None)
    torch.manual_seed(0)
    layer = build(U[:, :q], S[:q], Vh[:q], r, k, init, quantize=quantize, quant_init="loftq", loftq_iters=iters)
    assert layer.quantize == quantize and layer.scale == plain.scale
    # without loftq the delta is the one of the unquantized init
    ref = build(U[:, :q], S[:q], Vh[:q], r, k, init)
    assert rel_error(plain.scale * plain.B.detach() @ plain.A.detach(),
                     ref.scale * ref.B.detach() @ ref.A.detach()) <= TOL[F64] or init == "lora"
    Uq, Sq, Vhq = layer.dequantized_factors(F64)
    err = intended - (Uq * Sq) @ Vhq
    Ue, Se, Vhe = torch.linalg.svd(err, full_matrices=False)
    best = part(Ue, Se, Vhe, 0, k)
    delta = layer.scale * layer.B.detach() @ layer.A.detach()
    assert rel_error(delta, best) <= 1e-8
    e_plain = float((dense(plain) - intended).norm())
    e_loftq = float((dense(layer) - intended).norm())
    assert e_loftq < e_plain if iters == 1 else e_loftq < float(err.norm())


def test_loftq_is_ignored_without_quantize_and_when_nothing_is_frozen():
    _, U, S, Vh = random_svd(15, 12, seed=9)
    torch.manual_seed(0)
    a = build(U[:, :4], S[:4], Vh[:4], 4, 2, "lora", quant_init="loftq")
    torch.manual_seed(0)
    b = build(U[:, :4], S[:4], Vh[:4], 4, 2, "lora", quant_init=None)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    # principal with k >= r moves everything: no frozen factors, nothing to absorb
    layer = build(U[:, :3], S[:3], Vh[:3], 3, 4, "principal", quantize="nf4")
    assert layer.frozen_rank == 0
    assert rel_error(dense(layer), part(U, S, Vh, 0, 3)) <= TOL[F64]


# ------------------------------------------------------------------------------------------ config
def test_extra_components():
    assert CersaConfig(init="residual", delta_rank=5).extra_components == 5
    assert CersaConfig(init="principal", delta_rank=5).extra_components == 0
    assert CersaConfig(init="lora", delta_rank=5).extra_components == 0


def test_config_defaults():
    c = CersaConfig()
    assert c.init in INITS and c.split_scale == "auto" and c.quant_init in QUANT_INITS and c.loftq_iters == 1
    assert CersaConfig(split_scale=2).split_scale == 2.0 and isinstance(CersaConfig(split_scale=2).split_scale, float)


CONFIG_CASES = {
    "init_unknown": ({"init": "pissa"}, ValueError,
                     r"^init: expected one of \('principal', 'lora', 'residual'\), got 'pissa'"),
    "alpha_with_principal": ({"init": "principal", "alpha": 8}, ValueError,
                             r"^alpha: init='principal' sets the scale itself.*alpha=8"),
    "alpha_with_residual": ({"init": "residual", "alpha": 16}, ValueError,
                            r"^alpha: init='residual' sets the scale itself.*alpha=16"),
    "split_scale_word": ({"split_scale": "big"}, ValueError, r"^split_scale: expected 'auto' or a number > 0, got 'big'"),
    "split_scale_zero": ({"split_scale": 0.0}, ValueError, r"^split_scale: expected 'auto' or a finite number > 0, got 0.0"),
    "split_scale_nan": ({"split_scale": float("nan")}, ValueError, r"^split_scale: .*got nan"),
    "split_scale_inf": ({"split_scale": float("inf")}, ValueError, r"^split_scale: .*got inf"),
    "split_scale_bool": ({"split_scale": True}, TypeError, r"^split_scale: expected 'auto' or a number > 0, got bool"),
    "split_scale_list": ({"split_scale": [1.0]}, TypeError, r"^split_scale: .*got list"),
    "quant_init_unknown": ({"quant_init": "gptq"}, ValueError,
                           r"^quant_init: expected one of \(None, 'loftq'\), got 'gptq'"),
    "loftq_iters_zero": ({"loftq_iters": 0}, ValueError, r"^loftq_iters: expected an int >= 1, got 0"),
    "loftq_iters_float": ({"loftq_iters": 1.5}, TypeError, r"^loftq_iters: expected an int >= 1, got float 1.5"),
    "loftq_iters_bool": ({"loftq_iters": True}, TypeError, r"^loftq_iters: expected an int >= 1, got bool"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_bad_input(case):
    options, exc, pattern = CONFIG_CASES[case]
    with pytest.raises(exc, match=pattern):
        CersaConfig(**options)


def test_alpha_allowed_with_lora():
    assert CersaConfig(init="lora", alpha=16, delta_rank=8).scale == 2.0


# ------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("init,quantize", [("residual", None), ("principal", "nf4"), ("lora", "int8")])
def test_per_layer_scale_and_init_survive_save_and_load(tmp_path, init, quantize):
    """The split inits choose a scale per layer; save / load must give back the same function."""
    from cersa_kernels import convert, load, save

    def model(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(24, 18), torch.nn.Tanh(), torch.nn.Linear(18, 10))

    net = convert(model(0), energy=0.9, delta_rank=3, init=init, quantize=quantize, max_frozen_ratio=None,
                  progress=False)
    scales = [m.scale for m in net.modules() if isinstance(m, CersaLinear)]
    assert len(scales) == 2 and (init == "lora" or scales[0] != scales[1])
    path = tmp_path / "net.safetensors"
    save(net, path)
    fresh = load(path, model(1))
    x = torch.randn(5, 24)
    assert torch.equal(fresh(x), net(x))
    assert [m.scale for m in fresh.modules() if isinstance(m, CersaLinear)] == scales
    assert {m.init for m in fresh.modules() if isinstance(m, CersaLinear)} == {init}
