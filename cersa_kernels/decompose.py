"""Energy-rank truncated SVD of a weight matrix (CERSA's decomposition step).

Math (DESIGN.md "Notation"; CERSA, arXiv 2605.08174, Sec. 3): for W (m, n) with singular
values sigma_1 >= ... >= sigma_p, p = min(m, n), the energy rank is

    r(tau) = min { r : sum_{i<=r} sigma_i^2 >= tau * ||W||_F^2 },   0 < tau <= 1.

The SVD always runs in float32 or float64 (float64 for float64 weights) on the weight's own
device, economy size only (U is (m, p), never (m, m)).  No nn.Module lives here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DecompositionInfo", "check_energy", "check_rank", "check_weight", "energy_rank",
           "truncated_svd"]


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


def truncated_svd(W: Tensor, energy: float | None = None, rank: int | None = None, *,
                  where: str = "weight") -> tuple[Tensor, Tensor, Tensor, DecompositionInfo]:
    """Economy SVD of W truncated to the energy rank (or an explicit rank).

    W: (m, n), any floating dtype, any device but meta.  Exactly one of ``energy`` (tau in (0, 1])
    and ``rank`` (0 <= rank <= min(m, n)) is given.
    Returns U (m, r), S (r,), Vh (r, n) in float32 (float64 when W is float64), contiguous, on W's
    device, with W ~= U diag(S) Vh, and a DecompositionInfo.
    Raises ValueError/TypeError naming ``where`` for an unusable weight or bad energy/rank.
    Math: DESIGN.md "Notation"; the paper's Sec. 3 (energy-retaining truncation).
    """
    if (energy is None) == (rank is None):
        raise ValueError(f"{where}: give exactly one of energy= and rank=, got energy={energy!r}, rank={rank!r}")
    if energy is not None:
        energy = check_energy(energy)
    check_weight(W, where)
    m, n = W.shape
    p = min(m, n)
    if rank is not None:
        rank = check_rank(rank, p, where=f" ({where})")
    cdtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        U, S, Vh = torch.linalg.svd(W.detach().to(cdtype), full_matrices=False)
    nz = numerical_rank(S, (m, n))
    total = float(S.to(torch.float64).square().sum())
    r = energy_rank(S, energy, nonzero=nz) if energy is not None else rank
    kept = float(S[:r].to(torch.float64).square().sum())
    info = DecompositionInfo(rank=r, max_rank=p, numerical_rank=nz,
                             energy=(kept / total) if total > 0 else 0.0,
                             total_energy=total, singular_values=S)
    return U[:, :r].contiguous(), S[:r].contiguous(), Vh[:r].contiguous(), info
