"""Tests of cersa_kernels.save / load / save_adapter / load_adapter (cersa_kernels/io.py)."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import cersa_kernels
from cersa_kernels import CersaLinear, convert, get_report, load, load_adapter, save, save_adapter

from conftest import make_inputs
from helpers import LINEARS, Toy, assert_unchanged, snapshot

# Small SVDs: one thread is as fast and avoids spin-waiting on a busy CI machine (conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


def trained_toy(seed=0, **kw):
    """A converted Toy whose deltas (and a trained head bias) moved away from their init."""
    model = convert(Toy(seed), energy=0.93, delta_rank=2, progress=False, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n in LINEARS:
            mod = model.get_submodule(n)
            mod.A.add_(torch.randn(mod.A.shape, generator=g) * 0.1)
            mod.B.add_(torch.randn(mod.B.shape, generator=g) * 0.1)
    return model


def test_save_load_toy_identical(tmp_path):
    model = trained_toy(train_S=True)
    path = tmp_path / "toy.safetensors"
    save(model, path)
    fresh = Toy(0)
    out = load(path, fresh)
    assert out is fresh
    x = make_inputs((3, 4), 32).x
    assert torch.equal(fresh(x), model(x))
    assert {n: type(m) for n, m in fresh.named_modules()} == {n: type(m) for n, m in model.named_modules()}
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    for n in LINEARS:
        a, b = model.get_submodule(n), fresh.get_submodule(n)
        assert (a.rank, a.frozen_rank, a.delta_rank, a.scale, a.energy, a.init) == \
            (b.rank, b.frozen_rank, b.delta_rank, b.scale, b.energy, b.init)
    assert {l.name for l in get_report(fresh).converted} == set(LINEARS)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "cersa_kernels" and meta["kind"] == "model"
    assert meta["version"] == cersa_kernels.__version__
    layers = json.loads(meta["layers"])
    assert set(layers) == set(LINEARS)
    assert all({"rank", "energy", "init", "delta_rank", "scale"} <= set(cfg) for cfg in layers.values())


def test_load_does_not_run_the_svd(tmp_path, monkeypatch):
    model = trained_toy()
    save(model, tmp_path / "m.safetensors")

    def no_svd(*a, **k):
        raise AssertionError("load re-ran the SVD")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    monkeypatch.setattr(torch.linalg, "svdvals", no_svd)
    fresh = load(tmp_path / "m.safetensors", Toy(0))
    assert torch.equal(fresh(make_inputs((3, 4), 32).x), model(make_inputs((3, 4), 32).x))


def test_save_load_fp16_model(tmp_path):
    model = trained_toy().half()
    save(model, tmp_path / "h.safetensors")
    fresh = load(tmp_path / "h.safetensors", Toy(0).half())
    x = make_inputs((3, 4), 32).x.half()
    assert torch.equal(fresh(x), model(x))
    assert all(p.dtype == torch.float16 for p in fresh.parameters())


def test_tied_parameters_round_trip(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(10, 32)
            self.body = nn.Linear(32, 32)
            self.head = nn.Linear(32, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.body(self.emb(ids)))

    model = convert(Tied(), energy=0.9, delta_rank=2, exclude=["head"], max_frozen_ratio=None, progress=False)
    with torch.no_grad():
        model.emb.weight.mul_(1.5)
        model.body.B.normal_()
    save(model, tmp_path / "t.safetensors")
    fresh = load(tmp_path / "t.safetensors", Tied())
    ids = torch.tensor([[1, 2, 3], [4, 5, 9]])
    assert torch.equal(fresh(ids), model(ids))
    assert fresh.head.weight is fresh.emb.weight


def test_save_load_minilm(tmp_path, minilm, minilm_093, minilm_inputs):
    model = copy.deepcopy(minilm_093)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CersaLinear):
                m.B.add_(torch.randn(m.B.shape, generator=g) * 1e-3)
    path = tmp_path / "minilm.safetensors"
    save(model, path)
    fresh = load(path, copy.deepcopy(minilm))
    with torch.no_grad():
        a = model(**minilm_inputs).last_hidden_state
        b = fresh(**minilm_inputs).last_hidden_state
    assert torch.equal(a, b)
    assert sum(isinstance(m, CersaLinear) for m in fresh.modules()) == 37


# --------------------------------------------------------------------------------- mismatches
def _model_with_extra():
    model = Toy(0)
    model.extra = nn.Linear(32, 3)
    return model


def _model_with_other_norm():
    model = Toy(0)
    model.blocks[1].norm = nn.LayerNorm(32, elementwise_affine=False)
    return model


def _model_with_other_dense_shape():
    model = Toy(0)
    model.dw = nn.Conv2d(4, 4, 5, groups=4, padding=2)
    return model


def _model_without_head():
    model = Toy(0)
    del model.head
    return model


def _model_with_narrow_ffn():
    model = Toy(0)
    for b in model.blocks:
        b.ffn = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    return model


def _model_with_head_without_bias():
    model = Toy(0)
    model.head = nn.Linear(32, 5, bias=False)
    return model


# case: (the model loaded into, regex of the error); the file holds trained_toy()
MISMATCHES = {
    "missing_keys": (_model_with_extra, r"missing keys.*extra\.bias.*extra\.weight"),
    "unexpected_keys": (_model_with_other_norm, r"unexpected keys.*blocks\.1\.norm\.bias.*blocks\.1\.norm\.weight"),
    "shape_of_dense_tensor": (_model_with_other_dense_shape,
                              r"shape mismatch.*dw\.weight.*\(4, 1, 3, 3\).*\(4, 1, 5, 5\)"),
    "layer_missing_from_model": (_model_without_head, r"head"),
    "shape_of_converted_layer": (_model_with_narrow_ffn, r"blocks\.0\.ffn\.0"),
    "bias_flag": (_model_with_head_without_bias, "head"),
    "already_converted": (trained_toy, "already a CERSA layer"),
}


@pytest.mark.parametrize("target,pattern", list(MISMATCHES.values()), ids=list(MISMATCHES))
def test_load_into_a_mismatched_model_changes_nothing(tmp_path, target, pattern):
    save(trained_toy(), tmp_path / "m.safetensors")
    model = target()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        load(tmp_path / "m.safetensors", model)
    assert_unchanged(model, snap)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load(tmp_path / "nope.safetensors", Toy(0))
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    with pytest.raises(ValueError, match="not a cersa_kernels file"):
        load(plain, Toy(0))
    model = trained_toy()
    save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="adapter"):
        load(tmp_path / "a.safetensors", Toy(0))
    save(model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="model"):
        load_adapter(tmp_path / "m.safetensors", trained_toy())
    with pytest.raises(ValueError, match="no CERSA layer"):
        save(Toy(0), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="no CERSA layer"):
        save_adapter(Toy(0), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# -------------------------------------------------------------------------------- atomic write
def test_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    model = trained_toy()
    save(model, path)
    before = path.read_bytes()
    import safetensors.torch as st

    def crashing(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 100)  # half a file, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", crashing)
    other = trained_toy(seed=1)
    with pytest.raises(OSError, match="disk full"):
        save(other, path)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(other, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"], "a temporary file was left behind"
    monkeypatch.undo()
    fresh = load(path, Toy(0))
    assert torch.equal(fresh(make_inputs((3, 4), 32).x), model(make_inputs((3, 4), 32).x))


def test_saved_file_respects_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save(trained_toy(), tmp_path / "m.safetensors")
        with open(tmp_path / "ref", "wb"):
            pass
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "m.safetensors").st_mode & 0o777) == (os.stat(tmp_path / "ref").st_mode & 0o777)


# ------------------------------------------------------------------------------------- adapters
def test_adapter_round_trip(tmp_path):
    model = trained_toy(train_bias=True)
    model.head.bias.requires_grad_(True)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        meta = fh.metadata()
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(k.endswith((".U", ".Vh", ".S")) for k in keys)
    assert meta["kind"] == "adapter"
    base = convert(Toy(0), energy=0.93, delta_rank=2, train_bias=True, progress=False)
    x = make_inputs((3, 4), 32).x
    assert not torch.equal(base(x), model(x))
    load_adapter(path, base)
    assert torch.equal(base(x), model(x))
    assert {n for n, p in base.named_parameters() if p.requires_grad} == keys


def test_adapter_is_small(tmp_path):
    model = trained_toy()
    save(model, tmp_path / "full.safetensors")
    save_adapter(model, tmp_path / "adapter.safetensors")
    assert os.path.getsize(tmp_path / "adapter.safetensors") < 0.5 * os.path.getsize(tmp_path / "full.safetensors")


@pytest.mark.parametrize("kw,pattern", [({"delta_rank": 3}, "delta_rank"), ({"energy": 0.5}, "frozen_rank"),
                                        ({"init": "lora", "alpha": 4}, "scale")])
def test_adapter_from_differently_converted_model(tmp_path, kw, pattern):
    save_adapter(trained_toy(), tmp_path / "a.safetensors")
    opts = {"energy": 0.93, "delta_rank": 2, **kw}
    other = convert(Toy(0), progress=False, **opts)
    snap = snapshot(other)
    with pytest.raises(ValueError, match=pattern):
        load_adapter(tmp_path / "a.safetensors", other)
    assert_unchanged(other, snap)


def test_adapter_missing_layer(tmp_path):
    save_adapter(convert(Toy(0), energy=0.93, delta_rank=2, exclude=["head"], progress=False),
                 tmp_path / "a.safetensors")
    model = convert(Toy(0), energy=0.93, delta_rank=2, progress=False)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"missing keys.*head\.A"):
        load_adapter(tmp_path / "a.safetensors", model)
    assert_unchanged(model, snap)
