#!/usr/bin/env python
"""Compile every kernel variant the Triton backend launches for CUDA targets, without a GPU.

    python scripts/triton_compile_check.py [--arch 90,80] [--dtype bf16,fp16,fp32]
        [--shape N,n,m,r,k] [--smem 80=166912,90=232448] [--quant int8,nf4] [--all-configs]

The backend's eager forward and backward (``_forward_impl`` / ``_backward_impl`` of
cersa_kernels.backends.triton, and for each format of ``--quant`` the quantized-factor
``_forward_q_impl`` / ``_backward_q_impl``, whose frozen operand is decoded from int8 / NF4 codes in
the kernels' loads) plan their launches on small CPU tensors and hand them to this
script instead of running them (their ``launch`` argument); each distinct launch is then compiled
ahead of time (Triton -> PTX -> cubin with the ptxas bundled in the triton wheel) for each target
architecture, with the argument specialisation Triton's launcher would use (integers equal to 1
become constants, multiples of 16 get the divisibility hint) and with the tile configuration(s)
the backend would pick on a device with the given shared memory (``kernels.select_configs``).
Prints the shared memory of each compiled kernel; exits 1 if a kernel fails to compile or needs
more shared memory than the target has, 2 on bad arguments or when TRITON_INTERPRET is set (the
kernels must be compiled ones).  A CI check of the GPU code path; it runs nothing on a GPU.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

#: opt-in shared memory per block (bytes) by compute capability (CUDA C Programming Guide,
#: "Technical Specifications per Compute Capability": 163 KB on 8.0, 99 KB on 8.6/8.9, 227 KB on 9.0).
DEFAULT_SMEM = "80=166912,86=101376,89=101376,90=232448"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
POINTER_TYPES = {**{dt: name for name, dt in DTYPES.items()}, torch.int8: "i8", torch.uint8: "u8"}
#: gradient sets whose backward passes together use every kernel: all gradients (seg_cols, seg_k,
#: seg_rows) and dbias alone (colsum).
NEEDS = ((True,) * 7, (False,) * 6 + (True,))
#: the quantized-factor backward planned per format: every gradient it has (x, S, A, B, bias).
QUANT_NEEDS = (True,) * 5
#: block size of the planned quantized factors (the default of cersa_kernels.quant).
QUANT_BLOCK = 64


def _pairs(text: str, what: str) -> dict[int, int]:
    """{ARCH: BYTES} from "ARCH=BYTES,..."; ValueError naming ``what`` otherwise."""
    out = {}
    for item in filter(None, text.split(",")):
        arch, _, value = item.partition("=")
        try:
            out[int(arch)] = int(value)
        except ValueError:
            raise ValueError(f"{what}: expected ARCH=BYTES items such as 90=232448, got {item!r}") from None
    return out


def plan(dtype: torch.dtype, shape: tuple[int, int, int, int, int], quant: tuple[str, ...] = ()) -> list:
    """The distinct launches (kernels.Launch) of forward (save_xv) plus the backward passes of
    :data:`NEEDS` of the backend on random CPU tensors of ``dtype`` and shape (N, n, m, r, k), and
    for each format in ``quant`` ("int8", "nf4") the quantized-factor forward (save_xv) and backward
    (:data:`QUANT_NEEDS`) with U and Vh quantized in blocks of :data:`QUANT_BLOCK`."""
    import cersa_kernels.backends.triton as tb
    from cersa_kernels.quant import QuantizedMatrix

    launches: list = []
    N, n, m, r, k = shape
    g = torch.Generator().manual_seed(0)

    def rnd(*size):
        return torch.randn(*size, generator=g).to(dtype)

    x, U, S, Vh, A, B, bias, dy = rnd(N, n), rnd(m, r), rnd(r).abs(), rnd(r, n), rnd(k, n), rnd(m, k), rnd(m), rnd(N, m)
    y, h_k, xv = tb._forward_impl(x, U, S, Vh, A, B, bias, 2.0, True, launch=launches.append)
    for needs in NEEDS:
        tb._backward_impl(dy, x, h_k, xv, U, S, Vh, A, B, 2.0, needs, launch=launches.append)
    for quant_type in quant:
        Uq, Vhq = (QuantizedMatrix.quantize(F.float(), quant_type, QUANT_BLOCK) for F in (U, Vh))
        codes = (Uq.codes, Uq.scales(), S, Vhq.codes, Vhq.scales())
        tb._forward_q_impl(x, *codes, A, B, bias, m, n, quant_type, QUANT_BLOCK, 2.0, True, launch=launches.append)
        tb._backward_q_impl(dy, x, h_k, xv, *codes, A, B, m, n, quant_type, QUANT_BLOCK, 2.0, QUANT_NEEDS,
                            launch=launches.append)
    distinct = {}
    for launch in launches:
        distinct.setdefault(repr((launch.name, _signature(launch), launch.constexprs)), launch)
    return list(distinct.values())


def _signature(launch):
    """(signature, constants, attributes) of a launch's runtime arguments, as Triton's launcher
    specialises them."""
    fn = launch.kernel
    dns = set(fn.do_not_specialize)
    sig, consts, attrs = {}, {}, {}
    for i, (name, v) in enumerate(zip(fn.arg_names, launch.args)):
        free = i not in dns and name not in dns
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + POINTER_TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif isinstance(v, int):
            if v == 1 and free:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if v % 16 == 0 and free:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_launch(launch, cfg, arch: int) -> int:
    """Compile one launch with tile configuration ``cfg`` (a triton.Config) for sm_<arch>;
    returns the kernel's shared memory in bytes.  Raises what the compiler raises."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as tcompile

    sig, consts, attrs = _signature(launch)
    meta = {**launch.constexprs, **cfg.kwargs}
    sig.update(dict.fromkeys(meta, "constexpr"))
    consts.update(meta)
    src = ASTSource(fn=launch.kernel, signature=sig, constexprs=consts, attrs=attrs)
    kern = tcompile(src, target=GPUTarget("cuda", arch, 32),
                    options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return kern.metadata.shared


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="90,80", help="compute capabilities, e.g. 90,80 (default)")
    p.add_argument("--dtype", default="bf16", help="comma-separated: bf16 (default), fp16, fp32, fp64")
    p.add_argument("--shape", default="4096,768,3072,384,16", help="N,n,m,r,k of the planned call")
    p.add_argument("--smem", default=DEFAULT_SMEM,
                   help=f"opt-in shared memory per block in bytes by arch, ARCH=BYTES,... (default {DEFAULT_SMEM})")
    p.add_argument("--quant", default="int8,nf4",
                   help="quantized-factor formats whose kernel variants are compiled too: int8,nf4 (default), "
                        "or none")
    p.add_argument("--all-configs", action="store_true",
                   help="every configuration the autotuner would try (default: the one taken without autotuning)")
    args = p.parse_args(argv)
    try:
        args.arch = [int(a) for a in args.arch.split(",")]
        args.shape = tuple(int(v) for v in args.shape.split(","))
        args.smem = _pairs(args.smem, "--smem")
    except ValueError as exc:
        p.error(str(exc))
    if len(args.shape) != 5 or min(args.shape) < 1:
        p.error(f"--shape: expected five positive integers N,n,m,r,k, got {args.shape}")
    for a in args.arch:
        if a not in args.smem:
            p.error(f"--arch {a}: no shared memory limit for it in --smem ({sorted(args.smem)}); add {a}=BYTES")
    args.dtype = args.dtype.split(",")
    args.quant = () if args.quant == "none" else tuple(args.quant.split(","))
    for q in args.quant:
        if q not in ("int8", "nf4"):
            p.error(f"--quant: expected some of int8, nf4, or none, got {q!r}")
    for d in args.dtype:
        if d not in DTYPES:
            p.error(f"--dtype: expected some of {sorted(DTYPES)}, got {d!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import triton

    from cersa_kernels.backends.triton import kernels as K
    if K.INTERPRETED:
        print("triton_compile_check: the kernels were created by the interpreter; unset TRITON_INTERPRET")
        return 2
    failures = 0
    t0 = time.time()
    for dname in args.dtype:
        launches = plan(DTYPES[dname], args.shape, args.quant)
        for arch in args.arch:
            smem = args.smem[arch]
            limits = K.Limits(smem_per_block=smem, major=arch // 10)
            for launch in launches:
                if launch.tuner is None:  # the constexprs are complete: Triton's default warps/stages
                    configs = [triton.Config({})]
                else:
                    configs = K.select_configs(K.GPU_CONFIGS, launch.named_args, limits, autotune=args.all_configs)
                for cfg in configs:
                    c = {**launch.constexprs, **cfg.kwargs}
                    quant = {1: " int8", 2: " nf4"}.get(launch.constexprs.get("QUANT"), "")
                    tag = (f"sm_{arch} {dname} {launch.name:<8}{quant} BM{c['BM']} BN{c['BN']} "
                           f"BK{c.get('BK', '-')} w{cfg.num_warps} s{cfg.num_stages} "
                           + ",".join(k for k, v in launch.constexprs.items() if v is True))
                    try:
                        shared = compile_launch(launch, cfg, arch)
                    except Exception as exc:  # report every failure, then exit 1
                        failures += 1
                        print(f"{tag}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                        continue
                    ok = shared <= smem
                    failures += not ok
                    print(f"{tag}: shared {shared} B {'ok' if ok else 'EXCEEDS ' + str(smem)}")
    print(f"triton_compile_check: {failures} failure(s) in {time.time() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
