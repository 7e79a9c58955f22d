"""Triton backend of ``cersa_linear``: fused GEMM kernels for CUDA GPUs (and the CPU interpreter).

Implements the backend contract of :mod:`cersa_kernels.backends` (``is_available``, ``forward``,
``backward``; 2-D tensors, any strides).  The kernels are in :mod:`.kernels`; this module
registers them as the ``torch.library`` custom ops ``cersa_kernels::triton_forward`` and
``cersa_kernels::triton_backward`` with fake (meta) implementations, so that
``torch.compile(fullgraph=True)`` traces through this backend without graph breaks, and maps the
contract's ``None`` results to and from the empty tensors the op schema needs.

Kernel plan (docs/design.md, "Forward" and "Backward"; k = delta rank, r = frozen rank):

=========  ==========================================================  ==================
launch     computes                                                    kernel
=========  ==========================================================  ==================
forward 1  h_r = (x Vh^T) * S, h_k = s x A^T, [xv = x Vh^T]             ``_seg_cols``
forward 2  y = h_r U^T + h_k B^T + bias                                ``_seg_k``
backward 1 g_r = (dy U) * S, g_k = s dy B, [dS = sum(xv * dy U)]       ``_seg_cols``
backward 2 dx = g_r Vh + g_k A                                         ``_seg_k``
backward 3 dVh = g_r^T x, dA = g_k^T x                                 ``_seg_rows``
backward 4 dU = dy^T (xv S), dB = dy^T h_k, dbias = sum_rows(dy)       ``_seg_cols``
=========  ==========================================================  ==================

Quantized frozen factors (docs/design.md "Quantized factors"): ``has_quantized_kernels``,
``forward_quantized`` and ``backward_quantized`` (the optional contract of
:mod:`cersa_kernels.backends`), registered as ``cersa_kernels::triton_forward_q`` /
``triton_backward_q`` with the catalogue's fakes, run the same launches with U and Vh given as the
int8 / NF4 codes and float32 block scales of ``cersa_kernels.quant.QuantizedMatrix``: the frozen
operand of forward 1 / 2 (Vh^T, U^T) and backward 1 / 2 (U, Vh) is decoded tile by tile in the
kernels' loads (:class:`kernels.QuantOperand`), to exactly the numbers of
``QuantizedMatrix.dequantize(x.dtype)``; no decoded factor is ever stored.  Backward 3 and 4 run
only for dA, dB and dbias (the codes are frozen: no dU, dVh).

Dtypes: fp32, bf16, fp16 (fp32 accumulation), fp64 (fp64 accumulation, for gradcheck).  TF32 for
fp32 inputs follows ``torch.backends.cuda.matmul.allow_tf32`` unless overridden with
:func:`set_allow_tf32`.  Intermediates h_r, h_k, g_r, g_k are stored in the input dtype, like the
reference backend; reductions (dS, dbias) are accumulated in fp32 (fp64).

Settings (:data:`settings`, set with :func:`set_allow_tf32` and :func:`set_autotune`) are read
when a forward or backward call plans and runs its launches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ...quant import nf4_levels
from .. import _catalogue
from . import kernels as _k
from .kernels import INTERPRETED  # noqa: F401  (re-exported)

__all__ = ["is_available", "forward", "backward", "has_quantized_kernels", "forward_quantized",
           "backward_quantized", "Settings", "settings", "set_allow_tf32", "tf32_enabled",
           "set_autotune", "autotune_enabled", "INTERPRETED"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _flag(where: str, value, none_ok: bool = False):
    if (value is None and none_ok) or isinstance(value, bool):
        return value
    want = "bool or None" if none_ok else "bool"
    raise TypeError(f"{where}: expected {want}, got {type(value).__name__}")


@dataclass
class Settings:
    """Run-time settings of the Triton backend; the backend reads its one instance, :data:`settings`.

    allow_tf32: fp32 inputs on TF32 tensor cores (True), in IEEE fp32 (False), or as
        ``torch.backends.cuda.matmul.allow_tf32`` says at each call (None, the default: the same
        switch as ``torch.mm``).  Never TF32 under the interpreter.
    autotune: benchmark the candidate tile configurations of each new shape (True; the default
        unless the environment variable CERSA_TRITON_AUTOTUNE is "0" when this module is imported)
        or take the first one that fits the device (False: one compile per kernel variant, for
        quick correctness runs).
    Assigning anything else raises TypeError."""
    allow_tf32: bool | None = None
    autotune: bool = True

    def __setattr__(self, name, value):
        super().__setattr__(name, _flag(f"Settings.{name}", value, none_ok=name == "allow_tf32"))


#: the settings every call of this backend uses.
settings = Settings(autotune=os.environ.get("CERSA_TRITON_AUTOTUNE", "1") != "0")


def set_allow_tf32(flag: bool | None) -> None:
    """Force TF32 on (True) or off (False) for fp32 inputs; None follows
    ``torch.backends.cuda.matmul.allow_tf32`` (the default).  Raises TypeError for other values."""
    settings.allow_tf32 = _flag("set_allow_tf32", flag, none_ok=True)


def tf32_enabled() -> bool:
    """Whether compiled fp32 GEMMs of this backend use TF32 tensor cores now (the interpreter
    always computes in IEEE fp32, whatever this says)."""
    if settings.allow_tf32 is not None:
        return settings.allow_tf32
    return bool(torch.backends.cuda.matmul.allow_tf32)


def set_autotune(flag: bool) -> None:
    """Turn autotuning of the tile configurations on (True) or off (False); see :class:`Settings`.
    Raises TypeError for other values."""
    settings.autotune = _flag("set_autotune", flag)


def autotune_enabled() -> bool:
    """Whether new shapes benchmark their candidate tile configurations (see :class:`Settings`)."""
    return settings.autotune


def is_available(device_type: str) -> tuple[bool, str]:
    """Whether the Triton kernels can run on tensors of ``device_type`` ("cpu" or "cuda").

    "cpu": only when the kernels were created by the Triton interpreter, i.e. TRITON_INTERPRET=1
    was set before triton and this module were imported (slow; for tests).
    "cuda": when a CUDA device is visible (compiled kernels, or interpreted ones when
    TRITON_INTERPRET=1)."""
    if device_type == "cpu":
        if INTERPRETED:
            return True, ""
        return False, ("the Triton backend runs on CPU tensors only under the Triton interpreter: "
                       "set TRITON_INTERPRET=1 before importing triton")
    if device_type == "cuda":
        if torch.cuda.is_available():
            return True, ""
        return False, "no CUDA device is available to torch"
    return False, f"the Triton backend does not run on {device_type!r} tensors"


#: a callable that receives each planned launch of an eager implementation, in order.
Launcher = Callable[[_k.Launch], None]


def _launcher(x: Tensor, launch: Launcher | None) -> Callable[[_k.Launch | None], None]:
    """What an eager implementation hands each planned launch to (None: an empty grid, skipped).

    launch None: run the launches on x's device with :data:`settings` (RuntimeError when this
    backend cannot run there); else ``launch`` receives them in order and nothing runs (the
    outputs stay unwritten).  TypeError when x's dtype is not one of the backend's."""
    if launch is None:
        ok, why = is_available(x.device.type)
        if not ok:
            raise RuntimeError(f"cersa_linear(backend='triton'): {why}")
        autotune = settings.autotune

        def launch(plan: _k.Launch) -> None:
            _k.run(plan, autotune=autotune)
    if x.dtype not in _DTYPES:
        raise TypeError(f"cersa_linear(backend='triton'): x.dtype must be one of "
                        f"{[str(d) for d in _DTYPES]}, got {x.dtype}")
    return lambda plan: None if plan is None else launch(plan)


# ---------------------------------------------------------------------------------------------
# eager implementations (called by the custom ops)
# ---------------------------------------------------------------------------------------------

def _forward_impl(x, U, S, Vh, A, B, bias, scale, save_xv, *, launch: Launcher | None = None):
    """(y, h_k, xv) of the custom op ``triton_forward``; at most two launches (see the kernel plan
    above), none when N = 0.  U and Vh: tensors, or :class:`kernels.QuantOperand` (the custom op
    ``triton_forward_q``).  launch: see :func:`_launcher` (default: run them)."""
    S = S.contiguous()  # the kernels read S (r numbers) with unit stride
    emit = _launcher(x, launch)
    tf32 = tf32_enabled()
    N, n = x.shape
    m, r = U.shape
    k = A.shape[0] if A is not None else 0
    dev, dt = x.device, x.dtype
    y = torch.empty((N, m), device=dev, dtype=dt)
    h_k = torch.empty((N, k), device=dev, dtype=dt)
    xv = torch.empty((N, r if save_xv else 0), device=dev, dtype=dt)
    if N == 0:
        return y, h_k, xv
    h_r = torch.empty((N, r), device=dev, dtype=dt)
    # launch 1: [h_r | h_k] = x [Vh^T * S | s A^T]  (Vh^T and A^T are stride views, no copies)
    A_t = A.t() if A is not None else x.t()[:, :0]
    emit(_k.seg_cols(x, Vh.t(), A_t, h_r, h_k, S1=S, alpha2=float(scale),
                     raw_out=xv if save_xv else None, tf32=tf32))
    # launch 2: y = h_r U^T + h_k B^T + bias
    if A is not None:
        emit(_k.seg_k(h_r, U.t(), h_k, B.t(), y, bias=bias, tf32=tf32))
    else:
        emit(_k.seg_k(h_r, U.t(), None, None, y, bias=bias, tf32=tf32))
    return y, h_k, xv


def _backward_impl(dy, x, h_k, xv, U, S, Vh, A, B, scale, needs, *, launch: Launcher | None = None):
    """(dx, dU, dS, dVh, dA, dB, dbias) of the custom op ``triton_backward`` (empty (0,) tensors
    where not needed); at most four launches (see the kernel plan above), none when N = 0.
    U and Vh: tensors, or :class:`kernels.QuantOperand` when dU and dVh are not needed (the custom
    op ``triton_backward_q``).  launch: see :func:`_launcher` (default: run them)."""
    S = S.contiguous()  # the kernels read S (r numbers) with unit stride
    emit = _launcher(dy, launch)
    tf32 = tf32_enabled()
    has_delta = A is not None
    need_x, need_U, need_S, need_Vh, need_A, need_B, need_bias = _catalogue.effective_needs(needs, has_delta)
    if (need_U or need_S) and xv is None:
        raise ValueError("cersa_linear(backend='triton') backward: the gradient of U or S needs xv = x Vh^T, "
                         "but forward was run with save_xv=False")
    if (need_Vh or need_A) and x is None:
        raise ValueError("cersa_linear(backend='triton') backward: the gradient of Vh or A needs x, got None")
    if need_B and h_k is None:
        raise ValueError("cersa_linear(backend='triton') backward: the gradient of B needs h_k, got None")
    N, n = dy.shape[0], Vh.shape[1]
    m, r = U.shape
    k = A.shape[0] if has_delta else 0
    dev, dt = dy.device, dy.dtype
    acc_dt = _k.acc_dtype(dt)
    # distinct empty tensors for the gradients not needed (custom-op outputs may not alias)
    dx, dU, dS, dVh, dA, dB, dbias = (dy.new_empty((0,)) for _ in range(7))

    need_gr = need_x or need_Vh or need_S
    need_gk = has_delta and (need_x or need_A)
    g_r = torch.empty((N, r if need_gr else 0), device=dev, dtype=dt)
    g_k = torch.empty((N, k if need_gk else 0), device=dev, dtype=dt)
    dS_acc = torch.zeros(r, device=dev, dtype=acc_dt) if need_S else None
    # launch 1: g_r = (dy U) * S, g_k = s dy B, dS += sum_rows(xv * dy U)
    if g_r.shape[1] + g_k.shape[1] > 0:
        emit(_k.seg_cols(dy, _k.first_cols(U, g_r.shape[1]), (B if need_gk else dy.t()[:, :0]), g_r, g_k,
                         S1=S, alpha2=float(scale),
                         red=dS_acc, aux=(xv if need_S else None), tf32=tf32))
    if need_x:
        dx = torch.empty((N, n), device=dev, dtype=dt)
        # launch 2: dx = g_r Vh + g_k A
        if need_gk:
            emit(_k.seg_k(g_r, Vh, g_k, A, dx, tf32=tf32))
        else:
            emit(_k.seg_k(g_r, Vh, None, None, dx, tf32=tf32))
    if need_S:
        dS = dS_acc.to(S.dtype)
    if need_Vh or need_A:
        # launch 3: [dVh; dA] = [g_r^T; g_k^T] x, both written row-major
        dVh_ = torch.empty((r if need_Vh else 0, n), device=dev, dtype=dt)
        dA_ = torch.empty((k if need_A else 0, n), device=dev, dtype=dt)
        if N == 0:
            dVh_.zero_()
            dA_.zero_()
        else:
            emit(_k.seg_rows(g_r[:, :dVh_.shape[0]].t(), g_k[:, :dA_.shape[0]].t(), x, dVh_, dA_,
                             tf32=tf32))
        if need_Vh:
            dVh = dVh_
        if need_A:
            dA = dA_
    if need_U or need_B or need_bias:
        dU_ = torch.empty((m, r if need_U else 0), device=dev, dtype=dt)
        dB_ = torch.empty((m, k if need_B else 0), device=dev, dtype=dt)
        db_acc = torch.empty(m, device=dev, dtype=acc_dt) if need_bias else None
        if N == 0:
            dU_.zero_()
            dB_.zero_()
            if db_acc is not None:
                db_acc.zero_()
        elif dU_.shape[1] + dB_.shape[1] > 0:
            # launch 4: [dU | dB] = dy^T [xv * S | h_k], dbias fused as the row sums of dy^T
            q1 = xv if need_U else dy[:, :0]
            q2 = h_k if need_B else dy[:, :0]
            emit(_k.seg_cols(dy.t(), q1, q2, dU_, dB_, S1=S if need_U else None, rowsum=db_acc,
                             tf32=tf32))
        elif db_acc is not None:
            emit(_k.colsum(dy, db_acc))
        if need_U:
            dU = dU_
        if need_B:
            dB = dB_
        if need_bias:
            dbias = db_acc.to(dt)
    return dx, dU, dS, dVh, dA, dB, dbias


def _nf4_table(device: torch.device) -> Tensor:
    """The 16 float32 NF4 levels (``cersa_kernels.quant.nf4_levels``) on ``device``, made once per
    device (no host-to-device copy per call)."""
    table = _NF4_TABLES.get(device)
    if table is None:
        table = _NF4_TABLES[device] = nf4_levels(torch.float32, device)
    return table


_NF4_TABLES: dict[torch.device, Tensor] = {}


def _quant_factor(name: str, codes, scales, rows: int, cols: int, quant_type: str, block_size: int,
                  device: torch.device) -> _k.QuantOperand:
    """The (rows, cols) factor ``name`` ("U" or "Vh") as a :class:`kernels.QuantOperand`, after
    checking its codes and scales (formats: ``cersa_kernels.backends``, "forward_quantized").
    Raises TypeError / ValueError naming the argument, the expected and the received value."""
    numel = rows * cols
    want_dt, want_n = (torch.int8, numel) if quant_type == "int8" else (torch.uint8, -(-numel // 2))
    for arg, t, dt, n in ((f"{name}_codes", codes, want_dt, want_n),
                          (f"{name}_scales", scales, torch.float32, -(-numel // block_size))):
        if not isinstance(t, Tensor):
            raise TypeError(f"cersa_linear(backend='triton'): {arg}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dt or tuple(t.shape) != (n,):
            raise ValueError(f"cersa_linear(backend='triton'): {arg}: expected a {dt} tensor of shape ({n},) for "
                             f"a {quant_type} ({rows}, {cols}) factor in blocks of {block_size}, got {t.dtype} "
                             f"{tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"cersa_linear(backend='triton'): {arg}: expected device {device} (x's device), "
                             f"got {t.device}")
    levels = _nf4_table(device) if quant_type == "nf4" else scales
    return _k.QuantOperand.factor(codes.contiguous(), scales.contiguous(), levels, rows, cols, quant_type,
                                  block_size)


def _check_rows(name: str, t, width: int, what: str) -> None:
    if t is not None and (t.dim() != 2 or t.shape[1] != width):
        raise ValueError(f"cersa_linear(backend='triton'): {name}: expected shape (N, {what} = {width}), "
                         f"got {tuple(t.shape)}")


def _quant_factors(x, U_codes, U_scales, S, Vh_codes, Vh_scales, m, n, quant_type, block_size):
    """(U (m, r), Vh (r, n)) as :class:`kernels.QuantOperand` with r = S.shape[0]; ValueError for
    an unknown quant_type or a block_size that is not a power of two >= 2, and see _quant_factor."""
    if m < 0 or n < 0:
        raise ValueError(f"cersa_linear(backend='triton'): out_features, in_features: expected sizes >= 0, "
                         f"got ({m}, {n})")
    if quant_type not in ("int8", "nf4"):
        raise ValueError(f"cersa_linear(backend='triton'): quant_type: expected 'int8' or 'nf4', got {quant_type!r}")
    if block_size < 2 or block_size & (block_size - 1):
        raise ValueError(f"cersa_linear(backend='triton'): block_size: expected a power of two >= 2, "
                         f"got {block_size}")
    r = S.shape[0]
    return (_quant_factor("U", U_codes, U_scales, m, r, quant_type, block_size, x.device),
            _quant_factor("Vh", Vh_codes, Vh_scales, r, n, quant_type, block_size, x.device))


def _forward_q_impl(x, U_codes, U_scales, S, Vh_codes, Vh_scales, A, B, bias, out_features, in_features,
                    quant_type, block_size, scale, save_xv, *, launch: Launcher | None = None):
    """(y, h_k, xv) of the custom op ``triton_forward_q``: the launches of ``triton_forward`` with
    Vh^T (launch 1) and U^T (launch 2) decoded from their codes in the kernels' tile loads."""
    _check_rows("x", x, in_features, "in_features")
    U, Vh = _quant_factors(x, U_codes, U_scales, S, Vh_codes, Vh_scales, out_features, in_features,
                           quant_type, block_size)
    return _forward_impl(x, U, S, Vh, A, B, bias, scale, save_xv, launch=launch)


def _backward_q_impl(dy, x, h_k, xv, U_codes, U_scales, S, Vh_codes, Vh_scales, A, B, out_features,
                     in_features, quant_type, block_size, scale, needs, *, launch: Launcher | None = None):
    """(dx, dS, dA, dB, dbias) of the custom op ``triton_backward_q`` (needs: 5 flags for x, S, A,
    B, bias): launches 1 and 2 of ``triton_backward`` with U and Vh decoded from their codes in the
    kernels' tile loads; launches 3 and 4 only for dA, dB, dbias (no dU / dVh: frozen)."""
    _check_rows("dy", dy, out_features, "out_features")
    _check_rows("x", x, in_features, "in_features")
    U, Vh = _quant_factors(dy, U_codes, U_scales, S, Vh_codes, Vh_scales, out_features, in_features,
                           quant_type, block_size)
    need_x, need_S, need_A, need_B, need_bias = _catalogue.effective_needs_q(needs, A is not None)
    dx, _, dS, _, dA, dB, dbias = _backward_impl(dy, x, h_k, xv, U, S, Vh, A, B, scale,
                                                 (need_x, False, need_S, False, need_A, need_B, need_bias),
                                                 launch=launch)
    return dx, dS, dA, dB, dbias


@torch.compiler.assume_constant_result
def has_quantized_kernels(device_type: str) -> bool:
    """Whether ``forward_quantized`` / ``backward_quantized`` run on ``device_type`` tensors: where
    the backend runs (:func:`is_available`)."""
    return is_available(device_type)[0]


# ---------------------------------------------------------------------------------------------
# torch.library custom ops + fake implementations (torch.compile sees opaque ops)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("cersa_kernels::triton_forward", mutates_args=())
def _forward_op(x: Tensor, U: Tensor, S: Tensor, Vh: Tensor, A: Tensor | None, B: Tensor | None,
                bias: Tensor | None, scale: float, save_xv: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y (N, m), h_k (N, k; k=0 when A is None), xv (N, r) or (N, 0) when not save_xv)."""
    return _forward_impl(x, U, S, Vh, A, B, bias, scale, save_xv)


_forward_op.register_fake(_catalogue.forward_fake)


@torch.library.custom_op("cersa_kernels::triton_backward", mutates_args=())
def _backward_op(dy: Tensor, x: Tensor | None, h_k: Tensor | None, xv: Tensor | None, U: Tensor, S: Tensor,
                 Vh: Tensor, A: Tensor | None, B: Tensor | None, scale: float,
                 needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dU, dS, dVh, dA, dB, dbias); a gradient that is not needed is an empty (0,) tensor."""
    return _backward_impl(dy, x, h_k, xv, U, S, Vh, A, B, scale, tuple(needs))


_backward_op.register_fake(_catalogue.backward_fake)

@torch.library.custom_op("cersa_kernels::triton_forward_q", mutates_args=())
def _forward_q_op(x: Tensor, U_codes: Tensor, U_scales: Tensor, S: Tensor, Vh_codes: Tensor, Vh_scales: Tensor,
                  A: Tensor | None, B: Tensor | None, bias: Tensor | None, out_features: int, in_features: int,
                  quant_type: str, block_size: int, scale: float,
                  save_xv: bool) -> tuple[Tensor, Tensor, Tensor]:
    """triton_forward with U, Vh as int8 / NF4 codes and float32 block scales: (y, h_k, xv)."""
    return _forward_q_impl(x, U_codes, U_scales, S, Vh_codes, Vh_scales, A, B, bias, out_features, in_features,
                           quant_type, block_size, scale, save_xv)


_forward_q_op.register_fake(_catalogue.forward_q_fake)


@torch.library.custom_op("cersa_kernels::triton_backward_q", mutates_args=())
def _backward_q_op(dy: Tensor, x: Tensor | None, h_k: Tensor | None, xv: Tensor | None, U_codes: Tensor,
                   U_scales: Tensor, S: Tensor, Vh_codes: Tensor, Vh_scales: Tensor, A: Tensor | None,
                   B: Tensor | None, out_features: int, in_features: int, quant_type: str, block_size: int,
                   scale: float, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dS, dA, dB, dbias) with frozen quantized U, Vh; an empty (0,) tensor where not needed."""
    return _backward_q_impl(dy, x, h_k, xv, U_codes, U_scales, S, Vh_codes, Vh_scales, A, B, out_features,
                            in_features, quant_type, block_size, scale, tuple(needs))


_backward_q_op.register_fake(_catalogue.backward_q_fake)

# the backend contract (docs/design.md "Op catalogue"): at most two launches forward, four
# backward; RuntimeError when the backend cannot run on x's device, TypeError for other dtypes,
# ValueError when dU or dS is needed but xv was not saved.
forward, backward = _catalogue.kernel_contract(torch.ops.cersa_kernels.triton_forward,
                                               torch.ops.cersa_kernels.triton_backward)
# and its optional quantized-factor functions (docs/design.md "Quantized factors")
forward_quantized, backward_quantized = _catalogue.quantized_contract(torch.ops.cersa_kernels.triton_forward_q,
                                                                      torch.ops.cersa_kernels.triton_backward_q)
