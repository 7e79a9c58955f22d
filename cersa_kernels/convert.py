"""Model surgery: convert a model's layers to CERSA layers in place, and merge them back.

``convert(model, energy=0.93)`` builds a ``CersaConfig`` from its keywords, selects the candidate
layers (``targets.collect``: the layer registry decides per module), chooses the ranks
(``planning.layer_ranks``, the same policy ``plan`` shows), decomposes every targeted layer first
and swaps them in only when all succeeded, so an error leaves the model exactly as it was.
"""
from __future__ import annotations

from torch import nn

from .config import CersaConfig
from .layers import CersaModule
from .planning import keeps_dense, layer_ranks
from .report import ConversionReport, record_of
from .targets import cersa_modules, collect, set_module

__all__ = ["convert", "merge"]


def _disable_fast_paths(model: nn.Module) -> None:
    """PyTorch's fused inference paths of nn.TransformerEncoder(Layer) read raw weights (linear1.weight,
    self_attn.in_proj_weight, ...) that CERSA layers do not have: turn them off where a CERSA layer sits."""
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoderLayer) and any(isinstance(c, CersaModule) for c in mod.modules()):
            mod.activation_relu_or_gelu = False  # only read by the fast-path check
        if isinstance(mod, nn.TransformerEncoder) and any(isinstance(c, CersaModule) for c in mod.modules()):
            mod.use_nested_tensor = False


def convert(model: nn.Module, energy: float | None = 0.93, *, rank: int | None = None, budget: float | None = None,
            target_modules=None, exclude=None, progress: bool = True, config: CersaConfig | None = None,
            **options) -> nn.Module:
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
    svd: "auto" (default: randomized SVD for weights with min(m, n) >= 512 and energy < 1, else
      full), "full", or "randomized" (stops as soon as the exact retained energy reaches tau;
      decompose.randomized_svd).  The SVD runs on the weight's device (GPU when the model is there).
    delta_rank, alpha, init, train_S, train_bias, backend: as ``CersaLinear.from_linear``.
    config: a ``cersa_kernels.CersaConfig`` holding all of the options above instead (keywords
      given as well override its fields).
    target_modules: None (every supported layer), a regex str (full match on the dotted module
      name) or a list of names / dotted suffixes / globs.  exclude: the same form, removed from the
      targets.  A pattern that matches nothing, or a targeted module of a type that cannot be
      converted (with the reason), raises ValueError naming it; targeting a projection inside an
      nn.MultiheadAttention (instead of the attention module) too.
    max_frozen_ratio: a layer is converted only when its stored numbers r(m + n + 1) are below
      max_frozen_ratio * m n; otherwise it stays dense and is reported (None converts every layer).
    progress: a tqdm bar with the current layer's name as postfix.
    After the call only the deltas A, B (and S or bias when asked) of converted layers require
    grad; every other parameter of the model is frozen.  Converting twice changes nothing.
    PyTorch's fused inference fast paths of nn.TransformerEncoder(Layer) are turned off where a
    CERSA layer sits inside (they read raw weights).
    The report (``get_report(model)`` or ``model.cersa_report``) lists every candidate layer.
    All decompositions run before any module is swapped: on any error the model is unchanged.
    Raises TypeError/ValueError naming the argument or the layer.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    # the keyword face: the default energy gives way to rank= or budget=
    if budget is not None:
        if rank is not None:
            raise ValueError(f"budget: give either budget= or rank=, got budget={budget!r} and rank={rank!r}")
        options.update(budget=budget, energy=None, rank=None)
    elif rank is not None:
        options.update(rank=rank, energy=None)
    elif config is None or energy != 0.93:
        options.update(energy=energy)
    config = CersaConfig.make(config, **options)
    report = ConversionReport(energy=config.energy)
    todo, names = collect(model, target_modules, exclude, report)
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
    try:
        ranks, policy = layer_ranks(todo, config, progress=plan_tick if budgeted else None)
        report.policy = policy
        for (name, mod, cls), rk in zip(todo, ranks):
            bar.set_postfix_str(name, refresh=False)
            new = cls.from_dense(mod, config, ranks=rk, name=name)
            bar.update(1)
            rec = record_of(name, new)
            trunc = new.stored_numbers()[0]
            if keeps_dense(trunc, rec.params_before, config.max_frozen_ratio):
                rec.status = "dense"
                rec.reason = (f"no saving: rank {new.rank} stores r(m+n+1) = {trunc:,} >= "
                              f"{config.max_frozen_ratio:g} x {rec.params_before:,}")
                rec.params_after = rec.frozen_bytes = 0
                report.layers.append(rec)
                continue
            report.layers.append(rec)
            built.append((name, new))
    finally:
        bar.close()
    # Phase 2: swap and freeze (a module registered under several names is replaced under each).
    aliases: dict[int, list[str]] = {}
    for n, mod in model.named_modules(remove_duplicate=False):
        if n:
            aliases.setdefault(id(mod), []).append(n)
    modules = dict(model.named_modules())
    for name, new in built:
        for alias in aliases.get(id(modules[name]), [name]):
            set_module(model, alias, new)
    _disable_fast_paths(model)
    cersa_params = set()
    for mod in model.modules():
        if isinstance(mod, CersaModule):
            cersa_params.update(id(p) for p in mod.parameters() if p.requires_grad)
    for p in model.parameters():
        if id(p) not in cersa_params:
            p.requires_grad_(False)
    order = {n: i for i, n in enumerate(names)}
    report.layers.sort(key=lambda l: order.get(l.name, 0))
    model.cersa_report = report
    return model


def merge(model: nn.Module) -> nn.Module:
    """Replace every CERSA layer by the dense layer it computes (``layer.merge()``: nn.Linear, a
    Conv1D with its (in, out) layout, nn.Conv2d with the same hyper-parameters, or
    nn.MultiheadAttention), in place; returns the model.  The merged weight U diag(S) Vh + scale B A
    is formed in float32 or higher and rounded once to the layer's dtype."""
    if isinstance(model, CersaModule):
        raise TypeError("model: expected a model containing CERSA layers, got a CERSA layer itself; "
                        "call layer.merge() instead")
    for name, mod in cersa_modules(model).items():
        set_module(model, name, mod.merge())
    if hasattr(model, "cersa_report"):
        del model.cersa_report
    return model
