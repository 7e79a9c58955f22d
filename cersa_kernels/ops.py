"""The functional op ``cersa_linear``: argument checks, backend choice, autocast, autograd.

This is the stable public API other CERSA front ends import.  The kernels live in
``cersa_kernels.backends``; this module only checks arguments, flattens leading dimensions,
applies the autocast dtype, picks a backend and wraps the backend's forward/backward in one
``torch.autograd.Function``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .backends import has_own_autograd, load_backend, resolve_backend
from .backends._catalogue import effective_needs
from .quant import QuantizedMatrix, dequantize

__all__ = ["cersa_linear", "resolve_backend"]


def _check_tensor(name: str, t, dim: int | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def _check_shape(name: str, t: Tensor, expected: tuple, meaning) -> None:
    """meaning: a callable returning the explanation, called only on failure.  Formatting a size
    into a string under torch.compile(dynamic=True) would specialise it to its current value (and,
    through duck sizing, any input size that happens to equal it, e.g. a sequence length)."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} {meaning()}, got {tuple(t.shape)}")


class _CersaLinearFunction(torch.autograd.Function):
    """Autograd of docs/design.md "Forward" / "Backward"; saves x only when dA or dVh is needed,
    h_k = s x A^T (N, k) only when dB is needed, and xv = x Vh^T (N, r) only when dS or dU is."""

    @staticmethod
    def forward(ctx, backend: str, scale: float, x, U, S, Vh, A, B, bias):
        need = ctx.needs_input_grad  # (backend, scale, x, U, S, Vh, A, B, bias)
        save_xv = bool(need[3] or need[4])
        y, h_k, xv = load_backend(backend).forward(x, U, S, Vh, A, B, bias, scale, save_xv)
        keep_x = bool(need[5] or need[6])
        keep_hk = bool(need[7])
        ctx.backend, ctx.scale = backend, scale
        ctx.has_delta, ctx.has_bias = A is not None, bias is not None
        ctx.save_for_backward(x if keep_x else None, h_k if keep_hk else None, xv, U, S, Vh, A, B)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h_k, xv, U, S, Vh, A, B = ctx.saved_tensors
        need = ctx.needs_input_grad
        needs = effective_needs((*need[2:8], need[8] and ctx.has_bias), ctx.has_delta)
        if not any(needs):
            return (None,) * 9
        with torch.no_grad():
            grads = load_backend(ctx.backend).backward(dy, x, h_k, xv, U, S, Vh, A, B, ctx.scale, needs)
        if torch.is_grad_enabled():  # create_graph=True
            # The saved h_k / xv are detached forward intermediates, so a graph through this
            # backward would give wrong second derivatives.  Each gradient is tied, through
            # _SecondDerivativeRefused, to dy and the saved inputs: differentiating it with respect
            # to anything it depends on (backward() or autograd.grad) raises instead.
            roots = tuple(t for t in (dy, x, U, S, Vh, A, B) if t is not None)
            if any(t.requires_grad for t in roots):
                grads = tuple(None if g is None else _SecondDerivativeRefused.apply(g, *roots)
                              for g in grads)
        return (None, None) + tuple(grads)


class _SecondDerivativeRefused(torch.autograd.Function):
    """Identity on a gradient g, recorded as depending on ``roots``; its backward raises."""

    @staticmethod
    def forward(ctx, g, *roots):
        return g.view_as(g)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("cersa_linear: trying to differentiate twice; its backward is "
                           "once_differentiable (double backward is not supported)")


class _QuantizedFactorsFunction(torch.autograd.Function):
    """cersa_linear with U and / or Vh stored quantized (docs/design.md "Quantized factors");
    quantized factors are frozen (no dU / dVh) and only their codes and scales are saved.

    ``fused`` (both factors quantized in one format, and the backend has quantized kernels for the
    device, ``has_quantized_kernels``): the codes and scales go to the backend's
    ``forward_quantized`` / ``backward_quantized``, whose kernels decode panels of the factors (a
    buffer of bounded size; the Triton kernels decode each tile as they load it) inside their
    schedule and never form a dense factor tensor.  Otherwise each quantized factor is
    dequantized for the call, in forward and again in backward (a transient tensor, never saved),
    and the backend's dense forward / backward run on it.  ``u_spec`` / ``vh_spec``: None for a
    dense factor, else (shape, quant_type, block_size) of its codes and float32 block scales."""

    @staticmethod
    def forward(ctx, backend, scale, fused, u_spec, vh_spec, x, U, u_codes, u_scales, S, Vh, vh_codes, vh_scales,
                A, B, bias):
        need = ctx.needs_input_grad
        has_delta = A is not None
        needs = effective_needs((need[5], need[6], need[9], need[10], need[13], need[14],
                                 need[15] and bias is not None), has_delta)
        mod = load_backend(backend)
        if fused:  # U and Vh quantized, so needs[1] (dU) and needs[3] (dVh) are false
            (m, _), quant_type, block_size = u_spec
            shape = (m, vh_spec[0][1])
            y, h_k, xv = mod.forward_quantized(x, u_codes, u_scales, S, vh_codes, vh_scales, A, B, bias, shape,
                                               quant_type, block_size, scale, needs[2])
        else:
            Ud = U if u_spec is None else dequantize(u_codes, u_scales, *u_spec, x.dtype)
            Vhd = Vh if vh_spec is None else dequantize(vh_codes, vh_scales, *vh_spec, x.dtype)
            y, h_k, xv = mod.forward(x, Ud, S, Vhd, A, B, bias, scale, needs[1] or needs[2])
        ctx.backend, ctx.scale, ctx.fused, ctx.specs, ctx.needs = backend, scale, fused, (u_spec, vh_spec), needs
        ctx.save_for_backward(x if (needs[3] or needs[4]) else None, h_k if needs[5] else None, xv, U, u_codes,
                              u_scales, S, Vh, vh_codes, vh_scales, A, B)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, h_k, xv, U, u_codes, u_scales, S, Vh, vh_codes, vh_scales, A, B = ctx.saved_tensors
        u_spec, vh_spec = ctx.specs
        needs = ctx.needs
        if not any(needs):
            return (None,) * 16
        mod = load_backend(ctx.backend)
        if ctx.fused:
            (m, _), quant_type, block_size = u_spec
            dx, dS, dA, dB, dbias = mod.backward_quantized(
                dy, x, h_k, xv, u_codes, u_scales, S, vh_codes, vh_scales, A, B, (m, vh_spec[0][1]), quant_type,
                block_size, ctx.scale, (needs[0], needs[2], needs[4], needs[5], needs[6]))
            dU = dVh = None
        else:
            Ud = U if u_spec is None else dequantize(u_codes, u_scales, *u_spec, dy.dtype)
            Vhd = Vh if vh_spec is None else dequantize(vh_codes, vh_scales, *vh_spec, dy.dtype)
            dx, dU, dS, dVh, dA, dB, dbias = mod.backward(dy, x, h_k, xv, Ud, S, Vhd, A, B, ctx.scale, needs)
        return (None, None, None, None, None, dx, dU, None, None, dS, dVh, None, None, dA, dB, dbias)


@torch.compiler.assume_constant_result
def _has_quantized_kernels(name: str, device_type: str) -> bool:
    """Whether backend ``name`` has kernels for quantized factors on ``device_type`` tensors (the
    optional contract of ``cersa_kernels.backends``)."""
    probe = getattr(load_backend(name), "has_quantized_kernels", None)
    return probe is not None and bool(probe(device_type))


def _apply_quantized(name: str, scale: float, x, U, S, Vh, A, B, bias):
    def parts(F):
        if isinstance(F, QuantizedMatrix):
            return (F.shape, F.quant_type, F.block_size), None, F.codes, F.scales()
        return None, F, None, None

    fused = (isinstance(U, QuantizedMatrix) and isinstance(Vh, QuantizedMatrix)
             and U.quant_type == Vh.quant_type and U.block_size == Vh.block_size
             and _has_quantized_kernels(name, x.device.type))
    u_spec, Ut, u_codes, u_scales = parts(U)
    vh_spec, Vht, vh_codes, vh_scales = parts(Vh)
    return _QuantizedFactorsFunction.apply(name, scale, fused, u_spec, vh_spec, x, Ut, u_codes, u_scales, S, Vht,
                                           vh_codes, vh_scales, A, B, bias)


def _apply(name: str, scale: float, x, U, S, Vh, A, B, bias):
    if isinstance(U, QuantizedMatrix) or isinstance(Vh, QuantizedMatrix):
        return _apply_quantized(name, scale, x, U, S, Vh, A, B, bias)
    if has_own_autograd(name):
        return load_backend(name).linear(x, U, S, Vh, A, B, bias, scale)
    return _CersaLinearFunction.apply(name, scale, x, U, S, Vh, A, B, bias)


def cersa_linear(x: Tensor, U: Tensor, S: Tensor, Vh: Tensor, A: Tensor | None = None,
                 B: Tensor | None = None, bias: Tensor | None = None, scale: float = 1.0,
                 backend: str | None = None) -> Tensor:
    """y = x (U diag(S) Vh + scale * B A)^T + bias, without forming the (m, n) weight.

    Shapes: x (..., n); U (m, r); S (r,); Vh (r, n); A (k, n); B (m, k); bias (m,) -> y (..., m).
    U and Vh may also be ``cersa_kernels.quant.QuantizedMatrix`` (int8 / NF4 codes with block
    scales, frozen): they are then decoded to the compute dtype inside the call, in forward and
    again in backward, and never saved: panel by panel inside the kernels when the backend has
    quantized kernels for the device ("cpp" on the CPU, "cuda" and "triton" on CUDA tensors) and both
    factors share one format (tiles decoded in the load path for "triton"), else as a whole
    factor for the call (docs/design.md "Quantized factors").
    r, k and the leading dimensions of x may be 0.  A and B are given together or not at all.
    dtypes: all tensors share x's floating dtype (float32, float16, bfloat16, float64).  Under
    torch.autocast for x's device, every tensor is cast to the autocast dtype first (the casts are
    differentiable, so each gradient comes back in its own tensor's dtype) and y has that dtype;
    otherwise y has x's dtype.  All tensors on one device.
    Gradients: for x, A, B, S, bias, and U/Vh too when they require grad (docs/design.md "Backward");
    the backward saves x and the (N, k) product s x A^T like LoRA, plus (N, r) only when S or U
    trains.  scale: a finite real number (the LoRA-style delta scale s).
    Not supported, and raising rather than returning wrong values: second derivatives (the
    backward is once-differentiable), forward-mode AD and functorch transforms (jvp, vmap, ...).
    backend: None picks the fastest available for x's device ($CERSA_BACKEND overrides), or one
    of "reference", "cpp", "cuda", "triton" (see ``cersa_kernels.available_backends()``).
    Raises TypeError/ValueError naming the argument, expected and received value for wrong
    types, shapes, dtypes or devices; RuntimeError if the named backend cannot run here.
    Math: docs/design.md "Forward" / "Backward" (CERSA, arXiv 2605.08174, Sec. 3).
    """
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension (..., in_features), got a 0-D tensor")
    if not isinstance(U, QuantizedMatrix):
        _check_tensor("U", U, 2)
    _check_tensor("S", S, 1)
    if not isinstance(Vh, QuantizedMatrix):
        _check_tensor("Vh", Vh, 2)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a finite real number, got {type(scale).__name__} {scale!r}")
    # A comparison, not math.isfinite: under torch.compile(dynamic=True) a module's float
    # attribute arrives as a SymFloat, which math.isfinite cannot take (NaN and +-inf fail it too).
    if not abs(scale) < math.inf:
        raise TypeError(f"scale: expected a finite real number, got {scale!r}")
    if not torch.compiler.is_compiling():
        scale = float(scale)  # (a traced SymFloat stays symbolic: no guard on its value)
    m, r = U.shape
    n = Vh.shape[1]
    _check_shape("S", S, (r,), lambda: f"(rank,) with rank = U.shape[1] = {r}")
    _check_shape("Vh", Vh, (r, n), lambda: f"(rank, in_features) with rank = U.shape[1] = {r}")
    if x.shape[-1] != n:
        raise ValueError(f"x: expected last dimension in_features = Vh.shape[1] = {n}, "
                         f"got shape {tuple(x.shape)}")
    if (A is None) != (B is None):
        raise ValueError(f"A and B: expected both or neither, got A={'None' if A is None else 'a tensor'}, "
                         f"B={'None' if B is None else 'a tensor'}")
    named = {"x": x, "U": U, "S": S, "Vh": Vh}
    if A is not None:
        _check_tensor("A", A, 2)
        _check_tensor("B", B, 2)
        k = A.shape[0]
        _check_shape("A", A, (k, n), lambda: f"(delta_rank, in_features) with in_features = {n}")
        _check_shape("B", B, (m, k), lambda: f"(out_features, delta_rank) with out_features = {m}, delta_rank = A.shape[0] = {k}")
        named.update(A=A, B=B)
    if bias is not None:
        _check_tensor("bias", bias, 1)
        _check_shape("bias", bias, (m,), lambda: f"(out_features,) with out_features = U.shape[0] = {m}")
        named["bias"] = bias
    for name, t in named.items():
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (x's device), got {t.device}")
    dev = x.device.type
    autocast = dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)
    if autocast:
        dtype = torch.get_autocast_dtype(dev)
        x, U, S, Vh = (t if isinstance(t, QuantizedMatrix) else t.to(dtype) for t in (x, U, S, Vh))
        A = A.to(dtype) if A is not None else None
        B = B.to(dtype) if B is not None else None
        bias = bias.to(dtype) if bias is not None else None
    else:
        for name, t in named.items():
            if t.dtype != x.dtype and not isinstance(t, QuantizedMatrix):  # codes dequantize to x's dtype
                raise TypeError(f"{name}: expected dtype {x.dtype} (x's dtype), got {t.dtype}; "
                                f"cast the tensors or run under torch.autocast")
    name = resolve_backend(backend, dev)
    lead = x.shape[:-1]
    # (not reshape(-1, n): with in_features n = 0 the -1 would be ambiguous)
    x2d = x if x.dim() == 2 else (x.unsqueeze(0) if x.dim() == 1 else x.flatten(0, -2))
    if autocast:  # the tensors are cast already; the backend must see them as they are
        with torch.autocast(dev, enabled=False):
            y = _apply(name, scale, x2d, U, S, Vh, A, B, bias)
    else:
        y = _apply(name, scale, x2d, U, S, Vh, A, B, bias)
    if x.dim() == 2:
        return y
    # A fresh tensor, not a view of the (N, m) result (as torch.matmul does for N-D inputs): FSDP2
    # warns that an in-place op on a view a wrapped module returns would skip its backward hook.
    return torch.ops.aten._unsafe_view(y, (*lead, m))
