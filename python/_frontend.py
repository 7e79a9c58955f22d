"""Helpers shared by the fine-tuning front ends (finetune_bbc.py, finetune_fashion_mnist.py).

Process memory from the OS, the results table, the --compare driver (one subprocess per method)
and the common main().  Front-end code only: the cersa_kernels package does not import this.
Standard library only at import time, so a front end can set environment variables (for example
HF_HUB_OFFLINE) before anything heavy is imported.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable


# ----------------------------------------------------------------------------------------------
# process memory (Linux /proc/self)
# ----------------------------------------------------------------------------------------------
def status_mib(key: str) -> float:
    """The value of field ``key`` (with its colon, e.g. "VmHWM:") of /proc/self/status in MiB,
    NaN when the file or the field is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB: VmHWM from /proc/self/status (Linux), else
    ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    v = status_mib("VmHWM:")
    if not math.isnan(v):
        return v
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / 2**20 if sys.platform == "darwin" else ru / 1024.0


def current_rss_mib() -> float:
    """Current resident set size in MiB (VmRSS), NaN where /proc is missing."""
    return status_mib("VmRSS:")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: write 5 to /proc/self/clear_refs);
    True when it worked, so a later VmHWM reading measures from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def param_stats(model) -> dict:
    """trainable / frozen parameter counts and bytes of the nn.Module ``model`` (shared tensors once)."""
    seen: set[int] = set()
    st = {"trainable": 0, "frozen": 0, "trainable_bytes": 0, "frozen_bytes": 0}
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        key = "trainable" if p.requires_grad else "frozen"
        st[key] += p.numel()
        st[key + "_bytes"] += p.numel() * p.element_size()
    return st


# ----------------------------------------------------------------------------------------------
# results table
# ----------------------------------------------------------------------------------------------
def mib(nbytes: float) -> str:
    """Bytes as MiB with two decimals."""
    return f"{nbytes / 2**20:.2f}"


def method_table(rows: list[dict], base_label: str, base_key: str, dense_key: str, frozen_key: str) -> list[str]:
    """The markdown lines (header, rule, one line per row) of the per-method results table.

    rows: dicts with method, accuracy (fraction), trainable, total_param_bytes, peak_rss_mib,
    train_peak_rss_mib (NaN prints n/a), s_per_step, lr, and the base-weight fields named by
    ``base_key`` (bytes), ``dense_key`` (bytes of the dense base) and ``frozen_key`` (bool);
    ``base_label`` heads the base-weight column."""
    head = ["method", "accuracy", "trainable params", base_label, "total params (MiB)",
            "peak RSS (MiB)", "train peak RSS (MiB)", "s / step", "lr"]
    body = []
    for r in rows:
        kind = "frozen" if r[frozen_key] else "trained"
        ratio = r[base_key] / r[dense_key] if r[dense_key] else float("nan")
        body.append([
            r["method"],
            f"{100 * r['accuracy']:.2f} %",
            f"{r['trainable']:,}",
            f"{mib(r[base_key])} {kind} ({ratio:.3f}x dense)",
            mib(r["total_param_bytes"]),
            f"{r['peak_rss_mib']:.0f}",
            "n/a" if math.isnan(r["train_peak_rss_mib"]) else f"{r['train_peak_rss_mib']:.0f}",
            f"{r['s_per_step']:.3f}",
            f"{r['lr']:g}",
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body]


# ----------------------------------------------------------------------------------------------
# --compare and main
# ----------------------------------------------------------------------------------------------
def compare_in_subprocesses(methods, child_argv: Callable[[str, str], list[str]],
                            format_table: Callable[[list[dict]], str], *, quiet: bool, prefix: str,
                            env: dict | None = None) -> list[dict]:
    """Run each method in its own subprocess, ``child_argv(method, result_json_path)``, with ``env``
    (None: this process's environment); the child writes its row to that JSON file.  Returns the
    rows in ``methods`` order.  Raises RuntimeError naming the methods whose process failed (after
    printing the table of those that worked)."""
    rows, failed = [], []
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        for method in methods:
            out = os.path.join(tmp, f"{method}.json")
            argv = child_argv(method, out)
            if not quiet:
                print(f"\n=== {method} (own process) ===", flush=True)
            proc = subprocess.run(argv, env=env)
            if proc.returncode != 0 or not os.path.exists(out):
                failed.append(f"{method} (exit code {proc.returncode})")
                continue
            with open(out) as f:
                rows.append(json.load(f))
    if failed:
        if rows:
            print(format_table(rows))
        raise RuntimeError(f"--compare: these runs failed: {', '.join(failed)}")
    return rows


def run_main(argv: list[str] | None, build_parser, check_args, run_method, compare, format_table,
             title: Callable[[object], str]) -> list[dict]:
    """The shared main(): parse ``argv`` with ``build_parser()``, ``check_args(parser, args)``, set
    torch's thread count to ``args.threads``; with --method run that method here (and with
    --result-json write its row and return without printing), else ``compare(args)``; then print
    ``title(args)`` with the wall time and ``format_table(rows)``.  Returns the rows."""
    import torch

    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.method is None:
        rows = compare(args)
    else:
        rows = [run_method(args.method, args)]
        if args.result_json:
            with open(args.result_json, "w") as f:
                json.dump(rows[0], f)
            return rows
    print()
    print(f"{title(args)}; wall time {time.perf_counter() - t0:.0f} s")
    print(format_table(rows))
    return rows
