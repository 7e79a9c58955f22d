"""Tests of the decompositions that ``convert`` hands to worker threads (cersa_kernels/convert.py:
svd_workers, _FactorsAhead; cersa_kernels/decompose.py: truncated_svd_many with per-weight targets
and extra components, pool_eligible, canonical_signs).

The parallel path must be invisible in the result: a model converted with svd_workers=2 or 3 holds
bit for bit the tensors, ranks and report of the one converted layer by layer (svd_workers=1), for
several shapes and layer types and for the options that change what is decomposed (svd method,
rank, budget, targets, init="residual"'s extra components, rank_multiple / max_rank, quantize); an
error in one decomposition leaves the model unchanged.  Times are measured in
bench/bench_convert_time.py, not here.
"""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

import cersa_kernels.decompose as dec
from cersa_kernels import convert, get_report

from helpers import assert_unchanged, snapshot, spectrum_matrix

cv = importlib.import_module("cersa_kernels.convert")  # the package's name "convert" is the function


def _decaying(m: int, n: int, seed: int, decay: float = 0.93) -> torch.Tensor:
    p = min(m, n)
    return spectrum_matrix(m, n, (decay ** torch.arange(p, dtype=torch.float64)).tolist(), seed=seed).float()


class Mixed(nn.Module):
    """nn.Linear of tall, wide and square shapes (one without bias), a Conv2d (decomposed as
    (8, 4*3*3)), an nn.MultiheadAttention (two matrices: decomposed layer by layer) and a head;
    the same ``seed`` gives the same model."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():  # the same biases for every instance, the global RNG untouched
            torch.manual_seed(seed)
            self._build(seed)

    def _build(self, seed: int) -> None:
        self.tall = nn.Linear(40, 96)
        self.wide = nn.Linear(96, 40, bias=False)
        self.square = nn.Linear(64, 64)
        self.square2 = nn.Linear(64, 64)
        self.conv = nn.Conv2d(4, 8, 3)
        self.attn = nn.MultiheadAttention(16, 2)
        self.head = nn.Linear(64, 7)
        with torch.no_grad():
            for i, lin in enumerate([self.tall, self.wide, self.square, self.square2, self.head]):
                lin.weight.copy_(_decaying(*lin.weight.shape, seed=seed + i))
            self.conv.weight.copy_(_decaying(8, 36, seed=seed + 9).reshape(8, 4, 3, 3))
            self.attn.in_proj_weight.copy_(_decaying(48, 16, seed=seed + 11))


def _state(model: nn.Module) -> dict:
    """Every tensor of the state dict (quantized codes and scales included), every parameter's
    requires_grad, the module types by name and the report's records."""
    rep = get_report(model)
    return {"tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "grad": {k: p.requires_grad for k, p in model.named_parameters()},
            "types": {k: type(m).__name__ for k, m in model.named_modules()},
            "report": [vars(rec) for rec in rep.layers], "policy": rep.policy}


def _assert_same(a: dict, b: dict) -> None:
    assert a["types"] == b["types"] and a["grad"] == b["grad"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        assert a["tensors"][k].dtype == b["tensors"][k].dtype, k
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    assert a["report"] == b["report"] and a["policy"] == b["policy"]


@pytest.fixture()
def pool_spy(monkeypatch):
    """Counts the weights truncated_svd_many hands to its worker pool."""
    seen = []
    real = dec._pool_map

    def spy(fn, items, workers, probe):
        seen.append((len(items), workers))
        return real(fn, items, workers, probe)

    monkeypatch.setattr(dec, "_pool_map", spy)
    return seen


OPTIONS = {
    "default": {},
    "full": {"svd": "full"},
    "gram": {"svd": "gram"},
    "rank": {"energy": None, "rank": 5},
    "budget": {"energy": None, "budget": 0.4},
    "targets": {"target_modules": ["tall", "square", "square2", "conv"], "exclude": ["square2"]},
    "residual": {"init": "residual", "delta_rank": 3},
    "lora": {"init": "lora", "delta_rank": 4, "alpha": 8},
    "multiple": {"rank_multiple": 8, "max_rank": 24},
    "max_frozen_ratio": {"energy": 0.99, "max_frozen_ratio": 0.5},
    "int8": {"quantize": "int8", "quant_block_size": 32},
    "nf4_loftq": {"quantize": "nf4", "double_quant": True, "quant_init": "loftq", "loftq_iters": 2},
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_parallel_conversion_equals_layer_by_layer(option, threads, pool_spy):
    """svd_workers=2 (and 3): the same tensors bit for bit, flags, layer types and report as
    svd_workers=1, with the caller on 1 or 2 torch threads; the weights really went through the
    pool, and the caller's thread setting is back afterwards."""
    kw = dict(OPTIONS[option])
    energy = kw.pop("energy", 0.9)
    kw.setdefault("delta_rank", 2)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = {}
        for workers in (1, 2, 3):
            model = copy.deepcopy(Mixed())
            convert(model, energy, progress=False, svd_workers=workers, **kw)
            results[workers] = _state(model)
            assert torch.get_num_threads() == threads and not dec._PINNED_THREADS
        _assert_same(results[1], results[2])
        _assert_same(results[1], results[3])
    finally:
        torch.set_num_threads(old)
    assert [w for _, w in pool_spy] == [2, 3] and all(count >= 2 for count, _ in pool_spy)


def test_default_workers_follow_torch_threads(pool_spy):
    """svd_workers=None: torch.get_num_threads() workers (2 here), one by one at 1 thread."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        convert(Mixed(), 0.9, progress=False)
        assert pool_spy == []
        torch.set_num_threads(2)
        convert(Mixed(), 0.9, progress=False)
        assert [w for _, w in pool_spy] == [2]
    finally:
        torch.set_num_threads(old)


def test_chunks_give_the_same_layers(monkeypatch, pool_spy):
    """A chunk bound smaller than the model: several pool calls, the same result."""
    ref = _state(convert(Mixed(), 0.9, progress=False, svd_workers=1))
    monkeypatch.setattr(cv, "CONVERT_CHUNK_NUMBERS", 64 * 64 + 40 * 96)
    got = _state(convert(Mixed(), 0.9, progress=False, svd_workers=2))
    _assert_same(ref, got)
    assert len(pool_spy) >= 2 and sum(count for count, _ in pool_spy) >= 4


def test_randomized_layers_stay_in_the_calling_thread(monkeypatch, pool_spy):
    """An "auto" rule that picks the randomized SVD (it draws random numbers under the layer's seed):
    nothing is pooled and the factors are those of svd_workers=1."""
    monkeypatch.setattr(dec, "choose_svd", lambda shape, energy=None, rank=None, **_: "randomized")
    ref = _state(convert(Mixed(), 0.9, progress=False, svd_workers=1))
    got = _state(convert(Mixed(), 0.9, progress=False, svd_workers=2))
    _assert_same(ref, got)
    assert pool_spy == []


def test_error_in_one_decomposition_leaves_the_model_unchanged(monkeypatch):
    """A decomposition failing inside a worker: convert raises that error (the first failing layer
    in order, as svd_workers=1 does), the model is as before and the thread settings are restored."""
    real = dec._gram_svd

    def failing(W, energy, rank, where, fallback=True):
        if where in ("square.weight", "head.weight"):
            raise RuntimeError(f"{where}: LAPACK failed")
        return real(W, energy, rank, where, fallback)

    monkeypatch.setattr(dec, "_gram_svd", failing)
    for workers in (1, 2):
        model = Mixed()
        before = snapshot(model)
        threads = torch.get_num_threads()
        with pytest.raises(RuntimeError, match=r"^square\.weight: LAPACK failed"):
            convert(model, 0.9, progress=False, svd_workers=workers, svd="gram")
        assert_unchanged(model, before)
        assert torch.get_num_threads() == threads and not dec._PINNED_THREADS


def test_bad_weight_raises_as_layer_by_layer():
    """A non-finite weight: the same ValueError naming the layer with and without workers, model unchanged."""
    msgs = []
    for workers in (1, 2):
        model = Mixed()
        with torch.no_grad():
            model.square2.weight[3, 4] = float("nan")
        before = snapshot(model)
        with pytest.raises(ValueError) as err:
            convert(model, 0.9, progress=False, svd_workers=workers)
        assert "square2" in str(err.value)
        msgs.append(str(err.value))
        assert_unchanged(model, before)
    assert msgs[0] == msgs[1]


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_svd_workers(bad):
    model = Mixed()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^svd_workers: expected None or a positive int, got "):
        convert(model, 0.9, progress=False, svd_workers=bad)
    assert_unchanged(model, before)


# ------------------------------------------------------------------ decompose: the pool itself
def _weights():
    return [_decaying(96, 40, 0), _decaying(40, 96, 1), _decaying(64, 64, 2), _decaying(8, 36, 3),
            _decaying(64, 64, 4).double(), _decaying(50, 30, 5)]


@pytest.mark.parametrize("svd", ["auto", "full", "gram"])
def test_truncated_svd_many_is_bitwise_truncated_svd(svd):
    """Per-weight targets and extra components through the pool: each result equals truncated_svd
    (then, with extra, truncated_svd at rank r + extra with the first call's info) bit for bit,
    signs included, for both exact methods (every worker sets one torch thread for itself)."""
    Ws = _weights()
    energies = [0.9, None, 0.95, 0.8, 0.9, None]
    ranks = [None, 7, None, None, None, 0]
    extras = [0, 3, 2, 0, 1, 4]
    got = dec.truncated_svd_many(Ws, energy=energies, rank=ranks, extra=extras, svd=svd, workers=3)
    for W, e, rk, x, (U, S, Vh, info) in zip(Ws, energies, ranks, extras, got):
        U1, S1, Vh1, info1 = dec.truncated_svd(W, energy=e, rank=rk, svd=svd)
        q = min(info1.rank + x, min(W.shape))
        if q > info1.rank:
            U1, S1, Vh1, _ = dec.truncated_svd(W, rank=q, svd=svd)
        assert (info.rank, info.method, info.energy) == (info1.rank, info1.method, info1.energy)
        assert U.shape[1] == q
        assert torch.equal(U, U1) and torch.equal(S, S1) and torch.equal(Vh, Vh1)
    col = got[0][0].abs().argmax(0)
    assert (got[0][0][col, torch.arange(got[0][0].shape[1])] > 0).all()


def test_truncated_svd_many_randomized_is_reproducible():
    """Randomized SVDs are not pooled (they draw from the global generator): workers=2 gives the
    draws of workers=1 under the same seed."""
    Ws = _weights()[:3]
    out = []
    for workers in (1, 2):
        torch.manual_seed(5)
        out.append(dec.truncated_svd_many(Ws, energy=0.9, svd="randomized", workers=workers))
    for a, b in zip(*out):
        assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))


def test_truncated_svd_many_checks_per_weight_arguments():
    Ws = _weights()[:2]
    with pytest.raises(ValueError, match=r"^energy: expected one value per weight \(2\), got 3"):
        dec.truncated_svd_many(Ws, energy=[0.9, 0.9, 0.9])
    with pytest.raises(ValueError, match=r"^weight\[1\]: give exactly one of energy= and rank="):
        dec.truncated_svd_many(Ws, energy=[0.9, None], rank=[None, None])
    with pytest.raises(ValueError, match=r"^extra: expected an int >= 0"):
        dec.truncated_svd_many(Ws, energy=0.9, extra=[0, -1])


def test_pool_eligible(monkeypatch):
    """Exact methods on small CPU weights only; $CERSA_SVD_THREADS other than 1 keeps everything
    in the calling thread (multi-threaded LAPACK there)."""
    W = _decaying(64, 48, 0)
    assert dec.pool_eligible(W, 0.9) and dec.pool_eligible(W, 0.9, svd="full")
    assert dec.pool_eligible(W, rank=4, svd="gram", extra=8)
    assert not dec.pool_eligible(W, 0.9, svd="randomized")
    big = torch.empty(dec.SINGLE_THREAD_SVD_MAX_DIM + 1, dec.SINGLE_THREAD_SVD_MAX_DIM + 1).normal_()
    assert not dec.pool_eligible(big, 0.9)
    monkeypatch.setenv("CERSA_SVD_THREADS", "2")
    assert not dec.pool_eligible(W, 0.9)
    monkeypatch.setenv("CERSA_SVD_THREADS", "1")
    assert dec.pool_eligible(W, 0.9) and dec.pool_eligible(big, 0.9)
    with pytest.raises(ValueError, match=r"give exactly one of energy= and rank="):
        dec.pool_eligible(W)


def test_canonical_signs_ties_follow_the_first_entry():
    """-min == max in a column: the first entry of largest magnitude decides (argmax's rule)."""
    U = torch.tensor([[-2.0, 2.0, 0.0], [2.0, -2.0, 0.0], [1.0, 1.0, 0.0]])
    Vh = torch.eye(3)
    U2, Vh2 = dec.canonical_signs(U, Vh)
    assert torch.equal(U2[:, 0], -U[:, 0]) and torch.equal(U2[:, 1], U[:, 1]) and torch.equal(U2[:, 2], U[:, 2])
    assert torch.equal(U2 @ Vh2, U @ Vh)
