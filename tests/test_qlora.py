"""The QLoRA baseline (python/_qlora.py): bitsandbytes NF4 Linear4bit with double quantization under
PEFT LoRA.  Checked here: the stored format (NF4 levels, blocks of 64, 8-bit absmax codes in blocks
of 256, the bytes), the forward and every gradient against a float64 reference built from the
dequantized base weight and the LoRA factors, that only lora_A / lora_B train, and bad input.

Tolerances: the reference uses exactly the weight bitsandbytes decodes, so the error is that of the
compute dtype's arithmetic: TOL of tests/conftest.py for float32; for bfloat16 compute, x and the
decoded W are rounded to bfloat16 and the base matmul's output too (TOL[bfloat16])."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TOL, rel_error
from helpers import assert_unchanged, snapshot

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                       reason="bitsandbytes is not installed (pip install --no-deps bitsandbytes==0.50.2)"),
    pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed"),
    pytest.mark.usefixtures("one_thread"),
]

import _qlora  # noqa: E402  (imports neither bitsandbytes nor peft at import time)
from cersa_kernels.quant import nf4_levels  # noqa: E402


class Net(nn.Module):
    """Two targeted layers whose weights are not whole 64-number blocks (24x38, 11x24) and one that is
    not targeted.  in_features are even: bitsandbytes decodes a weight with an odd in_features through
    a torch.compile'd fallback instead of its CPU kernel (compiled once per shape, seconds each);
    test_format_is_nf4_with_double_quantization covers that path (23x37)."""

    def __init__(self, n=38, h=24, m=11):
        super().__init__()
        self.up = nn.Linear(n, h)
        self.down = nn.Linear(h, m, bias=False)
        self.head = nn.Linear(m, 3)

    def forward(self, x):
        return self.head(self.down(torch.tanh(self.up(x))))


def _decode(layer) -> torch.Tensor:
    """W from the stored bytes alone, independently of bitsandbytes' decoder: two codes per byte,
    the first number in the high nibble; absmax = level2[code] * scale of its 256-block + mean."""
    qs = layer.weight.quant_state
    rows, cols = qs.shape
    numel = rows * cols
    packed = layer.weight.data.reshape(-1)
    idx = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[:numel].long()
    blocks = qs.absmax.numel()
    absmax = (qs.state2.code[qs.absmax.long()] * qs.state2.absmax.repeat_interleave(256)[:blocks]
              + qs.offset)
    values = F.pad(qs.code[idx], (0, blocks * 64 - numel)).view(blocks, 64) * absmax[:, None]
    return values.reshape(-1)[:numel].view(rows, cols)


def _block_absmax(W: torch.Tensor) -> torch.Tensor:
    flat = W.detach().reshape(-1).float()
    return F.pad(flat, (0, (-flat.numel()) % 64)).view(-1, 64).abs().amax(1)


def _lora(model, name):
    layer = model.base_model.model.get_submodule(name)
    return layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]


def _build(compute_dtype=torch.float32, seed=0, r=4, alpha=8):
    torch.manual_seed(seed)
    net = Net()
    dense = {name: (getattr(net, name).weight.detach().clone(),
                    None if getattr(net, name).bias is None else getattr(net, name).bias.detach().clone())
             for name in ("up", "down", "head")}
    model = _qlora.make_qlora(net, ["up", "down"], r=r, alpha=alpha, compute_dtype=compute_dtype)
    with torch.no_grad():  # PEFT starts lora_B at zero: a nonzero B makes the delta count
        for name in ("up", "down"):
            _lora(model, name)[2].normal_(0.0, 0.1)
    return model, dense


@pytest.mark.parametrize("shape", [(1, 2), (3, 2), (23, 37), (11, 24), (384, 384), (1536, 384)])
def test_format_is_nf4_with_double_quantization(shape):
    bnb = pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(sum(shape))
    lin = nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.randn(shape, generator=g) * torch.logspace(0, -2, shape[1]))
    model = _qlora.make_qlora(nn.Sequential(lin), ["0"], r=2, alpha=4)
    (_, layer), = _qlora.qlora_layers(model)
    assert isinstance(layer, bnb.nn.Linear4bit)
    qs = layer.weight.quant_state
    assert qs.quant_type == "nf4" and qs.blocksize == 64 and qs.nested and qs.state2.blocksize == 256
    assert torch.allclose(qs.code.double(), nf4_levels(torch.float64), atol=1e-7)  # QLoRA's NF4 levels
    numel = shape[0] * shape[1]
    blocks = math.ceil(numel / 64)
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == math.ceil(numel / 2)
    assert qs.absmax.dtype == torch.uint8 and qs.absmax.numel() == blocks
    assert qs.state2.absmax.dtype == torch.float32 and qs.state2.absmax.numel() == math.ceil(blocks / 256)
    # the bytes: codes + 8-bit absmax + float32 scale per 256 blocks + float32 mean
    expected = math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4
    assert _qlora.frozen_base_bytes(model) == expected == _qlora.nf4_bytes(numel)
    if numel >= 384 * 384:
        assert 4.1 <= 8 * expected / numel <= 4.5
    # bitsandbytes' decoder agrees with a decode of the stored bytes, and both are near W
    D = _qlora.dequantized_weight(layer)
    assert torch.equal(D, _decode(layer))
    a = _block_absmax(lin.weight)
    qs_absmax = (qs.state2.code[qs.absmax.long()] * qs.state2.absmax.repeat_interleave(256)[:blocks] + qs.offset)
    half_gap = float((nf4_levels(torch.float64).diff().max()) / 2)
    bound = (a * half_gap + (qs_absmax - a).abs() + 1e-6).repeat_interleave(64)[:numel].view(shape)
    assert bool(((D - lin.weight.detach()).abs() <= bound).all())
    # the second level: absmax - mean within one step of the 8-bit dynamic code (bitsandbytes' CPU
    # quantizer takes the nearest level or, for a few values, its neighbour), times the 256-block's scale
    code2 = qs.state2.code.double()
    step2 = max(float(code2.diff().max()), 1.0 + float(code2[0]))  # code2 ascending, code2[0] ~ -0.993
    scale2 = qs.state2.absmax.double().repeat_interleave(256)[:blocks]
    assert bool(((qs_absmax.double() - a.double()).abs() <= step2 * scale2 + 1e-6).all())


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_shape", [(5, 38), (1, 38), (0, 38), (2, 3, 38), "noncontiguous"])
def test_forward_and_gradients_match_the_dequantized_reference(compute_dtype, x_shape):
    model, dense = _build(compute_dtype)
    g = torch.Generator().manual_seed(1)
    if x_shape == "noncontiguous":
        x = torch.randn(38, 6, generator=g).t()
        assert not x.is_contiguous()
    else:
        x = torch.randn(x_shape, generator=g)
    x.requires_grad_(True)
    y = model(x)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)

    # float64 reference: y = head(down(tanh(up(x)))) with W_nf4 + s B A in the two targeted layers
    params = {}
    for name in ("up", "down"):
        layer, A, B, s = _lora(model, name)
        W = _qlora.dequantized_weight(layer.base_layer, torch.float64)
        params[name] = (A.detach().double().requires_grad_(True), B.detach().double().requires_grad_(True), W, s)
    x64 = x.detach().double().requires_grad_(True)

    def lora_linear(name, inp):
        A, B, W, s = params[name]
        bias = dense[name][1]
        out = inp @ W.t() + s * (inp @ A.t()) @ B.t()
        return out if bias is None else out + bias.double()

    h = lora_linear("down", torch.tanh(lora_linear("up", x64)))
    y64 = h @ dense["head"][0].double().t() + dense["head"][1].double()
    y64.backward(dy.double())
    tol = TOL[compute_dtype]
    assert y.dtype == torch.float32 and y.shape == y64.shape
    assert rel_error(y, y64) <= tol
    assert rel_error(x.grad, x64.grad) <= tol
    for name in ("up", "down"):
        _, A, B, _ = _lora(model, name)
        assert rel_error(A.grad, params[name][0].grad) <= tol, name
        assert rel_error(B.grad, params[name][1].grad) <= tol, name


def test_only_lora_factors_train():
    model, _ = _build()
    x = torch.randn(4, 38)
    model(x).square().sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable == with_grad
    assert sorted(trainable) == sorted(f"base_model.model.{layer}.lora_{ab}.default.weight"
                                       for layer in ("up", "down") for ab in "AB")
    assert all(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if p.requires_grad)
    # an optimizer step changes the LoRA factors and leaves the quantized bytes as they were
    (_, up), (_, down) = _qlora.qlora_layers(model)
    before = [up.weight.data.clone(), down.weight.data.clone(), up.weight.quant_state.absmax.clone()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    after = [up.weight.data, down.weight.data, up.weight.quant_state.absmax]
    assert all(torch.equal(b, a) for b, a in zip(before, after))


def test_options_reach_peft():
    bnb = pytest.importorskip("bitsandbytes")
    peft_bnb = pytest.importorskip("peft.tuners.lora.bnb")
    model = _qlora.make_qlora(Net(), r"(up|down)", r=3, alpha=12, dropout=0.25, compute_dtype=torch.bfloat16)
    for name in ("up", "down"):
        layer, A, B, s = _lora(model, name)
        assert isinstance(layer, peft_bnb.Linear4bit)  # PEFT's QLoRA layer, not the generic lora.Linear
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        assert layer.base_layer.compute_dtype == torch.bfloat16
        assert A.shape[0] == 3 and B.shape[1] == 3 and s == 4.0
        assert layer.lora_dropout["default"].p == 0.25
    assert type(model.base_model.model.head) is nn.Linear


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "r: expected a positive int"),
    (dict(r=2.0), "r: expected a positive int"),
    (dict(alpha=0), "alpha: expected a positive number"),
    (dict(dropout=1.0), r"dropout: expected a number in \[0, 1\)"),
    (dict(compute_dtype=torch.int8), "compute_dtype: expected one of"),
    (dict(target_modules=["nope"]), "target_modules: .*matches none"),
    (dict(target_modules=["up", "act"]), r"target_modules: expected only nn.Linear .*act \(Tanh\)"),
])
def test_bad_input_names_the_argument_and_changes_nothing(kwargs, match):
    net = Net()
    net.act = nn.Tanh()
    before = snapshot(net)
    args = dict(target_modules=["up"], r=2, alpha=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        _qlora.make_qlora(net, **args)
    assert_unchanged(net, before)
    assert not hasattr(net, "is_loaded_in_4bit")
