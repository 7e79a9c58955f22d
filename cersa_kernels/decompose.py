"""Energy-rank truncated SVD of a weight matrix (CERSA's decomposition step).

Math (DESIGN.md "Notation"; CERSA, arXiv 2605.08174, Sec. 3): for W (m, n) with singular
values sigma_1 >= ... >= sigma_p, p = min(m, n), the energy rank is

    r(tau) = min { r : sum_{i<=r} sigma_i^2 >= tau * ||W||_F^2 },   0 < tau <= 1.

The SVD always runs in float32 or float64 (float64 for float64 weights) on the weight's own
device, economy size only (U is (m, p), never (m, m)).  No nn.Module lives here.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BudgetAllocation", "DecompositionInfo", "SVD_METHODS", "allocate_budget", "singular_values", "check_energy", "check_rank", "check_weight",
           "energy_rank", "randomized_svd", "round_rank", "truncated_svd", "uniform_energy_for_budget"]

#: values of the ``svd=`` option: "full" (LAPACK/cuSOLVER economy SVD), "randomized" (range finder
#: grown until the target energy is reached), "auto" (randomized for large weights, else full).
SVD_METHODS = ("full", "randomized", "auto")

#: "auto" picks the randomized SVD when min(m, n) is at least this and the energy is below 1.
AUTO_RANDOMIZED_MIN_DIM = 512


def check_energy(energy, name: str = "energy") -> float:
    """Validate an energy fraction: a real number in (0, 1].  Returns it as a float.

    Raises TypeError (not a real number) or ValueError (NaN or outside (0, 1]).
    """
    if isinstance(energy, bool) or not isinstance(energy, (int, float)):
        raise TypeError(f"{name}: expected a float in (0, 1], got {type(energy).__name__} {energy!r}")
    energy = float(energy)
    if math.isnan(energy) or not (0.0 < energy <= 1.0):
        raise ValueError(f"{name}: expected a float in (0, 1], got {energy!r}")
    return energy


def check_rank(rank, max_rank: int, name: str = "rank", where: str = "") -> int:
    """Validate an explicit rank: an int with 0 <= rank <= max_rank = min(m, n)."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{name}{where}: expected an int in [0, {max_rank}], got {type(rank).__name__} {rank!r}")
    if not 0 <= rank <= max_rank:
        raise ValueError(f"{name}{where}: expected an int in [0, min(out_features, in_features)={max_rank}], "
                         f"got {rank}")
    return rank


def check_weight(W: Tensor, where: str = "weight") -> None:
    """Raise ValueError/TypeError if W cannot be decomposed: not 2-D, empty, meta, not floating, not finite."""
    if not isinstance(W, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise ValueError(f"{where}: expected a 2-D weight (out_features, in_features), got shape {tuple(W.shape)}")
    if W.is_meta or W.device.type == "meta":
        raise ValueError(f"{where}: the weight is on the meta device (no data to decompose); "
                         f"load or materialise the weights first")
    if not W.is_floating_point():
        raise TypeError(f"{where}: expected a floating-point weight, got dtype {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"{where}: the weight is empty, shape {tuple(W.shape)}")
    if not bool(torch.isfinite(W).all()):
        bad = int((~torch.isfinite(W)).sum())
        raise ValueError(f"{where}: the weight has {bad} non-finite value(s) (NaN or inf)")


def numerical_rank(S: Tensor, shape: tuple[int, int]) -> int:
    """Count of singular values above max(m, n) * eps * sigma_1 (eps of S's dtype), as matrix_rank does."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    tol = max(shape) * torch.finfo(S.dtype).eps * float(S[0])
    return int((S > tol).sum())


def energy_rank(S: Tensor, energy: float, total: float | None = None, nonzero: int | None = None) -> int:
    """Smallest r whose squared singular values hold ``energy`` of the total energy.

    S: (p,) singular values, descending, any floating dtype (summed in float64).
    energy: tau in (0, 1].
    total: ||W||_F^2 if known (e.g. for a partial SVD); default sum(S^2).
    nonzero: how many of S count as nonzero (numerical rank); default all.  With tau = 1 the
      result is exactly ``nonzero``, so an exactly rank-1 weight gives 1 and a zero weight 0.
    Returns an int in [0, nonzero].  Math: DESIGN.md "energy rank r(tau)".
    """
    energy = check_energy(energy)
    s2 = S.detach().to(torch.float64).square()
    if nonzero is None:
        nonzero = s2.numel()
    s2 = s2[:nonzero]
    if nonzero == 0:
        return 0
    cum = torch.cumsum(s2, 0)
    tot = float(cum[-1]) if total is None else float(total)
    if tot <= 0.0:
        return 0
    if energy >= 1.0:
        return nonzero
    r = int(torch.searchsorted(cum, torch.tensor([energy * tot], dtype=torch.float64))[0]) + 1
    return min(r, nonzero)


@dataclass
class DecompositionInfo:
    """What a truncation kept.

    rank: r; max_rank: min(m, n); numerical_rank: singular values above round-off;
    energy: retained fraction sum_{i<=r} sigma_i^2 / ||W||_F^2 (float64; 0.0 for a zero weight);
    total_energy: ||W||_F^2; singular_values: all p of them (float32/64, on the weight's device).
    """

    rank: int
    max_rank: int
    numerical_rank: int
    energy: float
    total_energy: float
    singular_values: Tensor
    method: str = "full"


#: CPU SVDs of matrices with min(m, n) up to this run on one thread (``$CERSA_SVD_THREADS`` overrides
#: with an explicit thread count for every CPU SVD).  LAPACK's SVD (bidiagonalisation) gains little
#: from 2-4 threads at these sizes, and on a loaded machine OpenMP spin-waiting made a 1536 x 384
#: SVD ~20x slower with 2 threads than with 1 (measured on the 2-core CI machine).
SINGLE_THREAD_SVD_MAX_DIM = 1024


@contextlib.contextmanager
def _svd_threads(W: Tensor):
    """Limit torch's intra-op threads around a CPU SVD (see SINGLE_THREAD_SVD_MAX_DIM)."""
    env = os.environ.get("CERSA_SVD_THREADS")
    want = None
    if W.device.type == "cpu":
        if env:
            try:
                want = max(1, int(env))
            except ValueError:
                raise ValueError(f"CERSA_SVD_THREADS: expected a positive int, got {env!r}") from None
        elif min(W.shape) <= SINGLE_THREAD_SVD_MAX_DIM:
            want = 1
    old = torch.get_num_threads()
    if want is None or want == old:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def check_svd(svd) -> str:
    """Validate the ``svd=`` option (one of SVD_METHODS); returns it."""
    if svd not in SVD_METHODS:
        raise ValueError(f"svd: expected one of {SVD_METHODS}, got {svd!r}")
    return svd


def round_rank(rank: int, max_rank: int, *, cap: int | None = None, multiple: int | None = None) -> int:
    """Apply the rank policies of ``convert`` to one layer's rank.

    multiple: round ``rank`` UP to a multiple of it (kernel-friendly tile sizes such as 8 or 16; rounding
      up keeps the energy guarantee), but never beyond ``max_rank`` = min(m, n), which is allowed
      even when it is not a multiple.  A rank of 0 stays 0.
    cap: then limit the rank to at most ``cap`` (the ``max_rank=`` option of convert).
    Returns an int in [0, max_rank].  Raises TypeError/ValueError for a non-positive multiple or a
    negative cap.
    """
    if multiple is not None:
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f"rank_multiple: expected a positive int or None, got {multiple!r}")
        rank = min(max_rank, -(-rank // multiple) * multiple)
    if cap is not None:
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise ValueError(f"max_rank: expected a non-negative int or None, got {cap!r}")
        rank = min(rank, cap)
    return min(rank, max_rank)


def _check_target(W: Tensor, energy, rank, where: str) -> tuple[float | None, int | None, int, int, int]:
    """Check a decomposition request: exactly one of ``energy`` / ``rank``, a usable weight W (m, n).
    Returns (checked energy or None, checked rank or None, m, n, p = min(m, n)); raises
    ValueError/TypeError naming ``where``."""
    if (energy is None) == (rank is None):
        raise ValueError(f"{where}: give exactly one of energy= and rank=, got energy={energy!r}, rank={rank!r}")
    if energy is not None:
        energy = check_energy(energy)
    check_weight(W, where)
    m, n = W.shape
    p = min(m, n)
    if rank is not None:
        rank = check_rank(rank, p, where=f" ({where})")
    return energy, rank, m, n, p


def _cdtype(W: Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def randomized_svd(W: Tensor, energy: float | None = None, rank: int | None = None, *, oversample: int = 10,
                   power_iters: int = 2, start_rank: int | None = None, max_fraction: float = 0.5,
                   generator: torch.Generator | None = None, where: str = "weight"
                   ) -> tuple[Tensor, Tensor, Tensor, DecompositionInfo]:
    """Truncated SVD by a randomized range finder that stops once the target energy is retained.

    W: (m, n) floating, any device (the work runs on W's device in float32, float64 for float64 W).
    energy: tau in (0, 1) -- the returned factors satisfy sum(S^2) >= tau ||W||_F^2, checked against
      the exact total ||W||_F^2 (cheap), so the guarantee holds whatever the random draw; or
    rank: an explicit rank (then the retained energy is simply reported).
    Algorithm (Halko, Martinsson & Tropp 2011, Alg. 4.4 with subspace iteration): l = k + oversample
    Gaussian probes, Y = (W W^T)^q W Omega with QR re-orthonormalisation, Q = qr(Y), B = Q^T W (l, n),
    B = Ub S Vh, U = Q Ub.  Since U S Vh is the orthogonal projection of W onto span(U),
    ||W - U_r S_r Vh_r||_F^2 = ||W||_F^2 - sum_{i<=r} S_i^2 exactly, so the retained energy is exact.
    If the target is not reached, k doubles (start: ``start_rank`` or max(32, p / 16)); once l would
    exceed ``max_fraction`` * p a full SVD is cheaper and is used instead (info.method says which).
    The rank may exceed the exact energy rank by a little (sigma_i(B) <= sigma_i(W)).
    Returns U (m, r), S (r,), Vh (r, n), DecompositionInfo (singular_values: the l values computed,
    not all p; numerical_rank counted among them).
    """
    energy, rank, m, n, p = _check_target(W, energy, rank, where)
    cd = _cdtype(W)
    with torch.no_grad(), _svd_threads(W):
        Wc = W.detach().to(cd)
        total = float(Wc.to(torch.float64).square().sum()) if cd != torch.float64 else float(Wc.square().sum())
        if total == 0.0 or (energy is not None and energy >= 1.0) or rank == p:
            return truncated_svd(W, energy=energy, rank=rank, where=where, svd="full")
        tall = m >= n
        M = Wc if tall else Wc.T  # (big, small): probe from the small side
        k = rank if rank is not None else (start_rank or max(32, p // 16))
        while True:
            l = min(p, k + oversample)
            if l > max_fraction * p:
                return truncated_svd(W, energy=energy, rank=rank, where=where, svd="full")
            omega = torch.randn(M.shape[1], l, device=M.device, dtype=cd, generator=generator)
            Q = torch.linalg.qr(M @ omega).Q
            for _ in range(power_iters):
                Z = torch.linalg.qr(M.T @ Q).Q
                Q = torch.linalg.qr(M @ Z).Q
            Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
            cum = torch.cumsum(S.to(torch.float64).square(), 0)
            if rank is not None:
                r = rank
                break
            if float(cum[-1]) >= energy * total:
                r = int(torch.searchsorted(cum, torch.tensor([energy * total], dtype=torch.float64,
                                                             device=cum.device))[0]) + 1
                r = min(r, l)
                break
            k *= 2
        S_l = S
        U = Q @ Ub[:, :r]
        S, Vh = S[:r], Vh[:r]
        if not tall:  # M = W^T = U S Vh  ->  W = Vh^T S U^T
            U, Vh = Vh.T, U.T
        kept = float(cum[r - 1]) if r else 0.0
        info = DecompositionInfo(rank=r, max_rank=p, numerical_rank=numerical_rank(S_l, (m, n)),
                                 energy=kept / total, total_energy=total, singular_values=S_l,
                                 method="randomized")
    return U.contiguous(), S.contiguous(), Vh.contiguous(), info


def truncated_svd(W: Tensor, energy: float | None = None, rank: int | None = None, *,
                  where: str = "weight", svd: str = "full"
                  ) -> tuple[Tensor, Tensor, Tensor, DecompositionInfo]:
    """Economy SVD of W truncated to the energy rank (or an explicit rank).

    W: (m, n), any floating dtype, any device but meta.  Exactly one of ``energy`` (tau in (0, 1])
    and ``rank`` (0 <= rank <= min(m, n)) is given.
    svd: "full" (default; torch.linalg.svd, exact energy rank), "randomized" (:func:`randomized_svd`:
      stops as soon as sum(S^2) >= tau ||W||_F^2, with the exact total, so the energy guarantee
      holds; the rank can be a little above the exact one), or "auto" (randomized when
      min(m, n) >= AUTO_RANDOMIZED_MIN_DIM and energy < 1, else full).
    Returns U (m, r), S (r,), Vh (r, n) in float32 (float64 when W is float64), contiguous, on W's
    device, with W ~= U diag(S) Vh, and a DecompositionInfo.
    Raises ValueError/TypeError naming ``where`` for an unusable weight or bad energy/rank/svd.
    Math: DESIGN.md "Notation"; the paper's Sec. 3 (energy-retaining truncation).
    """
    check_svd(svd)
    energy, rank, m, n, p = _check_target(W, energy, rank, where)
    if svd == "auto":
        svd = "randomized" if p >= AUTO_RANDOMIZED_MIN_DIM and (energy is None or energy < 1.0) else "full"
    if svd == "randomized":
        return randomized_svd(W, energy=energy, rank=rank, where=where)
    cdtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    with torch.no_grad(), _svd_threads(W):
        U, S, Vh = torch.linalg.svd(W.detach().to(cdtype), full_matrices=False)
    nz = numerical_rank(S, (m, n))
    total = float(S.to(torch.float64).square().sum())
    r = energy_rank(S, energy, nonzero=nz) if energy is not None else rank
    kept = float(S[:r].to(torch.float64).square().sum())
    info = DecompositionInfo(rank=r, max_rank=p, numerical_rank=nz,
                             energy=(kept / total) if total > 0 else 0.0,
                             total_energy=total, singular_values=S)
    return U[:, :r].contiguous(), S[:r].contiguous(), Vh[:r].contiguous(), info


def singular_values(W: Tensor, where: str = "weight") -> Tensor:
    """All min(m, n) singular values of W (descending), float32 (float64 for float64 W), W's device."""
    check_weight(W, where)
    with torch.no_grad(), _svd_threads(W):
        return torch.linalg.svdvals(W.detach().to(_cdtype(W)))


@dataclass
class BudgetAllocation:
    """Result of :func:`allocate_budget`.

    ranks: one rank per layer; stored: sum r_l (m_l + n_l + 1); budget: the allowed number of
    stored numbers; energies: per-layer retained fraction; mean_energy: their mean (the objective).
    """

    ranks: list[int]
    stored: int
    budget: int
    energies: list[float]
    mean_energy: float


def _check_budget(budget) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget) or budget <= 0:
        raise ValueError(f"budget: expected a fraction > 0 of the dense frozen parameters, got {budget!r}")
    return float(budget)


def allocate_budget(spectra: list[Tensor], shapes: list[tuple[int, int]], budget: float, *,
                    caps: list[int] | None = None, multiple: int | None = None) -> BudgetAllocation:
    """Allocate ranks across layers under a total size budget, greedily by energy per stored number.

    spectra: per layer, all singular values S_l (p_l,), descending.  shapes: (m_l, n_l).
    budget: fraction of the dense frozen numbers sum_l m_l n_l that the truncated factors may store,
      a rank-r layer storing r (m_l + n_l + 1) numbers (DESIGN.md "Stored frozen parameters").
    caps: per-layer maximum rank (e.g. the break-even rank or a max_rank cap); default p_l.
    multiple: allocate in blocks of this many components (ranks multiples of it, or the cap).
    Objective: maximise sum_l E_l(r_l), E_l(r) = sum_{i<=r} sigma_{l,i}^2 / ||W_l||_F^2 (each layer's
    retained energy fraction), subject to sum_l r_l (m_l + n_l + 1) <= budget * sum_l m_l n_l.
    Each block's gain per stored number, sigma^2 / (||W||^2 (m + n + 1)), decreases within a layer,
    so taking blocks in order of that ratio (a merge of the per-layer sorted lists) gives per-layer
    prefixes; it is the optimal fractional-knapsack solution, stopped at the first block that does
    not fit (a block that does not fit is skipped and smaller later blocks may still be taken).
    Raises ValueError for a bad budget or mismatched lists.
    """
    budget = _check_budget(budget)
    if len(spectra) != len(shapes):
        raise ValueError(f"spectra and shapes: expected lists of equal length, got {len(spectra)} and {len(shapes)}")
    step = multiple or 1
    dense = sum(m * n for m, n in shapes)
    allowed = int(math.floor(budget * dense))
    items = []  # (-ratio, layer, block end rank, cost)
    fracs = []
    for li, (S, (m, n)) in enumerate(zip(spectra, shapes)):
        s2 = S.detach().to(torch.float64).square().cpu()
        tot = float(s2.sum())
        frac = s2 / tot if tot > 0 else torch.zeros_like(s2)
        fracs.append(torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(frac, 0)]))
        cap = min(len(s2), caps[li]) if caps is not None else len(s2)
        start = 0
        while start < cap:
            end = min(cap, start + step)
            gain = float(frac[start:end].sum())
            cost = (end - start) * (m + n + 1)
            if gain > 0:
                items.append((-gain / cost, li, end, cost))
            start = end
    items.sort(key=lambda t: (t[0], t[1], t[2]))
    ranks = [0] * len(spectra)
    used = 0
    for _, li, end, cost in items:
        # blocks of one layer come in order, so the block extends the current prefix
        if used + cost > allowed:
            continue
        if end - ranks[li] > step or end <= ranks[li]:
            continue  # an earlier block of this layer was skipped: keep the prefix contiguous
        ranks[li] = end
        used += cost
    energies = [float(fracs[i][r]) for i, r in enumerate(ranks)]
    return BudgetAllocation(ranks, used, allowed, energies, sum(energies) / len(energies) if energies else 0.0)


def uniform_energy_for_budget(spectra: list[Tensor], shapes: list[tuple[int, int]], stored: int,
                              caps: list[int] | None = None, multiple: int | None = None,
                              iters: int = 50) -> tuple[float, list[int], int]:
    """The largest single energy tau whose per-layer energy ranks store at most ``stored`` numbers.

    The per-layer-energy baseline a budget allocation is compared with, at the same size.
    Returns (tau, ranks, stored numbers of those ranks); tau is found by bisection on (0, 1].
    """
    def ranks_for(tau):
        out = []
        for li, S in enumerate(spectra):
            r = energy_rank(S, tau)
            r = round_rank(r, len(S), cap=caps[li] if caps is not None else None, multiple=multiple)
            out.append(r)
        return out

    def cost(rs):
        return sum(r * (m + n + 1) for r, (m, n) in zip(rs, shapes))

    lo, hi = 0.0, 1.0
    if cost(ranks_for(1.0)) <= stored:
        rs = ranks_for(1.0)
        return 1.0, rs, cost(rs)
    for _ in range(iters):
        mid = (lo + hi) / 2
        if mid <= 0:
            break
        if cost(ranks_for(mid)) <= stored:
            lo = mid
        else:
            hi = mid
    rs = ranks_for(lo) if lo > 0 else [0] * len(spectra)
    return lo, rs, cost(rs)
