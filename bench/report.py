"""Turn one ``pytest bench/ --benchmark-json=FILE`` run into results/bench.md and results/bench.png.

    python bench/report.py results/bench.json --out results

Reads the pytest-benchmark JSON (microbenchmarks of bench/bench_linear.py and the MiniLM
memory runs of bench/bench_memory.py, whose numbers live in each benchmark's extra_info), adds
the memory accounting computed from shapes (bench/accounting.py, labelled "computed"), and
writes:
  bench.md   stamp (date, machine, commit, load), shapes and ranks with rho = (r+k)(m+n)/(mn),
             time ratios to dense+LoRA per shape / rank / N, forward and backward alone,
             achieved GFLOP/s vs the plain dense GEMM, the fastest backend per shape, the
             goals per backend, where CERSA loses and why, measured and computed memory.
  bench.png  time ratio to dense+LoRA vs N per shape (forward+backward), and memory per method.
Times are the minimum over rounds (the least disturbed measurement on a shared machine);
every ratio divides two times of the same run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make "bench" importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shapes import PASS_TITLES, rho  # noqa: E402

BASELINES = ("dense-gemm", "dense+lora", "rebuild")
MiB = 2 ** 20
GiB = 2 ** 30


# ------------------------------------------------------------------------------- loading

def load(*paths: str | os.PathLike) -> dict:
    """One pytest-benchmark JSON, or several merged: a benchmark (by fullname) in a later file
    replaces the same one from an earlier file (e.g. a rerun of some groups); the machine info,
    date and commit are the last file's, and ``sources`` lists the files with their dates."""
    merged: dict = {}
    benches: dict[str, dict] = {}
    sources = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for b in data.get("benchmarks", []):
            benches[b.get("fullname", b["name"])] = b
        sources.append(f"{Path(path).name} ({len(data.get('benchmarks', []))} benchmarks, "
                       f"{data.get('datetime', '?')[:16]})")
        merged.update({k: v for k, v in data.items() if k != "benchmarks"})
    merged["benchmarks"] = list(benches.values())
    merged["sources"] = sources
    return merged


def timing_rows(data: dict) -> list[dict]:
    """One dict per microbenchmark: extra_info + t (seconds, min over rounds) + rounds."""
    rows = []
    for b in data.get("benchmarks", []):
        ei = b.get("extra_info") or {}
        if ei.get("kind") == "memory" or "m" not in ei or "method" not in ei:
            continue
        st = b["stats"]
        rows.append(dict(ei, t=st["min"], median=st["median"], rounds=st["rounds"], name=b["name"]))
    return rows


def memory_rows(data: dict) -> list[dict]:
    return [dict(b["extra_info"], wall_s=b["stats"]["min"]) for b in data.get("benchmarks", [])
            if (b.get("extra_info") or {}).get("kind") == "memory"]


def index(rows: list[dict]) -> dict:
    """(m, n, N, pass, method, r) -> row; r None for dense-gemm and dense+lora."""
    out = {}
    for row in rows:
        r = None if row["method"] in ("dense-gemm", "dense+lora") else row["r"]
        out[(row["m"], row["n"], row["N"], row["pass"], row["method"], r)] = row
    return out


def cersa_methods(rows: list[dict]) -> list[str]:
    names = sorted({r["method"] for r in rows if r["method"] not in BASELINES},
                   key=lambda b: (b != "reference", b))
    return names


def shapes_in(rows: list[dict]) -> list[tuple]:
    """(family, layer, m, n) in first-seen order."""
    seen = {}
    for r in rows:
        seen.setdefault((r["m"], r["n"]), (r["family"], r["layer"], r["m"], r["n"]))
    return list(seen.values())


def ranks_in(rows: list[dict], m: int, n: int) -> list[tuple[int, str, str]]:
    found = {}
    for r in rows:
        if r["m"] == m and r["n"] == n and r.get("r") is not None:
            found[r["r"]] = (r["r"], r["rank_label"], r.get("rank_note", ""))
    return [found[k] for k in sorted(found)]


def gflops(row: dict | None) -> float | None:
    if not row or not row["t"]:
        return None
    return row["flops"] / row["t"] / 1e9


# ------------------------------------------------------------------------------- stamping

def git_commit(root: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    if not sha:
        return "none (no commit yet)"
    return sha + (" (with uncommitted changes)" if dirty else "")


def stamp(data: dict, root: Path) -> list[str]:
    mi = data.get("machine_info", {})
    c = mi.get("cersa", {})
    ci = data.get("commit_info", {}) or {}
    commit = ci.get("id")
    commit = (commit[:10] + (" (dirty)" if ci.get("dirty") else "")) if commit else git_commit(root)
    mem = c.get("memory_bytes")
    load_s, load_e = c.get("loadavg_start"), c.get("loadavg_end")
    fmt_load = lambda l: "?" if not l else f"{l[0]:.2f}"
    lines = [
        f"- from: {'; '.join(data['sources'])} (a later file's benchmarks replace the same ones of an "
        f"earlier file)" if len(data.get("sources", [])) > 1 else f"- from: {', '.join(data.get('sources', ['?']))}",
        f"- date: {data.get('datetime', '?')} (report written {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        f"- machine: {c.get('cpu_model', mi.get('cpu', {}).get('brand_raw', '?'))}, {c.get('cores', '?')} cores"
        + (f", {mem / GiB:.0f} GiB RAM" if mem else "") + (f", GPU {c['gpu']}" if c.get("gpu") else "")
        + f"; torch {c.get('torch', '?')} with {c.get('torch_threads', '?')} threads; Python {c.get('python', '?')}",
        f"- commit: {commit}",
        f"- settings: size `{c.get('bench_size', '?')}`, device {c.get('bench_device', '?')}, dtype "
        f"{c.get('bench_dtype', '?')}, about {c.get('bench_budget_s', '?')} s of rounds per benchmark; "
        f"backends available: {', '.join(c.get('backends', [])) or '?'}",
        f"- 1-minute load average at start / end: {fmt_load(load_s)} / {fmt_load(load_e)} on "
        f"{c.get('cores', '?')} cores (above the core count, other processes shared the CPU and "
        f"absolute times are inflated; ratios are less affected)",
    ]
    return lines


# ------------------------------------------------------------------------------- tables

def fmt_ratio(x: float | None, mark_above: float | None = 1.0) -> str:
    if x is None:
        return "-"
    s = f"{x:.2f}"
    return f"**{s}**" if mark_above is not None and x > mark_above else s


def fmt_ms(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.3f}" if t < 1e-2 else f"{t * 1e3:.1f}"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def shapes_table(rows: list[dict]) -> list[str]:
    body = []
    for fam, layer, m, n in shapes_in(rows):
        for r, label, note in ranks_in(rows, m, n):
            k = next(x["k"] for x in rows if x["m"] == m and x["n"] == n)
            body.append([fam, layer, f"{m}x{n}", label, r, f"{r / min(m, n):.2f}", k, f"{rho(m, n, r, k):.3f}",
                         f"{r * (m + n + 1) / (m * n):.3f}", note])
    return table(["model", "layer", "m x n", "rank from", "r", "r/min(m,n)", "k", "rho=(r+k)(m+n)/mn",
                  "frozen r(m+n+1)/mn", "note"], body)


def ratio_table(rows: list[dict], idx: dict, pass_: str, methods: list[str], only_mid: bool = False) -> list[str]:
    body = []
    for fam, layer, m, n in shapes_in(rows):
        Ns = sorted({x["N"] for x in rows if x["m"] == m and x["n"] == n and x["pass"] == pass_})
        for r, label, _ in ranks_in(rows, m, n):
            for N in Ns:
                base = idx.get((m, n, N, pass_, "dense+lora", None))
                cells, best = [], (None, math.inf)
                present = False
                for meth in methods + ["rebuild"]:
                    row = idx.get((m, n, N, pass_, meth, r))
                    if row is None or base is None:
                        cells.append("-")
                        continue
                    present = True
                    q = row["t"] / base["t"]
                    cells.append(fmt_ratio(q))
                    if meth != "rebuild" and q < best[1]:
                        best = (meth, q)
                if not present:
                    continue
                k = base["k"] if base else 16
                body.append([f"{m}x{n}", f"{label} r={r}", f"{rho(m, n, r, k):.2f}", N,
                             fmt_ms(base["t"] if base else None)] + cells
                            + [f"{best[0]} ({best[1]:.2f})" if best[0] else "-"])
    return table(["m x n", "rank", "rho", "N", "dense+LoRA ms"] + [f"{m} / LoRA" for m in methods]
                 + ["rebuild / LoRA", "fastest CERSA"], body)


def flop_table(rows: list[dict], idx: dict, methods: list[str]) -> list[str]:
    body = []
    for fam, layer, m, n in shapes_in(rows):
        Ns = sorted({x["N"] for x in rows if x["m"] == m and x["n"] == n and x["pass"] == "fwdbwd"})
        for r, label, _ in ranks_in(rows, m, n):
            for N in Ns:
                gemm = gflops(idx.get((m, n, N, "fwd", "dense-gemm", None)))
                lora = gflops(idx.get((m, n, N, "fwdbwd", "dense+lora", None)))
                cells = []
                for meth in methods:
                    g = gflops(idx.get((m, n, N, "fwdbwd", meth, r)))
                    cells.append("-" if g is None else
                                 f"{g:.1f}" + (f" ({100 * g / gemm:.0f}%)" if gemm else ""))
                if all(c == "-" for c in cells):
                    continue
                body.append([f"{m}x{n}", f"{label} r={r}", N, "-" if gemm is None else f"{gemm:.1f}",
                             "-" if lora is None else f"{lora:.1f}" + (f" ({100 * lora / gemm:.0f}%)" if gemm else "")]
                            + cells)
    return table(["m x n", "rank", "N", "dense GEMM GFLOP/s", "dense+LoRA GFLOP/s (% GEMM)"]
                 + [f"{m} GFLOP/s (% GEMM)" for m in methods], body)


def fastest_per_shape(rows: list[dict], idx: dict, methods: list[str]) -> tuple[list[str], dict]:
    """Per shape: wins of each CERSA backend over all (rank, N, pass) and its geometric-mean time
    ratio to dense+LoRA (forward+backward)."""
    body, winners = [], {}
    for fam, layer, m, n in shapes_in(rows):
        wins = defaultdict(int)
        logs = defaultdict(list)
        configs = 0
        groups = defaultdict(dict)
        for (mm, nn_, N, p, meth, r), row in idx.items():
            if mm == m and nn_ == n and meth in methods:
                groups[(N, p, r)][meth] = row["t"]
        for (N, p, r), ts in groups.items():
            configs += 1
            wins[min(ts, key=ts.get)] += 1
            base = idx.get((m, n, N, p, "dense+lora", None))
            if base and p == "fwdbwd":
                for meth, t in ts.items():
                    logs[meth].append(math.log(t / base["t"]))
        if not configs:
            continue
        best = max(wins, key=wins.get)
        winners[(m, n)] = best
        gm = ", ".join(f"{meth} {math.exp(sum(v) / len(v)):.2f}" for meth, v in sorted(logs.items()))
        body.append([f"{fam} {layer}", f"{m}x{n}", f"**{best}**",
                     ", ".join(f"{k} {v}/{configs}" for k, v in sorted(wins.items(), key=lambda x: -x[1])),
                     gm or "-"])
    return table(["shape", "m x n", "fastest backend", "wins (rank, N, pass configs)",
                  "geo-mean fwd+bwd time / dense+LoRA"], body), winners


def peak_gemm_rate(rows: list[dict]) -> float | None:
    """The best rate (GFLOP/s) of the plain dense GEMM x @ W^T over every shape and N of the run."""
    rates = [gflops(r) for r in rows if r["method"] == "dense-gemm" and r["pass"] == "fwd"]
    rates = [g for g in rates if g]
    return max(rates) if rates else None


def goal_table(rows: list[dict], idx: dict, methods: list[str]) -> list[str]:
    """Issue 3's goals for every non-reference backend, forward+backward, per (shape, rank, N).

    Beside the speed-up over the reference path at N <= 512 stands its ceiling: the reference
    time over the time its FLOPs would take at the run's best plain GEMM rate (`peak_gemm_rate`).
    A backend that does the same FLOPs cannot beat the reference by more than that.
    """
    body = []
    peak = peak_gemm_rate(rows)
    for meth in [m for m in methods if m != "reference"]:
        for fam, layer, m, n in shapes_in(rows):
            Ns = sorted({x["N"] for x in rows if x["m"] == m and x["n"] == n and x["pass"] == "fwdbwd"})
            for r, label, _ in ranks_in(rows, m, n):
                for N in Ns:
                    row = idx.get((m, n, N, "fwdbwd", meth, r))
                    base = idx.get((m, n, N, "fwdbwd", "dense+lora", None))
                    ref = idx.get((m, n, N, "fwdbwd", "reference", r))
                    gemm = gflops(idx.get((m, n, N, "fwd", "dense-gemm", None)))
                    if row is None or base is None:
                        continue
                    q = row["t"] / base["t"]
                    rh = rho(m, n, r, row["k"])
                    checks = []
                    if N >= 512:
                        checks.append(f"t/LoRA {q:.2f} <= rho {rh:.2f}: {'yes' if q <= rh else 'NO'}")
                    if N <= 16:
                        checks.append(f"t/LoRA {q:.2f} <= 1: {'yes' if q <= 1 else 'NO'}")
                    if N <= 512 and ref is not None:
                        s = ref["t"] / row["t"]
                        ceiling = f" (ceiling {ref['t'] * peak * 1e9 / ref['flops']:.2f})" if peak else ""
                        checks.append(f"reference/{meth} {s:.2f} >= 1.3: {'yes' if s >= 1.3 else 'NO'}"
                                      + ceiling)
                    if N >= 2048 and gemm:
                        g = gflops(row) / gemm
                        checks.append(f"rate {100 * g:.0f}% of GEMM >= 90%: {'yes' if g >= 0.9 else 'NO'}")
                    body.append([meth, f"{m}x{n}", f"{label} r={r}", N, "; ".join(checks)])
    if not body:
        return ["(no backend other than the reference was measured)"]
    return table(["backend", "m x n", "rank", "N", "goal checks (forward+backward)"], body)


def losses(rows: list[dict], idx: dict, methods: list[str]) -> list[str]:
    """Configurations where the fastest CERSA backend is slower than dense+LoRA, with the cause."""
    out = []
    for (m, n, N, p, meth, r), base in sorted(idx.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3], kv[0][2])):
        if meth != "dense+lora":
            continue
        for rr, label, _ in ranks_in(rows, m, n):
            ts = {b: idx[(m, n, N, p, b, rr)]["t"] for b in methods if (m, n, N, p, b, rr) in idx}
            if not ts:
                continue
            best = min(ts, key=ts.get)
            q = ts[best] / base["t"]
            if q <= 1.0:
                continue
            rh = rho(m, n, rr, base["k"])
            if rh >= 1.0:
                why = (f"rho = {rh:.2f} >= 1: at this rank the factored layer does more FLOPs than the dense "
                       f"one ((r+k)(m+n) >= mn), so it cannot win")
            elif N <= 16:
                why = (f"N = {N}: the layer is bound by memory traffic and per-call overhead, not FLOPs; "
                       f"CERSA runs 4 GEMMs + scale/bias passes where "
                       f"dense+LoRA runs one big GEMM + 2 thin ones, so rho = {rh:.2f} does not pay off "
                       f"(dense+LoRA takes {base['t'] * 1e6:.0f} us)")
            else:
                g_best = gflops(idx[(m, n, N, p, best, rr)])
                g_lora = gflops(base)
                why = (f"rho = {rh:.2f} but the thin GEMMs (inner size r = {rr} or k) run at "
                       f"{g_best:.0f} GFLOP/s vs {g_lora:.0f} for dense+LoRA, more than cancelling the "
                       f"FLOP saving" if g_best and g_lora else f"rho = {rh:.2f}")
            out.append(f"- {m}x{n} {label} (r={rr}) N={N} {PASS_TITLES[p]}: best CERSA ({best}) "
                       f"{q:.2f}x dense+LoRA. {why}.")
    return out or ["- nowhere in this run: the fastest CERSA backend is at most as slow as dense+LoRA "
                   "in every measured configuration."]


def memory_table(mem: list[dict]) -> list[str]:
    if not mem:
        return ["(the memory benchmark was not run)"]
    order = {"full": 0, "lora": 1}
    mem = sorted(mem, key=lambda x: (order.get(x["method"], 2), x["method"]))
    lora = next((x for x in mem if x["method"] == "lora"), None)
    body = []
    for x in mem:
        libs = x.get("libs_rss_bytes")
        peak = x.get("peak_bytes")
        body.append([x["method"], f"{x['trainable_params']:,}", f"{x['frozen_params']:,}",
                     f"{(x['trainable_param_bytes'] + x['frozen_param_bytes']) / MiB:.1f}",
                     f"{x['grad_bytes'] / MiB:.2f}", f"{x['optimizer_state_bytes'] / MiB:.2f}",
                     f"{x['exact_bytes'] / MiB:.1f}",
                     f"{x['setup_bytes'] / MiB:.0f}" if x.get("setup_bytes") else "-",
                     f"{peak / MiB:.0f}" if peak else "-",
                     f"{(peak - libs) / MiB:.0f}" if peak and libs else "-",
                     f"{peak / lora['peak_bytes']:.2f}" if lora and peak and lora.get("peak_bytes") else "-",
                     f"{x['step_time_s']:.3f}",
                     f"{x['step_time_s'] / lora['step_time_s']:.2f}" if lora else "-"])
    x0 = mem[0]
    head = ["method", "trainable params", "frozen params", "params MiB", "grads MiB", "AdamW state MiB",
            "exact total MiB", "RSS after setup MiB", "peak during training MiB", "peak - libraries MiB",
            "peak / LoRA", "step s (median)", "step / LoRA"]
    notes = [f"Batch {x0['batch']} x sequence {x0['seq']}, {x0['steps']} AdamW steps (first not timed), fp32, "
             f"{x0.get('threads', '?')} threads, device {x0['device']}. Memory source: {x0.get('memory_source')}. "
             "'libraries' = RSS after importing torch, transformers, peft and cersa_kernels, before the model."]
    cersa = [x for x in mem if x["method"].startswith("cersa")]
    if cersa:
        c = cersa[0]
        notes.append(f"CERSA: energy {c.get('energy')}, delta rank {c.get('k')}; converted "
                     f"{c.get('converted_layers')} Linear layers, {c.get('dense_layers')} left dense (no saving); "
                     f"Linear weight numbers {c.get('weight_numbers_before', 0):,} -> "
                     f"{c.get('weight_numbers_after', 0):,}.")
    return table(head, body) + [""] + notes


def computed_memory_table(rows: list[dict]) -> list[str]:
    body = []
    lora = {r["arch"]: r for r in rows if r["method"] == "lora"}
    for r in rows:
        unit, u = (GiB, "GiB") if r["arch"] == "LLaMA-7B" else (MiB, "MiB")
        body.append([r["arch"], r["label"], f"{r['trainable_params']:,}", f"{r['frozen_params']:,}",
                     f"{r['param_bytes'] / unit:.2f} {u}", f"{r['grad_bytes'] / unit:.2f} {u}",
                     f"{r['optimizer_bytes'] / unit:.2f} {u}", f"{r['total_bytes'] / unit:.2f} {u}",
                     f"{r['total_bytes'] / lora[r['arch']]['total_bytes']:.2f}",
                     f"{r['converted_layers']}/{r['dense_layers']}" if r["method"] == "cersa" else "-"])
    return table(["architecture", "method", "trainable params", "frozen params", "params", "grads",
                  "AdamW state", "total (static)", "total / LoRA", "converted / left dense"], body)


# ------------------------------------------------------------------------------- plot

def plot(rows: list[dict], idx: dict, methods: list[str], mem: list[dict], computed: list[dict], path: Path,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = shapes_in(rows)
    n_panels = len(shapes) + (1 if mem else 0) + (1 if computed else 0)
    cols = 3
    rows_n = max(1, math.ceil(n_panels / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.9 * rows_n), squeeze=False)
    axes = axes.ravel()
    colors = {"reference": "tab:blue", "cpp": "tab:red", "triton": "tab:green", "cuda": "tab:purple",
              "rebuild": "tab:gray"}
    styles = ["-", "--", ":", "-."]
    for ax, (fam, layer, m, n) in zip(axes, shapes):
        for i, (r, label, _) in enumerate(ranks_in(rows, m, n)):
            for meth in methods + ["rebuild"]:
                pts = []
                for N in sorted({x["N"] for x in rows if x["m"] == m and x["n"] == n}):
                    row = idx.get((m, n, N, "fwdbwd", meth, r))
                    base = idx.get((m, n, N, "fwdbwd", "dense+lora", None))
                    if row and base:
                        pts.append((N, row["t"] / base["t"]))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[i % 4], marker="o", ms=3,
                            color=colors.get(meth, None), label=f"{meth} {label}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{fam} {layer} {m}x{n}", fontsize=9)
        ax.set_xlabel("tokens N")
        ax.set_ylabel("fwd+bwd time / dense+LoRA")
        ax.legend(fontsize=6, ncol=2)
        ax.grid(True, which="both", alpha=0.3)
    k = len(shapes)
    if mem:
        ax = axes[k]
        k += 1
        order = {"full": 0, "lora": 1}
        mem = sorted(mem, key=lambda x: (order.get(x["method"], 2), x["method"]))
        names = [x["method"] for x in mem]
        xs = range(len(mem))
        p = [(x["trainable_param_bytes"] + x["frozen_param_bytes"]) / MiB for x in mem]
        g = [x["grad_bytes"] / MiB for x in mem]
        o = [x["optimizer_state_bytes"] / MiB for x in mem]
        ax.bar(xs, p, label="params (exact)")
        ax.bar(xs, g, bottom=p, label="grads (exact)")
        ax.bar(xs, o, bottom=[a + b for a, b in zip(p, g)], label="AdamW state (exact)")
        peaks = [(x["peak_bytes"] - (x.get("libs_rss_bytes") or 0)) / MiB for x in mem]
        ax.plot(list(xs), peaks, "k*", ms=10, label="peak in training (- libraries)")
        ax.set_xticks(list(xs), names, fontsize=7, rotation=15)
        ax.set_ylabel("MiB")
        ax.set_title(f"all-MiniLM-L6-v2 training memory (measured, batch {mem[0]['batch']} x {mem[0]['seq']})",
                     fontsize=9)
        ax.legend(fontsize=6)
    if computed:
        ax = axes[k]
        k += 1
        archs = list(dict.fromkeys(r["arch"] for r in computed))
        labels = list(dict.fromkeys(r["label"] for r in computed))
        width = 0.8 / len(labels)
        for j, lab in enumerate(labels):
            vals = []
            for a in archs:
                full = next(r for r in computed if r["arch"] == a and r["method"] == "full")
                row = next((r for r in computed if r["arch"] == a and r["label"] == lab), None)
                vals.append(row["total_bytes"] / full["total_bytes"] if row else 0)
            ax.bar([i + j * width for i in range(len(archs))], vals, width, label=lab)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(archs))], archs, fontsize=8)
        ax.set_ylabel("static bytes / full fine-tuning")
        ax.set_title("params + grads + AdamW (computed from shapes, not measured)", fontsize=9)
        ax.legend(fontsize=6)
    for ax in axes[k:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------- main

def build_report(data: dict, out_dir: Path, json_name: str = "bench.json", computed: bool = True) -> str:
    """Write bench.md and bench.png into out_dir; returns the markdown."""
    root = Path(__file__).resolve().parents[1]
    rows = timing_rows(data)
    idx = index(rows)
    methods = cersa_methods(rows)
    mem = memory_rows(data)
    comp = []
    if computed:
        from bench.accounting import computed_table

        comp = computed_table()
    md = ["# cersa_kernels benchmarks", ""]
    md += stamp(data, root)
    md += ["", "Reproduce: `make bench` (runs `pytest bench/ --benchmark-json=results/bench.json` and then "
           f"`python bench/report.py results/bench.json --out results`; this report: {json_name}). Times: minimum over rounds. "
           "Ratios < 1: CERSA faster than the frozen dense nn.Linear + PEFT LoRA at the same delta rank k; "
           "**bold** = slower. 'rebuild' = forming W = U diag(S) Vh + s B A every step (SVFT / PEFT OSF style).",
           ""]
    if rows:
        md += ["## Shapes and ranks", "",
               "MiniLM ranks are energy ranks of the real all-MiniLM-L6-v2 weights (median over the layers of "
               "that shape); the others are stated fractions of min(m, n). k = delta rank (LoRA rank).", ""]
        md += shapes_table(rows)
        md += ["", "## Forward+backward time / dense+LoRA", "",
               "One training step of the layer (x, A, B receive gradients; the frozen part does not).", ""]
        md += ratio_table(rows, idx, "fwdbwd", methods)
        for p in ("fwd", "bwd"):
            if any(r["pass"] == p for r in rows):
                md += ["", f"## {PASS_TITLES[p].capitalize()} alone / dense+LoRA", ""]
                md += ratio_table(rows, idx, p, methods)
        md += ["", "## Achieved GFLOP/s (forward+backward) vs a plain dense GEMM", "",
               "FLOPs counted per method (bench/shapes.py `flops`); the dense GEMM is x @ W^T at the same "
               "(N, m, n).", ""]
        md += flop_table(rows, idx, methods)
        md += ["", "## Fastest backend per shape", ""]
        t, _ = fastest_per_shape(rows, idx, methods)
        md += t
        md += ["", "## Issue 3 goals, per backend (forward+backward)", ""]
        peak = peak_gemm_rate(rows)
        if peak:
            md += [f"The ceiling after a reference/backend ratio is the reference time divided by the time "
                   f"its FLOPs take at the best plain GEMM rate of this run ({peak:.0f} GFLOP/s): no "
                   f"backend that does the same FLOPs can be faster than the reference by more.", ""]
        md += goal_table(rows, idx, methods)
        md += ["", "## Where CERSA loses to dense+LoRA, and why", ""]
        md += losses(rows, idx, methods)
    md += ["", "## Memory: fine-tuning all-MiniLM-L6-v2 (measured, one process per method)", ""]
    md += memory_table(mem)
    if comp:
        md += ["", "## Memory computed from shapes (not measured): BERT-base, ViT-B/16, LLaMA-7B", "",
               "Static bytes only (parameters, gradients, AdamW state), fp32, delta/LoRA rank 16 on every "
               "Linear inside the transformer blocks; activations excluded. CERSA at r = fraction x min(m, n), "
               "init 'principal'; a layer whose r(m+n+1) >= mn is left dense and frozen (as `convert` does). "
               "Method in bench/accounting.py.", ""]
        md += computed_memory_table(comp)
    text = "\n".join(md) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.md").write_text(text)
    c = data.get("machine_info", {}).get("cersa", {})
    title = (f"cersa_kernels bench, {data.get('datetime', '?')[:16]}, {c.get('cpu_model', '?')} "
             f"x{c.get('cores', '?')} cores, commit {git_commit(root)}")
    plot(rows, idx, methods, mem, comp, out_dir / "bench.png", title)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON (--benchmark-json); with several, "
                    "later files' benchmarks replace the same-named ones of earlier files")
    ap.add_argument("--out", default="results", help="output folder for bench.md and bench.png")
    ap.add_argument("--no-computed", action="store_true", help="skip the memory computed from shapes")
    a = ap.parse_args(argv)
    data = load(*a.json)
    build_report(data, Path(a.out), " ".join(Path(j).name for j in a.json), computed=not a.no_computed)
    print(f"wrote {Path(a.out) / 'bench.md'} and {Path(a.out) / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
