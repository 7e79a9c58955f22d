"""Rank policy and planning: the ranks a conversion chooses, shared by ``convert`` and ``plan``.

``layer_ranks`` gives each candidate's per-matrix ranks under a CersaConfig (None: the energy rank,
found by the decomposition itself); ``keeps_dense`` says whether a layer of a rank stays dense;
``plan(model, ...)`` shows the ranks and sizes for several energies or a budget without changing the
model, through the same functions.  Math: docs/design.md "Rank policies".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import CersaConfig
from .decompose import (allocate_budget, check_energy, check_rank, energy_rank, round_rank, singular_values,
                        uniform_energy_for_budget)
from .quant import quantized_nbytes
from .calibrate import weighted_singular_values
from .report import ConversionReport, LayerRecord
from .targets import collect

__all__ = ["Plan", "plan", "layer_ranks", "keeps_dense", "truncation_nbytes", "layer_nbytes", "no_saving_reason",
           "budget_ranks", "policy_summary", "spectrum_method",
           "energy_rank_fraction"]


def keeps_dense(stored: int, dense: int, max_frozen_ratio) -> bool:
    """Whether a layer stays dense: its truncation as the converted layer would store it takes
    ``stored`` bytes (``truncation_nbytes``), at least max_frozen_ratio times the ``dense`` bytes of
    its weights (sum m n in their dtype); never with max_frozen_ratio None.  Both in the same unit
    (numbers work too: unquantized, bytes are numbers times one element size)."""
    return max_frozen_ratio is not None and stored >= max_frozen_ratio * dense


def truncation_nbytes(m: int, n: int, rank: int, *, dtype_bytes: int = 4, quantize: str | None = None,
                      quant_block_size: int = 64, double_quant: bool = False, moved: int = 0) -> int:
    """Bytes of the rank-``rank`` truncation of an (m, n) weight as a converted layer stores it:
    the frozen rank - moved components as U (m, rank - moved) and Vh (rank - moved, n) (codes and
    scales when ``quantize`` is "int8" / "nf4", ``quant.quantized_nbytes``; numbers of
    ``dtype_bytes`` otherwise) and S (rank - moved numbers of dtype_bytes), plus the ``moved``
    components the principal init holds in the delta, (m + n + 1) numbers of dtype_bytes each.
    Unquantized this is r (m + n + 1) dtype_bytes whatever ``moved`` (docs/design.md "Stored
    frozen parameters", "Quantized factors").  Raises ValueError for moved outside [0, rank]."""
    if not 0 <= moved <= rank:
        raise ValueError(f"moved: expected an int in [0, {rank}] (the rank), got {moved!r}")
    if quantize is None:
        return rank * (m + n + 1) * dtype_bytes
    frozen = rank - moved
    codes = (quantized_nbytes(m, frozen, quantize, quant_block_size, double_quant)
             + quantized_nbytes(frozen, n, quantize, quant_block_size, double_quant))
    return codes + frozen * dtype_bytes + moved * (m + n + 1) * dtype_bytes


def layer_nbytes(layer) -> tuple[int, int]:
    """(bytes of the truncation as the CERSA module ``layer`` stores it, bytes of the dense weights
    it replaces), summed over its parts: the stored U, S, Vh (codes and scales when quantized) plus
    the rank - frozen_rank components held in the delta at (m + n + 1) numbers of the layer's dtype
    each, against m n numbers of that dtype (the dtype of S: a quantized layer's S keeps it).
    What ``convert`` compares with ``keeps_dense``."""
    stored = dense = 0
    for p in layer.parts():
        m, n, e = p.out_features, p.in_features, p.S.element_size()
        stored += p.frozen_nbytes() + (p.rank - p.frozen_rank) * (m + n + 1) * e
        dense += m * n * e
    return stored, dense


def no_saving_reason(layer, stored: int, dense: int, max_frozen_ratio) -> str:
    """The report's reason for a layer ``keeps_dense`` leaves dense (stored, dense: ``layer_nbytes``)."""
    q = getattr(layer.parts()[0], "quantize", None)
    how = (f"{q} codes + scales of U, Vh, S and the principal delta" if q else
           f"r(m+n+1) = {layer.stored_numbers()[0]:,} numbers")
    return (f"no saving: rank {layer.rank} stores {stored:,} bytes ({how}) >= {max_frozen_ratio:g} x "
            f"{dense:,} bytes of the dense weight")


def _moved(rank: int, config) -> int:
    """Components the init moves into the delta at ``rank`` (no spectrum: all taken as nonzero)."""
    return min(config.delta_rank, rank) if config.init == "principal" else 0


def _break_even_cap(m: int, n: int, max_frozen_ratio, config=None, dtype_bytes: int = 4) -> int:
    """Largest r whose truncation stores less than max_frozen_ratio times the dense weight (min(m, n)
    when no ratio is set): r (m + n + 1) < max_frozen_ratio * m n, or with a quantizing ``config``
    (a CersaConfig with quantize set) truncation_nbytes(m, n, r) < max_frozen_ratio * m n dtype_bytes,
    with the config's storage options and principal delta."""
    p = min(m, n)
    if max_frozen_ratio is None:
        return p
    if config is not None and getattr(config, "quantize", None) is not None:
        lim = max_frozen_ratio * m * n * dtype_bytes
        size = lambda r: truncation_nbytes(m, n, r, dtype_bytes=dtype_bytes, quantize=config.quantize,  # noqa: E731
                                           quant_block_size=config.quant_block_size,
                                           double_quant=config.double_quant, moved=_moved(r, config))
        if size(0) >= lim:
            return 0
        lo, hi = 0, p  # size is non-decreasing in r: the last r with size(r) < lim
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if size(mid) < lim else (lo, mid - 1)
        return lo
    lim = max_frozen_ratio * m * n / (m + n + 1)
    r = int(lim)
    if r >= lim:
        r -= 1
    return max(0, min(p, r))


def _budget_cap(m: int, n: int, max_frozen_ratio, max_rank, rank_multiple, config=None, dtype_bytes: int = 4) -> int:
    """Per-layer rank cap under a budget: the break-even rank (in bytes with a quantizing ``config``,
    ``_break_even_cap``), max_rank, rounded down to a multiple of rank_multiple unless it is min(m, n)."""
    cap = _break_even_cap(m, n, max_frozen_ratio, config, dtype_bytes)
    if max_rank is not None:
        cap = min(cap, max_rank)
    if rank_multiple and cap < min(m, n):
        cap = cap // rank_multiple * rank_multiple
    return cap


def spectrum_method(svd: str) -> str:
    """The ``singular_values`` method a rank policy uses for the conversion's ``svd=`` option: the
    exact-rank spectrum of that method ("randomized" and "auto" take the cheapest exact one)."""
    return svd if svd in ("full", "gram") else "auto"


def policy_summary(config: CersaConfig) -> dict:
    """The rank-policy fields of ``config`` the report shows (budget, max_rank, rank_multiple, svd)."""
    return {"budget": config.budget, "max_rank": config.max_rank, "rank_multiple": config.rank_multiple,
            "svd": config.svd}


def _energy_ranks(spectra, shapes, energy, config: CersaConfig) -> list[int]:
    return [round_rank(energy_rank(S, energy), min(m, n), cap=config.max_rank, multiple=config.rank_multiple)
            for S, (m, n) in zip(spectra, shapes)]


def budget_ranks(spectra, shapes, config: CersaConfig):
    """(allocation, summary) of config.budget over the layers (spectra: all singular values of each
    matrix, shapes: their (m, n)); the summary compares it with one energy for every layer at the
    same size."""
    caps = [_budget_cap(m, n, config.max_frozen_ratio, config.max_rank, config.rank_multiple, config=config)
            for m, n in shapes]
    alloc = allocate_budget(spectra, shapes, config.budget, caps=caps, multiple=config.rank_multiple)
    tau, uranks, ustored = uniform_energy_for_budget(spectra, shapes, alloc.stored, caps=caps,
                                                     multiple=config.rank_multiple)
    uen = [float(energy_rank_fraction(S, r)) for S, r in zip(spectra, uranks)]
    summary = dict(stored=alloc.stored, allowed=alloc.budget, budget_mean_energy=alloc.mean_energy,
                   budget_min_energy=min(alloc.energies) if alloc.energies else 0.0, uniform_energy=tau,
                   uniform_stored=ustored, uniform_mean_energy=sum(uen) / len(uen) if uen else 0.0,
                   uniform_min_energy=min(uen) if uen else 0.0)
    return alloc, summary


def layer_ranks(todo, config: CersaConfig, progress=None, *, moments=None, damping: float = 0.01,
                spectra=None) -> tuple[list[list[int | None]], dict]:
    """Per candidate (name, module, layer class) of ``targets.collect``, the ranks of its matrices
    (None: let the decomposition find the energy rank), and the policy summary for the report.
    progress: called with each matrix's name when its spectrum is computed.
    moments: None, or per candidate a list (aligned with ``matrices``) of input second moments C
      (n, n): the spectra are then those of W L, L L^T = C + damping mean(diag C) I (the output
      energies of the activation-aware truncation, docs/design.md "Activation-aware truncation");
      damping: its lambda.  spectra: None, or per candidate a list of precomputed spectra (all
      singular values of each matrix, e.g. the weighted ones), used instead of computing them; the
      energy ranks are then explicit (computed from them) even without max_rank / rank_multiple."""
    policy = policy_summary(config)
    mats = [[W for _, W in cls.matrices(mod)] for _, mod, cls in todo]
    if config.rank is not None:
        for (name, _, _), Ws in zip(todo, mats):
            for W in Ws:
                check_rank(config.rank, min(W.shape), where=f" ({name}: {W.shape[0]} x {W.shape[1]})")
        return [[round_rank(config.rank, min(W.shape), cap=config.max_rank, multiple=config.rank_multiple)
                 for W in Ws] for Ws in mats], policy
    if config.budget is None and config.max_rank is None and config.rank_multiple is None and spectra is None:
        return [[None] * len(Ws) for Ws in mats], policy
    flat = [(name, W) for (name, _, _), Ws in zip(todo, mats) for W in Ws]
    flat_C = [C for Cs in moments for C in Cs] if moments is not None else [None] * len(flat)
    given = [S for Ss in spectra for S in Ss] if spectra is not None else [None] * len(flat)
    spectra = []
    for (name, W), C, S in zip(flat, flat_C, given):
        if progress is not None:
            progress(name)
        if S is not None:
            spectra.append(S)
        elif C is None:
            spectra.append(singular_values(W, name, svd=spectrum_method(config.svd)))
        else:
            spectra.append(weighted_singular_values(W, C, damping, name, svd=spectrum_method(config.svd)))
    shapes = [tuple(W.shape) for _, W in flat]
    if config.budget is None:
        ranks = _energy_ranks(spectra, shapes, config.energy, config)
    else:
        alloc, summary = budget_ranks(spectra, shapes, config)
        ranks = alloc.ranks
        policy.update(summary)
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


@dataclass
class Plan:
    """What ``convert`` would choose, per layer and per setting, computed without changing the model.

    layers: [(name, kind, m, n)] per decomposed matrix (an attention contributes two);
    spectra: {name: all singular values}; settings: list of labels ("energy 0.93", "budget 0.8");
    ranks: {label: [rank per matrix, None where the layer would stay dense]}; energies: {label: [retained fraction per matrix]};
    policies: {label: budget summary or {}}; dtype_bytes: element size of the weights;
    quantize, quant_block_size, double_quant: the storage of the frozen factors the sizes assume
    (``convert``'s options of the same names); moved: {label: [components the principal init moves
    into the delta, per matrix (0 where dense)]}.
    """

    layers: list[tuple[str, str, int, int]]
    spectra: dict
    settings: list[str]
    ranks: dict
    energies: dict
    policies: dict
    skipped: list[LayerRecord]
    dtype_bytes: int = 4
    quantize: str | None = None
    quant_block_size: int = 64
    double_quant: bool = False
    moved: dict | None = None

    def stored(self, setting: str) -> int:
        """Frozen numbers of all target weights under ``setting`` (m n for a layer left dense)."""
        return sum(m * n if r is None else r * (m + n + 1)
                   for r, (_, _, m, n) in zip(self.ranks[setting], self.layers))

    def layer_nbytes(self, setting: str) -> list[int]:
        """Bytes per matrix under ``setting``: ``truncation_nbytes`` of its rank with this plan's
        storage (the quantized codes and scales when quantize is set), m n dtype_bytes when dense."""
        moved = (self.moved or {}).get(setting) or [0] * len(self.layers)
        return [m * n * self.dtype_bytes if r is None else
                truncation_nbytes(m, n, r, dtype_bytes=self.dtype_bytes, quantize=self.quantize,
                                  quant_block_size=self.quant_block_size, double_quant=self.double_quant, moved=k)
                for r, k, (_, _, m, n) in zip(self.ranks[setting], moved, self.layers)]

    def nbytes(self, setting: str) -> int:
        """Bytes of all target weights under ``setting`` (sum of ``layer_nbytes``)."""
        return sum(self.layer_nbytes(setting))

    def frozen_nbytes(self, setting: str) -> int:
        """Bytes of the frozen weights alone under ``setting``: ``nbytes`` less the principal
        components held by the (trainable) delta; what ``get_report``'s frozen factor bytes plus the
        dense layers' weights come to after ``convert``."""
        moved = (self.moved or {}).get(setting) or [0] * len(self.layers)
        return self.nbytes(setting) - sum(k * (m + n + 1) * self.dtype_bytes
                                          for k, (_, _, m, n) in zip(moved, self.layers))

    def dense_nbytes(self) -> int:
        """Bytes of all target weights left dense: sum m n dtype_bytes."""
        return sum(m * n for _, _, m, n in self.layers) * self.dtype_bytes

    def storage(self) -> str:
        """The factor storage in words ("float32 numbers" style, or the code type and block size)."""
        if self.quantize is None:
            return f"numbers of {self.dtype_bytes} bytes"
        return (f"{self.quantize} codes in blocks of {self.quant_block_size}"
                + (" with double quantization" if self.double_quant else "") + f", S of {self.dtype_bytes} bytes")

    def table(self) -> str:
        """Per-layer rank and memory table: one (rank, MiB) column pair per setting, then totals
        (MiB and the fraction of the dense bytes)."""
        head = ["layer", "type", "shape"]
        for s in self.settings:
            head += [f"r @ {s}", "MiB"]
        rows = []
        mib = lambda b: f"{b / 2**20:.3f}"  # noqa: E731
        sizes = {s: self.layer_nbytes(s) for s in self.settings}
        for i, (name, kind, m, n) in enumerate(self.layers):
            row = [name, kind, f"{m} x {n}"]
            for s in self.settings:
                r = self.ranks[s][i]
                row += (["dense", mib(sizes[s][i])] if r is None else
                        [f"{r} ({self.energies[s][i]:.3f})", mib(sizes[s][i])])
            rows.append(row)
        dense = self.dense_nbytes()
        tot = ["total", "", f"dense {mib(dense)} MiB"]
        for s in self.settings:
            st = sum(sizes[s])
            tot += [f"{st / dense:.3f}x dense" if dense else "", mib(st)]
        rows.append(tot)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        if self.quantize is None:
            out.append("r @ setting: rank of the truncation (its retained energy fraction), or 'dense' when it would "
                       f"not save memory; MiB: r (m + n + 1) numbers of {self.dtype_bytes} bytes (frozen factors incl. "
                       "the principal delta; biases excluded), m n for a dense layer.")
        else:
            out.append("r @ setting: rank of the truncation (its retained energy fraction), or 'dense' when it would "
                       f"not save memory; MiB: U, Vh stored as {self.storage()} (the frozen r - k components), "
                       f"plus the k principal components in the delta at (m + n + 1) numbers of {self.dtype_bytes} "
                       f"bytes; biases excluded; m n numbers of {self.dtype_bytes} bytes for a dense layer.")
        if dense and self.quantize is not None:
            for s in self.settings:
                fb = self.frozen_nbytes(s)
                out.append(f"{s}: frozen weights alone (without the principal delta) {mib(fb)} MiB "
                           f"({fb / dense:.3f}x dense)")
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
         max_frozen_ratio: float | None = 1.0, quantize: str | None = None, quant_block_size: int = 64,
         double_quant: bool = False, delta_rank: int = 16, init: str = "principal") -> Plan:
    """The ranks and sizes ``convert`` would choose, for each energy in ``energies`` and for
    ``budget`` (when given), with the same policies (max_rank, rank_multiple, max_frozen_ratio as a
    cap under the budget); the model is not changed.  Uses the full spectrum of every target weight
    (torch.linalg.svdvals).  quantize ("int8" | "nf4"), quant_block_size, double_quant, delta_rank,
    init: the storage and delta options of ``convert``; with quantize the sizes are bytes of the
    codes and scales (``truncation_nbytes``) and the keep-dense decision compares them with the
    dense bytes, as ``convert`` does.  Raises as ``convert`` for bad arguments or targets."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    energies = [check_energy(e, "energies") for e in energies]
    if not energies and budget is None:
        raise ValueError("energies: give at least one energy or a budget")
    base = CersaConfig(energy=None if budget is not None else (energies[0] if energies else 0.93), budget=budget,
                       max_rank=max_rank, rank_multiple=rank_multiple, max_frozen_ratio=max_frozen_ratio, svd="full",
                       quantize=quantize, quant_block_size=quant_block_size, double_quant=double_quant,
                       delta_rank=delta_rank, init=init)
    report = ConversionReport()
    todo, _ = collect(model, target_modules, exclude, report)
    layers, spectra = [], {}
    dtype_bytes = 4
    for name, mod, cls in todo:
        mats = cls.matrices(mod)
        for label, W in mats:
            key = name if len(mats) == 1 else f"{name}.{label}"
            spectra[key] = singular_values(W, key).cpu()
            layers.append((key, cls.kind, int(W.shape[0]), int(W.shape[1])))
            dtype_bytes = W.element_size()
    shapes = [(m, n) for _, _, m, n in layers]
    S_list = [spectra[k] for k, _, _, _ in layers]
    storage = dict(dtype_bytes=dtype_bytes, quantize=quantize, quant_block_size=quant_block_size,
                   double_quant=double_quant)

    def moved_of(S, r):  # as the principal init: the first min(k, r) components with sigma > 0
        return 0 if r is None else int((S[:_moved(r, base)] > 0).sum())

    settings, ranks, ens, pols, moved = [], {}, {}, {}, {}
    for e in energies:
        label = f"energy {e:g}"
        rs = [None if keeps_dense(truncation_nbytes(m, n, r, moved=moved_of(S, r), **storage),
                                  m * n * dtype_bytes, max_frozen_ratio) else r
              for S, r, (m, n) in zip(S_list, _energy_ranks(S_list, shapes, e, base), shapes)]
        settings.append(label)
        ranks[label] = rs
        ens[label] = [1.0 if r is None else energy_rank_fraction(S, r) for S, r in zip(S_list, rs)]
        pols[label] = {}
        moved[label] = [moved_of(S, r) for S, r in zip(S_list, rs)]
    if budget is not None:
        label = f"budget {budget:g}"
        alloc, summary = budget_ranks(S_list, shapes, base)
        settings.append(label)
        ranks[label] = alloc.ranks
        ens[label] = alloc.energies
        pols[label] = summary
        moved[label] = [moved_of(S, r) for S, r in zip(S_list, alloc.ranks)]
    return Plan(layers, spectra, settings, ranks, ens, pols, report.layers, dtype_bytes=dtype_bytes,
                quantize=quantize, quant_block_size=quant_block_size, double_quant=double_quant, moved=moved)
