"""Models with quantized frozen factors (``convert(..., quantize="int8" | "nf4")``) inside PyTorch's
distributed engines, on the CPU with gloo and 2 processes: DDP and FSDP2 (``fully_shard``).

The codes and block scales of a ``QuantizedMatrix`` are frozen nn.Parameters (cersa_kernels/quant.py),
so FSDP2 shards them along dim 0 like every other parameter (uint8 / int8 codes next to float32
scales in one group) and all-gathers them for the layer's forward and backward; DDP broadcasts them
at construction and reduces only the trainable deltas.  One ``torch.multiprocessing.spawn`` runs every
scenario (process start-up dominates on 2 cores); each rank writes its results to a file and the
tests compare them with one process on the concatenated batch.

Every rank starts from the same converted model, converted once in the test process and loaded by
each rank (as from one checkpoint).  Converting on each rank instead is not safe under FSDP2: the
SVD of the same weight in another process (thread count, memory alignment) may return a singular
vector with the other sign or other last bits, and since FSDP2 keeps each rank's own shard of
every tensor, the sharded model would mix rows of two different factorizations; quantization
turns such differences into different codes (NF4 is not symmetric about 0).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

import cersa_kernels
from cersa_kernels import CersaLinear
from cersa_kernels.quant import QuantizedMatrix

from helpers import param_bytes as _bytes, run_distributed

WORLD = 2
STEPS = 3
PER_RANK = 4  # rows of each rank's half of the global batch
LR = 0.1
# Mean loss over 2 x 4 rows averaged across ranks vs the mean over 8 rows in one process: the same
# numbers summed in another order; the decoded factors are identical (the codes are integers and
# the scales are copied), so the bounds are fp32 round-off over 3 SGD steps.
RTOL, ATOL = 1e-5, 1e-6
#: (label, convert options) of the storage formats checked.
FORMATS = [("nf4", dict(quantize="nf4", double_quant=True)), ("int8", dict(quantize="int8"))]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


def _small_model(opts: dict, state: dict | None = None) -> nn.Module:
    """Linear 32 -> 48 -> 32, both converted with quantized factors (rank 12, 4 components moved into
    the delta by the principal init, blocks of 16 so that every factor has several blocks), dense
    head 32 -> 5 kept trainable; then ``state`` (a state_dict of such a model) loaded when given."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 5))
    cersa_kernels.convert(net, rank=12, delta_rank=4, exclude=["4"], max_frozen_ratio=None, progress=False,
                          quant_block_size=16, **opts)
    net[4].requires_grad_(True)
    if state is not None:
        net.load_state_dict(state, strict=True)
    return net


def _init_path(outdir, label: str) -> str:
    return os.path.join(str(outdir), f"init_{label}.pt")


def _minilm_shaped_model(opts: dict) -> nn.Module:
    """Quantized CERSA layers with the shapes and energy-0.93 ranks of one MiniLM encoder layer (random
    orthonormal factors, no SVD): for the per-rank memory figures."""
    g = torch.Generator().manual_seed(1)
    layers = []
    for m, n, r in [(384, 384, 190), (384, 384, 190), (384, 384, 200), (384, 384, 200), (1536, 384, 270),
                    (384, 1536, 260)]:
        U = torch.linalg.qr(torch.randn(m, r, generator=g))[0]
        Vh = torch.linalg.qr(torch.randn(n, r, generator=g))[0].T
        S = torch.linspace(2.0, 0.1, r)
        layers.append(CersaLinear.from_factors(U, S, Vh, torch.zeros(m), delta_rank=16, **opts))
    return nn.Sequential(*layers)


def _batches():
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(WORLD * PER_RANK, 32, generator=g), torch.randint(0, 5, (WORLD * PER_RANK,), generator=g))
            for _ in range(STEPS)]


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _train(net, batches, rows=slice(None)):
    """SGD steps on ``rows`` of each batch; returns (losses, outputs of the first step, gradients of
    the first step by name (full tensors))."""
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=LR)
    losses, first_out, first_grads = [], None, None
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        out = net(x[rows])
        loss = nn.functional.cross_entropy(out, y[rows])
        loss.backward()
        if first_grads is None:
            first_out = _full(out)
            first_grads = {n: _full(p.grad) for n, p in _named(net) if p.grad is not None}
        opt.step()
        losses.append(float(loss.detach()))
    return losses, first_out, first_grads


def _named(net):
    """named_parameters of the model inside a DDP wrapper (FSDP2 keeps the module's own names)."""
    return getattr(net, "module", net).named_parameters()


def _state(net) -> dict:
    """name -> full (unsharded) tensor, on every rank."""
    return {n: _full(p) for n, p in _named(net)}


def _worker(rank: int, world: int, outdir: str) -> dict:
    """One rank's DDP and FSDP2 runs of every format (in a gloo process group: helpers.run_distributed)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    res: dict = {}
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    batches = _batches()
    mesh = init_device_mesh("cpu", (world,))
    for label, opts in FORMATS:
        init = torch.load(_init_path(outdir, label))
        # --- DDP -----------------------------------------------------------------------------
        ddp = DDP(_small_model(opts, init), find_unused_parameters=False)
        res[f"{label}/ddp"] = _train(ddp, batches, rows) + (_state(ddp),)

        # --- FSDP2: every CERSA layer its own group, then the root ----------------------------
        net = _small_model(opts, init)
        for m in net:
            if isinstance(m, CersaLinear):
                fully_shard(m, mesh=mesh)
        fully_shard(net, mesh=mesh)
        res[f"{label}/fsdp2_placements"] = {
            n: (type(p).__name__, str(getattr(p, "placements", None)), tuple(p.shape),
                tuple(p.to_local().shape), p.dtype, p.requires_grad) for n, p in net.named_parameters()}
        res[f"{label}/fsdp2"] = _train(net, batches, rows) + (_state(net),)

        # --- FSDP2 on MiniLM-shaped quantized layers: what each rank holds -------------------
        big = _minilm_shaped_model(opts)
        res[f"{label}/mem_full"] = _bytes(big.parameters(), local=False)
        for m in big:
            fully_shard(m, mesh=mesh)
        fully_shard(big, mesh=mesh)
        res[f"{label}/mem_rank"] = _bytes(big.parameters(), local=True)
        big(torch.randn(3, 7, 384)).square().mean().backward()
        res[f"{label}/mem_grad_rank"] = sum(p.grad.to_local().numel() * 4 for p in big.parameters()
                                            if p.requires_grad)
    return res


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(folder of the initial models, [each rank's results])."""
    outdir = tmp_path_factory.mktemp("qdist")
    for label, opts in FORMATS:  # converted once: every rank and the reference load the same model
        torch.save(_small_model(opts).state_dict(), _init_path(outdir, label))
    return outdir, run_distributed(_worker, WORLD, outdir)


def _reference(outdir, label: str):
    """One process, the concatenated batch of both ranks, the same initial model and optimizer:
    (losses, outputs and gradients of the first step, final state, initial state)."""
    net = _small_model(dict(FORMATS)[label], torch.load(_init_path(outdir, label)))
    init = _state(net)
    return _train(net, _batches()) + (_state(net), init)


def _assert_close_dicts(got: dict, want: dict, what: str):
    assert set(got) == set(want), f"{what}: names {sorted(set(got) ^ set(want))}"
    for n, t in want.items():
        if t.is_floating_point():
            torch.testing.assert_close(got[n], t, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} {n}: {m}")
        else:  # codes: exactly the same integers
            assert torch.equal(got[n], t), f"{what} {n}"


def _check_run(run, key: str, label: str):
    outdir, results = run
    losses, out, grads, state, init = _reference(outdir, label)
    assert {n for n in grads} >= {"0.A", "0.B", "2.A", "2.B", "4.weight", "4.bias"}
    assert not any(".codes" in n or "absmax" in n for n in grads)  # the codes are frozen: no gradient
    for r, res in enumerate(results):
        got_losses, got_out, got_grads, got_state = res[key]
        # forward: each rank's rows of the single-process output
        torch.testing.assert_close(got_out, out[r * PER_RANK:(r + 1) * PER_RANK], rtol=RTOL, atol=ATOL)
        # backward: the gradients averaged over the ranks are the single-process ones
        _assert_close_dicts(got_grads, grads, f"{key} rank {r} first-step gradient")
        _assert_close_dicts(got_state, state, f"{key} rank {r} state after {STEPS} steps")
    # the comparison is not vacuous: A, B and the head moved; the codes and scales did not
    for n, t in init.items():
        moved = not torch.equal(state[n], t)
        assert moved == (n.endswith((".A", ".B")) or n.startswith("4.")), n
    mean = [sum(res[key][0][i] for res in results) / WORLD for i in range(STEPS)]
    assert mean == pytest.approx(losses, rel=1e-5), key


@pytest.mark.parametrize("label", [f for f, _ in FORMATS])
def test_ddp_with_quantized_factors_matches_single_process(run, label):
    net = _small_model(dict(FORMATS)[label])
    assert isinstance(net[0].U, QuantizedMatrix) and net[0].quantize == label
    _check_run(run, f"{label}/ddp", label)


@pytest.mark.parametrize("label", [f for f, _ in FORMATS])
def test_fsdp2_with_quantized_factors_matches_single_process(run, label):
    _check_run(run, f"{label}/fsdp2", label)


@pytest.mark.parametrize("label", [f for f, _ in FORMATS])
def test_fsdp2_shards_the_codes_and_scales(run, label):
    """Every parameter, the uint8 / int8 codes and float32 scales included, is a DTensor sharded on
    dim 0 (each rank half, rounded up or down)."""
    _, results = run
    want = {"U.codes", "Vh.codes"} | ({"U.absmax_codes", "U.absmax_scales", "U.absmax_offset"}
                                       if label == "nf4" else {"U.absmax"})
    code_dtype = torch.uint8 if label == "nf4" else torch.int8
    for res in results:
        pl = res[f"{label}/fsdp2_placements"]
        assert {n.split(".", 1)[1] for n in pl if n.startswith("0.")} >= want | {"S", "A", "B", "bias"}
        for n, (kind, placements, full, local, dtype, requires_grad) in pl.items():
            assert kind == "DTensor" and "Shard(dim=0)" in placements, (n, kind, placements)
            assert local[0] in (-(-full[0] // WORLD), full[0] // WORLD), (n, full, local)
            assert local[1:] == full[1:]
            if n.endswith(".codes"):
                assert dtype == code_dtype and not requires_grad, (n, dtype)


@pytest.mark.parametrize("label", [f for f, _ in FORMATS])
def test_fsdp2_quantized_frozen_bytes_per_rank_drop_by_the_world_size(run, label):
    _, results = run
    full = results[0][f"{label}/mem_full"]
    lines = [f"{label} MiniLM-shaped CERSA layers, unsharded: frozen {full['frozen'] / 2**20:.3f} MiB, "
             f"trainable {full['trainable'] / 2**20:.3f} MiB"]
    for r, res in enumerate(results):
        mine = res[f"{label}/mem_rank"]
        lines.append(f"FSDP2 rank {r}: frozen {mine['frozen'] / 2**20:.3f} MiB "
                     f"({mine['frozen'] / full['frozen']:.3f}x), "
                     f"trainable {mine['trainable'] / 2**20:.3f} MiB ({mine['trainable'] / full['trainable']:.3f}x)")
        assert 0.45 < mine["frozen"] / full["frozen"] <= 0.51
        assert 0.45 < mine["trainable"] / full["trainable"] <= 0.51
        assert res[f"{label}/mem_grad_rank"] == mine["trainable"]
    assert sum(res[f"{label}/mem_rank"]["frozen"] for res in results) >= full["frozen"]
    # the frozen bytes are the codes: well under the float32 factors they stand for
    big = _minilm_shaped_model(dict(FORMATS)[label])
    fp32 = sum((l.out_features + l.in_features + 1) * l.frozen_rank * 4 for l in big)
    assert full["frozen"] < (0.15 if label == "nf4" else 0.28) * fp32 + sum(l.out_features * 4 for l in big)
    print("\n" + "\n".join(lines), file=sys.stderr)
