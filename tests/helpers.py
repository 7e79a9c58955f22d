"""Models and checks shared by several test files: weights of a given spectrum, the toy model of the
conversion and I/O tests, the snapshot that bad-input tests compare a model with, and the gloo
process group the distributed tests run their workers in.

The fixtures, the float64 op reference and the factory of the op's random inputs are in
tests/conftest.py.
"""
from __future__ import annotations

import datetime
import os
import socket
from typing import Callable

import pytest
import torch
from torch import nn


def spectrum_matrix(m: int, n: int, sigmas, *, seed: int = 0, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """U diag(sigmas) V^T (m, n) with random orthonormal U (m, p) and V (n, p), p = len(sigmas) <=
    min(m, n): a weight whose singular values are ``sigmas``.

    Made in float64 (U, V from the QR of N(0, 1) matrices drawn from ``generator``, by default a new
    one seeded with ``seed``: U first, then V), then cast to ``dtype``.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    p = s.numel()
    U, _ = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))
    return ((U * s) @ V.t()).to(dtype)


def set_decaying_spectrum(lin: nn.Linear, seed: int, decay: float = 0.7) -> None:
    """Give ``lin`` a weight of singular values decay^i, i = 0 .. min(m, n) - 1 (in place)."""
    m, n = lin.weight.shape
    sigmas = decay ** torch.arange(min(m, n), dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(spectrum_matrix(m, n, sigmas, seed=seed))


# ------------------------------------------------------------------------------------ toy model
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(32, 32)
        self.ffn = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        return self.norm(x + self.ffn(self.q(x)))


class Toy(nn.Module):
    """7 nn.Linear (decaying spectra, so energy truncation saves memory), LayerNorms, a depthwise conv.
    Input (..., 32), output (..., 5); the same ``seed`` gives the same weights."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(32, 5)
        self.dw = nn.Conv2d(4, 4, 3, groups=4, padding=1)
        for i, mod in enumerate(m for m in self.modules() if isinstance(m, nn.Linear)):
            set_decaying_spectrum(mod, seed * 100 + i)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


#: The names of Toy's nn.Linear layers.
LINEARS = ["blocks.0.q", "blocks.0.ffn.0", "blocks.0.ffn.2", "blocks.1.q", "blocks.1.ffn.0", "blocks.1.ffn.2",
           "head"]


# ---------------------------------------------------------------------------- nothing half-done
def snapshot(model: nn.Module) -> dict:
    """Everything a call that fails must leave as it was: the module under every name (the object and
    its type), every tensor of the state dict (a copy; meta tensors as they are), every parameter's
    requires_grad and the conversion report (``cersa_report``, None without one)."""
    return {
        "modules": dict(model.named_modules()),
        "types": {n: type(m) for n, m in model.named_modules()},
        "state": {k: v if v.is_meta else v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "report": getattr(model, "cersa_report", None),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """``model`` is as ``snapshot`` recorded it: the same module objects of the same types under the
    same names, the same report object, the same requires_grad flags, and every tensor of the same
    dtype, device and shape with the same values bit for bit (NaN where there was NaN; meta tensors by
    dtype and shape)."""
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["modules"].keys() == before["modules"].keys()
    for name, mod in before["modules"].items():
        assert after["modules"][name] is mod, f"{name!r} was replaced"
    assert after["grad"] == before["grad"]
    assert after["report"] is before["report"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        w = after["state"][k]
        assert (w.dtype, w.device, w.shape) == (v.dtype, v.device, v.shape), k
        if not v.is_meta:
            torch.testing.assert_close(w, v, rtol=0, atol=0, equal_nan=True, msg=lambda m, k=k: f"{k}: {m}")


def parse_frontend(front_end, argv, monkeypatch, steps_env=None):
    """(parser, args) of a front end's command line ``argv`` after the runner's checks, with the
    STEPS environment variable unset (or set to ``steps_env``) for the call."""
    import _frontend

    if steps_env is None:
        monkeypatch.delenv("STEPS", raising=False)
    else:
        monkeypatch.setenv("STEPS", steps_env)
    parser = _frontend.build_parser(front_end)
    args = parser.parse_args(argv)
    _frontend.check_args(front_end, parser, args)
    return parser, args


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def param_bytes(params, local: bool) -> dict:
    """{"frozen": bytes, "trainable": bytes} of ``params``; local: count each DTensor's local shard."""
    out = {"frozen": 0, "trainable": 0}
    for p in params:
        t = p.to_local() if local and hasattr(p, "to_local") else p
        out["trainable" if p.requires_grad else "frozen"] += t.numel() * t.element_size()
    return out


def _gloo_entry(rank: int, body: Callable[[int, int, str], dict], world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=180))
    path = os.path.join(outdir, f"rank{rank}.pt")
    try:
        res = body(rank, world, outdir)
        dist.barrier()
    except BaseException:  # report, then let spawn see the failure
        import traceback

        torch.save({"error": traceback.format_exc()}, path)
        raise
    else:
        torch.save(res, path)
    finally:
        dist.destroy_process_group()


def run_distributed(body: Callable[[int, int, str], dict], world: int, outdir) -> list[dict]:
    """Run ``body(rank, world, outdir) -> results`` in ``world`` spawned processes joined in a gloo
    process group on 127.0.0.1 (one torch thread each, 180 s timeout); returns each rank's results.
    body must be a module-level function (spawn pickles it).  A failing rank fails the calling test
    with every rank's traceback."""
    import torch.multiprocessing as mp

    outdir = str(outdir)
    try:
        mp.spawn(_gloo_entry, args=(body, world, free_port(), outdir), nprocs=world, join=True)
    except Exception as exc:
        msgs = [torch.load(os.path.join(outdir, f"rank{r}.pt")).get("error", "") for r in range(world)
                if os.path.exists(os.path.join(outdir, f"rank{r}.pt"))]
        pytest.fail(f"distributed workers failed: {exc}\n" + "\n".join(msgs))
    return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(world)]
