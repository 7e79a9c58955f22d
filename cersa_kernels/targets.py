"""Which modules of a model a conversion (or a plan) considers: name patterns, the registry's
verdict per module, and the CERSA modules already there.  Shared by convert and plan, so both
select the same layers.

Also the model-level facts that convert, merge, save and load share: the wrappers a model may sit
in (``unwrap``: torch.compile's ``_orig_mod``, DDP's ``module``, FSDP1's ``_fsdp_wrapped_module``;
``strip_wrapper_prefix`` for names written with those prefixes), modules registered under several
names (``module_names``), weights shared between modules (``tied_weight_reason``), what a module
carries besides its tensors (``carry_over``: hooks, training mode; ``dense_skeleton`` /
``restore_dense`` for merge), and the fused fast paths that CERSA layers turn off.
"""
from __future__ import annotations

import copy
import fnmatch
import re
from typing import Iterable

from torch import nn

from .layers import CersaModule, LAYER_TYPES, layer_type_for, unsupported_reason
from .report import ConversionReport, LayerRecord, record_of

__all__ = ["cersa_modules", "collect", "select", "set_module", "dense_shape", "dense_numbers", "unwrap",
           "strip_wrapper_prefix", "WRAPPER_PREFIXES", "module_names", "tied_weight_reason", "carry_over",
           "dense_skeleton", "restore_dense", "disable_fast_paths", "restore_fast_paths", "HOOK_DICTS",
           "attach_skeleton", "refused_hooks", "instance_forward_reason"]

# ---------------------------------------------------------------------------------------- wrappers
#: (class name, attribute holding the wrapped module, the prefix it adds to every name).
#: torch.compile's OptimizedModule, DistributedDataParallel / DataParallel and FSDP1's
#: FullyShardedDataParallel.  FSDP2 (``fully_shard``) wraps nothing: it keeps every name and turns
#: parameters into DTensors (``io.save`` gathers them).
_WRAPPERS = (("OptimizedModule", "_orig_mod"), ("DistributedDataParallel", "module"),
             ("DataParallel", "module"), ("FullyShardedDataParallel", "_fsdp_wrapped_module"))

#: the name prefixes those wrappers add ("_orig_mod.", "module.", "_fsdp_wrapped_module.").
WRAPPER_PREFIXES = tuple(dict.fromkeys(attr + "." for _, attr in _WRAPPERS))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside torch.compile / DDP / DataParallel / FSDP1 wrappers (any nesting); ``model``
    itself when it is not wrapped.  Names of the result carry no wrapper prefix."""
    while True:
        for cls_name, attr in _WRAPPERS:
            inner = model._modules.get(attr) if isinstance(model, nn.Module) else None
            if isinstance(inner, nn.Module) and any(c.__name__ == cls_name for c in type(model).__mro__):
                model = inner
                break
        else:
            return model


def strip_wrapper_prefix(names: Iterable[str], model: nn.Module) -> str:
    """The wrapper prefix (one of WRAPPER_PREFIXES, possibly repeated) that every name in ``names``
    starts with and that the unwrapped ``model`` does not have as a submodule, else "".  For files
    or state dicts written from a wrapped model by other tools."""
    names = list(names)
    prefix = ""
    while names:
        p = next((p for p in WRAPPER_PREFIXES if all(n.startswith(prefix + p) for n in names)), None)
        if p is None or p[:-1] in dict(model.named_children()):
            break
        prefix += p
    return prefix


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """{id(module): every dotted name it is registered under}, in registration order (a module
    shared under two names has both)."""
    out: dict[int, list[str]] = {}
    for n, mod in model.named_modules(remove_duplicate=False):
        if n:
            out.setdefault(id(mod), []).append(n)
    return out


def _param_owners(model: nn.Module) -> dict[int, list[tuple[str, int]]]:
    """{id(parameter): [(dotted name, id(owning module))]} over every name (duplicates kept)."""
    owners: dict[int, list[tuple[str, int]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((f"{mname}.{pname}" if mname else pname, id(mod)))
    return owners


def instance_forward_reason(module: nn.Module) -> str:
    """"" unless ``module`` has a forward of its own set on the instance (accelerate's hooks, a user's
    monkeypatch): replacing the module would lose it, as for a subclass that overrides forward."""
    if "forward" in module.__dict__:
        return (f"{type(module).__name__} has its own forward set on the instance "
                f"({getattr(module.__dict__['forward'], '__qualname__', 'a callable')}); replacing it would lose "
                f"that behaviour")
    return ""


def tied_weight_reason(module: nn.Module, cls, owners: dict) -> str:
    """"" unless a matrix ``cls`` would decompose is a parameter another module object holds too (an
    output head tied to the input embedding, as GPT-2 / SmolLM2 / Whisper do); then the reason, naming
    the other holder.  Factoring it would silently untie it (the other module keeps the dense tensor)."""
    try:
        mats = cls.matrices(module)
    except (AttributeError, TypeError):
        return ""
    inside = {id(m) for m in module.modules()}
    for label, W in mats:
        p = W if isinstance(W, nn.Parameter) else getattr(W, "_base", None)
        if p is None:
            continue
        others = [n for n, mid in owners.get(id(p), []) if mid not in inside]
        if others:
            return (f"its {label} is tied to {others[0]} (the same tensor); factoring it would untie them, "
                    f"so it stays dense")
    return ""


# ------------------------------------------------------------------------- what a module carries
#: nn.Module's hook tables that are keyed to the module call (forward, forward-pre, full backward):
#: convert and merge hand these to the replacing module (the same dict objects, so the user's
#: RemovableHandles keep working).
HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")

#: hook tables keyed to the module's tensor names, which the replacing module does not have.
_STATE_HOOK_DICTS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")


def refused_hooks(module: nn.Module, name: str) -> str:
    """"" when every hook of ``module`` can move to its replacement, else an error naming the layer
    and the hook (state-dict hooks are written for the dense module's tensor names)."""
    for attr in _STATE_HOOK_DICTS:
        hooks = getattr(module, attr, None) or {}
        for hook in hooks.values():
            fn = getattr(hook, "__name__", None) or repr(hook)
            return (f"{name}: has a {attr.strip('_').replace('_', ' ')[:-1]} {fn!r}, written for its dense "
                    f"tensors ({', '.join(n for n, _ in module.named_parameters(recurse=False))}), which the "
                    f"replacing layer does not have; remove it (handle.remove()) before converting or merging")
    return ""


def carry_over(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` (replacing ``old``) old's call hooks (HOOK_DICTS, shared), its full-backward-hook
    flag and its training mode."""
    for attr in HOOK_DICTS:
        if attr in old.__dict__:
            new.__dict__[attr] = old.__dict__[attr]
    if "_is_full_backward_hook" in old.__dict__:
        new.__dict__["_is_full_backward_hook"] = old.__dict__["_is_full_backward_hook"]
    new.train(old.training)


_SKELETON = "_cersa_dense_skeleton"


def dense_skeleton(old: nn.Module) -> nn.Module:
    """A tensor-free copy of the dense module ``old`` (its class, made without calling __init__, and
    every attribute but its parameters and submodules), kept by the CERSA layer for ``restore_dense``."""
    sk = object.__new__(type(old))
    d = {k: v for k, v in old.__dict__.items() if k not in HOOK_DICTS and k != _SKELETON}
    d["_parameters"] = {k: None for k in old._parameters}
    d["_modules"] = {}
    d["_buffers"] = dict(old._buffers)
    sk.__dict__.update(d)
    return sk


def attach_skeleton(new: nn.Module, old: nn.Module) -> None:
    """Record on CERSA module ``new`` the skeleton of the dense ``old`` it replaces (not a submodule)."""
    new.__dict__[_SKELETON] = old.__dict__.get(_SKELETON) or dense_skeleton(old)


def restore_dense(cersa: nn.Module, merged: nn.Module) -> nn.Module:
    """The dense module to put back for CERSA module ``cersa``: ``merged`` (its ``merge()``: the
    standard class with the merged tensors) turned into an instance of the converted module's own
    class (an nn.Linear subclass stays that subclass) with its other attributes and buffers, and the
    CERSA module's call hooks and training mode."""
    sk = cersa.__dict__.get(_SKELETON)
    out = merged
    if sk is not None and type(sk) is not type(merged):
        out = object.__new__(type(sk))
        out.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set, list)) else v
                             for k, v in sk.__dict__.items()})
        out.__dict__["_parameters"] = dict(merged._parameters)
        out.__dict__["_modules"] = dict(merged._modules)
        for k in HOOK_DICTS + ("_is_full_backward_hook",):
            if k in merged.__dict__:
                out.__dict__[k] = merged.__dict__[k]
    elif sk is not None:
        for k, v in sk.__dict__.items():
            if k not in ("_parameters", "_modules", "_buffers", "training") and k not in HOOK_DICTS:
                out.__dict__.setdefault(k, v)
        out._buffers.update({k: v for k, v in sk._buffers.items() if k not in out._buffers})
    carry_over(cersa, out)
    return out


# ----------------------------------------------------------------------------------- fast paths
_FAST_PATH = "_cersa_fast_path"


def disable_fast_paths(model: nn.Module, is_cersa) -> None:
    """PyTorch's fused inference paths of nn.TransformerEncoder(Layer) read raw weights (linear1.weight,
    self_attn.in_proj_weight, ...) that CERSA layers do not have: turn them off where a CERSA layer
    sits, recording the original setting for ``restore_fast_paths``."""
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoderLayer):
            attr = "activation_relu_or_gelu"  # only read by the fast-path checks
        elif isinstance(mod, nn.TransformerEncoder):
            attr = "use_nested_tensor"
        else:
            continue
        if any(is_cersa(c) for c in mod.modules()):
            mod.__dict__.setdefault(_FAST_PATH, {attr: getattr(mod, attr)})
            setattr(mod, attr, False)


def restore_fast_paths(model: nn.Module, is_cersa) -> None:
    """Give back the fast paths ``disable_fast_paths`` turned off where no CERSA layer is left."""
    for mod in model.modules():
        saved = mod.__dict__.get(_FAST_PATH)
        if saved is not None and not any(is_cersa(c) for c in mod.modules()):
            for attr, value in saved.items():
                setattr(mod, attr, value)
            del mod.__dict__[_FAST_PATH]


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
    owners = _param_owners(model)
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
            why = instance_forward_reason(mod) or tied_weight_reason(mod, cls, owners)
            verdict = (cls.kind, why) if why else None
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
