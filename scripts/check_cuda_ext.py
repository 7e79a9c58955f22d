"""Load a freshly built cersa extension (_C and _C_cuda) and check its CUDA registration.

Usage: python scripts/check_cuda_ext.py DIR   (DIR holds _C*.so and _C_cuda*.so)
Exits non-zero, with the reason, if a library is missing, fails to load, or the cersa:: ops
lack a CPU or CUDA kernel (or cersa::linear its autograd).  With a GPU visible it also runs the
CUDA op once against the CPU op, forward and gradients.
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
    # the differentiable op: its C++ autograd (in _C) serves CPU and CUDA through the kernels above
    for key in ("Autograd", "CompositeExplicitAutograd"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key("cersa::linear", key):
            print(f"check_cuda_ext: cersa::linear has no {key} kernel")
            return 1
    print("cersa::linear: Autograd kernel registered")
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
        leaves = [x.cuda().requires_grad_(True) for x in t]
        torch.ops.cersa.linear(*leaves, 0.5).square().sum().backward()
        cpu_leaves = [x.clone().requires_grad_(True) for x in t]
        torch.ops.cersa.linear(*cpu_leaves, 0.5).square().sum().backward()
        gerr = max((a.grad.cpu() - b.grad).abs().max().item() for a, b in zip(leaves, cpu_leaves))
        print(f"CUDA vs CPU gradients through the C++ autograd, float64: max abs diff {gerr:.3g}")
        if gerr > 1e-8:
            return 1
    print("check_cuda_ext: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "build/cuda-ext/lib/cersa_kernels"))
