"""Model surgery: convert a model's layers to CERSA layers, report, plan, merge back.

``convert(model, energy=0.93)`` decomposes every targeted layer first and swaps them in only when
all succeeded, so an error leaves the model exactly as it was.  Layer types are handled through
the ``CONVERTERS`` table (predicate, kind, builder) and ``UNSUPPORTED`` (predicate, kind, reason
for the report).  Converted: nn.Linear, transformers' Conv1D, nn.Conv2d (groups=1),
nn.MultiheadAttention (packed projections).  ``plan(model, ...)`` computes the ranks and sizes
convert would choose, for several energies or a budget, without changing the model.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from torch import Tensor

from .decompose import (allocate_budget, check_energy, check_rank, check_svd, energy_rank, round_rank,
                        singular_values, truncated_svd, uniform_energy_for_budget, AUTO_RANDOMIZED_MIN_DIM)
from .layers import (CersaConv1D, CersaConv2d, CersaLinear, CersaMultiheadAttention, _check_delta_opts,
                     is_hf_conv1d, mha_unsupported_reason)

__all__ = ["ConversionReport", "LayerRecord", "ParamCount", "Plan", "convert", "count_parameters", "get_report",
           "merge", "plan", "cersa_modules", "CONVERTERS", "UNSUPPORTED", "CERSA_LAYERS"]


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


def _is_linear(m: nn.Module) -> bool:
    """nn.Linear, or a subclass that keeps nn.Linear's forward (a subclass with its own forward would
    lose its behaviour when replaced; it is reported instead)."""
    return type(m) is nn.Linear or (isinstance(m, nn.Linear) and not isinstance(
        m, nn.modules.linear.NonDynamicallyQuantizableLinear) and type(m).forward is nn.Linear.forward)


def _build_linear(module: nn.Linear, name: str, opts: dict) -> CersaLinear:
    return CersaLinear.from_linear(module, name=name, **opts)


def _build_conv1d(module: nn.Module, name: str, opts: dict) -> CersaConv1D:
    return CersaConv1D.from_conv1d(module, name=name, **opts)


def _build_conv2d(module: nn.Conv2d, name: str, opts: dict) -> CersaConv2d:
    return CersaConv2d.from_conv2d(module, name=name, **opts)


def _build_mha(module: nn.MultiheadAttention, name: str, opts: dict) -> CersaMultiheadAttention:
    return CersaMultiheadAttention.from_mha(module, name=name, **opts)


def _is_conv2d(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == 1


def _is_mha(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) and not mha_unsupported_reason(m)


#: (predicate, kind, builder(module, name, opts) -> CERSA module).  First match wins.  opts holds
#: energy, rank, delta_rank, alpha, init, train_S, train_bias, backend, svd (and out_rank for
#: MultiheadAttention: the rank of out_proj when rank= is the in_proj's).
CONVERTERS: list[tuple[Callable[[nn.Module], bool], str, Callable]] = [
    (_is_linear, "Linear", _build_linear),
    (is_hf_conv1d, "Conv1D", _build_conv1d),
    (_is_conv2d, "Conv2d", _build_conv2d),
    (_is_mha, "MultiheadAttention", _build_mha),
]

#: (predicate, kind, reason) for layer types that are reported and left as they are.  A reason may
#: be a callable (module -> str).
UNSUPPORTED: list[tuple[Callable[[nn.Module], bool], str, object]] = [
    (lambda m: isinstance(m, nn.Conv2d) and m.groups > 1, "Conv2d",
     lambda m: (f"depthwise convolution (groups={m.groups} = in_channels)" if m.groups == m.in_channels
                else f"grouped convolution (groups={m.groups})") + ": only groups=1 is decomposed"),
    (lambda m: isinstance(m, nn.MultiheadAttention), "MultiheadAttention", mha_unsupported_reason),
    (lambda m: isinstance(m, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                              nn.ConvTranspose3d)), "Conv", lambda m: f"{type(m).__name__} is not supported"),
    (lambda m: isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear), "Linear",
     "NonDynamicallyQuantizableLinear outside nn.MultiheadAttention is not converted"),
    (lambda m: isinstance(m, nn.Linear) and not _is_linear(m), "Linear",
     lambda m: f"{type(m).__name__} overrides nn.Linear.forward; replacing it would lose that behaviour"),
]

#: CERSA layer classes (for idempotence, merge and I/O).
CERSA_LAYERS: tuple[type, ...] = (CersaLinear, CersaConv2d, CersaMultiheadAttention)


def _reason(reason, mod) -> str:
    return reason(mod) if callable(reason) else reason


def _matrices(mod: nn.Module) -> list[tuple[str, Tensor]]:
    """The (label, 2-D (out, in) weight) pairs a converter decomposes, one rank each."""
    if isinstance(mod, nn.MultiheadAttention):
        return [("in_proj_weight", mod.in_proj_weight), ("out_proj.weight", mod.out_proj.weight)]
    if is_hf_conv1d(mod):
        return [("weight", mod.weight.T)]
    if isinstance(mod, nn.Conv2d):
        return [("weight", mod.weight.reshape(mod.weight.shape[0], -1))]
    return [("weight", mod.weight)]


def _parts(new: nn.Module) -> list[nn.Module]:
    """The CersaLinear-like parts of a CERSA module (two for attention)."""
    if isinstance(new, CersaMultiheadAttention):
        return [new.in_proj, new.out_proj]
    return [new]


def _stored(new: nn.Module) -> tuple[int, int]:
    """(frozen numbers of the rank-r truncation r (m+n+1), stored frozen + delta numbers) of a CERSA
    module, biases excluded."""
    trunc = after = 0
    for p in _parts(new):
        m, n = p.out_features, p.in_features
        trunc += p.rank * (m + n + 1)
        after += p.frozen_rank * (m + n + 1) + p.delta_rank * (m + n)
    return trunc, after


def _shape(m: nn.Module) -> tuple[int, int]:
    """(out, in) of the matrix a layer is read as: Conv2d (out, in/groups * kh * kw); Conv1D (nf, nx);
    MultiheadAttention (embed_dim, embed_dim); CERSA layers their out_features / in_features."""
    if isinstance(m, nn.Conv2d):
        return int(m.weight.shape[0]), int(m.weight[0].numel())
    if isinstance(m, nn.MultiheadAttention):
        return m.embed_dim, m.embed_dim
    for attr in (("out_features", "in_features"), ("nf", "nx"), ("out_channels", "in_channels")):
        if hasattr(m, attr[0]) and hasattr(m, attr[1]):
            return int(getattr(m, attr[0])), int(getattr(m, attr[1]))
    return 0, 0


def _dense_numbers(mod: nn.Module) -> int:
    if isinstance(mod, CersaMultiheadAttention):
        return sum(p.out_features * p.in_features for p in _parts(mod))
    if isinstance(mod, CERSA_LAYERS):
        return mod.out_features * mod.in_features
    try:
        return sum(W.numel() for _, W in _matrices(mod))
    except AttributeError:
        m, n = _shape(mod)
        return m * n


def cersa_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{dotted name: module} of the CERSA layers of ``model`` that are not inside another CERSA layer
    (a converted attention's in_proj / out_proj belong to it)."""
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if name and isinstance(mod, CERSA_LAYERS) and not any(name.startswith(p + ".") for p in out):
            out[name] = mod
    return out


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


def _check_policies(max_rank, rank_multiple, budget, svd, max_frozen_ratio) -> None:
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 0):
        raise ValueError(f"max_rank: expected a non-negative int or None, got {max_rank!r}")
    if rank_multiple is not None and (isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int)
                                      or rank_multiple < 1):
        raise ValueError(f"rank_multiple: expected a positive int or None, got {rank_multiple!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not budget > 0 or budget != budget):
        raise ValueError(f"budget: expected a fraction > 0 of the dense frozen parameters, got {budget!r}")
    check_svd(svd)
    if max_frozen_ratio is not None:
        if isinstance(max_frozen_ratio, bool) or not isinstance(max_frozen_ratio, (int, float)) \
                or not max_frozen_ratio > 0:
            raise ValueError(f"max_frozen_ratio: expected a positive number or None, got {max_frozen_ratio!r}")


def _collect(model: nn.Module, target_modules, exclude, report: "ConversionReport"):
    """Candidate layers: returns todo [(name, module, builder, kind)] and fills ``report`` with the
    rows of layers left as they are (already converted, unsupported).  Raises ValueError for an
    explicitly targeted layer that cannot be converted."""
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    targets = _select(names, target_modules, "target_modules")
    if exclude is not None:
        targets -= _select(names, exclude, "exclude")
    explicit = target_modules is not None
    cersa_inside = {n for c in cersa_modules(model) for n in names if n.startswith(c + ".")}
    mha_names = [n for n, m in modules.items() if n and isinstance(m, nn.MultiheadAttention)]
    todo: list[tuple[str, nn.Module, Callable, str]] = []
    for name in names:
        if name not in targets or name in cersa_inside:
            continue
        mod = modules[name]
        m, n = _shape(mod)
        if isinstance(mod, CERSA_LAYERS):
            report.layers.append(LayerRecord(name, type(mod).__name__, m, n, "already converted",
                                             rank=mod.rank, frozen_rank=mod.frozen_rank, delta_rank=mod.delta_rank,
                                             energy=mod.energy, params_before=_dense_numbers(mod)))
            continue
        parent = next((p for p in mha_names if name.startswith(p + ".")), None)
        if parent is not None:
            if explicit and parent not in targets:
                raise ValueError(f"target_modules: {name!r} is a projection inside nn.MultiheadAttention "
                                 f"{parent!r}, which reads its weights directly; target {parent!r} itself "
                                 f"(its in_proj and out_proj are converted together)")
            continue  # converted (or reported) with its attention module
        conv = next((c for c in CONVERTERS if c[0](mod)), None)
        if conv is not None:
            todo.append((name, mod, conv[2], conv[1]))
            continue
        unsup = next((u for u in UNSUPPORTED if u[0](mod)), None)
        if unsup is not None:
            why = _reason(unsup[2], mod)
            if explicit:
                raise ValueError(f"target_modules: {name!r} is a {type(mod).__name__}, which cannot be "
                                 f"converted: {why}")
            report.layers.append(LayerRecord(name, unsup[1], m, n, "dense", why, params_before=_dense_numbers(mod)))
        elif explicit and not any(True for _ in mod.children()):
            raise ValueError(f"target_modules: {name!r} is a {type(mod).__name__}; supported types: "
                             f"{', '.join(c[1] for c in CONVERTERS)}")
        elif explicit and isinstance(target_modules, (list, tuple)) and any(name == p for p in target_modules):
            raise ValueError(f"target_modules: {name!r} is a {type(mod).__name__} container, not a layer; "
                             f"supported types: {', '.join(c[1] for c in CONVERTERS)}")
    return todo, names


def _break_even_cap(m: int, n: int, max_frozen_ratio) -> int:
    """Largest r with r (m + n + 1) < max_frozen_ratio * m n (min(m, n) when no ratio is set)."""
    p = min(m, n)
    if max_frozen_ratio is None:
        return p
    lim = max_frozen_ratio * m * n / (m + n + 1)
    r = int(lim)
    if r >= lim:
        r -= 1
    return max(0, min(p, r))


def _budget_cap(m: int, n: int, max_frozen_ratio, max_rank, rank_multiple) -> int:
    """Per-layer rank cap under a budget: the break-even rank, max_rank, rounded down to a multiple of
    rank_multiple unless it is min(m, n)."""
    cap = _break_even_cap(m, n, max_frozen_ratio)
    if max_rank is not None:
        cap = min(cap, max_rank)
    if rank_multiple and cap < min(m, n):
        cap = cap // rank_multiple * rank_multiple
    return cap


def _resolve_svd(svd: str, p: int, energy) -> str:
    if svd != "auto":
        return svd
    return "randomized" if p >= AUTO_RANDOMIZED_MIN_DIM and (energy is None or energy < 1.0) else "full"


def _plan_ranks(todo, *, energy, rank, budget, max_rank, rank_multiple, max_frozen_ratio, svd, progress=None):
    """Per candidate, the list of ranks of its matrices (None: let the builder find the energy rank),
    and the policy summary (budget comparison)."""
    policy: dict = {"budget": budget, "max_rank": max_rank, "rank_multiple": rank_multiple, "svd": svd}
    mats = [[W for _, W in _matrices(mod)] for _, mod, _, _ in todo]
    if rank is not None:
        for (name, mod, _, _), Ws in zip(todo, mats):
            for W in Ws:
                check_rank(rank, min(W.shape), where=f" ({name}: {W.shape[0]} x {W.shape[1]})")
        return [[round_rank(rank, min(W.shape), cap=max_rank, multiple=rank_multiple) for W in Ws]
                for Ws in mats], policy
    if budget is None and max_rank is None and rank_multiple is None:
        return [[None] * len(Ws) for Ws in mats], policy
    flat = [(name, W) for (name, _, _, _), Ws in zip(todo, mats) for W in Ws]
    if budget is None:  # energy rank, then the cap / rounding
        ranks = []
        for name, W in flat:
            if progress is not None:
                progress(name)
            p = min(W.shape)
            if _resolve_svd(svd, p, energy) == "full":
                r = energy_rank(singular_values(W, name), energy)
            else:
                r = truncated_svd(W, energy=energy, where=name, svd="randomized")[3].rank
            ranks.append(round_rank(r, p, cap=max_rank, multiple=rank_multiple))
    else:
        spectra, shapes, caps = [], [], []
        for name, W in flat:
            if progress is not None:
                progress(name)
            spectra.append(singular_values(W, name))
            m, n = W.shape
            shapes.append((m, n))
            caps.append(_budget_cap(m, n, max_frozen_ratio, max_rank, rank_multiple))
        alloc = allocate_budget(spectra, shapes, budget, caps=caps, multiple=rank_multiple)
        ranks = alloc.ranks
        tau, uranks, ustored = uniform_energy_for_budget(spectra, shapes, alloc.stored, caps=caps,
                                                         multiple=rank_multiple)
        uen = [float(energy_rank_fraction(S, r)) for S, r in zip(spectra, uranks)]
        policy.update(stored=alloc.stored, allowed=alloc.budget, budget_mean_energy=alloc.mean_energy,
                      budget_min_energy=min(alloc.energies) if alloc.energies else 0.0,
                      uniform_energy=tau, uniform_stored=ustored,
                      uniform_mean_energy=sum(uen) / len(uen) if uen else 0.0,
                      uniform_min_energy=min(uen) if uen else 0.0,
                      uniform_ranks=dict(zip((n for n, _ in flat), uranks)),
                      spectra=dict(zip((n for n, _ in flat), spectra)))
    out, i = [], 0
    for Ws in mats:
        out.append(ranks[i:i + len(Ws)])
        i += len(Ws)
    return out, policy


def energy_rank_fraction(S: Tensor, r: int) -> float:
    """sum_{i<=r} S_i^2 / sum S^2 for a full spectrum S (0.0 when all zero)."""
    s2 = S.detach().to(torch.float64).square()
    tot = float(s2.sum())
    return float(s2[:r].sum()) / tot if tot > 0 else 0.0


def _disable_fast_paths(model: nn.Module) -> None:
    """PyTorch's fused inference paths of nn.TransformerEncoder(Layer) read raw weights (linear1.weight,
    self_attn.in_proj_weight, ...) that CERSA layers do not have: turn them off where a CERSA layer sits."""
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoderLayer) and any(isinstance(c, CERSA_LAYERS) for c in mod.modules()):
            mod.activation_relu_or_gelu = False  # only read by the fast-path check
        if isinstance(mod, nn.TransformerEncoder) and any(isinstance(c, CERSA_LAYERS) for c in mod.modules()):
            mod.use_nested_tensor = False


def convert(model: nn.Module, energy: float | None = 0.93, *, rank: int | None = None, delta_rank: int = 16,
            alpha: float | None = None, init: str = "principal", train_S: bool = False, train_bias: bool = False,
            target_modules=None, exclude=None, max_frozen_ratio: float | None = 1.0,
            backend: str | None = None, progress: bool = True, budget: float | None = None,
            max_rank: int | None = None, rank_multiple: int | None = None, svd: str = "auto") -> nn.Module:
    """Replace the model's layers in place by CERSA layers; returns the model.

    Converted layer types (the CONVERTERS table): nn.Linear -> CersaLinear; transformers' Conv1D
    (GPT-2, weight (in, out)) -> CersaConv1D; nn.Conv2d with groups=1 -> CersaConv2d (W read as
    (out, in*kh*kw)); nn.MultiheadAttention with packed projections -> CersaMultiheadAttention (its
    in_proj_weight (3E, E) and out_proj (E, E) decomposed separately, attention recomputed from
    them; see DESIGN.md "Layers beyond nn.Linear").  Left as they are and reported with the reason
    (UNSUPPORTED): grouped / depthwise Conv2d, attention with kdim/vdim != embed_dim, add_bias_kv or
    add_zero_attn, other conv types.  Nothing is skipped silently.

    Rank policy (how each layer's rank r is chosen; sizes are of the rank-r truncation,
    r (m + n + 1) numbers for an (m, n) weight, DESIGN.md "Stored frozen parameters"):
      energy: tau in (0, 1], the fraction of each weight's ||W||_F^2 to keep (paper Sec. 3;
        default 0.93), layer by layer;
      rank: the same explicit rank for every weight instead (energy is then ignored);
      budget: a fraction (> 0) of the dense frozen parameters sum m n of all target layers that the
        truncations may store together; ranks are allocated across all layers greedily by energy
        gained per stored number (each layer's sigma_i^2 / ||W||_F^2 over (m + n + 1)), which
        maximises the sum of the layers' retained energy fractions (decompose.allocate_budget);
        energy and rank are then ignored.  The report compares the result with one energy for every
        layer at the same size (report.policy: mean / min layer energy of both).  Each layer's rank
        is capped at its break-even rank under max_frozen_ratio, so every layer converts (the cap
        rounded down to a multiple of rank_multiple when given);
      max_rank: an upper limit on every rank, applied after energy / rank / budget;
      rank_multiple: ranks rounded UP to a multiple of this (e.g. 8 or 16, kernel tile sizes; up so
        the energy target still holds), or down to min(m, n); with a budget the allocation runs in
        blocks of this many components.  max_rank wins over rank_multiple.
    svd: "auto" (default: randomized SVD for weights with min(m, n) >= 512 and energy < 1, else
      full), "full", or "randomized" (stops as soon as the exact retained energy reaches tau;
      decompose.randomized_svd).  The SVD runs on the weight's device (GPU when the model is there).
    delta_rank, alpha, init, train_S, train_bias, backend: as ``CersaLinear.from_linear``.
    target_modules: None (every supported layer), a regex str (full match on the dotted module
      name) or a list of names / dotted suffixes / globs.  exclude: the same form, removed from the
      targets.  A pattern that matches nothing, or a targeted module of a type that cannot be
      converted (with the reason), raises ValueError naming it; targeting a projection inside an
      nn.MultiheadAttention (instead of the attention module) too.
    max_frozen_ratio: a layer is converted only when its stored numbers r(m + n + 1) are below
      max_frozen_ratio * m n; otherwise it stays dense and is reported (None converts every layer).
    progress: a tqdm bar with the current layer's name as postfix.
    After the call only the deltas A, B (and S or bias when asked) of converted layers require
    grad; every other parameter of the model is frozen.  Converting twice changes nothing.
    PyTorch's fused inference fast paths of nn.TransformerEncoder(Layer) are turned off where a
    CERSA layer sits inside (they read raw weights).
    The report (``get_report(model)`` or ``model.cersa_report``) lists every candidate layer.
    All decompositions run before any module is swapped: on any error the model is unchanged.
    Raises TypeError/ValueError naming the argument or the layer.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if budget is not None:
        energy = None
        if rank is not None:
            raise ValueError(f"budget: give either budget= or rank=, got budget={budget!r} and rank={rank!r}")
    elif rank is None:
        if energy is None:
            raise ValueError("energy: give energy in (0, 1] or an explicit rank=, got energy=None and rank=None")
        energy = check_energy(energy)
    else:
        energy = None
    _check_policies(max_rank, rank_multiple, budget, svd, max_frozen_ratio)
    # checked here too, so that a model with nothing left to convert still refuses bad arguments
    _check_delta_opts(delta_rank, init, alpha, backend=backend)
    report = ConversionReport(energy=energy)
    todo, names = _collect(model, target_modules, exclude, report)
    opts = dict(delta_rank=delta_rank, alpha=alpha, init=init, train_S=train_S, train_bias=train_bias,
                backend=backend, svd=svd)
    bar = tqdm(total=len(todo) * (2 if budget is not None else 1), desc="CERSA convert", unit="layer",
               disable=not progress or not todo)

    def tick(name):
        bar.set_postfix_str(name, refresh=False)
        bar.update(0)

    # Phase 1: ranks (spectra when a policy needs them), then decompose (no change to the model yet).
    seen_plan: set = set()

    def plan_tick(name):
        if budget is not None and name not in seen_plan:
            seen_plan.add(name)
            bar.set_postfix_str(f"spectrum {name}", refresh=False)
            bar.update(1)

    ranks, policy = _plan_ranks(todo, energy=energy, rank=rank, budget=budget, max_rank=max_rank,
                                rank_multiple=rank_multiple, max_frozen_ratio=max_frozen_ratio, svd=svd,
                                progress=plan_tick if budget is not None else None)
    report.policy = {k: v for k, v in policy.items() if k not in ("spectra", "uniform_ranks")}
    built: list[tuple[str, nn.Module]] = []
    try:
        for (name, mod, build, kind), rk in zip(todo, ranks):
            bar.set_postfix_str(name, refresh=False)
            o = dict(opts)
            if rk[0] is None:
                o.update(energy=energy, rank=None)
            else:
                o.update(energy=None, rank=rk[0])
            if kind == "MultiheadAttention" and len(rk) > 1 and rk[1] is not None:
                o["out_rank"] = rk[1]
            new = build(mod, name, o)
            bar.update(1)
            m, n = _shape(mod)
            stored_frozen, after = _stored(new)
            dense = _dense_numbers(mod)
            rec = LayerRecord(name, kind, m, n, "converted", rank=new.rank, frozen_rank=new.frozen_rank,
                              delta_rank=new.delta_rank, energy=new.energy, params_before=dense, params_after=after)
            if max_frozen_ratio is not None and stored_frozen >= max_frozen_ratio * dense:
                rec.status = "dense"
                rec.reason = (f"no saving: rank {new.rank} stores r(m+n+1) = {stored_frozen:,} >= "
                              f"{max_frozen_ratio:g} x {dense:,}")
                rec.params_after = 0
                report.layers.append(rec)
                continue
            report.layers.append(rec)
            built.append((name, new))
    finally:
        bar.close()
    # Phase 2: swap and freeze (a module registered under several names is replaced under each).
    aliases: dict[int, list[str]] = {}
    for n, mod in model.named_modules(remove_duplicate=False):
        if n:
            aliases.setdefault(id(mod), []).append(n)
    modules = dict(model.named_modules())
    for name, new in built:
        for alias in aliases.get(id(modules[name]), [name]):
            _set_module(model, alias, new)
    _disable_fast_paths(model)
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


@dataclass
class Plan:
    """What ``convert`` would choose, per layer and per setting, computed without changing the model.

    layers: [(name, kind, m, n)] per decomposed matrix (an attention contributes two);
    spectra: {name: all singular values}; settings: list of labels ("energy 0.93", "budget 0.8");
    ranks: {label: [rank per matrix, None where the layer would stay dense]}; energies: {label: [retained fraction per matrix]};
    policies: {label: budget summary or {}}.
    """

    layers: list[tuple[str, str, int, int]]
    spectra: dict
    settings: list[str]
    ranks: dict
    energies: dict
    policies: dict
    skipped: list[LayerRecord]
    dtype_bytes: int = 4

    def stored(self, setting: str) -> int:
        """Frozen numbers of all target weights under ``setting`` (m n for a layer left dense)."""
        return sum(m * n if r is None else r * (m + n + 1)
                   for r, (_, _, m, n) in zip(self.ranks[setting], self.layers))

    def table(self) -> str:
        """Per-layer rank and memory table: one (rank, MiB) column pair per setting, then totals."""
        head = ["layer", "type", "shape"]
        for s in self.settings:
            head += [f"r @ {s}", "MiB"]
        rows = []
        mib = lambda x: f"{x * self.dtype_bytes / 2**20:.3f}"
        for i, (name, kind, m, n) in enumerate(self.layers):
            row = [name, kind, f"{m} x {n}"]
            for s in self.settings:
                r = self.ranks[s][i]
                row += (["dense", mib(m * n)] if r is None else
                        [f"{r} ({self.energies[s][i]:.3f})", mib(r * (m + n + 1))])
            rows.append(row)
        dense = sum(m * n for _, _, m, n in self.layers)
        tot = ["total", "", f"dense {mib(dense)} MiB"]
        for s in self.settings:
            st = self.stored(s)
            tot += [f"{st / dense:.3f}x dense" if dense else "", mib(st)]
        rows.append(tot)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        out.append("r @ setting: rank of the truncation (its retained energy fraction), or 'dense' when it would "
                   f"not save memory; MiB: r (m + n + 1) numbers of {self.dtype_bytes} bytes (frozen factors incl. "
                   "the principal delta; biases excluded), m n for a dense layer.")
        for s in self.settings:
            pol = self.policies.get(s) or {}
            if "budget_mean_energy" in pol:
                out.append(f"{s}: mean layer energy {pol['budget_mean_energy']:.4f} (min "
                           f"{pol['budget_min_energy']:.4f}); one energy for all layers at the same size: tau "
                           f"{pol['uniform_energy']:.4f}, mean {pol['uniform_mean_energy']:.4f} (min "
                           f"{pol['uniform_min_energy']:.4f})")
        for rec in self.skipped:
            out.append(f"not converted: {rec.name} ({rec.kind}): {rec.status}"
                       + (f": {rec.reason}" if rec.reason else ""))
        return "\n".join(out)


def plan(model: nn.Module, energies=(0.93,), *, budget: float | None = None, max_rank: int | None = None,
         rank_multiple: int | None = None, target_modules=None, exclude=None,
         max_frozen_ratio: float | None = 1.0) -> Plan:
    """The ranks and sizes ``convert`` would choose, for each energy in ``energies`` and for
    ``budget`` (when given), with the same policies (max_rank, rank_multiple, max_frozen_ratio as a
    cap under the budget); the model is not changed.  Uses the full spectrum of every target weight
    (torch.linalg.svdvals).  Raises as ``convert`` for bad arguments or targets."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    energies = [check_energy(e, "energies") for e in energies]
    if not energies and budget is None:
        raise ValueError("energies: give at least one energy or a budget")
    _check_policies(max_rank, rank_multiple, budget, "full", max_frozen_ratio)
    report = ConversionReport()
    todo, _ = _collect(model, target_modules, exclude, report)
    layers, spectra = [], {}
    for name, mod, _, kind in todo:
        mats = _matrices(mod)
        for label, W in mats:
            key = name if len(mats) == 1 else f"{name}.{label}"
            spectra[key] = singular_values(W, key).cpu()
            layers.append((key, kind, int(W.shape[0]), int(W.shape[1])))
            dtype_bytes = W.element_size()
    shapes = [(m, n) for _, _, m, n in layers]
    S_list = [spectra[k] for k, _, _, _ in layers]
    settings, ranks, ens, pols = [], {}, {}, {}
    for e in energies:
        label = f"energy {e:g}"
        rs = []
        for S, (m, n) in zip(S_list, shapes):
            r = round_rank(energy_rank(S, e), len(S), cap=max_rank, multiple=rank_multiple)
            if max_frozen_ratio is not None and r * (m + n + 1) >= max_frozen_ratio * m * n:
                r = None  # would stay dense
            rs.append(r)
        settings.append(label)
        ranks[label] = rs
        ens[label] = [1.0 if r is None else energy_rank_fraction(S, r) for S, r in zip(S_list, rs)]
        pols[label] = {}
    if budget is not None:
        label = f"budget {budget:g}"
        caps = [_budget_cap(m, n, max_frozen_ratio, max_rank, rank_multiple) for m, n in shapes]
        alloc = allocate_budget(S_list, shapes, budget, caps=caps, multiple=rank_multiple)
        tau, uranks, ustored = uniform_energy_for_budget(S_list, shapes, alloc.stored, caps=caps,
                                                         multiple=rank_multiple)
        uen = [energy_rank_fraction(S, r) for S, r in zip(S_list, uranks)]
        settings.append(label)
        ranks[label] = alloc.ranks
        ens[label] = alloc.energies
        pols[label] = dict(stored=alloc.stored, allowed=alloc.budget, budget_mean_energy=alloc.mean_energy,
                           budget_min_energy=min(alloc.energies) if alloc.energies else 0.0, uniform_energy=tau,
                           uniform_stored=ustored, uniform_mean_energy=sum(uen) / len(uen) if uen else 0.0,
                           uniform_min_energy=min(uen) if uen else 0.0)
    return Plan(layers, spectra, settings, ranks, ens, pols, report.layers,
                dtype_bytes=dtype_bytes if layers else 4)


def merge(model: nn.Module) -> nn.Module:
    """Replace every CERSA layer by the dense layer it computes (``layer.merge()``: nn.Linear, a
    Conv1D with its (in, out) layout, nn.Conv2d with the same hyper-parameters, or
    nn.MultiheadAttention), in place; returns the model.  The merged weight U diag(S) Vh + scale B A
    is formed in float32 or higher and rounded once to the layer's dtype."""
    if isinstance(model, CERSA_LAYERS):
        raise TypeError("model: expected a model containing CERSA layers, got a CERSA layer itself; "
                        "call layer.merge() instead")
    for name, mod in cersa_modules(model).items():
        _set_module(model, name, mod.merge())
    if hasattr(model, "cersa_report"):
        del model.cersa_report
    return model
