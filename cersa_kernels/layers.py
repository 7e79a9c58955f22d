"""nn.Module layers of CERSA.

* ``CersaLinear`` (a drop-in for nn.Linear) stores the energy-truncated SVD factors of the
  pretrained weight (frozen) and a trainable low-rank delta, and computes (DESIGN.md "Forward")
  y = x (U diag(S) Vh + scale * B A)^T + bias through ``cersa_kernels.cersa_linear`` (fused
  backends, never the dense weight).
* ``CersaConv1D``: the same for transformers' Conv1D (GPT-2), whose weight is stored (in, out)
  (fan_in_fan_out); it decomposes W^T and merges back to a Conv1D with the (in, out) layout.
* ``CersaConv2d``: nn.Conv2d (groups=1) with W reshaped to (out, in * kh * kw); the down factors
  Vh and A are convolutions with the original kernel, stride, padding and dilation, the up
  factors U diag(S) and scale * B are 1x1 convolutions (PEFT's conv LoRA layout) -- F.conv2d on
  the factors, never the dense kernel.
* ``CersaMultiheadAttention``: nn.MultiheadAttention with its packed in_proj (3E x E) and out_proj
  as CersaLinear layers; attention recomputed from the projections (F.multi_head_attention_forward
  reads raw weights, so a swapped submodule would be bypassed).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import BACKEND_DEVICES
from .decompose import check_rank, truncated_svd
from .ops import cersa_linear

__all__ = ["CersaLinear", "CersaConv1D", "CersaConv2d", "CersaMultiheadAttention", "INITS",
           "is_hf_conv1d"]

INITS = ("principal", "lora")


def _check_delta_rank(delta_rank, where: str = "") -> int:
    if isinstance(delta_rank, bool) or not isinstance(delta_rank, int):
        raise TypeError(f"delta_rank{where}: expected a positive int, got {type(delta_rank).__name__} {delta_rank!r}")
    if delta_rank <= 0:
        raise ValueError(f"delta_rank{where}: expected a positive int, got {delta_rank}")
    return delta_rank


def check_backend(backend) -> str | None:
    """None or a known backend name (whether it can run here is checked at the first forward, on the
    input's device).  Raises ValueError naming the known names."""
    if backend is not None and backend not in BACKEND_DEVICES:
        raise ValueError(f"backend: expected None or one of {sorted(BACKEND_DEVICES)}, got {backend!r}")
    return backend


def _check_init(init) -> str:
    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS}, got {init!r}")
    return init


def _lora_scale(alpha, delta_rank: int) -> float:
    if alpha is None:
        return 1.0
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise TypeError(f"alpha: expected a finite real number or None, got {type(alpha).__name__} {alpha!r}")
    return float(alpha) / delta_rank


def _add_factors(layer: nn.Module, m: int, n: int, frozen_rank: int, delta_rank: int, bias: bool,
                 train_S: bool, train_bias: bool, kw: dict) -> None:
    """Register uninitialised parameters U (m, frozen_rank), S (frozen_rank,), Vh (frozen_rank, n)
    (frozen; S trainable with train_S), A (delta_rank, n), B (m, delta_rank) (trainable) and bias
    (m,) or None (trainable with train_bias) on ``layer``, in that order; ``kw``: device / dtype."""
    layer.U = nn.Parameter(torch.empty(m, frozen_rank, **kw), requires_grad=False)
    layer.S = nn.Parameter(torch.empty(frozen_rank, **kw), requires_grad=bool(train_S))
    layer.Vh = nn.Parameter(torch.empty(frozen_rank, n, **kw), requires_grad=False)
    layer.A = nn.Parameter(torch.empty(delta_rank, n, **kw))
    layer.B = nn.Parameter(torch.empty(m, delta_rank, **kw))
    if bias:
        layer.bias = nn.Parameter(torch.empty(m, **kw), requires_grad=bool(train_bias))
    else:
        layer.register_parameter("bias", None)


def _fill(layer, U, S, Vh, A, B, bias, moved: int, dtype) -> None:
    """Copy the split factors into ``layer``'s parameters (rounded once to ``dtype``)."""
    with torch.no_grad():
        Uf, Sf = _fit_dtype(U[:, moved:], S[moved:], dtype)
        layer.U.copy_(Uf)
        layer.S.copy_(Sf)
        layer.Vh.copy_(Vh[moved:])
        layer.A.copy_(A)
        layer.B.copy_(B)
        if bias is not None:
            layer.bias.copy_(bias.detach())


def _fit_dtype(U: Tensor, S: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Rescale so that S fits ``dtype``: U <- U c, S <- S / c leaves U diag(S) unchanged.

    Used only when the largest singular value would overflow a float16 layer (|S| > 65504).
    """
    if not S.numel():
        return U, S
    limit = torch.finfo(dtype).max / 4.0
    smax = float(S.max())
    if smax <= limit:
        return U, S
    c = smax / limit
    return U * c, S / c


def _principal_split(U: Tensor, S: Tensor, Vh: Tensor, k: int, init: str):
    """Split truncated factors into (frozen U, S, Vh) and delta (A (k, n), B (m, k)) per ``init``
    (see CersaLinear.from_linear).  Returns (moved, A, B) in U's dtype; frozen = factors[moved:]."""
    m, r = U.shape
    n = Vh.shape[1]
    moved = min(k, r) if init == "principal" else 0
    if moved:  # only components with a nonzero singular value are worth moving
        moved = int((S[:moved] > 0).sum())
    A = torch.empty(k, n, device=U.device, dtype=U.dtype)
    B = torch.zeros(m, k, device=U.device, dtype=U.dtype)
    if moved:
        root = S[:moved].sqrt()
        A[:moved] = root[:, None] * Vh[:moved]
        B[:, :moved] = U[:, :moved] * root[None, :]
    if moved < k:
        nn.init.kaiming_uniform_(A[moved:], a=math.sqrt(5))
    return moved, A, B


def _check_delta_opts(delta_rank: int, init: str, alpha, name: str = "", backend=None) -> float:
    """Check backend, delta_rank, init and alpha together; returns the delta scale.  ``name`` (a layer
    name, or "" for model-wide arguments) is added to the delta_rank error."""
    check_backend(backend)
    _check_delta_rank(delta_rank, f" ({name})" if name else "")
    _check_init(init)
    if init == "principal" and alpha is not None and _lora_scale(alpha, delta_rank) != 1.0:
        raise ValueError(f"alpha: init='principal' fixes scale = 1 (A, B carry sqrt(S)); got alpha={alpha!r} "
                         f"with delta_rank={delta_rank}, i.e. scale {alpha / delta_rank}; use init='lora' or alpha=None")
    return _lora_scale(alpha, delta_rank)


def _compute_dtype(x: Tensor) -> torch.dtype:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class CersaLinear(nn.Module):
    """A Linear layer stored as its energy-truncated SVD plus a trainable low-rank delta.

    Computes y = x (U diag(S) Vh + scale * B A)^T + bias   (DESIGN.md "Forward"; paper Sec. 3)

    Tensors (nn.Parameters; all of the layer's dtype and device):
      U (out_features, frozen_rank), S (frozen_rank,), Vh (frozen_rank, in_features): the frozen
        retained subspace (S trainable only with train_S=True);
      A (delta_rank, in_features), B (out_features, delta_rank): the trainable delta
        (lora_A / lora_B in PEFT's terms);
      bias (out_features,) or None (trainable only with train_bias=True).
    Attributes: in_features, out_features; rank = r, the number of singular components of W the
      layer represents at init (frozen_rank + the components moved into the delta by "principal");
      frozen_rank = U.shape[1]; delta_rank = k; scale = s; energy = retained fraction
      sum_{i<=r} sigma_i^2 / ||W||_F^2 (NaN when unknown); init; backend (None = automatic).

    Build it from a trained nn.Linear with :meth:`from_linear`; the constructor makes an
    uninitialised layer of the given sizes (used by ``cersa_kernels.load``).
    """

    def __init__(self, in_features: int, out_features: int, frozen_rank: int, delta_rank: int = 16, *,
                 bias: bool = True, rank: int | None = None, scale: float = 1.0, energy: float = float("nan"),
                 init: str = "principal", train_S: bool = False, train_bias: bool = False,
                 backend: str | None = None, device=None, dtype=None) -> None:
        super().__init__()
        _check_delta_rank(delta_rank)
        check_rank(frozen_rank, min(in_features, out_features), name="frozen_rank")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.delta_rank = delta_rank
        self.rank = frozen_rank if rank is None else rank
        self.scale = float(scale)
        self.energy = float(energy)
        self.init = _check_init(init)
        self.backend = check_backend(backend)
        _add_factors(self, out_features, in_features, frozen_rank, delta_rank, bias, train_S, train_bias, kw)

    @property
    def frozen_rank(self) -> int:
        return self.U.shape[1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, energy: float | None = 0.93, rank: int | None = None,
                    delta_rank: int = 16, alpha: float | None = None, init: str = "principal",
                    train_S: bool = False, train_bias: bool = False, backend: str | None = None,
                    name: str = "linear", svd: str = "full") -> "CersaLinear":
        """Decompose ``linear.weight`` (out_features, in_features) and build the CERSA layer.

        energy: tau in (0, 1] (the retained fraction of ||W||_F^2), or give ``rank`` instead
          (then pass energy=None); rank 0 is allowed (output = bias + delta).
        delta_rank: k >= 1.  alpha: LoRA-style scale numerator, scale = alpha / k (default
          alpha = k, scale 1); only with init="lora".
        init:
          "principal" (default): the top min(k, r) components of the retained subspace move from
            the frozen factors into the delta, A = sqrt(S_k) Vh_k, B = U_k sqrt(S_k), scale 1, and
            the frozen factors keep the remaining r - min(k, r).  Default because CERSA fine-tunes
            representations derived from the principal subspace (paper Sec. 3): training starts on
            the directions that carry most of W's energy, which converges faster than a zero delta
            (as PiSSA reports), and it stores k(m + n + 1) fewer frozen numbers.  Delta rows beyond
            r (or for zero singular values) are initialised as in "lora".
          "lora": A kaiming-uniform (a = sqrt(5), as nn.Linear and PEFT), B zero; frozen = all r.
          Both give, at init, exactly the rank-r truncation of W.
        train_S / train_bias: make S / bias trainable (they are frozen otherwise).
        The SVD runs in float32 (float64 for float64 weights) on the weight's device; every tensor
        is then stored in the weight's dtype, rounded once.
        svd: "full" | "randomized" | "auto", see ``cersa_kernels.decompose.truncated_svd``.
        Raises TypeError/ValueError naming ``name`` for an unusable weight or bad argument.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        scale = _check_delta_opts(delta_rank, init, alpha, name, backend)
        W = linear.weight
        U, S, Vh, info = truncated_svd(W, energy=energy, rank=rank, where=f"{name}.weight", svd=svd)
        return cls.from_factors(U, S, Vh, bias=linear.bias, delta_rank=delta_rank, scale=scale, init=init,
                                energy=info.energy, train_S=train_S, train_bias=train_bias, backend=backend,
                                dtype=W.dtype)

    @classmethod
    def from_factors(cls, U: Tensor, S: Tensor, Vh: Tensor, bias: Tensor | None = None, *, delta_rank: int = 16,
                     scale: float = 1.0, init: str = "principal", energy: float = float("nan"),
                     train_S: bool = False, train_bias: bool = False, backend: str | None = None,
                     dtype: torch.dtype | None = None) -> "CersaLinear":
        """Build the layer from truncated SVD factors U (m, r), S (r,), Vh (r, n) (float32/64) and an
        optional bias (m,); see :meth:`from_linear` for ``init`` and the other arguments.
        Tensors are stored in ``dtype`` (default: U's dtype)."""
        m, r = U.shape
        n = Vh.shape[1]
        dtype = dtype or U.dtype
        k = _check_delta_rank(delta_rank)
        init = _check_init(init)
        with torch.no_grad():
            moved, A, B = _principal_split(U, S, Vh, k, init)
        layer = cls(n, m, r - moved, k, bias=bias is not None, rank=r, scale=scale, energy=energy, init=init,
                    train_S=train_S, train_bias=train_bias, backend=backend, device=U.device, dtype=dtype)
        _fill(layer, U, S, Vh, A, B, bias, moved, dtype)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_features) -> (..., out_features); see ``cersa_kernels.cersa_linear``.

        Output-dtype rule: y has x's dtype, or the autocast dtype under torch.autocast.  Tensors of
        another dtype (e.g. bf16 factors with fp32 deltas, or an fp32 input with bf16 factors) are
        cast to that compute dtype for the call (a differentiable cast: each gradient comes back in
        its parameter's own dtype); with matching dtypes nothing is copied.
        """
        return self._project(x)

    def _project(self, x: Tensor, rows: slice | None = None) -> Tensor:
        """The forward restricted to output rows ``rows`` (U, B, bias sliced; used by attention)."""
        dtype = _compute_dtype(x)
        cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))
        U, B, bias = self.U, self.B, self.bias
        if rows is not None:
            U, B = U[rows], B[rows]
            bias = bias[rows] if bias is not None else None
        return cersa_linear(cast(x), cast(U), cast(self.S), cast(self.Vh), cast(self.A), cast(B),
                            cast(bias), self.scale, backend=self.backend)

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """W = U diag(S) Vh + scale * B A (out_features, in_features), computed in float32 (float64 for
        float64 layers) and rounded once to ``dtype`` (default: the layer's dtype)."""
        cd = torch.float64 if self.U.dtype == torch.float64 else torch.float32
        W = torch.mm(self.U.to(cd) * self.S.to(cd), self.Vh.to(cd))
        W.addmm_(self.B.to(cd), self.A.to(cd), alpha=self.scale)
        return W.to(dtype or self.U.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """An nn.Linear with weight U diag(S) Vh + scale * B A and this layer's bias (same dtype/device)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.U.device, dtype=self.U.dtype)
        lin.weight.copy_(self.merged_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def cersa_config(self) -> dict:
        """The sizes and settings needed to rebuild an empty layer of this shape (for save/load)."""
        return {"type": "CersaLinear", "in_features": self.in_features, "out_features": self.out_features,
                "frozen_rank": self.frozen_rank, "rank": self.rank, "delta_rank": self.delta_rank,
                "bias": self.bias is not None, "scale": self.scale, "energy": self.energy, "init": self.init,
                "train_S": self.S.requires_grad,
                "train_bias": bool(self.bias is not None and self.bias.requires_grad)}

    @classmethod
    def from_config(cls, cfg: dict, device=None, dtype=None, like: nn.Module | None = None) -> "CersaLinear":
        """An uninitialised layer from :meth:`cersa_config`'s dict (``like``: the dense module it
        replaces, unused here; subclasses take the dense class from it)."""
        return cls(cfg["in_features"], cfg["out_features"], cfg["frozen_rank"], cfg["delta_rank"],
                   bias=cfg["bias"], rank=cfg["rank"], scale=cfg["scale"], energy=cfg["energy"], init=cfg["init"],
                   train_S=cfg["train_S"], train_bias=cfg["train_bias"], device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"frozen_rank={self.frozen_rank}, delta_rank={self.delta_rank}, scale={self.scale:g}, "
                f"energy={self.energy:.4f}, init={self.init!r}, bias={self.bias is not None}")


# ----------------------------------------------------------------------------------------------
# transformers' Conv1D (GPT-2): weight stored (in, out)
# ----------------------------------------------------------------------------------------------
def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' Conv1D (GPT-2 style: attributes nf, nx, weight (nx, nf)), detected by
    class name and attributes so that transformers need not be imported."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")
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
    (out, in) and every tensor, the forward and the math are CersaLinear's (DESIGN.md "Layers beyond
    nn.Linear").  nf = out_features, nx = in_features.  :meth:`merge` returns a Conv1D (the same class
    as the converted module) whose weight has the (nx, nf) layout again.
    """

    _dense_cls: type | None = None

    @property
    def nf(self) -> int:
        return self.out_features

    @property
    def nx(self) -> int:
        return self.in_features

    @classmethod
    def from_conv1d(cls, conv: nn.Module, energy: float | None = 0.93, rank: int | None = None,
                    delta_rank: int = 16, alpha: float | None = None, init: str = "principal",
                    train_S: bool = False, train_bias: bool = False, backend: str | None = None,
                    name: str = "conv1d", svd: str = "full") -> "CersaConv1D":
        """Decompose ``conv.weight.T`` (nf, nx) and build the layer; arguments as
        :meth:`CersaLinear.from_linear`.  Raises TypeError if ``conv`` is not a transformers Conv1D."""
        if not is_hf_conv1d(conv):
            raise TypeError(f"conv: expected a transformers Conv1D (weight (nx, nf)), got {type(conv).__name__}")
        scale = _check_delta_opts(delta_rank, init, alpha, name, backend)
        W = conv.weight
        U, S, Vh, info = truncated_svd(W.T, energy=energy, rank=rank, where=f"{name}.weight (transposed)",
                                       svd=svd)
        layer = cls.from_factors(U, S, Vh, bias=conv.bias, delta_rank=delta_rank, scale=scale, init=init,
                                 energy=info.energy, train_S=train_S, train_bias=train_bias, backend=backend,
                                 dtype=W.dtype)
        layer._dense_cls = type(conv)
        return layer

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """A Conv1D (the converted module's class; transformers' Conv1D after a load) with weight
        (U diag(S) Vh + scale B A)^T of shape (nx, nf), this layer's bias (zeros if it has none)."""
        cls = self._dense_cls or _hf_conv1d_class()
        dense = cls(self.nf, self.nx).to(device=self.U.device, dtype=self.U.dtype)
        dense.weight.copy_(self.merged_weight().T)
        if getattr(dense, "bias", None) is not None:
            if self.bias is not None:
                dense.bias.copy_(self.bias)
            else:
                dense.bias.zero_()
        return dense

    def cersa_config(self) -> dict:
        cfg = super().cersa_config()
        cfg["type"] = "CersaConv1D"
        return cfg

    @classmethod
    def from_config(cls, cfg: dict, device=None, dtype=None, like: nn.Module | None = None) -> "CersaConv1D":
        layer = super().from_config(cfg, device=device, dtype=dtype)
        if like is not None and is_hf_conv1d(like):
            layer._dense_cls = type(like)
        return layer


# ----------------------------------------------------------------------------------------------
# nn.Conv2d
# ----------------------------------------------------------------------------------------------
def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class CersaConv2d(nn.Module):
    """CERSA layer for nn.Conv2d with groups=1 (DESIGN.md "Layers beyond nn.Linear").

    The kernel W (out, in, kh, kw) is read as the matrix (out, in * kh * kw) = (m, n) and decomposed;
    then y = conv1x1(conv(x, [Vh; A]), [U diag(S) | scale B]) + bias, where conv(x, .) has the original
    kernel size, stride, padding, dilation and padding_mode and r + k output channels (the factors are
    viewed as (r + k, in, kh, kw)), and conv1x1 maps r + k channels to out.  Equal to the dense conv
    with kernel U diag(S) Vh + scale B A; the dense kernel is never built in forward.

    Tensors: U (out, frozen_rank), S (frozen_rank,), Vh (frozen_rank, in*kh*kw), A (delta_rank,
    in*kh*kw), B (out, delta_rank), bias (out,) or None -- the same roles as in CersaLinear.
    Attributes: in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode;
    in_features = in*kh*kw and out_features = out (the matrix view); rank, frozen_rank, delta_rank,
    scale, energy, init; backend (unused: the convolutions run through F.conv2d).
    Input (N, in, H, W) or (in, H, W), any floating dtype (autocast as F.conv2d).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, frozen_rank: int, delta_rank: int = 16,
                 *, stride=1, padding=0, dilation=1, padding_mode: str = "zeros", bias: bool = True,
                 rank: int | None = None, scale: float = 1.0, energy: float = float("nan"),
                 init: str = "principal", train_S: bool = False, train_bias: bool = False,
                 backend: str | None = None, device=None, dtype=None) -> None:
        super().__init__()
        _check_delta_rank(delta_rank)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode: expected 'zeros', 'reflect', 'replicate' or 'circular', "
                             f"got {padding_mode!r}")
        self.padding_mode = padding_mode
        n = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.in_features, self.out_features = n, self.out_channels
        check_rank(frozen_rank, min(n, self.out_channels), name="frozen_rank")
        self.delta_rank = delta_rank
        self.rank = frozen_rank if rank is None else rank
        self.scale = float(scale)
        self.energy = float(energy)
        self.init = _check_init(init)
        self.backend = backend
        kw = {"device": device, "dtype": dtype}
        _add_factors(self, self.out_channels, n, frozen_rank, delta_rank, bias, train_S, train_bias, kw)

    @property
    def frozen_rank(self) -> int:
        return self.U.shape[1]

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, energy: float | None = 0.93, rank: int | None = None,
                    delta_rank: int = 16, alpha: float | None = None, init: str = "principal",
                    train_S: bool = False, train_bias: bool = False, backend: str | None = None,
                    name: str = "conv2d", svd: str = "full") -> "CersaConv2d":
        """Decompose conv.weight viewed as (out, in*kh*kw); arguments as CersaLinear.from_linear.
        Raises TypeError for a non-Conv2d and ValueError (naming ``name``) for groups > 1 (grouped and
        depthwise convolutions are not decomposed: each group would need its own factors)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"{name}: grouped convolution (groups={conv.groups}) is not supported; "
                             f"only groups=1 Conv2d layers are converted")
        scale = _check_delta_opts(delta_rank, init, alpha, name, backend)
        W = conv.weight
        U, S, Vh, info = truncated_svd(W.reshape(W.shape[0], -1), energy=energy, rank=rank,
                                       where=f"{name}.weight (out x in*kh*kw)", svd=svd)
        k = delta_rank
        r = U.shape[1]
        with torch.no_grad():
            moved, A, B = _principal_split(U, S, Vh, k, init)
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, r - moved, k, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, padding_mode=conv.padding_mode,
                    bias=conv.bias is not None, rank=r, scale=scale, energy=info.energy, init=init,
                    train_S=train_S, train_bias=train_bias, backend=backend, device=W.device, dtype=W.dtype)
        _fill(layer, U, S, Vh, A, B, conv.bias, moved, W.dtype)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        """x (N, in, H, W) or (in, H, W) -> (N, out, H', W'), H', W' as the original convolution."""
        dtype = _compute_dtype(x)
        cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))
        kh, kw = self.kernel_size
        r, k = self.frozen_rank, self.delta_rank
        down = torch.cat([cast(self.Vh), cast(self.A)], 0).view(r + k, self.in_channels, kh, kw)
        up = torch.cat([cast(self.U) * cast(self.S), cast(self.B) * self.scale], 1)
        padding = self.padding
        x = cast(x)
        if self.padding_mode != "zeros":
            if isinstance(padding, str):
                raise ValueError(f"padding: string padding {padding!r} with padding_mode={self.padding_mode!r} "
                                 f"is not supported")
            ph, pw = padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = 0
        h = F.conv2d(x, down, None, self.stride, padding, self.dilation)
        return F.conv2d(h, up[:, :, None, None], cast(self.bias))

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The kernel U diag(S) Vh + scale B A as (out, in, kh, kw), computed in float32 (float64 for
        float64 layers), rounded once to ``dtype`` (default: the layer's dtype)."""
        cd = torch.float64 if self.U.dtype == torch.float64 else torch.float32
        W = torch.mm(self.U.to(cd) * self.S.to(cd), self.Vh.to(cd))
        W.addmm_(self.B.to(cd), self.A.to(cd), alpha=self.scale)
        return W.view(self.out_channels, self.in_channels, *self.kernel_size).to(dtype or self.U.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Conv2d:
        """An nn.Conv2d with the same hyper-parameters, kernel :meth:`merged_weight` and this bias."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=1, bias=self.bias is not None,
                         padding_mode=self.padding_mode, device=self.U.device, dtype=self.U.dtype)
        conv.weight.copy_(self.merged_weight())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def cersa_config(self) -> dict:
        return {"type": "CersaConv2d", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "padding_mode": self.padding_mode,
                "frozen_rank": self.frozen_rank, "rank": self.rank, "delta_rank": self.delta_rank,
                "bias": self.bias is not None, "scale": self.scale, "energy": self.energy, "init": self.init,
                "train_S": self.S.requires_grad,
                "train_bias": bool(self.bias is not None and self.bias.requires_grad),
                "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_config(cls, cfg: dict, device=None, dtype=None, like: nn.Module | None = None) -> "CersaConv2d":
        return cls(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), cfg["frozen_rank"],
                   cfg["delta_rank"], stride=tuple(cfg["stride"]),
                   padding=cfg["padding"] if isinstance(cfg["padding"], str) else tuple(cfg["padding"]),
                   dilation=tuple(cfg["dilation"]), padding_mode=cfg["padding_mode"], bias=cfg["bias"],
                   rank=cfg["rank"], scale=cfg["scale"], energy=cfg["energy"], init=cfg["init"],
                   train_S=cfg["train_S"], train_bias=cfg["train_bias"], device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, rank={self.rank}, "
                f"frozen_rank={self.frozen_rank}, delta_rank={self.delta_rank}, energy={self.energy:.4f}")


# ----------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------
def mha_unsupported_reason(mha: nn.MultiheadAttention) -> str:
    """"" when :class:`CersaMultiheadAttention` can replace ``mha``, else why not."""
    if not mha._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim (separate q/k/v projection weights) are not supported"
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True is not supported"
    if mha.add_zero_attn:
        return "add_zero_attn=True is not supported"
    return ""


def _float_mask(mask: Tensor | None, dtype: torch.dtype, name: str) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{name}: expected a bool or floating mask, got dtype {mask.dtype}")
    return mask.to(dtype)


class CersaMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with CERSA projections: in_proj (CersaLinear, 3E x E: the packed
    q, k, v projection) and out_proj (CersaLinear, E x E).

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) has nn.MultiheadAttention's signature, shapes
    ((L, N, E), or (N, L, E) with batch_first, or unbatched (L, E)), mask conventions (bool: True =
    not allowed; float: added) and outputs (attn_output, attn_weights or None).  Self-attention
    (query is key is value) projects once; otherwise q, k, v use the row blocks of in_proj's U, B and
    bias (W_q = U[:E] diag(S) Vh + s B[:E] A, ...).  Attention: softmax(q k^T / sqrt(d) + mask) v with
    dropout in training (explicit when weights are returned, else F.scaled_dot_product_attention).
    ``is_causal`` is a hint, as in PyTorch: attn_mask must then be given and is used.
    Supported: packed projections (kdim = vdim = embed_dim), no add_bias_kv / add_zero_attn.
    ``in_proj_bias`` is None on purpose: it turns off nn.TransformerEncoderLayer's fused fast path,
    which reads the raw projection weights this module does not have.
    """

    in_proj_bias = None
    in_proj_weight = None

    def __init__(self, in_proj: CersaLinear, out_proj: CersaLinear, num_heads: int, *, dropout: float = 0.0,
                 batch_first: bool = False) -> None:
        super().__init__()
        E = out_proj.out_features
        if in_proj.out_features != 3 * E or in_proj.in_features != E or out_proj.in_features != E:
            raise ValueError(f"in_proj/out_proj: expected shapes (3E, E) and (E, E), got "
                             f"({in_proj.out_features}, {in_proj.in_features}) and "
                             f"({out_proj.out_features}, {out_proj.in_features})")
        if E % num_heads:
            raise ValueError(f"num_heads: embed_dim {E} is not divisible by num_heads {num_heads}")
        self.embed_dim = self.kdim = self.vdim = E
        self.num_heads = num_heads
        self.head_dim = E // num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self._qkv_same_embed_dim = True
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.in_proj = in_proj
        self.out_proj = out_proj

    @property
    def rank(self) -> int:
        return self.in_proj.rank + self.out_proj.rank

    @property
    def frozen_rank(self) -> int:
        return self.in_proj.frozen_rank + self.out_proj.frozen_rank

    @property
    def delta_rank(self) -> int:
        return self.in_proj.delta_rank

    @property
    def energy(self) -> float:
        return min(self.in_proj.energy, self.out_proj.energy)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, energy: float | None = 0.93, rank: int | None = None,
                 delta_rank: int = 16, alpha: float | None = None, init: str = "principal",
                 train_S: bool = False, train_bias: bool = False, backend: str | None = None,
                 name: str = "attn", svd: str = "full", out_rank: int | None = None) -> "CersaMultiheadAttention":
        """Decompose in_proj_weight (3E, E) and out_proj.weight (E, E) separately (each to ``energy``,
        or to ``rank`` / ``out_rank``); other arguments as CersaLinear.from_linear.
        Raises ValueError naming ``name`` for an unsupported configuration (mha_unsupported_reason)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha: expected an nn.MultiheadAttention, got {type(mha).__name__}")
        why = mha_unsupported_reason(mha)
        if why:
            raise ValueError(f"{name}: nn.MultiheadAttention cannot be converted: {why}")
        opts = dict(delta_rank=delta_rank, alpha=alpha, init=init, train_S=train_S, train_bias=train_bias,
                    backend=backend, svd=svd)
        E = mha.embed_dim
        lin = nn.Linear(E, 3 * E, bias=mha.in_proj_bias is not None, device="meta")
        lin.weight = mha.in_proj_weight
        lin.bias = mha.in_proj_bias
        in_proj = CersaLinear.from_linear(lin, energy=energy if rank is None else None, rank=rank,
                                          name=f"{name}.in_proj_weight", **opts)
        r_out = out_rank if out_rank is not None else rank
        out_proj = CersaLinear.from_linear(mha.out_proj, energy=energy if r_out is None else None, rank=r_out,
                                           name=f"{name}.out_proj", **opts)
        return cls(in_proj, out_proj, mha.num_heads, dropout=mha.dropout, batch_first=mha.batch_first)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal: a hint that attn_mask is the causal mask; attn_mask must be given "
                               "(as in nn.MultiheadAttention)")
        batched = query.dim() == 3
        same = query is key and key is value
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        L, N, E = query.shape
        S_len = key.shape[0]
        H, d = self.num_heads, self.head_dim
        if same:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:
            q = self.in_proj._project(query, slice(0, E))
            k = self.in_proj._project(key, slice(E, 2 * E))
            v = self.in_proj._project(value, slice(2 * E, 3 * E))
        q = q.reshape(L, N, H, d).permute(1, 2, 0, 3)  # (N, H, L, d)
        k = k.reshape(S_len, N, H, d).permute(1, 2, 0, 3)
        v = v.reshape(S_len, N, H, d).permute(1, 2, 0, 3)
        mask = _float_mask(attn_mask, q.dtype, "attn_mask")
        if mask is not None:
            if mask.dim() == 2:
                mask = mask.view(1, 1, L, S_len)
            elif mask.dim() == 3:
                mask = mask.view(N, H, L, S_len)
            else:
                raise ValueError(f"attn_mask: expected 2-D (L, S) or 3-D (N*num_heads, L, S), got shape "
                                 f"{tuple(attn_mask.shape)}")
        kpm = _float_mask(key_padding_mask, q.dtype, "key_padding_mask")
        if kpm is not None:
            kpm = kpm.view(N, 1, 1, S_len)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if p > 0:
                weights = F.dropout(weights, p=p)
            out = torch.matmul(weights, v)
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.permute(2, 0, 1, 3).reshape(L, N, E)
        out = self.out_proj(out)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights

    @torch.no_grad()
    def merge(self) -> nn.MultiheadAttention:
        """An nn.MultiheadAttention with in_proj_weight / out_proj.weight the merged CERSA weights."""
        ip, op = self.in_proj, self.out_proj
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, bias=ip.bias is not None,
                                    batch_first=self.batch_first, device=ip.U.device, dtype=ip.U.dtype)
        mha.in_proj_weight.copy_(ip.merged_weight())
        if ip.bias is not None:
            mha.in_proj_bias.copy_(ip.bias)
        mha.out_proj.weight.copy_(op.merged_weight())
        if op.bias is not None and mha.out_proj.bias is not None:
            mha.out_proj.bias.copy_(op.bias)
        return mha

    def cersa_config(self) -> dict:
        return {"type": "CersaMultiheadAttention", "num_heads": self.num_heads, "dropout": self.dropout,
                "batch_first": self.batch_first, "in_proj": self.in_proj.cersa_config(),
                "out_proj": self.out_proj.cersa_config(), "in_features": self.embed_dim,
                "out_features": self.embed_dim}

    @classmethod
    def from_config(cls, cfg: dict, device=None, dtype=None, like: nn.Module | None = None
                    ) -> "CersaMultiheadAttention":
        return cls(CersaLinear.from_config(cfg["in_proj"], device=device, dtype=dtype),
                   CersaLinear.from_config(cfg["out_proj"], device=device, dtype=dtype),
                   cfg["num_heads"], dropout=cfg["dropout"], batch_first=cfg["batch_first"])

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
