"""The rank policy (cersa_kernels/planning.py and the rank helpers of cersa_kernels/decompose.py it
uses): rank rounding and caps, the budget allocation and its comparison with one energy for every
layer, layers kept dense when factoring saves nothing (max_frozen_ratio), their use through
``convert``, and ``plan`` on real MiniLM weights."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import cersa_kernels as ck
from cersa_kernels.decompose import allocate_budget, energy_rank, round_rank, uniform_energy_for_budget
from cersa_kernels.planning import plan

from helpers import Toy, spectrum_matrix

# Small SVDs: one thread is as fast and avoids spin-waiting on a busy CI machine (conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# rank policies
# ----------------------------------------------------------------------------------------------
def test_round_rank():
    assert round_rank(13, 100, multiple=8) == 16
    assert round_rank(16, 100, multiple=8) == 16
    assert round_rank(0, 100, multiple=8) == 0
    assert round_rank(97, 100, multiple=8) == 100  # min(m, n) is allowed although not a multiple
    assert round_rank(13, 100, multiple=8, cap=10) == 10
    assert round_rank(50, 40) == 40
    with pytest.raises(ValueError, match="rank_multiple"):
        round_rank(3, 10, multiple=0)
    with pytest.raises(ValueError, match="max_rank"):
        round_rank(3, 10, cap=-1)


def _brute_force(spectra, shapes, allowed):
    best = -1.0
    for ranks in itertools.product(*[range(len(S) + 1) for S in spectra]):
        if sum(r * (m + n + 1) for r, (m, n) in zip(ranks, shapes)) > allowed:
            continue
        e = sum(float(S[:r].square().sum() / S.square().sum()) for S, r in zip(spectra, ranks))
        best = max(best, e)
    return best


@pytest.mark.parametrize("budget", [0.2, 0.45, 0.7])
def test_allocate_budget_respects_the_budget_and_is_near_optimal(budget):
    g = torch.Generator().manual_seed(4)
    shapes = [(6, 4), (5, 5), (3, 7)]
    spectra = [torch.sort(torch.rand(min(s), generator=g, dtype=torch.float64) ** 3, descending=True).values
               for s in shapes]
    alloc = allocate_budget(spectra, shapes, budget)
    dense = sum(m * n for m, n in shapes)
    assert alloc.stored == sum(r * (m + n + 1) for r, (m, n) in zip(alloc.ranks, shapes))
    assert alloc.stored <= budget * dense
    for S, r, e in zip(spectra, alloc.ranks, alloc.energies):
        assert abs(e - float(S[:r].square().sum() / S.square().sum())) < 1e-12
    best = _brute_force(spectra, shapes, alloc.budget)
    # greedy by gain per stored number: within one block of the optimum (fractional-knapsack bound)
    assert sum(alloc.energies) >= best - max(float(S[0] ** 2 / S.square().sum()) for S in spectra) - 1e-12


def test_allocate_budget_multiple_and_caps():
    spectra = [torch.linspace(3, 1, 40), torch.linspace(5, 0.1, 30)]
    shapes = [(40, 50), (30, 60)]
    alloc = allocate_budget(spectra, shapes, 0.5, caps=[37, 12], multiple=8)
    assert alloc.ranks[0] % 8 == 0 or alloc.ranks[0] == 37
    assert alloc.ranks[1] <= 12 and (alloc.ranks[1] % 8 == 0 or alloc.ranks[1] == 12)
    with pytest.raises(ValueError, match="budget"):
        allocate_budget(spectra, shapes, 0.0)


def test_uniform_energy_for_budget_is_the_largest_fitting_tau():
    spectra = [torch.linspace(3, 1, 40).double(), torch.linspace(5, 0.1, 30).double()]
    shapes = [(40, 50), (30, 60)]
    stored = 1500
    tau, ranks, st = uniform_energy_for_budget(spectra, shapes, stored)
    assert st <= stored
    assert ranks == [energy_rank(S, tau) for S in spectra]
    bigger = [energy_rank(S, min(1.0, tau + 1e-3)) for S in spectra]
    assert sum(r * (m + n + 1) for r, (m, n) in zip(bigger, shapes)) > stored


# ----------------------------------------------------------------------------------------------
# through convert
# ----------------------------------------------------------------------------------------------
def _mlp(seed=5):
    """Linear 64 -> 96 -> 80 -> 48 with spectra exp(-i / d), d = 3, 9, 15 (different per layer)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 80), nn.GELU(), nn.Linear(80, 48))
    with torch.no_grad():
        for i, lin in enumerate(net[::2]):
            m, n = lin.out_features, lin.in_features
            sigmas = torch.exp(-torch.arange(min(m, n), dtype=torch.float64) / (3.0 + 6 * i))
            lin.weight.copy_(spectrum_matrix(m, n, sigmas, seed=i))
    return net


def test_convert_max_rank_and_rank_multiple():
    net = ck.convert(_mlp(), energy=0.95, rank_multiple=8, max_frozen_ratio=None, progress=False, delta_rank=4)
    rep = ck.get_report(net)
    exact = {l.name: l.rank for l in ck.get_report(ck.convert(_mlp(), energy=0.95, max_frozen_ratio=None,
                                                              progress=False, delta_rank=4)).converted}
    for l in rep.converted:
        assert l.rank % 8 == 0 and exact[l.name] <= l.rank < exact[l.name] + 8 and l.energy >= 0.95
    capped = ck.get_report(ck.convert(_mlp(), energy=0.999, max_rank=5, max_frozen_ratio=None, progress=False,
                                      delta_rank=2))
    assert all(l.rank == 5 for l in capped.converted) and "max_rank=5" in str(capped)
    with pytest.raises(ValueError, match="rank_multiple"):
        ck.convert(_mlp(), rank_multiple=0, progress=False)


def test_convert_budget_report_and_model_unchanged_on_error():
    net = _mlp()
    dense = sum(l.weight.numel() for l in net[::2])
    ck.convert(net, budget=0.3, delta_rank=2, progress=False)
    rep = ck.get_report(net)
    pol = rep.policy
    assert len(rep.converted) == 3
    stored = sum(l.rank * (l.out_features + l.in_features + 1) for l in rep.converted)
    assert stored == pol["stored"] <= 0.3 * dense
    assert pol["budget_mean_energy"] >= pol["uniform_mean_energy"] - 1e-12
    assert pol["uniform_stored"] <= pol["stored"]
    assert "budget 0.3" in str(rep)
    with pytest.raises(ValueError, match="budget"):
        ck.convert(_mlp(), budget=0.3, rank=4, progress=False)
    fresh = _mlp()
    with pytest.raises(ValueError, match="budget"):
        ck.convert(fresh, budget=-1.0, progress=False)
    assert all(type(m) is nn.Linear for m in fresh[::2])


def test_convert_svd_option_reaches_the_energy():
    for svd in ("full", "randomized", "auto"):
        rep = ck.get_report(ck.convert(_mlp(), energy=0.9, svd=svd, max_frozen_ratio=None, progress=False,
                                       delta_rank=2))
        assert all(l.energy >= 0.9 for l in rep.converted), svd


# ----------------------------------------------------------------------------------------------
# layers kept dense: factoring must save memory (max_frozen_ratio)
# ----------------------------------------------------------------------------------------------
def test_layers_without_saving_stay_dense_and_are_reported():
    model = Toy()
    torch.manual_seed(3)
    model.head = nn.Linear(32, 5)  # flat spectrum: r(m + n + 1) >= m n at 0.93
    model.blocks[0].q = nn.Linear(32, 32)
    ck.convert(model, energy=0.93, delta_rank=2, progress=False)
    rows = {l.name: l for l in ck.get_report(model).layers}
    for name in ("head", "blocks.0.q"):
        assert type(model.get_submodule(name)) is nn.Linear
        assert rows[name].status == "dense" and "saving" in rows[name].reason, rows[name]
        assert not model.get_submodule(name).weight.requires_grad
    assert isinstance(model.blocks[1].q, ck.CersaLinear)
    # threshold configurable: a generous ratio converts them, None converts everything
    for ratio in (10.0, None):
        m2 = Toy()
        torch.manual_seed(3)
        m2.head = nn.Linear(32, 5)
        ck.convert(m2, energy=0.93, delta_rank=2, max_frozen_ratio=ratio, progress=False)
        assert isinstance(m2.head, ck.CersaLinear)
    # a tiny ratio leaves every layer dense
    m3 = ck.convert(Toy(), energy=0.93, max_frozen_ratio=1e-6, progress=False)
    assert not any(isinstance(m, ck.CersaLinear) for m in m3.modules())
    assert all(l.status != "converted" for l in ck.get_report(m3).layers)


@pytest.mark.parametrize("ratio", [0, -1.0, "1", True, float("nan")])
def test_bad_max_frozen_ratio(ratio):
    with pytest.raises(ValueError, match="max_frozen_ratio"):
        ck.convert(Toy(), energy=0.9, max_frozen_ratio=ratio, progress=False)


# ----------------------------------------------------------------------------------------------
# real weights
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_budget_beats_one_energy_at_the_same_size(minilm):
    """On real weights (MiniLM encoder layers 0-1, 12 Linear layers) the budget allocation keeps more
    mean energy than one energy for every layer at the same stored size, and the plan agrees with convert."""
    targets = r"encoder\.layer\.[01]\..*(query|key|value|dense)"
    p = plan(minilm, [0.93], budget=0.8, target_modules=targets)
    pol = p.policies["budget 0.8"]
    assert pol["budget_mean_energy"] > pol["uniform_mean_energy"]
    assert pol["stored"] <= pol["allowed"]
    conv = ck.convert(copy.deepcopy(minilm), budget=0.8, target_modules=targets, progress=False,
                      svd="full")
    rep = ck.get_report(conv)
    assert [l.rank for l in rep.converted] == p.ranks["budget 0.8"]
    assert abs(rep.policy["budget_mean_energy"] - pol["budget_mean_energy"]) < 1e-9


# ----------------------------------------------------------------------------------------------
# quantized factors: the keep-dense decision and the plan compare bytes
# ----------------------------------------------------------------------------------------------
from cersa_kernels.planning import _break_even_cap, keeps_dense, layer_nbytes, truncation_nbytes  # noqa: E402
from cersa_kernels.quant import quantized_nbytes  # noqa: E402


class _FlatAndDecaying(nn.Module):
    """A MiniLM-like pair: ``attn`` 64 x 64 with a flat spectrum (rank 60 at energy 0.93:
    r (m + n + 1) = 7,740 numbers >= m n = 4,096, but about 5.4 kB as nf4 codes against 16 kB dense)
    and ``ffn`` 96 x 64 with a decaying spectrum (converts with any storage)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(64, 64)
        self.ffn = nn.Linear(64, 96)
        with torch.no_grad():
            self.attn.weight.copy_(spectrum_matrix(64, 64, torch.ones(64), seed=1))
            self.ffn.weight.copy_(spectrum_matrix(96, 64, 0.8 ** torch.arange(64.0), seed=2))

    def forward(self, x):
        return self.ffn(torch.tanh(self.attn(x)))


def test_truncation_nbytes_is_what_a_built_layer_stores():
    """truncation_nbytes from the shape alone equals layer_nbytes of the layer convert builds (codes,
    scales, S, and the principal components in the delta), and is r (m + n + 1) numbers unquantized."""
    W = spectrum_matrix(37, 23, torch.linspace(2.0, 0.1, 23), seed=4, dtype=torch.float32)
    lin = nn.Linear(23, 37)
    with torch.no_grad():
        lin.weight.copy_(W)
    for r, q, block, dq, init in itertools.product([0, 1, 5, 23], [None, "int8", "nf4"], [16, 64], [False, True],
                                                   ["principal", "lora"]):
        if q is None and (block, dq) != (64, False):
            continue
        layer = ck.CersaLinear.from_dense(lin, energy=None, rank=r, delta_rank=4, init=init, quantize=q,
                                          quant_block_size=block, double_quant=dq)
        stored, dense = layer_nbytes(layer)
        moved = layer.rank - layer.frozen_rank
        assert moved == (min(4, r) if init == "principal" else 0)
        assert dense == 37 * 23 * 4
        assert stored == truncation_nbytes(37, 23, r, dtype_bytes=4, quantize=q, quant_block_size=block,
                                           double_quant=dq, moved=moved), (r, q, block, dq, init)
        assert stored == layer.frozen_nbytes() + moved * (37 + 23 + 1) * 4
        if q is None:
            assert stored == layer.stored_numbers()[0] * 4
        else:
            assert layer.U.nbytes() == quantized_nbytes(37, layer.frozen_rank, q, block, dq)
    with pytest.raises(ValueError, match="moved"):
        truncation_nbytes(8, 8, 2, moved=3)


def test_layer_nbytes_sums_the_parts_of_an_attention():
    mha = nn.MultiheadAttention(16, 2)
    layer = ck.convert(nn.Sequential(mha), rank=6, delta_rank=2, quantize="nf4", max_frozen_ratio=None,
                       progress=False)[0]
    stored, dense = layer_nbytes(layer)
    assert dense == (48 * 16 + 16 * 16) * 4
    assert stored == sum(truncation_nbytes(p.out_features, p.in_features, 6, quantize="nf4", moved=2)
                         for p in layer.parts())


@pytest.mark.parametrize("q", [None, "int8", "nf4"])
def test_quantized_layer_converts_where_its_bytes_save_memory(q):
    """The flat 64 x 64 layer stores more numbers than W at energy 0.93, so unquantized it stays dense
    (reason in bytes); as int8 or nf4 codes it takes fewer bytes than W and converts."""
    model = _FlatAndDecaying()
    ck.convert(model, energy=0.93, delta_rank=2, quantize=q, svd="full", progress=False)
    rows = {l.name: l for l in ck.get_report(model).layers}
    assert isinstance(model.ffn, ck.CersaLinear) and rows["ffn"].status == "converted"
    r = rows["attn"].rank
    assert r * (64 + 64 + 1) >= 64 * 64  # the numbers alone would keep it dense
    if q is None:
        assert type(model.attn) is nn.Linear and rows["attn"].status == "dense"
        assert "bytes" in rows["attn"].reason and f"{64 * 64 * 4:,} bytes" in rows["attn"].reason
    else:
        assert isinstance(model.attn, ck.CersaLinear) and model.attn.quantize == q
        stored, dense = layer_nbytes(model.attn)
        assert stored < dense == 64 * 64 * 4
        assert rows["attn"].frozen_bytes == model.attn.frozen_nbytes() < dense
        x = torch.randn(3, 64)
        U, S, Vh = model.attn.dequantized_factors(torch.float64)
        W = U @ torch.diag(S) @ Vh + model.attn.scale * model.attn.B.double() @ model.attn.A.double()
        torch.testing.assert_close(model.attn(x).double(), x.double() @ W.T + model.attn.bias.double(),
                                   rtol=1e-5, atol=1e-5)


def test_quantized_layer_still_stays_dense_when_its_bytes_do_not_save():
    """A ratio below what the nf4 codes take keeps the layer dense, with the reason in bytes."""
    model = _FlatAndDecaying()
    ck.convert(model, energy=0.93, delta_rank=2, quantize="nf4", svd="full", max_frozen_ratio=0.2,
               target_modules=["attn"], progress=False)
    row = ck.get_report(model).layers[0]
    assert type(model.attn) is nn.Linear and row.status == "dense"
    assert "nf4" in row.reason and "bytes" in row.reason and "0.2 x" in row.reason
    # the decision is the comparison in bytes: what the layer would store / 0.2 x the dense bytes
    layer = ck.CersaLinear.from_dense(_FlatAndDecaying().attn, energy=None, rank=row.rank, delta_rank=2,
                                      quantize="nf4")
    stored, dense = layer_nbytes(layer)
    assert 0.2 * dense <= stored < dense and keeps_dense(stored, dense, 0.2) and not keeps_dense(stored, dense, 1.0)


@pytest.mark.parametrize("q,dq", [(None, False), ("int8", False), ("nf4", False), ("nf4", True)])
def test_break_even_cap_in_bytes(q, dq):
    """The budget's per-layer cap is the largest rank whose stored bytes stay below the ratio."""
    cfg = ck.CersaConfig(energy=None, budget=0.5, quantize=q, double_quant=dq, delta_rank=16)
    for m, n, ratio in [(384, 384, 1.0), (1536, 384, 1.0), (100, 37, 0.5), (64, 64, 0.05)]:
        cap = _break_even_cap(m, n, ratio, cfg)
        size = lambda r: truncation_nbytes(m, n, r, quantize=q, double_quant=dq, moved=min(16, r))  # noqa: E731
        if q is None:
            assert cap == _break_even_cap(m, n, ratio)
        assert 0 <= cap <= min(m, n)
        assert cap == 0 or size(cap) < ratio * m * n * 4
        assert cap == min(m, n) or size(cap + 1) >= ratio * m * n * 4
    if q is not None:  # codes hold a 384 x 384 weight at full rank in fewer bytes than fp32 W
        assert _break_even_cap(384, 384, 1.0, cfg) > _break_even_cap(384, 384, 1.0)


@pytest.mark.parametrize("q", [None, "int8", "nf4"])
def test_plan_with_quantize_agrees_with_convert(q):
    """plan(..., quantize=q) decides and sizes as convert(..., quantize=q): the same ranks (dense
    where convert leaves a layer dense), and its frozen bytes are the converted model's."""
    model = _FlatAndDecaying()
    p = plan(model, [0.93], quantize=q, double_quant=q == "nf4", delta_rank=2)
    s = "energy 0.93"
    conv = ck.convert(copy.deepcopy(model), energy=0.93, delta_rank=2, quantize=q, double_quant=q == "nf4",
                      svd="full", progress=False)
    rows = {l.name: l for l in ck.get_report(conv).layers}
    assert p.ranks[s] == [rows[name].rank if rows[name].status == "converted" else None for name in ("attn", "ffn")]
    assert (p.ranks[s][0] is None) == (q is None)
    frozen = sum(l.frozen_bytes if l.status == "converted" else l.out_features * l.in_features * 4
                 for l in rows.values())
    assert p.frozen_nbytes(s) == frozen
    assert p.dense_nbytes() == (64 * 64 + 96 * 64) * 4
    if q is None:
        assert p.nbytes(s) == 4 * p.stored(s)
    table = p.table()
    assert f"{p.nbytes(s) / p.dense_nbytes():.3f}x dense" in table
    assert (f"{q} codes" in table) == (q is not None)
    with pytest.raises(ValueError, match="quantize"):
        plan(model, [0.93], quantize="fp4")


@pytest.mark.parametrize("q", [None, "nf4"])
def test_streamed_conversion_decides_in_bytes_too(tmp_path, q):
    """stream.convert_file keeps the flat layer dense unquantized and converts it as nf4 codes, as
    convert does, and the file loads into a fresh model with the same outputs."""
    from safetensors.torch import save_file

    from cersa_kernels.stream import convert_file

    model = _FlatAndDecaying()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "src.safetensors"))
    res = convert_file(tmp_path / "src.safetensors", tmp_path / "out.safetensors", energy=0.93, delta_rank=2,
                       quantize=q, svd="full", progress=False)
    rows = {l.name: l for l in res.report.layers}
    assert rows["ffn"].status == "converted"
    assert rows["attn"].status == ("dense" if q is None else "converted")
    if q is None:
        assert "bytes" in rows["attn"].reason
    conv = ck.convert(copy.deepcopy(model), energy=0.93, delta_rank=2, quantize=q, svd="full", progress=False)
    fresh = _FlatAndDecaying()
    ck.load(tmp_path / "out.safetensors", fresh)
    x = torch.randn(5, 64)
    torch.testing.assert_close(fresh(x), conv(x), rtol=1e-5, atol=1e-6)
