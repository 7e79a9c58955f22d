"""The runner of every fine-tuning front end (python/finetune_*.py), and its helpers.

A front end describes itself with a ``FrontEnd`` and supplies one function,
``setup(method, args) -> Task``: it loads its data and its model, prepares the model for the method
with ``prepare_method`` (CERSA through ``cersa_kernels.convert``, PEFT LoRA with the same delta rank
on the same target layers, full fine-tuning, or a linear probe), and returns the model, the head's
parameters, the training batches, the loss and the metric.  ``main(front_end, argv)`` does the rest,
the same way for every front end:

* the command line: ``--method M`` (one method, in this process) or ``--compare`` (the default: each
  method of ``--methods`` in its own subprocess, so each peak memory belongs to one method), and the
  common options ``--energy --delta-rank --steps --batch-size --seed --lr --head-lr --weight-decay
  --threads --log-every --quiet --json`` (and, for a front end offering cersa, ``--quantize
  {none,int8,nf4} --double-quant``: the storage of CERSA's frozen factors); besides its own methods
  a front end accepts their variants (``METHOD_VARIANTS``): cersa-int8 / cersa-nf4 (CERSA with U, Vh
  stored as int8 / NF4 codes) where it offers cersa, qlora (PEFT LoRA over bitsandbytes NF4 base
  weights, ``_qlora.make_qlora``) where it offers lora; the environment variable ``STEPS=N`` (also as a Make
  variable: ``make demo STEPS=5``) replaces the default number of steps, for short check runs;
* the seed (``torch.manual_seed(args.seed)`` before ``setup``), AdamW with two parameter groups (the
  trainable body parameters at ``--lr``, default per method, and the head at ``--head-lr``), a 10 %
  linear warm-up then linear decay to zero at the last step;
* the measurements: training peak memory (VmHWM of the process, reset just before the first step),
  s / step (median wall time of a step after the first; fetching the batch counts), trainable and
  frozen parameters, the bytes of the base weights as stored (dense W; U, S, Vh of CERSA layers,
  quantized codes and scales included; the packed NF4 weight of QLoRA), the metric;
* one markdown table with the same columns for every front end, and JSON results (``--json PATH``).

Front-end code only: the cersa_kernels package does not import this module, and a method that is not
CERSA never imports the package.  Standard library only at import time (torch, transformers, peft
are imported inside the functions), so a front end can set environment variables (for example
HF_HUB_OFFLINE) before anything heavy is imported and bench/memory_worker.py can use the /proc
helpers without adding to its baseline memory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

# Every front end imports this module first (its own folder is on sys.path when it runs as a script, and
# tests put it there): a source checkout without `pip install -e .` then still finds the package (an
# installed one wins).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

__all__ = ["FrontEnd", "Task", "Metric", "main", "run_method", "build_parser", "format_table", "prepare_method",
           "base_weights", "layer_names", "classification_loss", "rank_distribution", "format_rank_distribution",
           "warmup_linear_decay", "child_argv", "compare_in_subprocesses", "method_table", "param_stats",
           "status_mib", "peak_rss_mib", "current_rss_mib", "reset_peak_rss", "mib", "percent", "method_base",
           "cersa_quantize", "METHOD_VARIANTS", "KNOWN_METHODS", "QUANTIZE_CHOICES"]


# ----------------------------------------------------------------------------------------------
# process memory (Linux /proc/self)
# ----------------------------------------------------------------------------------------------
def status_mib(key: str) -> float:
    """The value of field ``key`` (with its colon, e.g. "VmHWM:") of /proc/self/status in MiB,
    NaN when the file or the field is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB: VmHWM from /proc/self/status (Linux), else
    ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    v = status_mib("VmHWM:")
    if not math.isnan(v):
        return v
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / 2**20 if sys.platform == "darwin" else ru / 1024.0


def current_rss_mib() -> float:
    """Current resident set size in MiB (VmRSS), NaN where /proc is missing."""
    return status_mib("VmRSS:")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: write 5 to /proc/self/clear_refs);
    True when it worked, so a later VmHWM reading measures from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# model accounting
# ----------------------------------------------------------------------------------------------
def param_stats(model) -> dict:
    """trainable / frozen parameter counts and bytes of the nn.Module ``model`` (shared tensors once)."""
    seen: set[int] = set()
    st = {"trainable": 0, "frozen": 0, "trainable_bytes": 0, "frozen_bytes": 0}
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        key = "trainable" if p.requires_grad else "frozen"
        st[key] += p.numel()
        st[key + "_bytes"] += p.numel() * p.element_size()
    return st


def layer_names(module, types=None) -> list[str]:
    """Dotted names (relative to ``module``) of its submodules of the given types (default
    ``(nn.Linear,)``), in module order."""
    from torch import nn

    types = types or (nn.Linear,)
    return [n for n, m in module.named_modules() if n and isinstance(m, types)]


def _cersa_factor_types() -> tuple:
    """The CERSA classes that own one set of factors U, S, Vh (empty while cersa_kernels is not
    imported: lora and full never import the package)."""
    layers_mod = sys.modules.get("cersa_kernels.layers")
    if layers_mod is None:
        return ()
    base = getattr(layers_mod, "CersaLayer", None)
    return (base,) if base is not None else (layers_mod.CersaLinear, layers_mod.CersaConv2d)


def _storage(factor) -> tuple[int, bool]:
    """(bytes, requires grad) of a factor: a tensor, or a module holding it (quantized codes and scales)."""
    if hasattr(factor, "numel"):
        return factor.numel() * factor.element_size(), factor.requires_grad
    tensors = list(factor.parameters()) + list(factor.buffers())
    return sum(t.numel() * t.element_size() for t in tensors), any(t.requires_grad for t in tensors)


def _qlora_module():
    """python/_qlora.py (imported on first use, from this file's folder)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import _qlora

    return _qlora


def _linear4bit_type():
    """bitsandbytes' Linear4bit class, or None while bitsandbytes is not imported (only qlora imports it)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    return getattr(bnb_nn, "Linear4bit", None) if bnb_nn is not None else None


def base_weights(module, types=None, ignore=()) -> tuple[int, int, bool]:
    """(layers, bytes, any trainable) of the base weights in ``module``, as stored.

    Base weight: W of a dense layer of ``types`` (default ``(nn.Linear,)``; also the ``base_layer`` of
    a PEFT LoRA layer, whose lora_A / lora_B are not counted); U, S, Vh of a CERSA layer as stored
    (``CersaLayer.frozen_nbytes()``: with quantized factors the int8 / NF4 codes and the block
    scales of U and Vh; the deltas A, B are not counted); the packed NF4 weight of a bitsandbytes
    Linear4bit of QLoRA (``_qlora.frozen_base_bytes``: codes, block absmax and double-quantization
    statistics).  Biases are excluded (equal in every case).  The third value is True when any of
    these tensors requires grad (full fine-tuning), not counting the tensors whose id() is in
    ``ignore`` (a new head that the base module includes)."""
    from torch import nn

    types = types or (nn.Linear,)
    factor_types = _cersa_factor_types()
    linear4bit = _linear4bit_type()
    count = nbytes = 0
    trainable = False
    for name, mod in module.named_modules():
        if factor_types and isinstance(mod, factor_types):
            factors = (mod.U, mod.S, mod.Vh)
            if hasattr(mod, "frozen_nbytes"):
                nbytes += mod.frozen_nbytes()
            else:
                nbytes += sum(_storage(f)[0] for f in factors)
            for factor in factors:
                grad = _storage(factor)[1]
                trainable = trainable or (grad and id(factor) not in ignore)
        elif linear4bit is not None and isinstance(mod, linear4bit) and "lora_" not in name:
            nbytes += _qlora_module().frozen_base_bytes(mod)
            w = mod.weight
            trainable = trainable or (w.requires_grad and id(w) not in ignore)
        elif isinstance(mod, types) and "lora_" not in name:
            w = mod.weight
            nbytes += w.numel() * w.element_size()
            trainable = trainable or (w.requires_grad and id(w) not in ignore)
        else:
            continue
        count += 1
    return count, nbytes, trainable


# ----------------------------------------------------------------------------------------------
# per-method model preparation
# ----------------------------------------------------------------------------------------------
def rank_distribution(report) -> list[dict]:
    """Per layer of a CERSA conversion report that has a rank (converted, or left dense because
    the factors would not save memory): name, shape, energy rank r, r / min(m, n), status."""
    rows = []
    for rec in report.layers:
        if rec.rank is None:
            continue
        p = min(rec.out_features, rec.in_features)
        rows.append({"name": rec.name, "out": rec.out_features, "in": rec.in_features, "rank": rec.rank,
                     "fraction": rec.rank / p if p else float("nan"), "status": rec.status})
    return rows


def format_rank_distribution(rows: list[dict], energy: float, kind: str = "") -> str:
    """min / median / max of r / min(m, n) and a text histogram in bins of 0.1; ``kind`` names the
    layers in the first line ("Linear" -> "over 37 Linear layers")."""
    if not rows:
        return "no converted layer"
    fr = sorted(r["fraction"] for r in rows)
    dense = sum(1 for r in rows if r["status"] != "converted")
    lines = [f"energy rank fraction r / min(m, n) at energy {energy} over {len(fr)} {kind + ' ' if kind else ''}"
             f"layers ({len(fr) - dense} converted, {dense} left dense): "
             f"min {fr[0]:.2f}, median {statistics.median(fr):.2f}, max {fr[-1]:.2f}"]
    by_shape: dict[str, list[float]] = {}
    for r in rows:
        by_shape.setdefault(f"{r['out']} x {r['in']}", []).append(r["fraction"])
    for shape, vals in sorted(by_shape.items()):
        lines.append(f"  {shape:>11}: {len(vals):2d} layers, fraction {min(vals):.2f}-{max(vals):.2f} "
                     f"(median {statistics.median(vals):.2f})")
    lines.append("  histogram of r / min(m, n):")
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        n = sum(1 for f in fr if lo <= f < hi or (b == 9 and f == 1.0))
        if n:
            lines.append(f"    [{lo:.1f}, {hi:.1f}{']' if b == 9 else ')'} {n:3d} {'#' * n}")
    return "\n".join(lines)


#: the methods ``prepare_method`` knows.
KNOWN_METHODS = ("cersa", "cersa-int8", "cersa-nf4", "lora", "qlora", "full", "head")
#: variants of a base method: {variant: base}.  A front end offering the base also accepts the
#: variant in --method / --methods; its learning rate defaults to the base's unless default_lr names it.
METHOD_VARIANTS = {"cersa-int8": "cersa", "cersa-nf4": "cersa", "qlora": "lora"}
#: values of --quantize (the storage of CERSA's frozen factors U, Vh for the method ``cersa``).
QUANTIZE_CHOICES = ("none", "int8", "nf4")


def method_base(method: str) -> str:
    """The base method of ``method``: "cersa-nf4" -> "cersa", "qlora" -> "lora", others unchanged."""
    return METHOD_VARIANTS.get(method, method)


def cersa_quantize(method: str, args) -> str | None:
    """The ``quantize=`` of ``cersa_kernels.convert`` for a CERSA method: "int8" / "nf4" for
    cersa-int8 / cersa-nf4, ``args.quantize`` for cersa (None for "none" or when the namespace has no
    such option).  Raises ValueError for a method that is not CERSA."""
    if method_base(method) != "cersa":
        raise ValueError(f"method: expected a CERSA method (cersa, cersa-int8, cersa-nf4), got {method!r}")
    if method != "cersa":
        return method.split("-", 1)[1]
    q = getattr(args, "quantize", None) or "none"
    return None if q == "none" else q


def prepare_method(method: str, module, args, *, targets: list[str] | None = None, kind: str = "",
                   what: str = "model"):
    """Make ``module`` (the pretrained body, without the new head) ready for ``method``; returns
    (module to use, extra row fields).

    cersa: ``cersa_kernels.convert(module, energy=args.energy, delta_rank=args.delta_rank,
      target_modules=targets, quantize=..., double_quant=args.double_quant)`` in place (targets None:
      every supported layer); quantize is ``args.quantize`` ("none" -> None) for cersa, "int8" for
      cersa-int8, "nf4" for cersa-nf4 (the frozen U, Vh stored as blockwise codes with absmax
      scales, blocks of 64; docs/design.md "Quantized factors"); prints the report and the rank
      distribution unless ``args.quiet``; extra: convert_s, layers_converted, layers_dense,
      layers_candidates, rank_fraction_min / _median / _max, quantize ("none", "int8", "nf4"),
      double_quant.
    lora: the real ``peft`` LoRA of rank ``args.delta_rank`` (lora_alpha = rank, no dropout, no bias)
      on ``targets`` (None: every nn.Linear of ``module``); returns the PEFT wrapper.
    qlora: ``_qlora.make_qlora`` with the same rank, alpha and targets as lora: the targeted
      nn.Linear weights as bitsandbytes NF4 (blocks of 64, double quantization, float32 compute)
      under PEFT LoRA (needs bitsandbytes); returns the PEFT wrapper.
    full: every parameter of ``module`` trainable.  head: every parameter frozen (a linear probe).
    ``args`` needs energy, delta_rank, quiet; quantize / double_quant are read when present (default
    none / False).  ``kind`` and ``what`` only word the printout.  Raises ValueError for another method."""
    extra: dict = {}
    if method == "full":
        for p in module.parameters():
            p.requires_grad_(True)
        return module, extra
    if method == "head":
        for p in module.parameters():
            p.requires_grad_(False)
        return module, extra
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.delta_rank, lora_alpha=args.delta_rank, lora_dropout=0.0,
                         target_modules=list(targets) if targets is not None else layer_names(module), bias="none")
        return get_peft_model(module, cfg), extra
    if method == "qlora":
        qlora = _qlora_module()
        t0 = time.perf_counter()
        model = qlora.make_qlora(module, list(targets) if targets is not None else layer_names(module),
                                 r=args.delta_rank, alpha=args.delta_rank)
        extra.update(quantize_s=time.perf_counter() - t0, quantize="nf4", double_quant=True)
        return model, extra
    if method_base(method) == "cersa" and method in KNOWN_METHODS:
        import cersa_kernels

        quantize = cersa_quantize(method, args)
        double_quant = bool(getattr(args, "double_quant", False)) and quantize is not None
        storage = {} if quantize is None else {"quantize": quantize, "double_quant": double_quant}
        t0 = time.perf_counter()
        cersa_kernels.convert(module, energy=args.energy, delta_rank=args.delta_rank, target_modules=targets,
                              progress=not args.quiet, **storage)
        extra["convert_s"] = time.perf_counter() - t0
        extra.update(quantize=quantize or "none", double_quant=double_quant)
        report = cersa_kernels.get_report(module)
        rows = rank_distribution(report)
        fr = [r["fraction"] for r in rows]
        extra.update(layers_converted=len(report.converted), layers_dense=len(report.skipped),
                     layers_candidates=len(report.layers),
                     rank_fraction_min=min(fr) if fr else float("nan"),
                     rank_fraction_median=statistics.median(fr) if fr else float("nan"),
                     rank_fraction_max=max(fr) if fr else float("nan"))
        if not args.quiet:
            stored = "" if quantize is None else f", U and Vh as {quantize}{' + double quant' if double_quant else ''}"
            print(f"\nCERSA conversion report of the {what} (energy {args.energy}, delta rank {args.delta_rank}"
                  f"{stored}, {extra['convert_s']:.1f} s):")
            print(report)
            print()
            print(format_rank_distribution(rows, args.energy, kind))
            print(flush=True)
        return module, extra
    raise ValueError(f"method: expected one of {KNOWN_METHODS}, got {method!r}")


# ----------------------------------------------------------------------------------------------
# what a front end supplies
# ----------------------------------------------------------------------------------------------
def percent(v: float) -> str:
    """A fraction as a percentage with two decimals: 0.9707 -> "97.07 %"."""
    return f"{100 * v:.2f} %"


@dataclass
class Metric:
    """The task metric: its row key, its column header and how a value prints."""

    key: str = "accuracy"
    header: str = "accuracy"
    fmt: Callable[[float], str] = percent


def classification_loss(model, batch):
    """Cross-entropy of ``model(*inputs)`` (logits (B, C)) against ``targets`` (B,) int64, for a
    batch ``(inputs tuple, targets)``."""
    import torch.nn.functional as F

    inputs, targets = batch
    return F.cross_entropy(model(*inputs), targets)


@dataclass
class Task:
    """What ``FrontEnd.setup(method, args)`` returns: one method's model, ready to train.

    model: the whole model (body prepared for the method + head); head: the head's parameters,
    trained at --head-lr (the runner makes them trainable; every other parameter that requires grad
    trains at --lr); batches: an iterable of at least args.steps training batches, produced lazily
    (fetching one counts in the step time); loss(model, batch) -> scalar tensor;
    evaluate(model) -> the metric on the held-out data (the runner calls model.eval() and
    torch.no_grad() around it); base: (module, dense layer types) whose base weights are counted
    (``base_weights``); dense_base: (layers, bytes) of those base weights before the preparation;
    n_train / n_test: sizes for the table notes; extra: more row fields; after_training(model):
    called after the evaluation (for example to save a checkpoint)."""

    model: Any
    head: list
    batches: Iterable
    evaluate: Callable[[Any], float]
    base: tuple
    dense_base: tuple[int, int]
    loss: Callable[[Any, Any], Any] = classification_loss
    n_train: int | None = None
    n_test: int | None = None
    extra: dict = field(default_factory=dict)
    after_training: Callable[[Any], None] | None = None


#: defaults of the common options that a FrontEnd's ``defaults`` may replace.
COMMON_DEFAULTS = {"energy": 0.93, "delta_rank": 16, "steps": 100, "batch_size": 16, "log_every": 20}


@dataclass
class FrontEnd:
    """A front end's description.

    script: path of the front-end script (``--compare`` runs it once per method); description: the
    argparse description; methods: the methods it offers (names ``prepare_method`` knows);
    default_lr: {method: learning rate of the trainable body parameters}; head_lr: default --head-lr;
    setup(method, args) -> Task; title(args) -> the line above the table; notes(rows) -> lines
    below the table that define its metric and base-weight column; base_label: that column's
    header; metric; defaults: defaults of the common options (keys: energy, delta_rank, steps,
    batch_size, log_every); add_arguments(parser) / check_args(parser, args): its own options (an
    error goes through ``parser.error``, naming the option); method_only: {option dest: method} for
    options passed only to that method's subprocess; child_env: environment variables set for the
    subprocesses; eval_what: what the metric is measured on ("held-out articles")."""

    script: str
    description: str
    methods: tuple
    default_lr: dict
    head_lr: float
    setup: Callable[[str, argparse.Namespace], Task]
    title: Callable[[argparse.Namespace], str]
    notes: Callable[[list], list]
    base_label: str
    metric: Metric = field(default_factory=Metric)
    defaults: dict = field(default_factory=dict)
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    check_args: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None
    method_only: dict = field(default_factory=dict)
    child_env: dict = field(default_factory=dict)
    eval_what: str = "held-out examples"

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("methods: expected at least one method, got none")
        missing = [m for m in self.methods if m not in self.default_lr]
        if missing:
            raise ValueError(f"default_lr: expected a learning rate for every method of {tuple(self.methods)}, "
                             f"missing {missing}")
        unknown = set(self.defaults) - set(COMMON_DEFAULTS)
        if unknown:
            raise ValueError(f"defaults: expected keys among {sorted(COMMON_DEFAULTS)}, got {sorted(unknown)}")

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.script))[0]

    @property
    def choices(self) -> tuple:
        """The methods --method / --methods accept: ``methods``, then each variant of
        ``METHOD_VARIANTS`` whose base is among them (cersa -> cersa-int8, cersa-nf4; lora -> qlora)
        and that ``methods`` does not already name."""
        extra = tuple(v for v, b in METHOD_VARIANTS.items() if b in self.methods and v not in self.methods)
        return tuple(self.methods) + extra

    def lr_for(self, method: str) -> float:
        """The default learning rate of ``method``: ``default_lr[method]``, else its base method's."""
        if method in self.default_lr:
            return self.default_lr[method]
        return self.default_lr[method_base(method)]



# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def build_parser(fe: FrontEnd) -> argparse.ArgumentParser:
    """The parser of ``fe``: the common options (defaults from ``fe.defaults``) then its own."""
    d = {**COMMON_DEFAULTS, **fe.defaults}
    p = argparse.ArgumentParser(description=fe.description)
    mode = p.add_mutually_exclusive_group()
    choices = fe.choices
    variants = [m for m in choices if m not in fe.methods]
    also = f"; also {', '.join(variants)}" if variants else ""
    mode.add_argument("--method", choices=choices, help="run one method in this process")
    mode.add_argument("--compare", action="store_true",
                      help="run every method of --methods in its own subprocess and print one table (default)")
    p.add_argument("--methods", nargs="+", choices=choices, default=list(fe.methods),
                   help=f"methods of --compare (default: {' '.join(fe.methods)}{also}: cersa-int8 / cersa-nf4 "
                        f"store CERSA's frozen U, Vh as int8 / NF4 codes, qlora is PEFT LoRA over bitsandbytes "
                        f"NF4 base weights with double quantization)")
    p.add_argument("--energy", type=float, default=d["energy"],
                   help=f"CERSA energy tau in (0, 1] (default {d['energy']})")
    p.add_argument("--delta-rank", type=int, default=d["delta_rank"],
                   help=f"CERSA delta rank k = LoRA rank r (default {d['delta_rank']})")
    if "cersa" in choices:
        p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                       help="storage of the frozen factors U, Vh of the method cersa: none (the layer's dtype), "
                            "int8 or nf4 (blockwise codes, blocks of 64, with absmax scales; default none).  "
                            "cersa-int8 / cersa-nf4 fix it")
        p.add_argument("--double-quant", action="store_true",
                       help="quantize the block scales of quantized CERSA factors again (int8 in blocks of 256; "
                            "nf4: 4.13 bits per number, as QLoRA)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default {d['steps']}, or the environment variable STEPS when set)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help=f"training batch size (default {d['batch_size']})")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, init and batch order (default 0)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of the trainable body parameters (default per method: " +
                        ", ".join(f"{k} {v:g}" for k, v in fe.default_lr.items()) + ")")
    p.add_argument("--head-lr", type=float, default=fe.head_lr,
                   help=f"learning rate of the new head (default {fe.head_lr:g})")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--log-every", type=int, default=d["log_every"],
                   help=f"print the loss every N steps (default {d['log_every']})")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the rows and the options as JSON")
    p.add_argument("--result-json", metavar="PATH", default=None, help=argparse.SUPPRESS)
    if fe.add_arguments is not None:
        fe.add_arguments(p)
    p.set_defaults(_default_steps=d["steps"])
    return p


def check_args(fe: FrontEnd, p: argparse.ArgumentParser, args) -> None:
    """argparse errors (exit 2) for values out of range, naming the option; resolves --steps
    (the option, else STEPS from the environment, else the front end's default)."""
    if args.steps is None:
        env = os.environ.get("STEPS", "").strip()
        if env:
            try:
                args.steps = int(env)
            except ValueError:
                p.error(f"STEPS (environment) must be a positive integer, got {env!r}")
            if args.steps < 1:
                p.error(f"STEPS (environment) must be a positive integer, got {env!r}")
        else:
            args.steps = args._default_steps
    positive = {"--delta-rank": args.delta_rank, "--steps": args.steps, "--batch-size": args.batch_size,
                "--threads": args.threads, "--log-every": args.log_every}
    for name, v in positive.items():
        if v < 1:
            p.error(f"{name} must be >= 1, got {v}")
    if not 0.0 < args.energy <= 1.0:
        p.error(f"--energy must be in (0, 1], got {args.energy}")
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if not args.head_lr > 0:
        p.error(f"--head-lr must be > 0, got {args.head_lr}")
    if args.weight_decay < 0:
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    _check_storage(p, args)
    if fe.check_args is not None:
        fe.check_args(p, args)


def _method_quantize(method: str, args) -> str | None:
    return cersa_quantize(method, args) if method_base(method) == "cersa" else None


def _check_storage(p: argparse.ArgumentParser, args) -> None:
    """--quantize / --double-quant against the methods that will run (argparse errors, exit 2)."""
    quantize = getattr(args, "quantize", None)
    if quantize is None:  # a front end without CERSA has no such options
        return
    methods = [args.method] if args.method is not None else list(args.methods)
    m = args.method  # --compare passes --quantize to the method cersa only
    if m is not None and m in METHOD_VARIANTS and method_base(m) == "cersa":
        if quantize not in ("none", m.split("-", 1)[1]):
            p.error(f"--quantize: {m} stores its factors as {m.split('-', 1)[1]}; expected none or "
                    f"{m.split('-', 1)[1]}, got {quantize}")
    if quantize != "none" and not any(m == "cersa" or (method_base(m) == "cersa" and m.endswith(quantize))
                                      for m in methods):
        p.error(f"--quantize {quantize} sets the factor storage of the method cersa; expected cersa among the "
                f"methods, got {' '.join(methods)}")
    if args.double_quant and not any(_method_quantize(m, args) for m in methods):
        p.error(f"--double-quant needs a quantized CERSA method (cersa-int8, cersa-nf4, or cersa with --quantize "
                f"int8 / nf4); got the methods {' '.join(methods)} with --quantize {quantize}")


def _fmt(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


#: options the runner sets itself for a subprocess (or that only the parent uses).
_NOT_FORWARDED = {"help", "method", "compare", "methods", "result_json", "json", "_default_steps"}


def child_argv(fe: FrontEnd, parser: argparse.ArgumentParser, args, method: str, result_json: str) -> list[str]:
    """The command line of ``method``'s subprocess: the script with --method, --result-json and every
    option of ``args`` (resolved values; an option of ``fe.method_only`` only for its method)."""
    argv = [sys.executable, os.path.abspath(fe.script), "--method", method, "--result-json", result_json]
    for a in parser._actions:
        if a.dest in _NOT_FORWARDED or not a.option_strings:
            continue
        if fe.method_only.get(a.dest, method) != method:
            continue
        if a.dest == "quantize" and method != "cersa":  # cersa-int8 / -nf4 fix it; others have no factors
            continue
        if a.dest == "double_quant" and not _method_quantize(method, args):
            continue
        flag = next((s for s in a.option_strings if s.startswith("--")), a.option_strings[0])
        v = getattr(args, a.dest)
        if a.nargs == 0:  # store_true and the like
            if v != a.default:
                argv.append(flag)
        elif v is None:
            continue
        elif isinstance(v, (list, tuple)):
            argv += [flag, *map(_fmt, v)]
        else:
            argv += [flag, _fmt(v)]
    return argv


# ----------------------------------------------------------------------------------------------
# one method, in this process
# ----------------------------------------------------------------------------------------------
def warmup_linear_decay(steps: int) -> Callable[[int], float]:
    """The learning-rate factor of step s (LambdaLR): linear warm-up over max(1, steps // 10) steps,
    then linear decay to 0 at the last step."""
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def run_method(fe: FrontEnd, method: str, args) -> dict:
    """Seed, ``fe.setup``, train ``args.steps`` steps, evaluate; returns the row of the table."""
    import torch

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    task = fe.setup(method, args)
    model = task.model
    head = list(task.head)
    for p in head:
        p.requires_grad_(True)
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    lr = args.lr if args.lr is not None else fe.lr_for(method)
    groups = ([{"params": body, "lr": lr}] if body else []) + [{"params": head, "lr": args.head_lr}]
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(args.steps))
    stats = param_stats(model)
    base_count, base_bytes, base_trainable = base_weights(*task.base, ignore=head_ids)
    setup_s = time.perf_counter() - t_start
    rss_before_train = current_rss_mib()
    peak_before_train = peak_rss_mib()  # the reset below forgets the peak of loading and conversion
    peak_reset = reset_peak_rss()

    model.train()
    batches = iter(task.batches)
    step_times: list[float] = []
    losses: list[float] = []
    t_train = time.perf_counter()
    cpu_train = time.process_time()
    for step in range(args.steps):
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            raise RuntimeError(f"setup: the batches of {fe.name} ended after {step} steps, "
                               f"expected --steps {args.steps}") from None
        loss = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step_times.append(time.perf_counter() - t0)
        losses.append(loss.detach().item())
        if not args.quiet and (step + 1) % args.log_every == 0:
            recent = losses[-args.log_every:]
            print(f"[{method}] step {step + 1:4d}/{args.steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"{statistics.median(step_times[-args.log_every:]):.3f} s/step", flush=True)
    train_s = time.perf_counter() - t_train
    cpu_per_step = (time.process_time() - cpu_train) / max(1, args.steps)
    train_peak = peak_rss_mib() if peak_reset else float("nan")

    t_eval = time.perf_counter()
    model.eval()
    with torch.no_grad():
        value = float(task.evaluate(model))
    eval_s = time.perf_counter() - t_eval
    if task.after_training is not None:
        task.after_training(model)

    timed = step_times[1:] if len(step_times) > 1 else step_times
    row = {
        "method": method,
        fe.metric.key: value,
        "n_train": task.n_train,
        "n_test": task.n_test,
        "trainable": stats["trainable"],
        "frozen": stats["frozen"],
        "total_param_bytes": stats["trainable_bytes"] + stats["frozen_bytes"],
        "base_layers": base_count,
        "base_bytes": base_bytes,
        "dense_base_layers": task.dense_base[0],
        "dense_base_bytes": task.dense_base[1],
        "base_frozen": not base_trainable,
        "peak_rss_mib": max(peak_before_train, peak_rss_mib()),
        "train_peak_rss_mib": train_peak,
        "rss_before_train_mib": rss_before_train,
        "s_per_step": statistics.median(timed) if timed else float("nan"),
        "s_per_step_mean": statistics.fmean(timed) if timed else float("nan"),
        "cpu_s_per_step": cpu_per_step,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": lr,
        "head_lr": args.head_lr,
        "final_loss": statistics.fmean(losses[-max(1, args.log_every):]) if losses else float("nan"),
        "setup_s": setup_s,
        "train_s": train_s,
        "eval_s": eval_s,
        "total_s": time.perf_counter() - t_start,
    }
    row.update(task.extra)
    if not args.quiet:
        print(f"[{method}] {fe.metric.header} {value:.4f} on {task.n_test} {fe.eval_what}; setup {setup_s:.1f} s, "
              f"train {train_s:.1f} s ({cpu_per_step:.2f} CPU s/step over {args.threads} threads), "
              f"eval {eval_s:.1f} s, total {row['total_s']:.1f} s", flush=True)
    return row


# ----------------------------------------------------------------------------------------------
# results table
# ----------------------------------------------------------------------------------------------
def mib(nbytes: float) -> str:
    """Bytes as MiB with two decimals."""
    return f"{nbytes / 2**20:.2f}"


def method_table(rows: list[dict], base_label: str, metric: Metric | None = None) -> list[str]:
    """The markdown lines (header, rule, one line per row) of the per-method results table.

    rows: dicts with method, the metric's key, trainable, total_param_bytes, base_bytes,
    dense_base_bytes, base_frozen, peak_rss_mib, train_peak_rss_mib (NaN prints n/a), s_per_step, lr;
    ``base_label`` heads the base-weight column."""
    metric = metric or Metric()
    head = ["method", metric.header, "trainable params", base_label, "total params (MiB)",
            "peak RSS (MiB)", "train peak RSS (MiB)", "s / step", "lr"]
    body = []
    for r in rows:
        kind = "frozen" if r["base_frozen"] else "trained"
        ratio = r["base_bytes"] / r["dense_base_bytes"] if r["dense_base_bytes"] else float("nan")
        body.append([
            r["method"],
            metric.fmt(r[metric.key]),
            f"{r['trainable']:,}",
            f"{mib(r['base_bytes'])} {kind} ({ratio:.3f}x dense)",
            mib(r["total_param_bytes"]),
            f"{r['peak_rss_mib']:.0f}",
            "n/a" if math.isnan(r["train_peak_rss_mib"]) else f"{r['train_peak_rss_mib']:.0f}",
            f"{r['s_per_step']:.3f}",
            f"{r['lr']:g}",
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body]


def format_table(fe: FrontEnd, rows: list[dict]) -> str:
    """The table of ``rows``, the front end's notes, the notes common to every front end, one line
    on the rows with quantized base weights (format and bytes), and one line per CERSA row on its
    conversion."""
    out = method_table(rows, fe.base_label, fe.metric)
    out.append("")
    out += fe.notes(rows)
    out.append("peak RSS: VmHWM of the method's own process (load, conversion, training, evaluation); "
               "train peak RSS: VmHWM reset just before the first step.  s / step: median wall time of a "
               "training step after the first.  lr: learning rate of the trainable body parameters (head: "
               f"{rows[0]['head_lr']:g}).")
    stored = [r for r in rows if r.get("quantize", "none") != "none"]
    if stored:
        ratio = lambda r: r["base_bytes"] / r["dense_base_bytes"] if r["dense_base_bytes"] else float("nan")  # noqa: E731
        out.append("quantized base weights (frozen bytes count the codes and every block scale): " + "; ".join(
            f"{r['method']} {'U, Vh' if 'layers_converted' in r else 'W'} as {r['quantize']}"
            f"{' + double quant' if r.get('double_quant') else ''} ({mib(r['base_bytes'])} MiB, "
            f"{ratio(r):.3f}x dense)" for r in stored) + ".")
    for r in rows:
        if "layers_converted" in r:
            out.append(f"{r['method']}: {r['layers_converted']} of {r['layers_candidates']} candidate layers "
                       f"converted, {r['layers_dense']} left dense (unsupported, or no memory saving at this "
                       f"energy); energy rank r / min(m, n) {r['rank_fraction_min']:.2f}-{r['rank_fraction_max']:.2f} "
                       f"(median {r['rank_fraction_median']:.2f}).")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# --compare and main
# ----------------------------------------------------------------------------------------------
def compare_in_subprocesses(methods, child_argv: Callable[[str, str], list[str]],
                            format_table: Callable[[list[dict]], str], *, quiet: bool, prefix: str,
                            env: dict | None = None) -> list[dict]:
    """Run each method in its own subprocess, ``child_argv(method, result_json_path)``, with ``env``
    (None: this process's environment); the child writes its row to that JSON file.  Returns the
    rows in ``methods`` order.  Raises RuntimeError naming the methods whose process failed (after
    printing the table of those that worked)."""
    rows, failed = [], []
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        for method in methods:
            out = os.path.join(tmp, f"{method}.json")
            argv = child_argv(method, out)
            if not quiet:
                print(f"\n=== {method} (own process) ===", flush=True)
            proc = subprocess.run(argv, env=env)
            if proc.returncode != 0 or not os.path.exists(out):
                failed.append(f"{method} (exit code {proc.returncode})")
                continue
            with open(out) as f:
                rows.append(json.load(f))
    if failed:
        if rows:
            print(format_table(rows))
        raise RuntimeError(f"--compare: these runs failed: {', '.join(failed)}")
    return rows


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def main(fe: FrontEnd, argv: list[str] | None = None) -> list[dict]:
    """Parse ``argv`` (default sys.argv[1:]), set torch's thread count; with --method run that
    method here (with --result-json write its row and return without printing), else run each of
    --methods in its own subprocess; print the title with the wall time and the table; with --json
    write {"title", "options", "rows"} (NaN as null).  Returns the rows."""
    import torch

    parser = build_parser(fe)
    args = parser.parse_args(argv)
    check_args(fe, parser, args)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.method is None:
        rows = compare_in_subprocesses(args.methods, lambda m, out: child_argv(fe, parser, args, m, out),
                                       lambda r: format_table(fe, r), quiet=args.quiet, prefix=fe.name + "_",
                                       env={**os.environ, **fe.child_env})
    else:
        rows = [run_method(fe, args.method, args)]
        if args.result_json:
            with open(args.result_json, "w") as f:
                json.dump(rows[0], f)
            return rows
    title = f"{fe.title(args)}; wall time {time.perf_counter() - t0:.0f} s"
    print()
    print(title)
    print(format_table(fe, rows))
    if args.json:
        options = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "result_json"}
        with open(args.json, "w") as f:
            json.dump(_json_safe({"title": title, "options": options, "rows": rows}), f, indent=1)
    return rows
