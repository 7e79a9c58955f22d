"""nn.Module layers of CERSA: ``CersaLinear`` (a drop-in for nn.Linear).

The layer stores the energy-truncated SVD factors of the pretrained weight (frozen) and a
trainable low-rank delta, and computes (DESIGN.md "Forward")

    y = x (U diag(S) Vh + scale * B A)^T + bias

through ``cersa_kernels.cersa_linear`` (fused backends, never the dense weight).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .decompose import check_rank, truncated_svd
from .ops import cersa_linear

__all__ = ["CersaLinear", "INITS"]

INITS = ("principal", "lora")


def _check_delta_rank(delta_rank, where: str = "") -> int:
    if isinstance(delta_rank, bool) or not isinstance(delta_rank, int):
        raise TypeError(f"delta_rank{where}: expected a positive int, got {type(delta_rank).__name__} {delta_rank!r}")
    if delta_rank <= 0:
        raise ValueError(f"delta_rank{where}: expected a positive int, got {delta_rank}")
    return delta_rank


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
        self.backend = backend
        self.U = nn.Parameter(torch.empty(out_features, frozen_rank, **kw), requires_grad=False)
        self.S = nn.Parameter(torch.empty(frozen_rank, **kw), requires_grad=bool(train_S))
        self.Vh = nn.Parameter(torch.empty(frozen_rank, in_features, **kw), requires_grad=False)
        self.A = nn.Parameter(torch.empty(delta_rank, in_features, **kw))
        self.B = nn.Parameter(torch.empty(out_features, delta_rank, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=bool(train_bias))
        else:
            self.register_parameter("bias", None)

    @property
    def frozen_rank(self) -> int:
        return self.U.shape[1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, energy: float | None = 0.93, rank: int | None = None,
                    delta_rank: int = 16, alpha: float | None = None, init: str = "principal",
                    train_S: bool = False, train_bias: bool = False, backend: str | None = None,
                    name: str = "linear") -> "CersaLinear":
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
        Raises TypeError/ValueError naming ``name`` for an unusable weight or bad argument.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        _check_delta_rank(delta_rank, f" ({name})")
        _check_init(init)
        if init == "principal" and alpha is not None and _lora_scale(alpha, delta_rank) != 1.0:
            raise ValueError(f"alpha: init='principal' fixes scale = 1 (A, B carry sqrt(S)); got alpha={alpha!r} "
                             f"with delta_rank={delta_rank}, i.e. scale {alpha / delta_rank}; use init='lora' or alpha=None")
        scale = _lora_scale(alpha, delta_rank)
        W = linear.weight
        U, S, Vh, info = truncated_svd(W, energy=energy, rank=rank, where=f"{name}.weight")
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
        moved = min(k, r) if init == "principal" else 0
        if moved:  # only components with a nonzero singular value are worth moving
            moved = int((S[:moved] > 0).sum())
        layer = cls(n, m, r - moved, k, bias=bias is not None, rank=r, scale=scale, energy=energy, init=init,
                    train_S=train_S, train_bias=train_bias, backend=backend, device=U.device, dtype=dtype)
        with torch.no_grad():
            Uf, Sf = _fit_dtype(U[:, moved:], S[moved:], dtype)
            layer.U.copy_(Uf)
            layer.S.copy_(Sf)
            layer.Vh.copy_(Vh[moved:])
            A = torch.empty(k, n, device=U.device, dtype=U.dtype)
            B = torch.zeros(m, k, device=U.device, dtype=U.dtype)
            if moved:
                root = S[:moved].sqrt()
                A[:moved] = root[:, None] * Vh[:moved]
                B[:, :moved] = U[:, :moved] * root[None, :]
            if moved < k:
                nn.init.kaiming_uniform_(A[moved:], a=math.sqrt(5))
            layer.A.copy_(A)
            layer.B.copy_(B)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_features) -> (..., out_features); see ``cersa_kernels.cersa_linear``.

        Output-dtype rule: y has x's dtype, or the autocast dtype under torch.autocast.  Tensors of
        another dtype (e.g. bf16 factors with fp32 deltas, or an fp32 input with bf16 factors) are
        cast to that compute dtype for the call (a differentiable cast: each gradient comes back in
        its parameter's own dtype); with matching dtypes nothing is copied.
        """
        dev = x.device.type
        if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
            dtype = torch.get_autocast_dtype(dev)
        else:
            dtype = x.dtype
        cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))
        return cersa_linear(cast(x), cast(self.U), cast(self.S), cast(self.Vh), cast(self.A), cast(self.B),
                            cast(self.bias), self.scale, backend=self.backend)

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
    def from_config(cls, cfg: dict, device=None, dtype=None) -> "CersaLinear":
        """An uninitialised layer from :meth:`cersa_config`'s dict."""
        return cls(cfg["in_features"], cfg["out_features"], cfg["frozen_rank"], cfg["delta_rank"],
                   bias=cfg["bias"], rank=cfg["rank"], scale=cfg["scale"], energy=cfg["energy"], init=cfg["init"],
                   train_S=cfg["train_S"], train_bias=cfg["train_bias"], device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"frozen_rank={self.frozen_rank}, delta_rank={self.delta_rank}, scale={self.scale:g}, "
                f"energy={self.energy:.4f}, init={self.init!r}, bias={self.bias is not None}")
