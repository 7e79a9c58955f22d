"""torch.autocast and mixed dtypes.

The output-dtype rule (documented in ``cersa_linear`` and ``CersaLinear.forward``): under
torch.autocast for x's device every tensor is cast to the autocast dtype and y has that dtype;
otherwise y has x's dtype, and ``CersaLinear`` casts factors of another dtype to it (the functional
op refuses mixed dtypes outside autocast).  Every gradient comes back in its own tensor's dtype.
Values are compared with a float64 computation from the same (rounded) tensors; error metric and
bounds: conftest.rel_error / conftest.TOL (bf16 / fp16 for results computed in those dtypes, 2-3
roundings of the (N, r + k) intermediate and of y; fp32 for the all-fp32 parts).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cersa_kernels
from cersa_kernels import CersaLinear

from conftest import TOL, cpu_backends, make_inputs, rel_error

CPU_AUTOCAST = [torch.bfloat16, torch.float16]


def _layer(m=19, n=23, r=6, k=4, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n, m)
    layer = CersaLinear.from_linear(lin, energy=None, rank=r, delta_rank=k, init="lora", train_bias=True)
    with torch.no_grad():
        layer.B.normal_()  # a nonzero delta, so dA is not identically zero
    return layer.to(dtype)


def _ref64(layer, x, g):
    """Output and gradients in float64 from the layer's tensors as stored (after their rounding)."""
    t = {n: p.detach().double().requires_grad_(True) for n, p in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_(True)
    W = t["U"] * t["S"] @ t["Vh"] + layer.scale * t["B"] @ t["A"]
    y = x64 @ W.t() + t["bias"]
    y.backward(g.double())
    return y.detach(), x64.grad, {n: v.grad for n, v in t.items()}


def _run(layer, x, g, autocast_dtype=None):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    if autocast_dtype is None:
        y = layer(x)
    else:
        with torch.autocast("cpu", dtype=autocast_dtype):
            y = layer(x)
    y.backward(g.to(y.dtype))
    return y, x


@pytest.mark.parametrize("dtype", CPU_AUTOCAST)
@pytest.mark.parametrize("backend", cpu_backends(include_interpreted_triton=True))
def test_autocast_cpu_fp32_layer(dtype, backend):
    layer = _layer()
    layer.backend = backend
    x = torch.randn(2, 5, 23)
    g = torch.randn(2, 5, 19)
    y, xg = _run(layer, x, g, dtype)
    assert y.dtype == dtype  # the autocast dtype
    assert xg.grad.dtype == torch.float32
    for n, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32, n  # each parameter's own dtype
        else:
            assert p.grad is None, n
    # reference from the tensors the kernels saw: the autocast-rounded copies
    rounded = _layer()
    rounded.load_state_dict({k: v.to(dtype).float() for k, v in layer.state_dict().items()})
    y64, gx64, g64 = _ref64(rounded, x.to(dtype), g.to(dtype))
    assert rel_error(y, y64) < TOL[dtype]
    assert rel_error(xg.grad, gx64) < TOL[dtype]
    for n in ("A", "B", "bias"):
        assert rel_error(getattr(layer, n).grad, g64[n]) < TOL[dtype], n


def test_autocast_matches_manual_cast():
    """Autocast gives exactly what casting every tensor to bf16 by hand gives."""
    layer = _layer()
    x, g = torch.randn(7, 23), torch.randn(7, 19)
    y, xg = _run(layer, x, g, torch.bfloat16)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    manual = _layer().to(torch.bfloat16)
    manual.load_state_dict({k: v.to(torch.bfloat16) for k, v in layer.state_dict().items()})
    ym, xm = _run(manual, x.to(torch.bfloat16), g.to(torch.bfloat16))
    torch.testing.assert_close(y, ym, rtol=0, atol=0)
    torch.testing.assert_close(xg.grad, xm.grad.float(), rtol=0, atol=0)
    for n, gr in grads.items():
        torch.testing.assert_close(gr, getattr(manual, n).grad.float(), rtol=0, atol=0)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_bf16_factors_fp32_deltas(x_dtype):
    """Frozen factors (and bias) in bf16, trainable deltas in fp32: y has x's dtype, no dtype error,
    dA/dB stay fp32, dbias bf16."""
    layer = _layer()
    for n in ("U", "S", "Vh", "bias"):
        getattr(layer, n).data = getattr(layer, n).data.to(torch.bfloat16)
    x, g = torch.randn(3, 4, 23).to(x_dtype), torch.randn(3, 4, 19)
    y, xg = _run(layer, x, g)
    assert y.dtype == x_dtype
    assert xg.grad.dtype == x_dtype
    assert layer.A.grad.dtype == torch.float32 and layer.B.grad.dtype == torch.float32
    assert layer.bias.grad.dtype == torch.bfloat16
    tol = TOL[torch.bfloat16]
    # compute dtype is x's dtype: the reference uses the tensors rounded to it
    rounded = _layer()
    rounded.load_state_dict({k: v.to(x_dtype).float() for k, v in layer.state_dict().items()})
    y64, gx64, g64 = _ref64(rounded, x, g.to(x_dtype))
    assert rel_error(y, y64) < tol
    assert rel_error(xg.grad, gx64) < tol
    for n in ("A", "B", "bias"):
        assert rel_error(getattr(layer, n).grad, g64[n]) < tol, n


def test_fp32_input_bf16_layer():
    """An fp32 input into a bf16 layer computes in fp32 (x's dtype) and returns fp32; the bf16
    parameters get bf16 gradients."""
    layer = _layer(dtype=torch.bfloat16)
    x, g = torch.randn(6, 23), torch.randn(6, 19)
    y, xg = _run(layer, x, g)
    assert y.dtype == torch.float32 and xg.grad.dtype == torch.float32
    for n in ("A", "B", "bias"):
        assert getattr(layer, n).grad.dtype == torch.bfloat16, n
    y64, gx64, g64 = _ref64(layer, x, g)
    assert rel_error(y, y64) < TOL[torch.float32]  # bf16 factors are exact in fp32: only fp32 round-off
    assert rel_error(xg.grad, gx64) < TOL[torch.float32]
    for n in ("A", "B", "bias"):
        assert rel_error(getattr(layer, n).grad, g64[n]) < TOL[torch.bfloat16], n  # rounded to bf16 once


def test_functional_op_mixed_dtypes():
    """Outside autocast the op refuses mixed dtypes, naming the tensor; inside it casts them all."""
    x, U, S, Vh, A, B, _ = make_inputs(4, 8, 5, 3, 2, bias=False, seed=3, requires_grad=("A", "B"))
    U, S, Vh = U.bfloat16(), S.bfloat16(), Vh.bfloat16()
    with pytest.raises(TypeError, match=r"U: expected dtype torch.float32 \(x's dtype\), got torch.bfloat16"):
        cersa_kernels.cersa_linear(x, U, S, Vh, A, B)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cersa_kernels.cersa_linear(x, U, S, Vh, A, B)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32


def test_autocast_disabled_region_keeps_fp32():
    layer = _layer()
    x = torch.randn(3, 23)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            y = layer(x)
    assert y.dtype == torch.float32


def test_tiny_bert_under_autocast():
    """A converted (tiny, random) BERT trains a step under CPU bf16 autocast: no dtype error,
    finite loss, fp32 gradients on every trainable tensor."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    cersa_kernels.convert(model, rank=8, delta_rank=4, exclude=["classifier"], max_frozen_ratio=None,
                          progress=False)
    model.classifier.requires_grad_(True)
    ids = torch.randint(0, 50, (3, 11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=torch.tensor([0, 1, 0]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.endswith(".A") for n, _ in trainable)
    for n, p in trainable:
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16/bf16 CUDA autocast)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_cuda(dtype):
    layer = _layer().cuda()
    x = torch.randn(4, 9, 23, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
