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

from .. import _catalogue
from . import kernels as _k
from .kernels import INTERPRETED  # noqa: F401  (re-exported)

__all__ = ["is_available", "forward", "backward", "Settings", "settings", "set_allow_tf32", "tf32_enabled",
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
    above), none when N = 0.  launch: see :func:`_launcher` (default: run them)."""
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
    A_t = A.t() if A is not None else Vh.t()[:, :0]
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
    launch: see :func:`_launcher` (default: run them)."""
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
        emit(_k.seg_cols(dy, U[:, :g_r.shape[1]], (B if need_gk else U[:, :0]), g_r, g_k,
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
        dVh_ = torch.empty((r if need_Vh else 0, n), device=dev, dtype=Vh.dtype)
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
        dU_ = torch.empty((m, r if need_U else 0), device=dev, dtype=U.dtype)
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

# the backend contract (docs/design.md "Op catalogue"): at most two launches forward, four
# backward; RuntimeError when the backend cannot run on x's device, TypeError for other dtypes,
# ValueError when dU or dS is needed but xv was not saved.
forward, backward = _catalogue.kernel_contract(torch.ops.cersa_kernels.triton_forward,
                                               torch.ops.cersa_kernels.triton_backward)
