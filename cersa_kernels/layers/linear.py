"""CersaLinear (nn.Linear) and CersaConv1D (transformers' Conv1D, fan_in_fan_out).

Both compute y = x (U diag(S) Vh + scale * B A)^T + bias through ``cersa_kernels.cersa_linear``
(the fused backends; the dense weight is never built).  docs/design.md "Forward" and
"Layers beyond nn.Linear".
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import cersa_linear
from .base import CersaLayer, compute_dtype

__all__ = ["CersaLinear", "CersaConv1D", "is_hf_conv1d"]


class CersaLinear(CersaLayer):
    """A Linear layer stored as its energy-truncated SVD plus a trainable low-rank delta.

    Computes y = x (U diag(S) Vh + scale * B A)^T + bias   (docs/design.md "Forward"; paper Sec. 3)
    with the tensors and attributes of :class:`~cersa_kernels.layers.base.CersaLayer`.

    Build it from a trained nn.Linear with :meth:`from_linear`; the constructor makes an
    uninitialised layer of the given sizes (used by ``cersa_kernels.load``).
    """

    kind = "Linear"
    dense_types = (nn.Linear,)
    arg = "linear"

    def __init__(self, in_features: int, out_features: int, frozen_rank: int, delta_rank: int = 16,
                 **factor_options) -> None:
        """factor_options: bias, rank, scale, energy, init, train_S, train_bias, backend, device,
        dtype, as :class:`~cersa_kernels.layers.base.CersaLayer`."""
        super().__init__(out_features, in_features, frozen_rank, delta_rank, **factor_options)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str:
        if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            return "NonDynamicallyQuantizableLinear outside nn.MultiheadAttention is not converted"
        return super().unsupported_reason(module)

    @classmethod
    def matrices(cls, module: nn.Module) -> list[tuple[str, Tensor]]:
        return [("weight", module.weight)]

    @classmethod
    def from_linear(cls, linear: nn.Linear, config=None, *, name: str = "linear", **options) -> "CersaLinear":
        """Decompose ``linear.weight`` (out_features, in_features) and build the CERSA layer.

        config / options: a :class:`~cersa_kernels.config.CersaConfig` or its fields as keywords:
          energy: tau in (0, 1] (the retained fraction of ||W||_F^2), or give ``rank`` instead
            (then pass energy=None); rank 0 is allowed (output = bias + delta).
          delta_rank: k >= 1.  alpha: LoRA-style scale numerator, scale = alpha / k (default
            scale 1); only with init="lora".
          init: "principal" (default): the top e = min(k, r) components of the retained subspace
            move from the frozen factors into the delta, A = sqrt(S_e / c) Vh_e, B = U_e sqrt(S_e / c),
            scale c, and the frozen factors keep the remaining r - e (training starts on the
            directions that carry most of W's energy, as PiSSA; e(m + n + 1) fewer frozen numbers).
            "residual": the frozen factors keep all r; the delta starts on the next e = min(k, p - r)
            singular components of W beyond the truncation, split the same way (the layer starts
            closer to W than the truncation).  For both, c = split_scale ("auto", the default: per
            layer, so that Adam's first step moves s B A as much as a LoRA delta's, which keeps the
            learning rates of LoRA usable; 1.0: PiSSA's split, whose step grows as sqrt(S)).
            Delta rows that hold no component are Kaiming-uniform / c with zero columns of B.
            "lora": A kaiming-uniform (a = sqrt(5), as nn.Linear and PEFT), B zero; frozen = all r.
            At init the layer computes exactly the rank-r truncation of W ("residual": the rank
            r + e one); docs/design.md "Initialisation".
          quantize / quant_init: with int8 / nf4 frozen factors, quant_init="loftq" (default) makes
            the delta the best rank-k approximation of (intended matrix - dequantized frozen part),
            absorbing part of the quantization error (LoftQ); loftq_iters alternates it.
          train_S / train_bias: make S / bias trainable (they are frozen otherwise).
          svd: "full" | "randomized" | "auto", see ``cersa_kernels.decompose.truncated_svd``.
        The SVD runs in float32 (float64 for float64 weights) on the weight's device; every tensor
        is then stored in the weight's dtype, rounded once.
        Raises TypeError/ValueError naming ``name`` for an unusable weight or bad argument.
        """
        return cls.from_dense(linear, config, name=name, **options)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_features) -> (..., out_features); see ``cersa_kernels.cersa_linear``.

        Output-dtype rule: y has x's dtype, or the autocast dtype under torch.autocast.  Tensors of
        another dtype (e.g. bf16 factors with fp32 deltas, or an fp32 input with bf16 factors) are
        cast to that compute dtype for the call (a differentiable cast: each gradient comes back in
        its parameter's own dtype); with matching dtypes nothing is copied.
        """
        return self.project(x)

    def project(self, x: Tensor, rows: slice | None = None) -> Tensor:
        """The forward restricted to output rows ``rows`` (U, B, bias sliced; used by attention)."""
        dtype = compute_dtype(x)
        U, S, Vh, A, B, bias = self.factors(dtype, rows)
        return cersa_linear(x if x.dtype == dtype else x.to(dtype), U, S, Vh, A, B, bias, self.scale,
                            backend=self.backend)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """An nn.Linear with weight U diag(S) Vh + scale * B A and this layer's bias (same dtype/device)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.U.device, dtype=self.U.dtype)
        lin.weight.copy_(self.merged_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin


# ----------------------------------------------------------------------------------------------
# transformers' Conv1D (GPT-2): weight stored (in, out)
# ----------------------------------------------------------------------------------------------
def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' Conv1D or a subclass of it (GPT-2 style: attributes nf, nx, weight
    (nx, nf)), detected by class name and attributes so that transformers need not be imported."""
    w = getattr(module, "weight", None)
    return (any(c.__name__ == "Conv1D" for c in type(module).__mro__) and hasattr(module, "nf") and hasattr(module, "nx")
            and isinstance(w, Tensor) and w.dim() == 2 and tuple(w.shape) == (module.nx, module.nf))


def _hf_conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("merging a CersaConv1D needs transformers' Conv1D: pip install transformers") from exc
    return Conv1D


class CersaConv1D(CersaLinear):
    """CERSA layer for transformers' Conv1D (GPT-2's c_attn, c_proj, c_fc), y = x W + b with W (nx, nf).

    Conv1D stores its weight transposed (fan_in_fan_out), so the decomposition is of W^T (nf, nx) =
    (out, in) and every tensor, the forward and the math are CersaLinear's (docs/design.md "Layers
    beyond nn.Linear").  nf = out_features, nx = in_features.  :meth:`merge` returns a Conv1D (the
    same class as the converted module) whose weight has the (nx, nf) layout again.
    """

    kind = "Conv1D"
    arg = "conv"
    checks_bias = False  # a Conv1D always has a bias
    _dense_cls: type | None = None

    @property
    def nf(self) -> int:
        return self.out_features

    @property
    def nx(self) -> int:
        return self.in_features

    @classmethod
    def claims(cls, module: nn.Module) -> bool:
        return is_hf_conv1d(module)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str:
        # the base Conv1D is the last class of that name in the MRO (transformers need not be imported)
        base = [c for c in type(module).__mro__ if c.__name__ == "Conv1D"][-1]
        if type(module).forward is not base.forward:
            return f"{type(module).__name__} overrides Conv1D.forward; replacing it would lose that behaviour"
        return ""

    @classmethod
    def expects(cls) -> str:
        return "a transformers Conv1D (weight (nx, nf))"

    @classmethod
    def matrices(cls, module: nn.Module) -> list[tuple[str, Tensor]]:
        return [("weight (transposed)", module.weight.T)]

    @classmethod
    def from_conv1d(cls, conv: nn.Module, config=None, *, name: str = "conv1d", **options) -> "CersaConv1D":
        """Decompose ``conv.weight.T`` (nf, nx) and build the layer; config / options as
        :meth:`CersaLinear.from_linear`.  Raises TypeError if ``conv`` is not a transformers Conv1D."""
        return cls.from_dense(conv, config, name=name, **options)

    @classmethod
    def from_dense(cls, module: nn.Module, config=None, *, ranks=None, name: str = "conv1d", **options):
        layer = super().from_dense(module, config, ranks=ranks, name=name, **options)
        layer._dense_cls = type(module)
        return layer

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """A Conv1D (the converted module's class; transformers' Conv1D after a load) with weight
        (U diag(S) Vh + scale B A)^T of shape (nx, nf), this layer's bias (zeros if it has none)."""
        cls = self._dense_cls or _hf_conv1d_class()
        dense = cls(self.nf, self.nx).to(device=self.U.device, dtype=self.U.dtype)
        dense.weight.copy_(self.merged_matrix().T)
        if getattr(dense, "bias", None) is not None:
            if self.bias is not None:
                dense.bias.copy_(self.bias)
            else:
                dense.bias.zero_()
        return dense

    @classmethod
    def from_config(cls, cfg: dict, device=None, dtype=None, like: nn.Module | None = None) -> "CersaConv1D":
        layer = super().from_config(cfg, device=device, dtype=dtype)
        if like is not None and is_hf_conv1d(like):
            layer._dense_cls = type(like)
        return layer
