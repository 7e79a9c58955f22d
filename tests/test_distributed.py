"""Converted models inside PyTorch's distributed engines, on the CPU with gloo and 2 processes:
DDP (find_unused_parameters=False), FSDP2 (``fully_shard``: the frozen factors
are sharded as well as the deltas) and FSDP1 (``use_orig_params=True``, since its FlatParameter
needs uniform requires_grad).

One ``torch.multiprocessing.spawn`` runs every scenario (process start-up dominates on 2 cores);
each rank writes its results to a file, and the tests compare them with a single process trained
on the concatenated batch.
"""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import cersa_kernels
from cersa_kernels import CersaLinear

from helpers import param_bytes as _bytes, run_distributed

WORLD = 2
STEPS = 3
PER_RANK = 4  # rows of each rank's half of the global batch
LR = 0.1
# Gradients of the mean loss over 2 x 4 rows, averaged across ranks, vs the mean over 8 rows in one
# process: the same numbers summed in another order, fp32 round-off over 3 SGD steps.
RTOL, ATOL = 1e-5, 1e-6

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


def _small_model() -> nn.Module:
    """Linear 32 -> 48 -> 32, both converted (rank 12 of which 4 moved into the delta by the
    principal init, so A and B are nonzero), dense head 32 -> 5 kept trainable."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 5))
    cersa_kernels.convert(net, rank=12, delta_rank=4, exclude=["4"], max_frozen_ratio=None, progress=False)
    net[4].requires_grad_(True)
    return net


def _minilm_shaped_model() -> nn.Module:
    """CERSA layers with the shapes and energy-0.93 ranks of one MiniLM encoder layer (random factors,
    no SVD): for the per-rank memory figures."""
    torch.manual_seed(1)
    layers = [CersaLinear(384, 384, 190, 16), CersaLinear(384, 384, 190, 16), CersaLinear(384, 384, 200, 16),
              CersaLinear(384, 384, 200, 16), CersaLinear(384, 1536, 260, 16), CersaLinear(1536, 384, 270, 16)]
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.normal_(0, 0.02)
    return nn.Sequential(*layers)


def _batches():
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(WORLD * PER_RANK, 32, generator=g), torch.randint(0, 5, (WORLD * PER_RANK,), generator=g))
            for _ in range(STEPS)]


def _train(net, batches, rows=slice(None)):
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=LR)
    losses = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(x[rows]), y[rows])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _state(net) -> dict:
    """name -> full (unsharded) tensor, on every rank (FSDP2 keeps the module's own names)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in net.named_parameters()}


def _worker(rank: int, world: int, outdir: str) -> dict:
    """One rank's DDP, FSDP2 and FSDP1 runs (in a gloo process group: helpers.run_distributed)."""
    res: dict = {}
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    batches = _batches()
    # --- DDP ---------------------------------------------------------------------------------
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(_small_model(), find_unused_parameters=False)
    res["ddp_losses"] = _train(ddp, batches, rows)
    res["ddp_state"] = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}

    # --- FSDP2 ---------------------------------------------------------------------------------
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    net = _small_model()
    for m in net:
        if isinstance(m, CersaLinear):
            fully_shard(m, mesh=mesh)
    fully_shard(net, mesh=mesh)
    res["fsdp2_placements"] = {n: (type(p).__name__, str(getattr(p, "placements", None)),
                                   tuple(p.shape), tuple(p.to_local().shape), p.requires_grad)
                               for n, p in net.named_parameters()}
    res["fsdp2_losses"] = _train(net, batches, rows)
    res["fsdp2_state"] = _state(net)

    big = _minilm_shaped_model()
    res["mem_full"] = _bytes(big.parameters(), local=False)
    for m in big:
        fully_shard(m, mesh=mesh)
    fully_shard(big, mesh=mesh)
    res["mem_rank"] = _bytes(big.parameters(), local=True)
    x = torch.randn(3, 7, 384)
    loss = big(x).square().mean()
    loss.backward()  # a step on the sharded MiniLM-shaped layers: gradients are sharded too
    res["mem_grad_rank"] = sum(p.grad.to_local().numel() * 4 for p in big.parameters() if p.requires_grad)

    # --- FSDP1 ---------------------------------------------------------------------------------
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    try:
        FSDP(_small_model(), use_orig_params=False, device_id=torch.device("cpu"))
        res["fsdp1_flat_error"] = None
    except Exception as exc:  # expected: mixed requires_grad in one FlatParameter
        res["fsdp1_flat_error"] = f"{type(exc).__name__}: {exc}"
    net1 = FSDP(_small_model(), use_orig_params=True, device_id=torch.device("cpu"))
    res["fsdp1_losses"] = _train(net1, batches, rows)
    with FSDP.summon_full_params(net1):
        res["fsdp1_state"] = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                              for n, p in net1.named_parameters()}
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_worker, WORLD, tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def reference():
    """One process, the concatenated batch of both ranks, the same initial model and optimizer."""
    net = _small_model()
    losses = _train(net, _batches())
    return losses, {n: p.detach().clone() for n, p in net.named_parameters()}


def _assert_state(got: dict, want: dict, what: str):
    assert set(got) == set(want), f"{what}: names {sorted(set(got) ^ set(want))}"
    moved = 0
    for n, t in want.items():
        torch.testing.assert_close(got[n], t, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} {n}: {m}")
        moved += int(not torch.equal(t, _small_model_state()[n]))
    assert moved >= 5  # A, B of both layers and the head changed: the comparison is not vacuous


_INIT: dict = {}


def _small_model_state():
    if not _INIT:
        _INIT.update({n: p.detach().clone() for n, p in _small_model().named_parameters()})
    return _INIT


def test_ddp_matches_single_process(results, reference):
    _, want = reference
    for r, res in enumerate(results):
        _assert_state(res["ddp_state"], want, f"DDP rank {r}")
    # frozen factors never move
    init = _small_model_state()
    for n in init:
        if n.endswith((".U", ".S", ".Vh", ".bias")) and not n.startswith("4."):
            assert torch.equal(results[0]["ddp_state"][n], init[n]), n


def test_fsdp2_shards_frozen_factors_and_deltas(results):
    for res in results:
        pl = res["fsdp2_placements"]
        assert {n.rsplit(".", 1)[1] for n in pl} >= {"U", "S", "Vh", "A", "B", "bias"}
        for n, (kind, placements, full, local, _) in pl.items():
            assert kind == "DTensor" and "Shard(dim=0)" in placements, (n, kind, placements)
            assert local[0] == -(-full[0] // WORLD) or local[0] == full[0] // WORLD, (n, full, local)
            assert local[1:] == full[1:]


def test_fsdp2_matches_single_process(results, reference):
    _, want = reference
    for r, res in enumerate(results):
        _assert_state(res["fsdp2_state"], want, f"FSDP2 rank {r}")


def test_fsdp2_per_rank_memory_drop(results):
    full = results[0]["mem_full"]
    lines = [f"MiniLM-shaped CERSA layers, unsharded: frozen {full['frozen'] / 2**20:.3f} MiB, "
             f"trainable {full['trainable'] / 2**20:.3f} MiB"]
    for r, res in enumerate(results):
        mine = res["mem_rank"]
        lines.append(f"FSDP2 rank {r}: frozen {mine['frozen'] / 2**20:.3f} MiB "
                     f"({mine['frozen'] / full['frozen']:.3f}x), trainable {mine['trainable'] / 2**20:.3f} MiB "
                     f"({mine['trainable'] / full['trainable']:.3f}x), grads {res['mem_grad_rank'] / 2**20:.3f} MiB")
        # each rank holds half of every factor (dim 0 split in 2, rounded up per tensor)
        assert 0.45 < mine["frozen"] / full["frozen"] <= 0.51
        assert 0.45 < mine["trainable"] / full["trainable"] <= 0.51
        assert res["mem_grad_rank"] == mine["trainable"]
    assert sum(res["mem_rank"]["frozen"] for res in results) >= full["frozen"]
    print("\n" + "\n".join(lines), file=sys.stderr)


def test_fsdp1_needs_use_orig_params(results, reference):
    """FSDP1 flattens a unit's parameters into one FlatParameter, which needs uniform requires_grad:
    a converted model (frozen U, S, Vh next to trainable A, B) is refused with use_orig_params=False
    and trains correctly with use_orig_params=True."""
    _, want = reference
    for r, res in enumerate(results):
        err = res["fsdp1_flat_error"]
        assert err is not None and "requires_grad" in err, err
        _assert_state(res["fsdp1_state"], want, f"FSDP1 rank {r}")


def test_losses_agree(results, reference):
    """Each rank's loss is on its own half; their mean is the single-process loss on the whole batch."""
    losses, _ = reference
    for key in ("ddp_losses", "fsdp2_losses", "fsdp1_losses"):
        mean = [sum(res[key][i] for res in results) / WORLD for i in range(STEPS)]
        assert mean == pytest.approx(losses, rel=1e-5), key
