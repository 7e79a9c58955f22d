"""Activation-aware truncation: input second moments from calibration data, and the truncation
that is optimal in the output norm they define (docs/design.md "Activation-aware truncation").

``collect_moments(model, todo, calibration)`` runs the model on calibration data with forward
hooks on the target modules and accumulates, for every decomposed matrix W (m, n) of every target
(the layer class's ``matrices``), C = (1/N) sum_x x x^T over the N input rows x (n,) of that
matrix (float64).  The rows are, per layer type: the last-dimension rows of a Linear's / Conv1D's
input; the unfolded patches (in * prod(kernel_size) numbers, the stride / padding / dilation /
padding_mode of the convolution) of an nn.Conv{1,2,3}d's input; the query rows of an
nn.MultiheadAttention (in_proj; self-attention only) and the attention output before its out_proj
(recomputed in the hook by F.multi_head_attention_forward with an identity out projection).

``weighted_truncated_svd(W, C, ...)`` gives the factors: with C' = C + lambda mean(diag C) I and L
any factor with L L^T = C', W L = U' S' V'^T; the rank r follows the energy of S' (the output
energy); the stored factors are the exact SVD of U'_r U'_r^T W, the best rank-r approximation of W
in the norm ||X L||_F.  Extra components beyond the truncation (an init's request) are the SVD of
U'_{r:r+e} U'_{r:r+e}^T W.

Conversion-level: imported by ``convert`` and ``planning``; the layers only receive the factors.
"""
from __future__ import annotations

import inspect
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .decompose import (DecompositionInfo, _cdtype, _check_target, _svd_threads, canonical_signs, check_weight,
                        singular_values, truncated_svd)
from .layers import CersaConv1D, CersaConvNd, CersaLinear, CersaMultiheadAttention

__all__ = ["DEFAULT_CALIBRATION_MEMORY", "DEFAULT_DAMPING", "CalibrationStats", "WeightedDecompositionInfo",
           "calibration_groups", "check_calibration", "check_damping", "check_memory", "collect_moments",
           "conv_patches", "is_one_shot", "merge_stats", "moment_bytes",
           "mha_attention_output", "weighted_matrix", "weighted_singular_values", "weighted_truncated_svd"]

#: Default ``calibration_memory``: bytes all input moments of one collection pass may take.  2 GiB
#: holds every (n, n) float64 moment of models up to about a billion parameters at once (MiniLM-L6:
#: 0.15 GB without sharing; SmolLM2-135M: 1.1 GB), so those need one pass, while it stays a small
#: part of the memory of a machine (or GPU) that fine-tunes such a model; bigger models are
#: collected in several passes (a 7B Llama, ~57 GB of moments, in ~30).
DEFAULT_CALIBRATION_MEMORY = 2 * 2**30

#: Default ``calibration_damping`` lambda of C' = C + lambda mean(diag C) I.
DEFAULT_DAMPING = 0.01

#: float64 numbers of one chunk of input rows / patches accumulated at a time (128 MiB).
CHUNK_NUMBERS = 2**24

#: recent input tensors remembered for sharing one moment between layers fed by the same tensor.
_CACHE_ENTRIES = 32


# ------------------------------------------------------------------------------------- arguments
def check_damping(damping, name: str = "calibration_damping") -> float:
    """A finite real number > 0; returns it as a float.  Raises TypeError / ValueError naming ``name``."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise TypeError(f"{name}: expected a finite number > 0, got {type(damping).__name__} {damping!r}")
    damping = float(damping)
    if not math.isfinite(damping) or damping <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {damping!r}")
    return damping


def check_memory(memory, name: str = "calibration_memory") -> int:
    """A positive int (bytes); returns it.  Raises TypeError / ValueError naming ``name``."""
    if isinstance(memory, bool) or not isinstance(memory, int):
        raise TypeError(f"{name}: expected a positive int (bytes), got {type(memory).__name__} {memory!r}")
    if memory <= 0:
        raise ValueError(f"{name}: expected a positive int (bytes), got {memory!r}")
    return memory


def check_calibration(calibration):
    """``calibration`` must be a callable fn(model) or an iterable of model inputs (not a str /
    bytes / Tensor / dict itself); returns it.  Raises TypeError naming ``calibration``."""
    if callable(calibration) and not isinstance(calibration, nn.Module):
        return calibration
    if isinstance(calibration, (str, bytes, Tensor, dict, nn.Module)) or not _iterable(calibration):
        raise TypeError(f"calibration: expected a callable fn(model) or an iterable of model inputs (Tensors, "
                        f"tuples / lists of arguments, dicts of keyword arguments), got "
                        f"{type(calibration).__name__}")
    return calibration


def _iterable(obj) -> bool:
    try:
        iter(obj)
    except TypeError:
        return False
    return True


# ------------------------------------------------------------------------- weighted decomposition
@dataclass
class WeightedDecompositionInfo(DecompositionInfo):
    """DecompositionInfo of :func:`weighted_truncated_svd`.

    rank, max_rank, numerical_rank, method, note: of the SVD of W L.  energy: the output energy
    kept, sum_{i<r} S'_i^2 / ||W L||_F^2; total_energy: ||W L||_F^2 = trace(W C' W^T);
    singular_values: the weighted spectrum S' (all p, or what the randomized method computed).
    weight_energy: the plain fraction ||W_r||_F^2 / ||W||_F^2 the stored factors keep.
    damping: lambda.  weighted_error: ||(W - W_r) L||_F = sqrt(sum of the dropped S'^2).
    """

    weight_energy: float = float("nan")
    damping: float = DEFAULT_DAMPING
    weighted_error: float = float("nan")


def _check_moment(C: Tensor, n: int, where: str) -> Tensor:
    if not isinstance(C, Tensor):
        raise TypeError(f"C: expected a Tensor (n, n) for {where}, got {type(C).__name__}")
    if C.dim() != 2 or tuple(C.shape) != (n, n):
        raise ValueError(f"C: expected the input moment of {where} of shape ({n}, {n}), got {tuple(C.shape)}")
    C = C.detach().to(torch.float64)
    if not bool(torch.isfinite(C).all()):
        raise ValueError(f"{where}: the calibration inputs of this layer have non-finite values (NaN / inf), "
                         f"so their second moment C is not finite")
    return C


def weighted_matrix(W: Tensor, C: Tensor, damping: float = DEFAULT_DAMPING, where: str = "weight") -> Tensor:
    """M = W L (m, n) for W (m, n) and the input second moment C (n, n): L is the lower Cholesky
    factor of C' = C + damping * mean(diag C) * I (the symmetric square root via eigh when the
    factorization fails), so M M^T = W C' W^T and ||X L||_F^2 = trace(X C' X^T) for every X.
    Computed in float64 on W's device, returned in float32 (float64 for float64 W).
    Raises ValueError naming ``where`` for an all-zero or non-finite C, a bad shape or damping."""
    check_weight(W, where)
    damping = check_damping(damping)
    m, n = W.shape
    C = _check_moment(C, n, where).to(W.device)
    d = float(C.diagonal().mean())
    if not d > 0:
        raise ValueError(f"{where}: the calibration inputs of this layer are all zero (input second moment C = 0), "
                         f"which weights no direction; calibrate with inputs that reach it, or exclude it")
    Cd = C + (damping * d) * torch.eye(n, dtype=torch.float64, device=C.device)
    L, info = torch.linalg.cholesky_ex(Cd)
    if int(info) != 0:  # not numerically positive definite at this damping: symmetric root
        lam, Q = torch.linalg.eigh(Cd)
        L = (Q * lam.clamp_min(0.0).sqrt()) @ Q.T
    return (W.detach().to(torch.float64) @ L).to(_cdtype(W))


def weighted_singular_values(W: Tensor, C: Tensor, damping: float = DEFAULT_DAMPING, where: str = "weight", *,
                             svd: str = "auto") -> Tensor:
    """All min(m, n) singular values S' of W L (descending; see :func:`weighted_matrix`): the
    spectrum the rank policies (energy, budget) use under calibration.  svd: as
    ``decompose.singular_values``."""
    with torch.no_grad(), _svd_threads(W):
        M = weighted_matrix(W, C, damping, where)
    return singular_values(M, where, svd=svd)


def _factors_of_block(Ub: Tensor, W64: Tensor, dtype: torch.dtype):
    """SVD (U, S, Vh) of Ub Ub^T W for Ub (m, b) with orthonormal columns: T = Ub^T W (b, n) = P S Q^T,
    U = Ub P, Vh = Q^T."""
    T = Ub.to(torch.float64).T @ W64
    P, S, Qh = torch.linalg.svd(T, full_matrices=False)
    U, Qh = canonical_signs(Ub.to(torch.float64) @ P, Qh)
    return U.to(dtype), S.to(dtype), Qh.to(dtype)


def weighted_truncated_svd(W: Tensor, C: Tensor, energy: float | None = None, rank: int | None = None, *,
                           extra: int = 0, damping: float = DEFAULT_DAMPING, where: str = "weight",
                           svd: str = "auto") -> tuple[Tensor, Tensor, Tensor, WeightedDecompositionInfo]:
    """Truncation of W (m, n) optimal for inputs of second moment C (n, n) (docs/design.md
    "Activation-aware truncation").

    With C' = C + damping * mean(diag C) * I and L L^T = C' (:func:`weighted_matrix`), the SVD
    W L = U' S' V'^T decides the rank: exactly one of ``energy`` (tau in (0, 1]: the smallest r
    with sum_{i<r} S'_i^2 >= tau ||W L||_F^2, the output energy) and ``rank``.  The factors are the
    exact SVD of W_r = U'_r U'_r^T W, the minimiser of ||(W - X) L||_F over rank-r X (Eckart-Young
    in the weighted norm, L invertible): SVD of the (r, n) matrix U'_r^T W = P Sigma Q^T,
    U = U'_r P, S = Sigma, Vh = Q^T (no inverse of L).  ``extra`` = e > 0 appends the SVD of
    U'_{r:q} U'_{r:q}^T W, q = min(r + e, min(m, n)), the next block of the weighted spectrum.
    svd: the method of the SVD of W L (``decompose.truncated_svd``: "auto" chooses "full" or "gram"
    by W's shape, dtype and the target).
    Returns U (m, q), S (q,), Vh (q, n) in float32 (float64 for float64 W) on W's device, U / Vh
    with orthonormal columns / rows within each block, and a :class:`WeightedDecompositionInfo`
    (info.rank = r).  Raises ValueError / TypeError naming ``where`` (or the argument) for a bad
    weight, moment, energy / rank, extra or damping, or an all-zero / non-finite C.
    """
    energy, rank, m, n, p = _check_target(W, energy, rank, where)
    if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
        raise ValueError(f"extra: expected an int >= 0, got {extra!r}")
    damping = check_damping(damping)
    with torch.no_grad(), _svd_threads(W):
        M = weighted_matrix(W, C, damping, where)
        Ur, Sr, _, info = truncated_svd(M, energy=energy, rank=rank, where=where, svd=svd)
        r = info.rank
        q = min(r + extra, p)
        if q > r:
            Ur, Sr, _, _ = truncated_svd(M, rank=q, where=where, svd=svd)
        dtype = _cdtype(W)
        W64 = W.detach().to(torch.float64)
        U, S, Vh = _factors_of_block(Ur[:, :r], W64, dtype)
        if q > r:
            Ue, Se, Vhe = _factors_of_block(Ur[:, r:q], W64, dtype)
            U, S, Vh = torch.cat([U, Ue], 1), torch.cat([S, Se]), torch.cat([Vh, Vhe], 0)
        wtot = float(W64.square().sum())
        kept = float(S[:r].to(torch.float64).square().sum())
        dropped = max(0.0, info.total_energy - float(Sr[:r].to(torch.float64).square().sum()))
    winfo = WeightedDecompositionInfo(
        rank=r, max_rank=p, numerical_rank=info.numerical_rank, energy=info.energy, total_energy=info.total_energy,
        singular_values=info.singular_values, method=info.method,
        note=(info.note + "; " if info.note else "") + f"weighted by the input moment (damping {damping:g})",
        weight_energy=kept / wtot if wtot > 0 else 0.0, damping=damping, weighted_error=math.sqrt(dropped))
    return U.contiguous(), S.contiguous(), Vh.contiguous(), winfo


# ------------------------------------------------------------------------------- input rows
def _pads(module: nn.Module) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim of a convolution, as nn.Conv{d}d applies it."""
    ks, dil = module.kernel_size, module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [(0, 0)] * len(ks)
        out = []
        for k, d in zip(ks, dil):  # "same": total d (k - 1), the odd one after
            tot = d * (k - 1)
            out.append((tot // 2, tot - tot // 2))
        return out
    return [(int(p), int(p)) for p in module.padding]


def conv_patches(module: nn.Module, x: Tensor, chunk_numbers: int = CHUNK_NUMBERS):
    """The unfolded input patches of convolution ``module`` (nn.Conv{1,2,3}d, groups=1) on x
    (N, in, *spatial) or (in, *spatial): yields chunks (rows, in * prod(kernel_size)) whose rows,
    stacked, are X with conv(x) = X W_mat^T + bias (per output position, in the conv's output
    order), W_mat = weight.reshape(out, -1).  Stride, padding (ints, "same", "valid"), dilation and
    padding_mode as the module; each chunk holds at most about ``chunk_numbers`` numbers."""
    d = len(module.kernel_size)
    if x.dim() == d + 1:
        x = x.unsqueeze(0)
    pads = _pads(module)
    if any(a or b for a, b in pads):
        flat = [v for pair in reversed(pads) for v in pair]
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, flat, mode=mode)
    for i, (k, s, dl) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + i, dl * (k - 1) + 1, s)
        if dl > 1:
            x = x[..., ::dl]
    # x: (N, C, o_1..o_d, k_1..k_d)
    N, Cin = x.shape[0], x.shape[1]
    outs = x.shape[2:2 + d]
    ncol = Cin * math.prod(module.kernel_size)
    per_o1 = ncol * math.prod(outs[1:])
    step = max(1, chunk_numbers // max(per_o1, 1))
    perm = [0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d)]
    for b in range(N):
        for j in range(0, outs[0], step):
            piece = x[b:b + 1, :, j:j + step].permute(*perm)
            yield piece.reshape(-1, ncol)


def mha_attention_output(module: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                         key_padding_mask=None, attn_mask=None, is_causal: bool = False) -> Tensor:
    """The input of ``module.out_proj``: the attention output before the out projection, (L, N, E)
    or (N, L, E) as the module's layout (unbatched (L, E)), recomputed with
    F.multi_head_attention_forward and an identity out projection with zero bias (no dropout)."""
    E = module.embed_dim
    batched = query.dim() == 3
    if module.batch_first and batched:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    eye = torch.eye(E, dtype=query.dtype, device=query.device)
    zero = torch.zeros(E, dtype=query.dtype, device=query.device)
    z, _ = F.multi_head_attention_forward(
        query, key, value, E, module.num_heads, module.in_proj_weight, module.in_proj_bias, module.bias_k,
        module.bias_v, module.add_zero_attn, 0.0, eye, zero, training=False, key_padding_mask=key_padding_mask,
        need_weights=False, attn_mask=attn_mask, is_causal=is_causal)
    if module.batch_first and batched:
        z = z.transpose(0, 1)
    return z


def _rows(x: Tensor, n: int, chunk_numbers: int = CHUNK_NUMBERS):
    X = x.reshape(-1, n)
    step = max(1, chunk_numbers // max(n, 1))
    for i in range(0, X.shape[0], step):
        yield X[i:i + step]


def _tensor_key(kind, x: Tensor):
    return (kind, x.device, x.dtype, x.data_ptr(), tuple(x.shape), tuple(x.stride()), x._version)


_MHA_SIG = inspect.signature(nn.MultiheadAttention.forward)

#: the layer classes whose matrices' inputs the hooks know (``_layer_inputs``); others are refused.
_CALIBRATED_TYPES = (CersaLinear, CersaConv1D, CersaConvNd, CersaMultiheadAttention)


def _layer_inputs(name: str, cls: type, module: nn.Module, args, kwargs, want: list[bool]):
    """Per matrix of ``cls.matrices(module)``: None (not wanted) or (key, source tensor, row-chunk
    iterator factory).  key identifies the input tensor (None: never shared).  Raises ValueError
    naming the layer for an input it cannot calibrate."""
    if issubclass(cls, CersaMultiheadAttention):
        bound = _MHA_SIG.bind(module, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        q, k, v = a["query"], a["key"], a["value"]
        E = module.embed_dim
        out = [None, None]
        if want[0]:
            kq = _tensor_key("rows", q)
            if not (q is k and k is v) and not (kq == _tensor_key("rows", k) == _tensor_key("rows", v)):
                raise ValueError(f"calibration: {name} (nn.MultiheadAttention) was called with different query, key "
                                 f"and value (cross-attention); its packed in_proj (3E, E) would need a different "
                                 f"input moment per row block, which one truncation cannot weight; calibrate it "
                                 f"on self-attention inputs or exclude it")
            out[0] = (kq, q, lambda q=q: _rows(q, E))
        if want[1]:
            z = mha_attention_output(module, q, k, v, a["key_padding_mask"], a["attn_mask"], a["is_causal"])
            out[1] = (None, z, lambda z=z: _rows(z, E))
        return out
    if not args:
        raise ValueError(f"calibration: {name} ({type(module).__name__}) was called without a positional input")
    x = args[0]
    if not isinstance(x, Tensor):
        raise ValueError(f"calibration: {name} ({type(module).__name__}) was called with a "
                         f"{type(x).__name__}, not a Tensor")
    if issubclass(cls, CersaConvNd):
        geo = ("conv", tuple(module.kernel_size), tuple(module.stride), str(module.padding),
               tuple(module.dilation), module.padding_mode)
        return [(_tensor_key(geo, x), x, lambda x=x: conv_patches(module, x))]
    if issubclass(cls, (CersaLinear, CersaConv1D)):
        n = int(cls.matrices(module)[0][1].shape[1])
        return [(_tensor_key("rows", x), x, lambda x=x: _rows(x, n))]
    raise ValueError(f"calibration: {name}: layer type {cls.__name__} has no rule for its matrices' inputs, so it "
                     f"cannot be calibrated; exclude it or convert without calibration")


# ------------------------------------------------------------------------------------ collection
@dataclass
class CalibrationStats:
    """What a collection cost: passes over the calibration data, wall seconds of collection,
    peak bytes of the float64 moments held at once, the number of matrices and of distinct moments
    (matrices fed by one tensor share one), the damping and the memory limit (bytes)."""

    passes: int
    seconds: float
    peak_bytes: int
    matrices: int
    moments: int
    damping: float
    memory_limit: int

    def as_dict(self) -> dict:
        return asdict(self)


class _Slot:
    """One matrix of one target: its moment (owned, or shared with the root slot fed the same tensors)."""

    def __init__(self, name: str, index: int, n: int):
        self.name, self.index, self.n = name, index, n
        self.acc: Tensor | None = None
        self.rows = 0
        self.root: _Slot | None = None
        self.consumed: set[int] = set()
        self.broken = False
        self.share = True

    def add(self, chunks) -> int:
        rows = 0
        for X in chunks:
            if self.acc is None:
                self.acc = torch.zeros(self.n, self.n, dtype=torch.float64, device=X.device)
            if self.acc.device.type == "cpu":  # numpy runs X^T X as a symmetric rank-k update: half the flops
                Xn = X.detach().to(torch.float64).numpy()
                self.acc.numpy()[...] += Xn.T @ Xn
            else:
                X64 = X.to(device=self.acc.device, dtype=torch.float64)
                self.acc.addmm_(X64.T, X64)
            rows += X.shape[0]
        self.rows += rows
        return rows


class _Collector:
    def __init__(self, slots: dict):
        self.slots = slots  # (name, index) -> _Slot, the active ones
        self.cache: OrderedDict = OrderedDict()
        self.next_id = 0
        self.error: BaseException | None = None

    def feed(self, slot: _Slot, key, source: Tensor, chunks) -> None:
        entry = self.cache.get(key) if key is not None and slot.share else None
        if entry is not None and entry["root"] is not slot:
            root = entry["root"]
            if slot.root is None and slot.rows == 0 and slot.acc is None:
                slot.root = root
            if slot.root is not None:
                if slot.root is root and entry["id"] not in slot.consumed:
                    slot.consumed.add(entry["id"])
                    slot.rows += entry["rows"]
                else:
                    slot.broken = True
                return
        elif slot.root is not None:  # a sharing slot got a tensor its root did not see
            slot.broken = True
            return
        rows = slot.add(chunks())
        if key is not None and key not in self.cache:
            self.cache[key] = {"root": slot, "id": self.next_id, "rows": rows, "tensor": source}
            self.next_id += 1
            while len(self.cache) > _CACHE_ENTRIES:
                self.cache.popitem(last=False)

    def hook(self, name: str, cls: type, nmat: int):
        def fn(module, args, kwargs, output):
            if self.error is not None:
                return None
            try:
                want = [(name, i) in self.slots and not self.slots[(name, i)].broken for i in range(nmat)]
                if not any(want):
                    return None
                for i, item in enumerate(_layer_inputs(name, cls, module, args, kwargs, want)):
                    if item is not None:
                        self.feed(self.slots[(name, i)], *item)
            except BaseException as exc:
                self.error = exc
                raise
            return None
        return fn


def _run(model: nn.Module, calibration) -> int:
    """One pass: the callable, or every item of the iterable.  Returns the number of items (-1 for a callable)."""
    if callable(calibration) and not isinstance(calibration, nn.Module):
        calibration(model)
        return -1
    count = 0
    for item in calibration:
        if isinstance(item, Tensor):
            model(item)
        elif isinstance(item, (tuple, list)):
            model(*item)
        elif isinstance(item, dict):
            model(**item)
        else:
            raise TypeError(f"calibration: expected items that are Tensors (model(x)), tuples / lists (model(*x)) "
                            f"or dicts (model(**x)), got item {count} of type {type(item).__name__}")
        count += 1
    return count


def is_one_shot(calibration) -> bool:
    """Whether ``calibration`` can be iterated only once (an iterator: iter(x) is x); a callable or
    a re-iterable sequence / data loader can give several passes."""
    return not (callable(calibration) and not isinstance(calibration, nn.Module)) and iter(calibration) is calibration


def moment_bytes(cls: type, module: nn.Module) -> int:
    """Bytes of the float64 input moments of a target's matrices (n^2 8 each, without sharing)."""
    return sum(int(W.shape[1]) ** 2 * 8 for _, W in cls.matrices(module))


def calibration_groups(todo, memory: int = DEFAULT_CALIBRATION_MEMORY) -> list[list[int]]:
    """Indices of ``todo`` (targets (name, module, layer class)) in consecutive groups whose moments
    (:func:`moment_bytes`, counted without sharing) fit in ``memory`` bytes together: one pass over
    the calibration data per group.  Raises ValueError naming calibration_memory and the layer when
    one target alone needs more."""
    memory = check_memory(memory)
    def too_big(i, need):
        return (f"calibration_memory: the input moments of {todo[i][0]} alone need {need:,} bytes (float64, "
                f"n x n per matrix), more than calibration_memory={memory:,}")

    return _greedy_groups(range(len(todo)), lambda i: moment_bytes(todo[i][2], todo[i][1]), memory, too_big)


def _greedy_groups(items, need_of, memory: int, too_big) -> list[list]:
    """``items`` in order, cut into consecutive groups whose needs (``need_of(item)`` bytes) sum to
    at most ``memory``; an item that alone needs more raises ValueError(too_big(item, need))."""
    groups, cur, used = [], [], 0
    for item in items:
        need = need_of(item)
        if need > memory:
            raise ValueError(too_big(item, need))
        if cur and used + need > memory:
            groups.append(cur)
            cur, used = [], 0
        cur.append(item)
        used += need
    if cur:
        groups.append(cur)
    return groups


def merge_stats(parts: list[CalibrationStats]) -> CalibrationStats:
    """The stats of several collections of one conversion: passes, seconds, matrices and moments
    summed, the peak the largest."""
    return CalibrationStats(passes=sum(p.passes for p in parts), seconds=sum(p.seconds for p in parts),
                            peak_bytes=max((p.peak_bytes for p in parts), default=0),
                            matrices=sum(p.matrices for p in parts), moments=sum(p.moments for p in parts),
                            damping=parts[0].damping if parts else DEFAULT_DAMPING,
                            memory_limit=parts[0].memory_limit if parts else DEFAULT_CALIBRATION_MEMORY)


def collect_moments(model: nn.Module, todo, calibration, *, memory: int = DEFAULT_CALIBRATION_MEMORY,
                    damping: float = DEFAULT_DAMPING) -> tuple[list[list[Tensor]], CalibrationStats]:
    """Input second moments C = (1/N) sum x x^T (float64, (n, n), on the inputs' device) of every
    matrix of every target (name, module, layer class) of ``targets.collect``.

    calibration: a callable fn(model) that runs the model on the calibration data itself, or an
      iterable of inputs: a Tensor x -> model(x), a tuple / list -> model(*x), a dict -> model(**x).
    The model runs under torch.no_grad() in eval mode (every module's training flag restored
    afterwards), with forward hooks on the target modules only, removed afterwards also on errors;
    nothing else in the model changes.  Matrices whose input is the same tensor within one call
    sequence (q / k / v, gate / up: same data pointer, shape, stride, dtype and version counter)
    share one moment.  If the moments (n^2 8 bytes each, counted without sharing) exceed ``memory``
    bytes, the targets are collected in groups, one pass over the calibration data each (a
    callable or a re-iterable such as a list; a one-shot iterator raises then).  A matrix that was
    fed the same tensor as another on some calls but not on all gets its own moment in one more pass.
    damping: only recorded in the stats (the decomposition applies it).
    Returns (moments: per target a list aligned with ``cls.matrices``, stats).
    Raises TypeError / ValueError naming ``calibration`` (bad type, no inputs, one-shot iterator
    with several passes), ``calibration_memory`` (one moment alone exceeds it) or the layer (never
    reached; an input it cannot calibrate).
    """
    check_calibration(calibration)
    memory = check_memory(memory)
    for name, _, cls in todo:
        if not issubclass(cls, _CALIBRATED_TYPES):
            raise ValueError(f"calibration: {name}: layer type {cls.__name__} has no rule for its matrices' inputs, "
                             f"so it cannot be calibrated; exclude it or convert without calibration")
    t0 = time.perf_counter()
    one_shot = is_one_shot(calibration)
    slots: list[_Slot] = []
    for name, mod, cls in todo:
        for i, (_, W) in enumerate(cls.matrices(mod)):
            slots.append(_Slot(name, i, int(W.shape[1])))
    groups = _greedy_groups(
        slots, lambda s: s.n * s.n * 8, memory,
        lambda s, need: (f"calibration_memory: the input moment of {s.name} ({s.n} x {s.n} float64) alone needs "
                         f"{need:,} bytes, more than calibration_memory={memory:,}"))
    if one_shot and len(groups) > 1:
        raise ValueError(f"calibration: the input moments need {len(groups)} passes over the calibration data under "
                         f"calibration_memory={memory:,} bytes, but a one-shot iterator gives only one; pass a list, "
                         f"a re-iterable data loader or a callable fn(model)")
    modules = {name: (mod, cls) for name, mod, cls in todo}
    nmats = {name: len(cls.matrices(mod)) for name, mod, cls in todo}
    modes = [(m, m.training) for m in model.modules()]
    passes, peak = 0, 0
    done: list[_Slot] = []
    pending = list(groups)
    try:
        model.eval()
        while pending:
            group = pending.pop(0)
            if passes and one_shot:
                names = sorted({s.name for s in group})
                raise ValueError(f"calibration: {', '.join(names)} were fed the same tensor as another layer on some "
                                 f"calls but not on all, so their moments need another pass over the calibration "
                                 f"data, which a one-shot iterator cannot give; pass a list or a callable fn(model)")
            col = _Collector({(s.name, s.index): s for s in group})
            handles = []
            try:
                for name in dict.fromkeys(s.name for s in group):
                    mod, cls = modules[name]
                    handles.append(mod.register_forward_hook(col.hook(name, cls, nmats[name]), with_kwargs=True))
                with torch.no_grad():
                    items = _run(model, calibration)
            finally:
                for h in handles:
                    h.remove()
                col.cache.clear()
            if col.error is not None:
                raise col.error
            passes += 1
            if items == 0:
                raise ValueError("calibration: the iterable yielded no inputs")
            peak = max(peak, sum(s.acc.numel() * 8 for s in group if s.acc is not None))
            redo = []
            for s in group:
                if s.root is not None and (s.broken or s.rows != s.root.rows):
                    s.root, s.rows, s.consumed, s.broken, s.share = None, 0, set(), False, False
                    redo.append(s)
            done += [s for s in group if s not in redo]
            if redo:
                pending.append(redo)
    finally:
        for m, mode in modes:
            m.training = mode
    byslot = {}
    distinct = 0
    for s in done:
        if s.root is None:
            if s.rows == 0 or s.acc is None:
                raise ValueError(f"calibration: {s.name} received no inputs from the calibration data (the model never "
                                 f"called it); exclude it or use calibration data that reaches it")
            byslot[(s.name, s.index)] = s.acc.div_(s.rows)
            distinct += 1
    for s in done:
        if s.root is not None:
            byslot[(s.name, s.index)] = byslot[(s.root.name, s.root.index)]
    moments = [[byslot[(name, i)] for i in range(nmats[name])] for name, _, _ in todo]
    stats = CalibrationStats(passes=passes, seconds=time.perf_counter() - t0, peak_bytes=peak, matrices=len(slots),
                             moments=distinct, damping=float(damping), memory_limit=memory)
    return moments, stats
