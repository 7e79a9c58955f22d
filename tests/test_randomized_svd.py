"""The randomized SVD of cersa_kernels/decompose.py (randomized_svd, truncated_svd(svd="randomized"
| "auto")): a checkable energy guarantee, the fall-back to the full SVD, an explicit rank, and when
"auto" uses it.  The rest of decompose.py is tested in tests/test_decompose.py."""
from __future__ import annotations

import pytest
import torch

from cersa_kernels.decompose import randomized_svd, truncated_svd

from helpers import spectrum_matrix


def _decaying(m, n, decay, seed=0, dtype=torch.float32):
    """An (m, n) weight of singular values exp(-i / decay)."""
    sigmas = torch.exp(-torch.arange(min(m, n), dtype=torch.float64) / decay)
    return spectrum_matrix(m, n, sigmas, seed=seed, dtype=dtype)


@pytest.mark.parametrize("shape", [(300, 90), (90, 300), (257, 257)])
@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_randomized_svd_meets_the_energy_target_exactly_checked(shape, energy):
    W = _decaying(*shape, decay=12.0, seed=1)
    U, S, Vh, info = randomized_svd(W, energy=energy, generator=torch.Generator().manual_seed(0),
                                    max_fraction=1.0)
    total = float(W.double().square().sum())
    resid = float((W.double() - (U.double() * S.double()) @ Vh.double()).square().sum())
    kept = 1.0 - resid / total  # measured independently of the returned S
    assert kept >= energy - 1e-5, (kept, energy)
    assert abs(info.energy - kept) < 1e-5
    exact = truncated_svd(W, energy=energy)[3].rank
    assert exact <= info.rank <= exact + 2  # sigma_i(Q^T W) <= sigma_i(W): the rank can only grow
    # orthonormal factors, descending S
    torch.testing.assert_close(U.T @ U, torch.eye(info.rank), atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(info.rank), atol=1e-5, rtol=0)
    assert bool((S[:-1] >= S[1:]).all())


def test_randomized_svd_falls_back_to_full_for_flat_spectra_and_full_energy():
    W = torch.randn(120, 80, generator=torch.Generator().manual_seed(2))  # flat spectrum: rank ~ p
    info = truncated_svd(W, energy=0.95, svd="randomized")[3]
    assert info.method == "full" and info.rank == truncated_svd(W, energy=0.95)[3].rank
    assert truncated_svd(W, energy=1.0, svd="randomized")[3].rank == 80


def test_randomized_svd_explicit_rank_and_errors():
    W = _decaying(200, 64, decay=5.0, seed=3, dtype=torch.float64)
    U, S, Vh, info = randomized_svd(W, rank=7)
    assert U.shape == (200, 7) and S.shape == (7,) and Vh.shape == (7, 64) and U.dtype == torch.float64
    _, S_ex, _, _ = truncated_svd(W, rank=7)
    torch.testing.assert_close(S, S_ex, rtol=1e-8, atol=0)
    with pytest.raises(ValueError, match="svd"):
        truncated_svd(W, energy=0.9, svd="fast")
    with pytest.raises(ValueError, match="exactly one"):
        randomized_svd(W)


def test_auto_runs_an_exact_rank_method_with_the_exact_rank():
    """"auto" picks among the exact-rank methods (never the randomized sketch), small or large, and
    returns the full SVD's energy rank."""
    for W in (_decaying(100, 60, decay=5.0), _decaying(600, 520, decay=8.0)):
        info = truncated_svd(W, energy=0.9, svd="auto")[3]
        assert info.method in ("full", "gram")
        assert info.rank == truncated_svd(W, energy=0.9, svd="full")[3].rank
