"""The layers the benchmarks time, built on random data of a Case's shape.

Methods:
  "dense-gemm"  plain x @ W^T (forward only): the machine's dense GEMM rate at this shape.
  "dense+lora"  a frozen dense nn.Linear with the real PEFT LoRA on top (peft.get_peft_model on a
                one-layer module; the PEFT lora.Linear layer is called directly), delta rank k,
                lora_alpha = LORA_ALPHA, no dropout.
  "rebuild"     rebuilds W = U diag(S) Vh + s B A from its factors on every call, then F.linear:
                how SVD-based fine-tuning layers such as SVFT or PEFT's OSF compute.
  <backend>     ``cersa_kernels.cersa_linear(..., backend=<backend>)``: "reference", "cpp", ...
  "qlora"       (bench/bench_qlora.py) QLoRA: the frozen W as bitsandbytes NF4 (Linear4bit, blocks of
                64, double quantization) under the real PEFT LoRA (python/_qlora.make_qlora), delta
                rank k, lora_alpha = LORA_ALPHA; ``qlora_linear``.
Every layer has frozen weights / factors and a trainable delta A (k, n), B (m, k); the input x
requires grad (the layer sits inside a network), so the backward computes dx, dA and dB.
"""
from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .shapes import LORA_ALPHA, Case

BASELINES = ("dense-gemm", "dense+lora", "rebuild")


class RebuildLinear(nn.Module):
    """y = x (U diag(S) Vh + s B A)^T + bias, forming the dense (m, n) W on every call."""

    def __init__(self, U, S, Vh, A, B, bias, scale: float):
        super().__init__()
        self.U = nn.Parameter(U, requires_grad=False)
        self.S = nn.Parameter(S, requires_grad=False)
        self.Vh = nn.Parameter(Vh, requires_grad=False)
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.scale = scale

    def forward(self, x):
        W = torch.addmm(torch.mm(self.U * self.S, self.Vh), self.B, self.A, alpha=self.scale)
        return F.linear(x, W, self.bias)


class _OneLinear(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def peft_lora_linear(weight: torch.Tensor, bias: torch.Tensor, k: int) -> nn.Module:
    """The PEFT LoRA layer (peft.tuners.lora.Linear) wrapping a frozen nn.Linear(weight, bias)."""
    from peft import LoraConfig, get_peft_model

    m, n = weight.shape
    lin = nn.Linear(n, m, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    cfg = LoraConfig(r=k, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=["lin"])
    model = get_peft_model(_OneLinear(lin), cfg, autocast_adapter_dtype=False)
    layer = model.base_model.model.lin
    with torch.no_grad():  # PEFT starts B at zero; a nonzero B makes the work the same as in training
        for p in layer.lora_B.parameters():
            p.normal_(0.0, 0.01)
    return layer


def _import_qlora():
    """python/_qlora.py (the QLoRA front-end helper), imported from the repository's python/ folder."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
    try:
        import _qlora
    finally:
        sys.path.pop(0)
    return _qlora


def qlora_linear(weight: torch.Tensor, bias: torch.Tensor, k: int,
                 compute_dtype: torch.dtype = torch.float32) -> tuple[nn.Module, int]:
    """The PEFT QLoRA layer (peft.tuners.lora.bnb.Linear4bit over bitsandbytes' NF4 Linear4bit with
    double quantization, built by python/_qlora.make_qlora) of a frozen nn.Linear(weight, bias),
    LoRA rank k, lora_alpha LORA_ALPHA, no dropout; and the bytes of its frozen quantized weight.
    Raises ImportError without bitsandbytes (callers skip)."""
    _qlora = _import_qlora()
    m, n = weight.shape
    lin = nn.Linear(n, m, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    model = _qlora.make_qlora(_OneLinear(lin), ["lin"], r=k, alpha=LORA_ALPHA, compute_dtype=compute_dtype)
    layer = model.base_model.model.lin
    with torch.no_grad():  # as peft_lora_linear: a nonzero B, as in training
        for p in layer.lora_B.parameters():
            p.normal_(0.0, 0.01)
    return layer, _qlora.frozen_base_bytes(model)


def build(case: Case, device: torch.device | str, dtype: torch.dtype, seed: int = 0):
    """(layer, x, dy) for a Case: layer(x) -> y (N, m); x (N, n) requires grad; dy (N, m).

    For "dense-gemm" the layer ignores autograd (x is detached inside).
    """
    g = torch.Generator().manual_seed(seed)
    m, n, N, k = case.shape.m, case.shape.n, case.N, case.k
    rnd = lambda *s: torch.randn(*s, generator=g)
    cast = lambda t: t.to(device=device, dtype=dtype).contiguous()
    x = cast(rnd(N, n)).requires_grad_(True)
    dy = cast(rnd(N, m))
    bias = cast(rnd(m) * 0.1)
    scale = LORA_ALPHA / k
    if case.method in ("dense-gemm", "dense+lora"):
        W = cast(rnd(m, n) / math.sqrt(n))
        if case.method == "dense-gemm":
            return (lambda inp: torch.mm(inp.detach(), W.t())), x, dy
        return peft_lora_linear(W, bias, k), x, dy
    r = case.rank.r
    U = cast(rnd(m, r) / math.sqrt(m))
    S = cast(torch.linspace(2.0, 0.1, r))
    Vh = cast(rnd(r, n) / math.sqrt(n))
    A = cast(rnd(k, n) / math.sqrt(n)).requires_grad_(True)
    B = cast(rnd(m, k) * 0.01).requires_grad_(True)
    if case.method == "rebuild":
        return RebuildLinear(U, S, Vh, A.detach(), B.detach(), bias, scale), x, dy
    from cersa_kernels.ops import cersa_linear

    backend = case.method

    def layer(inp):
        return cersa_linear(inp, U, S, Vh, A, B, bias, scale, backend=backend)

    return layer, x, dy
