"""Bad input: every case raises a specific exception whose message names the
argument (or layer), the expected and the received value, and leaves the model exactly as it was
(same module types under the same names, same tensors bit for bit, same requires_grad flags).

The functional op's own argument checks (shapes, dtypes, devices, scale, backend) are tabulated in
tests/test_ops.py::test_bad_inputs_raise_naming_the_argument; here are the model-level entry points
(convert, CersaLinear, its forward, load, load_adapter) and the op cases that reach it through a layer.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cersa_kernels
from cersa_kernels import CersaLinear

from helpers import assert_unchanged, snapshot


class Net(nn.Module):
    """Linear 8 -> 12, LayerNorm, Linear 12 -> 6 (min(m, n) = 8 and 6), an Embedding."""

    def __init__(self, hidden=12, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, 6)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def _with(value, where="fc2"):
    def make():
        net = Net()
        with torch.no_grad():
            getattr(net, where).weight[1, 2] = value
        return net
    return make


def _meta():
    with torch.device("meta"):
        return Net()


# case id: (model factory, convert kwargs, exception, message regex: argument, expected, received)
CONVERT_CASES = {
    "energy_zero": (Net, {"energy": 0.0}, ValueError, r"^energy: expected a float in \(0, 1\], got 0\.0"),
    "energy_negative": (Net, {"energy": -0.5}, ValueError, r"^energy: expected a float in \(0, 1\], got -0\.5"),
    "energy_above_one": (Net, {"energy": 1.5}, ValueError, r"^energy: expected a float in \(0, 1\], got 1\.5"),
    "energy_nan": (Net, {"energy": float("nan")}, ValueError, r"^energy: expected a float in \(0, 1\], got nan"),
    "energy_inf": (Net, {"energy": float("inf")}, ValueError, r"^energy: expected a float in \(0, 1\], got inf"),
    "energy_str": (Net, {"energy": "0.9"}, TypeError, r"^energy: expected a float in \(0, 1\], got str '0\.9'"),
    "energy_none_no_rank": (Net, {"energy": None}, ValueError, r"^energy: .*got energy=None and rank=None"),
    "rank_above_min": (Net, {"rank": 7}, ValueError, r"^rank \(fc2: 6 x 12\): expected an int in \[0, .*=6\], got 7"),
    "rank_negative": (Net, {"rank": -1}, ValueError, r"^rank .*expected an int in \[0, .*got -1"),
    "rank_float": (Net, {"rank": 2.0}, TypeError, r"^rank .*expected an int .*got float 2\.0"),
    "delta_rank_zero": (Net, {"delta_rank": 0}, ValueError, r"^delta_rank.*expected a positive int, got 0"),
    "delta_rank_negative": (Net, {"delta_rank": -3}, ValueError, r"^delta_rank.*expected a positive int, got -3"),
    "delta_rank_float": (Net, {"delta_rank": 1.5}, TypeError, r"^delta_rank.*expected a positive int, got float 1\.5"),
    "target_layernorm": (Net, {"target_modules": ["norm"]}, ValueError,
                         r"^target_modules: 'norm' is a LayerNorm; supported types: Linear"),
    "target_embedding": (Net, {"target_modules": ["fc1", "emb"]}, ValueError,
                         r"^target_modules: 'emb' is a Embedding; supported types: Linear"),
    "target_regex_embedding": (Net, {"target_modules": r"fc1|emb"}, ValueError,
                               r"^target_modules: 'emb' is a Embedding; supported types"),
    "target_missing": (Net, {"target_modules": ["fc3"]}, ValueError, r"^target_modules: the pattern 'fc3' matches no"),
    "init_unknown": (Net, {"init": "svd"}, ValueError, r"^init: expected one of \('principal', 'lora', 'residual'\), got 'svd'"),
    "nan_weight": (_with(float("nan")), {}, ValueError, r"^fc2\.weight: .*1 non-finite value"),
    "inf_weight": (_with(float("inf"), "fc1"), {}, ValueError, r"^fc1\.weight: .*1 non-finite value"),
    "meta_model": (_meta, {}, ValueError, r"^fc1\.weight: .*meta device"),
    "not_a_module": (lambda: {"fc": nn.Linear(2, 2)}, {}, TypeError, r"^model: expected an nn\.Module, got dict"),
}


@pytest.mark.parametrize("case", list(CONVERT_CASES))
def test_convert_bad_input_changes_nothing(case):
    factory, kw, exc, pattern = CONVERT_CASES[case]
    model = factory()
    before = snapshot(model) if isinstance(model, nn.Module) else None
    with pytest.raises(exc, match=pattern):
        cersa_kernels.convert(model, progress=False, **kw)
    if before is not None:
        assert_unchanged(model, before)


def test_bad_input_on_a_converted_model_changes_nothing():
    """A second convert with bad arguments leaves the first conversion as it was."""
    model = cersa_kernels.convert(Net(), rank=3, delta_rank=2, progress=False)
    before = snapshot(model)
    for kw, exc in (({"energy": 2.0}, ValueError), ({"target_modules": ["norm"]}, ValueError),
                    ({"energy": "x"}, TypeError)):
        with pytest.raises(exc):
            cersa_kernels.convert(model, progress=False, **kw)
        assert_unchanged(model, before)


@pytest.mark.parametrize("kw", [{"delta_rank": 0}, {"init": "x"}], ids=["delta_rank_zero", "init_unknown"])
def test_bad_arguments_raise_even_with_nothing_to_convert(kw):
    model = cersa_kernels.convert(Net(), rank=3, delta_rank=2, progress=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"^{next(iter(kw))}: "):
        cersa_kernels.convert(model, progress=False, **kw)
    assert_unchanged(model, before)


def test_convert_unknown_backend_changes_nothing():
    model = Net()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^backend: .*got 'fortran'"):
        cersa_kernels.convert(model, backend="fortran", progress=False)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------ CersaLinear
LINEAR_CASES = {
    "not_linear": (lambda: nn.Conv1d(3, 4, 1), {}, TypeError, r"^linear: expected an nn\.Linear, got Conv1d"),
    "energy_nan": (lambda: nn.Linear(5, 4), {"energy": float("nan")}, ValueError, r"energy: expected .*got nan"),
    "rank_above_min": (lambda: nn.Linear(5, 4), {"energy": None, "rank": 5}, ValueError,
                       r"rank.*expected an int in \[0, .*=4\], got 5"),
    "delta_rank_zero": (lambda: nn.Linear(5, 4), {"delta_rank": 0}, ValueError, r"^delta_rank.*got 0"),
    "meta_weight": (lambda: nn.Linear(5, 4, device="meta"), {}, ValueError, r"weight: .*meta device"),
    "nan_weight": (lambda: nn.Linear(5, 4).requires_grad_(False).apply(lambda m: m.weight.fill_(float("nan"))),
                   {}, ValueError, r"weight: .*20 non-finite"),
    "lora_alpha_with_principal": (lambda: nn.Linear(5, 4), {"alpha": 8, "delta_rank": 2}, ValueError,
                                  r"^alpha: init='principal' sets the scale itself.*alpha=8"),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_from_linear_bad_input(case):
    factory, kw, exc, pattern = LINEAR_CASES[case]
    lin = factory()
    before = snapshot(lin)
    with pytest.raises(exc, match=pattern):
        CersaLinear.from_linear(lin, **kw)
    assert_unchanged(lin, before)


def _layer():
    torch.manual_seed(0)
    return CersaLinear.from_linear(nn.Linear(8, 6), energy=None, rank=3, delta_rank=2)


FORWARD_CASES = {
    "wrong_last_dim": (lambda: torch.randn(2, 9), ValueError,
                       r"^x: expected last dimension in_features = Vh\.shape\[1\] = 8, got shape \(2, 9\)"),
    "scalar": (lambda: torch.tensor(1.0), ValueError, r"^x: expected at least 1 dimension"),
    "int_input": (lambda: torch.ones(2, 8, dtype=torch.long), TypeError,
                  r"^x: expected a floating-point tensor, got dtype torch\.int64"),
    "other_device": (lambda: torch.randn(2, 8, device="meta"), ValueError,
                     r"^U: expected device meta \(x's device\), got cpu"),
}


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_layer_forward_bad_input(case):
    layer = _layer()
    before = snapshot(layer)
    make_x, exc, pattern = FORWARD_CASES[case]
    with pytest.raises(exc, match=pattern):
        layer(make_x())
    assert_unchanged(layer, before)


def test_layer_forward_list_input_names_x():
    layer = _layer()
    before = snapshot(layer)
    with pytest.raises(TypeError, match=r"^x: expected a torch\.Tensor, got list"):
        layer([[0.0] * 8])
    assert_unchanged(layer, before)


# ------------------------------------------------------------------------------ checkpoints
@pytest.fixture()
def files(tmp_path):
    model = cersa_kernels.convert(Net(), rank=4, delta_rank=2, progress=False)
    cersa_kernels.save(model, tmp_path / "model.safetensors")
    cersa_kernels.save_adapter(model, tmp_path / "adapter.safetensors")
    torch.save({"w": torch.ones(2)}, tmp_path / "pickle.pt")
    return tmp_path


class Wider(Net):
    def __init__(self):
        super().__init__(hidden=16)


class Renamed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.first = nn.Linear(8, 12)
        self.norm = nn.LayerNorm(12)
        self.second = nn.Linear(12, 6)


LOAD_CASES = {
    "wider_architecture": ("model.safetensors", Wider, "load", ValueError,
                           r"fc1: the file's layer has weight shape\(s\) \[\(12, 8\)\] \(out, in\), the model's Linear \[\(16, 8\)\]"),
    "other_names": ("model.safetensors", Renamed, "load", ValueError,
                    r"cannot rebuild the saved CERSA layers: fc1: no such module in the model"),
    "already_converted": ("model.safetensors", lambda: cersa_kernels.convert(Net(), rank=4, delta_rank=2, progress=False),
                          "load", ValueError, r"fc1: already a CERSA layer"),
    "adapter_as_model": ("adapter.safetensors", Net, "load", ValueError,
                         r"^path: expected a cersa_kernels model file, got kind='adapter'"),
    "model_as_adapter": ("model.safetensors", lambda: cersa_kernels.convert(Net(), rank=4, delta_rank=2, progress=False),
                         "load_adapter", ValueError, r"^path: expected a cersa_kernels adapter file, got kind='model'"),
    "adapter_other_rank": ("adapter.safetensors", lambda: cersa_kernels.convert(Net(), rank=3, delta_rank=2,
                                                                                progress=False),
                           "load_adapter", ValueError, r"fc1\.frozen_rank: file 2 vs model 1"),
    "adapter_unconverted": ("adapter.safetensors", Net, "load_adapter", ValueError, r"fc1: not a CERSA layer"),
    "missing_file": ("nope.safetensors", Net, "load", FileNotFoundError, r"^path: no such file .*nope\.safetensors"),
    "pickle_file": ("pickle.pt", Net, "load", ValueError, r"^path: .*pickle\.pt.*not a .*safetensors"),
}


@pytest.mark.parametrize("fname,factory,fn,exc,pattern", list(LOAD_CASES.values()), ids=list(LOAD_CASES))
def test_load_bad_input_changes_nothing(files, fname, factory, fn, exc, pattern):
    model = factory()
    before = snapshot(model)
    with pytest.raises(exc, match=pattern):
        getattr(cersa_kernels, fn)(files / fname, model)
    assert_unchanged(model, before)
