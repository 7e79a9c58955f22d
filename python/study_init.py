#!/usr/bin/env python
"""Which CERSA delta init, with or without calibration, at which learning rate: a seeded study.

Grid (each restrictable from the command line):

* tasks: ``tweets`` (python/finetune_tweets.py, 3-class tweet sentiment) and ``bbc``
  (python/finetune_bbc.py, BBC News topics), both all-MiniLM-L6-v2, accuracy;
* CERSA with every init of ``cersa_kernels.config.INITS`` (read when the study starts), truncation
  calibration off or on (on: ``--calibration 4``, activation-aware truncation on the first 4 training
  batches), learning rate 3e-4 / 5e-4 / 1e-3 / 2e-3 (``--lr``: the encoder-side parameters; the head
  keeps the front end's rate);
* PEFT LoRA at the same learning rates beside (the front end's rank and alpha; ``--no-lora`` leaves
  it out);
* seeds 0 / 1 / 2 (seed of the split or shuffle, the init and the batch order).

Every other option is the front end's default (steps, batch size, energy 0.93, delta rank).  Each run
is its own process (``python/_sweep.py``: one torch thread, ``--jobs`` at once, results cached per run
in ``--results``, so the study resumes where it stopped).  Writes ``results/study_init.md`` (per task:
mean ± std over the seeds per cell, by learning rate, then every cell best first with [min, max])
and ``results/study_init.png`` (per task the accuracy against the learning rate, error bars min to
max).  A difference smaller than the spread over the seeds is no difference.

Cost: the full grid is 168 runs (28 per task and seed), hours on 2 CPU cores.  Usage::

    python python/study_init.py                                             # make study-init
    STEPS=2 python python/study_init.py --tasks tweets --lrs 5e-4 --seeds 0   # a check run
    python python/study_init.py --tasks bbc --inits principal residual --calibration off --jobs 2
"""
from __future__ import annotations

import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _sweep  # noqa: E402

TASKS = {"tweets": ("finetune_tweets.py", "tweet sentiment, 3 classes"),
         "bbc": ("finetune_bbc.py", "BBC News topics, 5 classes")}
LRS = (3e-4, 5e-4, 1e-3, 2e-3)
SEEDS = (0, 1, 2)
#: --calibration N of the "on" runs (training batches).
CALIBRATION_BATCHES = 4


def inits() -> tuple:
    """cersa_kernels.config.INITS, read now (through the runner, python/_frontend.py)."""
    import _frontend

    return _frontend.cersa_inits()


def runs_for(task: str, init_names, calibrations, lrs, seeds, lora: bool = True) -> list[_sweep.Run]:
    """The runs of ``task``: CERSA for each init x calibration ("off" / "on") x lr, then LoRA for
    each lr, each for every seed."""
    script = os.path.join(HERE, TASKS[task][0])
    specs = []
    for init in init_names:
        for cal in calibrations:
            for lr in lrs:
                opts = {"--init": init, "--lr": lr}
                opts["--calibration"] = CALIBRATION_BATCHES if cal == "on" else 0
                specs.append(("cersa", opts, f"cersa init={init} calibration {cal}", lr))
    if lora:
        for lr in lrs:
            specs.append(("lora", {"--lr": lr}, "lora", lr))
    return [_sweep.Run(script, method, opts, seed, {"task": task, "series": series, "lr": lr})
            for method, opts, series, lr in specs for seed in seeds]


def _pct(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.2f}"


def pivot(cells: list[dict], lrs) -> str:
    """A markdown table: one line per series (init and calibration, or lora), one column per lr,
    cells "mean ± std (n)" of the accuracy in %."""
    series = []
    for c in cells:
        if c["tags"]["series"] not in series:
            series.append(c["tags"]["series"])
    by = {(c["tags"]["series"], c["tags"]["lr"]): c for c in cells}
    head = ["run", *(f"lr {lr:g}" for lr in lrs)]
    body = []
    for s in series:
        row = [s]
        for lr in lrs:
            c = by.get((s, lr))
            row.append("" if c is None else f"{_pct(c['mean'])} ± {_pct(c['std'])} ({c['n']})")
        body.append(row)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells_: "| " + " | ".join(t.ljust(w) for t, w in zip(cells_, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body])


def report(task_cells: dict, args, steps, outcomes) -> str:
    """The markdown of results/study_init.md."""
    lines = ["# Delta init study: CERSA inits, calibration, learning rate (PEFT LoRA beside)", "",
             f"inits {', '.join(args.inits)}; calibration {args.calibration} (on: --calibration "
             f"{CALIBRATION_BATCHES}); lr {', '.join(f'{x:g}' for x in args.lrs)}; seeds {args.seeds}; steps "
             f"{steps if steps is not None else 'each front end’s default'}; every other option the front end's "
             "default; one torch thread per run.", "",
             "**A difference smaller than the spread over the seeds (± std, or the [min, max] range) is no "
             "difference.**", ""]
    for task, cells in task_cells.items():
        lines += [f"## {task}: {TASKS[task][1]} ({TASKS[task][0]})", "",
                  "accuracy % on the held-out set, mean ± std over the seeds (seeds that finished):", "",
                  pivot(cells, args.lrs), "", "every cell, best first:", "",
                  _sweep.markdown_table(cells, lambda c: f"{c['tags']['series']}, lr {c['tags']['lr']:g}"), ""]
    lines += _sweep.failures_text(outcomes)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Grid, outputs and cost: see the module docstring (python/study_init.py).")
    p.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS), help="default: tweets bbc")
    p.add_argument("--inits", nargs="+", default=None,
                   help="CERSA inits (default: every value of cersa_kernels.config.INITS)")
    p.add_argument("--calibration", choices=("off", "on", "both"), default="both",
                   help=f"CERSA truncation calibration (on: --calibration {CALIBRATION_BATCHES}; default both)")
    p.add_argument("--lrs", type=float, nargs="+", default=list(LRS),
                   help=f"learning rates (default {' '.join(f'{x:g}' for x in LRS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="seeds (default 0 1 2)")
    p.add_argument("--no-lora", action="store_true", help="leave out the PEFT LoRA runs")
    _sweep.add_sweep_arguments(p, "study_init")
    args = p.parse_args(argv)
    steps = _sweep.check_sweep_arguments(p, args)
    known = inits()
    if args.inits is None:
        args.inits = list(known)
    bad = [i for i in args.inits if i not in known]
    if bad:
        p.error(f"--inits: expected values among {', '.join(known)} (cersa_kernels.config.INITS), got {bad}")
    for flag, values in (("--inits", args.inits), ("--lrs", args.lrs), ("--seeds", args.seeds)):
        if len(set(values)) != len(values):
            p.error(f"{flag}: expected distinct values, got {values}")
    bad_lr = [x for x in args.lrs if not (math.isfinite(x) and x > 0)]
    if bad_lr:
        p.error(f"--lrs: expected finite learning rates > 0, got {bad_lr}")
    calibrations = ["off", "on"] if args.calibration == "both" else [args.calibration]
    runs = {t: runs_for(t, args.inits, calibrations, args.lrs, args.seeds, not args.no_lora) for t in args.tasks}

    def panels(task_cells):
        return [{"cells": cells, "x": lambda c: c["tags"]["lr"], "xscale": "log", "dodge": 0.04, "xticks": args.lrs,
                 "xlabel": "learning rate (body; series set side by side)",
                 "series": lambda c: c["tags"]["series"], "title": f"{t}: {TASKS[t][1]}"}
                for t, cells in task_cells.items()]

    return _sweep.run_and_report(runs, args, steps, "task",
                                 lambda cells, outcomes: report(cells, args, steps, outcomes), panels,
                                 "accuracy against learning rate per init (mean over seeds; bars: min-max)")


if __name__ == "__main__":
    sys.exit(main())
