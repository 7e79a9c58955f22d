"""Which modules of a model a conversion (or a plan) considers: name patterns, the registry's
verdict per module, and the CERSA modules already there.  Shared by convert and plan, so both
select the same layers."""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable

from torch import nn

from .layers import CersaModule, LAYER_TYPES, layer_type_for, unsupported_reason
from .report import ConversionReport, LayerRecord, record_of

__all__ = ["cersa_modules", "collect", "select", "set_module", "dense_shape", "dense_numbers"]


def cersa_modules(model: nn.Module) -> dict[str, CersaModule]:
    """{dotted name: module} of the CERSA modules of ``model`` that are not inside another CERSA
    module (a converted attention's in_proj / out_proj belong to it)."""
    out: dict[str, CersaModule] = {}
    for name, mod in model.named_modules():
        if name and isinstance(mod, CersaModule) and not any(name.startswith(p + ".") for p in out):
            out[name] = mod
    return out


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def select(names: list[str], patterns, arg: str) -> set[str]:
    """Names matched by ``patterns``: a str is a regex (full match), a list of str each an exact
    name, a dotted suffix or a glob.  A pattern that matches nothing is an error (ValueError)."""
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


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def dense_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of the matrix a dense layer is read as (its first matrix for a registered type;
    the out/in attributes otherwise; (0, 0) when it has none)."""
    cls = layer_type_for(module)
    if cls is not None:
        try:
            return cls.dense_shape(module)
        except (AttributeError, TypeError):  # e.g. separate q/k/v weights: no packed matrix
            pass
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return int(module.weight.shape[0]), int(module.weight[0].numel())
    for out_attr, in_attr in (("out_features", "in_features"), ("nf", "nx"), ("out_channels", "in_channels")):
        if hasattr(module, out_attr) and hasattr(module, in_attr):
            return int(getattr(module, out_attr)), int(getattr(module, in_attr))
    return 0, 0


def dense_numbers(module: nn.Module) -> int:
    """The numbers of the matrices a dense layer stands for (m n summed)."""
    cls = layer_type_for(module)
    if cls is not None:
        try:
            return sum(W.numel() for _, W in cls.matrices(module))
        except (AttributeError, TypeError):
            pass
    m, n = dense_shape(module)
    return m * n


def collect(model: nn.Module, target_modules, exclude, report: ConversionReport):
    """Candidate layers: returns (todo [(name, module, layer class)], all module names) and fills
    ``report`` with the rows of layers left as they are (already converted, unsupported).  Raises
    ValueError for an explicitly targeted layer that cannot be converted."""
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    targets = select(names, target_modules, "target_modules")
    if exclude is not None:
        targets -= select(names, exclude, "exclude")
    explicit = target_modules is not None
    cersa_inside = {n for c in cersa_modules(model) for n in names if n.startswith(c + ".")}
    mha_names = [n for n, m in modules.items() if n and isinstance(m, nn.MultiheadAttention)]
    kinds = ", ".join(cls.kind for cls in LAYER_TYPES.values())
    todo: list[tuple[str, nn.Module, type]] = []
    for name in names:
        if name not in targets or name in cersa_inside:
            continue
        mod = modules[name]
        if isinstance(mod, CersaModule):
            report.layers.append(record_of(name, mod, "already converted", kind=type(mod).__name__))
            continue
        parent = next((p for p in mha_names if name.startswith(p + ".")), None)
        if parent is not None:
            if explicit and parent not in targets:
                raise ValueError(f"target_modules: {name!r} is a projection inside nn.MultiheadAttention "
                                 f"{parent!r}, which reads its weights directly; target {parent!r} itself "
                                 f"(its in_proj and out_proj are converted together)")
            continue  # converted (or reported) with its attention module
        verdict = unsupported_reason(mod)
        cls = layer_type_for(mod)
        if cls is not None and verdict is None:
            todo.append((name, mod, cls))
            continue
        if verdict is not None:
            kind, why = verdict
            if explicit:
                raise ValueError(f"target_modules: {name!r} is a {type(mod).__name__}, which cannot be "
                                 f"converted: {why}")
            m, n = dense_shape(mod)
            report.layers.append(LayerRecord(name, kind, m, n, "dense", why, params_before=dense_numbers(mod)))
        elif explicit and not any(True for _ in mod.children()):
            raise ValueError(f"target_modules: {name!r} is a {type(mod).__name__}; supported types: {kinds}")
        elif explicit and isinstance(target_modules, (list, tuple)) and any(name == p for p in target_modules):
            raise ValueError(f"target_modules: {name!r} is a {type(mod).__name__} container, not a layer; "
                             f"supported types: {kinds}")
    return todo, names
