"""CersaConv1d / CersaConv2d / CersaConv3d: nn.Conv{1,2,3}d (groups=1) with the kernel read as an
(out, in * prod(kernel_size)) matrix.

y = conv1x1(conv(x, [Vh; A]), [U diag(S) | scale B]) + bias, where conv(x, .) has the original
kernel size, stride, padding, dilation and padding_mode and r + k output channels: F.conv{d}d on
the factors, never the dense kernel (docs/design.md "Layers beyond nn.Linear").  One class,
``CersaConvNd``, holds the math; each subclass names its dimension and dense type.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import CersaLayer, compute_dtype

__all__ = ["CersaConvNd", "CersaConv1d", "CersaConv2d", "CersaConv3d"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class CersaConvNd(CersaLayer):
    """CERSA layer for an nn.Conv{d}d with groups=1 (d = ``dims`` of the subclass).

    The kernel W (out, in, *kernel_size) is read as the matrix (out, in * prod(kernel_size)) = (m, n)
    and decomposed; the layer equals the dense conv with kernel U diag(S) Vh + scale B A.  Tensors:
    those of :class:`~cersa_kernels.layers.base.CersaLayer` with in_features = in * prod(kernel_size),
    out_features = out.  Geometry: in_channels, out_channels, kernel_size, stride, padding, dilation,
    padding_mode.  Input (N, in, *spatial) or (in, *spatial), any floating dtype (autocast as
    F.conv{d}d).  ``backend`` is kept for the config but unused: the convolutions run through
    F.conv{d}d.
    """

    dims: int = 2
    arg = "conv"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, frozen_rank: int, delta_rank: int = 16,
                 *, stride=1, padding=0, dilation=1, padding_mode: str = "zeros", **factor_options) -> None:
        """factor_options: bias, rank, scale, energy, init, train_S, train_bias, backend, device,
        dtype, as :class:`~cersa_kernels.layers.base.CersaLayer`.  Raises ValueError for an unknown
        padding_mode."""
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode: expected 'zeros', 'reflect', 'replicate' or 'circular', "
                             f"got {padding_mode!r}")
        kernel_size = self._tuple(kernel_size)
        n = int(in_channels) * math.prod(kernel_size)
        super().__init__(int(out_channels), n, frozen_rank, delta_rank, **factor_options)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = kernel_size
        self.stride, self.dilation = self._tuple(stride), self._tuple(dilation)
        self.padding = padding if isinstance(padding, str) else self._tuple(padding)
        self.padding_mode = padding_mode

    @classmethod
    def _tuple(cls, v) -> tuple:
        return tuple(int(e) for e in v) if isinstance(v, (tuple, list)) else (int(v),) * cls.dims

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str:
        if module.groups != 1:
            return ((f"depthwise convolution (groups={module.groups} = in_channels)"
                     if module.groups == module.in_channels else f"grouped convolution (groups={module.groups})")
                    + ": only groups=1 is decomposed")
        return super().unsupported_reason(module)

    @classmethod
    def matrices(cls, module: nn.Module) -> list[tuple[str, Tensor]]:
        return [("weight (out x in*kh*kw)" if cls.dims == 2 else "weight (out x in*prod(kernel_size))",
                 module.weight.reshape(module.weight.shape[0], -1))]

    def geometry(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "padding_mode": self.padding_mode}

    @classmethod
    def geometry_of(cls, module: nn.Module) -> dict:
        return {"in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding,
                "dilation": module.dilation, "padding_mode": module.padding_mode}

    @classmethod
    def _geometry_keys(cls) -> tuple[str, ...]:
        return ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode")

    @classmethod
    def _from_geometry(cls, geometry: dict, **factor_options) -> "CersaConvNd":
        g = dict(geometry)
        return cls(g["in_channels"], g["out_channels"], g["kernel_size"], stride=g["stride"], padding=g["padding"],
                   dilation=g["dilation"], padding_mode=g["padding_mode"], **factor_options)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, in, *spatial) or (in, *spatial) -> (N, out, *spatial'), spatial' as the original
        convolution."""
        dtype = compute_dtype(x)
        U, S, Vh, A, B, bias = self.factors(dtype, dense=True)
        r, k = self.frozen_rank, self.delta_rank
        conv = _CONV[self.dims]
        down = torch.cat([Vh, A], 0).view(r + k, self.in_channels, *self.kernel_size)
        up = torch.cat([U * S, B * self.scale], 1)
        padding = self.padding
        x = x if x.dtype == dtype else x.to(dtype)
        if self.padding_mode != "zeros":
            if isinstance(padding, str):
                raise ValueError(f"padding: string padding {padding!r} with padding_mode={self.padding_mode!r} "
                                 f"is not supported")
            x = F.pad(x, [p for p in reversed(padding) for _ in range(2)], mode=self.padding_mode)
            padding = 0
        h = conv(x, down, None, self.stride, padding, self.dilation)
        return conv(h, up.view(*up.shape, *(1,) * self.dims), bias)

    def merged_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The kernel U diag(S) Vh + scale B A as (out, in, *kernel_size), computed in float32 (float64 for
        float64 layers), rounded once to ``dtype`` (default: the layer's dtype)."""
        return self.merged_matrix(dtype).view(self.out_channels, self.in_channels, *self.kernel_size)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """An nn.Conv{d}d with the same hyper-parameters, kernel :meth:`merged_weight` and this bias."""
        conv = self.dense_types[0](self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=1, bias=self.bias is not None,
                         padding_mode=self.padding_mode, device=self.U.device, dtype=self.U.dtype)
        conv.weight.copy_(self.merged_weight())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def mismatch(self, dense: nn.Module) -> str:
        why = super().mismatch(dense)
        if not why and (tuple(self.kernel_size) != tuple(dense.kernel_size)
                        or tuple(self.stride) != tuple(dense.stride)):
            why = (f"the file's conv has kernel {self.kernel_size} stride {self.stride}, the model's "
                   f"{tuple(dense.kernel_size)} {tuple(dense.stride)}")
        return why

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, rank={self.rank}, "
                f"frozen_rank={self.frozen_rank}, delta_rank={self.delta_rank}, energy={self.energy:.4f}")


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class CersaConv1d(CersaConvNd):
    """CersaConvNd for nn.Conv1d (audio and sequence models, attention projections written as 1-D
    convolutions); build it with ``from_dense(conv, ...)`` (options as CersaLinear.from_linear)."""

    kind = "Conv1d"
    dims = 1
    dense_types = (nn.Conv1d,)


class CersaConv2d(CersaConvNd):
    """CersaConvNd for nn.Conv2d: the kernel W (out, in, kh, kw) read as the matrix (out, in*kh*kw)."""

    kind = "Conv2d"
    dims = 2
    dense_types = (nn.Conv2d,)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, config=None, *, name: str = "conv2d", **options) -> "CersaConv2d":
        """Decompose conv.weight viewed as (out, in*kh*kw); config / options as CersaLinear.from_linear.
        Raises TypeError for a non-Conv2d and ValueError (naming ``name``) for groups > 1 (grouped and
        depthwise convolutions are not decomposed: each group would need its own factors)."""
        return cls.from_dense(conv, config, name=name, **options)


class CersaConv3d(CersaConvNd):
    """CersaConvNd for nn.Conv3d (video and volumetric models); build it with ``from_dense``."""

    kind = "Conv3d"
    dims = 3
    dense_types = (nn.Conv3d,)
