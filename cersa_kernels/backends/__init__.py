"""Kernel backends of ``cersa_linear`` and the one table that describes them.

Layering (imports go one way only)::

    backends/<name>  (kernels + torch.library registration, shapes from backends/_catalogue.py)
        -> cersa_kernels.ops  (argument checks, backend choice, autograd)
        -> cersa_kernels.layers -> cersa_kernels.convert / io -> cli, python/ front ends

``BACKENDS`` holds one row per backend (name, module, device types it runs on, device types it is
chosen for when none is named, priority).  Every lookup, name check and cache below reads it, so a
new backend is one row plus its module.

Every backend module exposes the same three functions.  They work on 2-D tensors only;
``cersa_kernels.ops`` flattens leading dimensions, checks arguments, handles autocast, and wraps
them in one ``torch.autograd.Function`` (docs/design.md "Op catalogue").

``is_available(device_type: str) -> tuple[bool, str]``
    Whether the backend can run on tensors of this device type ("cpu", "cuda"),
    and, when it cannot, the reason in a short sentence.

``forward(x, U, S, Vh, A, B, bias, scale, save_xv) -> (y, h_k, xv)``
    x: (N, n) any strides; U: (m, r); S: (r,); Vh: (r, n); A: (k, n) or None;
    B: (m, k) or None (None exactly when A is None); bias: (m,) or None;
    scale: python float s; save_xv: bool.  All tensors share one floating dtype
    and one device (checked by the caller).  r and N may be 0.
    Returns y (N, m) = (x Vh^T) diag(S) U^T + s (x A^T) B^T + bias, in x's dtype;
    h_k (N, k) = s x A^T in x's dtype (None when A is None);
    xv (N, r) = x Vh^T in x's dtype when save_xv else None.
    (docs/design.md "Forward"; no (m, n) tensor, no concatenated copy of factors.)

``backward(dy, x, h_k, xv, U, S, Vh, A, B, scale, needs) -> 7-tuple``
    dy: (N, m) any strides; x, h_k, xv as saved by forward; needs: 7 bools for
    (x, U, S, Vh, A, B, bias).  Returns (dx, dU, dS, dVh, dA, dB, dbias) with
    None where not needed (docs/design.md "Backward"):
        dh_r = dy U, dh_k = dy B
        dx   = (dh_r * S) Vh + s dh_k A          (N, n)
        dU   = dy^T (xv * S)                      (m, r)   needs xv
        dS   = sum_rows(xv * dh_r)                (r,)     needs xv
        dVh  = (dh_r * S)^T x                     (r, n)
        dA   = s dh_k^T x                         (k, n)
        dB   = dy^T h_k                           (m, k)
        dbias= sum_rows(dy)                       (m,)
    Each gradient has the dtype of the tensor it belongs to.

A backend may also expose

``linear(x, U, S, Vh, A, B, bias, scale) -> y``
    The whole differentiable op with its own autograd (same arguments and result as
    forward's y, gradients as backward's).  ``cersa_kernels.ops`` then calls it instead of
    wrapping forward/backward in its Python ``torch.autograd.Function``: the "cpp" and "cuda"
    backends do, with the autograd in C++ (csrc/cersa_autograd.cpp), so that no Python runs
    in their backward.

and the kernels for quantized frozen factors (docs/design.md "Quantized factors"), all three or
none:

``has_quantized_kernels(device_type: str) -> bool``
    Whether the two functions below run on tensors of this device type.  Where they do not (or a
    backend lacks them), ``cersa_kernels.ops`` decodes each quantized factor for the call and uses
    forward / backward.

``forward_quantized(x, U_codes, U_scales, S, Vh_codes, Vh_scales, A, B, bias, shape, quant_type,
block_size, scale, save_xv) -> (y, h_k, xv)``
    forward's results with U (m, r) and Vh (r, n) given as the codes and float32 block scales of
    ``cersa_kernels.quant.QuantizedMatrix`` (codes: int8 (m r,) / (r n,) for quant_type "int8",
    packed uint8 (ceil(m r / 2),) / (ceil(r n / 2),) for "nf4"; scales: ``QuantizedMatrix.scales()``,
    (ceil(numel / block_size),), double quantization already resolved); shape = (m, n); r =
    S.shape[0]; both factors in one format.  The factors are decoded inside the kernels, never as a
    whole factor in a new tensor: the numbers are exactly those of ``QuantizedMatrix.dequantize``
    in x's dtype.

``backward_quantized(dy, x, h_k, xv, U_codes, U_scales, S, Vh_codes, Vh_scales, A, B, shape,
quant_type, block_size, scale, needs) -> (dx, dS, dA, dB, dbias)``
    backward's gradients without dU / dVh (quantized factors are frozen); needs: 5 bools for
    (x, S, A, B, bias); None where not needed.  x is read only for dA, h_k only for dB, xv only
    for dS.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

__all__ = ["Backend", "BACKENDS", "backend_names", "check_backend_name", "load_backend", "backend_status",
           "available_backends", "default_backend", "resolve_backend", "has_own_autograd"]


@dataclass(frozen=True)
class Backend:
    """One row of the backend table.

    name: what users pass as ``backend=`` and ``$CERSA_BACKEND``; module: the import path of the
    module implementing the contract above; devices: the device types it can run on; default_for:
    the device types on which it may be chosen when no backend is named; priority: among the
    available defaults of a device type the highest wins.
    """

    name: str
    module: str
    devices: tuple[str, ...]
    default_for: tuple[str, ...]
    priority: int


#: The backend table.  Triton runs on CPU tensors only under its (slow) interpreter, so it is never
#: a CPU default; "reference" runs everywhere and is the last resort.
BACKENDS: tuple[Backend, ...] = (
    Backend("cuda", "cersa_kernels.backends.cpp", ("cuda",), ("cuda",), 30),
    Backend("triton", "cersa_kernels.backends.triton", ("cuda", "cpu"), ("cuda",), 20),
    Backend("cpp", "cersa_kernels.backends.cpp", ("cpu",), ("cpu",), 30),
    Backend("reference", "cersa_kernels.backends.reference", ("cpu", "cuda", "meta"), ("cpu", "cuda", "meta"), 0),
)
_BY_NAME: dict[str, Backend] = {b.name: b for b in BACKENDS}
_import_errors: dict[str, str] = {}
_modules: dict[str, ModuleType | None] = {}


def backend_names() -> list[str]:
    """The names of every backend in the table (available here or not), in table order."""
    return [b.name for b in BACKENDS]


def check_backend_name(name, arg: str = "backend") -> str | None:
    """None or a known backend name, returned unchanged (whether it runs here is checked when it is
    used, on the input's device).  Raises TypeError for a non-str, ValueError naming the known names."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"{arg}: expected None or one of {sorted(_BY_NAME)}, got {type(name).__name__} {name!r}")
    if name not in _BY_NAME:
        raise ValueError(f"{arg}: expected None or one of {sorted(_BY_NAME)}, got {name!r}")
    return name


def load_backend(name: str) -> ModuleType | None:
    """Import the module of backend ``name`` once; None (with the reason kept) if it fails.  (A plain
    dict cache, which torch.compile reads as a constant once the module is loaded.)"""
    if name not in _modules:
        check_backend_name(name)
        try:
            _modules[name] = importlib.import_module(_BY_NAME[name].module)
        except Exception as exc:  # a missing or broken backend must not break the package
            _modules[name] = None
            _import_errors[name] = f"{type(exc).__name__}: {exc}"
    return _modules[name]


@functools.lru_cache(maxsize=None)
def _problem(name: str, device_type: str) -> str:
    if device_type not in _BY_NAME[name].devices:
        return f"backend {name!r} does not run on {device_type!r} tensors"
    mod = load_backend(name)
    if mod is None:
        return f"backend {name!r} failed to import: {_import_errors[name]}"
    try:
        ok, why = mod.is_available(device_type)
    except Exception as exc:  # a broken backend is reported, never fatal
        return f"backend {name!r} is broken: {type(exc).__name__}: {exc}"
    return "" if ok else (why or "unavailable")


def backend_status(name: str, device_type: str) -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device_type`` here, and why not if it cannot.  The answer
    is fixed for the life of the process (computed once per pair)."""
    check_backend_name(name)
    why = _problem(name, device_type)
    return not why, why


def available_backends(device_type: str | None = None) -> list[str]:
    """Names of the backends that can run here, in table order.

    device_type: "cpu" or "cuda", or None for every device this process can use.
    """
    types = [device_type] if device_type is not None else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [b.name for b in BACKENDS if any(not _problem(b.name, t) for t in types)]


@functools.lru_cache(maxsize=None)
def _default(device_type: str, env: str | None) -> str:
    if env:
        return env
    ranked = sorted((b for b in BACKENDS if device_type in b.default_for), key=lambda b: -b.priority)
    return next((b.name for b in ranked if not _problem(b.name, device_type)), "reference")


def default_backend(device_type: str) -> str:
    """The backend used when none is named: $CERSA_BACKEND if set, else the available default of
    highest priority for ``device_type``."""
    return _default(device_type, os.environ.get("CERSA_BACKEND"))


# Constants for torch.compile: the first call may import a backend module, which dynamo cannot trace
# (plain functions: dynamo would trace into an lru_cache wrapper itself).
@torch.compiler.assume_constant_result
def _default_for_compile(device_type: str) -> str:
    return default_backend(device_type)


@torch.compiler.assume_constant_result
def _problem_for_compile(name: str, device_type: str) -> str:
    return _problem(name, device_type)


def resolve_backend(backend: str | None, device_type: str) -> str:
    """The backend name used for tensors on ``device_type``.

    backend: None (the default for the device, or $CERSA_BACKEND), or a name of ``BACKENDS``.
    Raises TypeError for a non-str, ValueError for an unknown name and RuntimeError, with the reason,
    for a backend that cannot run here.
    """
    check_backend_name(backend)
    name = backend if backend is not None else _default_for_compile(device_type)
    source = "backend" if backend is not None else "CERSA_BACKEND"
    if name not in _BY_NAME:
        raise ValueError(f"{source}: expected None or one of {sorted(_BY_NAME)}, got {name!r}")
    why = _problem_for_compile(name, device_type)
    if why:
        raise RuntimeError(f"{source}: {name!r} cannot run on {device_type!r} tensors here: {why}")
    return name


@torch.compiler.assume_constant_result
def has_own_autograd(name: str) -> bool:
    """Whether backend ``name`` brings its own differentiable ``linear`` (C++ autograd)."""
    return hasattr(load_backend(name), "linear")
