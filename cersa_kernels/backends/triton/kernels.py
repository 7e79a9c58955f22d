"""Triton kernels of ``cersa_linear`` (docs/design.md, "Forward", "Backward" and "Triton kernels")
and their launches.

Two GEMM kernels cover every product of the forward and the backward pass, each
reading the frozen and the trainable factor through *separate* pointers (no
concatenated ``[Vh; A]`` or ``[U | B]`` is ever built):

``_seg_cols_kernel``  C = P @ [Q1 | Q2]   (output columns in two segments)
    The column tiles of the launch grid are aligned to the segments: the first
    ``cdiv(N1, BN)`` tiles read Q1 and write C1, the rest read Q2 and write C2.
    Epilogue of segment 1: optional raw copy (``xv``), optional fused column
    reduction ``RED[j] += sum_i AUX[i, j] * C1raw[i, j]`` (``dS``), optional
    column scale ``S1`` (``diag(S)``).  Epilogue of segment 2: scalar ``alpha2``
    (the delta scale s).  Optional fused row sum of P (``dbias``).
    Used for: down-projection ``[x Vh^T * S | s x A^T]``, ``dh = dy [U | B]``
    (with ``dS``), ``[dVh; dA] = [g_r | g_k]^T x`` and ``[dU | dB] = dy^T [xv S | h_k]``
    (with ``dbias``).

``_seg_k_kernel``     C = P1 @ Q1 + P2 @ Q2 + bias   (two K segments, one accumulator)
    Used for: up-projection ``y = h_r U^T + h_k B^T + bias`` and
    ``dx = g_r Vh + g_k A``.

Quantized frozen factor (docs/design.md "Quantized factors"): in both kernels the operand Q1
(Vh^T or U^T in the forward, U or Vh in the backward) may be given as a :class:`QuantOperand`,
the int8 or packed NF4 codes and float32 block scales of a ``cersa_kernels.quant.QuantizedMatrix``
(constexpr ``QUANT``: 0 none, 1 int8, 2 nf4).  Each (BK, BN) tile of Q1 is then decoded in the load
of the K loop (:func:`_decode`): the flat row-major index of the factor's element, in 64 bits, is
``i * s_q1k + j * s_q1n`` with the strides of the launch's view of the factor; its block is
``flat >> Q_SHIFT`` (block_size = 2**Q_SHIFT); int8: ``div_rn(code, 127) * scale``; nf4:
``levels[nibble] * scale`` with the nibble ``flat & 1`` of byte ``flat >> 1`` (low nibble first)
and the 16 float32 levels read from a small tensor; the value is cast to the input dtype (rounded to
nearest, ties to even) before ``tl.dot``.  The numbers are exactly those of
``QuantizedMatrix.dequantize(x.dtype)``; no decoded factor exists outside the tiles in registers.

Launches are planned, then run: :func:`seg_cols`, :func:`seg_k`, :func:`seg_rows` and
:func:`colsum` return a :class:`Launch` (kernel, grid, arguments, constexprs) or None when the
grid would be empty (zero rows launch nothing); :func:`run` executes one.  The backend
(:mod:`cersa_kernels.backends.triton`) decides what is run, and with which settings; this module
holds no state of its own.

Numerics: accumulation in fp32 (fp64 for fp64 inputs); fp32 inputs use TF32
tensor cores only when the planner is called with ``tf32=True`` (the backend
passes its TF32 setting).  Under the Triton interpreter (``TRITON_INTERPRET=1``)
16-bit tiles are upcast to fp32 before ``tl.dot`` (the interpreter's bf16 ``dot``
is wrong).

Every tensor is passed with its strides; every load and store is masked on the
ragged edges.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------

def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


#: GPU configurations.  Large tiles with deep pipelines for Hopper (H100/H200: 228 KiB smem,
#: wgmma wants BM >= 64 and 8 warps), 32-deep K tiles for Ampere (A100: 164 KiB smem), and
#: skinny-M tiles for decode-like inputs (N = 1..64 rows).  Each launch keeps the family of its
#: device (capability >= 9: Hopper, else Ampere) plus the skinny family, minus the configurations
#: that exceed shared memory or whose BM is far larger than M (see select_configs).  One configuration
#: under the interpreter.
HOPPER_CONFIGS = (
    _cfg(128, 256, 64, 8, 3),    # 16-bit inputs
    _cfg(256, 128, 64, 8, 3),    # 16-bit inputs
    _cfg(128, 128, 64, 8, 4),    # 16-bit inputs
    _cfg(128, 128, 32, 8, 3),    # fp32 inputs (TF32 / IEEE)
    _cfg(128, 64, 32, 4, 4),     # fp32 / fp64 inputs
)
AMPERE_CONFIGS = (
    _cfg(128, 128, 32, 4, 4),
    _cfg(128, 64, 32, 4, 4),
    _cfg(64, 128, 32, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(64, 64, 32, 4, 3),      # fits for fp64 inputs
)
SKINNY_CONFIGS = (
    _cfg(16, 64, 128, 4, 4),
    _cfg(16, 128, 128, 4, 3),
    _cfg(32, 128, 64, 4, 4),
)
#: extra configurations for launches whose operand Q1 is a quantized factor (only those: see
#: select_configs): their pipelines also hold the codes and a gathered float32 scale (and NF4 level)
#: per number of each Q1 tile, so the deep-pipelined large tiles above do not fit.
QUANT_CONFIGS = (
    _cfg(128, 128, 64, 8, 2),
    _cfg(128, 64, 64, 4, 3),
    _cfg(16, 64, 64, 4, 3),      # skinny
)
GPU_CONFIGS = HOPPER_CONFIGS + AMPERE_CONFIGS + SKINNY_CONFIGS + QUANT_CONFIGS
_HOPPER_IDS = frozenset(id(c) for c in HOPPER_CONFIGS)
_AMPERE_IDS = frozenset(id(c) for c in AMPERE_CONFIGS)
_QUANT_IDS = frozenset(id(c) for c in QUANT_CONFIGS)
#: bytes per number of a quantized Q1 tile in the pipeline, by code dtype: int8 code + float32
#: scale; NF4 byte + scale + float32 level (upper bounds of what the sm_80 / sm_90 compiles allocate,
#: scripts/triton_compile_check.py).
_QUANT_TILE_BYTES = {torch.int8: 5, torch.uint8: 9}


#: the one configuration used by the interpreter (small blocks so that the tests' odd sizes
#: span several tiles and every ragged edge is exercised).
INTERP_CONFIG = _cfg(16, 16, 16, 1, 1, group=2)


@dataclass(frozen=True)
class Limits:
    """What :func:`select_configs` needs to know of a CUDA device.

    smem_per_block: opt-in shared memory per block, bytes (e.g. 232448 on sm_90, 166912 on sm_80);
    major: compute capability major (>= 9 selects the Hopper configurations, else Ampere)."""
    smem_per_block: int
    major: int


def device_limits(device: torch.device | int | None = None) -> Limits:
    """The :class:`Limits` of a CUDA device (default: the current one), read from
    ``torch.cuda.get_device_properties``.  Raises what torch raises when no such device exists."""
    props = torch.cuda.get_device_properties(device)
    return Limits(int(props.shared_memory_per_block_optin), int(props.major))


def _elt_size(named_args) -> int:
    for name in ("P", "P1"):
        t = named_args.get(name)
        if t is not None and hasattr(t, "element_size"):
            return t.element_size()
    return 2


def _quant_bytes(named_args) -> int | None:
    """Bytes per number of the pipelined Q1 tile when Q1 is a quantized factor's codes, else None."""
    q = named_args.get("Q1")
    return _QUANT_TILE_BYTES.get(getattr(q, "dtype", None))


def _smem(c, esize: int, qsize: int | None = None) -> int:
    """Shared memory of a configuration's software pipeline (bytes), as Triton allocates it for
    one K loop: num_stages copies of the (BM, BK) and (BK, BN) operand tiles (``qsize`` bytes per
    number of the (BK, BN) tile instead of ``esize`` when it is decoded from codes).  (Compiled for sm_90
    and sm_80, the kernels' two segment loops share these buffers; see
    scripts/triton_compile_check.py.)"""
    kw = c.kwargs
    return c.num_stages * (kw["BM"] * kw["BK"] * esize + kw["BK"] * kw["BN"] * (qsize or esize))


def select_configs(configs, named_args: Mapping[str, Any], limits: Limits, *, autotune: bool) -> list:
    """The candidate configurations of one launch on a device with ``limits``.

    configs: triton.Config candidates (normally :data:`GPU_CONFIGS`); named_args: the launch's
    arguments by kernel parameter name (the tensors give the element size, M or M1 + M2 the rows).
    Keeps the configurations whose pipelined tiles fit in shared memory and whose BM is not far
    larger than M (skinny inputs); with ``autotune=False`` only the first one that fits even at
    twice the estimate (no benchmarking: one compile per kernel variant).  :data:`QUANT_CONFIGS`
    are candidates of the launches whose Q1 is a quantized factor's codes (then of either device
    family, with the larger tiles counted by ``_smem``), and only of those.  Never empty."""
    smem_limit, major = limits.smem_per_block, limits.major
    qsize = _quant_bytes(named_args)
    family = _HOPPER_IDS if major >= 9 else _AMPERE_IDS
    if qsize is not None:
        family = family | _QUANT_IDS
    else:
        configs = [c for c in configs if id(c) not in _QUANT_IDS]
    esize = _elt_size(named_args)
    if "M" in named_args:
        m = int(named_args["M"])
    elif "M1" in named_args:
        m = int(named_args["M1"]) + int(named_args["M2"])
    else:
        m = 1 << 30
    mcap = max(16, triton.next_power_of_2(max(m, 1)))
    out = []
    for c in configs:
        kw = c.kwargs
        if kw["BM"] >= 64 and id(c) not in family:
            continue
        if major >= 9 and esize <= 2 and kw["BK"] < 64 and kw["BM"] >= 64:
            continue  # Hopper, 16-bit: the BK = 32 tiles are for 4-byte inputs
        if kw["BM"] < 64 and kw["BM"] > mcap:
            continue  # skinny tiles: no taller than M rounded up
        if _smem(c, esize, qsize) > smem_limit:
            continue
        if kw["BM"] > 2 * mcap:
            continue
        if m > 256 and kw["BM"] < 64:
            continue
        out.append(c)
    if not out:
        out = [min(configs, key=lambda c: c.num_stages * (c.kwargs["BM"] + c.kwargs["BN"]) * c.kwargs["BK"])]
    if not autotune:
        # no benchmarking: the first configuration that fits even if the compiler gives each of
        # the kernel's two K loops its own pipeline buffers (twice the estimate); skinny for small M.
        order = out if m > 256 else out[::-1]
        safe = [c for c in order if _smem(c, esize, qsize) + _smem(c, esize) <= smem_limit]
        return (safe or order)[:1]
    return out


def _bench(fn, quantiles):
    # Short autotuning budget so that the first call of a new shape stays cheap.
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _prune_on_device(configs, named_args, **kwargs):
    """Autotuner hook: :func:`select_configs` with the limits of the device of the launch's tensors."""
    tensor = named_args.get("P", named_args.get("P1"))
    return select_configs(configs, named_args, device_limits(tensor.device), autotune=True)


def _make_autotuned(jit_fn, key, reset_to_zero=None):
    if isinstance(jit_fn, InterpretedFunction):
        return triton.autotune(configs=[INTERP_CONFIG], key=key)(jit_fn)
    return triton.autotune(configs=list(GPU_CONFIGS), key=key,
                           prune_configs_by={"early_config_prune": _prune_on_device},
                           reset_to_zero=reset_to_zero, do_bench=_bench)(jit_fn)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _tile_ids(pid, num_m, num_n, GROUP_M: tl.constexpr):
    # grouped ordering: GROUP_M row tiles share column tiles in L2.
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize
    return pid_m, pid_n


@triton.jit
def _rne(v, FIX_BF16: tl.constexpr):
    """v, pre-rounded to the nearest bf16 (ties to even) when FIX_BF16: the interpreter's
    fp32 -> bf16 cast truncates, the GPU's rounds to nearest; a no-op otherwise."""
    if FIX_BF16:
        b = v.to(tl.float32).to(tl.uint32, bitcast=True)
        b = (b + (((b >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        v = b.to(tl.float32, bitcast=True)
    return v


@triton.jit
def _decode(CODES, SCALES, LEVELS, idx, mask, QUANT: tl.constexpr, Q_SHIFT: tl.constexpr):
    """The float32 values of the quantized factor at the flat row-major indices ``idx`` (int64),
    0 where ``mask`` is false: int8 (QUANT 1) ``div_rn(code, 127) * scale``, nf4 (QUANT 2)
    ``levels[nibble] * scale`` (nibble ``idx & 1`` of byte ``idx >> 1``, low nibble first), scale
    = SCALES[idx >> Q_SHIFT].  The operations and roundings of ``cersa_kernels.quant.dequantize``
    (an IEEE division: Triton's ``/`` on fp32 is an approximate one on GPUs)."""
    sc = tl.load(SCALES + (idx >> Q_SHIFT), mask=mask, other=0.0)
    if QUANT == 1:
        code = tl.load(CODES + idx, mask=mask, other=0)
        v = tl.math.div_rn(code.to(tl.float32), 127.0) * sc
    else:
        byte = tl.load(CODES + (idx >> 1), mask=mask, other=0).to(tl.int32)
        nib = tl.where((idx & 1) == 1, byte >> 4, byte) & 15
        v = tl.load(LEVELS + nib) * sc
    return v


@triton.jit
def _dot_loop(acc, rs, P, Q, offs_m, offs_n, M, ncols, K, s_pm, s_pk, s_qk, s_qn,
              ROWSUM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              BK: tl.constexpr, QS, QL, QUANT: tl.constexpr, Q_SHIFT: tl.constexpr,
              FIX_BF16: tl.constexpr):
    """acc += P[offs_m, :K] @ Q[:K, offs_n]; rs += row sums of P when ROWSUM.

    QUANT 0: Q is a plain matrix with strides (s_qk, s_qn).  QUANT 1 / 2: Q points to the int8 /
    packed NF4 codes of a quantized factor (scales QS, NF4 levels QL, blocks of 2**Q_SHIFT), whose
    element Q[i, j] is the factor's flat element i * s_qk + j * s_qn; each tile is decoded
    (:func:`_decode`) and cast to P's dtype (rounded to nearest even, also under the interpreter
    when FIX_BF16) before the dot."""
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < ncols
    p_ptrs = P + offs_m.to(tl.int64)[:, None] * s_pm + offs_k[None, :] * s_pk
    if QUANT == 0:
        q_ptrs = Q + offs_k[:, None] * s_qk + offs_n.to(tl.int64)[None, :] * s_qn
    else:
        q_idx = offs_k.to(tl.int64)[:, None] * s_qk + offs_n.to(tl.int64)[None, :] * s_qn
    for k0 in range(0, K, BK):
        kmask = offs_k < K - k0
        a = tl.load(p_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0.0)
        if QUANT == 0:
            b = tl.load(q_ptrs, mask=kmask[:, None] & mask_n[None, :], other=0.0)
            q_ptrs += BK * s_qk
        else:
            b = _decode(Q, QS, QL, q_idx, kmask[:, None] & mask_n[None, :], QUANT, Q_SHIFT)
            b = _rne(b, FIX_BF16).to(a.dtype)
            q_idx += BK * s_qk
        if ROWSUM:
            rs += tl.sum(a.to(acc.dtype), axis=1)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        p_ptrs += BK * s_pk
    return acc, rs


@triton.jit
def _seg_cols_kernel(
    P, Q1, Q2, C1, C2, XR, S1, AUX, RED, RS, QS1, QL1,
    M, N1, N2, K,
    s_pm, s_pk, s_q1k, s_q1n, s_q2k, s_q2n,
    s_c1m, s_c1n, s_c2m, s_c2n, s_xrm, s_xrn, s_am, s_an,
    alpha2, M_BUCKET,
    HAS_S1: tl.constexpr, WRITE_RAW: tl.constexpr, HAS_RED: tl.constexpr, HAS_RS: tl.constexpr,
    HAS_ALPHA: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, FIX_BF16: tl.constexpr, NB2: tl.constexpr,
    QUANT: tl.constexpr, Q_SHIFT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C1 = epi1(P @ Q1) (M, N1) and C2 = alpha2 * (P @ Q2) (M, N2) in one launch.

    Segment 1 is cut in BN-wide column tiles, segment 2 (the delta, k columns) in NB2-wide ones
    (NB2 ~ k), so the narrow delta segment does not pay for a full BN-wide tile.  QUANT > 0: Q1
    is a quantized factor's codes, with scales QS1 and NF4 levels QL1 (see :func:`_dot_loop`)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    t1 = tl.cdiv(N1, BN)
    num_n = t1 + tl.cdiv(N2, NB2)
    pid_m, pid_n = _tile_ids(pid, num_m, num_n, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=ACC_DTYPE)
    rs = tl.zeros((BM,), dtype=ACC_DTYPE)
    if pid_n < t1:
        # ---- segment 1: frozen factor (Vh^T, U, xv, g_r, ...) ----
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_n = offs_n < N1
        acc, rs = _dot_loop(acc, rs, P, Q1, offs_m, offs_n, M, N1, K, s_pm, s_pk, s_q1k, s_q1n,
                            HAS_RS, UPCAST, PRECISION, BK, QS1, QL1, QUANT, Q_SHIFT, FIX_BF16)
        mask = mask_m[:, None] & mask_n[None, :]
        if WRITE_RAW:
            tl.store(XR + offs_m64[:, None] * s_xrm + offs_n[None, :] * s_xrn,
                     _rne(acc, FIX_BF16).to(XR.dtype.element_ty), mask=mask)
        if HAS_RED:
            aux = tl.load(AUX + offs_m64[:, None] * s_am + offs_n[None, :] * s_an, mask=mask, other=0.0)
            tl.atomic_add(RED + offs_n, tl.sum(aux.to(ACC_DTYPE) * acc, axis=0), mask=mask_n)
        if HAS_S1:
            s = tl.load(S1 + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)
            acc = acc * s[None, :]
        tl.store(C1 + offs_m64[:, None] * s_c1m + offs_n[None, :] * s_c1n,
                 _rne(acc, FIX_BF16).to(C1.dtype.element_ty), mask=mask)
    else:
        # ---- segment 2: trainable factor (A^T, B, h_k, ...), NB2-wide tiles ----
        offs_n2 = (pid_n - t1) * NB2 + tl.arange(0, NB2)
        mask_n2 = offs_n2 < N2
        acc2 = tl.zeros((BM, NB2), dtype=ACC_DTYPE)
        acc2, rs = _dot_loop(acc2, rs, P, Q2, offs_m, offs_n2, M, N2, K, s_pm, s_pk, s_q2k, s_q2n,
                             HAS_RS, UPCAST, PRECISION, BK, QS1, QL1, 0, 0, FIX_BF16)
        if HAS_ALPHA:
            acc2 = acc2 * alpha2
        tl.store(C2 + offs_m64[:, None] * s_c2m + offs_n2[None, :] * s_c2n,
                 _rne(acc2, FIX_BF16).to(C2.dtype.element_ty), mask=mask_m[:, None] & mask_n2[None, :])
    if HAS_RS:
        # fused row sums of P (dbias); the first column tile of each row tile writes them.
        if pid_n == 0:
            tl.store(RS + offs_m, rs.to(RS.dtype.element_ty), mask=mask_m)


@triton.jit
def _seg_k_kernel(
    P1, Q1, P2, Q2, C, BIAS, QS1, QL1,
    M, N, K1, K2,
    s_p1m, s_p1k, s_q1k, s_q1n, s_p2m, s_p2k, s_q2k, s_q2n, s_cm, s_cn,
    M_BUCKET,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, FIX_BF16: tl.constexpr, QUANT: tl.constexpr, Q_SHIFT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C (M, N) = P1 @ Q1 + P2 @ Q2 (+ bias), both K segments in one accumulator.  QUANT > 0:
    Q1 is a quantized factor's codes, with scales QS1 and NF4 levels QL1 (see :func:`_dot_loop`)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    pid_m, pid_n = _tile_ids(pid, num_m, num_n, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BM, BN), dtype=ACC_DTYPE)
    rs = tl.zeros((BM,), dtype=ACC_DTYPE)
    acc, rs = _dot_loop(acc, rs, P1, Q1, offs_m, offs_n, M, N, K1, s_p1m, s_p1k, s_q1k, s_q1n,
                        False, UPCAST, PRECISION, BK, QS1, QL1, QUANT, Q_SHIFT, FIX_BF16)
    acc, rs = _dot_loop(acc, rs, P2, Q2, offs_m, offs_n, M, N, K2, s_p2m, s_p2k, s_q2k, s_q2n,
                        False, UPCAST, PRECISION, BK, QS1, QL1, 0, 0, FIX_BF16)
    if HAS_BIAS:
        b = tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)
        acc = acc + b[None, :]
    tl.store(C + offs_m.to(tl.int64)[:, None] * s_cm + offs_n[None, :] * s_cn,
             _rne(acc, FIX_BF16).to(C.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# The segment's sizes and non-unit strides are merged across an if/else before the single K loop,
# so they must not be specialised to the constant 1 in one segment only (e.g. r = 1, k = 16).
@triton.jit(do_not_specialize=["M1", "M2", "s_p1k", "s_p2k", "s_c1m", "s_c2m"])
def _seg_rows_kernel(
    P1, P2, Q, C1, C2,
    M1, M2, N, K,
    s_p1m, s_p1k, s_p2m, s_p2k, s_qk, s_qn, s_c1m, s_c1n, s_c2m, s_c2n,
    M_BUCKET,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C1 (M1, N) = P1 @ Q and C2 (M2, N) = P2 @ Q in one launch (row tiles aligned to the two
    segments); used for [dVh; dA] = [g_r^T; g_k^T] x so that both are written row-major."""
    pid = tl.program_id(0)
    t1 = tl.cdiv(M1, BM)
    num_m = t1 + tl.cdiv(M2, BM)
    num_n = tl.cdiv(N, BN)
    pid_m, pid_n = _tile_ids(pid, num_m, num_n, GROUP_M)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    acc = tl.zeros((BM, BN), dtype=ACC_DTYPE)
    rs = tl.zeros((BM,), dtype=ACC_DTYPE)
    # one K loop for both segments (two pipelined loops would double the shared memory): pick the
    # segment's operand, strides and output before the loop.
    if pid_m < t1:
        P = P1
        s_pm = s_p1m
        s_pk = s_p1k
        C = C1
        s_cm = s_c1m
        s_cn = s_c1n
        rows = M1
        row0 = pid_m * BM
    else:
        P = P2
        s_pm = s_p2m
        s_pk = s_p2k
        C = C2
        s_cm = s_c2m
        s_cn = s_c2n
        rows = M2
        row0 = (pid_m - t1) * BM
    offs_m = row0 + tl.arange(0, BM)
    acc, rs = _dot_loop(acc, rs, P, Q, offs_m, offs_n, rows, N, K, s_pm, s_pk, s_qk, s_qn,
                        False, UPCAST, PRECISION, BK, Q, Q, 0, 0, FIX_BF16)
    tl.store(C + offs_m.to(tl.int64)[:, None] * s_cm + offs_n[None, :] * s_cn,
             _rne(acc, FIX_BF16).to(C.dtype.element_ty), mask=(offs_m < rows)[:, None] & mask_n[None, :])


@triton.jit
def _colsum_kernel(X, OUT, M, N, s_xm, s_xn, BM: tl.constexpr, BN: tl.constexpr,
                   ACC_DTYPE: tl.constexpr):
    """OUT (N,) = sum over rows of X (M, N) (dbias when no dB/dU GEMM runs)."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    acc = tl.zeros((BN,), dtype=ACC_DTYPE)
    offs_m = tl.arange(0, BM)
    for m0 in range(0, M, BM):
        rows = m0 + offs_m
        x = tl.load(X + rows.to(tl.int64)[:, None] * s_xm + offs_n[None, :] * s_xn,
                    mask=(rows < M)[:, None] & mask_n[None, :], other=0.0)
        acc += tl.sum(x.to(ACC_DTYPE), axis=0)
    tl.store(OUT + offs_n, acc.to(OUT.dtype.element_ty), mask=mask_n)


#: True when the kernels were created by the Triton interpreter (TRITON_INTERPRET=1 was set
#: before this module, and triton, were imported).
INTERPRETED = isinstance(_seg_k_kernel, InterpretedFunction)

_seg_cols = _make_autotuned(_seg_cols_kernel, key=["M_BUCKET", "N1", "N2", "K"], reset_to_zero=["RED"])
_seg_k = _make_autotuned(_seg_k_kernel, key=["M_BUCKET", "N", "K1", "K2"])
_seg_rows = _make_autotuned(_seg_rows_kernel, key=["M_BUCKET", "N", "K"])


# ---------------------------------------------------------------------------------------------
# launches: planned by seg_cols / seg_k / seg_rows / colsum (2-D tensors with arbitrary strides;
# shapes checked by the caller), executed by run
# ---------------------------------------------------------------------------------------------

#: values of the constexpr QUANT of _seg_cols / _seg_k: how their operand Q1 is stored.
QUANT_NONE, QUANT_INT8, QUANT_NF4 = 0, 1, 2
_QUANT_CODES = {"int8": QUANT_INT8, "nf4": QUANT_NF4}


@dataclass(frozen=True)
class QuantOperand:
    """A quantized frozen factor seen as the operand Q1 of :func:`seg_cols` / :func:`seg_k`.

    codes: int8 (rows cols,) for "int8" or packed uint8 (ceil(rows cols / 2),) for "nf4", contiguous;
    scales: float32 (ceil(rows cols / block_size),) (``QuantizedMatrix.scales()``); levels: the 16
    float32 NF4 levels (any float32 tensor for int8: never read); quant: QUANT_INT8 / QUANT_NF4;
    block_shift: log2(block_size).  shape and strides describe the operand as a view of the factor:
    element [i, j] is the factor's flat row-major element i * strides[0] + j * strides[1] (the
    factor itself has strides (cols, 1), its transpose (1, cols)).  Build one with :meth:`factor`."""
    codes: torch.Tensor
    scales: torch.Tensor
    levels: torch.Tensor
    quant: int
    block_shift: int
    shape: tuple[int, int]
    strides: tuple[int, int]

    @classmethod
    def factor(cls, codes, scales, levels, rows: int, cols: int, quant_type: str,
               block_size: int) -> "QuantOperand":
        """The (rows, cols) factor itself, from its codes and scales (formats: the class doc;
        checked by the caller).  quant_type "int8" or "nf4"; block_size a power of two."""
        return cls(codes, scales, levels, _QUANT_CODES[quant_type], int(block_size).bit_length() - 1,
                   (int(rows), int(cols)), (int(cols), 1))

    def stride(self, dim: int) -> int:
        return self.strides[dim]

    def t(self) -> "QuantOperand":
        """The transposed view (no data touched)."""
        return replace(self, shape=self.shape[::-1], strides=self.strides[::-1])

    def first_cols(self, j: int) -> "QuantOperand":
        """The view of the first j columns."""
        return replace(self, shape=(self.shape[0], int(j)))


def first_cols(Q, j: int):
    """The first j columns of a 2-D operand (a tensor view or a :class:`QuantOperand` view)."""
    return Q.first_cols(j) if isinstance(Q, QuantOperand) else Q[:, :j]


def _q1_args(Q1, dummy):
    """(codes or Q1, scales, levels, constexprs) of operand Q1 of a launch."""
    if isinstance(Q1, QuantOperand):
        return Q1.codes, Q1.scales, Q1.levels, dict(QUANT=Q1.quant, Q_SHIFT=Q1.block_shift)
    return Q1, dummy, dummy, dict(QUANT=QUANT_NONE, Q_SHIFT=0)


@dataclass(frozen=True)
class Launch:
    """One planned kernel launch: ``kernel[grid](*args, **constexprs, <tile configuration>)``.

    name: "seg_cols", "seg_k", "seg_rows" or "colsum"; kernel: the (not autotuned) ``triton.jit``
    function; grid: a tuple, or a callable of the launch's meta-parameters (BM, BN, ...) giving one;
    args: the positional arguments (tensors, ints, floats) in the kernel's parameter order;
    constexprs: the compile-time arguments the planner fixed; tuner: the kernel's autotuner when
    the tile configuration (BM, BN, BK, GROUP_M, warps, stages) is still to be chosen, else None
    (the constexprs are complete)."""
    name: str
    kernel: Any
    grid: Callable[[dict], tuple] | tuple
    args: tuple
    constexprs: Mapping[str, Any]
    tuner: Any = field(default=None, repr=False)

    @property
    def named_args(self) -> dict:
        """The positional arguments by kernel parameter name."""
        return dict(zip(self.kernel.arg_names, self.args))


def first_fit_config(launch: Launch, limits: Limits | None = None):
    """The tile configuration a launch takes without benchmarking: the first of
    :func:`select_configs` (``autotune=False``) on a device with ``limits`` (default: the device of
    the launch's first tensor); :data:`INTERP_CONFIG` under the interpreter."""
    if INTERPRETED:
        return INTERP_CONFIG
    named = launch.named_args
    if limits is None:
        limits = device_limits(next(v for v in launch.args if isinstance(v, torch.Tensor)).device)
    return select_configs(GPU_CONFIGS, named, limits, autotune=False)[0]


def run(launch: Launch, *, autotune: bool = True) -> None:
    """Execute a planned launch on its tensors' device.  Launches with a tile configuration to
    choose benchmark the candidates of each new shape (autotune=True, results cached by
    Triton) or take :func:`first_fit_config` (autotune=False)."""
    if launch.tuner is None:
        launch.kernel[launch.grid](*launch.args, **launch.constexprs)
    elif autotune:
        launch.tuner[launch.grid](*launch.args, **launch.constexprs)
    else:
        launch.kernel[launch.grid](*launch.args, **launch.constexprs,
                                   **first_fit_config(launch).all_kwargs())


def _flags(dtype: torch.dtype, tf32: bool):
    """(ACC_DTYPE, UPCAST, PRECISION) for an input dtype; TF32 for fp32 inputs when tf32."""
    if dtype == torch.float64:
        return tl.float64, False, "ieee"
    upcast = INTERPRETED and dtype in (torch.float16, torch.bfloat16)
    if dtype == torch.float32:
        prec = "tf32" if (tf32 and not INTERPRETED) else "ieee"
    else:
        prec = "tf32" if not INTERPRETED else "ieee"
    return tl.float32, upcast, prec


def _fix_bf16(out_dtype: torch.dtype) -> bool:
    return INTERPRETED and out_dtype == torch.bfloat16


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def nb2_for(n2: int) -> int:
    """Tile width of the delta segment of _seg_cols: k rounded up to a power of two in [16, 64]
    (16 under the interpreter, so that the tests' delta ranks span several tiles)."""
    if INTERPRETED:
        return 16
    return min(64, max(16, triton.next_power_of_2(max(int(n2), 1))))


def _bucket(m: int) -> int:
    return triton.next_power_of_2(max(int(m), 1))


def seg_cols(P, Q1, Q2, C1, C2, *, S1=None, alpha2=None, raw_out=None, red=None, aux=None,
             rowsum=None, tf32: bool = False) -> Launch | None:
    """Plan C1 = (P @ Q1) [* S1 columns], C2 = alpha2 * (P @ Q2); optional raw copy of P @ Q1
    into raw_out, ``red += sum_rows(aux * (P @ Q1))`` (fp32/fp64 buffer), ``rowsum = sum_cols(P)``.

    P (M, K); Q1 (K, N1); Q2 (K, N2); C1 (M, N1); C2 (M, N2); any strides.  Segments of width 0
    are allowed (pass a (K, 0)/(M, 0) tensor).  tf32: fp32 inputs on TF32 tensor cores.
    Q1 may be a :class:`QuantOperand` (decoded in the kernel's loads to P's dtype).
    Returns the launch, or None when its grid is empty (M = 0 or N1 + N2 = 0)."""
    M, K = P.shape
    N1, N2 = Q1.shape[1], Q2.shape[1]
    if M == 0 or N1 + N2 == 0:
        return None
    acc, upcast, prec = _flags(P.dtype, tf32)
    dummy = C1 if N1 > 0 else C2
    red_t = red if red is not None else torch.empty(1, device=P.device, dtype=acc_dtype(P.dtype))
    xr = raw_out if raw_out is not None else dummy
    au = aux if aux is not None else dummy
    rs = rowsum if rowsum is not None else red_t
    s1 = S1 if S1 is not None else dummy
    q1, qs1, ql1, quant = _q1_args(Q1, dummy)

    nb2 = nb2_for(N2)

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * (triton.cdiv(N1, meta["BN"]) + triton.cdiv(N2, nb2)),)

    args = (P, q1, Q2, C1, C2, xr, s1, au, red_t, rs, qs1, ql1,
            M, N1, N2, K,
            P.stride(0), P.stride(1), Q1.stride(0), Q1.stride(1), Q2.stride(0), Q2.stride(1),
            C1.stride(0), C1.stride(1), C2.stride(0), C2.stride(1), xr.stride(0), xr.stride(1),
            au.stride(0), au.stride(1),
            float(alpha2) if alpha2 is not None else 1.0, _bucket(M))
    constexprs = dict(
        HAS_S1=S1 is not None, WRITE_RAW=raw_out is not None, HAS_RED=red is not None,
        HAS_RS=rowsum is not None, HAS_ALPHA=alpha2 is not None and alpha2 != 1.0,
        ACC_DTYPE=acc, UPCAST=upcast, PRECISION=prec, FIX_BF16=_fix_bf16(dummy.dtype), NB2=nb2, **quant)
    return Launch("seg_cols", _seg_cols_kernel, grid, args, constexprs, _seg_cols)


def seg_k(P1, Q1, P2, Q2, C, bias=None, *, tf32: bool = False) -> Launch | None:
    """Plan C (M, N) = P1 @ Q1 + P2 @ Q2 (+ bias (N,)); P1 (M, K1), Q1 (K1, N), P2 (M, K2),
    Q2 (K2, N); P2/Q2 may be None (K2 = 0).  Any strides.  Q1 may be a :class:`QuantOperand`
    (decoded in the kernel's loads to P1's dtype).  tf32: fp32 inputs on TF32 tensor cores.
    Returns the launch, or None when its grid is empty (M = 0 or N = 0)."""
    M, N = C.shape
    if M == 0 or N == 0:
        return None
    if P2 is None:
        P2, Q2 = P1[:, :0], C[:0, :]
    acc, upcast, prec = _flags(P1.dtype, tf32)
    K1, K2 = P1.shape[1], P2.shape[1]
    q1, qs1, ql1, quant = _q1_args(Q1, C)

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

    args = (P1, q1, P2, Q2, C, bias.contiguous() if bias is not None else C, qs1, ql1,
            M, N, K1, K2,
            P1.stride(0), P1.stride(1), Q1.stride(0), Q1.stride(1),
            P2.stride(0), P2.stride(1), Q2.stride(0), Q2.stride(1), C.stride(0), C.stride(1),
            _bucket(M))
    constexprs = dict(HAS_BIAS=bias is not None, ACC_DTYPE=acc, UPCAST=upcast, PRECISION=prec,
                      FIX_BF16=_fix_bf16(C.dtype), **quant)
    return Launch("seg_k", _seg_k_kernel, grid, args, constexprs, _seg_k)


def seg_rows(P1, P2, Q, C1, C2, *, tf32: bool = False) -> Launch | None:
    """Plan C1 (M1, N) = P1 @ Q, C2 (M2, N) = P2 @ Q; P1 (M1, K), P2 (M2, K), Q (K, N); any
    strides; either segment may have 0 rows.  tf32: fp32 inputs on TF32 tensor cores.  Returns
    the launch, or None when its grid is empty (M1 + M2 = 0 or N = 0)."""
    M1, K = P1.shape
    M2 = P2.shape[0]
    N = Q.shape[1]
    if M1 + M2 == 0 or N == 0:
        return None
    acc, upcast, prec = _flags(Q.dtype, tf32)

    def grid(meta):
        return ((triton.cdiv(M1, meta["BM"]) + triton.cdiv(M2, meta["BM"])) * triton.cdiv(N, meta["BN"]),)

    args = (P1, P2, Q, C1, C2,
            M1, M2, N, K,
            P1.stride(0), P1.stride(1), P2.stride(0), P2.stride(1), Q.stride(0), Q.stride(1),
            C1.stride(0), C1.stride(1), C2.stride(0), C2.stride(1),
            _bucket(M1 + M2))
    constexprs = dict(ACC_DTYPE=acc, UPCAST=upcast, PRECISION=prec, FIX_BF16=_fix_bf16(C1.dtype))
    return Launch("seg_rows", _seg_rows_kernel, grid, args, constexprs, _seg_rows)


def colsum(X, out) -> Launch | None:
    """Plan out (N,) = X.sum(0) for X (M, N) with any strides, accumulated in fp32/fp64 (out of
    that dtype); M = 0 writes zeros.  Returns the launch, or None when N = 0."""
    M, N = X.shape
    if N == 0:
        return None
    acc, _, _ = _flags(X.dtype, False)
    BN = 32 if INTERPRETED else 128
    BM = 16 if INTERPRETED else 64
    return Launch("colsum", _colsum_kernel, (triton.cdiv(N, BN),),
                  (X, out, M, N, X.stride(0), X.stride(1)), dict(BM=BM, BN=BN, ACC_DTYPE=acc))
