"""Tests of the Gram path's eigensolver variants and of truncated_svd_many's worker threads
(cersa_kernels/decompose.py: _tridiagonal_eigh_top, GRAM_TOP_VECTORS, truncated_svd_many(workers=)).

Independent reference: numpy.linalg.svd of the weight in float64 (the exact spectrum and singular
vectors), numpy.linalg.eigh of the float64 Gram matrix (the full LAPACK dsyevd), and a Python loop
over the cumulative energy for the rank.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cersa_kernels import decompose as dec
from cersa_kernels import truncated_svd

from conftest import single_thread

scipy_lapack = pytest.importorskip("scipy.linalg.lapack", reason="the top-r eigenvector path uses SciPy's LAPACK")


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def loop_rank(s: np.ndarray, tau: float) -> int:
    total = float((s.astype(np.float64) ** 2).sum())
    acc = 0.0
    for i, v in enumerate(s):
        acc += float(v) ** 2
        if acc >= tau * total:
            return i + 1
    return len(s)


def power_law(m, n, exponent=0.8, seed=0, dtype=torch.float32):
    """W = Q1 diag(i^-exponent) Q2^T with random orthonormal Q1, Q2 (float64, rounded once)."""
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    q1 = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64)).Q
    s = torch.arange(1, p + 1, dtype=torch.float64) ** -exponent
    return ((q1 * s) @ q2.T).to(dtype)


def gram64(W: torch.Tensor) -> np.ndarray:
    M = W.double().numpy()
    M = M if M.shape[0] >= M.shape[1] else M.T
    return M.T @ M


@pytest.mark.parametrize("p,r", [(64, 1), (64, 64), (97, 40), (200, 0), (200, 199), (384, 176)])
def test_tridiagonal_top_matches_dsyevd(p, r):
    """Eigenvalues: the same LAPACK algorithm as numpy.linalg.eigh (dsytrd + divide and conquer), so
    equal to it within a few ulps of lam_1; the r requested eigenvectors: orthonormal to 1e-13 and
    residual ||G v - lam v|| <= 1e-13 lam_1; the same vectors as dsyevd's up to sign where the
    eigenvalue gap is large."""
    W = power_law(p + 37, p, seed=p + r)
    G = gram64(W)
    seen = []

    def top(lam):
        seen.append(lam.clone())
        return r

    lam, V = dec._tridiagonal_eigh_top(G, top)
    lam_ref, V_ref = np.linalg.eigh(G)
    assert lam.shape == (p,) and V.shape == (p, r) and V.dtype == np.float64
    lam1 = lam_ref[-1]
    np.testing.assert_allclose(lam, lam_ref, rtol=0, atol=64 * np.finfo(np.float64).eps * lam1)
    # top() saw the eigenvalues in descending order, clamped at 0, as a float64 tensor
    assert seen[0].dtype == torch.float64 and bool((seen[0][:-1] >= seen[0][1:]).all())
    assert bool((seen[0] >= 0).all())
    if r:
        w = lam[p - r:]
        assert np.abs(V.T @ V - np.eye(r)).max() < 1e-13
        assert np.linalg.norm(G @ V - V * w, axis=0).max() < 1e-13 * lam1
        # eigenvalues of this spectrum are well separated at the top: vectors agree with dsyevd's
        k = min(r, 8)
        cos = np.abs((V[:, -k:] * V_ref[:, -k:]).sum(0))
        np.testing.assert_allclose(cos, 1.0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(300, 90), (90, 300), (700, 256), (256, 700), (384, 588)])
@pytest.mark.parametrize("tau", [0.5, 0.93, 0.99])
def test_gram_top_vectors_matches_exact_svd(shape, tau, monkeypatch):
    """With the top-r path (GRAM_TOP_VECTORS) and without it, gram_svd returns the exact energy
    rank, singular values within 2e-7 relative of the float64 SVD's, orthonormal factors (1e-6),
    the leading singular vectors of the float64 SVD (|cos| >= 1 - 1e-6 where sigma_i is separated
    from its neighbours by >= 1 %) and the same factors either way (within 1e-6 of the product)."""
    monkeypatch.setattr(dec, "GRAM_CPU_LAPACK", "numpy")
    W = power_law(*shape, exponent=0.6, seed=sum(shape))
    Uf, s_ref, Vhf = np.linalg.svd(W.double().numpy(), full_matrices=False)
    exact = loop_rank(s_ref, tau)
    got = {}
    for flag in (True, False):
        monkeypatch.setattr(dec, "GRAM_TOP_VECTORS", flag)
        U, S, Vh, info = dec.gram_svd(W, energy=tau)
        assert info.method == "gram" and info.rank == exact, (flag, info.note)
        np.testing.assert_allclose(S.double().numpy(), s_ref[:exact], rtol=2e-7, atol=0)
        eye = np.eye(exact)
        assert np.abs(U.double().numpy().T @ U.double().numpy() - eye).max() < 1e-6
        assert np.abs(Vh.double().numpy() @ Vh.double().numpy().T - eye).max() < 1e-6
        gap = np.minimum(np.r_[np.inf, s_ref[:-1] - s_ref[1:]][:exact], np.r_[s_ref[:-1] - s_ref[1:], np.inf][:exact])
        sep = gap >= 0.01 * s_ref[:exact]
        cos_u = np.abs((U.double().numpy() * Uf[:, :exact]).sum(0))
        cos_v = np.abs((Vh.double().numpy() * Vhf[:exact]).sum(1))
        assert sep.any()
        assert cos_u[sep].min() >= 1 - 1e-6 and cos_v[sep].min() >= 1 - 1e-6
        got[flag] = ((U.double() * S.double()) @ Vh.double(), S)
    torch.testing.assert_close(got[True][1], got[False][1], rtol=1e-7, atol=0)
    torch.testing.assert_close(got[True][0], got[False][0], rtol=0, atol=1e-6)


def test_gram_top_vectors_explicit_rank_and_fallbacks(monkeypatch):
    """An explicit rank, a zero weight (rank 0, empty factors), SciPy missing and a
    LAPACK error all give the results of numpy.linalg.eigh's path."""
    monkeypatch.setattr(dec, "GRAM_CPU_LAPACK", "numpy")
    W = power_law(200, 120, seed=5)
    s_ref = np.linalg.svd(W.double().numpy(), compute_uv=False)
    U, S, Vh, info = dec.gram_svd(W, rank=17)
    assert info.rank == 17 and U.shape == (200, 17) and Vh.shape == (17, 120)
    np.testing.assert_allclose(S.double().numpy(), s_ref[:17], rtol=2e-7)
    U0, S0, Vh0, info0 = dec.gram_svd(torch.zeros(100, 80), energy=0.9)
    assert info0.rank == 0 and U0.shape == (100, 0) and Vh0.shape == (0, 80) and S0.shape == (0,)
    monkeypatch.setattr(dec, "_scipy_lapack", lambda: None)
    U1, S1, Vh1, info1 = dec.gram_svd(W, rank=17)
    torch.testing.assert_close(S1, S, rtol=1e-7, atol=0)
    torch.testing.assert_close((U1 * S1) @ Vh1, (U * S) @ Vh, rtol=0, atol=1e-6)
    monkeypatch.undo()
    monkeypatch.setattr(dec, "GRAM_CPU_LAPACK", "numpy")
    monkeypatch.setattr(dec, "_tridiagonal_eigh_top", lambda G, top: None)  # a LAPACK info != 0
    U2, S2, Vh2, info2 = dec.gram_svd(W, rank=17)
    torch.testing.assert_close(S2, S, rtol=1e-7, atol=0)


def test_real_minilm_weights_top_vectors(minilm, minilm_singular_values, monkeypatch):
    """All 37 nn.Linear weights of all-MiniLM-L6-v2 at tau 0.93: the top-r path gives the float64
    energy rank and singular values within 2e-7 relative, and factors within 1e-6 of the
    all-vectors path."""
    monkeypatch.setattr(dec, "GRAM_CPU_LAPACK", "numpy")
    for name, mod in minilm.named_modules():
        if type(mod) is not torch.nn.Linear:
            continue
        W = mod.weight.detach()
        s_ref = minilm_singular_values[name]
        exact = loop_rank(s_ref, 0.93)
        monkeypatch.setattr(dec, "GRAM_TOP_VECTORS", True)
        U, S, Vh, info = dec.gram_svd(W, energy=0.93)
        monkeypatch.setattr(dec, "GRAM_TOP_VECTORS", False)
        U1, S1, Vh1, info1 = dec.gram_svd(W, energy=0.93)
        assert info.rank == info1.rank == exact, name
        np.testing.assert_allclose(S.double().numpy(), s_ref[:exact], rtol=2e-7)
        torch.testing.assert_close((U * S) @ Vh, (U1 * S1) @ Vh1, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ truncated_svd_many workers
def test_truncated_svd_many_workers_match_one_by_one():
    """workers=2: the same factors as workers=1, in order, every method (the Gram path's bit for bit,
    the full SVD's within float32 rounding); the thread settings are back afterwards; a mix of
    shapes and dtypes."""
    Ws = [power_law(130, 70, seed=i) for i in range(4)] + [power_law(70, 130, seed=9),
                                                           power_law(90, 90, seed=4).double()]
    torch.set_num_threads(1)
    for svd in ("auto", "gram", "full"):
        one = dec.truncated_svd_many(Ws, energy=0.93, svd=svd, workers=1)
        two = dec.truncated_svd_many(Ws, energy=0.93, svd=svd, workers=2)
        for (U, S, Vh, i1), (U2, S2, Vh2, i2) in zip(one, two):
            assert i1.rank == i2.rank and i1.method == i2.method
            if i1.method == "gram":  # numpy / SciPy's OpenBLAS: the same arithmetic in any thread
                assert torch.equal(U, U2) and torch.equal(S, S2) and torch.equal(Vh, Vh2)
            else:  # torch's MKL SVD can take another code path in a new thread: float32 rounding
                torch.testing.assert_close(S2, S, rtol=2e-6, atol=0)
                torch.testing.assert_close((U2 * S2) @ Vh2, (U * S) @ Vh, rtol=0, atol=2e-5)
        for W, (U, S, Vh, info) in zip(Ws, two):
            assert info.rank == truncated_svd(W, energy=0.93, svd=svd)[3].rank
    assert torch.get_num_threads() == 1 and not dec._PINNED_THREADS
    assert dec.truncated_svd_many(Ws[:1], energy=0.9, workers=3)[0][3].rank == \
        truncated_svd(Ws[0], energy=0.9)[3].rank


def test_truncated_svd_many_workers_use_one_thread_each(monkeypatch):
    """Inside the pool every decomposition sees one torch thread, and the setting is restored."""
    seen = []
    real = dec._gram_svd

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(dec, "_gram_svd", spy)
    torch.set_num_threads(2)
    try:
        dec.truncated_svd_many([power_law(80, 60, seed=i) for i in range(4)], energy=0.9, svd="gram", workers=2)
        assert seen == [1, 1, 1, 1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_truncated_svd_many_bad_workers(bad):
    with pytest.raises(ValueError, match=r"workers: expected a positive int"):
        dec.truncated_svd_many([torch.ones(4, 4)], energy=0.9, workers=bad)


@pytest.mark.parametrize("svd", ["full", "gram", "randomized"])
@pytest.mark.parametrize("shape", [(37, 23), (23, 37), (64, 64)])
def test_singular_vectors_have_the_canonical_sign(svd, shape):
    """Every method returns each component with the largest-magnitude entry of its U column
    positive, so methods (and processes) agree on the factors, not only on their product."""
    g = torch.Generator().manual_seed(sum(shape))
    W = torch.randn(*shape, generator=g) @ torch.diag(torch.logspace(0, -2, shape[1]))
    U, S, Vh, _ = truncated_svd(W, energy=0.95, svd=svd)
    col = U.abs().argmax(dim=0)
    assert (U[col, torch.arange(U.shape[1])] > 0).all()
    U0, S0, Vh0, _ = truncated_svd(W.double(), rank=U.shape[1], svd="full")
    r = min(U.shape[1], 5)  # well-separated leading components: the same vectors, the same sign
    torch.testing.assert_close(U[:, :r].double(), U0[:, :r], rtol=0, atol=1e-4)
    torch.testing.assert_close(Vh[:r].double(), Vh0[:r], rtol=0, atol=1e-4)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, (U0 @ torch.diag(S0) @ Vh0).float(), rtol=0, atol=1e-4)


def test_canonical_signs_keeps_the_product_and_passes_rank_zero():
    from cersa_kernels.decompose import canonical_signs

    g = torch.Generator().manual_seed(3)
    U, Vh = torch.randn(9, 4, generator=g), torch.randn(4, 7, generator=g)
    U2, Vh2 = canonical_signs(U, Vh)
    torch.testing.assert_close(U2 @ Vh2, U @ Vh, rtol=0, atol=0)
    assert (U2.abs() == U.abs()).all() and (U2[U2.abs().argmax(0), torch.arange(4)] > 0).all()
    E, F = torch.empty(9, 0), torch.empty(0, 7)
    assert canonical_signs(E, F)[0].shape == (9, 0)
