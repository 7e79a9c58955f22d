"""Compile every kernel variant the Triton backend launches for a CUDA target, without a GPU.

    python -m cersa_kernels.backends.triton.compile_check [--arch 90,80] [--dtype bf16,fp16,fp32]
                                                            [--all-configs]

The backend's forward and backward run on small CPU tensors with the launches captured instead of
executed; each captured launch is then compiled ahead of time (Triton -> PTX -> cubin with the
ptxas bundled in the triton wheel) for each target architecture, with the same argument
specialisation Triton's launcher would use (integers equal to 1 become constants, multiples of 16
get the divisibility hint) and with the configuration(s) the autotuner would keep on that device.
Prints the shared memory of each compiled kernel and exits 1 if a kernel fails to compile or needs
more shared memory than the device has.  Needs TRITON_INTERPRET unset (compiled kernels).
This is a CI check of the GPU code path on machines without a GPU; it does not run anything.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

#: opt-in shared memory per block (bytes) by compute capability major.
SMEM = {8: 166912, 9: 232448}
TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def _capture(dtype, shape, needs):
    """Run forward + backward of the backend on CPU tensors; return the captured launches."""
    from . import kernels as K
    import cersa_kernels.backends.triton as tb

    captured = []

    class _Cap:
        def __init__(self, name, tuned):
            self.name, self.tuned = name, tuned

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                captured.append((self.name, self.tuned, args, kwargs))
            return launch

    saved = (K._seg_cols, K._seg_k, K._seg_rows, tb._check_device)
    K._seg_cols, K._seg_k, K._seg_rows = (_Cap("seg_cols", saved[0]), _Cap("seg_k", saved[1]),
                                          _Cap("seg_rows", saved[2]))
    tb._check_device = lambda x: None
    try:
        N, n, m, r, k = shape
        g = torch.Generator().manual_seed(0)
        x, U, S, Vh = (torch.randn(N, n, generator=g).to(dtype), torch.randn(m, r, generator=g).to(dtype),
                       torch.rand(r, generator=g).to(dtype), torch.randn(r, n, generator=g).to(dtype))
        A, B, b = (torch.randn(k, n, generator=g).to(dtype), torch.randn(m, k, generator=g).to(dtype),
                   torch.randn(m, generator=g).to(dtype))
        y, h_k, xv = tb._forward_impl(x, U, S, Vh, A, B, b, 2.0, True)
        tb._backward_impl(torch.randn(N, m, generator=g).to(dtype), x, h_k, xv, U, S, Vh, A, B, 2.0, needs)
    finally:
        K._seg_cols, K._seg_k, K._seg_rows, tb._check_device = saved
    return captured


def _compile(tuned, args, kwargs, cfg, arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as tcompile

    fn = tuned.fn
    dns = set(fn.do_not_specialize)
    sig, consts, attrs = {}, {}, {}
    for i, (name, v) in enumerate(zip(fn.arg_names, args)):
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + TY[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif isinstance(v, int):
            if v == 1 and i not in dns and name not in dns:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if v % 16 == 0 and i not in dns and name not in dns:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    meta = dict(kwargs)
    meta.update(cfg.kwargs)
    for name in meta:
        sig[name] = "constexpr"
    consts.update(meta)
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    kern = tcompile(src, target=GPUTarget("cuda", arch, 32),
                    options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return kern.metadata.shared


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="90,80", help="compute capabilities, e.g. 90,80")
    p.add_argument("--dtype", default="bf16", help="comma-separated: bf16, fp16, fp32, fp64")
    p.add_argument("--shape", default="4096,768,3072,384,16", help="N,n,m,r,k of the captured call")
    p.add_argument("--all-configs", action="store_true",
                   help="every configuration the autotuner would try (default: the one it takes without tuning)")
    args = p.parse_args(argv)
    from . import kernels as K
    if K.INTERPRETED:
        print("compile_check: the kernels were created by the interpreter; unset TRITON_INTERPRET")
        return 2
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
    shape = tuple(int(v) for v in args.shape.split(","))
    failures = 0
    t0 = time.time()
    for dname in args.dtype.split(","):
        launches = _capture(dtypes[dname], shape, (True,) * 7)
        for arch in (int(a) for a in args.arch.split(",")):
            K._LIMITS[:] = [(SMEM[arch // 10], arch // 10)]
            previous = K._AUTOTUNE[0]
            K.set_autotune(bool(args.all_configs))
            try:
                for name, tuned, largs, kwargs in launches:
                    named = dict(zip(tuned.fn.arg_names, largs))
                    for cfg in K._prune(K.GPU_CONFIGS, named):
                        c = cfg.kwargs
                        tag = (f"sm_{arch} {dname} {name:<8} BM{c['BM']} BN{c['BN']} BK{c['BK']} "
                               f"w{cfg.num_warps} s{cfg.num_stages} "
                               + ",".join(k for k, v in kwargs.items() if v is True))
                        try:
                            shared = _compile(tuned, largs, kwargs, cfg, arch)
                        except Exception as exc:
                            failures += 1
                            print(f"{tag}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                            continue
                        ok = shared <= SMEM[arch // 10]
                        failures += not ok
                        print(f"{tag}: shared {shared} B {'ok' if ok else 'EXCEEDS ' + str(SMEM[arch // 10])}")
            finally:
                K._LIMITS.clear()
                K.set_autotune(previous)
    print(f"compile_check: {failures} failure(s) in {time.time() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
