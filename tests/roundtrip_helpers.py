"""Helpers shared by tests/test_roundtrip.py, tests/test_stream.py and tests/test_meta_load.py:
small models with decaying spectra (so energy truncation converts them) and file listings."""
from __future__ import annotations

import os

import torch
from torch import nn


def decaying(shape, seed: int, decay: float = 0.8, dtype=torch.float32) -> torch.Tensor:
    """An (m, n) matrix with singular values decay**i and random orthonormal singular vectors."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    p = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))
    return ((U * decay ** torch.arange(p, dtype=torch.float64)) @ V.T).to(dtype)


def set_decaying(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every nn.Linear / Conv weight of ``model`` a decaying spectrum (in place); returns it."""
    with torch.no_grad():
        for i, mod in enumerate(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))):
            W = mod.weight
            mod.weight.copy_(decaying((W.shape[0], W[0].numel()), seed * 1000 + i).view_as(W))
    return model


class Net(nn.Module):
    """Embedding -> 2 Linear blocks -> head, with LayerNorm: the small model of these tests."""

    def __init__(self, tie: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(40, 32)
        self.up = nn.Linear(32, 48)
        self.down = nn.Linear(48, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 40, bias=False)
        set_decaying(self, seed)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = self.norm(h + self.down(torch.tanh(self.up(h))))
        return self.head(h)


IDS = torch.tensor([[1, 5, 7, 3], [2, 9, 0, 39]])


def x_like(n: int, rows: int = 5, seed: int = 3) -> torch.Tensor:
    return torch.randn(rows, n, generator=torch.Generator().manual_seed(seed))


def perturb_deltas(model: nn.Module, seed: int = 1, scale: float = 0.05) -> nn.Module:
    """Move every trainable tensor away from its init (a 'trained' model); returns it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))
