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
