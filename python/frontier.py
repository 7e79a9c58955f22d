#!/usr/bin/env python
"""The memory / quality frontier of CERSA against LoRA, QLoRA and full fine-tuning, on two jobs.

Jobs: ``bbc`` (the main job, python/finetune_bbc.py: all-MiniLM-L6-v2 on BBC News topics,
accuracy) and ``vit`` (python/finetune_vit.py: the DINOv2 ViT-S/14 backbone on Fashion-MNIST,
accuracy).  The grid, per job and seed (18 runs):

* CERSA, factors in float32, energy 0.80 / 0.85 / 0.90 / 0.93 / 0.95 (5 runs);
* CERSA, factors in float32, rank budget 0.5 / 0.7 of the dense frozen numbers (``--budget``; 2 runs);
* CERSA with U, Vh stored as int8 and as NF4 codes (cersa-int8 / cersa-nf4), each at energy 0.93
  and at the budgets 0.5 / 0.7 (6 runs): the quantized storage at the front end's default energy
  and at the two budgets, not at every energy, so the grid stays at 18 runs a job;
* PEFT LoRA at r 8 / 16 / 32 (``--lora-rank``, lora_alpha the front end's default, i.e. r; 3 runs);
* QLoRA (NF4 base weights under LoRA at the front end's delta rank; on the ViT without the
  patch-embedding Conv2d, which QLoRA cannot quantize: ``--exclude patch_embeddings.projection``;
  1 run), full fine-tuning (1 run).

Every run is its own process through the front end's runner (``python/_sweep.py``: one torch thread,
``--jobs`` runs at once, results cached per run in ``--results`` so an interrupted frontier resumes
where it stopped), at the front end's default number of steps (``--steps N`` or the environment
variable STEPS=N instead, for check runs) and the other defaults of the front end.  Writes
``results/frontier.md`` (per job a table best first: mean ± std and [min, max] over the seeds, base
weights as stored, training peak RSS, s / step) and ``results/frontier.png`` (per job two panels: the
metric against the frozen base-weight MiB as stored, and against the training peak RSS MiB; error
bars min to max over the seeds).

Cost: at the defaults (3 seeds, both jobs: 108 runs) several hours on 2 CPU cores; one BBC run
takes about 2-4 minutes at one thread.  Usage::

    python python/frontier.py                                  # make frontier
    STEPS=2 python python/frontier.py --tasks bbc --seeds 0    # a check run (make frontier STEPS=2 FRONTIER_ARGS=...)
    python python/frontier.py --tasks vit --jobs 2 --dry-run   # list the runs
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _sweep  # noqa: E402

#: job name -> (front-end script, what it is).
JOBS = {"bbc": ("finetune_bbc.py", "all-MiniLM-L6-v2 on BBC News (main job)"),
        "vit": ("finetune_vit.py", "DINOv2 ViT-S/14 on Fashion-MNIST")}
ENERGIES = (0.80, 0.85, 0.90, 0.93, 0.95)
BUDGETS = (0.5, 0.7)
#: the energy of the quantized CERSA runs (the front ends' default energy).
QUANT_ENERGY = 0.93
LORA_RANKS = (8, 16, 32)
FAMILIES = ("CERSA energy", "CERSA budget", "CERSA int8", "CERSA nf4", "LoRA", "QLoRA", "full")
#: extra options of the QLoRA run per job: QLoRA quantizes nn.Linear layers only, so on the ViT the
#: patch-embedding Conv2d stays a dense frozen layer without LoRA (the other methods adapt it).
QLORA_OPTIONS = {"vit": {"--exclude": ["patch_embeddings.projection"]}}


def runs_for(job: str, seeds) -> list[_sweep.Run]:
    """The runs of ``job`` (a key of JOBS) for each seed, in the order of the module docstring."""
    script = os.path.join(HERE, JOBS[job][0])
    specs = []
    for e in ENERGIES:
        specs.append(("cersa", {"--energy": e}, "CERSA energy", f"e{e:.2f}"))
    for b in BUDGETS:
        specs.append(("cersa", {"--budget": b}, "CERSA budget", f"b{b:g}"))
    for q in ("int8", "nf4"):
        specs.append((f"cersa-{q}", {"--energy": QUANT_ENERGY}, f"CERSA {q}", f"e{QUANT_ENERGY:.2f}"))
        for b in BUDGETS:
            specs.append((f"cersa-{q}", {"--budget": b}, f"CERSA {q}", f"b{b:g}"))
    for r in LORA_RANKS:
        specs.append(("lora", {"--lora-rank": r}, "LoRA", f"r{r}"))
    specs.append(("qlora", dict(QLORA_OPTIONS.get(job, {})), "QLoRA", "qlora"))
    specs.append(("full", {}, "full", "full"))
    return [_sweep.Run(script, method, options, seed, {"job": job, "family": family, "point": point})
            for method, options, family, point in specs for seed in seeds]


def _label(c: dict) -> str:
    opts = " ".join(_sweep.Run("x", "m", c["options"]).option_args())
    return f"{c['method']} {opts}".strip()


def report(job_cells: dict, steps, seeds, outcomes) -> str:
    """The markdown of results/frontier.md."""
    lines = ["# Frontier: task metric against base-weight and training memory", "",
             f"Seeds {list(seeds)}; steps: {steps if steps is not None else 'each front end’s default'}; one torch "
             f"thread per run (python/_sweep.py).  Grid per job: CERSA at energy {', '.join(map(str, ENERGIES))} and "
             f"at rank budgets {', '.join(map(str, BUDGETS))} (factors float32); cersa-int8 / cersa-nf4 (U, Vh as "
             f"int8 / NF4 codes) at energy {QUANT_ENERGY} and at the budgets; PEFT LoRA at r "
             f"{', '.join(map(str, LORA_RANKS))}; QLoRA at the front end's delta rank (ViT: its nn.Linear layers only, "
             f"the patch-embedding Conv2d left dense); full fine-tuning.", ""]
    for job, cells in job_cells.items():
        lines += [f"## {job}: {JOBS[job][1]} ({JOBS[job][0]})", "",
                  _sweep.markdown_table(cells, _label, extra=[("family", lambda c: c["tags"]["family"])]), ""]
    lines += ["base MiB: the base weights as stored (dense W; U, S, Vh of CERSA layers, int8 / NF4 codes with "
              "their scales; QLoRA's packed NF4 W), frozen except for full fine-tuning, which trains them.  "
              "train peak MiB: VmHWM of the run's process from the first training step on.  s / step: median "
              "wall time of a step at one thread; with several runs at once (--jobs) the runs share the cores.",
              "mean ± std: sample standard deviation over the seeds; [min, max] over the seeds.  A difference "
              "smaller than the spread over the seeds is no difference.", *_sweep.failures_text(outcomes)]
    return "\n".join(lines) + "\n"


def panels(job_cells: dict) -> list[dict]:
    """Two panels per job: the metric against base MiB and against training peak MiB."""
    out = []
    for job, cells in job_cells.items():
        for x, xlabel in (("base_mib", "base weights as stored (MiB; full: trained)"),
                          ("train_peak_mib", "training peak RSS (MiB)")):
            out.append({"cells": cells, "x": (lambda c, x=x: c[x]), "xlabel": xlabel, "lines": x == "base_mib",
                        "series": lambda c: c["tags"]["family"], "point_label": lambda c: c["tags"]["point"],
                        "title": f"{job}: {JOBS[job][1]}"})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Grid, outputs and cost: see the module docstring (python/frontier.py).")
    p.add_argument("--tasks", nargs="+", choices=tuple(JOBS), default=list(JOBS), help="jobs (default: bbc vit)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    _sweep.add_sweep_arguments(p, "frontier")
    args = p.parse_args(argv)
    steps = _sweep.check_sweep_arguments(p, args)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds: expected distinct seeds, got {args.seeds}")
    runs = {job: runs_for(job, args.seeds) for job in args.tasks}
    return _sweep.run_and_report(runs, args, steps, "job",
                                 lambda cells, outcomes: report(cells, steps, args.seeds, outcomes), panels,
                                 "task metric against memory (mean over seeds; bars: min-max)")


if __name__ == "__main__":
    sys.exit(main())
