"""Model surgery: convert nn.Linear layers of a model to CERSA layers, report, merge back.

``convert(model, energy=0.93)`` decomposes every targeted layer first and swaps them in only when
all succeeded, so an error leaves the model exactly as it was.  Layer types are handled through
the ``CONVERTERS`` table (type -> builder) and ``UNSUPPORTED`` (type -> reason for the report).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .decompose import check_energy, check_rank
from .layers import CersaLinear

__all__ = ["ConversionReport", "LayerRecord", "ParamCount", "convert", "count_parameters", "get_report",
           "merge", "CONVERTERS", "UNSUPPORTED", "CERSA_LAYERS"]


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


@dataclass
class ConversionReport:
    """Every candidate layer of one ``convert`` call, with totals; ``print(report)`` shows a table."""

    layers: list[LayerRecord] = field(default_factory=list)
    energy: float | None = None

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


def _is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or (isinstance(m, nn.Linear) and not isinstance(
        m, nn.modules.linear.NonDynamicallyQuantizableLinear))


def _build_linear(module: nn.Linear, name: str, opts: dict) -> CersaLinear:
    return CersaLinear.from_linear(module, name=name, **opts)


#: (predicate, kind, builder(module, name, opts) -> CERSA module).  First match wins.
CONVERTERS: list[tuple[Callable[[nn.Module], bool], str, Callable]] = [
    (_is_linear, "Linear", _build_linear),
]

#: (predicate, kind, reason) for layer types that are reported and left as they are.
UNSUPPORTED: list[tuple[Callable[[nn.Module], bool], str, str]] = [
    (lambda m: type(m).__name__ == "Conv1D", "Conv1D", "transformers Conv1D is not converted yet"),
    (lambda m: isinstance(m, nn.Conv2d), "Conv2d", "nn.Conv2d is not converted yet"),
    (lambda m: isinstance(m, nn.MultiheadAttention), "MultiheadAttention",
     "nn.MultiheadAttention reads its projection weights directly, so they are not converted"),
]

#: CERSA layer classes (for idempotence, merge and I/O).
CERSA_LAYERS: tuple[type, ...] = (CersaLinear,)


def _shape(m: nn.Module) -> tuple[int, int]:
    for attr in (("out_features", "in_features"), ("out_channels", "in_channels"), ("nf", "nx")):
        if hasattr(m, attr[0]) and hasattr(m, attr[1]):
            return int(getattr(m, attr[0])), int(getattr(m, attr[1]))
    if isinstance(m, nn.MultiheadAttention):
        return m.embed_dim, m.embed_dim
    return 0, 0


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def _select(names: list[str], patterns, arg: str) -> set[str]:
    """Names matched by ``patterns``: a str is a regex (full match), a list of str each an exact
    name, a dotted suffix or a glob.  A pattern that matches nothing is an error."""
    if patterns is None:
        return set(names)
    if isinstance(patterns, str):
        try:
            rx = re.compile(patterns)
        except re.error as exc:
            raise ValueError(f"{arg}: invalid regular expression {patterns!r}: {exc}") from None
        hit = {n for n in names if rx.fullmatch(n)}
        if not hit:
            raise ValueError(f"{arg}: the regular expression {patterns!r} matches no module name")
        return hit
    if not isinstance(patterns, Iterable) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{arg}: expected None, a regex str or a list of str, got {patterns!r}")
    hit: set[str] = set()
    for p in patterns:
        found = {n for n in names if _matches(n, p)}
        if not found:
            raise ValueError(f"{arg}: the pattern {p!r} matches no module name")
        hit |= found
    return hit


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def get_report(model: nn.Module) -> ConversionReport:
    """The report of the last ``convert`` (or ``load``) on ``model``; KeyError if there was none."""
    rep = getattr(model, "cersa_report", None)
    if rep is None:
        raise KeyError("model: no CERSA conversion report; call cersa_kernels.convert(model) first")
    return rep


def convert(model: nn.Module, energy: float | None = 0.93, *, rank: int | None = None, delta_rank: int = 16,
            alpha: float | None = None, init: str = "principal", train_S: bool = False, train_bias: bool = False,
            target_modules=None, exclude=None, max_frozen_ratio: float | None = 1.0,
            backend: str | None = None, progress: bool = True) -> nn.Module:
    """Replace the model's nn.Linear layers in place by CERSA layers; returns the model.

    energy: tau in (0, 1], the fraction of each weight's ||W||_F^2 to keep (paper Sec. 3), or give
      ``rank`` (the same explicit rank for every layer; energy is then ignored).
    delta_rank, alpha, init, train_S, train_bias, backend: as ``CersaLinear.from_linear``.
    target_modules: None (every supported layer), a regex str (full match on the dotted module
      name) or a list of names / dotted suffixes / globs.  exclude: the same form, removed from the
      targets.  A pattern that matches nothing, or a targeted module of a type that cannot be
      converted, raises ValueError naming it.  With target_modules=None, unsupported layer types
      (Conv1D, Conv2d, MultiheadAttention and the projections inside it) are reported as skipped.
    max_frozen_ratio: a layer is converted only when its stored numbers r(m + n + 1) are below
      max_frozen_ratio * m n; otherwise it stays dense and is reported (None converts every layer).
    After the call only the deltas A, B (and S or bias when asked) of converted layers require
    grad; every other parameter of the model is frozen.  Converting twice changes nothing.
    The report (``get_report(model)`` or ``model.cersa_report``) lists every candidate layer.
    All decompositions run before any module is swapped: on any error the model is unchanged.
    Raises TypeError/ValueError naming the argument or the layer.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if rank is None:
        if energy is None:
            raise ValueError("energy: give energy in (0, 1] or an explicit rank=, got energy=None and rank=None")
        energy = check_energy(energy)
    else:
        energy = None
    if max_frozen_ratio is not None:
        if isinstance(max_frozen_ratio, bool) or not isinstance(max_frozen_ratio, (int, float)) \
                or not max_frozen_ratio > 0:
            raise ValueError(f"max_frozen_ratio: expected a positive number or None, got {max_frozen_ratio!r}")
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    targets = _select(names, target_modules, "target_modules")
    if exclude is not None:
        targets -= _select(names, exclude, "exclude")
    mha_children = {f"{n}.{c}" for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)
                    for c, _ in m.named_modules() if c}
    opts = dict(energy=energy, rank=rank, delta_rank=delta_rank, alpha=alpha, init=init, train_S=train_S,
                train_bias=train_bias, backend=backend)
    report = ConversionReport(energy=energy)
    todo: list[tuple[str, nn.Module, Callable, str]] = []
    for name in names:
        if name not in targets:
            continue
        mod = modules[name]
        m, n = _shape(mod)
        if isinstance(mod, CERSA_LAYERS):
            report.layers.append(LayerRecord(name, type(mod).__name__, m, n, "already converted",
                                             rank=mod.rank, frozen_rank=mod.frozen_rank, delta_rank=mod.delta_rank,
                                             energy=mod.energy, params_before=m * n))
            continue
        explicit = target_modules is not None
        if name in mha_children:
            if explicit:
                raise ValueError(f"target_modules: {name!r} is a projection inside nn.MultiheadAttention, "
                                 f"which reads its weights directly; it cannot be converted")
            report.layers.append(LayerRecord(name, type(mod).__name__, m, n, "dense",
                                             "inside nn.MultiheadAttention (weights read directly)",
                                             params_before=m * n))
            continue
        conv = next((c for c in CONVERTERS if c[0](mod)), None)
        if conv is not None:
            todo.append((name, mod, conv[2], conv[1]))
            continue
        unsup = next((u for u in UNSUPPORTED if u[0](mod)), None)
        if unsup is not None:
            if explicit:
                raise ValueError(f"target_modules: {name!r} is a {type(mod).__name__}, which cannot be "
                                 f"converted: {unsup[2]}")
            report.layers.append(LayerRecord(name, unsup[1], m, n, "dense", unsup[2], params_before=m * n))
        elif explicit and not any(True for _ in mod.children()):
            raise ValueError(f"target_modules: {name!r} is a {type(mod).__name__}; supported types: "
                             f"{', '.join(c[1] for c in CONVERTERS)}")
        elif explicit and isinstance(target_modules, (list, tuple)) and any(name == p for p in target_modules):
            raise ValueError(f"target_modules: {name!r} is a {type(mod).__name__} container, not a layer; "
                             f"supported types: {', '.join(c[1] for c in CONVERTERS)}")
    # Phase 1: decompose everything (no change to the model yet).
    built: list[tuple[str, nn.Module]] = []
    if rank is not None:
        for name, mod, _, _ in todo:
            m, n = _shape(mod)
            check_rank(rank, min(m, n), where=f" ({name}: {m} x {n})")
    for name, mod, build, kind in tqdm(todo, desc="CERSA convert", unit="layer", disable=not progress or not todo):
        new = build(mod, name, opts)
        m, n = _shape(mod)
        stored_frozen = new.rank * (m + n + 1)
        rec = LayerRecord(name, kind, m, n, "converted", rank=new.rank, frozen_rank=new.frozen_rank,
                          delta_rank=new.delta_rank, energy=new.energy, params_before=m * n,
                          params_after=new.frozen_rank * (m + n + 1) + new.delta_rank * (m + n))
        if max_frozen_ratio is not None and stored_frozen >= max_frozen_ratio * m * n:
            rec.status = "dense"
            rec.reason = (f"no saving: rank {new.rank} stores r(m+n+1) = {stored_frozen:,} >= "
                          f"{max_frozen_ratio:g} x {m * n:,}")
            rec.params_after = 0
            report.layers.append(rec)
            continue
        report.layers.append(rec)
        built.append((name, new))
    # Phase 2: swap and freeze.
    for name, new in built:
        _set_module(model, name, new)
    cersa_params = set()
    for mod in model.modules():
        if isinstance(mod, CERSA_LAYERS):
            cersa_params.update(id(p) for p in mod.parameters() if p.requires_grad)
    for p in model.parameters():
        if id(p) not in cersa_params:
            p.requires_grad_(False)
    order = {n: i for i, n in enumerate(names)}
    report.layers.sort(key=lambda l: order.get(l.name, 0))
    model.cersa_report = report
    return model


def merge(model: nn.Module) -> nn.Module:
    """Replace every CERSA layer by the dense layer it computes (``layer.merge()``), in place; returns
    the model.  The merged weight U diag(S) Vh + scale B A is formed in float32 or higher and rounded
    once to the layer's dtype."""
    if isinstance(model, CERSA_LAYERS):
        raise TypeError("model: expected a model containing CERSA layers, got a CERSA layer itself; "
                        "call layer.merge() instead")
    for name, mod in list(model.named_modules()):
        if name and isinstance(mod, CERSA_LAYERS):
            _set_module(model, name, mod.merge())
    if hasattr(model, "cersa_report"):
        del model.cersa_report
    return model
