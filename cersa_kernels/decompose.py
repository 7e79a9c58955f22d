"""Energy-rank truncated SVD of a weight matrix (CERSA's decomposition step).

Math (docs/design.md "Notation" and "energy rank r(tau)"; CERSA, arXiv 2605.08174, Sec. 3): for
W (m, n) with singular values sigma_1 >= ... >= sigma_p, p = min(m, n), the energy rank is

    r(tau) = min { r : sum_{i<=r} sigma_i^2 >= tau * ||W||_F^2 },   0 < tau <= 1.

Methods (the ``svd=`` option, SVD_METHODS).  Every one runs on the weight's own device
(torch.linalg works on CUDA as on the CPU), economy size only (U is (m, r), never (m, m)), in
float32 (float64 for float64 weights):

* "full" -- LAPACK / cuSOLVER SVD (:func:`truncated_svd`).  Exact energy rank: a cut that the
  float32 singular values cannot decide is settled with float64 Gram eigenvalues.
* "gram" -- eigendecomposition of the float64 Gram matrix of the smaller side (:func:`gram_svd`).
  Exact energy rank; factors as accurate as float32's unit roundoff allows wherever the retained
  sigma_r is not too small relative to ||W||_F (else it falls back to "full").  1.2-3.3x faster
  per layer than "full" on the real MiniLM / SmolLM2 / DINOv2 weights (bench/bench_convert_time.py);
  on the CPU with SciPy only the r retained eigenvectors are computed (GRAM_TOP_VECTORS).
* "randomized" -- randomized range finder grown until the energy target is met
  (:func:`randomized_svd`).  Energy guarantee exact up to float32 rounding of the retained energy
  (~1e-6 relative); rank >= the exact energy rank (not always equal) except at cuts within that
  rounding, where it can be one below; so "auto" never picks it.
* "auto" -- :func:`choose_svd`: the cheapest method, by a cost model of the shape and the rank,
  among those that give the exact energy rank.

No nn.Module lives here.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BudgetAllocation", "DecompositionInfo", "EXACT_RANK_METHODS", "GRAM_SIGMA_RTOL", "SVD_METHODS",
           "allocate_budget", "canonical_signs", "check_energy", "check_rank", "check_svd", "check_weight", "choose_svd",
           "energy_rank", "estimate_svd_seconds", "gram_eigenvalue_error", "gram_svd", "pool_eligible",
           "randomized_svd", "round_rank", "singular_values", "truncated_svd", "truncated_svd_many",
           "uniform_energy_for_budget"]

#: values of the ``svd=`` option: "full" (LAPACK/cuSOLVER economy SVD), "gram" (float64 Gram
#: eigendecomposition, :func:`gram_svd`), "randomized" (range finder grown until the target energy
#: is reached), "auto" (:func:`choose_svd`).
SVD_METHODS = ("full", "gram", "randomized", "auto")

#: the methods whose energy rank equals the exact one (the rank of the float64 spectrum).
EXACT_RANK_METHODS = ("full", "gram")

#: The threshold of an earlier "auto" rule (randomized SVD whenever min(m, n) >= 512 and energy < 1).
#: decompose no longer uses it: "auto" is :func:`choose_svd`.  Kept so that importers still load.
AUTO_RANDOMIZED_MIN_DIM = 512

#: The Gram path's accuracy target: the estimated relative error of the smallest retained singular
#: value (see :func:`gram_eigenvalue_error`) must not exceed this (float32's unit roundoff, 2^-24),
#: else :func:`gram_svd` falls back to the full SVD.
GRAM_SIGMA_RTOL = 2.0 ** -24

_EPS32 = torch.finfo(torch.float32).eps  # 2^-23
_EPS64 = torch.finfo(torch.float64).eps  # 2^-52

#: The float32 SVD's cumulative energies sum_{i<=k} sigma_i^2 are taken to be within this many
#: eps32 * sigma_1 * sum_{i<=k} sigma_i of the exact ones (observed at most 13 on the 37 MiniLM and
#: 211 SmolLM2 weights; a single sigma_i was off by up to 30 eps32 * sigma_1).  An energy cut closer
#: than that bound is settled with float64 Gram eigenvalues.
FULL_ENERGY_ERROR_EPS = 32.0


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
    """Raise ValueError/TypeError if W cannot be decomposed: not 2-D, empty, meta, not floating, not finite.

    Finiteness is read from one reduction (the 2-norm of W, which is NaN or inf exactly when an
    entry is, or when it overflows); only then are the non-finite entries counted.
    """
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
    Wd = W.detach()
    acc = torch.float64 if Wd.dtype == torch.float64 else torch.float32
    if math.isfinite(float(torch.linalg.vector_norm(Wd, dtype=acc))):
        return
    if not bool(torch.isfinite(Wd).all()):
        bad = int((~torch.isfinite(Wd)).sum())
        raise ValueError(f"{where}: the weight has {bad} non-finite value(s) (NaN or inf)")


def numerical_rank(S: Tensor, shape: tuple[int, int]) -> int:
    """Count of singular values above max(m, n) * eps * sigma_1 (eps of S's dtype), as matrix_rank does."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    tol = max(shape) * torch.finfo(S.dtype).eps * float(S[0])
    return int((S > tol).sum())


def _energy_rank_sq(lam: Tensor, energy: float, total: float, nonzero: int) -> int:
    """energy_rank on squared singular values ``lam`` (descending, float64) with a given total."""
    if nonzero == 0 or total <= 0.0:
        return 0
    if energy >= 1.0:
        return nonzero
    cum = torch.cumsum(lam[:nonzero].detach().to(torch.float64).cpu(), 0)
    r = int(torch.searchsorted(cum, torch.tensor([energy * total], dtype=torch.float64))[0]) + 1
    return min(r, nonzero)


def energy_rank(S: Tensor, energy: float, total: float | None = None, nonzero: int | None = None) -> int:
    """Smallest r whose squared singular values hold ``energy`` of the total energy.

    S: (p,) singular values, descending, any floating dtype (summed in float64).
    energy: tau in (0, 1].
    total: ||W||_F^2 if known (e.g. for a partial SVD); default sum(S^2).
    nonzero: how many of S count as nonzero (numerical rank); default all.  With tau = 1 the
      result is exactly ``nonzero``, so an exactly rank-1 weight gives 1 and a zero weight 0.
    Returns an int in [0, nonzero].  Math: docs/design.md "energy rank r(tau)".
    """
    energy = check_energy(energy)
    s2 = S.detach().to(torch.float64).square()
    if nonzero is None:
        nonzero = s2.numel()
    s2 = s2[:nonzero]
    if nonzero == 0:
        return 0
    tot = float(s2.sum()) if total is None else float(total)
    return _energy_rank_sq(s2, energy, tot, nonzero)


@dataclass
class DecompositionInfo:
    """What a truncation kept.

    rank: r; max_rank: min(m, n); numerical_rank: singular values above round-off;
    energy: retained fraction sum_{i<=r} sigma_i^2 / ||W||_F^2 (float64; 0.0 for a zero weight);
    total_energy: ||W||_F^2; singular_values: all p of them (float32/64, on the weight's device;
    the randomized path: the l it computed); method: the method that ran ("full", "gram",
    "randomized"); note: why it differs from the one asked for, or how the cut was settled ("" if
    nothing to say).
    """

    rank: int
    max_rank: int
    numerical_rank: int
    energy: float
    total_energy: float
    singular_values: Tensor
    method: str = "full"
    note: str = ""


#: CPU SVDs of matrices with min(m, n) up to this run on one thread (``$CERSA_SVD_THREADS`` overrides
#: with an explicit thread count for every CPU SVD / eigendecomposition).  LAPACK's SVD
#: (bidiagonalisation) and symmetric eigensolver (tridiagonalisation) gain little from 2-4 threads
#: at these sizes, and on a loaded machine OpenMP spin-waiting made a 1536 x 384 SVD ~20x slower
#: with 2 threads than with 1 (measured on the 2-core CI machine).  The Gram path follows the same
#: rule for all its steps (float64 product, eigh, recovery of the other side): with 2 threads on
#: the loaded machine its products stalled the same way, and it lost to the one-thread full SVD.
SINGLE_THREAD_SVD_MAX_DIM = 1024


#: Non-empty while :func:`truncated_svd_many` runs its worker threads: the thread limits (one torch
#: thread, one BLAS thread) are then set once for the whole pool, and _svd_threads / _blas_threads
#: leave them alone (they change process-wide settings, which concurrent workers must not restore
#: under each other).
_PINNED_THREADS: list = []


@contextlib.contextmanager
def _svd_threads(W: Tensor):
    """Limit torch's intra-op threads around a CPU SVD (see SINGLE_THREAD_SVD_MAX_DIM)."""
    if _PINNED_THREADS:  # truncated_svd_many's workers: one thread each, set for the whole pool
        yield
        return
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


# ----------------------------------------------------------------------------------------------
# Gram path
# ----------------------------------------------------------------------------------------------
#: The float64 Gram matrix is accumulated over row blocks of about this many float64 numbers
#: (16 MiB), so that no float64 copy of a large weight (e.g. a 49152 x 576 lm_head) is made.
GRAM_BLOCK_NUMBERS = 1 << 21


def _small_side(W: Tensor) -> tuple[Tensor, bool]:
    """(M, tall): M = W (m >= n) or W^T (a view), so that M is (max(m, n), p)."""
    tall = W.shape[0] >= W.shape[1]
    return (W if tall else W.T), tall


#: LAPACK / BLAS of the Gram path on the CPU: "torch" (torch.linalg, the BLAS / LAPACK torch was
#: built with, MKL in the PyPI wheels) or "numpy" (numpy.linalg.eigh and numpy's syrk-based
#: M^T M, the OpenBLAS of the numpy wheels).  None (default): whichever computes a 256 x 256
#: float64 eigendecomposition faster, timed once per process (on the AMD EPYC development machine
#: numpy's was 2x faster at p = 384..1536: MKL takes generic code paths on non-Intel CPUs).
#: ``$CERSA_GRAM_LAPACK`` (torch | numpy) overrides it.  CUDA weights always use torch.
GRAM_CPU_LAPACK: str | None = None
_LAPACK_CHOICE: list = []


def _cpu_lapack() -> str:
    """"torch" or "numpy" for the CPU Gram path (see GRAM_CPU_LAPACK)."""
    want = os.environ.get("CERSA_GRAM_LAPACK") or GRAM_CPU_LAPACK
    if want is not None:
        if want not in ("torch", "numpy"):
            raise ValueError(f"CERSA_GRAM_LAPACK / GRAM_CPU_LAPACK: expected 'torch' or 'numpy', got {want!r}")
        return want
    if not _LAPACK_CHOICE:
        import time

        import numpy as np

        g = torch.Generator().manual_seed(0)
        A = torch.randn(256, 256, generator=g, dtype=torch.float64)
        G = A.T @ A
        Gn = G.numpy()
        best = {"torch": math.inf, "numpy": math.inf}
        with _svd_threads(G), _blas_threads(G):
            for _ in range(3):
                for name, fn in (("torch", lambda: torch.linalg.eigh(G)), ("numpy", lambda: np.linalg.eigh(Gn))):
                    t0 = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - t0)
        _LAPACK_CHOICE.append(min(best, key=best.get))
    return _LAPACK_CHOICE[0]


def _use_numpy(T: Tensor) -> bool:
    return T.device.type == "cpu" and _cpu_lapack() == "numpy"


@contextlib.contextmanager
def _blas_threads(W: Tensor, want: int | None = None):
    """numpy's BLAS/LAPACK threads limited to ``want`` (default: as _svd_threads limits torch's,
    one thread for min(m, n) <= SINGLE_THREAD_SVD_MAX_DIM or ``$CERSA_SVD_THREADS``), through
    threadpoolctl when it is installed (otherwise numpy's own default stands)."""
    if _PINNED_THREADS:
        yield
        return
    if want is None:
        env = os.environ.get("CERSA_SVD_THREADS")
        want = int(env) if env and env.isdigit() and int(env) > 0 else (
            1 if min(W.shape) <= SINGLE_THREAD_SVD_MAX_DIM else None)
    if want is None or W.device.type != "cpu":
        yield
        return
    if not _THREADPOOL:
        try:
            from threadpoolctl import ThreadpoolController

            if GRAM_TOP_VECTORS:
                _scipy_lapack()  # SciPy's own OpenBLAS must be loaded to be seen (and limited) below
            _THREADPOOL.append(ThreadpoolController())  # inspecting the loaded libraries once: ~5 ms
        except ImportError:
            _THREADPOOL.append(None)
    if _THREADPOOL[0] is None:
        yield
        return
    with _THREADPOOL[0].limit(limits=want, user_api="blas"):
        yield


_THREADPOOL: list = []


def _gram64(M: Tensor) -> Tensor:
    """G = M^T M (p, p) in float64 for M (big, p) of any floating dtype, on M's device.

    float32 (and 16-bit) products are exact in float64, so only the float64 accumulation rounds.
    Accumulated over row blocks of GRAM_BLOCK_NUMBERS numbers (no float64 copy of a large M)."""
    big, p = M.shape
    rows = max(1, GRAM_BLOCK_NUMBERS // max(p, 1))
    if _use_numpy(M):
        import numpy as np

        Mn = M.numpy() if M.dtype in (torch.float32, torch.float64) else M.to(torch.float32).numpy()
        G = np.zeros((p, p), dtype=np.float64)
        with _blas_threads(M):
            for i in range(0, big, rows):
                Mb = Mn[i:i + rows].astype(np.float64)
                G += Mb.T @ Mb  # numpy runs this as a symmetric rank-k update (syrk): half the flops
        return torch.from_numpy(G)
    if big <= rows:
        Md = M.to(torch.float64)
        return Md.T @ Md
    G = torch.zeros(p, p, dtype=torch.float64, device=M.device)
    for i in range(0, big, rows):
        Mb = M[i:i + rows].to(torch.float64)
        G.addmm_(Mb.T, Mb)
    return G


def gram_eigenvalue_error(shape: tuple[int, int], lam1: float, total: float) -> float:
    """Estimated absolute error of each computed eigenvalue of the float64 Gram matrix of W (m, n).

    delta = eps64 * (sqrt(max(m, n)) * ||W||_F^2 + p * sigma_1^2),  eps64 = 2^-52, p = min(m, n).

    The first term is the rounding of the float64 accumulation of max(m, n) exact products
    (||dG||_F <= sqrt(max(m, n)) u ||W||_F^2 for rounding errors of random sign; the worst case has
    max(m, n) instead of its square root), the second the backward error of the symmetric
    eigensolver (p u ||G||_2).  Source: Higham, "Accuracy and Stability of Numerical Algorithms",
    2nd ed., Sec. 3.1 (inner products) and Sec. 3.5 (probabilistic bounds); Weyl's inequality
    |lambda_i(G + dG) - lambda_i(G)| <= ||dG||_2.  Returns a float >= 0 (the unit of sigma^2).
    """
    big, p = max(shape), min(shape)
    return _EPS64 * (math.sqrt(big) * total + p * lam1)


#: On the CPU with the numpy back end (GRAM_CPU_LAPACK), compute only the eigenvectors the
#: truncation keeps when SciPy's LAPACK wrappers are importable (:func:`_tridiagonal_eigh_top`): the
#: same tridiagonal reduction and divide-and-conquer as numpy.linalg.eigh (LAPACK dsyevd), but the
#: back-transformation (2 p^2 r flops instead of 2 p^3) only for the r retained vectors.  On the
#: real 576 x 576 SmolLM2 Gram matrices (one thread): 0.75-0.95x numpy.linalg.eigh's time, the same
#: eigenvalues bit for bit (bench/bench_convert_time.py --solvers).  False: always all p vectors.
GRAM_TOP_VECTORS = True

#: Gram matrices smaller than this use numpy.linalg.eigh even when GRAM_TOP_VECTORS is set (the
#: saving is below the call overhead).
GRAM_TOP_VECTORS_MIN_DIM = 64


def _scipy_lapack():
    """scipy.linalg.lapack, or None when SciPy is not installed (it is optional)."""
    try:
        from scipy.linalg import lapack
    except ImportError:
        return None
    return lapack


def _tridiagonal_eigh_top(Gn, top):
    """Eigenvalues (ascending, all p) and the eigenvectors of the ``top(eigenvalues)`` largest ones
    of the symmetric float64 numpy array Gn (p, p), lower triangle read, with LAPACK through SciPy:
    dsytrd (Householder tridiagonalisation G = Q T Q^T, blocked), dstevd (divide and conquer on T:
    all eigenvalues and eigenvectors Z of T; what dsyevd does) and dormqr (V = Q Z for the last
    r columns of Z only; dsyevd's dormtr applies Q to all p).  Q = diag(1, Q') with Q' the product
    of the p - 1 reflectors that dsytrd stores below the subdiagonal, in dgeqrf's layout
    (LAPACK's dormtr, UPLO = 'L').  Returns (lam (p,), V (p, r)), both float64 numpy, ascending
    order as dsyevd; None when a LAPACK call reports an error (the caller then uses
    numpy.linalg.eigh).  Source: LAPACK Users' Guide, 3rd ed., Sec. 2.4.4 and the dsyevd / dormtr
    reference implementations; Golub & Van Loan, "Matrix Computations", 4th ed., Sec. 8.3.1."""
    import numpy as np

    lapack = _scipy_lapack()
    p = Gn.shape[0]
    lwork = int(lapack.dsytrd_lwork(p, lower=1)[0])
    c, d, e, tau, info = lapack.dsytrd(Gn, lower=1, lwork=max(lwork, 1))
    if info != 0:
        return None
    lam, Z, info = lapack.dstevd(d, e, compute_v=1)
    if info != 0:
        return None
    r = int(top(torch.from_numpy(lam[::-1].copy()).clamp_min(0.0)))
    r = max(0, min(r, p))
    V = np.empty((p, r), dtype=np.float64)
    if r:
        V[0] = Z[0, p - r:]
        Zr = np.asfortranarray(Z[1:, p - r:])
        A = c[1:, :p - 1]
        lw = int(lapack.dormqr("L", "N", A, tau, Zr, -1)[1][0])
        V[1:], _, info = lapack.dormqr("L", "N", A, tau, Zr, max(lw, 1), overwrite_c=1)
        if info != 0:
            return None
    return lam, V


def _eigh_desc(G: Tensor, W: Tensor, vectors: bool, top=None):
    """Eigenvalues (descending, clamped at 0) and, with ``vectors``, eigenvectors (columns in the
    same order) of the symmetric float64 G (lower triangle read), on G's device.

    top: with ``vectors``, an optional function of the descending clamped eigenvalues (float64 CPU
    tensor) returning how many leading eigenvectors the caller needs; V then has at least that many
    columns (exactly that many on the SciPy path, see GRAM_TOP_VECTORS; all p elsewhere)."""
    if _use_numpy(G):
        import numpy as np

        with _blas_threads(W):
            if vectors and top is not None and GRAM_TOP_VECTORS and G.shape[0] >= GRAM_TOP_VECTORS_MIN_DIM \
                    and _scipy_lapack() is not None:
                got = _tridiagonal_eigh_top(G.numpy(), top)
                if got is not None:
                    lam, V = got
                    return (torch.from_numpy(lam[::-1].copy()).clamp_min(0.0),
                            torch.from_numpy(V[:, ::-1].copy()))
            if vectors:
                lam, V = np.linalg.eigh(G.numpy())
            else:
                lam, V = np.linalg.eigvalsh(G.numpy()), None
        lam = torch.from_numpy(lam[::-1].copy()).clamp_min(0.0)
        return lam, (torch.from_numpy(V[:, ::-1].copy()) if vectors else None)
    with _svd_threads(W):
        if vectors:
            lam, V = torch.linalg.eigh(G)
        else:
            lam, V = torch.linalg.eigvalsh(G), None
    return lam.flip(0).clamp_min(0.0), (V.flip(1) if vectors else None)


def gram_svd(W: Tensor, energy: float | None = None, rank: int | None = None, *, where: str = "weight",
             fallback: bool = True) -> tuple[Tensor, Tensor, Tensor, DecompositionInfo]:
    """Truncated SVD of W from the eigendecomposition of its float64 Gram matrix.

    W: (m, n) floating, any device but meta; exactly one of ``energy`` (tau in (0, 1]) and ``rank``.
    Algorithm: with M = W (m >= n) or W^T, so that M is (max(m, n), p), p = min(m, n):
      G = M^T M in float64 (products of float32 numbers are exact in float64), G = V diag(lam) V^T
      (torch.linalg.eigh; on the CPU numpy.linalg.eigh where it is faster, GRAM_CPU_LAPACK),
      sigma_i = sqrt(lam_i).  The rank is the energy rank of lam against
      ||W||_F^2 = trace(G).  The retained small-side vectors V_r come from eigh; the other side
      is recovered as M V_r diag(1 / sigma_r) in the weight's compute dtype.  Hence for m >= n
      U = W V_r / sigma_r, Vh = V_r^T, and for m < n U = V_r, Vh = U^T W / sigma_r.
    Cost: max(m, n) p^2 / 2 float64 multiply-adds (a symmetric product) + one p x p float64 eigh
      + max(m, n) p r float32 ones, against the full SVD's bidiagonalisation and p x p SVD; no
      float64 copy of W is made (G is accumulated over row blocks).

    Accuracy (docs/design.md "Computing the truncated SVD"):
      * every eigenvalue is within delta = gram_eigenvalue_error(W.shape, sigma_1^2, ||W||_F^2) of
        sigma_i^2, so sigma_i has relative error about delta / (2 sigma_i^2): it grows like
        eps64 * (sqrt(max(m, n)) ||W||_F^2 + p sigma_1^2) / sigma_i^2.  Digits are lost only for
        small singular values: a sigma_i with sigma_i^2 / ||W||_F^2 = 10^-k keeps about
        16 - k - log10(sqrt(max(m, n)) + p sigma_1^2 / ||W||_F^2) digits, and those below
        sqrt(delta) are not resolved at all (counted as zero in ``numerical_rank``).
        Energy-truncated factors need only the large ones: on the 37 MiniLM and 211 SmolLM2
        weights at tau <= 0.999 the estimate for the retained sigma_r is below 1e-9 (observed
        errors below 3e-14; the observed eigenvalue errors were at most 0.02 delta).
      * retained factors: the guard requires delta / (2 sigma_r^2) <= GRAM_SIGMA_RTOL (2^-24),
        i.e. the smallest kept singular value is accurate to float32's unit roundoff; then the
        recovered factor's columns are orthonormal to about eps32 ||W||_F / sigma_r + delta /
        sigma_r^2 (measured on SmolLM2 at tau 0.93 / 0.99: max |U^T U - I| <= 2.1e-7, against
        1.4e-6 .. 1.7e-6 for the float32 LAPACK SVD; so no re-orthogonalisation is needed), and
        U diag(S) Vh = W V_r V_r^T is the orthogonal projection of W onto the retained subspace
        up to one float32 rounding of the product.  When the guard fails (sigma_r too small
        against ||W||_F and sigma_1, e.g. tau = 1 on a rank-deficient weight, or a zero weight)
        the call falls back to the full SVD (info.method "full", info.note says why), unless
        ``fallback=False``, which returns the Gram factors anyway with the estimate in info.note.
      * the energy rank is exact: the cumulative energies are within r * delta of the exact ones
        (relative ~1e-13 here), far below the float32 SVD's ~1e-7; ties at the cut closer than that
        are decided by the float64 rounding.
      * float64 weights: the result has float32-class accuracy in that sense only (not float64's);
        "auto" therefore uses the full SVD for them.
    Returns U (m, r), S (r,), Vh (r, n) in float32 (float64 for float64 W), contiguous, on W's
    device, and a DecompositionInfo (method "gram"; singular_values: all p, sqrt of the eigenvalues).
    Raises ValueError/TypeError naming ``where`` for an unusable weight or bad energy/rank.
    """
    energy, rank, m, n, p = _check_target(W, energy, rank, where)
    return _gram_svd(W, energy, rank, where, fallback)


def _gram_svd(W: Tensor, energy: float | None, rank: int | None, where: str, fallback: bool = True
              ) -> tuple[Tensor, Tensor, Tensor, DecompositionInfo]:
    """The "gram" method on an already checked request (see gram_svd)."""
    with torch.no_grad(), _svd_threads(W):
        Wc = W.detach().to(_cdtype(W))
        G = _gram64(_small_side(Wc)[0])
        total = float(G.diagonal().sum())
        lam, V = _eigh_desc(G, W, vectors=True,
                            top=lambda lam: _gram_rank(W.shape, Wc.dtype, lam, total, energy, rank)[0])
        return _gram_factors(W, Wc, total, lam, V, energy, rank, where, fallback)


def _gram_rank(shape: tuple[int, int], cd: torch.dtype, lam_c: Tensor, total: float, energy: float | None,
               rank: int | None) -> tuple[int, int, float]:
    """(r, numerical rank, delta) of the Gram path from the descending clamped eigenvalues lam_c
    (float64, CPU) of G = M^T M, total = trace(G) and the target (energy or rank); cd: the weight's
    compute dtype; delta = gram_eigenvalue_error."""
    m, n = shape
    lam1 = float(lam_c[0])
    delta = gram_eigenvalue_error((m, n), lam1, total)
    thr = (max(m, n) * torch.finfo(cd).eps) ** 2 * lam1  # numerical_rank's threshold, squared
    nz = int((lam_c > max(thr, delta)).sum()) if lam1 > 0 else 0
    r = _energy_rank_sq(lam_c, energy, total, nz) if energy is not None else rank
    return r, nz, delta


def _gram_factors(W: Tensor, Wc: Tensor, total: float, lam: Tensor, V: Tensor, energy: float | None,
                  rank: int | None, where: str, fallback: bool
                  ) -> tuple[Tensor, Tensor, Tensor, DecompositionInfo]:
    """Rank, accuracy guard and factors of the Gram path from the descending eigenpairs (lam, V) of
    G = M^T M and total = trace(G); Wc is W in its compute dtype."""
    m, n = W.shape
    p = min(m, n)
    cd = Wc.dtype
    tall = m >= n
    lam_c = lam.cpu()
    r, nz, delta = _gram_rank((m, n), cd, lam_c, total, energy, rank)
    rel = (delta / (2.0 * float(lam_c[r - 1])) if float(lam_c[r - 1]) > 0 else math.inf) if r else 0.0
    note = ""
    if rel > GRAM_SIGMA_RTOL:
        why = (f"gram: the smallest retained singular value (rank {r}) has an estimated relative error "
               f"{rel:.2g} > GRAM_SIGMA_RTOL = {GRAM_SIGMA_RTOL:.2g}")
        if fallback:
            U, S, Vh, info = _full_svd(W, energy, rank, where)
            info.note = why + "; full SVD used"
            return U, S, Vh, info
        note = why + " (fallback=False: Gram factors returned anyway)"
    Vr = V[:, :r].to(cd)
    S = lam[:r].sqrt().to(cd)
    if tall:
        Vh = Vr.T.contiguous()
        U = (Wc @ Vr).div_(S)
    else:
        U = Vr.contiguous()
        Vh = (U.T @ Wc).div_(S[:, None])
    kept = float(lam_c[:r].sum())
    info = DecompositionInfo(rank=r, max_rank=p, numerical_rank=nz,
                             energy=kept / total if total > 0 else 0.0, total_energy=total,
                             singular_values=lam.sqrt().to(cd), method="gram", note=note)
    return U.contiguous(), S.contiguous(), Vh.contiguous(), info


# ----------------------------------------------------------------------------------------------
# full SVD
# ----------------------------------------------------------------------------------------------
def _cut_margin_ok(S: Tensor, r: int, energy: float, total: float, nz: int) -> bool:
    """Whether the float32 singular values S decide the energy cut at r beyond their error:
    sum_{i<=k} S_i^2 is taken to be within e_k = FULL_ENERGY_ERROR_EPS * eps32 * S_1 * sum_{i<=k} S_i
    of the exact value (and the total within e_p), for k = r - 1 and r."""
    if r == 0 or energy >= 1.0 or total <= 0.0:
        return True
    s = S.detach().to(torch.float64).cpu()
    c = FULL_ENERGY_ERROR_EPS * _EPS32 * float(s[0])
    cum2 = torch.cumsum(s.square(), 0)
    cum1 = torch.cumsum(s, 0)
    target = energy * total
    err_t = energy * c * float(cum1[-1])
    if r < nz and float(cum2[r - 1]) - target < c * float(cum1[r - 1]) + err_t:
        return False
    if r > 1 and target - float(cum2[r - 2]) < c * float(cum1[r - 2]) + err_t:
        return False
    return True


def _full_svd(W: Tensor, energy: float | None, rank: int | None, where: str
              ) -> tuple[Tensor, Tensor, Tensor, DecompositionInfo]:
    """The "full" method on an already checked request (see truncated_svd)."""
    m, n = W.shape
    p = min(m, n)
    cd = _cdtype(W)
    with torch.no_grad():
        Wc = W.detach().to(cd)
        with _svd_threads(W):
            U, S, Vh = torch.linalg.svd(Wc, full_matrices=False)
        nz = numerical_rank(S, (m, n))
        total = float(S.to(torch.float64).square().sum())
        note = ""
        if energy is not None:
            r = energy_rank(S, energy, nonzero=nz)
            if cd != torch.float64 and not _cut_margin_ok(S, r, energy, total, nz):
                # float32 cannot decide the cut: the float64 Gram eigenvalues can
                with _svd_threads(W):
                    lam, _ = _eigh_desc(_gram64(_small_side(Wc)[0]), W, vectors=False)
                lam = lam.cpu()
                r64 = _energy_rank_sq(lam, energy, float(lam.sum()), nz)
                note = f"energy cut settled by float64 Gram eigenvalues (float32 SVD rank {r}, exact {r64})"
                r = r64
        else:
            r = rank
    kept = float(S[:r].to(torch.float64).square().sum())
    info = DecompositionInfo(rank=r, max_rank=p, numerical_rank=nz,
                             energy=(kept / total) if total > 0 else 0.0,
                             total_energy=total, singular_values=S, method="full", note=note)
    return U[:, :r].contiguous(), S[:r].contiguous(), Vh[:r].contiguous(), info


# ----------------------------------------------------------------------------------------------
# randomized SVD
# ----------------------------------------------------------------------------------------------
def randomized_svd(W: Tensor, energy: float | None = None, rank: int | None = None, *, oversample: int = 10,
                   power_iters: int = 2, start_rank: int | None = None, max_fraction: float = 0.5,
                   generator: torch.Generator | None = None, where: str = "weight"
                   ) -> tuple[Tensor, Tensor, Tensor, DecompositionInfo]:
    """Truncated SVD by a randomized range finder that stops once the target energy is retained.

    W: (m, n) floating, any device (the work runs on W's device in float32, float64 for float64 W).
    energy: tau in (0, 1) -- the returned factors satisfy sum(S^2) >= tau ||W||_F^2, checked against
      the exact total ||W||_F^2 (cheap), so the guarantee holds whatever the random draw, up to the
      float32 rounding of the sketch's singular values (~1e-6 of the energy: a tau that close to a
      cumulative fraction can give one component less than the exact rank); or
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
            return _full_svd(W, energy, rank, where)
        tall = m >= n
        M = Wc if tall else Wc.T  # (big, small): probe from the small side
        k = rank if rank is not None else (start_rank or max(32, p // 16))
        while True:
            l = min(p, k + oversample)
            if l > max_fraction * p:
                return _full_svd(W, energy, rank, where)
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


# ----------------------------------------------------------------------------------------------
# choice of method
# ----------------------------------------------------------------------------------------------
#: Cost model of the methods: predicted seconds = sum of coefficient * term, fitted to the median
#: single-thread CPU times of the real SmolLM2 weights (192x576 .. 49152x576; bench/bench_convert_time.py)
#: on the 2-core AMD EPYC development machine.  big = max(m, n), p = min(m, n), r = the rank.
SVD_COST_MODEL = {
    # LAPACK gesdd: QR / bidiagonalisation ~ big p^2, the p x p SVD with vectors ~ p^3
    "full": {"big*p^2": 1.56e-10, "p^3": 1.84e-10, "call": 3e-3},
    # float64 Gram (syrk) big p^2, float64 eigh p^3, recovery of the other side big p r (float32)
    "gram": {"big*p^2": 2.8e-11, "p^3": 2.0e-10, "big*p*r": 2.5e-11, "call": 2e-3},
    # per attempt of width l: (q + 1) products big p l and (q + 1) QRs big l^2, an l x p SVD
    "randomized": {"big*p*l*(q+1)": 8e-11, "big*l^2*(q+1)": 2.4e-10, "l^2*p": 3e-10, "call": 2e-3},
}


def estimate_svd_seconds(method: str, shape: tuple[int, int], rank: int, *, oversample: int = 10,
                         power_iters: int = 2, max_fraction: float = 0.5) -> float:
    """Predicted seconds of one decomposition by ``method`` of an (m, n) weight whose (energy) rank
    is ``rank``, from SVD_COST_MODEL (one thread of the development machine; only the ratios between
    methods matter to :func:`choose_svd`).

    "randomized" follows :func:`randomized_svd`'s schedule: widths k = max(32, p / 16), doubled
    until k >= rank, each attempt costing its sketch; an attempt wider than max_fraction * p adds
    the full SVD it falls back to.  Raises ValueError for an unknown method.
    """
    m, n = shape
    big, p = max(m, n), min(m, n)
    r = max(0, min(int(rank), p))
    if method == "full":
        c = SVD_COST_MODEL["full"]
        return c["call"] + c["big*p^2"] * big * p * p + c["p^3"] * p ** 3
    if method == "gram":
        c = SVD_COST_MODEL["gram"]
        return c["call"] + c["big*p^2"] * big * p * p + c["p^3"] * p ** 3 + c["big*p*r"] * big * p * r
    if method == "randomized":
        c = SVD_COST_MODEL["randomized"]
        q1 = power_iters + 1
        t, k = c["call"], max(32, p // 16)
        while True:
            l = min(p, k + oversample)
            if l > max_fraction * p:
                return t + estimate_svd_seconds("full", shape, rank)
            t += (c["big*p*l*(q+1)"] * big * p * l * q1 + c["big*l^2*(q+1)"] * big * l * l * q1
                  + c["l^2*p"] * l * l * p)
            if k >= r:
                return t
            k *= 2
    raise ValueError(f"method: expected one of ('full', 'gram', 'randomized'), got {method!r}")


def choose_svd(shape: tuple[int, int], energy: float | None = None, rank: int | None = None, *,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", exact_rank: bool = True,
               rank_fraction: float | None = None) -> str:
    """The method ``svd="auto"`` runs for an (m, n) weight: the cheapest one by
    :func:`estimate_svd_seconds` among those that can serve the request.

    shape: (m, n) = (out_features, in_features).  energy (tau in (0, 1]) or rank: the target, as in
      :func:`truncated_svd` (both None: a rank is not known yet; planning a spectrum).
    dtype: the weight's dtype.  device: its device (the cost model was measured on the CPU; on CUDA
      the same ordering is assumed: cuSOLVER's SVD is slow against its eigh there too).
    exact_rank: only methods whose energy rank is the exact one (EXACT_RANK_METHODS; the default,
      what truncated_svd and convert use).  With False, "randomized" is a candidate too when its
      rank fraction is known: from ``rank`` or from ``rank_fraction`` (e.g. a previous layer of the
      same kind, or a sketch).
    Rules: "gram" is a candidate unless the weight is float64 (the Gram path is float32-accurate
      only), tau = 1 (the numerical rank needs the smallest singular values, which the Gram
      matrix does not resolve) or rank = min(m, n); "full" always.  Its rank-dependent term is
      priced at the given rank (or rank_fraction * p), else at p (an upper bound).
    Returns "full", "gram" or "randomized".  Raises ValueError/TypeError for a bad shape, energy,
    rank or rank_fraction.
    """
    if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise ValueError(f"shape: expected (out_features, in_features), two positive ints, got {shape!r}")
    m, n = int(shape[0]), int(shape[1])
    p = min(m, n)
    if energy is not None:
        energy = check_energy(energy)
    if rank is not None:
        rank = check_rank(rank, p)
    if rank_fraction is not None:
        if isinstance(rank_fraction, bool) or not isinstance(rank_fraction, (int, float)) \
                or not 0.0 <= float(rank_fraction) <= 1.0:
            raise ValueError(f"rank_fraction: expected a float in [0, 1] or None, got {rank_fraction!r}")
    full_energy = energy is not None and energy >= 1.0
    candidates = ["full"]
    if dtype != torch.float64 and not full_energy and (rank is None or rank < p):
        candidates.append("gram")
    r_est = rank if rank is not None else (round(float(rank_fraction) * p) if rank_fraction is not None else None)
    if not exact_rank and not full_energy and r_est is not None:
        candidates.append("randomized")
    r_cost = p if r_est is None else r_est
    return min(candidates, key=lambda meth: estimate_svd_seconds(meth, (m, n), r_cost))


# ----------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------
def truncated_svd(W: Tensor, energy: float | None = None, rank: int | None = None, *,
                  where: str = "weight", svd: str = "full"
                  ) -> tuple[Tensor, Tensor, Tensor, DecompositionInfo]:
    """Economy SVD of W truncated to the energy rank (or an explicit rank).

    W: (m, n), any floating dtype, any device but meta.  Exactly one of ``energy`` (tau in (0, 1])
    and ``rank`` (0 <= rank <= min(m, n)) is given.
    svd: "full" (default; torch.linalg.svd), "gram" (:func:`gram_svd`: float64 Gram
      eigendecomposition, falls back to full where it would lose accuracy), "randomized"
      (:func:`randomized_svd`: stops as soon as sum(S^2) >= tau ||W||_F^2, with the exact total, so
      the energy guarantee holds; the rank can be a little above the exact one), or "auto"
      (:func:`choose_svd` for W's shape, dtype, device and target: "gram" or "full").
    Energy rank: "full" and "gram" return the exact energy rank (that of the float64 spectrum).
      For "full" in float32 the rank is read from the float32 singular values unless the cut lies
      within their error bound (FULL_ENERGY_ERROR_EPS); then the
      float64 Gram eigenvalues settle it (info.note says so).
    Returns U (m, r), S (r,), Vh (r, n) in float32 (float64 when W is float64), contiguous, on W's
    device, with W ~= U diag(S) Vh, and a DecompositionInfo (info.method: the method that ran).
    Raises ValueError/TypeError naming ``where`` for an unusable weight or bad energy/rank/svd.
    Math: docs/design.md "Computing the truncated SVD"; the paper's Sec. 3 (energy-retaining truncation).
    """
    check_svd(svd)
    energy, rank, m, n, p = _check_target(W, energy, rank, where)
    return _truncated(W, energy, rank, where, svd)


def _method(W: Tensor, energy: float | None, rank: int | None, svd: str) -> str:
    """The method ``svd`` runs for a checked request ("auto": choose_svd, looked up at call time)."""
    if svd != "auto":
        return svd
    return choose_svd(tuple(W.shape), energy=energy, rank=rank, dtype=W.dtype, device=W.device)


def _truncated(W: Tensor, energy: float | None, rank: int | None, where: str, svd: str
               ) -> tuple[Tensor, Tensor, Tensor, DecompositionInfo]:
    """truncated_svd on an already checked request."""
    svd = _method(W, energy, rank, svd)
    if svd == "randomized":
        U, S, Vh, info = randomized_svd(W, energy=energy, rank=rank, where=where)
    elif svd == "gram":
        U, S, Vh, info = _gram_svd(W, energy, rank, where)
    else:
        U, S, Vh, info = _full_svd(W, energy, rank, where)
    U, Vh = canonical_signs(U, Vh)
    return U, S, Vh, info


def _with_extra(W: Tensor, energy: float | None, rank: int | None, where: str, svd: str, extra: int):
    """truncated_svd, then (extra > 0) the factors of rank q = min(r + extra, p) with the first
    call's info: what ``CersaLayer.from_dense`` decomposes for a layer whose init needs ``extra``
    components beyond the truncation (CersaConfig.extra_components)."""
    U, S, Vh, info = _truncated(W, energy, rank, where, svd)
    q = min(info.rank + extra, min(W.shape))
    if q > info.rank:
        U, S, Vh, _ = _truncated(W, None, q, where, svd)
    return U, S, Vh, info


def canonical_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Singular vectors with a fixed sign: each column j of U (m, r) and row j of Vh (r, n) are
    negated together when the entry of largest magnitude of U[:, j] is negative (the first such
    entry on ties), so U diag(S) Vh is unchanged.  Without it LAPACK's choice of sign can differ
    between thread counts, libraries or processes, and processes that each decompose the same
    weight (every rank of an FSDP2 job) would hold different factors.  Returns new tensors of the
    inputs' dtype and layout; r = 0 passes through.
    The sign is read from the column maxima and minima (the largest magnitude is negative exactly
    when -min > max), a reduction 3-9x cheaper than argmax of |U| on (1536, 400); only columns
    where -min == max (a tie between a positive and a negative entry) take argmax's first-entry rule."""
    if U.shape[1] == 0:
        return U, Vh
    hi, lo = U.amax(dim=0), U.amin(dim=0)
    neg = -lo > hi
    tie = (-lo == hi) & (hi != 0)
    if bool(tie.any()):
        cols = tie.nonzero().flatten()
        sub = U[:, cols]
        first = torch.gather(sub, 0, sub.abs().argmax(dim=0, keepdim=True))[0]
        neg[cols] = first < 0
    flip = torch.where(neg, -1.0, 1.0).to(U.dtype)
    return (U * flip).contiguous(), (Vh * flip.reshape(-1, 1).to(Vh.dtype)).contiguous()


def _per_weight(value, count: int, name: str) -> list:
    """``value`` for each of ``count`` weights: a scalar (or None) repeated, or a sequence of ``count``."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name}: expected one value per weight ({count}), got {len(value)}")
        return list(value)
    return [value] * count


def _single_threaded(W: Tensor) -> bool:
    """Whether a decomposition of W runs on one torch thread and one BLAS thread anyway
    (_svd_threads / _blas_threads: a CPU weight with min(m, n) <= SINGLE_THREAD_SVD_MAX_DIM, or
    ``$CERSA_SVD_THREADS`` = 1)."""
    if W.device.type != "cpu":
        return False
    env = os.environ.get("CERSA_SVD_THREADS")
    if env:
        return env.isdigit() and int(env) == 1
    return min(W.shape) <= SINGLE_THREAD_SVD_MAX_DIM


def pool_eligible(W: Tensor, energy: float | None = None, rank: int | None = None, *, svd: str = "auto",
                  extra: int = 0) -> bool:
    """Whether :func:`truncated_svd_many` with workers > 1 decomposes W (m, n) in its worker pool:
    a CPU weight whose decomposition runs on one thread anyway (min(m, n) <=
    SINGLE_THREAD_SVD_MAX_DIM, or ``$CERSA_SVD_THREADS`` = 1), by exact-rank methods only
    ("full" / "gram", after "auto"'s choice, for the target and, with ``extra``, for the rank
    r + extra; r is not known yet, so both min(m, n) and a rank below it must choose exact
    methods).  Such a decomposition does the same arithmetic in a worker as in the calling thread,
    so its factors are bit for bit the same; the others (randomized SVDs: they draw from the
    global generator; multi-threaded LAPACK) run in the calling thread.  The target is checked
    as in truncated_svd (ValueError/TypeError)."""
    check_svd(svd)
    energy, rank, _, _, _ = _check_target(W, energy, rank, "weight")
    return _pool_eligible(W, energy, rank, svd, extra)


def _pool_eligible(W: Tensor, energy: float | None, rank: int | None, svd: str, extra: int) -> bool:
    """pool_eligible on an already checked request."""
    if not _single_threaded(W):
        return False
    p = min(W.shape)
    meths = {_method(W, energy, rank, svd)}
    if extra > 0:  # the second call's rank r + extra is not known before the first has run
        meths |= {_method(W, None, p, svd), _method(W, None, max(p - 1, 0), svd)}
    return meths <= set(EXACT_RANK_METHODS)


#: Weights that truncated_svd_many keeps in its pool's queue beyond those being decomposed, per
#: worker: results are taken in order, so a slow weight does not stall the other workers.
POOL_QUEUE_PER_WORKER = 4


def truncated_svd_many(weights, energy=None, rank=None, *, where=None, svd: str = "auto", workers: int = 1,
                       extra=0) -> list[tuple[Tensor, Tensor, Tensor, DecompositionInfo]]:
    """:func:`truncated_svd` of several weights: a list of its results, in order.

    weights: a sequence of 2-D tensors (any shapes, dtypes, devices).  energy / rank: the target,
    one for every weight (a float / an int) or one per weight (a list: None where the other is
    given); each weight needs exactly one of them.  where: None (names "weight[i]") or one name
    per weight.  Every weight and target are checked before any is decomposed, so a bad one raises
    ValueError/TypeError naming it with no work done.
    svd: as truncated_svd ("auto": :func:`choose_svd` per weight).
    extra: components beyond each truncation (an int >= 0 or one per weight): the factors then hold
      q = min(r + extra, min(m, n)) components (a second truncated_svd at rank q when q > r) and
      info is the truncation's (rank r, its energy), as ``CersaLayer.from_dense`` decomposes for
      init="residual" (CersaConfig.extra_components).
    workers: how many weights are decomposed at the same time (a positive int, default 1: one by
      one).  With workers > 1 the weights that :func:`pool_eligible` admits (CPU, exact-rank
      methods, small enough that their LAPACK calls run on one thread anyway) are decomposed by
      that many Python threads, each with one torch thread (set in every worker) and one BLAS
      thread (LAPACK, numpy and torch release the GIL), instead of one weight at a time:
      independent single-threaded LAPACK calls do not wait for each other, where a multi-threaded
      576 x 576 eigendecomposition on a shared 2-core machine stalled at its synchronisation
      points (bench/bench_convert_time.py: median 112 ms with 2 BLAS threads against 70 ms with 1,
      some calls 6 s).  The other weights (randomized SVDs, which draw from the global generator,
      and large or CUDA weights, whose LAPACK / cuSOLVER calls are multi-threaded) are decomposed
      afterwards in the calling thread, in order.  The thread settings are process-wide while the
      pool runs (other threads that call decompose meanwhile see them too).  The results are bit
      for bit those of workers=1.  On an error in the pool the first failing pooled weight (in
      order) raises, the queued ones are cancelled and the running ones are waited for.  Stacking same-shape weights
      into one batched float64 product and eigh measured no faster on the CPU (LAPACK loops over a
      batch), so there is no batched path.
    Raises ValueError for a bad ``workers`` or ``extra`` as well.
    """
    weights = list(weights)
    count = len(weights)
    names = [f"weight[{i}]" for i in range(count)] if where is None else list(where)
    if len(names) != count:
        raise ValueError(f"where: expected {count} names, one per weight, got {len(names)}")
    check_svd(svd)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected a positive int, got {workers!r}")
    energies, ranks = _per_weight(energy, count, "energy"), _per_weight(rank, count, "rank")
    extras = _per_weight(extra, count, "extra")
    for e in extras:
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise ValueError(f"extra: expected an int >= 0 (or one per weight), got {e!r}")
    reqs = [_check_target(W, e, rk, nm)[:2] for W, e, rk, nm in zip(weights, energies, ranks, names)]

    def one(i: int):
        return _with_extra(weights[i], reqs[i][0], reqs[i][1], names[i], svd, extras[i])

    pooled = [i for i in range(count) if _pool_eligible(weights[i], *reqs[i], svd, extras[i])] if workers > 1 else []
    out: list = [None] * count
    if len(pooled) >= 2:
        for i, res in zip(pooled, _pool_map(one, pooled, workers, weights[pooled[0]])):
            out[i] = res
    for i in range(count):
        if out[i] is None:
            out[i] = one(i)
    return out


def _pool_map(fn, items: list, workers: int, probe: Tensor):
    """[fn(item) for item in items] on ``workers`` threads with one torch and one BLAS thread each
    (see truncated_svd_many); at most POOL_QUEUE_PER_WORKER * workers items queued ahead of the
    first unfinished one.  The first failure in order raises (queued items cancelled, running ones
    awaited)."""
    import itertools
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    out = []
    with _svd_threads_exactly(1), _blas_threads(probe, want=1):
        _PINNED_THREADS.append(True)
        pool = ThreadPoolExecutor(max_workers=min(workers, len(items)),
                                  initializer=torch.set_num_threads, initargs=(1,))
        try:
            todo = iter(items)
            first = itertools.islice(todo, workers * (1 + POOL_QUEUE_PER_WORKER))
            ahead = deque(pool.submit(fn, it) for it in first)
            while ahead:
                out.append(ahead.popleft().result())
                ahead.extend(pool.submit(fn, it) for it in itertools.islice(todo, 1))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            _PINNED_THREADS.pop()
    return out


@contextlib.contextmanager
def _svd_threads_exactly(want: int):
    """torch's intra-op threads set to ``want`` for the block (restored afterwards)."""
    old = torch.get_num_threads()
    if old != want:
        torch.set_num_threads(want)
    try:
        yield
    finally:
        if old != want:
            torch.set_num_threads(old)


def singular_values(W: Tensor, where: str = "weight", *, svd: str = "full") -> Tensor:
    """All min(m, n) singular values of W (descending), on W's device.

    svd: "full" (default): torch.linalg.svdvals in float32 (float64 for float64 W).
      "gram": square roots of the float64 Gram eigenvalues, float64: each sigma_i^2 within
      delta = gram_eigenvalue_error(...) of the exact one, so energies, energy ranks and budget
      allocations are exact to ~1e-13 relative, but singular values below sqrt(delta) are noise
      (clamped at 0); 2-5x faster than "full".  "auto": "gram" unless W is float64.
    Raises ValueError/TypeError naming ``where`` for an unusable weight, ValueError for another svd.
    """
    if svd not in ("full", "gram", "auto"):
        raise ValueError(f"svd: expected one of ('full', 'gram', 'auto') for singular values, got {svd!r}")
    check_weight(W, where)
    if svd == "auto":
        svd = "full" if W.dtype == torch.float64 else "gram"
    with torch.no_grad():
        if svd == "gram":
            with _svd_threads(W):
                lam, _ = _eigh_desc(_gram64(_small_side(W.detach())[0]), W, vectors=False)
            return lam.sqrt()
        with _svd_threads(W):
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
