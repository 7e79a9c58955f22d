"""Load a freshly built cersa extension (_C and _C_cuda) and check its CUDA registration.

Usage: python scripts/check_cuda_ext.py DIR   (DIR holds _C*.so and _C_cuda*.so)
Exits non-zero, with the reason, if a library is missing, fails to load, or the cersa:: ops
lack a CPU or CUDA kernel.  With a GPU visible it also runs the CUDA op once against the CPU op.
"""
import glob
import os
import sys

import torch


def main(folder: str) -> int:
    libs = {}
    for stem in ("_C", "_C_cuda"):
        found = glob.glob(os.path.join(folder, f"{stem}.*.so")) + glob.glob(os.path.join(folder, f"{stem}.so"))
        if not found:
            print(f"check_cuda_ext: no {stem} library in {folder}")
            return 1
        libs[stem] = found[0]
    for stem, path in libs.items():
        torch.ops.load_library(path)  # runs the TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations
        print(f"loaded {path}")
    for op in ("cersa::linear_forward", "cersa::linear_backward"):
        for key in ("CPU", "CUDA"):
            if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key):
                print(f"check_cuda_ext: {op} has no {key} kernel")
                return 1
        print(f"{op}: CPU and CUDA kernels registered")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); GPU visible: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        g = torch.Generator().manual_seed(0)
        N, n, m, r, k = 33, 40, 24, 9, 4
        t = [torch.randn(*s, generator=g, dtype=torch.float64) for s in
             ((N, n), (m, r), (r,), (r, n), (k, n), (m, k), (m,))]
        cpu = torch.ops.cersa.linear_forward(*t, 0.5, True)
        gpu = torch.ops.cersa.linear_forward(*[x.cuda() for x in t], 0.5, True)
        err = max((a - b.cpu()).abs().max().item() for a, b in zip(cpu, gpu))
        print(f"CUDA vs CPU forward, float64: max abs diff {err:.3g}")
        if err > 1e-10:
            return 1
    print("check_cuda_ext: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "build/cuda-ext/lib/cersa_kernels"))
