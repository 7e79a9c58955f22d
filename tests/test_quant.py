"""Quantized frozen factors (cersa_kernels.quant, convert(quantize=...)): the codes, the op with
QuantizedMatrix factors against a float64 dense reference built from the dequantized factors, the
layers, save / load, dtype moves, bad input.

Tolerances: the reference uses exactly the dequantized factors the op decodes, so the op's error is
that of the backend's own arithmetic: TOL of conftest per dtype."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import cersa_kernels as ck
from conftest import cpu_backends
from cersa_kernels.quant import DOUBLE_QUANT_BLOCK, QuantizedMatrix, nf4_levels

#: NF4 levels as published with QLoRA (Dettmers et al. 2023, appendix E), to 8 digits.
NF4_PUBLISHED = [-1.0, -0.6961928, -0.52507305, -0.39491749, -0.28444138, -0.18477343, -0.09105004, 0.0,
                 0.0795803, 0.1609302, 0.2461123, 0.33791524, 0.44070983, 0.562617, 0.72295684, 1.0]
KINDS = [("int8", False), ("nf4", False), ("nf4", True), ("int8", True)]
CPU_BACKENDS = cpu_backends(include_interpreted_triton=False)


def test_nf4_levels_are_the_published_code():
    assert torch.allclose(nf4_levels(torch.float64), torch.tensor(NF4_PUBLISHED, dtype=torch.float64), atol=1e-7)
    assert float(nf4_levels()[7]) == 0.0


@pytest.mark.parametrize("quant_type,double_quant", KINDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (65, 3), (100, 37), (17, 130)])
def test_codes_bound_the_error_per_block(quant_type, double_quant, shape):
    """Each number is within half a code step of its block's absmax grid (int8: absmax/254; nf4: half the
    widest gap of the levels), plus the rounding of a double-quantized scale."""
    g = torch.Generator().manual_seed(sum(shape))
    W = torch.randn(*shape, generator=g) * torch.logspace(0, -2, shape[1])
    q = QuantizedMatrix.quantize(W, quant_type, 64, double_quant)
    D = q.dequantize(torch.float32)
    assert D.shape == W.shape and D.dtype == torch.float32
    flat_err = (D - W).reshape(-1)
    pad = (-W.numel()) % 64
    absmax = torch.cat([W.reshape(-1).abs(), W.new_zeros(pad)]).view(-1, 64).amax(1)
    step = 1 / 254 if quant_type == "int8" else float((nf4_levels()[1:] - nf4_levels()[:-1]).max()) / 2
    bound = (absmax * step).repeat_interleave(64)[:W.numel()]
    if double_quant:  # the decoded scale differs from the true absmax by at most half its int8 step
        scale_err = (q.scales() - absmax).abs().repeat_interleave(64)[:W.numel()]
        bound = bound + scale_err + 1e-7
    assert bool((flat_err.abs() <= bound * (1 + 1e-5) + 1e-12).all())
    bits = {"int8": 8, "nf4": 4}[quant_type]
    expect = bits + (8 / 64 + 32 / (64 * DOUBLE_QUANT_BLOCK) if double_quant else 32 / 64)
    if W.numel() >= 64 * DOUBLE_QUANT_BLOCK:
        assert abs(q.bits_per_number() - expect) < 0.05


def test_nf4_codes_pack_two_per_byte_low_nibble_first():
    W = torch.tensor([[nf4_levels()[3].item(), nf4_levels()[12].item(), 1.0]])
    q = QuantizedMatrix.quantize(W, "nf4", 4)
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == 2
    assert int(q.codes[0]) == 3 | (12 << 4) and int(q.codes[1]) & 15 == 15
    assert torch.allclose(q.dequantize(), W)


def _factors(N, n, m, r, k, dtype, quant_type, double_quant, *, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, N, n, generator=g).to(dtype)
    Uq = QuantizedMatrix.quantize(torch.linalg.qr(torch.randn(m, r, generator=g))[0], quant_type, 32, double_quant,
                                  dtype=dtype)
    Vhq = QuantizedMatrix.quantize(torch.linalg.qr(torch.randn(n, r, generator=g))[0].T.contiguous(), quant_type, 32,
                                   double_quant, dtype=dtype)
    S = (torch.rand(r, generator=g) + 0.5).to(dtype)
    A = (0.1 * torch.randn(k, n, generator=g)).to(dtype)
    B = (0.1 * torch.randn(m, k, generator=g)).to(dtype)
    bias = torch.randn(m, generator=g).to(dtype)
    return x, Uq, S, Vhq, A, B, bias


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("quant_type,double_quant", KINDS[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("N,n,m,r,k,lead", [(7, 45, 33, 13, 4, ()), (1, 30, 70, 9, 3, ()), (0, 20, 12, 5, 2, ()),
                                            (5, 40, 24, 11, 4, (2,))])
def test_op_matches_dense_reference(backend, quant_type, double_quant, dtype, N, n, m, r, k, lead,
                                    dense_reference, rel_error, tol):
    x, Uq, S, Vhq, A, B, bias = _factors(N, n, m, r, k, dtype, quant_type, double_quant, lead=lead)
    U, Vh = Uq.dequantize(dtype), Vhq.dequantize(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (x, S, A, B, bias)]
    xl, Sl, Al, Bl, bl = leaves
    y = ck.cersa_linear(xl, Uq, Sl, Vhq, Al, Bl, bl, scale=0.7, backend=backend)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(dy)
    ref = dense_reference(x, U, S, Vh, A, B, bias, scale=0.7, dy=dy)
    bound = tol[dtype] * (4 if dtype == torch.bfloat16 else 1)
    assert y.dtype == dtype and rel_error(y, ref["y"]) <= bound
    for name, leaf in zip(("x", "S", "A", "B", "bias"), leaves):
        assert leaf.grad is not None and leaf.grad.dtype == dtype, name
        assert rel_error(leaf.grad, ref[name]) <= bound, name


def test_op_non_contiguous_input_and_no_dense_factor_saved():
    """x transposed in memory; the autograd graph saves no (m, r) or (r, n) dense factor."""
    x, Uq, S, Vhq, A, B, bias = _factors(9, 40, 36, 12, 3, torch.float32, "nf4", True)
    xt = x.t().contiguous().t().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ck.cersa_linear(xt, Uq, S, Vhq, A.requires_grad_(True), B.requires_grad_(True), bias)
    assert (36, 12) not in saved and (12, 40) not in saved
    y.sum().backward()
    U, Vh = Uq.dequantize(), Vhq.dequantize()
    W = (U * S) @ Vh + B.detach() @ A.detach()
    assert torch.allclose(y, xt.detach() @ W.T + bias, atol=1e-5)
    assert torch.allclose(xt.grad, torch.ones_like(y) @ W, atol=1e-5)


def test_gradcheck_with_quantized_factors():
    x, Uq, S, Vhq, A, B, bias = _factors(4, 10, 8, 3, 2, torch.float64, "int8", False)
    Uq.dtype = Vhq.dtype = torch.float64
    torch.autograd.gradcheck(lambda x, S, A, B, b: ck.cersa_linear(x, Uq, S, Vhq, A, B, b, scale=0.5,
                                                                   backend="reference"),
                             tuple(t.clone().requires_grad_(True) for t in (x, S, A, B, bias)))


def _toy(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(48, 40), nn.GELU(), nn.Linear(40, 24), nn.Conv2d(3, 6, 3), nn.MultiheadAttention(16, 2))
    return m


@pytest.mark.parametrize("quant_type,double_quant", KINDS[:3])
def test_convert_quantized_layers_compute_their_dequantized_factors(quant_type, double_quant, tmp_path):
    model = _toy()
    ck.convert(model, energy=0.9, delta_rank=3, quantize=quant_type, double_quant=double_quant, progress=False,
               max_frozen_ratio=None)
    layers = [model[0], model[2], model[3], model[4].in_proj, model[4].out_proj]
    assert all(lay.quantize == quant_type and isinstance(lay.U, QuantizedMatrix) for lay in layers)
    lin = model[0]
    x = torch.randn(5, 48, dtype=torch.float64)
    U, S, Vh = lin.dequantized_factors(torch.float64)
    W = (U * S) @ Vh + lin.scale * lin.B.detach().double() @ lin.A.detach().double()
    assert torch.allclose(lin(x.float()).double(), x @ W.T + lin.bias.double(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(lin.merged_weight().double(), W, atol=1e-6)
    rep = ck.get_report(model)
    assert all(0 < l.frozen_bytes < l.dense_bytes for l in rep.converted)
    # save / load: the codes are what is stored; loading neither decomposes nor quantizes again
    path = tmp_path / "q.safetensors"
    ck.save(model, path)
    fresh = _toy(seed=1)
    orig = QuantizedMatrix.quantize
    QuantizedMatrix.quantize = classmethod(lambda *a, **k: pytest.fail("load re-quantized"))
    try:
        ck.load(path, fresh)
    finally:
        QuantizedMatrix.quantize = orig
    xi, a = torch.randn(2, 3, 8, 8), torch.randn(4, 2, 16)
    for got, want in ((fresh[0](x.float()), lin(x.float())), (fresh[3](xi), model[3](xi)),
                      (fresh[4](a, a, a)[0], model[4](a, a, a)[0])):
        assert torch.equal(got, want)
    adapter = tmp_path / "adapter.safetensors"
    ck.save_adapter(model, adapter)
    ck.load_adapter(adapter, fresh)
    # dtype moves keep the float32 scales; merge gives dense layers in the model's dtype
    moved = copy.deepcopy(model).to(torch.bfloat16)
    scales = moved[0].U.absmax_scales if double_quant else moved[0].U.absmax
    assert scales.dtype == torch.float32 and moved[0].U.dtype == torch.bfloat16
    assert moved[0](x.bfloat16()).dtype == torch.bfloat16
    ck.merge(moved)
    assert type(moved[0]) is nn.Linear and moved[0].weight.dtype == torch.bfloat16


def test_unquantized_files_still_load(tmp_path):
    model = _toy()
    ck.convert(model, energy=0.9, delta_rank=3, progress=False, max_frozen_ratio=None)
    path = tmp_path / "plain.safetensors"
    ck.save(model, path)
    fresh = _toy(seed=2)
    ck.load(path, fresh)
    assert fresh[0].quantize is None and isinstance(fresh[0].U, nn.Parameter)


@pytest.mark.parametrize("kw,exc,pattern", [
    ({"quantize": "fp4"}, ValueError, r"^quantize: expected None or one of \('int8', 'nf4'\), got 'fp4'"),
    ({"quantize": "nf4", "quant_block_size": 48}, ValueError, r"^quant_block_size: expected a power of two >= 2, got 48"),
    ({"quantize": "nf4", "quant_block_size": 1}, ValueError, r"^quant_block_size: .*got 1"),
    ({"quantize": "int8", "quant_block_size": 64.0}, TypeError, r"^quant_block_size: .*float 64.0"),
])
def test_bad_quantize_arguments_leave_the_model_unchanged(kw, exc, pattern):
    model = _toy()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=pattern):
        ck.convert(model, energy=0.9, progress=False, **kw)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(model, "cersa_report")


def test_quantizing_a_non_floating_matrix_is_refused():
    with pytest.raises(TypeError, match=r"^W: expected a 2-D floating tensor"):
        QuantizedMatrix.quantize(torch.ones(4, 4, dtype=torch.int32), "nf4")
    with pytest.raises(ValueError, match=r"^W: expected finite values"):
        QuantizedMatrix.quantize(torch.full((2, 2), float("nan")), "int8")
