"""Save and load converted models (safetensors), without re-running the SVD.

File layout (docs/design.md "File format"): one safetensors file holding the model's state dict
(tied tensors stored once) and string metadata: "format" = "cersa_kernels", "kind" = "model" or
"adapter", "version", "layers" = JSON {module name: layer config (shapes, ranks, energy, init,
scale)}, "trainable" = JSON list of parameter names that required grad, "aliases" = JSON {dropped
name: kept name} for tied tensors, "module_aliases" = JSON {other name: module name} for a CERSA
module registered under several names.  A file too large for one piece (``ShardedWriter``, used by
the streaming conversion) holds the metadata and the last piece of the tensors, and "shards" =
JSON {tensor name: file name (in the same folder)} for the others.  Every write goes to temporary
files in the target folder that are fsync'ed and renamed over the target (the main file last), so
a crash never leaves a truncated file in place.

Names in files are those of the unwrapped model (``targets.unwrap``: no torch.compile / DDP /
FSDP1 prefix); FSDP2's DTensors are gathered to full tensors.  ``load`` also takes a model whose
parameters were never allocated (on the meta device) and materialises only what the file holds.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
from torch import nn

from . import __version__
from .layers import LAYER_TYPES, CersaLayer, CersaModule, is_cersa
from .report import ConversionReport, record_of
from .targets import (attach_skeleton, carry_over, cersa_modules, disable_fast_paths, module_names, set_module,
                      strip_wrapper_prefix, unwrap)

__all__ = ["save", "load", "save_adapter", "load_adapter", "load_layers", "LAYER_TYPES", "ShardedWriter",
           "model_metadata", "Checkpoint"]

FORMAT = "cersa_kernels"


# ------------------------------------------------------------------------------------------ write
def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _temp_in(folder: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=".cersa-", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def _write_file(tensors: dict, metadata: dict, tmp: str) -> None:
    """safetensors' writer into ``tmp``, fsync'ed, with the usual permissions (0666 & ~umask)."""
    from safetensors.torch import save_file

    save_file(tensors, tmp, metadata=metadata)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600


def _write_atomic(tensors: dict, metadata: dict, path) -> None:
    path = os.fspath(path)
    tmp = _temp_in(os.path.dirname(os.path.abspath(path)))
    try:
        _write_file(tensors, metadata, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class ShardedWriter:
    """Writes a model file tensor by tensor, never holding more than one piece in memory.

    ``add(name, tensor)`` queues a tensor (copied to the CPU, contiguous); once the queued bytes
    would pass ``max_shard_size`` they are written (safetensors' own writer) to a hidden temporary
    file next to ``path``.  ``commit(metadata)`` writes the last piece with the metadata to ``path``
    and renames the earlier pieces to ``<stem>-00001-of-0000N.safetensors`` (their names go into the
    metadata key "shards"); with one piece ``path`` is a plain single file, as ``save`` writes.
    Until ``commit`` returns nothing is visible under a final name: leaving the ``with`` block
    without committing (an error, Ctrl-C) removes every temporary file, and a failure during the
    renames removes the pieces already renamed.

    path: the main file.  max_shard_size: bytes per piece (None: one piece).  Raises ValueError for a
    folder that does not exist (naming ``path``) or a max_shard_size <= 0.
    """

    def __init__(self, path, max_shard_size: int | None = None) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.folder = os.path.dirname(self.path)
        if not os.path.isdir(self.folder):
            raise ValueError(f"path: the folder of {os.fspath(path)!r} does not exist")
        if max_shard_size is not None and (isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int)
                                           or max_shard_size <= 0):
            raise ValueError(f"max_shard_size: expected a positive number of bytes or None, got {max_shard_size!r}")
        self.max_shard_size = max_shard_size
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.pieces: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
        self.bytes_written = 0
        self.committed = False
        self._names: set[str] = set()

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self.abort()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name`` (ValueError for a name already added)."""
        if name in self._names:
            raise ValueError(f"name: tensor {name!r} was already written")
        self._names.add(name)
        t = tensor.detach()
        t = (t if t.device.type == "cpu" else t.to("cpu")).contiguous()
        nbytes = t.numel() * t.element_size()
        if self.max_shard_size is not None and self.pending and self.pending_bytes + nbytes > self.max_shard_size:
            self._flush()
        self.pending[name] = t
        self.pending_bytes += nbytes

    def _flush(self) -> None:
        tmp = _temp_in(self.folder)
        self.pieces.append((tmp, list(self.pending)))
        _write_file(self.pending, {"format": FORMAT, "kind": "shard"}, tmp)
        self.bytes_written += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def commit(self, metadata: dict) -> list[str]:
        """Write everything under its final name; returns the files written (the main one last)."""
        stem = self.path[:-len(".safetensors")] if self.path.endswith(".safetensors") else self.path
        n = len(self.pieces)
        names = [f"{os.path.basename(stem)}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        meta = dict(metadata)
        if n:
            meta["shards"] = json.dumps({t: nm for (_, ts), nm in zip(self.pieces, names) for t in ts})
        done: list[str] = []
        try:
            for (tmp, _), nm in zip(self.pieces, names):
                os.replace(tmp, os.path.join(self.folder, nm))
                done.append(os.path.join(self.folder, nm))
            _write_atomic(self.pending, meta, self.path)
        except BaseException:
            for f in done:
                if os.path.exists(f):
                    os.unlink(f)
            raise
        self.bytes_written += self.pending_bytes
        self.pending, self.pending_bytes, self.committed = {}, 0, True
        return done + [self.path]

    def abort(self) -> None:
        """Remove every temporary file (nothing under a final name was written yet)."""
        for tmp, _ in self.pieces:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.pieces, self.pending, self.pending_bytes = [], {}, 0


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor for ``t``: FSDP2's DTensor shards are gathered (a collective: every rank calls)."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) and type(t).__name__ == "DTensor" else t


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


def _gathered(items) -> dict:
    """{name: plain tensor} with DTensors gathered once per tensor object (ties stay ties)."""
    cache: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in items:
        if id(v) not in cache:
            cache[id(v)] = _full(v)
        out[k] = cache[id(v)]
    return out


def model_metadata(layers: dict, trainable: list[str], aliases: dict | None = None,
                   module_aliases: dict | None = None, kind: str = "model") -> dict:
    """The metadata of a model (or adapter) file: layers = {module name: layer config (JSON-able)},
    trainable = parameter names that require grad, aliases = {dropped tensor name: kept name},
    module_aliases = {other module name: module name}."""
    meta = {"format": FORMAT, "kind": kind, "version": __version__, "layers": json.dumps(layers),
            "aliases": json.dumps(aliases or {})}
    if kind == "model":
        meta["trainable"] = json.dumps(list(trainable))
        meta["module_aliases"] = json.dumps(module_aliases or {})
    return meta


def _is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save(model: nn.Module, path) -> None:
    """Write the converted model's weights and CERSA layer configs to ``path`` (safetensors), atomically.

    A wrapped model (torch.compile, DDP, FSDP1) is saved under the names of the model inside
    (``targets.unwrap``), so the file loads into the plain model and the other way round.  FSDP2
    parameters (DTensors) are gathered to full tensors: every rank must call ``save``; rank 0 writes.
    Raises ValueError if the model holds no CERSA layer (use safetensors directly for plain models).
    """
    model = unwrap(model)
    layers = cersa_modules(model)
    if not layers:
        raise ValueError("model: expected a model converted by cersa_kernels.convert, found no CERSA layer")
    state = _gathered(model.state_dict().items())
    tensors, aliases = _dedup(state)
    names = module_names(model)
    module_aliases = {a: n for n, m in layers.items() for a in names.get(id(m), [n]) if a != n}
    meta = model_metadata({n: m.cersa_config() for n, m in layers.items()},
                          [n for n, p in model.named_parameters() if p.requires_grad], aliases, module_aliases)
    if _is_rank0():
        _write_atomic(tensors, meta, path)


# ------------------------------------------------------------------------------------------- read
class Checkpoint:
    """A cersa_kernels file opened for reading: its metadata, and each tensor's shape and dtype from
    the headers (no data read), one tensor read on demand (``get``; tied names give the same tensor
    object).  Reads the single-file layout and the sharded one ("shards").

    Raises FileNotFoundError for a missing file (or shard), ValueError for a file that is not
    safetensors, not a cersa_kernels file, or of another ``kind`` (each naming ``path``).
    """

    def __init__(self, path, kind: str) -> None:
        from safetensors import safe_open

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"path: no such file {self.path!r}")
        self._open = safe_open
        fh = self._handle(self.path)
        meta = fh.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"path: {self.path!r} is not a cersa_kernels file (metadata format={meta.get('format')!r})")
        if meta.get("kind") != kind:
            raise ValueError(f"path: expected a cersa_kernels {kind} file, got kind={meta.get('kind')!r}; "
                             f"use {'load' if meta.get('kind') == 'model' else 'load_adapter'}()")
        self.meta = meta
        self._handles = {self.path: fh}
        self.file_of: dict[str, str] = {k: self.path for k in fh.keys()}
        folder = os.path.dirname(os.path.abspath(self.path))
        held: dict[str, set] = {}
        for name, shard in json.loads(meta.get("shards", "{}")).items():
            file = os.path.join(folder, shard)
            if file not in self._handles:
                if not os.path.isfile(file):
                    raise FileNotFoundError(f"path: {self.path!r} refers to the shard {shard!r}, which is missing")
                self._handles[file] = self._handle(file)
                held[file] = set(self._handles[file].keys())
            if name not in held[file]:
                raise ValueError(f"path: the shard {shard!r} of {self.path!r} lacks the tensor {name!r}")
            self.file_of[name] = file
        self.aliases = {d: k for d, k in json.loads(meta.get("aliases", "{}")).items() if k in self.file_of}
        self._cache: dict[str, torch.Tensor] = {}

    def _handle(self, file: str):
        try:
            return self._open(file, framework="pt")
        except Exception as exc:  # safetensors raises its own error type for a bad header
            raise ValueError(f"path: {file!r} is not a safetensors file: {exc}") from None

    @property
    def names(self) -> list[str]:
        """Every tensor name, tied names included."""
        return list(self.file_of) + list(self.aliases)

    def shape(self, name: str) -> tuple[int, ...]:
        name = self.aliases.get(name, name)
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (on the CPU, in its stored dtype); KeyError if the file lacks it."""
        name = self.aliases.get(name, name)
        if name not in self._cache:
            self._cache[name] = self._handles[self.file_of[name]].get_tensor(name)
        return self._cache[name]

    def close(self) -> None:
        """Drop the handles (tensors already read stay valid)."""
        self._handles, self._cache = {}, {}

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_keys(expected: dict, got: dict, what: str) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(f"{k}: file {tuple(got[k])} vs model {tuple(expected[k])}"
                    for k in set(expected) & set(got) if tuple(got[k]) != tuple(expected[k]))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes}")
        raise ValueError(f"{what} does not match the model: " + "; ".join(parts))


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def load(path, model: nn.Module, device=None) -> nn.Module:
    """Load a file written by :func:`save` (or ``cersa-kernels convert``) into ``model``, an
    unconverted model of the same architecture: the CERSA layers are rebuilt from the stored configs
    and factors (no SVD), then every tensor is loaded and the saved requires_grad flags restored.
    Returns the model.

    model: a model with real tensors (each file tensor is copied into the model's own, in the
      model's dtype), or one whose parameters were never allocated: built under accelerate's
      ``init_empty_weights()`` (parameters on the meta device, buffers real) or under
      ``torch.device("meta")`` when all its buffers are in its state dict.  Then only what the file
      holds is materialised: factors, deltas, every unconverted parameter and persistent buffer
      (in the dtype of the model's meta tensor, on ``device``); CERSA layers are built from the
      file's configs on the meta device, never allocating a dense weight.  Tensors read from the file
      stay memory-mapped (copy-on-write) where no cast is needed.
    device: where meta tensors are materialised (default: the CPU); tensors already on a real device
      stay there.
    A wrapped model (torch.compile, DDP, FSDP1) is loaded inside its wrapper; names written with
    wrapper prefixes by other tools are stripped (``targets.strip_wrapper_prefix``).  Hooks on the
    replaced modules move to the CERSA layers, as in ``convert``.

    A tensor the model ties to another (an output head sharing the input embedding) may be in the
    file once, under either name.
    Raises FileNotFoundError, or ValueError listing missing / unexpected keys, shape mismatches,
    layers that do not fit and buffers that are on the meta device but not in the file; then the
    model is unchanged (every tensor is read before the model is touched).
    """
    outer, model = model, unwrap(model)
    with Checkpoint(path, "model") as ck:
        _load_model(ck, model, device)
    if outer is not model:
        outer.__dict__["cersa_report"] = model.cersa_report
    return outer


def _load_model(ck: Checkpoint, model: nn.Module, device) -> None:
    meta = ck.meta
    pre = strip_wrapper_prefix(ck.names, model)
    plain = lambda n: n[len(pre):] if pre and n.startswith(pre) else n  # noqa: E731
    file_name = {plain(k): k for k in ck.names}
    layers = {plain(n): cfg for n, cfg in json.loads(meta["layers"]).items()}
    extra_names: dict[str, set[str]] = {}
    for a, n in json.loads(meta.get("module_aliases", "{}")).items():
        extra_names.setdefault(plain(n), set()).add(plain(a))
    modules = dict(model.named_modules(remove_duplicate=False))
    all_names = module_names(model)
    new: dict[str, CersaModule] = {}
    where: dict[str, list[str]] = {}  # layer name -> every name it goes under
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
            layer = cls.from_config(cfg, device=w.device, dtype=w.dtype, like=old)
        except (TypeError, ValueError, KeyError) as exc:
            problems.append(f"{name}: {exc}")
            continue
        why = layer.mismatch(old)
        if why:
            problems.append(f"{name}: {why}")
            continue
        names = list(dict.fromkeys(all_names.get(id(old), [name]) + sorted(extra_names.get(name, ()))))
        for a in names:
            other = modules.get(a)
            parent = a.rpartition(".")[0]
            if other is None and parent and parent not in modules:
                problems.append(f"{a}: the file holds layer {name!r} under this name too, but the model has no "
                                f"module {parent!r}")
            elif other is not None and other is not old:
                why = layer.mismatch(other)
                if why:
                    problems.append(f"{a}: {why}")
        new[name], where[name] = layer, names
    if problems:
        raise ValueError("model: cannot rebuild the saved CERSA layers: " + "; ".join(problems))
    replaced = [a for names in where.values() for a in names]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not _under(k, replaced)}
    for n, layer in new.items():
        for k, v in layer.state_dict().items():
            for a in where[n]:
                expected[f"{a}.{k}"] = tuple(v.shape)
    # a tie in the model (lm_head.weight is wte.weight) needs its tensor in the file only once
    groups: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if not _under(k, replaced):
            groups.setdefault(id(v), []).append(k)
    for keys in groups.values():
        held = [k for k in keys if k in file_name]
        for k in keys:
            if held and k not in file_name:
                file_name[k] = file_name[held[0]]
    _check_keys(expected, {k: ck.shape(f) for k, f in file_name.items()}, f"checkpoint {ck.path!r}")
    meta_buffers = [f"{mn}.{b}" if mn else b for mn, mod in model.named_modules() if not _under(mn, replaced)
                    for b in sorted(mod._non_persistent_buffers_set)
                    if mod._buffers.get(b) is not None and mod._buffers[b].is_meta]
    if meta_buffers:
        raise ValueError(f"model: the buffers {meta_buffers} are on the meta device and not in the file (they are "
                         f"not part of the state dict); build the model under accelerate's init_empty_weights(), "
                         f"which keeps buffers real, or on a real device")
    tensors = {k: ck.get(file_name[k]) for k in expected}  # everything is read before the model changes
    for n, layer in new.items():
        old = modules[n]
        carry_over(old, layer)
        attach_skeleton(layer, old)
        for a in where[n]:
            set_module(model, a, layer)
    state = model.state_dict(keep_vars=True)
    if not any(v.is_meta for v in state.values()):
        model.load_state_dict(tensors, strict=True)
    else:
        target = torch.device(device) if device is not None else torch.device("cpu")
        made: dict[int, torch.Tensor] = {}
        ready = {}
        with torch.no_grad():
            for k, cur in state.items():
                if cur.is_meta:
                    if id(cur) not in made:
                        t = tensors[k].to(device=target, dtype=cur.dtype)
                        made[id(cur)] = nn.Parameter(t, requires_grad=cur.requires_grad) \
                            if isinstance(cur, nn.Parameter) else t
                    ready[k] = made[id(cur)]
                else:
                    cur.copy_(tensors[k])
                    ready[k] = cur
        model.load_state_dict(ready, strict=True, assign=True)
    disable_fast_paths(model, is_cersa)
    trainable = {plain(n) for n in json.loads(meta.get("trainable", "[]"))}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    model.cersa_report = ConversionReport(layers=[record_of(n, m, "converted", "loaded", kind=type(m).__name__)
                                                  for n, m in new.items()])


def save_adapter(model: nn.Module, path) -> None:
    """Write only what was trained (every parameter with requires_grad: the deltas A, B and, when
    trained, S, biases, or a task head) plus the CERSA layer configs, atomically.  The base
    model is rebuilt by converting the same pretrained model with the same settings.  Wrapped
    models as :func:`save`."""
    model = unwrap(model)
    layers = cersa_modules(model)
    if not layers:
        raise ValueError("model: expected a model converted by cersa_kernels.convert, found no CERSA layer")
    params = _gathered((n, p) for n, p in model.named_parameters() if p.requires_grad)
    if not params:
        raise ValueError("model: no parameter requires grad, so there is no adapter to save")
    tensors, aliases = _dedup(params)
    meta = model_metadata({n: m.cersa_config() for n, m in layers.items()}, [], aliases, kind="adapter")
    if _is_rank0():
        _write_atomic(tensors, meta, path)


def load_adapter(path, model: nn.Module) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` into a model converted with the same settings.

    Raises ValueError listing missing keys, unknown keys, shape mismatches or layer-config
    differences (frozen_rank, delta_rank, scale); then the model is unchanged.
    """
    outer, model = model, unwrap(model)
    with Checkpoint(path, "adapter") as ck:
        pre = strip_wrapper_prefix(ck.names, model)
        plain = lambda n: n[len(pre):] if pre and n.startswith(pre) else n  # noqa: E731
        layers = {plain(n): cfg for n, cfg in json.loads(ck.meta["layers"]).items()}
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
            for at, a, b in pairs:
                for key in ("type", "in_features", "out_features", "frozen_rank", "delta_rank", "scale"):
                    if key in a and a.get(key) != b.get(key):
                        diffs.append(f"{at}.{key}: file {b.get(key)!r} vs model {a.get(key)!r}")
        if diffs:
            raise ValueError(f"adapter {os.fspath(path)!r} was saved from a differently converted model: "
                             + "; ".join(diffs))
        params = dict(model.named_parameters(remove_duplicate=False))
        names = {plain(k): k for k in ck.names}
        unexpected = sorted(set(names) - set(params))
        shapes = sorted(f"{k}: file {ck.shape(f)} vs model {tuple(params[k].shape)}"
                        for k, f in names.items() if k in params and ck.shape(f) != tuple(params[k].shape))
        missing = sorted(f"{n}.{p}" for n, m in model.named_modules() if n and isinstance(m, CersaLayer)
                         for p in ("A", "B") if f"{n}.{p}" not in names)
        if unexpected or shapes or missing:
            parts = [f"unexpected keys: {unexpected}"] if unexpected else []
            parts += [f"missing keys: {missing}"] if missing else []
            parts += [f"shape mismatches: {shapes}"] if shapes else []
            raise ValueError(f"adapter {os.fspath(path)!r} does not match the model: " + "; ".join(parts))
        tensors = {k: ck.get(f) for k, f in names.items()}
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
            params[k].requires_grad_(True)
    return outer


def load_layers(path, device=None) -> dict[str, CersaModule]:
    """The CERSA modules saved in a :func:`save` file, rebuilt from their configs and factors
    without the model they belong to: {module name: CersaModule} (each in its saved dtype, on
    ``device``).  For tools that need the layers alone (e.g. ``merge()`` each of them).  Raises as
    :func:`load` for a file that is not a cersa_kernels model file."""
    out: dict[str, CersaModule] = {}
    with Checkpoint(path, "model") as ck:
        for name, cfg in json.loads(ck.meta["layers"]).items():
            cls = LAYER_TYPES.get(cfg.get("type"))
            if cls is None:
                raise ValueError(f"path: layer {name!r} has unknown type {cfg.get('type')!r}")
            own = {k[len(name) + 1:]: ck.get(k) for k in ck.names if k.startswith(name + ".")}
            dtype = next((v.dtype for v in own.values() if v.is_floating_point()), None)
            layer = cls.from_config(cfg, device=device, dtype=dtype)
            layer.load_state_dict(own, strict=True)
            out[name] = layer
    return out
