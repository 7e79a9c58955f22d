"""Forward+backward of one CERSA layer with quantized frozen factors on the "cpp" backend (the fused
dequantizing kernels of csrc/cpu/cersa_cpu_quant.cpp), against the same layer unquantized and a
frozen dense nn.Linear with the real PEFT LoRA (bench/baselines.py), at the MiniLM shapes at
energy 0.93 and the BERT-base shapes at 25 % rank (bench/shapes.py), delta rank k = 16.

Methods (one row each in a group "<m>x<n> N=<N> quantized forward+backward (...)"):
  "cpp"        cersa_linear(backend="cpp") with dense U, Vh (the unquantized time, the baseline)
  "cpp-nf4"    the same with U and Vh stored as NF4 codes (QuantizedMatrix, blocks of 64)
  "cpp-int8"   the same with int8 codes
  "dense+lora" frozen nn.Linear + PEFT LoRA
The input x requires grad, A and B train: the backward computes dx, dA, dB, as in
bench/bench_linear.py.  Only times are recorded; the extra_info of these benchmarks has no "m"
key, so bench/report.py (the bench_linear tables) leaves them out.  The ratios come from this
file run as a script, over one or more --benchmark-json files (the median over the files of the
per-file ratios of median times)::

    pytest bench/bench_quant.py --bench-threads=1 --benchmark-timer=time.process_time \\
        --benchmark-json=results/bench_quant.json
    python bench/bench_quant.py results/bench_quant*.json

Sizes: "ci" (under --benchmark-disable: 384x384 at N = 1 and 512, once each), "default" and
"full" (every shape at N = 1, 512, 4096).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make "bench" importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

from bench.conftest import backend_skip_reason, bench_device, bench_size, timed  # noqa: E402
from bench.shapes import BERT_SHAPES, DELTA_RANK, LORA_ALPHA, MINILM_SHAPES, Case, fraction_rank, ranks_for  # noqa: E402

METHODS = ("dense+lora", "cpp", "cpp-nf4", "cpp-int8")
QUANT = {"cpp-nf4": "nf4", "cpp-int8": "int8"}
BLOCK = 64
NS = (1, 512, 4096)


def matrix(size: str) -> list[tuple]:
    """(shape, Rank, N) of a size: MiniLM at energy 0.93 and BERT-base at 25 % rank."""
    if size == "ci":
        shape = MINILM_SHAPES[0]
        rank = next(rk for rk in ranks_for(shape) if rk.label == "e0.93")
        return [(shape, rank, N) for N in (1, 512)]
    out = []
    for shape in MINILM_SHAPES:
        rank = next(rk for rk in ranks_for(shape) if rk.label == "e0.93")
        out += [(shape, rank, N) for N in NS]
    for shape in BERT_SHAPES:
        out += [(shape, fraction_rank(shape, 0.25), N) for N in NS]
    return out


def pytest_generate_tests(metafunc):
    if "qcase" not in metafunc.fixturenames:
        return
    config = metafunc.config
    size, device = bench_size(config), bench_device(config)
    try:
        cases = matrix(size)
    except (ImportError, FileNotFoundError) as exc:  # the MiniLM weights package is missing
        metafunc.parametrize("qcase", [pytest.param(None, marks=pytest.mark.skip(
            reason=f"cannot build the benchmark matrix: {exc}"))], ids=["matrix"])
        return
    params = []
    for shape, rank, N in cases:
        for method in METHODS:
            why = "" if method == "dense+lora" else backend_skip_reason(config, "cpp", device)
            if not why and method in QUANT:
                from cersa_kernels.backends import cpp

                if not cpp.has_quantized_kernels(device):
                    why = f"the cpp backend has no quantized-factor kernels for {device} tensors"
            marks = [pytest.mark.skip(reason=why)] if why else []
            params.append(pytest.param((shape, rank, N, method), marks=marks,
                                       id=f"{shape.id}-N{N}-fwdbwd-{method}-r{rank.r}({rank.label})"))
    metafunc.parametrize("qcase", params)


def build(shape, rank, N: int, method: str, device: str, dtype, seed: int = 0):
    """(layer, x, dy): layer(x) -> y (N, m); the CERSA variants share U, S, Vh, A, B, bias."""
    import torch

    from bench.baselines import build as build_baseline
    from cersa_kernels.ops import cersa_linear
    from cersa_kernels.quant import QuantizedMatrix

    if method == "dense+lora":
        return build_baseline(Case("dense+lora", shape, N, "fwdbwd"), device, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    m, n, r, k = shape.m, shape.n, rank.r, DELTA_RANK
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cast = lambda t: t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
    x = cast(rnd(N, n)).requires_grad_(True)
    dy = cast(rnd(N, m))
    bias = cast(rnd(m) * 0.1)
    U = cast(rnd(m, r) / math.sqrt(m))
    S = cast(torch.linspace(2.0, 0.1, r))
    Vh = cast(rnd(r, n) / math.sqrt(n))
    A = cast(rnd(k, n) / math.sqrt(n)).requires_grad_(True)
    B = cast(rnd(m, k) * 0.01).requires_grad_(True)
    if method in QUANT:
        U = QuantizedMatrix.quantize(U, QUANT[method], BLOCK, dtype=dtype)
        Vh = QuantizedMatrix.quantize(Vh, QUANT[method], BLOCK, dtype=dtype)
    scale = LORA_ALPHA / k

    def layer(inp):
        return cersa_linear(inp, U, S, Vh, A, B, bias, scale, backend="cpp")

    return layer, x, dy


def test_quantized_forward_backward(benchmark, qcase, device, dtype, request):
    """One training step of the layer: forward, then backward (dx, dA, dB)."""
    shape, rank, N, method = qcase
    benchmark.group = f"{shape.id} N={N} quantized forward+backward ({shape.family} {shape.layer})"
    benchmark.extra_info.update({"bench": "quant", "method": method, "shape": shape.id, "out_features": shape.m,
                                 "in_features": shape.n, "rank": rank.r, "rank_label": rank.label, "N": N,
                                 "k": DELTA_RANK, "quant_block_size": BLOCK, "device": device,
                                 "dtype": str(dtype).replace("torch.", "")})
    layer, x, dy = build(shape, rank, N, method, device, dtype)
    timed(benchmark, lambda: layer(x).backward(dy), request.config.getoption("--bench-budget"), device)


# ------------------------------------------------------------------------------------- ratios
def ratios(paths: list[str]) -> list[dict]:
    """Per (shape, rank, N): the median over the files of each file's median-time ratios
    nf4 / cpp, int8 / cpp, and each CERSA variant / dense+LoRA.  Returns one dict per row."""
    per: dict[tuple, dict[str, list[float]]] = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        times: dict[tuple, dict[str, float]] = {}
        for b in data.get("benchmarks", []):
            ei = b.get("extra_info") or {}
            if ei.get("bench") != "quant":
                continue
            key = (ei["shape"], ei["rank"], ei["N"])
            times.setdefault(key, {})[ei["method"]] = b["stats"]["median"]
        for key, t in times.items():
            row = per.setdefault(key, {})
            for num, den in (("cpp-nf4", "cpp"), ("cpp-int8", "cpp"), ("cpp", "dense+lora"),
                             ("cpp-nf4", "dense+lora"), ("cpp-int8", "dense+lora")):
                if num in t and den in t:
                    row.setdefault(f"{num} / {den}", []).append(t[num] / t[den])
            if "cpp" in t:
                row.setdefault("cpp ms", []).append(1e3 * t["cpp"])
    out = []
    for (shape, r, N), row in sorted(per.items(), key=lambda kv: (kv[0][0], kv[0][2])):
        out.append({"shape": shape, "rank": r, "N": N, "files": max(len(v) for v in row.values()),
                    **{name: statistics.median(v) for name, v in row.items()}})
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    rows = ratios(argv)
    cols = ["cpp ms", "cpp-nf4 / cpp", "cpp-int8 / cpp", "cpp / dense+lora", "cpp-nf4 / dense+lora",
            "cpp-int8 / dense+lora"]
    print("| m x n | r | N | files | " + " | ".join(cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    for row in rows:
        cells = [f"{row[c]:.3f}" if c in row else "-" for c in cols]
        print(f"| {row['shape']} | {row['rank']} | {row['N']} | {row['files']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
