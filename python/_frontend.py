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
  --threads --log-every --quiet --json`` (``--threads`` defaults per front end, ``FrontEnd.threads``),
  for a front end offering cersa ``--budget`` (a rank budget instead of ``--energy``), ``--init`` (the
  delta init, one of ``cersa_kernels.config.INITS``), ``--calibration N`` (activation-aware
  truncation on the first N training batches), ``--quantize {none,int8,nf4} --double-quant`` (the
  storage of CERSA's frozen factors), for a front end offering lora ``--lora-rank --lora-alpha``
  (default: the delta rank, and ``FrontEnd.lora_alpha`` or the rank), and ``--exclude PATTERN ...``
  (layers left out of CERSA's and LoRA's targets alike); besides its own methods
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
* the metric before training too when the front end asks (``FrontEnd.eval_before``: a column "before");
* one markdown table with the same columns for every front end, and JSON results (``--json PATH``:
  title, options, the metric's key / header / direction, rows).  ``python/_sweep.py`` runs grids of
  such runs (one process each) and aggregates them over seeds.

Front-end code only: the cersa_kernels package does not import this module, and a method that is not
CERSA never imports the package.  Standard library only at import time (torch, transformers, peft
are imported inside the functions), so a front end can set environment variables (for example
HF_HUB_OFFLINE) before anything heavy is imported and bench/memory_worker.py can use the /proc
helpers without adding to its baseline memory.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import itertools
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
           "cersa_quantize", "METHOD_VARIANTS", "KNOWN_METHODS", "QUANTIZE_CHOICES", "lora_targets", "cersa_inits"]


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
    True when it worked, so a later VmHWM reading measures from now on.  First the heap that earlier
    work freed (loading, conversion, calibration) goes back to the system (``gc.collect`` and glibc's
    ``malloc_trim(0)`` where there is one): glibc keeps freed blocks mapped and resident otherwise,
    and the mark would start from memory that no object holds any more."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        pass
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


def format_rank_distribution(rows: list[dict], energy: float | None, kind: str = "", policy: str | None = None) -> str:
    """min / median / max of r / min(m, n) and a text histogram in bins of 0.1; ``kind`` names the
    layers in the first line ("Linear" -> "over 37 Linear layers"); ``policy`` replaces the words
    "energy {energy}" there (for example "budget 0.5")."""
    if not rows:
        return "no converted layer"
    fr = sorted(r["fraction"] for r in rows)
    dense = sum(1 for r in rows if r["status"] != "converted")
    policy = policy or f"energy {energy}"
    lines = [f"energy rank fraction r / min(m, n) at {policy} over {len(fr)} {kind + ' ' if kind else ''}"
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


def cersa_inits() -> tuple:
    """The values of ``--init``: ``cersa_kernels.config.INITS``, read when called (this imports the
    package, so the runner calls it only where a CERSA method runs or --init is given)."""
    from cersa_kernels.config import INITS

    return tuple(INITS)


def _cersa_default_init() -> str:
    """The init ``cersa_kernels.convert`` uses when none is given (CersaConfig's default)."""
    from cersa_kernels.config import CersaConfig

    return CersaConfig.__dataclass_fields__["init"].default


def _matches(name: str, pattern: str) -> bool:
    """The rule of ``cersa_kernels.convert``'s list patterns: the exact dotted name, a dotted
    suffix of it, or a glob (fnmatch, case-sensitive)."""
    import fnmatch

    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def lora_targets(module, targets: list[str] | None, exclude: list[str] | None) -> list[str]:
    """The ``target_modules`` given to PEFT for LoRA / QLoRA on ``module``.

    targets: layer names or dotted suffixes (PEFT's list rule), None for every nn.Linear of
    ``module``.  exclude: None (targets returned as given), or patterns removed with the rule of
    ``cersa_kernels.convert(exclude=[...])`` (exact dotted name, dotted suffix or glob), so CERSA and
    LoRA leave out the same layers; the result is then the explicit dotted names of the remaining
    layers.  Raises ValueError naming --exclude for a pattern that matches no target layer, or when
    nothing is left."""
    if targets is None:
        targets = layer_names(module)
    if not exclude:
        return list(targets)
    names = [n for n, _ in module.named_modules() if n]
    hit = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    for pat in exclude:
        if not any(_matches(n, pat) for n in hit):
            raise ValueError(f"--exclude: the pattern {pat!r} matches no LoRA target layer (expected a dotted name, "
                             f"suffix or glob among {len(hit)} target layers, for example {hit[:3]})")
    kept = [n for n in hit if not any(_matches(n, pat) for pat in exclude)]
    if not kept:
        raise ValueError(f"--exclude: the patterns {list(exclude)} remove every one of the {len(hit)} LoRA target "
                         f"layers; expected at least one left")
    return kept


def _lora_rank_alpha(args) -> tuple[int, float]:
    """(r, lora_alpha) of LoRA / QLoRA: --lora-rank (default the delta rank) and --lora-alpha (default r)."""
    rank = getattr(args, "lora_rank", None) or args.delta_rank
    alpha = getattr(args, "lora_alpha", None)
    return rank, float(alpha) if alpha is not None else float(rank)


def prepare_method(method: str, module, args, *, targets: list[str] | None = None, kind: str = "",
                   what: str = "model"):
    """Make ``module`` (the pretrained body, without the new head) ready for ``method``; returns
    (module to use, extra row fields).

    cersa: ``cersa_kernels.convert(module, energy=args.energy, delta_rank=args.delta_rank,
      target_modules=targets, quantize=..., double_quant=args.double_quant)`` in place (targets None:
      every supported layer), with ``budget=args.budget`` instead of the energy when given (a rank
      budget, docs/design.md "Rank policies"), ``init=args.init`` when given, ``exclude=args.exclude``
      when given; quantize is ``args.quantize`` ("none" -> None) for cersa, "int8" for
      cersa-int8, "nf4" for cersa-nf4 (the frozen U, Vh stored as blockwise codes with absmax
      scales, blocks of 64; docs/design.md "Quantized factors"); prints the report and the rank
      distribution unless ``args.quiet``; extra: convert_s, layers_converted, layers_dense,
      layers_candidates, rank_fraction_min / _median / _max, quantize ("none", "int8", "nf4"),
      double_quant, energy, budget, init, calibration.
      With ``args.calibration`` = N the conversion needs the whole model and its training batches
      (activation-aware truncation), which exist only once ``setup`` has returned: the module is
      returned unconverted, the conversion is queued on ``args`` and ``run_method`` runs it right
      after ``setup``, with ``calibration=fn`` where fn runs the Task's model forward on the first N
      training batches under torch.no_grad() (``Task.forward_only``); the report fields are then
      added to ``Task.extra``.
    lora: the real ``peft`` LoRA of rank ``args.lora_rank`` (default ``args.delta_rank``) and
      lora_alpha ``args.lora_alpha`` (default the rank), no dropout, no bias, on ``targets`` (None:
      every nn.Linear of ``module``) less ``args.exclude`` (``lora_targets``); returns the PEFT
      wrapper; extra: lora_rank, lora_alpha.
    qlora: ``_qlora.make_qlora`` with the same rank, alpha and targets as lora: the targeted
      nn.Linear weights as bitsandbytes NF4 (blocks of 64, double quantization, float32 compute)
      under PEFT LoRA (needs bitsandbytes); returns the PEFT wrapper.
    full: every parameter of ``module`` trainable.  head: every parameter frozen (a linear probe).
    ``args`` needs energy, delta_rank, quiet; budget, init, calibration, exclude, lora_rank,
    lora_alpha, quantize, double_quant are read when present (default None / none / False).
    ``kind`` and ``what`` only word the printout.  Raises ValueError for another method."""
    extra: dict = {}
    exclude = getattr(args, "exclude", None) or None
    if method == "full":
        for p in module.parameters():
            p.requires_grad_(True)
        return module, extra
    if method == "head":
        for p in module.parameters():
            p.requires_grad_(False)
        return module, extra
    if method in ("lora", "qlora"):
        rank, alpha = _lora_rank_alpha(args)
        names = lora_targets(module, targets, exclude)
        extra.update(lora_rank=rank, lora_alpha=alpha)
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=names, bias="none")
            return get_peft_model(module, cfg), extra
        qlora = _qlora_module()
        t0 = time.perf_counter()
        model = qlora.make_qlora(module, names, r=rank, alpha=alpha)
        extra.update(quantize_s=time.perf_counter() - t0, quantize="nf4", double_quant=True)
        return model, extra
    if method_base(method) == "cersa" and method in KNOWN_METHODS:
        calibration = getattr(args, "calibration", None)
        if calibration:
            pending = getattr(args, "_deferred_conversions", None)
            if pending is None:
                pending = []
                args._deferred_conversions = pending
            pending.append(lambda fn: _convert_cersa(method, module, args, targets, kind, what, exclude, fn))
            extra.update(calibration=int(calibration))
            return module, extra
        extra.update(_convert_cersa(method, module, args, targets, kind, what, exclude, None))
        return module, extra
    raise ValueError(f"method: expected one of {KNOWN_METHODS}, got {method!r}")


def _convert_cersa(method: str, module, args, targets, kind: str, what: str, exclude, calibration) -> dict:
    """``cersa_kernels.convert`` of ``module`` for a CERSA method (see ``prepare_method``); returns the
    row fields of the conversion."""
    import cersa_kernels

    extra: dict = {}
    quantize = cersa_quantize(method, args)
    double_quant = bool(getattr(args, "double_quant", False)) and quantize is not None
    options: dict = {} if quantize is None else {"quantize": quantize, "double_quant": double_quant}
    budget = getattr(args, "budget", None)
    init = getattr(args, "init", None)
    if init is not None:
        options["init"] = init
    if exclude:
        options["exclude"] = list(exclude)
    if calibration is not None:
        options["calibration"] = calibration
        if getattr(args, "calibration_damping", None) is not None:
            options["calibration_damping"] = args.calibration_damping
    policy = {"energy": None, "budget": budget} if budget is not None else {"energy": args.energy}
    t0 = time.perf_counter()
    cersa_kernels.convert(module, **policy, delta_rank=args.delta_rank, target_modules=targets,
                          progress=not args.quiet, **options)
    extra["convert_s"] = time.perf_counter() - t0
    extra.update(quantize=quantize or "none", double_quant=double_quant, energy=policy["energy"], budget=budget,
                 init=init or _cersa_default_init(), calibration=int(getattr(args, "calibration", None) or 0))
    report = cersa_kernels.get_report(module)
    rows = rank_distribution(report)
    fr = [r["fraction"] for r in rows]
    extra.update(layers_converted=len(report.converted), layers_dense=len(report.skipped),
                 layers_candidates=len(report.layers),
                 rank_fraction_min=min(fr) if fr else float("nan"),
                 rank_fraction_median=statistics.median(fr) if fr else float("nan"),
                 rank_fraction_max=max(fr) if fr else float("nan"))
    if not args.quiet:
        label = f"budget {budget}" if budget is not None else f"energy {args.energy}"
        stored = "" if quantize is None else f", U and Vh as {quantize}{' + double quant' if double_quant else ''}"
        calib = f", calibrated on {args.calibration} training batches" if calibration is not None else ""
        print(f"\nCERSA conversion report of the {what} ({label}, delta rank {args.delta_rank}, init "
              f"{extra['init']}{stored}{calib}, {extra['convert_s']:.1f} s):")
        print(report)
        print()
        print(format_rank_distribution(rows, args.energy, kind, policy=label))
        print(flush=True)
    return extra


# ----------------------------------------------------------------------------------------------
# what a front end supplies
# ----------------------------------------------------------------------------------------------
def percent(v: float) -> str:
    """A fraction as a percentage with two decimals: 0.9707 -> "97.07 %"."""
    return f"{100 * v:.2f} %"


@dataclass
class Metric:
    """The task metric: its row key, its column header, how a value prints, and its direction
    (``lower_is_better``: perplexity, MSE; default False: accuracy).  The sweeps
    (``python/_sweep.py``) and the runner's ``--sort`` order rows best first with ``sort_key``."""

    key: str = "accuracy"
    header: str = "accuracy"
    fmt: Callable[[float], str] = percent
    lower_is_better: bool = False

    def sort_key(self, value: float) -> float:
        """A key that sorts values best first (NaN / None last)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return math.inf
        return value if self.lower_is_better else -value

    def describe(self) -> dict:
        """{"key", "header", "lower_is_better"}: what the JSON results say of the metric."""
        return {"key": self.key, "header": self.header, "lower_is_better": self.lower_is_better}


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
    trains at --lr); batches: an iterable of at least args.steps training batches (with
    --calibration N at least max(steps, N): the calibration runs on the first N, which training then
    uses too), produced lazily (fetching one counts in the step time); loss(model, batch) -> scalar tensor;
    evaluate(model) -> the metric on the held-out data (the runner calls model.eval() and
    torch.no_grad() around it); base: (module, dense layer types) whose base weights are counted
    (``base_weights``); dense_base: (layers, bytes) of those base weights before the preparation;
    n_train / n_test: sizes for the table notes; extra: more row fields; after_training(model):
    called after the evaluation (for example to save a checkpoint); evaluate_before(model): the
    metric before the first step when ``FrontEnd.eval_before`` (None: ``evaluate``), called once the
    model is prepared (after the conversions that --calibration defers), for a front end that
    records more fields of that measurement in ``extra``."""

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
    evaluate_before: Callable[[Any], float] | None = None

    def forward_only(self, model, batch) -> None:
        """Run ``model`` on one training batch without training it: the forward of ``loss`` under
        torch.no_grad() with ``model`` in eval mode (its mode restored after), the value dropped.
        The calibration of --calibration runs this on the first N training batches."""
        import torch

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                self.loss(model, batch)
        finally:
            model.train(was_training)


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
    subprocesses; eval_what: what the metric is measured on ("held-out articles"); threads: the
    default of --threads; lora_alpha: the default of --lora-alpha (None: the LoRA rank, scale 1);
    eval_before: also evaluate the metric on the prepared model before the first step (row key
    ``<metric key>_before``, table column "before"; measured after the conversions that
    --calibration defers, with ``Task.evaluate_before`` or ``Task.evaluate``); calibration: whether
    --calibration is offered (it converts after ``setup`` returns: a front end measures the prepared
    model with eval_before, not in setup; one that must measure it in setup sets False);
    default_calibration: what --calibration is when not given and a CERSA method runs (training
    batches; None: no calibration; ``--calibration 0`` turns a default off)."""

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
    threads: int = 2
    lora_alpha: float | None = None
    eval_before: bool = False
    calibration: bool = True
    default_calibration: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1:
            raise ValueError(f"threads: expected an int >= 1, got {self.threads!r}")
        if self.lora_alpha is not None and not (isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha: expected None or a number > 0, got {self.lora_alpha!r}")
        dc = self.default_calibration
        if dc is not None and (not isinstance(dc, int) or isinstance(dc, bool) or dc < 1 or not self.calibration):
            raise ValueError(f"default_calibration: expected None or an int >= 1 (training batches) on a front end "
                             f"that offers --calibration, got {dc!r} (calibration={self.calibration})")
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
    p.add_argument("--energy", type=float, default=None,
                   help=f"CERSA energy tau in (0, 1] (default {d['energy']}; not with --budget)")
    p.add_argument("--delta-rank", type=int, default=d["delta_rank"],
                   help=f"CERSA delta rank k, and LoRA's rank r unless --lora-rank (default {d['delta_rank']})")
    if "cersa" in choices:
        p.add_argument("--budget", type=float, default=None, metavar="F",
                       help="CERSA rank budget instead of --energy: the truncations of all target layers store "
                            "at most F times their dense numbers together, ranks allocated by energy gained per "
                            "stored number (cersa_kernels.convert(budget=F); F > 0)")
        p.add_argument("--init", default=None, metavar="NAME",
                       help="CERSA delta init, one of cersa_kernels.config.INITS (checked when a CERSA method "
                            "runs; default: cersa_kernels.convert's)")
        if fe.calibration:
            dc = "none" if fe.default_calibration is None else f"{fe.default_calibration}"
            p.add_argument("--calibration", type=int, default=None, metavar="N",
                           help="CERSA activation-aware truncation calibrated on the first N training batches "
                                "(a forward pass each, no training; cersa_kernels.convert(calibration=fn)); "
                                f"0: the truncation by the weights' spectrum alone (default {dc})")
            p.add_argument("--calibration-damping", type=float, default=None, metavar="F",
                           help="with --calibration: the damping of the input second moments, "
                                "cersa_kernels.convert(calibration_damping=F) (F > 0; default: convert's)")
        p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                       help="storage of the frozen factors U, Vh of the method cersa: none (the layer's dtype), "
                            "int8 or nf4 (blockwise codes, blocks of 64, with absmax scales; default none).  "
                            "cersa-int8 / cersa-nf4 fix it")
        p.add_argument("--double-quant", action="store_true",
                       help="quantize the block scales of quantized CERSA factors again (int8 in blocks of 256; "
                            "nf4: 4.13 bits per number, as QLoRA)")
    if "lora" in choices:
        p.add_argument("--lora-rank", type=int, default=None, metavar="R",
                       help="LoRA / QLoRA rank r (default: --delta-rank)")
        alpha = "the LoRA rank, scale 1" if fe.lora_alpha is None else f"{fe.lora_alpha:g}"
        p.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                       help=f"LoRA / QLoRA lora_alpha, scale A / r (default: {alpha})")
    if "cersa" in choices or "lora" in choices:
        p.add_argument("--exclude", nargs="+", default=None, metavar="PATTERN",
                       help="leave these layers out of CERSA's and LoRA's targets: dotted names, dotted suffixes "
                            "or globs (cersa_kernels.convert(exclude=[...]); LoRA leaves out the same layers)")
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
    p.add_argument("--threads", type=int, default=fe.threads, help=f"torch CPU threads (default {fe.threads})")
    p.add_argument("--log-every", type=int, default=d["log_every"],
                   help=f"print the loss every N steps (default {d['log_every']})")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    direction = "lowest" if fe.metric.lower_is_better else "highest"
    p.add_argument("--sort", action="store_true",
                   help=f"order the table best first ({direction} {fe.metric.header} first; default: --methods order)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the rows and the options as JSON")
    p.add_argument("--result-json", metavar="PATH", default=None, help=argparse.SUPPRESS)
    if fe.add_arguments is not None:
        fe.add_arguments(p)
    p.set_defaults(_default_steps=d["steps"], _default_energy=d["energy"])
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
    budget = getattr(args, "budget", None)
    if budget is not None:
        if args.energy is not None:
            p.error(f"--energy and --budget both set the CERSA ranks; give one, got --energy {args.energy} and "
                    f"--budget {budget}")
        if not (math.isfinite(budget) and budget > 0):
            p.error(f"--budget must be a finite fraction > 0 of the dense frozen numbers, got {budget}")
    elif args.energy is None:
        args.energy = args._default_energy
    if args.energy is not None and not 0.0 < args.energy <= 1.0:
        p.error(f"--energy must be in (0, 1], got {args.energy}")
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if not args.head_lr > 0:
        p.error(f"--head-lr must be > 0, got {args.head_lr}")
    if args.weight_decay < 0:
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    _check_storage(p, args)
    _check_method_options(fe, p, args)
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


def _methods_of(args) -> list[str]:
    return [args.method] if args.method is not None else list(args.methods)


def _check_method_options(fe: FrontEnd, p: argparse.ArgumentParser, args) -> None:
    """--init, --calibration, --calibration-damping, --lora-rank, --lora-alpha, --exclude: values and
    the methods that use them (argparse errors, exit 2); resolves --lora-alpha to the front end's default."""
    methods = _methods_of(args)
    cersa = [m for m in methods if method_base(m) == "cersa"]
    lora = [m for m in methods if method_base(m) == "lora"]
    init = getattr(args, "init", None)
    if init is not None:
        if not cersa:
            p.error(f"--init sets the CERSA delta init; expected a CERSA method among the methods, got "
                    f"{' '.join(methods)}")
        inits = cersa_inits()
        if init not in inits:
            p.error(f"--init: expected one of {', '.join(inits)} (cersa_kernels.config.INITS), got {init!r}")
    calibration = getattr(args, "calibration", None)
    if calibration is not None:
        if calibration < 0:
            p.error(f"--calibration must be >= 0 (training batches; 0: no calibration), got {calibration}")
        if calibration > 0 and not cersa:
            p.error(f"--calibration calibrates the CERSA truncation; expected a CERSA method among the methods, "
                    f"got {' '.join(methods)}")
    elif cersa and hasattr(args, "calibration"):
        calibration = fe.default_calibration
    if hasattr(args, "calibration"):
        args.calibration = calibration or None  # resolved: N >= 1 batches, or None (off)
    damping = getattr(args, "calibration_damping", None)
    if damping is not None:
        if not (math.isfinite(damping) and damping > 0):
            p.error(f"--calibration-damping must be finite and > 0, got {damping}")
        if not calibration:
            p.error(f"--calibration-damping {damping} needs --calibration N >= 1 (it damps the calibration's "
                    f"moments)")
    lora_rank = getattr(args, "lora_rank", None)
    if lora_rank is not None:
        if lora_rank < 1:
            p.error(f"--lora-rank must be >= 1, got {lora_rank}")
        if not lora:
            p.error(f"--lora-rank sets LoRA's rank; expected lora or qlora among the methods, got {' '.join(methods)}")
    if hasattr(args, "lora_alpha"):
        if args.lora_alpha is not None:
            if not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
                p.error(f"--lora-alpha must be > 0 and finite, got {args.lora_alpha}")
            if not lora:
                p.error(f"--lora-alpha sets LoRA's lora_alpha; expected lora or qlora among the methods, got "
                        f"{' '.join(methods)}")
        else:
            args.lora_alpha = fe.lora_alpha
    exclude = getattr(args, "exclude", None)
    if exclude is not None:
        if not cersa and not lora:
            p.error(f"--exclude removes layers from CERSA's and LoRA's targets; expected a CERSA or LoRA method "
                    f"among the methods, got {' '.join(methods)}")
        empty = [e for e in exclude if not e.strip()]
        if empty:
            p.error(f"--exclude: expected non-empty patterns, got {exclude}")


#: options a subprocess receives only when its method is based on cersa / lora (the others have no use
#: for them, and their own checks would reject them).
_CERSA_ONLY = {"init", "calibration", "calibration_damping"}
_LORA_ONLY = {"lora_rank", "lora_alpha"}


def _fmt(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


#: options the runner sets itself for a subprocess (or that only the parent uses).
_NOT_FORWARDED = {"help", "method", "compare", "methods", "result_json", "json", "_default_steps", "_default_energy"}


def child_argv(fe: FrontEnd, parser: argparse.ArgumentParser, args, method: str, result_json: str) -> list[str]:
    """The command line of ``method``'s subprocess: the script with --method, --result-json and every
    option of ``args`` (resolved values; an option of ``fe.method_only`` only for its method; --init
    and --calibration only for a CERSA method, --lora-rank and --lora-alpha only for lora / qlora,
    --exclude only for either)."""
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
        base = method_base(method)
        if (a.dest in _CERSA_ONLY and base != "cersa") or (a.dest in _LORA_ONLY and base != "lora"):
            continue
        if a.dest == "exclude" and base not in ("cersa", "lora"):
            continue
        flag = next((s for s in a.option_strings if s.startswith("--")), a.option_strings[0])
        v = getattr(args, a.dest)
        if a.nargs == 0:  # store_true and the like
            if v != a.default:
                argv.append(flag)
        elif v is None:
            if a.dest == "calibration" and fe.default_calibration is not None:
                argv += [flag, "0"]  # resolved off: the child must not take the default again
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


def _run_deferred_conversions(fe: FrontEnd, task: Task, args) -> None:
    """The CERSA conversions ``prepare_method`` queued on ``args`` (--calibration): each runs now with
    ``calibration=fn``, fn running ``task.forward_only`` on the first ``args.calibration`` training
    batches (taken from ``task.batches`` and put back in front of it, so training still starts with
    them); the conversion's row fields go into ``task.extra``.  Raises RuntimeError when the batches
    end before N."""
    pending = getattr(args, "_deferred_conversions", None) or []
    args._deferred_conversions = []
    if not pending:
        return
    n = int(args.calibration)
    it = iter(task.batches)
    calib = list(itertools.islice(it, n))
    if len(calib) < n:
        raise RuntimeError(f"--calibration {n}: the batches of {fe.name} ended after {len(calib)}, expected at "
                           f"least {n} (the calibration runs on the first {n} training batches)")
    task.batches = itertools.chain(calib, it)

    def run_calibration(_module) -> None:
        for batch in calib:
            task.forward_only(task.model, batch)

    for convert_now in pending:
        task.extra.update(convert_now(run_calibration))


def run_method(fe: FrontEnd, method: str, args) -> dict:
    """Seed, ``fe.setup``, run the conversions it deferred (--calibration), evaluate before training
    when ``fe.eval_before``, train ``args.steps`` steps, evaluate; returns the row of the table."""
    import torch

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    args._deferred_conversions = []
    task = fe.setup(method, args)
    model = task.model
    _run_deferred_conversions(fe, task, args)
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
    before = None
    if fe.eval_before:
        t_before = time.perf_counter()
        model.eval()
        with torch.no_grad():
            before = float((task.evaluate_before or task.evaluate)(model))
        before_s = time.perf_counter() - t_before
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
    if before is not None:
        row[fe.metric.key + "_before"] = before
        row["eval_before_s"] = before_s
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
    ``base_label`` heads the base-weight column.  A column "before" (the metric before training,
    key ``<metric key>_before``) follows the metric when any row has that key."""
    metric = metric or Metric()
    before_key = metric.key + "_before"
    with_before = any(r.get(before_key) is not None for r in rows)
    head = ["method", metric.header, *(["before"] if with_before else []), "trainable params", base_label,
            "total params (MiB)", "peak RSS (MiB)", "train peak RSS (MiB)", "s / step", "lr"]
    body = []
    for r in rows:
        kind = "frozen" if r["base_frozen"] else "trained"
        ratio = r["base_bytes"] / r["dense_base_bytes"] if r["dense_base_bytes"] else float("nan")
        before = r.get(before_key)
        body.append([
            r["method"],
            metric.fmt(r[metric.key]),
            *([("n/a" if before is None else metric.fmt(before))] if with_before else []),
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
                       f"(median {r['rank_fraction_median']:.2f}); "
                       + (f"rank budget {r['budget']:g}" if r.get("budget") is not None else
                          f"energy {r['energy']:g}" if r.get("energy") is not None else "ranks as converted")
                       + (f", init {r['init']}" if r.get("init") else "")
                       + (f", truncation calibrated on {r['calibration']} training batches" if r.get("calibration")
                          else "") + ".")
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
    --methods in its own subprocess; print the title with the wall time and the table (best first
    with --sort); with --json write {"title", "front_end", "metric" (key, header, lower_is_better),
    "options", "rows"} (NaN as null), atomically.  Returns the rows."""
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
    shown = sorted(rows, key=lambda r: fe.metric.sort_key(r[fe.metric.key])) if args.sort else rows
    print(format_table(fe, shown))
    if args.json:
        options = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "result_json"}
        result = {"title": title, "front_end": fe.name, "metric": fe.metric.describe(), "options": options,
                  "rows": rows}
        tmp = args.json + ".part"
        with open(tmp, "w") as f:
            json.dump(_json_safe(result), f, indent=1)
        os.replace(tmp, args.json)  # a reader (python/_sweep.py) never sees half a file
    return rows
