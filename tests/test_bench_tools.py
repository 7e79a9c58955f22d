"""Tests of the benchmark tooling in bench/: FLOP formulas, memory accounting, the peak-RSS
method of the memory worker, the benchmark matrix and the report's arithmetic.

The bench/ helpers are measured against the real thing: FLOPs against torch's FlopCounterMode
on the real layers, the memory accounting against the tensors of a real model after a real
AdamW step with PEFT LoRA and cersa_kernels.convert.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import accounting, memory_worker, report, shapes  # noqa: E402
from bench.baselines import build  # noqa: E402


def _counted(fn) -> int:
    """2 x multiply-adds of every matrix product fn runs (forward and backward), counted at the
    ATen level (torch's FlopCounterMode skips the in-place addmm_, so count here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    total = 0

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal total
            pkt = getattr(func, "overloadpacket", None)
            if pkt in (aten.mm, aten.addmm, aten.addmm_):
                a, b = (args[0], args[1]) if pkt is aten.mm else (args[1], args[2])
                total += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            elif pkt in (aten.bmm, aten.baddbmm):
                raise AssertionError(f"unexpected batched product {func}")
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return total


@pytest.mark.parametrize("method", ["dense+lora", "reference", "rebuild", "dense-gemm"])
@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
def test_flops_formula_matches_flop_counter(method, pass_):
    if method == "dense-gemm" and pass_ != "fwd":
        pytest.skip("dense-gemm is forward only")
    shape = shapes.Shape("toy", "toy", 40, 24)
    rank = shapes.Rank(7, "toy")
    case = shapes.Case(method, shape, 5, pass_, None if method in ("dense+lora", "dense-gemm") else rank, k=3)
    layer, x, dy = build(case, "cpu", torch.float32)
    if pass_ == "fwd":
        got = _counted(lambda: layer(x))
    else:
        got = _counted(lambda: layer(x).backward(dy))
    want = shapes.flops(method, 40, 24, 5, pass_, r=7 if case.rank else 0, k=3)
    assert got == want


def test_rho_is_the_flop_ratio_of_the_forward():
    m, n, r, k, N = 384, 1536, 263, 16, 64
    assert shapes.rho(m, n, r, k) == pytest.approx(
        shapes.flops("reference", m, n, N, "fwd", r, k) / shapes.flops("dense-gemm", m, n, N, "fwd"))


class _Toy(nn.Module):
    """Embedding, two blocks (up 40x24, down 24x40, sq 24x24, LayerNorm), a head: like a tiny encoder."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 24)
        self.layers = nn.ModuleList()
        for _ in range(2):
            blk = nn.Module()
            blk.up, blk.down, blk.sq, blk.norm = nn.Linear(24, 40), nn.Linear(40, 24), nn.Linear(24, 24), nn.LayerNorm(24)
            self.layers.append(blk)
        self.head = nn.Linear(24, 3)

    def forward(self, ids):
        h = self.emb(ids)
        for blk in self.layers:
            h = blk.norm(h + blk.down(torch.relu(blk.up(h))) + blk.sq(h))
        return self.head(h.mean(1))


def _train_step_bytes(model: nn.Module) -> dict:
    torch.manual_seed(3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    loss = model(torch.randint(0, 50, (2, 5))).square().sum()
    loss.backward()
    grads = memory_worker.tensor_bytes(p.grad for p in params)
    opt.step()
    everything = list(model.parameters())
    return {"trainable_params": sum(p.numel() for p in params),
            "frozen_params": sum(p.numel() for p in everything if not p.requires_grad),
            "param_bytes": memory_worker.tensor_bytes(everything), "grad_bytes": grads,
            "optimizer_bytes": memory_worker.optimizer_state_bytes(opt)}


@pytest.mark.parametrize("method", ["full", "lora", "cersa"])
def test_accounting_matches_a_real_training_step(method):
    torch.manual_seed(0)
    dense = _Toy()
    rank, k = 12, 4   # sq (24x24) at rank 12 stores 12*49 = 588 >= 576 numbers: stays dense
    predicted = accounting.account(dense, method, k=k, rank_fn=lambda name, m, n: rank)
    model = _Toy()
    model.load_state_dict(dense.state_dict())
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=k, lora_alpha=k, target_modules=["up", "down", "sq"]))
    elif method == "cersa":
        from cersa_kernels.convert import convert

        model = convert(model, rank=rank, delta_rank=k, target_modules=["up", "down", "sq"],
                        backend="reference", progress=False)
        assert len(model.cersa_report.converted) == predicted.converted_layers == 4
        assert predicted.dense_layers == 2
    measured = _train_step_bytes(model)
    got = {key: getattr(predicted, key) for key in measured}
    assert got == measured


def test_accounting_counts_public_architectures():
    # the published totals of the three architectures (meta-device models, no weights read)
    counts = {"BERT-base": 109_482_240, "ViT-B/16": 86_389_248, "LLaMA-7B": 6_738_415_616}
    for arch, total in counts.items():
        acc = accounting.account(accounting.meta_model(arch), "full")
        assert acc.trainable_params == total, arch
        assert acc.total_bytes == 16 * total + 4 * acc.trainable_tensors


def test_accounting_errors_name_the_argument():
    with pytest.raises(ValueError, match="method"):
        accounting.account(_Toy(), "qlora")
    with pytest.raises(ValueError, match="rank_fraction"):
        accounting.account(_Toy(), "cersa")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_peak_rss_reset_forgets_an_earlier_peak():
    memory_worker.trim_heap()
    if not memory_worker.reset_peak_rss():  # start from this process's current size, not an earlier test's peak
        pytest.skip("this kernel does not allow resetting the peak RSS")
    base = memory_worker.hwm_bytes()
    big = torch.ones(64 * 2 ** 20 // 4 * 4)   # 256 MiB, touched
    assert memory_worker.hwm_bytes() >= base + 200 * 2 ** 20
    del big
    memory_worker.trim_heap()
    if not memory_worker.reset_peak_rss():
        pytest.skip("this kernel does not allow resetting the peak RSS")
    assert memory_worker.hwm_bytes() < base + 100 * 2 ** 20


def test_tensor_bytes_counts_shared_tensors_once():
    t = torch.zeros(10, dtype=torch.float64)
    assert memory_worker.tensor_bytes([t, t, None, torch.zeros(3, dtype=torch.float16)]) == 86


def test_ci_plan_runs_every_pass_and_method_and_default_has_the_llama_shapes():
    ci = {p: shapes.cases("ci", ["reference", "cpp"], p) for p in shapes.PASSES}
    for p, cs in ci.items():
        assert {"dense+lora", "reference", "cpp", "rebuild"} <= {c.method for c in cs if not c.skip}, p
    assert "dense-gemm" in {c.method for c in ci["fwd"]}
    fb = shapes.cases("default", ["cpp"], "fwdbwd")
    have = {(c.shape.m, c.shape.n, c.rank.r if c.rank else None, c.N) for c in fb if c.method == "cpp"}
    r93 = {s: shapes.minilm_ranks()[s][0.93].r for s in [(384, 384), (1536, 384)]}
    for N in (1, 16, 512, 4096):
        assert (384, 384, r93[(384, 384)], N) in have
        assert (1536, 384, r93[(1536, 384)], N) in have
    for r in (1024, 2048):
        for N in (1, 16, 512, 4096):
            assert (4096, 4096, r, N) in have


def test_minilm_ranks_are_energy_ranks_of_the_real_weights():
    from cersa_kernels.decompose import truncated_svd

    ranks = shapes.minilm_ranks()
    W = shapes.minilm_weights()["encoder.layer.0.intermediate.dense.weight"]
    r = truncated_svd(W, energy=0.93)[3].rank
    lo, hi = (int(x) for x in ranks[(1536, 384)][0.93].note.split("range ")[1].rstrip(")").split("-"))
    assert lo <= r <= hi
    for shape, by_e in ranks.items():
        rs = [by_e[e].r for e in shapes.MINILM_ENERGIES]
        assert rs == sorted(rs) and 0 < rs[0] < min(shape)


def _fake_json(times: dict) -> dict:
    """A pytest-benchmark JSON with the given (method, N) -> seconds on one shape."""
    shape = shapes.Shape("toy", "layer", 64, 32)
    rank = shapes.Rank(8, "50%")
    benches = []
    for (method, N, pass_), t in times.items():
        c = shapes.Case(method, shape, N, pass_, None if method in ("dense+lora", "dense-gemm") else rank)
        benches.append({"group": c.group, "name": c.id, "extra_info": c.extra_info(),
                        "stats": {"min": t, "median": t, "rounds": 3}})
    return {"benchmarks": benches, "datetime": "2026-01-01T00:00:00", "machine_info": {}}


def test_report_ratios_fastest_backend_and_losses(tmp_path):
    pytest.importorskip("matplotlib", reason="the report's plot needs matplotlib (the 'bench' extra)")
    times = {("dense+lora", 1024, "fwdbwd"): 2.0, ("reference", 1024, "fwdbwd"): 1.0,
             ("cpp", 1024, "fwdbwd"): 0.5, ("rebuild", 1024, "fwdbwd"): 8.0,
             ("dense-gemm", 1024, "fwd"): 0.25,
             ("dense+lora", 1, "fwdbwd"): 1e-4, ("reference", 1, "fwdbwd"): 3e-4, ("cpp", 1, "fwdbwd"): 2e-4}
    data = _fake_json(times)
    rows = report.timing_rows(data)
    idx = report.index(rows)
    text = "\n".join(report.ratio_table(rows, idx, "fwdbwd", report.cersa_methods(rows)))
    rho = f"{shapes.rho(64, 32, 8):.2f}"
    assert f"| 64x32 | 50% r=8 | {rho} | 1024 | 2000.0 | 0.50 | 0.25 | **4.00** | cpp (0.25) |" in text
    _, winners = report.fastest_per_shape(rows, idx, report.cersa_methods(rows))
    assert winners[(64, 32)] == "cpp"
    lost = "\n".join(report.losses(rows, idx, report.cersa_methods(rows)))
    assert "N=1 forward+backward: best CERSA (cpp) 2.00x" in lost and "1024" not in lost
    flops_cpp = shapes.flops("cpp", 64, 32, 1024, "fwdbwd", 8)
    gemm_rate = 2 * 1024 * 64 * 32 / 0.25 / 1e9
    ftab = "\n".join(report.flop_table(rows, idx, report.cersa_methods(rows)))
    assert f"{flops_cpp / 0.5 / 1e9:.1f} ({100 * flops_cpp / 0.5 / 1e9 / gemm_rate:.0f}%)" in ftab
    goals = "\n".join(report.goal_table(rows, idx, report.cersa_methods(rows)))
    ceiling = 3e-4 * gemm_rate * 1e9 / shapes.flops("reference", 64, 32, 1, "fwdbwd", 8)
    assert f"reference/cpp 1.50 >= 1.3: yes (ceiling {ceiling:.2f})" in goals
    report.build_report(data, tmp_path, computed=False)
    assert (tmp_path / "bench.md").read_text().startswith("# cersa_kernels benchmarks")
    assert (tmp_path / "bench.png").stat().st_size > 10_000
