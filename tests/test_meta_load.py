"""``cersa_kernels.load`` into a model whose parameters were never allocated (the meta device):
built under accelerate's ``init_empty_weights()`` or under ``torch.device("meta")``.  Only what the
file holds is materialised, CERSA layers come from the file's configs (no dense weight, no SVD), a
file lacking a tensor is an error naming it, and a failed load leaves the model as it was."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cersa_kernels import CersaLinear, convert, load, save

from conftest import rel_error, single_thread
from roundtrip_helpers import IDS, Net, perturb_deltas

accelerate = pytest.importorskip("accelerate", reason="accelerate (init_empty_weights) is not installed")


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


class WithBuffers(Net):
    """Net plus a persistent buffer (in the state dict) and, optionally, a non-persistent one."""

    def __init__(self, non_persistent: bool = True, **kw):
        super().__init__(**kw)
        self.register_buffer("offset", torch.full((32,), 0.25))
        if non_persistent:
            self.register_buffer("ids_cache", torch.arange(4), persistent=False)

    def forward(self, ids):
        return super().forward(ids) + self.offset.sum()


def _saved(tmp_path, model_cls=WithBuffers, **kw):
    model = perturb_deltas(convert(model_cls(**kw), energy=0.9, delta_rank=2, progress=False))
    model.norm.weight.requires_grad_(True)
    with torch.no_grad():
        model.offset.add_(1.0)
    path = tmp_path / "m.safetensors"
    save(model, path)
    return model, path


def _state_of(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {k: (v.device.type, v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()})


def test_load_into_init_empty_weights_model(tmp_path, monkeypatch):
    model, path = _saved(tmp_path)
    with accelerate.init_empty_weights():
        empty = WithBuffers()
    assert all(p.is_meta for p in empty.parameters()) and not empty.ids_cache.is_meta

    def refuse(*a, **k):
        raise AssertionError("load ran an SVD or built a layer from a dense weight")

    monkeypatch.setattr(torch.linalg, "svd", refuse)
    monkeypatch.setattr(CersaLinear, "from_dense", classmethod(refuse))
    load(path, empty)
    monkeypatch.undo()
    assert not any(t.is_meta for t in list(empty.parameters()) + list(empty.buffers()))
    assert {n: type(m) for n, m in empty.named_modules()} == {n: type(m) for n, m in model.named_modules()}
    assert torch.equal(empty(IDS), model(IDS))
    assert {n for n, p in empty.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in empty.parameters())
    assert not any(hasattr(m, "weight") for m in (empty.up, empty.down)), "a dense weight was built"


def test_load_into_a_meta_device_model_with_persistent_buffers_and_a_tie(tmp_path):
    model, path = _saved(tmp_path, non_persistent=False, tie=True)
    assert type(model.head) is nn.Linear  # tied: stays dense
    with torch.device("meta"):
        empty = WithBuffers(non_persistent=False, tie=True)
    load(path, empty, device="cpu")
    assert empty.head.weight is empty.emb.weight
    assert torch.equal(empty(IDS), model(IDS))
    empty(IDS).sum().backward()  # a trainable, materialised model
    assert empty.up.A.grad is not None


def test_meta_dtype_is_kept(tmp_path):
    model, path = _saved(tmp_path)
    with accelerate.init_empty_weights():
        empty = WithBuffers().to(torch.float64)
    load(path, empty)
    assert all(p.dtype == torch.float64 for p in empty.parameters())
    assert rel_error(empty(IDS), model(IDS).double()) <= 1e-6


def test_non_persistent_meta_buffer_is_an_error_and_nothing_changes(tmp_path):
    _, path = _saved(tmp_path)
    with torch.device("meta"):
        empty = WithBuffers()
    before = _state_of(empty)
    with pytest.raises(ValueError, match=r"ids_cache.*meta device.*not in the file.*init_empty_weights"):
        load(path, empty)
    assert _state_of(empty) == before


@pytest.mark.parametrize("drop", ["offset", "norm.weight", "up.A"])
def test_file_lacking_a_tensor_names_it_and_nothing_changes(tmp_path, drop):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, path = _saved(tmp_path)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k != drop}
    save_file(tensors, str(tmp_path / "short.safetensors"), metadata=meta)
    with accelerate.init_empty_weights():
        empty = WithBuffers()
    before = _state_of(empty)
    with pytest.raises(ValueError, match=rf"missing keys \(1\): \['{drop}'\]"):
        load(tmp_path / "short.safetensors", empty)
    assert _state_of(empty) == before
    assert all(p.is_meta for p in empty.parameters())


def test_mixed_real_and_meta_parameters(tmp_path):
    model, path = _saved(tmp_path)
    with accelerate.init_empty_weights():
        empty = WithBuffers()
    empty.norm = nn.LayerNorm(32)  # a real module among meta ones: its tensors are copied into
    keep = empty.norm.weight
    load(path, empty)
    assert empty.norm.weight is keep
    assert torch.equal(empty(IDS), model(IDS))


def test_minilm_into_an_empty_model(tmp_path, minilm_093, minilm_inputs):
    transformers = pytest.importorskip("transformers")
    model = copy.deepcopy(minilm_093)
    perturb_deltas(model, scale=1e-3)
    save(model, tmp_path / "minilm.safetensors")
    with accelerate.init_empty_weights():
        empty = transformers.AutoModel.from_config(model.config)
    load(tmp_path / "minilm.safetensors", empty)
    empty.eval()
    with torch.no_grad():
        assert torch.equal(empty(**minilm_inputs).last_hidden_state, model(**minilm_inputs).last_hidden_state)
    assert not any(p.is_meta for p in empty.parameters())
