"""Streaming conversion: a checkpoint on disk -> a cersa_kernels model file, one weight at a time.

``convert_file(source, out, energy=0.93)`` (the CLI's ``cersa-kernels convert``) never builds the
model's tensors: it reads the source's safetensors headers, lays the modules out on the meta
device (from the transformers config in the folder, or, without one, one nn.Linear per 2-D
floating ``*.weight`` except embeddings and the LM head), selects the targets with the same rules
as ``convert`` (``targets.collect``: the layer registry decides), and then, for each source tensor
in file order, either decomposes the module it belongs to (read with safetensors' ``safe_open``,
built with the registry's ``from_dense`` under ``convert.seeded``, so the ranks and factors are
those of ``convert`` on the same weights) or copies the tensor through.  The output is written as
it is made (``io.ShardedWriter``: pieces of at most ``max_shard_size`` bytes, renamed into place
only when the whole conversion succeeded) with the metadata ``io.save`` writes, so
``cersa_kernels.load`` reads it.  A budget needs every spectrum first: one extra pass that reads
each target weight once more.  docs/design.md "File format" and "Rank policies".
"""
from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import CersaConfig
from .convert import config_from_keywords, seeded
from .decompose import singular_values
from .io import ShardedWriter, model_metadata
from .planning import (budget_ranks, keeps_dense, layer_nbytes, layer_ranks, no_saving_reason, policy_summary,
                       spectrum_method)
from .report import ConversionReport, LayerRecord, record_of
from .targets import collect

__all__ = ["convert_file", "StreamResult", "Source", "DEFAULT_MAX_SHARD_SIZE"]

#: bytes per output piece (``io.ShardedWriter``): the most the writer holds in memory at once.
DEFAULT_MAX_SHARD_SIZE = 256 * 2**20

_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
#: module names taken for embeddings / output heads when there is no config: a component containing
#: "embed", or exactly lm_head / embed_out / wte / wpe / shared.
_EMBEDDING = re.compile(r"(?:^|\.)[^.]*embed[^.]*(?:\.|$)|(?:^|\.)(?:lm_head|embed_out|wte|wpe|shared)$", re.I)


@dataclass
class StreamResult:
    """What ``convert_file`` did: the per-layer report (as ``convert``'s), the files written (the
    main file last), notes on how the source was read (layout guesses, tensors dropped or not
    matched), and the bytes of the source tensors and of the output."""

    report: ConversionReport
    files: list[str]
    notes: list[str] = field(default_factory=list)
    source_bytes: int = 0
    written_bytes: int = 0

    def __str__(self) -> str:
        lines = [str(self.report)] + [f"note: {n}" for n in self.notes]
        lines.append(f"wrote {len(self.files)} file(s), {self.written_bytes / 2**20:.1f} MiB of tensors "
                     f"(source {self.source_bytes / 2**20:.1f} MiB): {', '.join(self.files)}")
        return "\n".join(lines)


class Source:
    """A checkpoint on disk: a .safetensors file, or a transformers model folder (model.safetensors,
    or shards listed by model.safetensors.index.json), read header by header.

    Attributes: files (the safetensors files), keys (tensor names in file order), folder (the
    folder that may hold config.json, None for a lone file).  ``shape``/``dtype`` come from the
    headers; ``get(name)`` reads one tensor through its own safe_open handle (the memory map is
    dropped with the tensor, so reading a large file does not keep it resident).
    Raises FileNotFoundError / ValueError naming ``source`` for anything that is not such a checkpoint.
    """

    def __init__(self, source) -> None:
        from safetensors import safe_open

        self._open = safe_open
        path = os.fspath(source)
        if os.path.isdir(path):
            self.folder = path
            index = os.path.join(path, "model.safetensors.index.json")
            single = os.path.join(path, "model.safetensors")
            if os.path.isfile(index):
                try:
                    with open(index) as fh:
                        weight_map = json.load(fh)["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"source: {index!r} is not a safetensors index (weight_map): {exc}") from None
                files = list(dict.fromkeys(os.path.join(path, f) for f in weight_map.values()))
            elif os.path.isfile(single):
                files = [single]
            else:
                found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
                if len(found) != 1:
                    raise ValueError(f"source: the folder {path!r} holds neither model.safetensors nor "
                                     f"model.safetensors.index.json" + (f" (found {found})" if found else ""))
                files = [os.path.join(path, found[0])]
        elif os.path.isfile(path):
            self.folder = None
            files = [path]
        else:
            raise FileNotFoundError(f"source: no such file or folder {path!r}")
        self.files = files
        self._where: dict[str, str] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, str] = {}
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"source: the shard {f!r} listed by the index is missing")
            try:
                fh = safe_open(f, framework="pt")
            except Exception as exc:  # safetensors' own error type for a bad header
                raise ValueError(f"source: {f!r} is not a safetensors checkpoint: {exc}") from None
            meta = fh.metadata() or {}
            if meta.get("format") == "cersa_kernels":
                raise ValueError(f"source: {f!r} is already a cersa_kernels file (converted)")
            for k in fh.keys():
                if k in self._where:
                    raise ValueError(f"source: tensor {k!r} is in both {self._where[k]!r} and {f!r}")
                sl = fh.get_slice(k)
                self._where[k], self._shape[k], self._dtype[k] = f, tuple(sl.get_shape()), sl.get_dtype()
            del fh
        if not self._where:
            raise ValueError(f"source: {path!r} holds no tensor")
        self.keys = list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shape[key]

    def dtype(self, key: str) -> str:
        return self._dtype[key]

    def nbytes(self, key: str) -> int:
        n = 1
        for d in self._shape[key]:
            n *= d
        size = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2}.get(self._dtype[key], 1)
        return n * size

    def get(self, key: str) -> torch.Tensor:
        fh = self._open(self._where[key], framework="pt")
        t = fh.get_tensor(key)
        del fh
        return t


# ------------------------------------------------------------------------------------- layout
def _tree(entries: dict[str, nn.Module]) -> nn.Module:
    """An nn.Module holding each module of ``entries`` at its dotted name (plain containers between)."""
    root = nn.Module()
    for name, mod in entries.items():
        parent = root
        parts = name.split(".")
        for p in parts[:-1]:
            if p not in parent._modules:
                parent.add_module(p, nn.Module())
            parent = parent._modules[p]
        parent.add_module(parts[-1], mod)
    return root


def _guessed_layout(src: Source) -> tuple[nn.Module, list[str]]:
    """Without a config: one meta nn.Linear (out, in) per 2-D floating ``*.weight`` that is not an
    embedding or LM head (bias from ``*.bias`` of shape (out,) when present)."""
    entries: dict[str, nn.Module] = {}
    skipped = []
    for k in src.keys:
        if not k.endswith(".weight") or len(src.shape(k)) != 2 or src.dtype(k) not in _FLOAT_DTYPES:
            continue
        name = k[:-len(".weight")]
        if _EMBEDDING.search(name):
            skipped.append(name)
            continue
        out_f, in_f = src.shape(k)
        bias = f"{name}.bias" in src._shape and src.shape(f"{name}.bias") == (out_f,)
        entries[name] = nn.Linear(in_f, out_f, bias=bias, device="meta", dtype=_FLOAT_DTYPES[src.dtype(k)])
    notes = [f"no transformers config next to the checkpoint: every 2-D floating *.weight was taken as an "
             f"nn.Linear weight (out, in) ({len(entries)} tensors), except embeddings and LM heads "
             f"({len(skipped)}: {', '.join(skipped[:4])}{', ...' if len(skipped) > 4 else ''}); Conv1D layouts "
             f"(GPT-2) need the config"]
    return _tree(entries), notes


def _config_layout(folder: str):
    """(meta model built from the folder's transformers config, note) or (None, why not)."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return None, ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        cfg = transformers.AutoConfig.from_pretrained(folder)
        arch = (getattr(cfg, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            model = cls(cfg) if cls is not None else transformers.AutoModel.from_config(cfg)
    except Exception as exc:  # any failure: fall back to the guessed layout, and say so
        return None, f"could not build the model of {os.path.join(folder, 'config.json')} ({type(exc).__name__}: {exc})"
    return model, f"modules laid out by {type(model).__name__} from {os.path.join(folder, 'config.json')}"


def _key_map(file_keys: list[str], model_keys: set[str], prefix: str):
    """(file -> model name, model -> file name) functions: identity, or the base-model prefix
    removed from / added to the file names, whichever matches the most keys."""
    cands = [(lambda k: k, lambda k: k)]
    if prefix:
        p = prefix + "."
        cands.append((lambda k: k[len(p):] if k.startswith(p) else k, lambda k: p + k))
        cands.append((lambda k: p + k, lambda k: k[len(p):] if k.startswith(p) else k))
    return max(cands, key=lambda c: sum(c[0](k) in model_keys for k in file_keys))


# --------------------------------------------------------------------------------------- main
def convert_file(source, out, energy: float | None = 0.93, *, rank: int | None = None, budget: float | None = None,
                 target_modules=None, exclude=None, device="cpu", progress: bool = True,
                 max_shard_size: int | None = DEFAULT_MAX_SHARD_SIZE, config: CersaConfig | None = None,
                 **options) -> StreamResult:
    """Convert a checkpoint on disk into a cersa_kernels model file without loading the model.

    source: a .safetensors file, or a transformers model folder (model.safetensors, or shards with
      model.safetensors.index.json; its config.json lays out the modules, which tells Conv1D
      layouts apart).  Without a config every 2-D floating ``*.weight`` except embeddings and LM
      heads is taken as an nn.Linear weight (the result's notes say so).
    out: the file to write (a single file, or, beyond ``max_shard_size`` bytes, that file plus
      ``<stem>-0000i-of-0000N.safetensors`` pieces it lists); ``cersa_kernels.load(out, model)``
      reads it into the model (built normally, or on the meta device).
    energy, rank, budget, config and the other options: as ``cersa_kernels.convert`` (the same
      CersaConfig, the same rank policy and the same ``max_frozen_ratio`` rule); target_modules /
      exclude: as ``convert``, matched against the module names of the layout.
    device: where each weight is decomposed ("cpu" or "cuda"); the output is always written from
      the CPU.  progress: a tqdm bar over the source's bytes.
    Tensors not decomposed are copied through unchanged (in their own dtype), except buffers the
      config's model declares non-persistent (it makes them itself; noted).  Each layer's factors
      are those ``convert`` makes from the same weight on the same device (random numbers from
      ``convert.seeded`` of the layer's name).  At most one piece of the output, one weight and its
      decomposition are in memory at a time.
    Nothing is written until the source, the options and the layout are checked; an error or an
    interrupt during the conversion removes every temporary file (no partial output).
    Raises FileNotFoundError / ValueError naming ``source`` (not a checkpoint; tensors that disagree
    with the config), ``out`` (a missing folder, the source itself), ``target_modules`` / ``exclude``
    (a pattern that matches nothing), ``device``, or the CersaConfig field at fault.
    Returns a :class:`StreamResult`.
    Activation-aware truncation needs the model to run on calibration data, which a file on disk
    cannot: ``calibration`` and the other ``calibration_*`` keywords raise TypeError here;
    load the model and use ``cersa_kernels.convert(model, calibration=...)`` (docs/design.md
    "Activation-aware truncation").
    """
    from tqdm.auto import tqdm

    calib = sorted(k for k in options if k.startswith("calibration"))
    if calib:
        raise TypeError(f"{calib[0]}: convert_file cannot run the model, so it cannot calibrate the truncation "
                        f"on its inputs; load the model and call cersa_kernels.convert(model, calibration=...)")
    config = config_from_keywords(energy, rank, budget, config, options)
    dev = _check_device(device)
    src = Source(source)
    out = os.fspath(out)
    out_abs = os.path.abspath(out)
    if os.path.isdir(out_abs):
        raise ValueError(f"out: {out!r} is a folder; give the path of the .safetensors file to write")
    if not os.path.isdir(os.path.dirname(out_abs)):
        raise ValueError(f"out: the folder of {out!r} does not exist")
    if any(os.path.exists(out_abs) and os.path.samefile(out_abs, f) for f in src.files):
        raise ValueError(f"out: {out!r} is the source checkpoint itself; write to another file")

    notes: list[str] = []
    model, why = _config_layout(src.folder) if src.folder else (None, "")
    if model is None:
        if why:
            notes.append(why)
        model, guessed = _guessed_layout(src)
        notes += guessed
        f2m = m2f = (lambda k: k)
        dropped: set[str] = set()
    else:
        notes.append(why)
        state = model.state_dict()
        f2m, m2f = _key_map(src.keys, set(state), getattr(model, "base_model_prefix", ""))
        bad = [f"{k}: {src.shape(k)} in the checkpoint, {tuple(state[f2m(k)].shape)} in the config's model"
               for k in src.keys if f2m(k) in state and src.shape(k) != tuple(state[f2m(k)].shape)]
        if bad:
            raise ValueError(f"source: {len(bad)} tensor(s) disagree with {os.path.join(src.folder, 'config.json')}: "
                             + "; ".join(bad[:10]) + ("; ..." if len(bad) > 10 else ""))
        non_persistent = {f"{mn}.{b}" if mn else b for mn, m in model.named_modules()
                          for b in m._non_persistent_buffers_set}
        dropped = {k for k in src.keys if f2m(k) in non_persistent}
        if dropped:
            notes.append(f"dropped {sorted(dropped)}: non-persistent buffers of the config's model (it makes them)")
        unknown = [k for k in src.keys if f2m(k) not in state and k not in dropped]
        if unknown:
            notes.append(f"copied {len(unknown)} tensor(s) the config's model does not have: {unknown[:6]}"
                         + (" ..." if len(unknown) > 6 else ""))
        absent = sorted(set(state) - {f2m(k) for k in src.keys})
        if absent:
            notes.append(f"the config's model has {len(absent)} tensor(s) the checkpoint lacks (tied or made by "
                         f"the model): {absent[:6]}" + (" ..." if len(absent) > 6 else ""))

    report = ConversionReport(energy=config.energy)
    todo, names = collect(model, target_modules, exclude, report)
    file_keys = set(src.keys)
    jobs = []  # (file-side name, meta module, layer class, {local key: file key})
    for name, mod, cls in todo:
        keys = {k: m2f(f"{name}.{k}") for k in mod.state_dict()}
        missing = [f for f in keys.values() if f not in file_keys]
        if missing:
            m, n = cls.dense_shape(mod)
            report.layers.append(LayerRecord(m2f(name), cls.kind, m, n, "dense",
                                             f"not in the checkpoint ({', '.join(missing)})"))
            continue
        jobs.append((m2f(name), mod, cls, keys))
    owned = {f: j for j, (_, _, _, keys) in enumerate(jobs) for f in keys.values()}

    def materialise(mod, keys) -> nn.Module:
        real = copy.deepcopy(mod)
        real.load_state_dict({k: src.get(f) for k, f in keys.items()}, strict=True, assign=True)
        return real.to(dev)

    total = sum(src.nbytes(k) for k in src.keys)
    policy = policy_summary(config)
    allocated = None
    if config.budget is not None and jobs:
        spectra, shapes = [], []
        for name, mod, cls, keys in tqdm(jobs, desc="CERSA spectra", unit="layer", disable=not progress):
            real = materialise(mod, keys)
            for label, W in cls.matrices(real):
                spectra.append(singular_values(W, name, svd=spectrum_method(config.svd)))
                shapes.append(tuple(W.shape))
            del real
        alloc, summary = budget_ranks(spectra, shapes, config)
        policy.update(summary)
        allocated, i = [], 0
        for _, mod, cls, _ in jobs:
            k = len(cls.matrices(mod))
            allocated.append(alloc.ranks[i:i + k])
            i += k
    report.policy = policy

    layers, trainable = {}, []
    done_jobs: set[int] = set()
    bar = tqdm(total=total, desc="CERSA stream", unit="B", unit_scale=True, disable=not progress)
    try:
        with ShardedWriter(out, max_shard_size) as writer:
            for key in src.keys:
                j = owned.get(key)
                if j is None:
                    bar.set_postfix_str(key, refresh=False)
                    if key not in dropped:
                        writer.add(key, src.get(key))
                    bar.update(src.nbytes(key))
                    continue
                if j in done_jobs:
                    continue
                done_jobs.add(j)
                name, mod, cls, keys = jobs[j]
                bar.set_postfix_str(name, refresh=False)
                real = materialise(mod, keys)
                if allocated is not None:
                    ranks = allocated[j]
                else:
                    with seeded(name, dev):
                        ranks = layer_ranks([(name, real, cls)], config)[0][0]
                with seeded(name, dev):
                    new = cls.from_dense(real, config, ranks=ranks, name=name)
                rec = record_of(name, new)
                stored, dense = layer_nbytes(new)  # bytes, as convert decides
                if keeps_dense(stored, dense, config.max_frozen_ratio):
                    rec.status, rec.params_after = "dense", 0
                    rec.reason = no_saving_reason(new, stored, dense, config.max_frozen_ratio)
                    for f in keys.values():
                        writer.add(f, src.get(f))
                else:
                    for k, t in new.state_dict().items():
                        writer.add(f"{name}.{k}", t)
                    layers[name] = new.cersa_config()
                    trainable += [f"{name}.{k}" for k, p in new.named_parameters() if p.requires_grad]
                report.layers.append(rec)
                del real, new
                bar.update(sum(src.nbytes(f) for f in keys.values()))
            if not layers:
                raise ValueError("source: no layer was converted (every target stays dense); nothing written. "
                                 "Lower energy=, raise max_frozen_ratio= or check target_modules=")
            files = writer.commit(model_metadata(layers, trainable))
            written = writer.bytes_written
    finally:
        bar.close()
    order = {m2f(n): i for i, n in enumerate(names)}
    report.layers.sort(key=lambda l: order.get(l.name, len(order)))
    return StreamResult(report, files, notes, source_bytes=total, written_bytes=written)


def _check_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu' or 'cuda' (optionally 'cuda:N'), got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for, but no CUDA device is available")
    return dev
