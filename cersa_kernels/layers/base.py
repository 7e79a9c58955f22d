"""The base classes of every CERSA module.

``CersaModule`` is what the layer registry (``cersa_kernels.layers``) and everything above it
(convert, plan, the report, save/load, merge, the CLI) talk to: which dense modules a class
replaces, why one of them cannot be taken, which (out, in) matrices it decomposes, how it builds
itself from a dense module, what it stores, and how it merges back.

``CersaLayer`` is the CersaModule that owns one set of factors (docs/design.md "Forward"):
U (m, frozen_rank), S (frozen_rank,), Vh (frozen_rank, n) frozen; the delta A (k, n), B (m, k)
trainable; bias (m,) or None; with rank, frozen_rank, delta_rank, scale, energy, init, the merged
weight and the saved config.  A subclass adds only its geometry (``geometry`` / ``geometry_of``:
the constructor arguments that are not factors), its forward, and its dense module (``merge``).
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import CersaConfig
from ..decompose import check_rank, truncated_svd
from ..quant import QuantizedMatrix

__all__ = ["CersaModule", "CersaLayer", "compute_dtype"]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a CERSA forward computes in: the autocast dtype under torch.autocast, else x's."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def caster(dtype: torch.dtype):
    """t -> t in ``dtype`` (a differentiable cast; None and tensors already in it pass unchanged)."""
    return lambda t: t if t is None or t.dtype == dtype else t.to(dtype)


class CersaModule(nn.Module):
    """Interface of a CERSA module as the layer registry sees it (abstract).

    Class attributes: ``kind`` (the dense layer kind shown in reports, e.g. "Linear"),
    ``dense_types`` (the dense classes it replaces), ``arg`` (the argument name used in errors).
    """

    kind: ClassVar[str] = ""
    dense_types: ClassVar[tuple[type, ...]] = ()
    arg: ClassVar[str] = "module"

    # ---- what it replaces -------------------------------------------------------------------
    @classmethod
    def claims(cls, module: nn.Module) -> bool:
        """Whether ``module`` is of the dense family this class replaces (convertible or not)."""
        return isinstance(module, cls.dense_types)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str:
        """"" when this class can replace ``module`` (one it claims), else why not.  A subclass of a
        dense type that overrides its forward is refused: replacing it would lose that behaviour."""
        for base in cls.dense_types:
            if isinstance(module, base) and type(module).forward is not base.forward:
                return (f"{type(module).__name__} overrides {base.__name__}.forward; replacing it would lose "
                        f"that behaviour")
        return ""

    @classmethod
    def matrices(cls, module: nn.Module) -> list[tuple[str, Tensor]]:
        """The (label, (out, in) matrix) pairs of ``module`` that are decomposed, one rank each."""
        raise NotImplementedError

    @classmethod
    def dense_shape(cls, module: nn.Module) -> tuple[int, int]:
        """(out, in) shown in reports for ``module``: its first matrix's shape."""
        W = cls.matrices(module)[0][1]
        return int(W.shape[0]), int(W.shape[1])

    @classmethod
    def from_dense(cls, module: nn.Module, config: CersaConfig | None = None, *, ranks=None,
                   name: str = "layer", **options) -> "CersaModule":
        """Decompose ``module`` and build the CERSA module.  config / options: a CersaConfig or its
        fields as keywords; ranks: one rank per matrix of ``matrices`` (None entries, or ranks=None:
        the config's energy or rank decides).  Each matrix's SVD holds r + e components,
        e = ``config.extra_components`` (capped at min(m, n)), passed to ``from_factors`` with
        truncation_rank=r: the truncation's singular triplets, then the next e of W.
        factors: None, or one entry per matrix of ``matrices``: None (decompose here) or the
        precomputed (U (m, q), S (q,), Vh (q, n), info) with info.rank = r <= q the truncation rank
        and info.energy the layer's ``energy`` (what ``decompose.truncated_svd`` or
        ``calibrate.weighted_truncated_svd`` return; the activation-aware truncation, docs/design.md
        "Activation-aware truncation", whose energy is the output energy kept); ranks are then
        not used for that matrix.  Raises TypeError for a module of another type, ValueError
        (naming ``name``) for one that cannot be converted or a bad argument (factors of the
        wrong count or shapes)."""
        raise NotImplementedError

    def parts(self) -> list["CersaLayer"]:
        """The factor-owning layers of this module, in the order of ``matrices``."""
        raise NotImplementedError

    def merge(self) -> nn.Module:
        """The dense module this one computes."""
        raise NotImplementedError

    def cersa_config(self) -> dict:
        """Everything needed to rebuild an empty module of this shape (JSON-serialisable; save/load)."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg: dict, device=None, dtype=None, like: nn.Module | None = None) -> "CersaModule":
        """An uninitialised module from :meth:`cersa_config`'s dict; ``like``: the dense module it
        replaces (a subclass may take the dense class from it)."""
        raise NotImplementedError

    # ---- derived from the parts (a composite module also has rank, frozen_rank, delta_rank, energy) ----
    def stored_numbers(self) -> tuple[int, int]:
        """(frozen numbers of the rank-r truncation, sum r (m + n + 1); stored frozen + delta numbers,
        sum frozen_rank (m + n + 1) + k (m + n)), biases excluded (docs/design.md "Stored frozen
        parameters")."""
        trunc = after = 0
        for p in self.parts():
            m, n = p.out_features, p.in_features
            trunc += p.rank * (m + n + 1)
            after += p.frozen_rank * (m + n + 1) + p.delta_rank * (m + n)
        return trunc, after

    def dense_numbers(self) -> int:
        """m n summed over the matrices the module stands for."""
        return sum(p.out_features * p.in_features for p in self.parts())

    def frozen_nbytes(self) -> int:
        """Bytes of the stored frozen factors U, S, Vh of every part (codes and scales when quantized)."""
        nbytes = lambda F: F.nbytes() if isinstance(F, QuantizedMatrix) else F.numel() * F.element_size()  # noqa: E731
        return sum(nbytes(p.U) + nbytes(p.S) + nbytes(p.Vh) for p in self.parts())

    def mismatch(self, dense: nn.Module) -> str:
        """"" when this module (rebuilt from a file) fits ``dense``, the module it replaces, else the
        difference in words."""
        if not type(self).claims(dense):
            return f"the file's {type(self).__name__} cannot replace the model's {type(dense).__name__}"
        try:
            mats = [tuple(W.shape) for _, W in type(self).matrices(dense)]
        except AttributeError:
            return f"cannot read the weight shape of the model's {type(dense).__name__}"
        got = [(p.out_features, p.in_features) for p in self.parts()]
        if mats != got:
            return f"the file's layer has weight shape(s) {got} (out, in), the model's {type(dense).__name__} {mats}"
        return ""


class CersaLayer(CersaModule):
    """A CERSA module that owns one set of factors of an (m, n) = (out_features, in_features) matrix.

    Computes (through the subclass's forward) the map of W = U diag(S) Vh + scale * B A
    (docs/design.md "Forward"; paper Sec. 3).

    Tensors (nn.Parameters; all of the layer's dtype and device):
      U (out_features, frozen_rank), S (frozen_rank,), Vh (frozen_rank, in_features): the frozen
        retained subspace (S trainable only with train_S=True);
      A (delta_rank, in_features), B (out_features, delta_rank): the trainable delta
        (lora_A / lora_B in PEFT's terms);
      bias (out_features,) or None (trainable only with train_bias=True).
      With quantize="int8" / "nf4", U and Vh are ``QuantizedMatrix`` modules (blockwise codes and
      scales, frozen; docs/design.md "Quantized factors") instead of Parameters.
    Attributes: in_features, out_features; quantize (None or the code type); rank = r, the number of singular components of W the
      layer represents at init (frozen_rank + the components moved into the delta by "principal");
      frozen_rank = U.shape[1]; delta_rank = k; scale = s; energy = retained fraction
      sum_{i<=r} sigma_i^2 / ||W||_F^2 (NaN when unknown); init; backend (None = automatic).
    """

    def __init__(self, out_features: int, in_features: int, frozen_rank: int, delta_rank: int = 16, *,
                 bias: bool = True, rank: int | None = None, scale: float = 1.0, energy: float = float("nan"),
                 init: str = "principal", train_S: bool = False, train_bias: bool = False,
                 backend: str | None = None, quantize: str | None = None, quant_block_size: int = 64,
                 double_quant: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        # the delta and storage options are checked by CersaConfig, the one place that knows them
        CersaConfig(energy=None, rank=0, delta_rank=delta_rank, init=init, backend=backend, quantize=quantize,
                    quant_block_size=quant_block_size, double_quant=double_quant)
        check_rank(frozen_rank, min(in_features, out_features), name="frozen_rank")
        m, n = int(out_features), int(in_features)
        self.in_features, self.out_features = n, m
        self.delta_rank = delta_rank
        self.rank = frozen_rank if rank is None else rank
        self.scale = float(scale)
        self.energy = float(energy)
        self.init = init
        self.backend = backend
        kw = {"device": device, "dtype": dtype}
        if quantize is None:
            self.U = nn.Parameter(torch.empty(m, frozen_rank, **kw), requires_grad=False)
        else:
            self.U = QuantizedMatrix(m, frozen_rank, quantize, quant_block_size, double_quant,
                                     dtype=dtype or torch.get_default_dtype(), device=device)
        self.S = nn.Parameter(torch.empty(frozen_rank, **kw), requires_grad=bool(train_S))
        if quantize is None:
            self.Vh = nn.Parameter(torch.empty(frozen_rank, n, **kw), requires_grad=False)
        else:
            self.Vh = QuantizedMatrix(frozen_rank, n, quantize, quant_block_size, double_quant,
                                      dtype=dtype or torch.get_default_dtype(), device=device)
        self.A = nn.Parameter(torch.empty(delta_rank, n, **kw))
        self.B = nn.Parameter(torch.empty(m, delta_rank, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(m, **kw), requires_grad=bool(train_bias))
        else:
            self.register_parameter("bias", None)

    # ---- geometry: what a subclass adds -----------------------------------------------------------
    def geometry(self) -> dict:
        """The constructor arguments that are not factors (JSON-serialisable)."""
        return {"in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def geometry_of(cls, module: nn.Module) -> dict:
        """:meth:`geometry` of the CERSA layer that replaces the dense ``module``."""
        (_, W), = cls.matrices(module)
        return {"in_features": int(W.shape[1]), "out_features": int(W.shape[0])}

    @classmethod
    def dense_bias(cls, module: nn.Module) -> Tensor | None:
        """The dense module's bias (out_features,), or None."""
        return getattr(module, "bias", None)

    @classmethod
    def _from_geometry(cls, geometry: dict, **factor_options) -> "CersaLayer":
        """An uninitialised layer (subclasses map geometry to their constructor)."""
        return cls(geometry["in_features"], geometry["out_features"], **factor_options)

    # ---- building -----------------------------------------------------------------------------
    @property
    def frozen_rank(self) -> int:
        return self.U.shape[1]

    def parts(self) -> list["CersaLayer"]:
        return [self]

    @classmethod
    def from_dense(cls, module: nn.Module, config: CersaConfig | None = None, *, ranks=None,
                   name: str = "layer", factors=None, **options) -> "CersaLayer":
        if not cls.claims(module):
            raise TypeError(f"{cls.arg}: expected {cls.expects()}, got {type(module).__name__}")
        why = cls.unsupported_reason(module)
        if why:
            raise ValueError(f"{name}: {why}")
        config = CersaConfig.make(config, **options)
        (label, W), = cls.matrices(module)
        where = f"{name}.{label}"
        given = _given_factors(factors, 1, name)[0]
        if given is not None:
            U, S, Vh, info = _check_factors(given, W, where)
        else:
            energy, rank = config.truncation_request(ranks[0] if ranks else None)
            U, S, Vh, info = truncated_svd(W, energy=energy, rank=rank, where=where, svd=config.svd)
            q = min(info.rank + config.extra_components, min(W.shape))
            if q > info.rank:  # the next singular triplets of W, after the truncation's r
                U, S, Vh, _ = truncated_svd(W, rank=q, where=where, svd=config.svd)
        return cls.from_factors(U, S, Vh, cls.dense_bias(module), geometry=cls.geometry_of(module),
                                config=config, energy=info.energy, dtype=W.dtype, truncation_rank=info.rank)

    @classmethod
    def expects(cls) -> str:
        """What ``from_dense`` takes, in words (for errors)."""
        return " or ".join(f"an nn.{t.__name__}" if t.__module__.startswith("torch.nn") else f"a {t.__name__}"
                           for t in cls.dense_types)

    @classmethod
    def from_factors(cls, U: Tensor, S: Tensor, Vh: Tensor, bias: Tensor | None = None, *,
                     geometry: dict | None = None, config: CersaConfig | None = None, scale: float | None = None,
                     energy: float = float("nan"), dtype: torch.dtype | None = None,
                     truncation_rank: int | None = None, **options) -> "CersaLayer":
        """Build the layer from truncated SVD factors U (m, q), S (q,), Vh (q, n) (float32/64) and an
        optional bias (m,).  truncation_rank: r <= q (default q), the rank of the truncation; the
        components [0, r) are its singular triplets, and the q - r components after them (given only
        when ``config.extra_components`` asks for them, themselves singular triplets of the part of W
        beyond the truncation) are where init="residual" starts the delta (other inits ignore them).
        config / options: the delta options of CersaConfig (delta_rank, alpha, init, split_scale,
        train_S, train_bias, backend, quantize, quant_block_size, double_quant, quant_init,
        loftq_iters).  scale: overrides the delta scale (alpha / delta_rank for "lora", the split's
        c for "principal" / "residual").  Tensors are stored in ``dtype`` (default: U's dtype),
        rounded once.  geometry: the subclass's non-factor constructor arguments (default:
        in_features = n, out_features = m).  The layer computes at init U_r diag(S_r) Vh_r (plus,
        for "residual", the next min(k, q - r) components); with quantize and quant_init="loftq"
        the delta also absorbs the quantization error.  Inits: docs/design.md "Initialisation".
        Raises ValueError for a truncation_rank outside [0, q] or a scale that is not a finite
        number > 0 with a split init."""
        if config is None:
            options.setdefault("energy", None)
            options.setdefault("rank", 0)
        config = CersaConfig.make(config, **options)
        q = U.shape[1]
        if truncation_rank is None:
            truncation_rank = q
        if isinstance(truncation_rank, bool) or not isinstance(truncation_rank, int) \
                or not 0 <= truncation_rank <= q:
            raise ValueError(f"truncation_rank: expected an int in [0, {q}] (the factors hold {q} components), "
                             f"got {truncation_rank!r}")
        r = truncation_rank
        if config.init != "residual":
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        m, n = U.shape[0], Vh.shape[1]
        dtype = dtype or U.dtype
        k = config.delta_rank
        with torch.no_grad():
            if scale is None and config.init == "lora":
                scale = config.scale
            frozen, A, B, s = _principal_split(U, S, Vh, k, config.init, r, config.split_scale, scale, dtype)
        geometry = geometry or {"in_features": n, "out_features": m}
        layer = cls._from_geometry(geometry, frozen_rank=frozen.stop - frozen.start, delta_rank=k,
                                   bias=bias is not None, rank=r, scale=s, energy=energy, init=config.init,
                                   train_S=config.train_S, train_bias=config.train_bias, backend=config.backend,
                                   device=U.device, dtype=dtype)
        with torch.no_grad():
            Uf, Sf = _fit_dtype(U[:, frozen], S[frozen], dtype)
            layer.U.copy_(Uf)
            layer.S.copy_(Sf)
            layer.Vh.copy_(Vh[frozen])
            layer.A.copy_(A)
            layer.B.copy_(B)
            if config.quantize is not None:  # the frozen factors as codes; S, the delta and the bias stay
                opts = (config.quantize, config.quant_block_size, config.double_quant)
                target = None
                if config.quant_init == "loftq" and layer.frozen_rank:
                    # the intended matrix at init, from the factors as stored (before quantizing)
                    target = torch.mm(layer.U.to(A.dtype) * layer.S.to(A.dtype), layer.Vh.to(A.dtype))
                    target.addmm_(B, A, alpha=s)
                for name in ("U", "Vh"):
                    packed = QuantizedMatrix.quantize(getattr(layer, name).detach(), *opts)
                    del layer._parameters[name]
                    setattr(layer, name, packed)
                if target is not None:
                    _loftq_delta(layer, target, s, config, A.dtype)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    # ---- what it computes and stores ----------------------------------------------------------
    @property
    def quantize(self) -> str | None:
        """None, or the code type ("int8" / "nf4") of the quantized frozen factors U and Vh."""
        return self.U.quant_type if isinstance(self.U, QuantizedMatrix) else None

    def storage_config(self) -> dict:
        """The factor-storage options (quantize, quant_block_size, double_quant) of this layer."""
        if not isinstance(self.U, QuantizedMatrix):
            return {"quantize": None}
        return {"quantize": self.U.quant_type, "quant_block_size": self.U.block_size,
                "double_quant": self.U.double_quant}

    @torch.no_grad()
    def dequantized_factors(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(U (m, frozen_rank), S (frozen_rank,), Vh (frozen_rank, n)) as dense floating tensors in
        ``dtype`` (default float32, float64 for float64 layers): what the kernels compute with (the
        codes decoded when quantized, the stored tensors otherwise)."""
        dtype = dtype or (torch.float64 if self.S.dtype == torch.float64 else torch.float32)
        dense = lambda F: F.dequantize(dtype) if isinstance(F, QuantizedMatrix) else F.detach().to(dtype)  # noqa: E731
        return dense(self.U), self.S.detach().to(dtype), dense(self.Vh)

    def factors(self, dtype: torch.dtype | None = None, rows: slice | None = None, dense: bool = False):
        """(U, S, Vh, A, B, bias) cast to ``dtype`` (differentiably; none copied when it matches),
        U, B and bias restricted to output rows ``rows`` when given.  Quantized U / Vh come back as
        their QuantizedMatrix (``cersa_linear`` decodes them inside the call), or dequantized with
        ``dense=True`` or ``rows``."""
        cast = caster(dtype or self.S.dtype)
        U, B, bias = self.U, self.B, self.bias
        Vh = self.Vh
        if isinstance(U, QuantizedMatrix) and (dense or rows is not None):
            U = U.dequantize(dtype or self.S.dtype)
        if isinstance(Vh, QuantizedMatrix) and dense:
            Vh = Vh.dequantize(dtype or self.S.dtype)
        if rows is not None:
            U, B = U[rows], B[rows]
            bias = bias[rows] if bias is not None else None
        keep = lambda F: F if isinstance(F, QuantizedMatrix) else cast(F)  # noqa: E731
        return keep(U), cast(self.S), keep(Vh), cast(self.A), cast(B), cast(bias)

    @torch.no_grad()
    def merged_matrix(self, dtype: torch.dtype | None = None) -> Tensor:
        """W = U diag(S) Vh + scale * B A as the (out_features, in_features) matrix, computed in
        float32 (float64 for float64 layers) and rounded once to ``dtype`` (default: the layer's)."""
        U, S, Vh = self.dequantized_factors()
        W = torch.mm(U * S, Vh)
        W.addmm_(self.B.to(U.dtype), self.A.to(U.dtype), alpha=self.scale)
        return W.to(dtype or self.S.dtype)

    def merged_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense module's weight (its own layout) that this layer computes; see merged_matrix."""
        return self.merged_matrix(dtype)

    def cersa_config(self) -> dict:
        return {"type": type(self).__name__, **self.geometry(), "frozen_rank": self.frozen_rank, "rank": self.rank,
                "delta_rank": self.delta_rank, "bias": self.bias is not None, "scale": self.scale,
                "energy": self.energy, "init": self.init, "train_S": self.S.requires_grad,
                "train_bias": bool(self.bias is not None and self.bias.requires_grad),
                "in_features": self.in_features, "out_features": self.out_features, **self.storage_config()}

    @classmethod
    def from_config(cls, cfg: dict, device=None, dtype=None, like: nn.Module | None = None) -> "CersaLayer":
        names = cls._geometry_keys()
        return cls._from_geometry({k: cfg[k] for k in names}, frozen_rank=cfg["frozen_rank"],
                                  delta_rank=cfg["delta_rank"], bias=cfg["bias"], rank=cfg["rank"],
                                  scale=cfg["scale"], energy=cfg["energy"], init=cfg["init"], train_S=cfg["train_S"],
                                  train_bias=cfg["train_bias"], quantize=cfg.get("quantize"),
                                  quant_block_size=cfg.get("quant_block_size", 64),
                                  double_quant=cfg.get("double_quant", False), device=device, dtype=dtype)

    @classmethod
    def _geometry_keys(cls) -> tuple[str, ...]:
        return ("in_features", "out_features")

    def mismatch(self, dense: nn.Module) -> str:
        why = super().mismatch(dense)
        if why:
            return why
        bias_dense = type(self).dense_bias(dense) is not None
        if self.checks_bias and bias_dense != (self.bias is not None):
            return (f"the file's layer {'has' if self.bias is not None else 'has no'} bias, the model's "
                    f"{type(dense).__name__} {'has' if bias_dense else 'has no'} bias")
        return ""

    #: whether load compares the bias flag with the dense module's (Conv1D always has a bias)
    checks_bias: ClassVar[bool] = True

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"frozen_rank={self.frozen_rank}, delta_rank={self.delta_rank}, scale={self.scale:g}, "
                f"energy={self.energy:.4f}, init={self.init!r}, bias={self.bias is not None}"
                + (f", quantize={self.quantize!r}" if self.quantize else ""))


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


def _loftq_delta(layer: "CersaLayer", target: Tensor, c: float, config: CersaConfig, dtype: torch.dtype) -> None:
    """Re-initialise the delta of a layer with quantized frozen factors so that it absorbs the
    quantization error (LoftQ, Li et al. 2023, Alg. 1, with the frozen part kept as factors).

    target (m, n): the matrix the layer is meant to compute at init (in ``dtype``, float32/64); c: the
    delta scale.  Each of ``config.loftq_iters`` rounds: (after the first) the frozen factors are
    re-fitted as the rank-frozen_rank SVD of target - c B A and quantized again; then the delta
    becomes the best rank-k approximation of target - Q (Q the dequantized frozen part), split as
    A = sqrt(S / c) Vh, B = U sqrt(S / c).  Works in place on layer.U, S, Vh, A, B under no_grad.
    docs/design.md "Initialisation"."""
    m, n = target.shape
    k, rf = layer.delta_rank, layer.frozen_rank
    opts = (config.quantize, config.quant_block_size, config.double_quant)
    A, B = layer.A.detach().to(dtype), layer.B.detach().to(dtype)
    for it in range(config.loftq_iters):
        if it:
            Uf, Sf, Vhf, _ = truncated_svd(torch.addmm(target, B, A, alpha=-c), rank=rf, svd=config.svd,
                                           where="loftq frozen part")
            Uf, Sf = _fit_dtype(Uf, Sf, layer.S.dtype)
            layer.S.copy_(Sf)
            layer.U = QuantizedMatrix.quantize(Uf.to(layer.S.dtype), *opts)
            layer.Vh = QuantizedMatrix.quantize(Vhf.to(layer.S.dtype), *opts)
        Uq, Sq, Vhq = layer.dequantized_factors(dtype)
        err = target - torch.mm(Uq * Sq, Vhq)
        if not bool((err != 0).any()):
            break
        Ue, Se, Vhe, _ = truncated_svd(err, rank=min(k, m, n), svd=config.svd, where="loftq quantization error")
        _, A, B, _ = _principal_split(Ue, Se, Vhe, k, "principal", scale=c, dtype=layer.S.dtype)
    layer.A.copy_(A)
    layer.B.copy_(B)


#: the LoRA scale s_L = alpha / k whose first Adam step the "auto" split matches (2: lora_alpha = 2 k,
#: the customary setting); docs/design.md "Initialisation".
AUTO_LORA_SCALE = 2.0


def _auto_split_scale(S: Tensor, m: int, n: int) -> float:
    """The delta scale c of the "auto" split of the components S (kept, all > 0) of an (m, n) matrix.

    Adam's first step moves every entry of A and B by lr (sign steps), so with the split
    A = sqrt(S / c) Vh, B = U sqrt(S / c) and scale c the delta changes by
    ||c (dB A + B dA)||_F^2 ~= lr^2 c (m + n) sum(S), and a LoRA delta of the same rank e (Kaiming A,
    E[A A^T] = I / 3, B = 0, scale s_L = AUTO_LORA_SCALE) by lr^2 s_L^2 m e / 3.  Equal when
    c = s_L^2 m e / (3 (m + n) sum(S)).  docs/design.md "Initialisation"."""
    return AUTO_LORA_SCALE ** 2 * m * S.numel() / (3.0 * (m + n) * float(S.double().sum()))


def _principal_split(U: Tensor, S: Tensor, Vh: Tensor, k: int, init: str, truncation_rank: int | None = None,
                     split_scale: float | str = "auto", scale: float | None = None,
                     dtype: torch.dtype | None = None):
    """Split SVD factors U (m, q), S (q,), Vh (q, n) into the frozen components and the delta per ``init``
    (docs/design.md "Initialisation").  The first ``truncation_rank`` (default q) components are the
    truncation; "residual" starts the delta on the ones after it.

    "principal": components [0, e), e = min(k, r), start in the delta; frozen = [e, r).
    "residual":  components [r, r + e), e = min(k, q - r), start in the delta; frozen = [0, r).
    "lora":      nothing starts in the delta; frozen = [0, r); scale c = ``scale`` (None: 1).
    Only components with sigma > 0 are moved (e counts them).  A moved component i becomes
    A[i] = sqrt(S_i / c) Vh_i, B[:, i] = U_i sqrt(S_i / c) with the delta scale c of a split init:
    ``scale`` when given, else ``split_scale`` (a number, or "auto": ``_auto_split_scale``, 1 when
    no component moves), raised if needed so that A and B fit ``dtype`` (default U's).  The other
    rows of A are Kaiming-uniform (a = sqrt(5)), divided by c for the split inits (so c dB A keeps
    LoRA's first step), and their columns of B are zero.
    Returns (frozen, A (k, n), B (m, k), c): ``frozen`` a slice of component indices, A and B in U's
    dtype, c a float.  Raises ValueError for a scale that is not a finite number > 0."""
    m, q = U.shape
    n = Vh.shape[1]
    r = q if truncation_rank is None else truncation_rank
    if init == "principal":
        src = slice(0, min(k, r))
    elif init == "residual":
        src = slice(r, r + min(k, q - r))
    else:
        src = slice(0, 0)
    moved = int((S[src] > 0).sum())  # only components with a nonzero singular value are worth moving
    src = slice(src.start, src.start + moved)
    frozen = slice(moved, r) if init == "principal" else slice(0, r)
    if scale is not None:
        c = scale
    elif init == "lora" or (split_scale == "auto" and not moved):
        c = 1.0
    elif split_scale == "auto":
        c = _auto_split_scale(S[src], m, n)
        limit = torch.finfo(dtype or U.dtype).max / 4.0  # entries of A, B and 1 / c must fit the layer's dtype
        c = max(c, float(S[src].max()) / limit / limit, 1.0 / limit)
    else:
        c = split_scale
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not (math.isfinite(c) and c > 0):
        raise ValueError(f"scale: expected a finite number > 0 for init={init!r}, got {c!r}")
    c = float(c)
    A = torch.empty(k, n, device=U.device, dtype=U.dtype)
    B = torch.zeros(m, k, device=U.device, dtype=U.dtype)
    if moved:
        root = (S[src] / c).sqrt()
        A[:moved] = root[:, None] * Vh[src]
        B[:, :moved] = U[:, src] * root[None, :]
    if moved < k:
        nn.init.kaiming_uniform_(A[moved:], a=math.sqrt(5))
        if init != "lora":
            A[moved:] /= c
    return frozen, A, B, c


def _given_factors(factors, count: int, name: str) -> list:
    """``from_dense``'s factors= argument as a list of ``count`` entries (None: all decomposed there)."""
    if factors is None:
        return [None] * count
    factors = list(factors)
    if len(factors) != count:
        raise ValueError(f"factors: {name} has {count} matrices to decompose, got {len(factors)} factor entries")
    return factors


def _check_factors(given, W: Tensor, where: str):
    """(U, S, Vh, info) of a precomputed truncation of W (m, n), checked: U (m, q), S (q,), Vh (q, n),
    0 <= info.rank <= q."""
    try:
        U, S, Vh, info = given
        r = info.rank
    except (TypeError, ValueError, AttributeError):
        raise TypeError(f"factors: expected (U, S, Vh, info) with info.rank for {where}, got "
                        f"{type(given).__name__}") from None
    m, n = W.shape
    q = S.shape[0] if isinstance(S, Tensor) and S.dim() == 1 else -1
    if not (isinstance(U, Tensor) and isinstance(Vh, Tensor) and tuple(U.shape) == (m, q)
            and tuple(Vh.shape) == (q, n) and 0 <= r <= q):
        raise ValueError(f"factors: expected U ({m}, q), S (q,), Vh (q, n = {n}) with info.rank <= q for {where}, got "
                         f"U {tuple(getattr(U, 'shape', ()))}, S {tuple(getattr(S, 'shape', ()))}, "
                         f"Vh {tuple(getattr(Vh, 'shape', ()))}, rank {r!r}")
    return U, S, Vh, info
