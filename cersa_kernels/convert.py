"""Model surgery: convert a model's layers to CERSA layers in place, and merge them back.

``convert(model, energy=0.93)`` builds a ``CersaConfig`` from its keywords, selects the candidate
layers (``targets.collect``: the layer registry decides per module), chooses the ranks
(``planning.layer_ranks``, the same policy ``plan`` shows), decomposes every targeted layer first
and swaps them in only when all succeeded, so an error leaves the model exactly as it was.
What a layer carries besides its weights goes with it both ways (``targets.carry_over``: forward,
forward-pre and backward hooks, training mode; merge gives back the converted module's own class
and attributes and the fast paths convert turned off).  Decompositions draw random numbers
(randomized SVD, Kaiming rows of the delta) from a generator seeded by the layer's name
(``seeded``), never from the global RNG.
"""
from __future__ import annotations

import contextlib
import zlib

import torch
from torch import nn

from .calibrate import (DEFAULT_CALIBRATION_MEMORY, DEFAULT_DAMPING, calibration_groups, check_calibration,
                        check_damping, check_memory, collect_moments, is_one_shot, merge_stats,
                        weighted_singular_values, weighted_truncated_svd)
from .config import CersaConfig
from .layers import CersaLayer, CersaModule, is_cersa
from .decompose import _svd_threads_exactly, pool_eligible, singular_values, truncated_svd_many
from .planning import spectrum_method
from .planning import policy_summary, keeps_dense, layer_nbytes, layer_ranks, no_saving_reason
from .report import ConversionReport, record_of
from .targets import (attach_skeleton, carry_over, cersa_modules, collect, disable_fast_paths, module_names,
                      refused_hooks, restore_dense, restore_fast_paths, set_module, unwrap)

__all__ = ["convert", "merge", "seeded", "layer_seed", "config_from_keywords", "check_svd_workers"]


def layer_seed(name: str) -> int:
    """The seed of the random numbers a layer's decomposition draws: CRC-32 of its dotted name, so
    the same weight under the same name gets the same factors in every run, whatever the global seed
    (``convert`` and the streaming ``stream.convert_file`` agree)."""
    return zlib.crc32(name.encode("utf-8"))


@contextlib.contextmanager
def seeded(name: str, device: torch.device | str | None = None):
    """Within the block, the default generator of the CPU (and of ``device`` when it is a CUDA
    device) starts from ``layer_seed(name)``; on exit both are as they were before (torch.random.fork_rng):
    the global random state is neither used nor advanced."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        seed = layer_seed(name)
        torch.default_generator.manual_seed(seed)
        for idx in cuda:
            torch.cuda.default_generators[idx].manual_seed(seed)
        yield


def config_from_keywords(energy, rank, budget, config: CersaConfig | None, options: dict) -> CersaConfig:
    """The CersaConfig of ``convert``'s keyword face: the default energy gives way to rank= or
    budget=; ``config`` fields are overridden by the keywords given.  Raises as CersaConfig."""
    options = dict(options)
    if budget is not None:
        if rank is not None:
            raise ValueError(f"budget: give either budget= or rank=, got budget={budget!r} and rank={rank!r}")
        options.update(budget=budget, energy=None, rank=None)
    elif rank is not None:
        options.update(rank=rank, energy=None)
    elif config is None or energy != 0.93:
        options.update(energy=energy)
    return CersaConfig.make(config, **options)


def _device_of(module: nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def convert(model: nn.Module, energy: float | None = 0.93, *, rank: int | None = None, budget: float | None = None,
            target_modules=None, exclude=None, progress: bool = True, config: CersaConfig | None = None,
            calibration=None, calibration_damping: float = DEFAULT_DAMPING,
            calibration_memory: int = DEFAULT_CALIBRATION_MEMORY, calibration_rank: str = "weight",
            svd_workers: int | None = None, **options) -> nn.Module:
    """Replace the model's layers in place by CERSA layers; returns the model.

    Converted layer types (the layer registry, ``cersa_kernels.layers.LAYER_TYPES``): nn.Linear -> CersaLinear; transformers' Conv1D
    (GPT-2, weight (in, out)) -> CersaConv1D; nn.Conv2d with groups=1 -> CersaConv2d (W read as
    (out, in*kh*kw)); nn.MultiheadAttention with packed projections -> CersaMultiheadAttention (its
    in_proj_weight (3E, E) and out_proj (E, E) decomposed separately, attention recomputed from
    them; see docs/design.md "Layers beyond nn.Linear").  Left as they are and reported with the reason
    (each class's ``unsupported_reason``, ``layers.UNSUPPORTED``): grouped / depthwise Conv2d, attention with kdim/vdim != embed_dim, add_bias_kv or
    add_zero_attn, other conv types.  Nothing is skipped silently.

    Rank policy (how each layer's rank r is chosen; sizes are of the rank-r truncation,
    r (m + n + 1) numbers for an (m, n) weight, docs/design.md "Stored frozen parameters"):
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
    svd: "auto" (default: the cheapest exact-rank method for the weight's shape and target by
      decompose.choose_svd's cost model, in practice the float64 Gram path below energy 1), "full",
      "gram" (decompose.gram_svd) or "randomized" (stops as soon as the exact retained energy reaches
      tau; decompose.randomized_svd).  The SVD runs on the weight's device (GPU when the model is there).
    delta_rank, alpha, init, train_S, train_bias, backend: as ``CersaLinear.from_linear``.
    config: a ``cersa_kernels.CersaConfig`` holding all of the options above instead (keywords
      given as well override its fields).
    target_modules: None (every supported layer), a regex str (full match on the dotted module
      name) or a list of names / dotted suffixes / globs.  exclude: the same form, removed from the
      targets.  A pattern that matches nothing, or a targeted module of a type that cannot be
      converted (with the reason), raises ValueError naming it; targeting a projection inside an
      nn.MultiheadAttention (instead of the attention module) too.
    max_frozen_ratio: a layer is converted only when its stored numbers r(m + n + 1) are below
      max_frozen_ratio * m n (with quantize: its stored bytes, codes + scales + S, below that
      fraction of the dense bytes; planning.truncation_nbytes); otherwise it stays dense and is
      reported (None converts every layer).
    progress: a tqdm bar with the current layer's name as postfix.
    calibration: None (each weight truncated by its own spectrum), or data to truncate by the
      layers' inputs instead (activation-aware truncation, docs/design.md "Activation-aware
      truncation"; ``cersa_kernels.calibrate``): an iterable of model inputs (a Tensor x ->
      model(x), a tuple / list -> model(*x), a dict -> model(**x)) or a callable fn(model) that
      runs the model on the calibration data itself.  The model runs under torch.no_grad() in eval
      mode (modes restored) with forward hooks on the target modules only (removed afterwards, also
      on errors); every matrix's input second moment C (n, n, float64) is accumulated, and the
      rank and factors come from the SVD of W L, L L^T = C + calibration_damping * mean(diag C) I:
      the energy (and rank_multiple / max_rank / budget) policies act on that weighted spectrum, the
      factors are the exact SVD of the best rank-r approximation of W in the output norm, and each
      layer's ``energy`` is the output energy it keeps.  Matrices fed by one tensor (q / k / v,
      gate / up) share one C; when the moments exceed calibration_memory bytes (default 2 GiB) they
      are collected in several passes (the calibration must then be a callable or re-iterable).
      calibration_rank: "weight" (default): the ranks are those of the plain conversion (W's own
      spectrum, the same sizes), only the retained subspace is chosen on the inputs; "output": the
      rank policies act on the weighted spectrum (output energy).  On all-MiniLM-L6-v2 at energy
      0.93 "output" keeps 0.34x the numbers of "weight" (a few outlier input directions carry most of
      the output energy) with a larger output error, so "weight" is the default (docs/design.md
      "Activation-aware truncation").
      Conv layers use their unfolded input patches; nn.MultiheadAttention needs self-attention
      inputs (query is key is value).  The report's ``policy["calibration"]`` holds the cost
      (calibrate.CalibrationStats: passes, seconds, peak_bytes, matrices, moments, damping,
      memory_limit).  Bad calibration data (wrong type, no inputs, a layer it never reaches, a
      one-shot iterator where several passes are needed) raises naming ``calibration`` or the layer;
      calibration_damping must be finite and > 0, calibration_memory a positive int.
    After the first conversion of a model only the deltas A, B (and S or bias when asked) of
    converted layers require grad; every other parameter of the model is frozen.  A later call on a
    model that already holds CERSA layers sets only the flags of the layers it builds: converting
    twice changes nothing, including flags the user set in between.
    What a replaced module carries besides its weights: its forward, forward-pre and full backward
    hooks move to the CERSA layer (the same hook tables: the user's handles still remove them), it
    keeps the training mode; a module with state-dict hooks is refused (ValueError naming the layer
    and the hook).  A module registered under several names is replaced by one CERSA layer under all
    of them.  A layer whose weight is tied to another module's (an output head sharing the input
    embedding), a subclass that overrides forward and a module with a forward set on the instance
    stay dense and are reported with the reason.  Wrapped models (torch.compile, DDP, FSDP1) are
    converted inside their wrapper, with the wrapper-free names.
    Random numbers (randomized SVD probes, Kaiming rows of the delta) come from a generator seeded
    by each layer's name (``seeded``): the global RNG is untouched and the factors are the same
    whatever the global seed.
    PyTorch's fused inference fast paths of nn.TransformerEncoder(Layer) are turned off where a
    CERSA layer sits inside (they read raw weights); ``merge`` turns them back on.
    svd_workers: how many weights are decomposed at the same time (None, the default:
      torch.get_num_threads(); 1: one after the other).  Without calibration, the weights that
      ``decompose.pool_eligible`` admits (CPU, exact-rank methods "full" / "gram", min(m, n) <=
      decompose.SINGLE_THREAD_SVD_MAX_DIM, so their LAPACK calls run on one thread anyway) are
      decomposed ahead of the layer building, in chunks of about CONVERT_CHUNK_NUMBERS weight
      numbers, by ``decompose.truncated_svd_many(workers=svd_workers)`` (one torch and one BLAS
      thread per worker); the layers are then built in order from those factors.  The factors,
      ranks and report are bit for bit those of svd_workers=1 (docs/design.md "Computing the
      truncated SVD").  Randomized SVDs, GPU weights, larger weights, nn.MultiheadAttention and
      calibrated conversion decompose layer by layer as before.  Raises ValueError for a value
      that is not None or a positive int.
    The report (``get_report(model)`` or ``model.cersa_report``) lists every candidate layer.
    All decompositions run before any module is swapped: on any error the model is unchanged.
    Raises TypeError/ValueError naming the argument or the layer.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    outer, model = model, unwrap(model)
    config = config_from_keywords(energy, rank, budget, config, options)
    calibration_damping = check_damping(calibration_damping)
    calibration_memory = check_memory(calibration_memory)
    if calibration_rank not in CALIBRATION_RANKS:
        raise ValueError(f"calibration_rank: expected one of {CALIBRATION_RANKS}, got {calibration_rank!r}")
    if calibration is not None:
        check_calibration(calibration)
    svd_workers = check_svd_workers(svd_workers)
    report = ConversionReport(energy=config.energy)
    first = not cersa_modules(model)
    todo, names = collect(model, target_modules, exclude, report)
    for name, mod, _ in todo:
        why = refused_hooks(mod, name)
        if why:
            raise ValueError(f"model: {why}")
    budgeted = config.budget is not None
    bar = tqdm(total=len(todo) * (2 if budgeted else 1), desc="CERSA convert", unit="layer",
               disable=not progress or not todo)
    # Phase 1: ranks (spectra when a policy needs them), then decompose (no change to the model yet).
    seen_plan: set = set()

    def plan_tick(name):
        if name not in seen_plan:
            seen_plan.add(name)
            bar.set_postfix_str(f"spectrum {name}", refresh=False)
            bar.update(1)

    built: list[tuple[str, nn.Module]] = []
    weighted = [None] * len(todo)
    try:
        if calibration is not None and todo:  # input moments (the model runs; nothing in it changes)
            bar.set_postfix_str("calibration", refresh=True)
            ranks, weighted, policy = _calibrated_ranks(model, todo, config, calibration, calibration_damping,
                                                        calibration_memory, plan_tick, calibration_rank)
        elif budgeted:  # spectra of every layer first (no random numbers: singular values)
            ranks, policy = layer_ranks(todo, config, progress=plan_tick)
        else:  # a per-layer policy: each layer's ranks under its own seed, as stream.convert_file does
            ranks, policy = [], policy_summary(config)
            for item in todo:
                with seeded(item[0], _device_of(item[1])):
                    ranks.append(layer_ranks([item], config)[0][0])
        report.policy = policy
        ahead = _FactorsAhead(todo, ranks, config, svd_workers) if calibration is None else None
        for i, ((name, mod, cls), rk, factors) in enumerate(zip(todo, ranks, weighted)):
            bar.set_postfix_str(name, refresh=False)
            threads = contextlib.nullcontext()
            if factors is None and ahead is not None:
                factors = ahead.factors(i)
                if factors is not None and config.quantize is None:
                    threads = _svd_threads_exactly(1)  # element-wise work only: see _FactorsAhead
            with seeded(name, _device_of(mod)), threads:
                new = cls.from_dense(mod, config, ranks=rk, name=name, factors=factors)
            bar.update(1)
            rec = record_of(name, new)
            stored, dense = layer_nbytes(new)  # bytes: quantized codes count as what they take
            if keeps_dense(stored, dense, config.max_frozen_ratio):
                rec.status = "dense"
                rec.reason = no_saving_reason(new, stored, dense, config.max_frozen_ratio)
                rec.params_after = rec.frozen_bytes = 0
                report.layers.append(rec)
                continue
            report.layers.append(rec)
            built.append((name, new))
    finally:
        bar.close()
    # Phase 2: swap and freeze (a module registered under several names is replaced under each).
    aliases = module_names(model)
    modules = dict(model.named_modules())
    for name, new in built:
        old = modules[name]
        carry_over(old, new)
        attach_skeleton(new, old)
        for alias in aliases.get(id(old), [name]):
            set_module(model, alias, new)
    disable_fast_paths(model, is_cersa)
    if first and built:
        cersa_params = {id(p) for mod in model.modules() if isinstance(mod, CersaModule)
                        for p in mod.parameters() if p.requires_grad}
        for p in model.parameters():
            if id(p) not in cersa_params:
                p.requires_grad_(False)
    order = {n: i for i, n in enumerate(names)}
    report.layers.sort(key=lambda l: order.get(l.name, 0))
    model.cersa_report = report
    if outer is not model:
        outer.__dict__["cersa_report"] = report
    return outer


def check_svd_workers(svd_workers) -> int:
    """``convert``'s svd_workers: None -> torch.get_num_threads(), else a positive int (returned)."""
    if svd_workers is None:
        return max(1, torch.get_num_threads())
    if isinstance(svd_workers, bool) or not isinstance(svd_workers, int) or svd_workers < 1:
        raise ValueError(f"svd_workers: expected None or a positive int, got {svd_workers!r}")
    return svd_workers


#: ``convert`` decomposes the weights it can hand to worker threads in chunks of about this many
#: weight numbers (2^25: 128 MiB of float32 weights), so that the factors waiting for their layers
#: stay bounded (at most about twice the chunk's weights); the workers hold one float64 Gram
#: matrix or LAPACK workspace each.
CONVERT_CHUNK_NUMBERS = 1 << 25


class _FactorsAhead:
    """The factors of ``convert``'s per-layer decompositions, computed ahead in chunks by
    decompose.truncated_svd_many with ``workers`` threads: per candidate i, ``factors(i)`` is the
    ``from_dense`` factors= list of a pooled layer (what from_dense itself would compute: the same
    request, names and extra components) or None (from_dense decomposes it).  Such a layer is then
    built on one torch thread unless it is quantized: building from factors is slicing, copies and
    element-wise arithmetic (a serial Kaiming draw, sums of at most delta_rank numbers), whose
    results do not depend on the thread count, and on the loaded 2-core machine 2 threads made it
    25x slower (20 ms against 0.8 ms per SmolLM2 layer: OpenMP waits on tiny loops); the
    quantized path's reductions over a whole matrix and LoftQ's products and SVDs keep the
    caller's threads, as in the layer-by-layer path."""

    def __init__(self, todo, ranks, config: CersaConfig, workers: int):
        self.config, self.workers, self.ready = config, workers, {}
        self.plan: list = [None] * len(todo)
        if workers < 2:
            return
        for i, ((name, mod, cls), rk) in enumerate(zip(todo, ranks)):
            mats = cls.matrices(mod) if issubclass(cls, CersaLayer) else []
            if len(mats) != 1:
                continue
            (label, W), = mats
            energy, rank = config.truncation_request(rk[0] if rk else None)
            try:
                ok = pool_eligible(W, energy, rank, svd=config.svd, extra=config.extra_components)
            except (TypeError, ValueError):  # from_dense raises it, in order, naming the layer
                ok = False
            if ok:
                self.plan[i] = (W, energy, rank, f"{name}.{label}")

    def factors(self, i: int):
        if self.plan[i] is None:
            return None
        if i not in self.ready:
            chunk, numbers = [], 0
            for j in range(i, len(self.plan)):
                if self.plan[j] is None:
                    continue
                if chunk and numbers + self.plan[j][0].numel() > CONVERT_CHUNK_NUMBERS:
                    break
                chunk.append(j)
                numbers += self.plan[j][0].numel()
            reqs = [self.plan[j] for j in chunk]
            got = truncated_svd_many([r[0] for r in reqs], energy=[r[1] for r in reqs], rank=[r[2] for r in reqs],
                                     where=[r[3] for r in reqs], svd=self.config.svd, workers=self.workers,
                                     extra=self.config.extra_components)
            self.ready.update(zip(chunk, got))
        return [self.ready.pop(i)]


#: values of ``convert``'s calibration_rank: the spectrum the rank policies read under calibration.
CALIBRATION_RANKS = ("output", "weight")


def _calibrated_ranks(model, todo, config: CersaConfig, calibration, damping: float, memory: int, plan_tick,
                      rank_source: str = "output"):
    """(ranks, factors, policy) of the activation-aware truncation of every target (docs/design.md
    "Activation-aware truncation"): the targets are collected in groups whose moments fit in
    ``memory`` bytes (calibrate.calibration_groups), one pass over the calibration data each; a
    group's moments are dropped once its layers are decomposed.  With a budget every weighted
    spectrum is needed before any rank is known, so several groups take two rounds of passes
    (spectra, then factors); one group keeps its moments for both.  rank_source "weight": the
    ranks of the plain conversion (W's own spectra), one round."""
    groups = calibration_groups(todo, memory)
    budgeted = config.budget is not None and rank_source == "output"
    rounds = 2 if budgeted and len(groups) > 1 else 1
    if is_one_shot(calibration) and len(groups) * rounds > 1:
        raise ValueError(f"calibration: the input moments need {len(groups) * rounds} passes over the calibration "
                         f"data under calibration_memory={memory:,} bytes, but a one-shot iterator gives only one; "
                         f"pass a list, a re-iterable data loader or a callable fn(model)")
    stats = []

    def moments_of(group):
        mom, st = collect_moments(model, [todo[i] for i in group], calibration, memory=memory, damping=damping)
        stats.append(st)
        return mom

    ranks, factors = [None] * len(todo), [None] * len(todo)
    if rank_source == "weight":
        spectra = None if config.rank is not None else []  # an explicit rank needs no spectrum
        for name, mod, cls in (todo if spectra is not None else []):
            if config.budget is not None:
                plan_tick(name)
            spectra.append([singular_values(W, name, svd=spectrum_method(config.svd)) for _, W in cls.matrices(mod)])
        ranks, policy = layer_ranks(todo, config, spectra=spectra)
        for group in groups:
            mom = moments_of(group)
            for i, Cs in zip(group, mom):
                name, mod, cls = todo[i]
                with seeded(name, _device_of(mod)):
                    factors[i] = _weighted_factors(name, mod, cls, ranks[i], Cs, config, damping)
            del mom
    elif budgeted:
        spectra, kept = [None] * len(todo), None
        for group in groups:
            mom = moments_of(group)
            for i, Cs in zip(group, mom):
                name, mod, cls = todo[i]
                plan_tick(name)
                spectra[i] = [weighted_singular_values(W, C, damping, name, svd=spectrum_method(config.svd))
                              for (_, W), C in zip(cls.matrices(mod), Cs)]
            kept = mom if rounds == 1 else None
        ranks, policy = layer_ranks(todo, config, spectra=spectra)
        for group in groups:
            mom = kept if kept is not None else moments_of(group)
            for i, Cs in zip(group, mom):
                name, mod, cls = todo[i]
                with seeded(name, _device_of(mod)):
                    factors[i] = _weighted_factors(name, mod, cls, ranks[i], Cs, config, damping)
    else:
        policy = policy_summary(config)
        for group in groups:
            mom = moments_of(group)
            for i, Cs in zip(group, mom):
                name, mod, cls = todo[i]
                with seeded(name, _device_of(mod)):
                    ranks[i] = layer_ranks([todo[i]], config, moments=[Cs], damping=damping)[0][0]
                    factors[i] = _weighted_factors(name, mod, cls, ranks[i], Cs, config, damping)
            del mom
    policy["calibration"] = merge_stats(stats).as_dict()
    return ranks, factors, policy


def _weighted_factors(name: str, mod: nn.Module, cls, ranks, moments, config: CersaConfig, damping: float) -> list:
    """Per matrix of ``cls.matrices(mod)``: its activation-aware truncation (U, S, Vh, info) under
    its planned rank (None: the config's energy or rank) and input moment (calibrate.weighted_truncated_svd;
    extra components as the init asks).  docs/design.md "Activation-aware truncation"."""
    mats = cls.matrices(mod)
    ranks = list(ranks) if ranks is not None else [None] * len(mats)
    out = []
    for (label, W), rk, C in zip(mats, ranks, moments):
        energy, rank = config.truncation_request(rk)
        out.append(weighted_truncated_svd(W, C, energy=energy, rank=rank,
                                          extra=config.extra_components, damping=damping,
                                          where=f"{name}.{label}" if len(mats) > 1 else name, svd=config.svd))
    return out


def merge(model: nn.Module) -> nn.Module:
    """Replace every CERSA layer by the dense layer it computes, in place; returns the model.

    Each layer's ``merge()`` gives the dense tensors (nn.Linear, a Conv1D with its (in, out) layout,
    nn.Conv{1,2,3}d with the same hyper-parameters, nn.MultiheadAttention); the module put back is
    of the class that was converted (an nn.Linear subclass stays that subclass, built without calling
    its __init__, with its other attributes), with the same bias=False-ness, the CERSA layer's
    call hooks and training mode, under every name the layer is registered under (one module for a
    shared one).  Fast paths that convert turned off come back where no CERSA layer is left.  The
    merged weight U diag(S) Vh + scale B A is formed in float32 or higher and rounded once to the
    layer's dtype.  Raises TypeError for a CERSA layer itself, ValueError (naming the layer and the
    hook) for a layer with state-dict hooks (the model is then unchanged)."""
    if isinstance(model, CersaModule):
        raise TypeError("model: expected a model containing CERSA layers, got a CERSA layer itself; "
                        "call layer.merge() instead")
    outer, model = model, unwrap(model)
    layers = cersa_modules(model)
    for name, mod in layers.items():
        why = refused_hooks(mod, name)
        if why:
            raise ValueError(f"model: {why}")
    aliases = module_names(model)
    merged = {name: restore_dense(mod, mod.merge()) for name, mod in layers.items()}
    for name, mod in layers.items():
        for alias in aliases.get(id(mod), [name]):
            set_module(model, alias, merged[name])
    restore_fast_paths(model, is_cersa)
    for m in (model, outer):
        m.__dict__.pop("cersa_report", None)
    return outer
