"""``CersaConfig``: the rank policy and delta options of a conversion, validated once.

``cersa_kernels.convert(model, energy=0.93, ...)`` and ``plan`` build one from their keywords; the
layer builders (``CersaLinear.from_linear`` and the other ``from_*``) take one or the same keywords.
A new conversion option is one field here (with its check in ``__post_init__``); every builder
receives it through the object.  The math of each option: docs/design.md "Rank policies" and "Initialisation".
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .backends import check_backend_name
from .decompose import check_energy, check_svd
from .quant import check_block_size, check_quantize

__all__ = ["CersaConfig", "INITS", "SPLIT_INITS", "QUANT_INITS"]

#: values of ``init``: "principal" (the top min(k, r) retained components start in the delta, as
#: PiSSA), "lora" (A Kaiming-uniform, B zero) and "residual" (the truncation stays frozen; the delta
#: starts on the next k singular components of W beyond it).  docs/design.md "Initialisation".
INITS = ("principal", "lora", "residual")
#: the inits whose delta starts on singular components, split A = sqrt(S / c) Vh, B = U sqrt(S / c)
#: with the delta scale s = c (``split_scale``).
SPLIT_INITS = ("principal", "residual")
#: values of ``quant_init``: None (the delta starts as ``init`` says) or "loftq" (the delta also
#: absorbs the quantization error of the frozen factors).  docs/design.md "Initialisation".
QUANT_INITS = (None, "loftq")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class CersaConfig:
    """How each weight is truncated and what is trained on top (immutable; checked when made).

    Rank policy (exactly one of energy / rank / budget decides the ranks):
      energy: tau in (0, 1], the fraction of each weight's ||W||_F^2 its factors keep (default 0.93);
        must be None when ``rank`` or ``budget`` is given.
      rank: one explicit rank r for every weight (checked against each weight's min(m, n) when it
        is decomposed).
      budget: a fraction > 0 of the dense frozen numbers sum m n of the target layers that all
        truncations may store together, allocated greedily by energy gained per stored number.
      max_rank: an upper limit on every rank (int >= 0), applied last.
      rank_multiple: ranks rounded up to a multiple of this (int >= 1), at most min(m, n).
      max_frozen_ratio: a layer converts only when its factors store fewer than this times m n
        numbers (a number > 0; None converts every layer).
      svd: "auto", "full" or "randomized" (see ``cersa_kernels.decompose.truncated_svd``).
    Delta options:
      delta_rank: k >= 1, the rank of the trainable delta B A.
      alpha: LoRA-style scale numerator, scale = alpha / k (None: scale 1); only with init="lora".
      init: "principal", "lora" or "residual" (INITS).
      split_scale: the delta scale c of the "principal" / "residual" split, A = sqrt(S / c) Vh,
        B = U sqrt(S / c), s = c (s B A is the same for every c; Adam's step on s B A grows as
        sqrt(c)): "auto" (default; per layer, so that the first Adam step changes s B A about as
        much as a LoRA delta of the same rank with scale 2, lora_alpha = 2 k, does) or a number > 0
        (1.0: PiSSA's split).
        Used only by those two inits.
      train_S, train_bias: make S / the bias trainable too.
      backend: None (automatic) or a backend name of ``cersa_kernels.backends.BACKENDS``.
    Factor storage:
      quantize: None (U and Vh in the layer's dtype), "int8" or "nf4" (blockwise codes with absmax
        scales; S, the delta and the bias stay in their dtype).  docs/design.md "Quantized factors".
      quant_block_size: numbers per absmax block, a power of two >= 2 (default 64).
      double_quant: quantize the block scales again (int8 in blocks of 256; nf4: 4.13 bits per number).
      quant_init: None or "loftq" (default): with quantize, the delta starts from the best rank-k
        approximation of (intended matrix - the matrix of the dequantized frozen factors), so it absorbs
        the quantization error as LoftQ does; ignored without quantize.
      loftq_iters: LoftQ's alternating steps (int >= 1, default 1): each re-fits the frozen factors to
        (intended - delta), quantizes them, and re-fits the delta.
    Raises TypeError / ValueError naming the field, the expected and the received value.
    """

    energy: float | None = 0.93
    rank: int | None = None
    budget: float | None = None
    max_rank: int | None = None
    rank_multiple: int | None = None
    max_frozen_ratio: float | None = 1.0
    svd: str = "auto"
    delta_rank: int = 16
    alpha: float | None = None
    init: str = "principal"
    train_S: bool = False
    train_bias: bool = False
    backend: str | None = None
    quantize: str | None = None
    quant_block_size: int = 64
    double_quant: bool = False
    split_scale: float | str = "auto"
    quant_init: str | None = "loftq"
    loftq_iters: int = 1

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.budget is not None:
            if self.rank is not None or self.energy is not None:
                raise ValueError(f"budget: give budget= alone (the ranks follow from it), got budget={self.budget!r}, "
                                 f"rank={self.rank!r} and energy={self.energy!r}")
            if not _is_real(self.budget) or math.isnan(self.budget) or not self.budget > 0:
                raise ValueError(f"budget: expected a fraction > 0 of the dense frozen parameters, got "
                                 f"{self.budget!r}")
            set_("budget", float(self.budget))
        elif self.rank is None and self.energy is None:
            raise ValueError("energy: give energy in (0, 1] or an explicit rank=, got energy=None and rank=None")
        elif self.rank is not None and self.energy is not None:
            raise ValueError(f"energy: give exactly one of energy= and rank=, got energy={self.energy!r}, "
                             f"rank={self.rank!r}")
        elif self.energy is not None:
            set_("energy", check_energy(self.energy))
        if self.max_rank is not None and (not _is_int(self.max_rank) or self.max_rank < 0):
            raise ValueError(f"max_rank: expected a non-negative int or None, got {self.max_rank!r}")
        if self.rank_multiple is not None and (not _is_int(self.rank_multiple) or self.rank_multiple < 1):
            raise ValueError(f"rank_multiple: expected a positive int or None, got {self.rank_multiple!r}")
        if self.max_frozen_ratio is not None and (not _is_real(self.max_frozen_ratio)
                                                  or not self.max_frozen_ratio > 0):
            raise ValueError(f"max_frozen_ratio: expected a positive number or None, got {self.max_frozen_ratio!r}")
        check_svd(self.svd)
        if not _is_int(self.delta_rank):
            raise TypeError(f"delta_rank: expected a positive int, got {type(self.delta_rank).__name__} "
                            f"{self.delta_rank!r}")
        if self.delta_rank <= 0:
            raise ValueError(f"delta_rank: expected a positive int, got {self.delta_rank}")
        if self.init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {self.init!r}")
        if self.alpha is not None and (not _is_real(self.alpha) or not math.isfinite(self.alpha)):
            raise TypeError(f"alpha: expected a finite real number or None, got {type(self.alpha).__name__} "
                            f"{self.alpha!r}")
        if self.init in SPLIT_INITS and self.alpha is not None:
            raise ValueError(f"alpha: init={self.init!r} sets the scale itself (split_scale); got alpha={self.alpha!r} "
                             f"with delta_rank={self.delta_rank}, i.e. scale {self.alpha / self.delta_rank}; "
                             f"use init='lora' or alpha=None")
        if isinstance(self.split_scale, str):
            if self.split_scale != "auto":
                raise ValueError(f"split_scale: expected 'auto' or a number > 0, got {self.split_scale!r}")
        elif not _is_real(self.split_scale):
            raise TypeError(f"split_scale: expected 'auto' or a number > 0, got {type(self.split_scale).__name__} "
                            f"{self.split_scale!r}")
        elif not (math.isfinite(self.split_scale) and self.split_scale > 0):
            raise ValueError(f"split_scale: expected 'auto' or a finite number > 0, got {self.split_scale!r}")
        else:
            set_("split_scale", float(self.split_scale))
        if self.quant_init not in QUANT_INITS:
            raise ValueError(f"quant_init: expected one of {QUANT_INITS}, got {self.quant_init!r}")
        if not _is_int(self.loftq_iters):
            raise TypeError(f"loftq_iters: expected an int >= 1, got {type(self.loftq_iters).__name__} "
                            f"{self.loftq_iters!r}")
        if self.loftq_iters < 1:
            raise ValueError(f"loftq_iters: expected an int >= 1, got {self.loftq_iters}")
        check_backend_name(self.backend)
        check_quantize(self.quantize)
        check_block_size(self.quant_block_size)
        set_("double_quant", bool(self.double_quant))
        set_("train_S", bool(self.train_S))
        set_("train_bias", bool(self.train_bias))

    @property
    def extra_components(self) -> int:
        """How many singular components beyond each layer's truncation rank the init needs from the
        decomposition (passed to ``from_factors`` after the truncation's r, with truncation_rank=r):
        delta_rank for "residual" (its delta starts on the k components after the truncation), 0 for
        "principal" and "lora" (delta inside the truncation or at zero)."""
        return self.delta_rank if self.init == "residual" else 0

    def truncation_request(self, planned_rank: int | None = None) -> tuple[float | None, int | None]:
        """(energy, rank) of one matrix's truncated SVD (``decompose.truncated_svd``'s energy= and
        rank=): the rank planned for it (a budget's or a layer's own, when not None), else this
        config's fixed ``rank``, else None with this config's ``energy`` (the smallest rank keeping
        that fraction of sum S_i^2; docs/design.md "Rank policies")."""
        rank = planned_rank if planned_rank is not None else self.rank
        return (self.energy if rank is None else None), rank

    @property
    def scale(self) -> float:
        """The delta scale s = alpha / delta_rank (1.0 without alpha) of init="lora"; the split inits
        ("principal", "residual") choose theirs per layer (``split_scale``)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.delta_rank

    def replace(self, **changes) -> "CersaConfig":
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def make(cls, config: "CersaConfig | None" = None, /, **options) -> "CersaConfig":
        """``config`` with ``options`` applied, or a new config from ``options`` alone.  Raises
        TypeError naming an unknown option."""
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config: expected a CersaConfig or None, got {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unexpected option(s) {unknown}; CersaConfig fields: {sorted(names)}")
        if config is None:
            return cls(**options)
        return config.replace(**options) if options else config
