"""Tests of cersa_kernels/decompose.py: the energy rank and the truncated SVD.

Independent reference: numpy.linalg.svd in float64 and a plain Python loop over the cumulative
energy (DESIGN.md "energy rank r(tau)").
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cersa_kernels import energy_rank, truncated_svd
from cersa_kernels.decompose import check_energy

from conftest import single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    """Small SVDs: one thread is as fast and avoids spin-waiting on a busy CI machine (conftest)."""
    with single_thread():
        yield

ENERGIES = (1e-9, 0.1, 0.5, 0.9, 0.93, 0.95, 0.999999, 1.0)


def loop_rank(s: np.ndarray, tau: float) -> int:
    """Smallest r with sum_{i<=r} s_i^2 >= tau * sum s_i^2, by a float64 loop (0 for a zero spectrum)."""
    s2 = np.asarray(s, dtype=np.float64) ** 2
    total = s2.sum()
    if total == 0:
        return 0
    acc = 0.0
    for i, v in enumerate(s2):
        acc += v
        if acc >= tau * total:
            return i + 1
    return len(s2)


def spectrum_matrix(m, n, sigmas, seed=0, dtype=torch.float64):
    """U diag(sigmas) V^T with random orthonormal U, V (float64), cast to dtype."""
    g = torch.Generator().manual_seed(seed)
    p = len(sigmas)
    U, _ = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))
    return ((U * torch.tensor(sigmas, dtype=torch.float64)) @ V.t()).to(dtype)


# ------------------------------------------------------------------------------------- energy_rank
@pytest.mark.parametrize("seed", range(5))
def test_energy_rank_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    S = torch.sort(torch.rand(50, generator=g, dtype=torch.float64) ** 3, descending=True).values
    for tau in ENERGIES + tuple(torch.rand(20, generator=g).tolist()):
        tau = max(float(tau), 1e-12)
        assert energy_rank(S, tau) == loop_rank(S.numpy(), tau), tau
        assert energy_rank(S.float(), tau) == loop_rank(S.float().numpy().astype(np.float64), tau)


def test_energy_rank_exact_boundaries():
    # energies 16, 9, 4, 1 (sum 30): tau exactly at a cumulative fraction keeps that many components.
    S = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    assert energy_rank(S, 16 / 30) == 1
    assert energy_rank(S, 16 / 30 + 1e-9) == 2
    assert energy_rank(S, 25 / 30) == 2
    assert energy_rank(S, 29 / 30) == 3
    assert energy_rank(S, 1.0) == 4


def test_energy_rank_zero_and_empty():
    assert energy_rank(torch.zeros(5), 0.5) == 0
    assert energy_rank(torch.zeros(5), 1.0) == 0
    assert energy_rank(torch.zeros(0), 0.9) == 0


def test_energy_rank_nonzero_argument():
    S = torch.tensor([2.0, 1.0, 1e-9, 0.0])
    assert energy_rank(S, 1.0, nonzero=2) == 2
    assert energy_rank(S, 0.5, nonzero=2) == 1


@pytest.mark.parametrize("bad,exc", [(0.0, ValueError), (-0.1, ValueError), (1.0000001, ValueError),
                                     (float("nan"), ValueError), (float("inf"), ValueError),
                                     ("0.9", TypeError), (True, TypeError), (None, TypeError),
                                     (torch.tensor(0.9), TypeError)])
def test_bad_energy(bad, exc):
    with pytest.raises(exc, match="energy"):
        energy_rank(torch.ones(3), bad)
    if bad is not None:  # energy=None means "not given" there (then rank= is required)
        with pytest.raises(exc, match="energy"):
            truncated_svd(torch.randn(4, 3), energy=bad)
    with pytest.raises(exc, match="energy"):
        check_energy(bad)


# ----------------------------------------------------------------------------------- truncated_svd
@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (1, 17), (17, 1), (33, 33)])
@pytest.mark.parametrize("tau", [0.5, 0.93, 1.0])
def test_truncated_svd_matches_float64(shape, tau):
    m, n = shape
    p = min(m, n)
    sig = sorted((np.random.default_rng(m * n).random(p) * 10 + 0.1).tolist(), reverse=True)
    W64 = spectrum_matrix(m, n, sig, seed=p)
    W = W64.float()
    s_ref = np.linalg.svd(W.double().numpy(), compute_uv=False)
    U, S, Vh, info = truncated_svd(W, energy=tau)
    r = loop_rank(s_ref, tau)
    assert info.rank == r == U.shape[1] == S.shape[0] == Vh.shape[0]
    assert (U.shape, Vh.shape) == ((m, r), (r, n))
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert U.is_contiguous() and S.is_contiguous() and Vh.is_contiguous()
    assert not (U.requires_grad or S.requires_grad or Vh.requires_grad)
    np.testing.assert_allclose(S.double().numpy(), s_ref[:r], rtol=1e-5, atol=1e-6 * s_ref[0])
    assert info.max_rank == p
    assert math.isclose(info.energy, (s_ref[:r] ** 2).sum() / (s_ref ** 2).sum(), rel_tol=1e-6)
    assert math.isclose(info.total_energy, float((W.double() ** 2).sum()), rel_tol=1e-6)
    # the reconstruction error is exactly the discarded energy
    Wr = (U.double() * S.double()) @ Vh.double()
    resid = float(((W.double() - Wr) ** 2).sum()) / info.total_energy
    assert abs(resid - (1 - info.energy)) < 1e-5


def test_explicit_rank():
    W = spectrum_matrix(20, 12, [9, 7, 5, 3, 2, 1, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]).float()
    for rank in (0, 1, 5, 12):
        U, S, Vh, info = truncated_svd(W, rank=rank)
        assert info.rank == rank and U.shape == (20, rank) and S.shape == (rank,) and Vh.shape == (rank, 12)
    with pytest.raises(ValueError, match="rank"):
        truncated_svd(W, rank=13)
    with pytest.raises(ValueError, match="rank"):
        truncated_svd(W, rank=-1)
    with pytest.raises(TypeError, match="rank"):
        truncated_svd(W, rank=2.0)
    with pytest.raises(ValueError, match="exactly one"):
        truncated_svd(W, energy=0.9, rank=3)
    with pytest.raises(ValueError, match="exactly one"):
        truncated_svd(W)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[1])
def test_energy_one_keeps_every_nonzero_singular_value(dtype):
    g = torch.Generator().manual_seed(1)
    # a rank-5 weight built from small integers, exactly representable in every dtype
    L = torch.randint(-3, 4, (40, 5), generator=g).to(torch.float64)
    R = torch.randint(-3, 4, (5, 30), generator=g).to(torch.float64)
    W = (L @ R).to(dtype)
    assert torch.equal(W.double(), L @ R)
    assert np.linalg.matrix_rank(W.double().numpy()) == 5
    U, S, Vh, info = truncated_svd(W, energy=1.0)
    assert info.rank == 5 == info.numerical_rank
    assert math.isclose(info.energy, 1.0, rel_tol=1e-6)
    # a full-rank weight keeps all min(m, n)
    Wf = torch.randn(30, 20, generator=g).to(dtype)
    assert truncated_svd(Wf, energy=1.0)[3].rank == 20


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[1])
def test_exactly_rank_one_gives_rank_one(dtype):
    u = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0, -1.0, 2.0])
    v = torch.tensor([2.0, 1.0, -0.5, 3.0, -4.0, 1.0, 0.25, 8.0, -2.0])
    W = torch.outer(u, v).to(dtype)
    assert torch.equal(W.double(), torch.outer(u, v).double())
    for tau in ENERGIES:
        U, S, Vh, info = truncated_svd(W, energy=tau)
        assert info.rank == 1, (tau, info)
    Wr = (U.double() * S.double()) @ Vh.double()
    assert torch.allclose(Wr, W.double(), rtol=0, atol=1e-5 * float(W.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_all_zero_weight_gives_rank_zero(dtype):
    W = torch.zeros(12, 9, dtype=dtype)
    for tau in ENERGIES:
        U, S, Vh, info = truncated_svd(W, energy=tau)
        assert info.rank == 0 and U.shape == (12, 0) and S.shape == (0,) and Vh.shape == (0, 9)
        assert info.energy == 0.0 and info.total_energy == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_weights_decompose_in_fp32(dtype):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(48, 36, generator=g).to(dtype)
    U, S, Vh, info = truncated_svd(W, energy=1.0)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    s_ref = np.linalg.svd(W.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(S.double().numpy(), s_ref, rtol=1e-5)
    Wr = (U.double() * S.double()) @ Vh.double()
    assert float((Wr - W.double()).abs().max()) < 1e-5 * float(W.double().abs().max())


def test_huge_fp16_weight_does_not_overflow():
    g = torch.Generator().manual_seed(3)
    W = (torch.rand(64, 48, generator=g) * 2 - 1).mul(60000.0).to(torch.float16)
    assert torch.isfinite(W).all() and float(W.abs().max()) > 50000
    U, S, Vh, info = truncated_svd(W, energy=0.93)
    assert torch.isfinite(S).all() and torch.isfinite(U).all() and torch.isfinite(Vh).all()
    assert float(S[0]) > 65504  # larger than fp16 can hold: kept in fp32
    assert math.isfinite(info.total_energy) and math.isfinite(info.energy)
    s_ref = np.linalg.svd(W.double().numpy(), compute_uv=False)
    assert info.rank == loop_rank(s_ref, 0.93)


def test_float64_weight_decomposes_in_float64():
    W = torch.randn(10, 7, dtype=torch.float64)
    U, S, Vh, info = truncated_svd(W, energy=1.0)
    assert U.dtype == S.dtype == Vh.dtype == torch.float64
    assert torch.allclose((U * S) @ Vh, W, atol=1e-12)


def test_economy_svd_on_tall_weight(monkeypatch):
    """A (50000, 64) weight: economy SVD only (U is (50000, r), never (50000, 50000))."""
    calls = []
    real_svd = torch.linalg.svd

    def spy(A, full_matrices=True, **kw):
        calls.append((tuple(A.shape), full_matrices))
        assert full_matrices is False, "truncated_svd asked for the full (m, m) U"
        return real_svd(A, full_matrices=full_matrices, **kw)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    W = torch.randn(50000, 64, generator=torch.Generator().manual_seed(4))
    U, S, Vh, info = truncated_svd(W, energy=0.9)
    assert calls and all(fm is False for _, fm in calls)
    assert U.shape == (50000, info.rank) and Vh.shape == (info.rank, 64)
    assert info.max_rank == 64
    Wt = W.t().contiguous()  # and the wide one
    U2, S2, Vh2, info2 = truncated_svd(Wt, energy=0.9)
    assert U2.shape == (64, info2.rank) and Vh2.shape == (info2.rank, 50000)
    assert info2.rank == info.rank


def test_input_weight_is_not_modified():
    W = torch.randn(9, 8, requires_grad=True)
    before = W.detach().clone()
    U, S, Vh, _ = truncated_svd(W, energy=0.9)
    assert torch.equal(W.detach(), before)
    assert not U.requires_grad


@pytest.mark.parametrize("case,exc,pattern", [
    ("nan", ValueError, r"^layer7\.weight: .*non-finite"),
    ("inf", ValueError, r"^layer7\.weight: .*non-finite"),
    ("empty", ValueError, r"^layer7\.weight: .*empty"),
    ("meta", ValueError, r"^layer7\.weight: .*meta"),
    ("int", TypeError, r"^layer7\.weight: .*floating.*int"),
    ("1d", ValueError, r"^layer7\.weight: .*2-D"),
    ("list", TypeError, r"^layer7\.weight: .*Tensor"),
])
def test_unusable_weights_raise_naming_the_layer(case, exc, pattern):
    W = torch.randn(6, 5)
    if case == "nan":
        W[2, 3] = float("nan")
    elif case == "inf":
        W[0, 0] = float("-inf")
    elif case == "empty":
        W = torch.empty(6, 0)
    elif case == "meta":
        W = torch.empty(6, 5, device="meta")
    elif case == "int":
        W = torch.ones(6, 5, dtype=torch.int32)
    elif case == "1d":
        W = torch.randn(30)
    elif case == "list":
        W = [[1.0] * 5] * 6
    with pytest.raises(exc, match=pattern):
        truncated_svd(W, energy=0.9, where="layer7.weight")


# ------------------------------------------------------------------------------ methods: "gram"
from cersa_kernels import decompose as dec  # noqa: E402

METHODS = ("full", "gram", "randomized", "auto")


def power_law(m, n, exponent=0.8, seed=0, dtype=torch.float32):
    """A weight with sigma_i = i^-exponent (the decay of real LLM / ViT weights is 0.3-1)."""
    p = min(m, n)
    return spectrum_matrix(m, n, (np.arange(1, p + 1, dtype=np.float64) ** -exponent).tolist(), seed=seed,
                           dtype=dtype)


def reference_spectrum(W: torch.Tensor) -> np.ndarray:
    """The exact spectrum: float64 numpy SVD of the weight as stored."""
    return np.linalg.svd(W.double().numpy(), compute_uv=False)


def check_factors(W, U, S, Vh, info, *, orth_atol=1e-5):
    """Shapes, dtype, contiguity, orthonormal columns / rows, descending S, and the reconstruction
    error equal to the discarded energy."""
    m, n = W.shape
    r = info.rank
    assert U.shape == (m, r) and S.shape == (r,) and Vh.shape == (r, n)
    assert U.is_contiguous() and S.is_contiguous() and Vh.is_contiguous()
    if r:
        eye = torch.eye(r, dtype=torch.float64)
        assert float((U.double().T @ U.double() - eye).abs().max()) <= orth_atol
        assert float((Vh.double() @ Vh.double().T - eye).abs().max()) <= orth_atol
        assert bool((S[:-1] >= S[1:]).all())
    resid = float((W.double() - (U.double() * S.double()) @ Vh.double()).square().sum()) / info.total_energy
    assert abs(resid - (1.0 - info.energy)) <= 1e-5


@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (1, 17), (17, 1), (33, 33), (300, 90), (90, 300)])
@pytest.mark.parametrize("tau", [0.5, 0.93, 0.99])
def test_gram_matches_float64_reference(shape, tau):
    W = power_law(*shape, seed=sum(shape))
    s_ref = reference_spectrum(W)
    U, S, Vh, info = dec.gram_svd(W, energy=tau)
    assert info.method == "gram" and info.note == ""
    assert info.rank == loop_rank(s_ref, tau)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    # the retained singular values to float32 accuracy (the float32 LAPACK SVD is ~10x less accurate)
    np.testing.assert_allclose(S.double().numpy(), s_ref[:info.rank], rtol=2e-7, atol=0)
    check_factors(W, U, S, Vh, info, orth_atol=2e-6)
    assert math.isclose(info.total_energy, float((W.double() ** 2).sum()), rel_tol=1e-12)
    assert math.isclose(info.energy, (s_ref[:info.rank] ** 2).sum() / (s_ref ** 2).sum(), rel_tol=1e-10)
    assert len(info.singular_values) == min(shape)


@pytest.mark.parametrize("shape", [(200, 60), (60, 200)])
def test_gram_eigenvalue_error_bound_holds_and_digits_are_lost_only_for_small_values(shape):
    """The stated bound |sigma_i^2 - lam_i| <= delta holds for every i, on a spectrum from 1 down to
    1e-7; relative accuracy is lost as sigma_1^2 / sigma_i^2 grows, the float32-accurate part is
    the part with sigma_i^2 >= delta / 2^-24."""
    m, n = shape
    p = min(shape)
    W = spectrum_matrix(m, n, np.logspace(0, -7, p).tolist(), seed=5)  # float64: exact spectrum known
    s_ref = reference_spectrum(W)
    U, S, Vh, info = dec.gram_svd(W, rank=p, fallback=False)
    lam = info.singular_values.double().numpy() ** 2
    delta = dec.gram_eigenvalue_error(shape, float(lam[0]), info.total_energy)
    assert np.all(np.abs(lam - s_ref ** 2) <= delta)
    rel = np.abs(info.singular_values.double().numpy() - s_ref) / s_ref
    bound = delta / (2 * s_ref ** 2)
    accurate = bound <= dec.GRAM_SIGMA_RTOL
    assert accurate[:5].all() and not accurate[-5:].any()
    assert np.all(rel[accurate] <= 2 * dec.GRAM_SIGMA_RTOL)
    # beyond the accurate part digits are gone: the smallest values are off by orders of magnitude
    # more than float64's full SVD, as the bound says
    s_full = torch.linalg.svdvals(W).numpy()
    assert rel[-1] > 1e3 * abs(s_full[-1] - s_ref[-1]) / s_ref[-1]
    assert "fallback=False" in info.note


def test_gram_falls_back_to_full_when_the_retained_sigma_is_too_small():
    # energy concentrated in 5 directions, a tail of 1e-6: tau = 1 - 1e-13 needs the tail
    sig = [1.0] * 5 + [1e-6] * 35
    W = spectrum_matrix(60, 40, sig, seed=6)
    s_ref = reference_spectrum(W)
    U, S, Vh, info = truncated_svd(W, energy=1 - 1e-13, svd="gram")
    assert info.method == "full" and "GRAM_SIGMA_RTOL" in info.note
    assert info.rank == loop_rank(s_ref, 1 - 1e-13) == 40
    U, S, Vh, info = truncated_svd(W.float(), rank=40, svd="gram")
    assert info.method == "full" and info.rank == 40
    # the well-conditioned part stays on the Gram path
    U, S, Vh, info = truncated_svd(W.float(), energy=0.99, svd="gram")
    assert info.method == "gram" and info.rank == 5
    check_factors(W.float(), U, S, Vh, info)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gram_edge_weights(dtype):
    Z = torch.zeros(12, 9, dtype=dtype)
    for tau in (0.5, 1.0):
        U, S, Vh, info = truncated_svd(Z, energy=tau, svd="gram")
        assert info.rank == 0 and U.shape == (12, 0) and Vh.shape == (0, 9) and info.energy == 0.0
    U, S, Vh, info = truncated_svd(Z, rank=3, svd="gram")  # nothing to recover from: full SVD
    assert info.method == "full" and U.shape == (12, 3) and float(S.abs().max()) == 0.0
    u = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0, -1.0, 2.0])
    v = torch.tensor([2.0, 1.0, -0.5, 3.0, -4.0, 1.0, 0.25, 8.0, -2.0])
    W = torch.outer(u, v).to(dtype)  # exactly rank 1 in every dtype
    for tau in ENERGIES:
        U, S, Vh, info = truncated_svd(W, energy=tau, svd="gram")
        assert info.rank == 1 and info.numerical_rank == 1, (tau, info)
        assert U.dtype == torch.float32
    torch.testing.assert_close((U * S) @ Vh, W.float(), rtol=0, atol=1e-5 * float(W.float().abs().max()))
    U, S, Vh, info = truncated_svd(W, rank=0, svd="gram")
    assert U.shape == (7, 0) and S.shape == (0,) and Vh.shape == (0, 9) and info.method == "gram"


def test_gram_non_contiguous_and_float64_weights():
    W = power_law(50, 70, seed=7).T  # (70, 50) view, not contiguous
    assert not W.is_contiguous()
    U, S, Vh, info = dec.gram_svd(W, energy=0.93)
    assert info.rank == loop_rank(reference_spectrum(W), 0.93)
    check_factors(W, U, S, Vh, info, orth_atol=2e-6)
    W64 = power_law(50, 70, seed=7, dtype=torch.float64)
    U, S, Vh, info = dec.gram_svd(W64, energy=0.93)
    assert U.dtype == torch.float64 and info.method == "gram"
    np.testing.assert_allclose(S.numpy(), reference_spectrum(W64)[:info.rank], rtol=1e-10)


def test_gram_bad_input_names_the_weight():
    with pytest.raises(ValueError, match=r"^blk\.w: .*non-finite"):
        dec.gram_svd(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), energy=0.9, where="blk.w")
    with pytest.raises(ValueError, match="exactly one"):
        dec.gram_svd(torch.ones(3, 3))
    with pytest.raises(ValueError, match="svd"):
        truncated_svd(torch.ones(3, 3), energy=0.9, svd="eigh")


def test_check_weight_norm_overflow_is_not_an_error():
    W = torch.full((4, 4), 3e38)  # finite, but its 2-norm overflows float32
    dec.check_weight(W)
    W[1, 2] = float("inf")
    with pytest.raises(ValueError, match="1 non-finite"):
        dec.check_weight(W)


# --------------------------------------------------------------------------- exact energy ranks
def cut_energies(s_ref: np.ndarray, r: int, rel: float) -> tuple[float, float]:
    """Energies just below and just above the cumulative fraction of the first r components, by
    ``rel`` relative to ||W||_F^2: the exact rank is r for the first and r + 1 for the second."""
    frac = float(np.cumsum(s_ref ** 2)[r - 1] / np.sum(s_ref ** 2))
    return frac - rel, frac + rel


@pytest.mark.parametrize("exponent", [0.3, 0.6, 1.0])
@pytest.mark.parametrize("rel", [1e-7, 1e-9])
def test_exact_rank_at_a_tight_cut(exponent, rel):
    """Energies within 1e-7 / 1e-9 of a cumulative fraction (below float32's resolution of
    ~1e-6): "full", "gram" and "auto" return the rank of the float64 spectrum; "randomized" meets
    its guarantee (energy >= tau, rank >= the exact rank)."""
    W = power_law(160, 120, exponent=exponent, seed=11)
    s_ref = reference_spectrum(W)
    for r in (10, 57, 100):
        for tau, want in zip(cut_energies(s_ref, r, rel), (r, r + 1)):
            assert loop_rank(s_ref, tau) == want
            for meth in ("full", "gram", "auto"):
                info = truncated_svd(W, energy=tau, svd=meth)[3]
                assert info.rank == want, (meth, r, tau, info.method, info.note)
            U, S, Vh, info = truncated_svd(W, energy=tau, svd="randomized")
            kept = 1 - float((W.double() - (U.double() * S.double()) @ Vh.double()).square().sum()) / (s_ref ** 2).sum()
            # the sketch's float32 singular values resolve the energy to ~1e-6: at these cuts (1e-7,
            # 1e-9 away) its stopping test may land one component short, never more
            assert info.rank >= want - 1 and kept >= tau - 1e-6


def test_full_svd_settles_an_undecidable_float32_cut_in_float64():
    W = power_law(160, 120, exponent=0.6, seed=12)
    s_ref = reference_spectrum(W)
    tau = cut_energies(s_ref, 57, 1e-9)[1]
    U, S, Vh, info = truncated_svd(W, energy=tau, svd="full")
    assert "settled by float64" in info.note and info.rank == 58
    check_factors(W, U, S, Vh, info)
    # a cut far from the boundary is read from the float32 values alone
    assert truncated_svd(W, energy=0.93, svd="full")[3].note == ""


def test_near_ties_at_the_cut():
    """A cluster of 9 singular values equal to 1e-6 relative around the cut: the rank is exact, the
    factors orthonormal and the retained energy right, whichever vectors of the cluster are kept."""
    sig = np.concatenate([np.linspace(1.0, 0.3, 30), 0.2 * (1 + 1e-6 * np.arange(9))[::-1],
                          np.linspace(0.1, 0.01, 41)])
    W = spectrum_matrix(120, 80, sig.tolist(), seed=13).float()
    s_ref = reference_spectrum(W)
    for r in (32, 34, 37):
        for tau in cut_energies(s_ref, r, 1e-9):
            for meth in ("full", "gram", "auto"):
                U, S, Vh, info = truncated_svd(W, energy=tau, svd=meth)
                assert info.rank == loop_rank(s_ref, tau), (meth, tau)
                check_factors(W, U, S, Vh, info)


@pytest.mark.parametrize("exponent", [0.3, 0.6, 1.0])
@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (700, 256)])
def test_every_method_on_power_law_spectra(shape, exponent):
    W = power_law(*shape, exponent=exponent, seed=3)
    s_ref = reference_spectrum(W)
    for tau in (0.8, 0.93, 0.99):
        exact = loop_rank(s_ref, tau)
        for meth in METHODS:
            torch.manual_seed(0)
            U, S, Vh, info = truncated_svd(W, energy=tau, svd=meth)
            if meth == "randomized":  # the stated guarantee
                assert exact <= info.rank, (tau, exponent)
                kept = 1 - float((W.double() - (U.double() * S.double()) @ Vh.double()).square().sum()) \
                    / (s_ref ** 2).sum()
                assert kept >= tau - 1e-6
            else:
                assert info.rank == exact, (meth, tau)
                np.testing.assert_allclose(S.double().numpy(), s_ref[:exact], rtol=2e-6, atol=0)
            check_factors(W, U, S, Vh, info)


def test_real_minilm_weights_every_method(minilm, minilm_singular_values):
    """The 37 nn.Linear weights of all-MiniLM-L6-v2: "gram" gives the float64 numpy energy rank at
    tau 0.9 / 0.93 / 0.99 and the retained singular values to float32 accuracy; "auto" runs it;
    "full" gives the same rank; "randomized" (layer 0) meets its guarantee with a rank >= the exact."""
    for name, mod in minilm.named_modules():
        if type(mod) is not torch.nn.Linear:
            continue
        W = mod.weight.detach()
        s_ref = minilm_singular_values[name]
        for tau in (0.9, 0.93, 0.99):
            exact = loop_rank(s_ref, tau)
            U, S, Vh, info = truncated_svd(W, energy=tau, svd="gram")
            assert info.method == "gram" and info.rank == exact, (name, tau)
            np.testing.assert_allclose(S.double().numpy(), s_ref[:exact], rtol=2e-7)
            eye = torch.eye(exact, dtype=torch.float64)
            assert float((U.double().T @ U.double() - eye).abs().max()) < 1e-6
            assert float((Vh.double() @ Vh.double().T - eye).abs().max()) < 1e-6
        assert dec.choose_svd(tuple(W.shape), 0.93) == "gram"
        assert truncated_svd(W, energy=0.93, svd="full")[3].rank == loop_rank(s_ref, 0.93), name
        if ".layer.0." in name:
            U, S, Vh, info = truncated_svd(W, energy=0.93, svd="randomized")
            assert info.rank >= loop_rank(s_ref, 0.93) and info.energy >= 0.93


# ------------------------------------------------------------------------------------ "auto"
def test_choose_svd_rules():
    assert dec.choose_svd((576, 576), 0.93) == "gram"
    assert dec.choose_svd((49152, 576), 0.93) == "gram"
    assert dec.choose_svd((192, 576), 0.93) == "gram"
    assert dec.choose_svd((576, 576), 1.0) == "full"  # the numerical rank needs the smallest values
    assert dec.choose_svd((576, 576), 0.93, dtype=torch.float64) == "full"
    assert dec.choose_svd((576, 576), rank=576) == "full"
    assert dec.choose_svd((576, 576), rank=100) == "gram"
    assert dec.choose_svd((576, 576)) == "gram"
    # randomized only when an inexact rank is allowed and the rank is known and small
    assert dec.choose_svd((8192, 8192), rank=64) in dec.EXACT_RANK_METHODS
    assert dec.choose_svd((8192, 8192), rank=64, exact_rank=False) == "randomized"
    assert dec.choose_svd((8192, 8192), 0.9, exact_rank=False, rank_fraction=0.01) == "randomized"
    assert dec.choose_svd((8192, 8192), 0.9, exact_rank=False) == "gram"  # no fraction known
    assert dec.choose_svd((576, 576), 0.9, exact_rank=False, rank_fraction=0.7) == "gram"
    for bad, exc in [((0, 4), ValueError), ((4,), ValueError), ("4x4", ValueError), ((4.0, 4), ValueError)]:
        with pytest.raises(exc, match="shape"):
            dec.choose_svd(bad, 0.9)
    with pytest.raises(ValueError, match="energy"):
        dec.choose_svd((4, 4), 1.5)
    with pytest.raises(ValueError, match="rank"):
        dec.choose_svd((4, 4), rank=5)
    with pytest.raises(ValueError, match="rank_fraction"):
        dec.choose_svd((4, 4), 0.9, rank_fraction=2.0)


def test_auto_runs_what_choose_svd_says():
    W = power_law(100, 60)
    assert truncated_svd(W, energy=0.9, svd="auto")[3].method == dec.choose_svd((100, 60), 0.9) == "gram"
    assert truncated_svd(W, energy=1.0, svd="auto")[3].method == "full"
    assert truncated_svd(W.double(), energy=0.9, svd="auto")[3].method == "full"


def test_estimate_svd_seconds():
    for meth in ("full", "gram", "randomized"):
        small = dec.estimate_svd_seconds(meth, (384, 384), 100)
        big = dec.estimate_svd_seconds(meth, (4096, 4096), 100)
        assert 0 < small < big
    assert dec.estimate_svd_seconds("gram", (49152, 576), 420) < dec.estimate_svd_seconds("full", (49152, 576), 420)
    # a randomized width above p / 2 pays the sketch and the full SVD
    assert dec.estimate_svd_seconds("randomized", (576, 576), 400) > dec.estimate_svd_seconds("full", (576, 576), 400)
    with pytest.raises(ValueError, match="method"):
        dec.estimate_svd_seconds("auto", (4, 4), 1)


# ---------------------------------------------------------------------- spectra, many weights
def test_singular_values_gram():
    W = power_law(90, 50, seed=8)
    s_ref = reference_spectrum(W)
    s = dec.singular_values(W, svd="gram")
    assert s.dtype == torch.float64 and s.shape == (50,)
    delta = dec.gram_eigenvalue_error((90, 50), float(s_ref[0] ** 2), float((s_ref ** 2).sum()))
    assert np.all(np.abs(s.numpy() ** 2 - s_ref ** 2) <= delta)
    assert dec.singular_values(W, svd="auto").dtype == torch.float64
    assert dec.singular_values(W.double(), svd="auto").dtype == torch.float64
    np.testing.assert_allclose(dec.singular_values(W).numpy(), s_ref, rtol=1e-5)
    for tau in (0.5, 0.93, 0.999):
        assert energy_rank(s, tau) == loop_rank(s_ref, tau)
    with pytest.raises(ValueError, match="svd"):
        dec.singular_values(W, svd="randomized")
    with pytest.raises(ValueError, match="^w0: .*2-D"):
        dec.singular_values(torch.ones(3), "w0", svd="gram")


@pytest.mark.parametrize("svd", ["auto", "gram", "full"])
def test_truncated_svd_many_matches_one_by_one(svd):
    Ws = [power_law(64, 48, seed=i) for i in range(3)] + [power_law(48, 64, seed=9), power_law(64, 48, seed=4).double()]
    many = dec.truncated_svd_many(Ws, energy=0.93, svd=svd)
    for W, (U, S, Vh, info) in zip(Ws, many):
        U1, S1, Vh1, info1 = truncated_svd(W, energy=0.93, svd=svd)
        assert info.rank == info1.rank and info.method == info1.method
        torch.testing.assert_close(S, S1, rtol=1e-6, atol=0)
        torch.testing.assert_close((U * S) @ Vh, (U1 * S1) @ Vh1, rtol=0, atol=1e-5)
    ranks = dec.truncated_svd_many(Ws[:3], rank=5, svd=svd)
    assert [r[3].rank for r in ranks] == [5, 5, 5]
    assert dec.truncated_svd_many([], energy=0.9) == []


def test_truncated_svd_many_checks_every_weight_first():
    bad = torch.ones(4, 4)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^b: .*non-finite"):
        dec.truncated_svd_many([torch.ones(4, 4), bad], energy=0.9, where=["a", "b"])
    with pytest.raises(ValueError, match="where"):
        dec.truncated_svd_many([torch.ones(4, 4)], energy=0.9, where=["a", "b"])
    with pytest.raises(ValueError, match="svd"):
        dec.truncated_svd_many([torch.ones(4, 4)], energy=0.9, svd="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: checks the Gram path on the GPU")
def test_gram_on_cuda_matches_cpu():
    W = power_law(300, 200, seed=10)
    Uc, Sc, Vhc, ic = truncated_svd(W.cuda(), energy=0.93, svd="gram")
    U, S, Vh, i = truncated_svd(W, energy=0.93, svd="gram")
    assert Uc.device.type == "cuda" and ic.rank == i.rank and ic.method == "gram"
    torch.testing.assert_close(Sc.cpu(), S, rtol=1e-6, atol=0)
    torch.testing.assert_close(((Uc * Sc) @ Vhc).cpu(), (U * S) @ Vh, rtol=0, atol=1e-5)


@pytest.mark.parametrize("lapack", ["torch", "numpy"])
def test_gram_cpu_lapack_choices_agree(lapack, monkeypatch):
    """Both CPU back ends of the Gram path (torch.linalg and numpy.linalg) give the same results."""
    monkeypatch.setattr(dec, "GRAM_CPU_LAPACK", lapack)
    monkeypatch.delenv("CERSA_GRAM_LAPACK", raising=False)
    assert dec._cpu_lapack() == lapack
    for shape in [(300, 90), (90, 300), (1, 5), (17, 1), (20000, 40)]:  # the last one in row blocks
        W = power_law(*shape, seed=21)
        s_ref = reference_spectrum(W)
        U, S, Vh, info = dec.gram_svd(W, energy=0.93)
        assert info.method == "gram" and info.rank == loop_rank(s_ref, 0.93)
        np.testing.assert_allclose(S.double().numpy(), s_ref[:info.rank], rtol=2e-7)
        check_factors(W, U, S, Vh, info, orth_atol=2e-6)
        assert np.all(np.abs(dec.singular_values(W, svd="gram").numpy() ** 2 - s_ref ** 2)
                      <= dec.gram_eigenvalue_error(shape, float(s_ref[0] ** 2), float((s_ref ** 2).sum())))


def test_gram_cpu_lapack_setting_is_checked(monkeypatch):
    monkeypatch.setenv("CERSA_GRAM_LAPACK", "mkl")
    with pytest.raises(ValueError, match="CERSA_GRAM_LAPACK.*'mkl'"):
        dec.gram_svd(torch.ones(3, 2), energy=0.9)
    monkeypatch.delenv("CERSA_GRAM_LAPACK")
    monkeypatch.setattr(dec, "GRAM_CPU_LAPACK", None)
    assert dec._cpu_lapack() in ("torch", "numpy")  # timed once per process
