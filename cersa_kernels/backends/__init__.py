"""Kernel backends of ``cersa_linear`` and the registry that finds them.

Layering (imports go one way only)::

    backends/<name>.py  (kernels + torch.library registration)
        -> cersa_kernels.ops  (argument checks, backend choice, autograd)
        -> cersa_kernels.layers -> cersa_kernels.convert / io -> cli, python/ front ends

Every backend is a module that exposes the same three functions.  They work on
2-D tensors only; ``cersa_kernels.ops`` flattens leading dimensions, checks
arguments, handles autocast, and wraps them in one ``torch.autograd.Function``.

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
    (DESIGN.md "Forward"; no (m, n) tensor, no concatenated copy of factors.)

``backward(dy, x, h_k, xv, U, S, Vh, A, B, scale, needs) -> 7-tuple``
    dy: (N, m) any strides; x, h_k, xv as saved by forward; needs: 7 bools for
    (x, U, S, Vh, A, B, bias).  Returns (dx, dU, dS, dVh, dA, dB, dbias) with
    None where not needed (DESIGN.md "Backward"):
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

Backend names: "reference" (plain PyTorch ops, the ground truth), "cpp" (the
C++ extension on the CPU), "cuda" (the extension's CUDA kernels), "triton"
(Triton kernels, CUDA or the CPU interpreter).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

#: backend name -> module path.  "reference" is always available.
BACKEND_MODULES: dict[str, str] = {
    "cuda": "cersa_kernels.backends.cpp",
    "triton": "cersa_kernels.backends.triton",
    "cpp": "cersa_kernels.backends.cpp",
    "reference": "cersa_kernels.backends.reference",
}

#: preference order when no backend is named, per device type (fastest first).
#: Triton on the CPU runs only under the slow interpreter, so it is never a CPU default.
DEFAULT_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpp", "reference"),
}

#: device types a backend name may serve.
BACKEND_DEVICES: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda",),
    "triton": ("cuda", "cpu"),
    "cpp": ("cpu",),
    "reference": ("cpu", "cuda", "meta"),
}

_modules: dict[str, ModuleType | None] = {}
_import_errors: dict[str, str] = {}


def load_backend(name: str) -> ModuleType | None:
    """Import the module of backend ``name`` once; None (with the reason kept) if it fails."""
    if name not in BACKEND_MODULES:
        raise ValueError(
            f"backend: expected one of {sorted(BACKEND_MODULES)}, got {name!r}"
        )
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(BACKEND_MODULES[name])
        except Exception as exc:  # a missing or broken backend must not break the package
            _modules[name] = None
            _import_errors[name] = f"{type(exc).__name__}: {exc}"
    return _modules[name]


def backend_status(name: str, device_type: str) -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device_type`` here, and why not if it cannot."""
    if device_type not in BACKEND_DEVICES[name]:
        return False, f"backend {name!r} does not run on {device_type!r} tensors"
    mod = load_backend(name)
    if mod is None:
        return False, f"backend {name!r} failed to import: {_import_errors[name]}"
    try:
        return mod.is_available(device_type)
    except Exception as exc:  # a broken backend is reported, never fatal
        return False, f"backend {name!r} is broken: {type(exc).__name__}: {exc}"


def available_backends(device_type: str | None = None) -> list[str]:
    """Names of the backends that can run here, fastest first.

    device_type: "cpu" or "cuda", or None for every device this process can use.
    """
    import torch

    if device_type is None:
        types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        types = [device_type]
    out = []
    for name in BACKEND_MODULES:
        if any(backend_status(name, t)[0] for t in types):
            out.append(name)
    return out


def default_backend(device_type: str) -> str:
    """The backend used when none is named: $CERSA_BACKEND if set, else the fastest available."""
    env = os.environ.get("CERSA_BACKEND")
    if env:
        return env
    for name in DEFAULT_ORDER.get(device_type, ("reference",)):
        if backend_status(name, device_type)[0]:
            return name
    return "reference"
