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
from .report import ConversionReport, LayerRecord
from .targets import collect

__all__ = ["Plan", "plan", "layer_ranks", "keeps_dense", "budget_ranks", "policy_summary", "spectrum_method",
           "energy_rank_fraction"]


def keeps_dense(stored: int, dense: int, max_frozen_ratio) -> bool:
    """Whether a layer stays dense: its truncation would store ``stored`` (sum r (m + n + 1)) numbers,
    at least max_frozen_ratio times its ``dense`` (sum m n) ones (never with max_frozen_ratio None)."""
    return max_frozen_ratio is not None and stored >= max_frozen_ratio * dense


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
    caps = [_budget_cap(m, n, config.max_frozen_ratio, config.max_rank, config.rank_multiple) for m, n in shapes]
    alloc = allocate_budget(spectra, shapes, config.budget, caps=caps, multiple=config.rank_multiple)
    tau, uranks, ustored = uniform_energy_for_budget(spectra, shapes, alloc.stored, caps=caps,
                                                     multiple=config.rank_multiple)
    uen = [float(energy_rank_fraction(S, r)) for S, r in zip(spectra, uranks)]
    summary = dict(stored=alloc.stored, allowed=alloc.budget, budget_mean_energy=alloc.mean_energy,
                   budget_min_energy=min(alloc.energies) if alloc.energies else 0.0, uniform_energy=tau,
                   uniform_stored=ustored, uniform_mean_energy=sum(uen) / len(uen) if uen else 0.0,
                   uniform_min_energy=min(uen) if uen else 0.0)
    return alloc, summary


def layer_ranks(todo, config: CersaConfig, progress=None) -> tuple[list[list[int | None]], dict]:
    """Per candidate (name, module, layer class) of ``targets.collect``, the ranks of its matrices
    (None: let the decomposition find the energy rank), and the policy summary for the report.
    progress: called with each matrix's name when its spectrum is computed."""
    policy = policy_summary(config)
    mats = [[W for _, W in cls.matrices(mod)] for _, mod, cls in todo]
    if config.rank is not None:
        for (name, _, _), Ws in zip(todo, mats):
            for W in Ws:
                check_rank(config.rank, min(W.shape), where=f" ({name}: {W.shape[0]} x {W.shape[1]})")
        return [[round_rank(config.rank, min(W.shape), cap=config.max_rank, multiple=config.rank_multiple)
                 for W in Ws] for Ws in mats], policy
    if config.budget is None and config.max_rank is None and config.rank_multiple is None:
        return [[None] * len(Ws) for Ws in mats], policy
    flat = [(name, W) for (name, _, _), Ws in zip(todo, mats) for W in Ws]
    spectra = []
    for name, W in flat:
        if progress is not None:
            progress(name)
        spectra.append(singular_values(W, name, svd=spectrum_method(config.svd)))
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
    base = CersaConfig(energy=None if budget is not None else (energies[0] if energies else 0.93), budget=budget,
                       max_rank=max_rank, rank_multiple=rank_multiple, max_frozen_ratio=max_frozen_ratio, svd="full")
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
    settings, ranks, ens, pols = [], {}, {}, {}
    for e in energies:
        label = f"energy {e:g}"
        rs = [None if keeps_dense(r * (m + n + 1), m * n, max_frozen_ratio) else r
              for r, (m, n) in zip(_energy_ranks(S_list, shapes, e, base), shapes)]
        settings.append(label)
        ranks[label] = rs
        ens[label] = [1.0 if r is None else energy_rank_fraction(S, r) for S, r in zip(S_list, rs)]
        pols[label] = {}
    if budget is not None:
        label = f"budget {budget:g}"
        alloc, summary = budget_ranks(S_list, shapes, base)
        settings.append(label)
        ranks[label] = alloc.ranks
        ens[label] = alloc.energies
        pols[label] = summary
    return Plan(layers, spectra, settings, ranks, ens, pols, report.layers, dtype_bytes=dtype_bytes)
