"""Build script: the Python package plus the C++/CUDA extension from csrc/.

Install with torch already present: ``pip install -e . --no-build-isolation``.

Extensions (torch.utils.cpp_extension, built with ninja when it is installed):
  cersa_kernels._C       CPU kernels, the cersa:: op schemas and the C++ autograd of
                         cersa::linear (csrc/cersa_ops.cpp, csrc/cersa_autograd.cpp, csrc/cpu/).
                         Built always, unless CERSA_BUILD_CPP=0.
  cersa_kernels._C_cuda  CUDA kernels (csrc/cuda/): built when torch is a CUDA build and nvcc is
                         found (CUDA_HOME or PATH); CERSA_BUILD_CUDA=1 forces it (the build fails
                         if it cannot be done), CERSA_BUILD_CUDA=0 skips it.  With no GPU visible
                         and TORCH_CUDA_ARCH_LIST unset, the arch list "8.0;9.0" is used.
If torch cannot be imported (an isolated build), or CERSA_BUILD_CPP=0, the package installs
without the extension and runs on the reference backend (it warns once, with the reason).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    """None when unset, else True/False from the usual spellings (error on anything else)."""
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name}: expected 0 or 1, got {v!r}")


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extensions():
    if _flag("CERSA_BUILD_CPP") is False:
        print("cersa_kernels: CERSA_BUILD_CPP=0, building without the C++ extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        if _flag("CERSA_BUILD_CPP"):
            raise SystemExit(f"CERSA_BUILD_CPP=1 but torch cannot be imported: {exc}")
        print(f"cersa_kernels: torch not importable ({exc}); building without the C++ extension "
              "(install torch first and use --no-build-isolation)", file=sys.stderr)
        return [], {}

    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]
    exts = [CppExtension(
        name="cersa_kernels._C",
        sources=_rel([os.path.join(ROOT, "csrc", "cersa_ops.cpp"),
                      os.path.join(ROOT, "csrc", "cersa_autograd.cpp")]
                     + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))),
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )]

    want_cuda = _flag("CERSA_BUILD_CUDA")
    if want_cuda is not False:
        from torch.utils.cpp_extension import CUDA_HOME
        nvcc = (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None) or shutil.which("nvcc")
        reasons = []
        if torch.version.cuda is None:
            reasons.append(f"torch {torch.__version__} is not a CUDA build")
        if not (nvcc and os.path.exists(nvcc)):
            reasons.append("nvcc not found (set CUDA_HOME)")
        if reasons:
            if want_cuda:
                raise SystemExit("CERSA_BUILD_CUDA=1 but " + "; ".join(reasons))
            print("cersa_kernels: skipping the CUDA extension: " + "; ".join(reasons), file=sys.stderr)
        else:
            from torch.utils.cpp_extension import CUDAExtension
            if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
            # cuBLAS/cuSPARSE/... headers may come from the nvidia-* wheels torch depends on
            # rather than from CUDA_HOME (e.g. a toolkit that ships only nvcc and the runtime).
            wheel_inc = []
            try:
                import nvidia
                for base in list(nvidia.__path__):
                    wheel_inc += sorted(glob.glob(os.path.join(base, "*", "include")))
                    wheel_inc += sorted(glob.glob(os.path.join(base, "cu*", "include")))
            except ImportError:
                pass
            exts.append(CUDAExtension(
                name="cersa_kernels._C_cuda",
                sources=_rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
                             + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))),
                include_dirs=[d for d in dict.fromkeys(wheel_inc) if os.path.isdir(d)],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            ))
    use_ninja = shutil.which("ninja") is not None
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
