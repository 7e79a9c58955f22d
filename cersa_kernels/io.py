"""Save and load converted models (safetensors), without re-running the SVD.

File layout: one safetensors file holding the model's state dict (tied tensors stored once) and
string metadata: "format" = "cersa_kernels", "kind" = "model" or "adapter", "version",
"layers" = JSON {module name: layer config (shapes, ranks, energy, init, scale)},
"trainable" = JSON list of parameter names that required grad, "aliases" = JSON {dropped name:
kept name} for tied tensors.  Every write goes to a temporary file in the target folder that is
fsync'ed and renamed over the target, so a crash never leaves a truncated file in place.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
from torch import nn

from . import __version__
from .layers import LAYER_TYPES, CersaLayer, CersaModule
from .report import ConversionReport, record_of
from .targets import cersa_modules, set_module

__all__ = ["save", "load", "save_adapter", "load_adapter", "load_layers", "LAYER_TYPES"]

FORMAT = "cersa_kernels"


def _write_atomic(tensors: dict, metadata: dict, path) -> None:
    from safetensors.torch import save_file

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".cersa-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _dedup(state: dict) -> tuple[dict, dict]:
    """Keep one name per storage (safetensors refuses shared tensors); return tensors and aliases."""
    out, aliases, seen = {}, {}, {}
    for k, v in state.items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride())) \
            if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = v.detach().contiguous()
    return out, aliases


def save(model: nn.Module, path) -> None:
    """Write the converted model's weights and CERSA layer configs to ``path`` (safetensors), atomically.

    Raises ValueError if the model holds no CERSA layer (use safetensors directly for plain models).
    """
    layers = cersa_modules(model)
    if not layers:
        raise ValueError("model: expected a model converted by cersa_kernels.convert, found no CERSA layer")
    tensors, aliases = _dedup(model.state_dict())
    meta = {"format": FORMAT, "kind": "model", "version": __version__,
            "layers": json.dumps({n: m.cersa_config() for n, m in layers.items()}),
            "trainable": json.dumps([n for n, p in model.named_parameters() if p.requires_grad]),
            "aliases": json.dumps(aliases)}
    _write_atomic(tensors, meta, path)


def _read(path, kind: str):
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no such file {path!r}")
    try:
        fh = safe_open(path, framework="pt")
    except Exception as exc:  # safetensors raises its own error type for a bad header
        raise ValueError(f"path: {path!r} is not a safetensors file: {exc}") from None
    with fh:
        meta = fh.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"path: {path!r} is not a cersa_kernels file (metadata format={meta.get('format')!r})")
        if meta.get("kind") != kind:
            raise ValueError(f"path: expected a cersa_kernels {kind} file, got kind={meta.get('kind')!r}; "
                             f"use {'load' if meta.get('kind') == 'model' else 'load_adapter'}()")
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    for dropped, kept in json.loads(meta.get("aliases", "{}")).items():  # tied tensors, stored once
        if kept in tensors:
            tensors[dropped] = tensors[kept]
    return tensors, meta


def _check_keys(expected: dict, got: dict, what: str) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(f"{k}: file {tuple(got[k].shape)} vs model {tuple(expected[k])}"
                    for k in set(expected) & set(got) if tuple(got[k].shape) != tuple(expected[k]))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes}")
        raise ValueError(f"{what} does not match the model: " + "; ".join(parts))


def load(path, model: nn.Module) -> nn.Module:
    """Load a file written by :func:`save` into ``model``, a fresh unconverted copy of the same
    architecture: the CERSA layers are rebuilt from the stored factors (no SVD), then every weight is
    loaded and the saved requires_grad flags restored.  Returns the model.

    Raises FileNotFoundError, or ValueError listing missing / unexpected keys and shape mismatches
    (then the model is unchanged).
    """
    tensors, meta = _read(path, "model")
    layers = json.loads(meta["layers"])
    modules = dict(model.named_modules())
    new: dict[str, nn.Module] = {}
    problems = []
    for name, cfg in layers.items():
        old = modules.get(name)
        if old is None:
            problems.append(f"{name}: no such module in the model")
            continue
        if isinstance(old, CersaModule):
            problems.append(f"{name}: already a CERSA layer; load into a fresh, unconverted model")
            continue
        cls = LAYER_TYPES.get(cfg.get("type"))
        if cls is None:
            problems.append(f"{name}: unknown layer type {cfg.get('type')!r} in the file")
            continue
        w = next((p for p in old.parameters(recurse=True)), None)
        if w is None:
            problems.append(f"{name}: expected a layer with a weight, got {type(old).__name__}")
            continue
        try:
            new[name] = cls.from_config(cfg, device=w.device, dtype=w.dtype, like=old)
        except (TypeError, ValueError, KeyError) as exc:
            problems.append(f"{name}: {exc}")
            continue
        why = new[name].mismatch(old)
        if why:
            problems.append(f"{name}: {why}")
    if problems:
        raise ValueError("model: cannot rebuild the saved CERSA layers: " + "; ".join(problems))
    expected = {}
    for k, v in model.state_dict().items():
        owner = next((n for n in new if k.startswith(n + ".")), None)
        if owner is None:
            expected[k] = v.shape
    for n, mod in new.items():
        for k, v in mod.state_dict().items():
            expected[f"{n}.{k}"] = v.shape
    _check_keys(expected, tensors, f"checkpoint {os.fspath(path)!r}")
    for n, mod in new.items():
        set_module(model, n, mod)
    model.load_state_dict(tensors, strict=True)
    trainable = set(json.loads(meta.get("trainable", "[]")))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    model.cersa_report = ConversionReport(layers=[record_of(n, m, "converted", "loaded", kind=type(m).__name__)
                                                  for n, m in new.items()])
    return model


def save_adapter(model: nn.Module, path) -> None:
    """Write only what was trained (every parameter with requires_grad: the deltas A, B and, when
    trained, S, biases, or a task head) plus the CERSA layer configs, atomically.  The base
    model is rebuilt by converting the same pretrained model with the same settings."""
    layers = cersa_modules(model)
    if not layers:
        raise ValueError("model: expected a model converted by cersa_kernels.convert, found no CERSA layer")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model: no parameter requires grad, so there is no adapter to save")
    tensors, aliases = _dedup(params)
    meta = {"format": FORMAT, "kind": "adapter", "version": __version__,
            "layers": json.dumps({n: m.cersa_config() for n, m in layers.items()}),
            "aliases": json.dumps(aliases)}
    _write_atomic(tensors, meta, path)


def load_adapter(path, model: nn.Module) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` into a model converted with the same settings.

    Raises ValueError listing missing keys, unknown keys, shape mismatches or layer-config
    differences (frozen_rank, delta_rank, scale); then the model is unchanged.
    """
    tensors, meta = _read(path, "adapter")
    layers = json.loads(meta["layers"])
    ours = cersa_modules(model)
    diffs = []
    for name, cfg in layers.items():
        mod = ours.get(name)
        if mod is None:
            diffs.append(f"{name}: not a CERSA layer in the model")
            continue
        mine = mod.cersa_config()
        pairs = [(name, mine, cfg)]
        if mine.get("type") == cfg.get("type"):  # a composite module's parts are compared too
            pairs += [(f"{name}.{k}", v, cfg.get(k, {})) for k, v in mine.items() if isinstance(v, dict)]
        for where, a, b in pairs:
            for key in ("type", "in_features", "out_features", "frozen_rank", "delta_rank", "scale"):
                if key in a and a.get(key) != b.get(key):
                    diffs.append(f"{where}.{key}: file {b.get(key)!r} vs model {a.get(key)!r}")
    if diffs:
        raise ValueError(f"adapter {os.fspath(path)!r} was saved from a differently converted model: "
                         + "; ".join(diffs))
    params = dict(model.named_parameters())
    unexpected = sorted(set(tensors) - set(params))
    shapes = sorted(f"{k}: file {tuple(v.shape)} vs model {tuple(params[k].shape)}"
                    for k, v in tensors.items() if k in params and tuple(v.shape) != tuple(params[k].shape))
    missing = sorted(f"{n}.{p}" for n, m in model.named_modules() if n and isinstance(m, CersaLayer)
                     for p in ("A", "B") if f"{n}.{p}" not in tensors)
    if unexpected or shapes or missing:
        parts = [f"unexpected keys: {unexpected}"] if unexpected else []
        parts += [f"missing keys: {missing}"] if missing else []
        parts += [f"shape mismatches: {shapes}"] if shapes else []
        raise ValueError(f"adapter {os.fspath(path)!r} does not match the model: " + "; ".join(parts))
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
            params[k].requires_grad_(True)
    return model


def load_layers(path, device=None) -> dict[str, CersaModule]:
    """The CERSA modules saved in a :func:`save` file, rebuilt from their configs and factors
    without the model they belong to: {module name: CersaModule} (each in its saved dtype, on
    ``device``).  For tools that need the layers alone (e.g. ``merge()`` each of them).  Raises as
    :func:`load` for a file that is not a cersa_kernels model file."""
    tensors, meta = _read(path, "model")
    out: dict[str, CersaModule] = {}
    for name, cfg in json.loads(meta["layers"]).items():
        cls = LAYER_TYPES.get(cfg.get("type"))
        if cls is None:
            raise ValueError(f"path: layer {name!r} has unknown type {cfg.get('type')!r}")
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        dtype = next((v.dtype for v in own.values() if v.is_floating_point()), None)
        layer = cls.from_config(cfg, device=device, dtype=dtype)
        layer.load_state_dict(own, strict=True)
        out[name] = layer
    return out
