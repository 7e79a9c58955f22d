#!/usr/bin/env python
"""GPU check of every GPU backend of cersa_linear: correctness against float64, then timings.

Run on a machine with a CUDA GPU (installs nothing; needs torch and triton):

    python bench/gpu_check.py                  # full check + table, < 5 minutes on one H200
    python bench/gpu_check.py --budget 120     # stop timing new rows after ~120 s
    python bench/gpu_check.py --cpu-smoke      # tiny shapes on the CPU (Triton interpreter), to test the script

Part 1 (correctness): for each GPU backend ("triton", "cuda" when
``cersa_kernels.available_backends("cuda")`` lists it, and "reference") and each dtype (fp32, fp32 with
TF32, bf16, fp16), forward and every gradient (x, U, S, Vh, A, B, bias) of
``cersa_kernels.cersa_linear`` on fresh random data (never zeros) are compared with the float64
reference; error = max|out - ref| / max|ref|; bounds fp32 5e-5, tf32 5e-3, fp16 5e-3, bf16 3e-2.

Part 1b (quantized factors): for the same backends, U and Vh as ``QuantizedMatrix`` codes (int8, nf4,
nf4 with double quantization; cersa_kernels/quant.py) at the MiniLM shapes (384x384 r 176,
1536x384 r 273, 384x1536 r 263; k = 16, N = 512) in fp32 and bf16 and an odd shape (37 rows,
45 -> 29, r 7, k 3, blocks of 16 that do not divide the factors) in fp32, bf16 and fp16: forward
and every gradient (x, S, A, B, bias; the codes are frozen, so no dU / dVh: "-") against the float64
reference computed from the decoded factors (``QuantizedMatrix.dequantize(torch.float64)``, what
``CersaLinear.dequantized_factors`` returns), same bounds.  "fused" after the backend: its
quantized kernels run (cuda: the panel-decode schedule; triton: ``cersa_kernels::triton_forward_q`` /
``triton_backward_q``, the codes decoded in the kernels' tile loads), checked on each row (a row
whose forward or backward did not dispatch them is an ERROR); otherwise the call decodes each factor.

Part 2 (timing, bf16): forward, backward and forward+backward medians (triton.testing.do_bench,
CUDA events) of
  dense+LoRA  a frozen nn.Linear (cuBLAS) plus PEFT-style lora_A / lora_B (k = 16, alpha = 32),
  reference   cersa_linear(backend="reference") (cuBLAS GEMMs on the separate factors),
  triton / cuda  cersa_linear(backend=...),
with x, A, B trainable (x requires grad: the layer sits inside a network) and everything else frozen,
at m x n = 768x768, 3072x768 (BERT-base / ViT-B), 4096x4096, 11008x4096 (LLaMA-7B), frozen rank r at
25/50/75% of min(m, n), N = 1, 16, 4096, 16384 tokens.

FLOPs per pass (docs/design.md "FLOPs"): CERSA fwd 2N(r+k)(m+n), bwd 2N[(r+k)(m+n) + k(m+n)];
dense+LoRA fwd 2Nmn + 2Nk(m+n), bwd 2Nmn + 4Nk(m+n).  rho = (r+k)(m+n)/(mn).
Columns: TFLOP/s of forward+backward; "x lora" = time(dense+LoRA)/time(path) (the speed-up);
"ideal" = 1/rho; "vs rho" = speed-up / ideal (1.00 = the FLOP ratio is fully realised);
"eff" = TFLOP/s of the path / TFLOP/s of dense+LoRA (the Triton target: >= 0.80 at N >= 4096);
"y err" = forward error of the autotuned kernels against the fp32 reference on the same bf16 inputs.
Exit status 1 if any error exceeds its bound.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

K_DELTA = 16
LORA_ALPHA = 32
SHAPES = [(768, 768), (3072, 768), (4096, 4096), (11008, 4096)]
FRACTIONS = (0.25, 0.50, 0.75)
TOKENS = (1, 16, 4096, 16384)
BOUNDS = {"fp32": 5e-5, "tf32": 5e-3, "fp16": 5e-3, "bf16": 3e-2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=240.0,
                   help="seconds after which no new timing row is started (default 240: the script "
                        "must finish within 5 minutes on one H200)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run tiny shapes on the CPU under the Triton interpreter (tests this script)")
    p.add_argument("--skip-check", action="store_true", help="skip the correctness part")
    p.add_argument("--skip-timing", action="store_true", help="skip the timing part")
    p.add_argument("--skip-quant", action="store_true", help="skip the quantized-factor correctness part")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to torch; nothing to check "
              "(run on a GPU machine, or use --cpu-smoke to test the script under the Triton interpreter).")
        return 0
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import cersa_kernels
    from cersa_kernels import cersa_linear

    device = "cpu" if args.cpu_smoke else "cuda"
    backends = [b for b in ("triton", "cuda") if b in cersa_kernels.available_backends(device)]
    backends.append("reference")
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"device: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB), "
              f"torch {torch.__version__}, backends: {', '.join(backends)}")
    else:
        print(f"device: CPU (Triton interpreter smoke run), backends: {', '.join(backends)}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        triton = None

    failures = 0
    if not args.skip_check:
        failures = correctness(torch, cersa_linear, backends, device, small=args.cpu_smoke)
    if not args.skip_check and not args.skip_quant:
        failures += quantized_correctness(torch, cersa_linear, backends, device, small=args.cpu_smoke)
    if not args.skip_timing:
        failures += timing(torch, cersa_linear, backends, device, t_start, args.budget, smoke=args.cpu_smoke)
    print(f"total {time.time() - t_start:.0f} s; correctness failures: {failures}")
    return 1 if failures else 0


# ------------------------------------------------------------------------------------------------
# part 1: correctness
# ------------------------------------------------------------------------------------------------

def _factors(torch, N, n, m, r, k, dtype, device, gen):
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    x = rnd(N, n)
    U = rnd(m, r, scale=1 / math.sqrt(m))
    S = (torch.rand(r, generator=gen, dtype=torch.float64) * 2 + 0.5).to(device=device, dtype=dtype)
    Vh = rnd(r, n, scale=1 / math.sqrt(n))
    A = rnd(k, n, scale=1 / math.sqrt(n))
    B = rnd(m, k, scale=0.1)
    bias = rnd(m)
    return x, U, S, Vh, A, B, bias


def _rel(out, want):
    if want.numel() == 0:
        return 0.0
    s = want.abs().max().item()
    return (out.double() - want).abs().max().item() / (s if s > 0 else 1.0)


def correctness(torch, cersa_linear, backends, device, small=False):
    print("\n== correctness: max|out - ref| / max|ref| against float64 (fresh random data) ==")
    # (shape, dtype labels): odd sizes (every ragged edge) in every dtype; a real shape (aligned
    # sizes: the compiler's divisibility specialisations) in bf16 and fp32.
    cases = ([((37, 45, 29, 7, 3), ("fp32", "bf16", "fp16"))] if small else
             [((37, 45, 29, 7, 3), ("fp32", "tf32", "bf16", "fp16")),
              ((4096, 768, 3072, 384, 16), ("fp32", "bf16"))])
    try:  # one kernel configuration per variant here (compile time); part 2 checks the autotuned ones
        import cersa_kernels.backends.triton as triton_backend
        autotune_before = triton_backend.autotune_enabled()
        triton_backend.set_autotune(False)
    except Exception:
        triton_backend = None
    names = ("y", "dx", "dU", "dS", "dVh", "dA", "dB", "dbias")
    print(f"{'backend':<10} {'dtype':<5} {'N x n -> m, r, k':<24} " + " ".join(f"{c:>8}" for c in names)
          + "   bound  result")
    failures = 0
    gen = torch.Generator().manual_seed(1234)
    dtypes = [("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False),
              ("fp16", torch.float16, False)]
    for (N, n, m, r, k), labels in cases:
        for label, dtype, tf32 in dtypes:
            if label not in labels:
                continue
            vals = _factors(torch, N, n, m, r, k, dtype, device, gen)
            dy = torch.randn(N, m, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            ref_leaves = [v.double().requires_grad_(True) for v in vals]
            y64 = cersa_linear(*ref_leaves, scale=2.0, backend="reference")
            y64.backward(dy.double())
            want = [y64.detach()] + [t.grad for t in ref_leaves]
            for be in backends:
                old = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = tf32
                try:
                    leaves = [v.clone().requires_grad_(True) for v in vals]
                    y = cersa_linear(*leaves, scale=2.0, backend=be)
                    y.backward(dy)
                    got = [y.detach()] + [t.grad for t in leaves]
                    errs = [_rel(g, w) for g, w in zip(got, want)]
                    err_txt = " ".join(f"{e:8.1e}" for e in errs)
                except Exception as exc:  # report and go on: the table must still come out
                    errs, err_txt = [math.inf], f"ERROR {type(exc).__name__}: {str(exc)[:120]}"
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = old
                bound = BOUNDS[label]
                ok = all(e <= bound for e in errs)
                failures += not ok
                shape = f"{N}x{n}->{m},{r},{k}"
                print(f"{be:<10} {label:<5} {shape:<24} {err_txt}  {bound:6.0e}  {'ok' if ok else 'FAIL'}")
    if triton_backend is not None:
        triton_backend.set_autotune(autotune_before)
    return failures


# ------------------------------------------------------------------------------------------------
# part 1b: quantized factors
# ------------------------------------------------------------------------------------------------

#: (code type, double quantization) of the quantized check.
QUANT_FORMATS = (("int8", False), ("nf4", False), ("nf4", True))


def _fused(name, device):
    """Whether backend ``name`` runs quantized factors through its own kernels on ``device``."""
    from cersa_kernels.backends import load_backend

    probe = getattr(load_backend(name), "has_quantized_kernels", None)
    return probe is not None and bool(probe(device))


def _quantized_ops_run(torch, fn):
    """Run fn() under a TorchDispatchMode; the names of the quantized-factor kernel ops
    (``*_forward_q`` / ``*_backward_q``) it dispatched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class _Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "_forward_q" in str(func) or "_backward_q" in str(func):
                seen.add(str(func))
            return func(*args, **(kwargs or {}))

    with _Log():
        fn()
    return seen


def quantized_correctness(torch, cersa_linear, backends, device, small=False):
    from cersa_kernels.quant import QuantizedMatrix

    print("\n== quantized factors: max|out - ref| / max|ref| against float64 from the decoded codes ==")
    # (N, n, m, r, k, block), dtype labels
    odd = ((37, 45, 29, 7, 3, 16), ("fp32", "bf16", "fp16"))
    cases = [odd] if small else [odd, ((512, 384, 384, 176, 16, 64), ("fp32", "bf16")),
                                 ((512, 384, 1536, 273, 16, 64), ("fp32", "bf16")),
                                 ((512, 1536, 384, 263, 16, 64), ("fp32", "bf16"))]
    names = ("y", "dx", "dU", "dS", "dVh", "dA", "dB", "dbias")
    print(f"{'backend':<16} {'dtype':<5} {'N x n -> m, r, k':<24} " + " ".join(f"{c:>8}" for c in names)
          + "   bound  result")
    failures = 0
    gen = torch.Generator().manual_seed(4321)
    dtypes = [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:  # one kernel configuration per variant, as in part 1 (compile time)
        import cersa_kernels.backends.triton as triton_backend
        autotune_before = triton_backend.autotune_enabled()
        triton_backend.set_autotune(False)
    except Exception:
        triton_backend = None
    try:
        for (N, n, m, r, k, block), labels in cases:
            for qt, dq in QUANT_FORMATS:
                for label, dtype in dtypes:
                    if label not in labels:
                        continue
                    x, U, S, Vh, A, B, bias = _factors(torch, N, n, m, r, k, dtype, device, gen)
                    Uq = QuantizedMatrix.quantize(U.float(), qt, block, dq, dtype=dtype)
                    Vhq = QuantizedMatrix.quantize(Vh.float(), qt, block, dq, dtype=dtype)
                    dy = torch.randn(N, m, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
                    leaves64 = [t.double().requires_grad_(True) for t in (x, S, A, B, bias)]
                    x64, S64, A64, B64, b64 = leaves64
                    y64 = cersa_linear(x64, Uq.dequantize(torch.float64), S64, Vhq.dequantize(torch.float64),
                                       A64, B64, b64, scale=2.0, backend="reference")
                    y64.backward(dy.double())
                    want = [y64.detach()] + [t.grad for t in leaves64]
                    for be in backends:
                        tag = f"{be}/{qt}{'+dq' if dq else ''}{' fused' if _fused(be, device) else ''}"
                        try:
                            leaves = [t.clone().requires_grad_(True) for t in (x, S, A, B, bias)]
                            xl, Sl, Al, Bl, bl = leaves
                            out = []

                            def call():
                                out.append(cersa_linear(xl, Uq, Sl, Vhq, Al, Bl, bl, scale=2.0, backend=be))
                                out[0].backward(dy)

                            ran = _quantized_ops_run(torch, call)
                            if _fused(be, device) and not (any("forward_q" in n for n in ran)
                                                           and any("backward_q" in n for n in ran)):
                                raise RuntimeError(f"the quantized kernels did not run (dispatched: {sorted(ran)})")
                            y = out[0]
                            got = [y.detach()] + [t.grad for t in leaves]
                            errs = [_rel(g, w) for g, w in zip(got, want)]
                            e = dict(zip(("y", "dx", "dS", "dA", "dB", "dbias"), errs))
                            err_txt = " ".join(f"{'-':>8}" if c in ("dU", "dVh") else f"{e[c]:8.1e}" for c in names)
                        except Exception as exc:  # report and go on: the table must still come out
                            errs, err_txt = [math.inf], f"ERROR {type(exc).__name__}: {str(exc)[:120]}"
                        bound = BOUNDS[label]
                        ok = all(v <= bound for v in errs)
                        failures += not ok
                        shape = f"{N}x{n}->{m},{r},{k}"
                        print(f"{tag:<16} {label:<5} {shape:<24} {err_txt}  {bound:6.0e}  {'ok' if ok else 'FAIL'}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
        if triton_backend is not None:
            triton_backend.set_autotune(autotune_before)
    return failures


# ------------------------------------------------------------------------------------------------
# part 2: timing
# ------------------------------------------------------------------------------------------------

def _bench_fn(torch, device):
    if device == "cuda":
        import triton.testing

        def bench(fn, grad_to_none):
            return triton.testing.do_bench(fn, warmup=10, rep=40, grad_to_none=grad_to_none, return_mode="median")
        return bench

    def bench(fn, grad_to_none):  # CPU smoke: wall clock median of 3
        ts = []
        for _ in range(3):
            for t in grad_to_none:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    return bench


def _lora_layer(torch, W, bias, k, dtype, device):
    """PEFT-style LoRA: frozen nn.Linear + lora_A (k, n) / lora_B (m, k), scaling alpha / k."""
    from torch import nn
    m, n = W.shape
    base = nn.Linear(n, m, device=device, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(W)
        base.bias.copy_(bias)
    base.requires_grad_(False)
    lora_A = nn.Linear(n, k, bias=False, device=device, dtype=dtype)
    lora_B = nn.Linear(k, m, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        lora_B.weight.normal_(0, 0.02)  # PEFT inits B to zero; nonzero keeps the timing honest
    scaling = LORA_ALPHA / k

    def f(x):
        return base(x) + lora_B(lora_A(x)) * scaling
    return f, [lora_A.weight, lora_B.weight]


def _time_three(torch, bench, fwd, x, params, dy):
    """(forward ms, backward ms, forward+backward ms)."""
    grads = [x] + params
    t_f = bench(lambda: fwd(x), [])
    y = fwd(x)
    t_b = bench(lambda: y.backward(dy, retain_graph=True), grads)
    t_fb = bench(lambda: fwd(x).backward(dy), grads)
    return t_f, t_b, t_fb


def timing(torch, cersa_linear, backends, device, t_start, budget, smoke=False):
    dtype = torch.bfloat16 if not smoke else torch.float32
    bench = _bench_fn(torch, device)
    shapes = SHAPES if not smoke else [(40, 24)]
    tokens = TOKENS if not smoke else (1, 16)
    k = K_DELTA if not smoke else 4
    s = LORA_ALPHA / K_DELTA
    print(f"\n== timing ({'bf16' if not smoke else 'fp32 smoke'}; medians in ms; x, A, B trainable; k = {k}) ==")
    hdr = (f"{'m x n':>11} {'r':>5} {'N':>6} {'path':<11} {'fwd':>8} {'bwd':>8} {'f+b':>8} {'TFLOP/s':>8} "
           f"{'x lora':>7} {'ideal':>6} {'vs rho':>6} {'eff':>5} {'y err':>8}")
    print(hdr)
    print("-" * len(hdr))
    gen = torch.Generator(device=device).manual_seed(0)
    skipped = 0
    failures = 0
    for (m, n) in shapes:
        p = min(m, n)
        for frac in FRACTIONS:
            r = max(1, int(round(frac * p)))
            rho = (r + k) * (m + n) / (m * n)
            U = torch.randn(m, r, device=device, dtype=dtype, generator=gen) / math.sqrt(m)
            S = torch.rand(r, device=device, dtype=dtype, generator=gen) + 0.5
            Vh = torch.randn(r, n, device=device, dtype=dtype, generator=gen) / math.sqrt(n)
            A = (torch.randn(k, n, device=device, dtype=dtype, generator=gen) / math.sqrt(n)).requires_grad_(True)
            B = (torch.randn(m, k, device=device, dtype=dtype, generator=gen) * 0.02).requires_grad_(True)
            bias = torch.randn(m, device=device, dtype=dtype, generator=gen)
            W = (U * S) @ Vh
            lora, lora_params = _lora_layer(torch, W, bias, k, dtype, device)
            for N in tokens:
                if time.time() - t_start > budget:
                    skipped += 1
                    continue
                x = torch.randn(N, n, device=device, dtype=dtype, generator=gen).requires_grad_(True)
                dy = torch.randn(N, m, device=device, dtype=dtype, generator=gen)
                f_cersa = 2 * N * (r + k) * (m + n)
                b_cersa = 2 * N * ((r + k) * (m + n) + k * (m + n))
                f_lora = 2 * N * m * n + 2 * N * k * (m + n)
                b_lora = 2 * N * m * n + 4 * N * k * (m + n)
                with torch.no_grad():  # forward check of the autotuned kernels at this shape
                    y_ref = cersa_linear(x.float(), U.float(), S.float(), Vh.float(), A.float(), B.float(),
                                         bias.float(), scale=s, backend="reference").double()
                rows = []
                errs = {}
                try:
                    t_lora = _time_three(torch, bench, lora, x, lora_params, dy)
                    rows.append(("dense+LoRA", t_lora, f_lora + b_lora))
                except Exception as exc:
                    print(f"{m:>5}x{n:<5} {r:>5} {N:>6} dense+LoRA  ERROR {type(exc).__name__}: {exc}")
                    continue
                for be in backends:
                    def fwd(xx, be=be):
                        return cersa_linear(xx, U, S, Vh, A, B, bias, scale=s, backend=be)
                    try:
                        with torch.no_grad():
                            errs[be] = _rel(fwd(x), y_ref)
                        rows.append((be, _time_three(torch, bench, fwd, x, [A, B], dy), f_cersa + b_cersa))
                    except Exception as exc:
                        print(f"{m:>5}x{n:<5} {r:>5} {N:>6} {be:<11} ERROR {type(exc).__name__}: {str(exc)[:100]}")
                lora_rate = (f_lora + b_lora) / (t_lora[2] * 1e-3) / 1e12
                for name, (tf, tb, tfb), flops in rows:
                    rate = flops / (tfb * 1e-3) / 1e12
                    speed = t_lora[2] / tfb
                    is_lora = name == "dense+LoRA"
                    err = errs.get(name)
                    bad = err is not None and not err <= BOUNDS["bf16" if not smoke else "fp32"]
                    failures += bad
                    print(f"{m:>5}x{n:<5} {r:>5} {N:>6} {name:<11} {tf:8.3f} {tb:8.3f} {tfb:8.3f} {rate:8.2f} "
                          + (f"{'':>7} {1 / rho:6.2f} {'':>6} {'':>5}" if is_lora else
                             f"{speed:7.2f} {1 / rho:6.2f} {speed * rho:6.2f} {rate / lora_rate:5.2f}")
                          + (f" {err:8.1e}" if err is not None else "") + (" FAIL" if bad else ""))
                del x, dy
            del U, S, Vh, A, B, bias, W, lora, lora_params
            if device == "cuda":
                torch.cuda.empty_cache()
    if skipped:
        print(f"({skipped} rows skipped: the --budget of {budget:.0f} s was spent)")
    return failures


if __name__ == "__main__":
    sys.exit(main())
