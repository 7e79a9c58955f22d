"""The conversion report and parameter counts.

``ConversionReport`` lists every candidate layer of one ``convert`` (or ``load``) with its rank,
retained energy and stored numbers; ``count_parameters`` counts a model's trainable and frozen
parameters and their bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["LayerRecord", "ConversionReport", "ParamCount", "count_parameters", "get_report", "record_of"]


@dataclass
class LayerRecord:
    """One row of the conversion report.

    status: "converted", "dense" (left as it was: no memory saving, or an excluded/unsupported
    type), "already converted".  params_before: dense weight numbers m*n (bias excluded);
    params_after: stored frozen + delta numbers r'(m + n + 1) + k(m + n) (bias excluded).
    """

    name: str
    kind: str
    out_features: int
    in_features: int
    status: str
    reason: str = ""
    rank: int | None = None
    frozen_rank: int | None = None
    delta_rank: int | None = None
    energy: float | None = None
    params_before: int = 0
    params_after: int = 0
    #: bytes of the dense weight (m n in the layer's dtype) and of the stored frozen factors U, S, Vh
    #: (codes and scales when quantized); 0 where not converted.
    dense_bytes: int = 0
    frozen_bytes: int = 0


@dataclass
class ConversionReport:
    """Every candidate layer of one ``convert`` call, with totals; ``print(report)`` shows a table."""

    layers: list[LayerRecord] = field(default_factory=list)
    energy: float | None = None
    #: rank policy of the call: {"budget", "max_rank", "rank_multiple", "svd"} and, with a budget, the
    #: comparison with per-layer energy at the same size (see ``convert``'s docstring).
    policy: dict = field(default_factory=dict)

    @property
    def converted(self) -> list[LayerRecord]:
        return [l for l in self.layers if l.status == "converted"]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [l for l in self.layers if l.status != "converted"]

    @property
    def params_before(self) -> int:
        return sum(l.params_before for l in self.converted)

    @property
    def params_after(self) -> int:
        return sum(l.params_after for l in self.converted)

    def __str__(self) -> str:
        head = ("layer", "type", "shape (out x in)", "rank", "frozen", "delta", "energy", "before", "after",
                "ratio", "status")
        rows = []
        for l in self.layers:
            ratio = f"{l.params_after / l.params_before:.3f}" if l.status == "converted" and l.params_before else ""
            rows.append((l.name, l.kind, f"{l.out_features} x {l.in_features}",
                         "" if l.rank is None else str(l.rank),
                         "" if l.frozen_rank is None else str(l.frozen_rank),
                         "" if l.delta_rank is None else str(l.delta_rank),
                         "" if l.energy is None else f"{l.energy:.4f}",
                         f"{l.params_before:,}", f"{l.params_after:,}" if l.status == "converted" else "",
                         ratio, l.status + (f": {l.reason}" if l.reason else "")))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        b, a = self.params_before, self.params_after
        lines.append(f"converted {len(self.converted)} of {len(self.layers)} layers"
                     + (f" at energy {self.energy}" if self.energy is not None else "")
                     + f"; weight numbers {b:,} -> {a:,}" + (f" ({a / b:.3f}x)" if b else ""))
        db, fb = sum(l.dense_bytes for l in self.converted), sum(l.frozen_bytes for l in self.converted)
        if db:
            lines.append(f"frozen factor bytes of the converted layers: {fb / 2**20:.3f} MiB vs dense "
                         f"{db / 2**20:.3f} MiB ({fb / db:.3f}x)")
        pol = self.policy
        if pol.get("budget") is not None and "budget_mean_energy" in pol:
            lines.append(
                f"budget {pol['budget']:g} of the dense frozen numbers: rank-r factors store {pol['stored']:,} of "
                f"{pol['allowed']:,} allowed; mean layer energy {pol['budget_mean_energy']:.4f} (min "
                f"{pol['budget_min_energy']:.4f}) vs one energy for every layer at the same size: tau "
                f"{pol['uniform_energy']:.4f}, mean {pol['uniform_mean_energy']:.4f} (min "
                f"{pol['uniform_min_energy']:.4f}), storing {pol['uniform_stored']:,}")
        extra = [f"{k}={pol[k]}" for k in ("max_rank", "rank_multiple") if pol.get(k) is not None]
        if extra:
            lines.append("rank policy: " + ", ".join(extra))
        return "\n".join(lines)


@dataclass
class ParamCount:
    """Trainable vs frozen parameters of a model: counts and bytes (each tensor's own element size)."""

    trainable: int
    frozen: int
    trainable_bytes: int
    frozen_bytes: int

    def __str__(self) -> str:
        tot = self.trainable + self.frozen
        pct = 100.0 * self.trainable / tot if tot else 0.0
        return (f"trainable {self.trainable:,} ({pct:.2f}%, {self.trainable_bytes / 2**20:.2f} MiB), "
                f"frozen {self.frozen:,} ({self.frozen_bytes / 2**20:.2f} MiB)")


def count_parameters(model: nn.Module) -> ParamCount:
    """Count the model's parameters (shared ones once) by requires_grad, with their bytes."""
    seen: set[int] = set()
    t = f = tb = fb = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        if p.requires_grad:
            t, tb = t + p.numel(), tb + nbytes
        else:
            f, fb = f + p.numel(), fb + nbytes
    return ParamCount(t, f, tb, fb)


def record_of(name: str, module: nn.Module, status: str = "converted", reason: str = "",
              kind: str | None = None) -> LayerRecord:
    """The report row of CERSA module ``module`` (a registered layer type) under ``name``; kind:
    the report's type column (default: the dense kind the module replaces)."""
    after = module.stored_numbers()[1] if status == "converted" else 0
    dense_bytes = module.dense_numbers() * module.parts()[0].S.element_size()
    return LayerRecord(name, kind or module.kind, module.out_features, module.in_features, status, reason,
                       dense_bytes=dense_bytes, frozen_bytes=module.frozen_nbytes() if status == "converted" else 0, rank=module.rank, frozen_rank=module.frozen_rank,
                       delta_rank=module.delta_rank, energy=module.energy, params_before=module.dense_numbers(),
                       params_after=after)


def get_report(model: nn.Module) -> ConversionReport:
    """The report of the last ``convert`` (or ``load``) on ``model``; KeyError if there was none."""
    rep = getattr(model, "cersa_report", None)
    if rep is None:
        raise KeyError("model: no CERSA conversion report; call cersa_kernels.convert(model) first")
    return rep
