"""Tests of cersa_kernels.convert / merge / get_report / count_parameters (cersa_kernels/convert.py).

Toy models (fast) for the options and the errors; all-MiniLM-L6-v2 (37 nn.Linear layers, read
offline, see conftest.minilm) for the real-model checks: every layer's energy rank against an
independent float64 numpy SVD, and energy 1.0 reproducing the model's outputs.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import cersa_kernels
from cersa_kernels import CersaLinear, convert, count_parameters, get_report, merge

from conftest import single_thread, rel_error


@pytest.fixture(autouse=True)
def _one_thread():
    """Small SVDs: one thread is as fast and avoids spin-waiting on a busy CI machine (conftest)."""
    with single_thread():
        yield

# Converted MiniLM vs dense MiniLM, both fp32: each weight is rebuilt from an fp32 SVD whose
# reconstruction error is ~ p * eps_fp32 ~ 384 * 6e-8 = 2.3e-5 of its norm at worst, through 6 layers
# (measured 1.3e-5; the dense fp32 model itself is 7e-7 off its float64 run).
MINILM_TOL = 5e-5


def set_decaying_spectrum(lin: nn.Linear, seed: int, decay: float = 0.7) -> None:
    g = torch.Generator().manual_seed(seed)
    m, n = lin.weight.shape
    p = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))
    with torch.no_grad():
        lin.weight.copy_((U * decay ** torch.arange(p, dtype=torch.float64)) @ V.t())


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(32, 32)
        self.ffn = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        return self.norm(x + self.ffn(self.q(x)))


class Toy(nn.Module):
    """7 nn.Linear (decaying spectra, so energy truncation saves memory), LayerNorms, a depthwise conv."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(32, 5)
        self.dw = nn.Conv2d(4, 4, 3, groups=4, padding=1)
        for i, mod in enumerate(m for m in self.modules() if isinstance(m, nn.Linear)):
            set_decaying_spectrum(mod, seed * 100 + i)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


LINEARS = ["blocks.0.q", "blocks.0.ffn.0", "blocks.0.ffn.2", "blocks.1.q", "blocks.1.ffn.0", "blocks.1.ffn.2",
           "head"]


def _x(seed=1):
    return torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(seed))


def snapshot(model: nn.Module):
    """Everything convert may change: module types, tensors (values, dtype, device), requires_grad."""
    types = {n: type(m) for n, m in model.named_modules()}
    state = {k: v.detach().clone() if v.device.type != "meta" else v for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    return types, state, flags, hasattr(model, "cersa_report")


def assert_unchanged(model: nn.Module, snap) -> None:
    types, state, flags, had_report = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        w = now[k]
        assert (w.dtype, w.device, w.shape) == (v.dtype, v.device, v.shape), k
        if v.device.type != "meta":
            torch.testing.assert_close(w, v, rtol=0, atol=0, equal_nan=True)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert hasattr(model, "cersa_report") == had_report


def truncated_reference(model: nn.Module, tau: float, names) -> nn.Module:
    """A dense copy whose listed Linear weights are replaced by their float64 rank-r(tau) truncation."""
    ref = copy.deepcopy(model)
    for name in names:
        lin = ref.get_submodule(name)
        U, S, Vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
        c = torch.cumsum(S ** 2, 0)
        r = int((c < tau * c[-1]).sum()) + 1
        with torch.no_grad():
            lin.weight.copy_((U[:, :r] * S[:r]) @ Vh[:r])
    return ref


# ------------------------------------------------------------------------------------ toy model
def test_convert_toy():
    model = Toy()
    ref = truncated_reference(model, 0.93, LINEARS)
    out = convert(model, energy=0.93, delta_rank=2, progress=False)
    assert out is model
    for name in LINEARS:
        assert isinstance(model.get_submodule(name), CersaLinear), name
    assert type(model.dw) is nn.Conv2d and type(model.blocks[0].norm) is nn.LayerNorm
    x = _x()
    assert rel_error(model(x), ref(x)) <= 1e-5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{t}" for n in LINEARS for t in ("A", "B")}
    rep = get_report(model)
    assert rep is model.cersa_report
    rows = {l.name: l for l in rep.layers}
    assert set(LINEARS) <= set(rows)
    for name in LINEARS:
        mod = model.get_submodule(name)
        row = rows[name]
        assert row.status == "converted" and row.rank == mod.rank and row.delta_rank == 2
        assert (row.out_features, row.in_features) == (mod.out_features, mod.in_features)
        assert row.params_before == mod.out_features * mod.in_features
        assert row.params_after == mod.frozen_rank * (mod.out_features + mod.in_features + 1) \
            + 2 * (mod.out_features + mod.in_features)
    assert rows["dw"].status != "converted" and "groups" in rows["dw"].reason
    y = model(x)
    y.sum().backward()
    assert all(model.get_submodule(n).A.grad is not None for n in LINEARS)


def test_train_S_and_bias():
    model = convert(Toy(), energy=0.93, delta_rank=2, train_S=True, train_bias=True, progress=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{t}" for n in LINEARS for t in ("A", "B", "S", "bias")}


@pytest.mark.parametrize("targets,exclude,expected", [
    (["q"], None, ["blocks.0.q", "blocks.1.q"]),
    (["blocks.1.ffn.0", "head"], None, ["blocks.1.ffn.0", "head"]),
    (r"blocks\.\d\.ffn\.[02]", None, ["blocks.0.ffn.0", "blocks.0.ffn.2", "blocks.1.ffn.0", "blocks.1.ffn.2"]),
    (["*.q"], None, ["blocks.0.q", "blocks.1.q"]),
    (None, ["head", "q"], ["blocks.0.ffn.0", "blocks.0.ffn.2", "blocks.1.ffn.0", "blocks.1.ffn.2"]),
    (["q", "head"], ["blocks.0.q"], ["blocks.1.q", "head"]),
])
def test_target_modules_and_exclude(targets, exclude, expected):
    model = convert(Toy(), energy=0.93, delta_rank=2, target_modules=targets, exclude=exclude, progress=False)
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, CersaLinear))
    assert converted == sorted(expected)
    for name in set(LINEARS) - set(expected):
        mod = model.get_submodule(name)
        assert type(mod) is nn.Linear and not mod.weight.requires_grad


@pytest.mark.parametrize("kw,pattern", [
    ({"target_modules": ["nonexistent"]}, r"target_modules.*'nonexistent'"),
    ({"target_modules": ["q", "kv"]}, r"target_modules.*'kv'"),
    ({"target_modules": r"enc\..*"}, r"target_modules.*enc"),
    ({"exclude": ["nothing_here"]}, r"exclude.*'nothing_here'"),
    ({"target_modules": "blocks.(0"}, r"target_modules.*regular expression"),
])
def test_pattern_matching_nothing_is_an_error(kw, pattern):
    model = Toy()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        convert(model, energy=0.93, progress=False, **kw)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("target,kind", [(["dw"], "Conv2d"), (["blocks.0.norm"], "LayerNorm"),
                                         (["blocks.0.ffn.1"], "GELU"), (["blocks.0.ffn"], "Sequential")])
def test_named_unsupported_type_is_an_error(target, kind):
    model = Toy()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=rf"{target[0]}.*{kind}"):
        convert(model, energy=0.93, target_modules=target, progress=False)
    assert_unchanged(model, snap)


def test_layers_without_saving_stay_dense_and_are_reported():
    model = Toy()
    torch.manual_seed(3)
    model.head = nn.Linear(32, 5)  # flat spectrum: r(m + n + 1) >= m n at 0.93
    model.blocks[0].q = nn.Linear(32, 32)
    convert(model, energy=0.93, delta_rank=2, progress=False)
    rows = {l.name: l for l in get_report(model).layers}
    for name in ("head", "blocks.0.q"):
        assert type(model.get_submodule(name)) is nn.Linear
        assert rows[name].status == "dense" and "saving" in rows[name].reason, rows[name]
        assert not model.get_submodule(name).weight.requires_grad
    assert isinstance(model.blocks[1].q, CersaLinear)
    # threshold configurable: a generous ratio converts them, None converts everything
    for ratio in (10.0, None):
        m2 = Toy()
        torch.manual_seed(3)
        m2.head = nn.Linear(32, 5)
        convert(m2, energy=0.93, delta_rank=2, max_frozen_ratio=ratio, progress=False)
        assert isinstance(m2.head, CersaLinear)
    # a tiny ratio leaves every layer dense
    m3 = convert(Toy(), energy=0.93, max_frozen_ratio=1e-6, progress=False)
    assert not any(isinstance(m, CersaLinear) for m in m3.modules())
    assert all(l.status != "converted" for l in get_report(m3).layers)


@pytest.mark.parametrize("ratio", [0, -1.0, "1", True, float("nan")])
def test_bad_max_frozen_ratio(ratio):
    with pytest.raises(ValueError, match="max_frozen_ratio"):
        convert(Toy(), energy=0.9, max_frozen_ratio=ratio, progress=False)


def test_idempotent():
    model = convert(Toy(), energy=0.93, delta_rank=2, progress=False)
    snap = snapshot(model)
    x = _x()
    y1 = model(x)
    convert(model, energy=0.93, delta_rank=2, progress=False)
    types, state, flags, _ = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model(x), y1)
    rows = {l.name: l for l in get_report(model).layers}
    assert all(rows[n].status == "already converted" for n in LINEARS)
    # also with other settings: a converted layer is never re-decomposed
    convert(model, energy=0.5, delta_rank=4, progress=False)
    assert torch.equal(model(x), y1)


def test_report_prints_a_table():
    model = convert(Toy(), energy=0.93, delta_rank=2, progress=False)
    text = str(get_report(model))
    lines = text.splitlines()
    assert "layer" in lines[0] and "rank" in lines[0] and "energy" in lines[0]
    for name in LINEARS + ["dw"]:
        assert any(line.startswith(name + " ") for line in lines), name
    rep = get_report(model)
    assert f"converted {len(rep.converted)} of {len(rep.layers)}" in text
    assert f"{rep.params_before:,}" in text and f"{rep.params_after:,}" in text
    assert rep.params_before == sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features
                                    for n in LINEARS)


def test_get_report_without_conversion():
    with pytest.raises(KeyError, match="convert"):
        get_report(Toy())


def test_count_parameters():
    model = Toy()
    pc0 = count_parameters(model)
    assert pc0.frozen == 0 and pc0.trainable == sum(p.numel() for p in model.parameters())
    convert(model, energy=0.93, delta_rank=2, progress=False)
    model.head.B.requires_grad_(True)
    pc = count_parameters(model)
    train = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert pc.trainable == sum(p.numel() for p in train) == sum(
        model.get_submodule(n).delta_rank * (model.get_submodule(n).in_features + model.get_submodule(n).out_features)
        for n in LINEARS)
    assert pc.frozen == sum(p.numel() for p in frozen)
    assert pc.trainable_bytes == 4 * pc.trainable and pc.frozen_bytes == 4 * pc.frozen
    model.half()
    pc16 = count_parameters(model)
    assert pc16.trainable_bytes == 2 * pc.trainable and pc16.frozen_bytes == 2 * pc.frozen
    assert "trainable" in str(pc16)
    # a shared parameter counts once
    shared = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    shared[1].weight = shared[0].weight
    assert count_parameters(shared).trainable == 16


def test_merge_reverses():
    model = Toy()
    convert(model, energy=0.93, delta_rank=2, progress=False)
    with torch.no_grad():
        for n in LINEARS:
            model.get_submodule(n).B.normal_(0, 0.1)
    x = _x()
    y = model(x)
    out = merge(model)
    assert out is model
    assert not any(isinstance(m, CersaLinear) for m in model.modules())
    for n in LINEARS:
        assert type(model.get_submodule(n)) is nn.Linear
    assert rel_error(model(x), y.double()) <= 1e-5
    assert not hasattr(model, "cersa_report")
    with pytest.raises(TypeError, match="model"):
        merge(CersaLinear.from_linear(nn.Linear(4, 4), energy=0.9, delta_rank=1))


def test_progress_bar(capsys):
    convert(Toy(), energy=0.93, progress=True)
    assert "CERSA" in capsys.readouterr().err
    convert(Toy(), energy=0.93, progress=False)
    assert "CERSA" not in capsys.readouterr().err


# ------------------------------------------------------------------ errors leave the model unchanged
@pytest.mark.parametrize("problem,exc,pattern", [
    ("nan", ValueError, r"head\.weight.*non-finite"),
    ("inf", ValueError, r"head\.weight.*non-finite"),
    ("empty", ValueError, r"head.*empty"),
    ("meta", ValueError, r"head\.weight.*meta"),
    ("int", TypeError, r"head\.weight.*floating"),
])
def test_unusable_weight_names_layer_and_changes_nothing(problem, exc, pattern):
    model = Toy()
    if problem == "nan":
        with torch.no_grad():
            model.head.weight[2, 3] = float("nan")
    elif problem == "inf":
        with torch.no_grad():
            model.head.weight[0, 0] = float("inf")
    elif problem == "empty":
        model.head = nn.Linear(0, 5)
    elif problem == "meta":
        model.head = nn.Linear(32, 5, device="meta")
    elif problem == "int":
        model.head.weight = nn.Parameter(torch.ones(5, 32, dtype=torch.int32), requires_grad=False)
    snap = snapshot(model)
    with pytest.raises(exc, match=pattern):
        convert(model, energy=0.93, delta_rank=2, max_frozen_ratio=None, progress=False)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("kw,exc,pattern", [
    ({"energy": 0.0}, ValueError, "energy"),
    ({"energy": 1.01}, ValueError, "energy"),
    ({"energy": "0.9"}, TypeError, "energy"),
    ({"energy": None}, ValueError, "energy"),
    ({"energy": None, "rank": 33}, ValueError, r"rank.*blocks\.0\.q|rank.*32"),
    ({"delta_rank": 0}, ValueError, "delta_rank"),
    ({"init": "svd"}, ValueError, "init"),
    ({"init": "principal", "alpha": 64}, ValueError, "alpha"),
    ({"backend": "fortran"}, ValueError, "backend"),
])
def test_bad_arguments_change_nothing(kw, exc, pattern):
    model = Toy()
    snap = snapshot(model)
    with pytest.raises(exc, match=pattern):
        convert(model, progress=False, **kw)
    assert_unchanged(model, snap)


def test_not_a_module():
    with pytest.raises(TypeError, match="model"):
        convert({"w": torch.ones(2, 2)}, energy=0.9)


def test_explicit_rank():
    model = convert(Toy(), energy=None, rank=3, delta_rank=2, init="lora", max_frozen_ratio=None, progress=False)
    for n in LINEARS:
        mod = model.get_submodule(n)
        assert mod.rank == mod.frozen_rank == 3


def test_module_registered_under_two_names():
    lin = nn.Linear(32, 32)
    set_decaying_spectrum(lin, 7)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    x = _x()
    ref = truncated_reference(model, 0.93, ["0"])  # "2" is the same object in the copy
    convert(model, energy=0.93, delta_rank=2, progress=False)
    assert isinstance(model[0], CersaLinear) and model[2] is model[0]
    assert rel_error(model(x), ref(x)) <= 1e-5


def test_nn_linear_subclass_and_mha_projection():
    """nn.MultiheadAttention's out_proj (a NonDynamicallyQuantizableLinear) is never converted on its
    own; targeting it explicitly is an error naming it."""
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.proj = nn.Linear(16, 16)

    model = WithMHA()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"attn\.out_proj"):
        convert(model, energy=0.9, target_modules=["attn.out_proj"], progress=False)
    assert_unchanged(model, snap)


# -------------------------------------------------------------------------------------- MiniLM
def _energy_rank64(s: np.ndarray, tau: float) -> int:
    c = np.cumsum(s.astype(np.float64) ** 2)
    return int(np.searchsorted(c, tau * c[-1], side="left") + 1)


def test_minilm_has_37_linear_layers(minilm):
    assert sum(type(m) is nn.Linear for m in minilm.modules()) == 37


def test_minilm_energy_one_reproduces_outputs(minilm, minilm_full, minilm_inputs):
    rep = get_report(minilm_full)
    assert len(rep.converted) == 37 and all(l.status == "converted" for l in rep.layers)
    assert sum(type(m) is nn.Linear for m in minilm_full.modules()) == 0
    with torch.no_grad():
        ref = minilm(**minilm_inputs).last_hidden_state
        out = minilm_full(**minilm_inputs).last_hidden_state
    assert rel_error(out, ref) <= MINILM_TOL


def test_minilm_ranks_match_float64(minilm_093, minilm_singular_values):
    """Every layer's rank at energy 0.93 equals the float64 numpy computation, and the recorded
    energy the float64 retained fraction."""
    rows = {l.name: l for l in get_report(minilm_093).layers}
    assert set(rows) == set(minilm_singular_values)
    ranks = []
    for name, s in minilm_singular_values.items():
        r64 = _energy_rank64(s, 0.93)
        c = np.cumsum(s ** 2) / np.sum(s ** 2)
        # the fp32 SVD perturbs the cumulative fraction by ~1e-6: a float64 boundary closer than that
        # could legitimately flip; MiniLM has none at 0.93 (closest ~1e-5), so this is never skipped
        assert min(abs(c[r64 - 1] - 0.93), abs(c[r64 - 2] - 0.93) if r64 > 1 else 1) > 2e-6, name
        mod = minilm_093.get_submodule(name)
        assert rows[name].rank == mod.rank == r64, (name, rows[name].rank, r64)
        assert abs(mod.energy - c[r64 - 1]) < 1e-6, name
        ranks.append(r64 / len(s))
    assert 0.3 < min(ranks) and max(ranks) < 0.9  # README: 0.41-0.77 of min(m, n) at 0.93


@pytest.mark.parametrize("tau", [0.5, 0.8, 0.9, 0.95])
def test_energy_rank_on_minilm_spectra(minilm_singular_values, tau):
    """decompose.energy_rank on every real MiniLM spectrum equals the independent numpy computation."""
    for name, s in minilm_singular_values.items():
        assert cersa_kernels.energy_rank(torch.from_numpy(s), tau) == _energy_rank64(s, tau), name


def test_minilm_only_deltas_train(minilm_093, minilm):
    trainable = {n for n, p in minilm_093.named_parameters() if p.requires_grad}
    layers = [n for n, m in minilm.named_modules() if type(m) is nn.Linear]
    assert trainable == {f"{n}.{t}" for n in layers for t in ("A", "B")}
    pc = count_parameters(minilm_093)
    assert pc.trainable == 16 * sum(m.in_features + m.out_features for m in minilm.modules()
                                    if type(m) is nn.Linear)


def test_minilm_merge_reverses(minilm, minilm_full, minilm_inputs):
    merged = merge(copy.deepcopy(minilm_full))
    assert sum(type(m) is nn.Linear for m in merged.modules()) == 37
    assert not any(isinstance(m, CersaLinear) for m in merged.modules())
    with torch.no_grad():
        ref = minilm(**minilm_inputs).last_hidden_state
        out = merged(**minilm_inputs).last_hidden_state
    assert rel_error(out, ref) <= MINILM_TOL
    for name, mod in minilm.named_modules():
        if type(mod) is nn.Linear:
            assert rel_error(merged.get_submodule(name).weight, mod.weight) <= MINILM_TOL, name


def test_linear_subclass_with_own_forward_is_not_silently_changed():
    class Twice(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Twice(32, 32), nn.ReLU(), nn.Linear(32, 32))
    for i in (0, 2):
        set_decaying_spectrum(model[i], i)
    x = _x()
    y0 = model(x)
    convert(model, energy=1.0, delta_rank=2, max_frozen_ratio=None, progress=False)
    assert rel_error(model(x), y0) <= 1e-5
