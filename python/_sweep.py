#!/usr/bin/env python
"""Grids of front-end runs, one process each, cached per run, aggregated over seeds.

A run is (front-end script, method, options, seed).  Each runs in its own process as
``python SCRIPT --method M --seed S --threads 1 --quiet --json PATH [--steps N] OPTIONS`` (the
runner of python/_frontend.py; one torch thread each, so up to ``jobs`` runs share the cores
without oversubscribing them), at most ``jobs`` at a time.  Results are cached in a results folder,
one JSON file per run named by a hash of what decides the result (script name, method, options,
seed, steps): running the same grid again skips the runs whose file exists, so a long sweep that
was interrupted resumes where it stopped; a failed run leaves no result file (its log,
``<name>.log``, says why) and runs again next time.  The environment variable STEPS is not passed
on: the number of steps is the sweep's ``steps`` (None: each front end's default), part of the key.

Aggregation groups the runs that differ only in the seed into a cell: the metric's mean, sample
standard deviation (0 for one seed), min and max over the seeds, and the means of the measured
fields (base-weight MiB as stored, training peak RSS, s / step, trainable parameters).  The metric
and its direction come from each result file (``metric``: key, header, lower_is_better), so a
lower-is-better metric (perplexity, MSE) sorts and plots the right way.  ``markdown_table`` and
``plot`` (matplotlib, Agg backend, PNG) present the cells; python/frontier.py and
python/study_init.py are built on this module.

Command line, a grid over one front end (the cartesian product of every --grid)::

    python python/_sweep.py python/finetune_bbc.py --methods cersa --grid energy=0.8,0.9 --seeds 0 1 2 \\
        --results results/sweep_bbc --jobs 2 --steps 20 --table results/sweep_bbc.md --png results/sweep_bbc.png
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

__all__ = ["Run", "Outcome", "grid", "run_grid", "aggregate", "markdown_table", "plot", "steps_from_env",
           "add_sweep_arguments", "check_sweep_arguments", "run_and_report", "MEASURED", "ROOT"]

#: the repository root (results/ lives there).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: fields of a result row averaged per cell besides the metric: (row key, cell key).
MEASURED = (("base_bytes", "base_mib"), ("train_peak_rss_mib", "train_peak_mib"), ("s_per_step", "s_per_step"),
            ("trainable", "trainable"), ("peak_rss_mib", "peak_mib"))


def _check_flag(flag) -> str:
    if not isinstance(flag, str) or not flag.startswith("--") or len(flag) < 3:
        raise ValueError(f"options: expected keys like '--energy', got {flag!r}")
    return flag


@dataclass(frozen=True)
class Run:
    """One run of a grid.

    script: path of the front-end script; method: its --method; options: {flag: value} added to the
    command line ("--energy": 0.8 -> ``--energy 0.8``; True -> the bare flag; False / None -> left
    out; a list / tuple -> the flag then each value); seed: --seed; tags: labels for tables and
    plots (not part of the command line nor of the cache key).  Raises ValueError for an option key
    that is not a --flag, or one the sweep sets itself (--method --seed --threads --json --steps
    --quiet)."""

    script: str
    method: str
    options: dict = field(default_factory=dict)
    seed: int = 0
    tags: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for flag in self.options:
            _check_flag(flag)
            if flag in ("--method", "--seed", "--threads", "--json", "--steps", "--quiet", "--compare", "--methods"):
                raise ValueError(f"options: {flag} is set by the sweep itself; got it in {self.options}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed: expected an int, got {self.seed!r}")

    def option_args(self) -> list[str]:
        """The options as command-line words, in the dict's order."""
        out: list[str] = []
        for flag, v in self.options.items():
            if v is None or v is False:
                continue
            if v is True:
                out.append(flag)
            elif isinstance(v, (list, tuple)):
                out += [flag, *map(str, v)]
            else:
                out += [flag, str(v)]
        return out

    def cell_spec(self, steps: int | None) -> dict:
        """What decides the result, seed excluded: script file name, method, options, steps."""
        opts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(self.options.items())
                if v is not None and v is not False}
        return {"script": os.path.basename(self.script), "method": self.method, "options": opts, "steps": steps}

    def key(self, steps: int | None) -> str:
        """The cache file stem: script, method, seed and a hash of ``cell_spec`` and the seed."""
        spec = json.dumps({**self.cell_spec(steps), "seed": self.seed}, sort_keys=True, default=str)
        digest = hashlib.sha1(spec.encode()).hexdigest()[:12]
        stem = os.path.splitext(os.path.basename(self.script))[0]
        return f"{stem}-{self.method}-seed{self.seed}-{digest}"

    def argv(self, json_path: str, steps: int | None, python: str = sys.executable) -> list[str]:
        """The command line of the run."""
        argv = [python, self.script, "--method", self.method, "--seed", str(self.seed), "--threads", "1",
                "--quiet", "--json", json_path]
        if steps is not None:
            argv += ["--steps", str(steps)]
        return argv + self.option_args()


def grid(script: str, methods: Iterable[str], seeds: Iterable[int], axes: dict | None = None,
         tags: dict | None = None) -> list[Run]:
    """The runs of the cartesian product of ``methods``, each axis of ``axes`` ({flag: [values]})
    and ``seeds`` (seed varying fastest); ``tags`` go to every run, plus one tag per axis value."""
    axes = axes or {}
    flags = list(axes)
    runs = []
    for method in methods:
        for values in itertools.product(*(axes[f] for f in flags)):
            options = dict(zip(flags, values))
            for seed in seeds:
                runs.append(Run(script, method, options, seed, {**(tags or {}), "method": method,
                                                                 **{f.lstrip("-"): v for f, v in options.items()}}))
    return runs


@dataclass
class Outcome:
    """What became of a run: status "cached" (its result file was there), "ran" or "failed";
    path: the result file (a failed run has none, and ``error`` holds the end of its log);
    result: the stored JSON ({"run", "result": the front end's --json output, "wall_s"})."""

    run: Run
    status: str
    path: str
    result: dict | None = None
    error: str | None = None
    log: str | None = None

    @property
    def row(self) -> dict | None:
        return self.result["result"]["rows"][0] if self.result else None


def steps_from_env(steps: int | None = None) -> int | None:
    """``steps`` when given, else the environment variable STEPS as a positive int, else None.
    Raises ValueError naming STEPS for another value."""
    if steps is not None:
        return steps
    env = os.environ.get("STEPS", "").strip()
    if not env:
        return None
    try:
        value = int(env)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"STEPS (environment) must be a positive integer, got {env!r}")
    return value


def _load(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "result" in data else None


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def run_grid(runs: list[Run], results: str, *, jobs: int = 1, steps: int | None = None,
             python: str = sys.executable, env: dict | None = None, timeout: float | None = None,
             quiet: bool = False) -> list[Outcome]:
    """Run every run of ``runs`` that has no result file in the folder ``results`` (created), up to
    ``jobs`` at once; returns one Outcome per run, in ``runs`` order.

    A run's process writes the front end's --json output to ``<key>.part.json``; on exit code 0 the
    sweep stores {"run": spec and seed, "result": that output, "wall_s"} as ``<key>.json``
    (atomically) and removes the part file; stdout and stderr go to ``<key>.log``.  env: the
    environment of the processes (default this process's), without STEPS; timeout: seconds per run
    (None: no limit; a run past it fails).  Raises ValueError for jobs < 1 or steps < 1, and for
    two runs with the same key."""
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs: expected an int >= 1, got {jobs!r}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps: expected None or an int >= 1, got {steps!r}")
    keys = [r.key(steps) for r in runs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"runs: expected distinct runs, got repeats of {dup[:3]}")
    os.makedirs(results, exist_ok=True)
    child_env = dict(os.environ if env is None else env)
    child_env.pop("STEPS", None)
    child_env.setdefault("OMP_NUM_THREADS", "1")
    child_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    todo = []
    outcomes: list[Outcome | None] = [None] * len(runs)
    for i, (run, key) in enumerate(zip(runs, keys)):
        path = os.path.join(results, key + ".json")
        cached = _load(path)
        if cached is not None:
            outcomes[i] = Outcome(run, "cached", path, cached)
        else:
            todo.append(i)
    if not quiet:
        print(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} cached in {results}, {len(todo)} to run "
              f"({jobs} at a time)", flush=True)
    done = [0]

    def one(i: int) -> Outcome:
        run, key = runs[i], keys[i]
        path = os.path.join(results, key + ".json")
        part = os.path.join(results, key + ".part.json")
        log = os.path.join(results, key + ".log")
        if os.path.exists(part):
            os.remove(part)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            f.write(" ".join(run.argv(part, steps, python)) + "\n")
            f.flush()
            try:
                proc = subprocess.run(run.argv(part, steps, python), stdout=f, stderr=subprocess.STDOUT,
                                      env=child_env, timeout=timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = None
        wall = time.perf_counter() - t0
        data = None
        if code == 0:
            try:
                with open(part) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                data = None
        if data is None:
            why = "timed out" if code is None else f"exit code {code}"
            if code == 0:
                why = "exit code 0 but no --json output"
            out = Outcome(run, "failed", path, None, f"{why}; end of {log}:\n{_tail(log, 1200)}", log)
        else:
            stored = {"run": {**run.cell_spec(steps), "seed": run.seed, "argv": run.argv(path, steps, python)[1:]},
                      "result": data, "wall_s": wall}
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(stored, f, indent=1)
            os.replace(tmp, path)
            os.remove(part)
            out = Outcome(run, "ran", path, stored, None, log)
        done[0] += 1
        if not quiet:
            print(f"sweep: [{done[0]}/{len(todo)}] {key}: {out.status} ({wall:.0f} s)", flush=True)
        return out

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for i, out in zip(todo, pool.map(one, todo)):
            outcomes[i] = out
    return outcomes  # type: ignore[return-value]


def _cell_key(o: Outcome) -> str:
    return json.dumps({"script": os.path.basename(o.run.script), "method": o.run.method,
                       "options": {k: v for k, v in sorted(o.run.options.items())}}, sort_keys=True, default=str)


def aggregate(outcomes: list[Outcome]) -> list[dict]:
    """One cell per group of runs differing only in the seed, in first-seen order.

    Each cell: script, method, options, tags (the first run's), seeds (that finished), failed
    (seeds that did not), n, metric ({"key", "header", "lower_is_better"}, from the results; None
    when no run finished), mean, std (sample standard deviation; 0.0 for one seed), min, max (NaN
    when no run finished), values (per finished seed), and the means of MEASURED (base_mib: base
    bytes / 2**20; train_peak_mib; s_per_step; trainable; peak_mib; NaN where a row has none).
    Raises ValueError when two results name different metrics."""
    cells: dict[str, dict] = {}
    metric = None
    for o in outcomes:
        k = _cell_key(o)
        c = cells.setdefault(k, {"script": o.run.script, "method": o.run.method, "options": dict(o.run.options),
                                 "tags": dict(o.run.tags), "seeds": [], "failed": [], "rows": []})
        if o.result is None:
            c["failed"].append(o.run.seed)
            continue
        m = o.result["result"].get("metric") or {"key": "accuracy", "header": "accuracy", "lower_is_better": False}
        if metric is None:
            metric = m
        elif m["key"] != metric["key"] or bool(m["lower_is_better"]) != bool(metric["lower_is_better"]):
            raise ValueError(f"outcomes: expected one metric, got {metric} and {m}")
        c["seeds"].append(o.run.seed)
        c["rows"].append(o.row)
    out = []
    for c in cells.values():
        rows = c.pop("rows")
        vals = [float("nan") if r.get(metric["key"]) is None else float(r[metric["key"]]) for r in rows] \
            if metric else []
        c["metric"] = metric
        c["values"] = vals
        c["n"] = len(vals)
        c["mean"] = statistics.fmean(vals) if vals else float("nan")
        c["std"] = statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else float("nan"))
        c["min"] = min(vals) if vals else float("nan")
        c["max"] = max(vals) if vals else float("nan")
        for row_key, cell_key in MEASURED:
            xs = [float(r[row_key]) for r in rows if r.get(row_key) is not None]
            v = statistics.fmean(xs) if xs else float("nan")
            c[cell_key] = v / 2**20 if row_key == "base_bytes" else v
        c["base_frozen"] = all(r.get("base_frozen", True) for r in rows) if rows else None
        out.append(c)
    return out


def _fmt_value(v: float, metric: dict | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if metric and metric["key"] == "accuracy":
        return f"{100 * v:.2f}"
    return f"{v:.4g}"


def sort_cells(cells: list[dict]) -> list[dict]:
    """The cells best first by mean metric (lowest first for a lower-is-better metric; cells
    without a finished run last)."""
    def key(c):
        m = c["metric"]
        if m is None or math.isnan(c["mean"]):
            return math.inf
        return c["mean"] if m["lower_is_better"] else -c["mean"]
    return sorted(cells, key=key)


def markdown_table(cells: list[dict], label: Callable[[dict], str] | None = None, *, sort: bool = True,
                   extra: list[tuple[str, Callable[[dict], str]]] | None = None) -> str:
    """A markdown table of ``cells`` (``aggregate``), best first when ``sort``: label (default
    method and options), the metric's mean ± std and [min, max] over the seeds (accuracy in %),
    seeds, then ``extra`` columns (header, fn(cell) -> text), base weights MiB, train peak MiB,
    s / step; a cell with failed seeds says which."""
    if not cells:
        return "(no runs)"
    metric = next((c["metric"] for c in cells if c["metric"]), None)
    name = (metric["header"] + (" %" if metric["key"] == "accuracy" else "")) if metric else "metric"
    direction = "" if metric is None else (" (lower is better)" if metric["lower_is_better"] else
                                           " (higher is better)")
    label = label or (lambda c: " ".join([c["method"], *Run("x", "m", c["options"]).option_args()]))
    head = ["run", f"{name}{direction}: mean ± std", "[min, max]", "seeds", *(h for h, _ in extra or []),
            "base MiB", "train peak MiB", "s / step"]
    body = []
    for c in (sort_cells(cells) if sort else cells):
        seeds = f"{c['n']}" + (f" ({len(c['failed'])} failed: {', '.join(map(str, c['failed']))})" if c["failed"]
                               else "")
        body.append([label(c), f"{_fmt_value(c['mean'], metric)} ± {_fmt_value(c['std'], metric)}",
                     f"[{_fmt_value(c['min'], metric)}, {_fmt_value(c['max'], metric)}]", seeds,
                     *(fn(c) for _, fn in extra or []),
                     "n/a" if math.isnan(c["base_mib"]) else f"{c['base_mib']:.2f}",
                     "n/a" if math.isnan(c["train_peak_mib"]) else f"{c['train_peak_mib']:.0f}",
                     "n/a" if math.isnan(c["s_per_step"]) else f"{c['s_per_step']:.3f}"])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells_: "| " + " | ".join(t.ljust(w) for t, w in zip(cells_, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body])


def plot(panels: list[dict], path: str, *, title: str | None = None, ncols: int = 2) -> str:
    """Write a PNG of one or more panels with matplotlib (Agg); returns ``path``.

    Each panel: {"title", "cells", "x": fn(cell) -> float, "xlabel", "series": fn(cell) -> name
    (None leaves the cell out), optional "xscale" ("linear" / "log"), "point_label": fn(cell) -> str,
    "ylabel", "xticks" (tick positions, labelled with their values), "lines" (default True), "dodge" (default 0: series i's x is multiplied by (1 + dodge) **
    (i - (k - 1) / 2) of k series, to set a log-x panel's points side by side); each series is drawn as
    markers at (x, mean), joined in x order unless "lines" is False, with error bars from min to max
    over the seeds.  Cells without a
    finished run are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.6 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        series: dict[str, list] = {}
        metric = None
        for c in panel["cells"]:
            name = panel["series"](c)
            if name is None or c["n"] == 0:
                continue
            x = panel["x"](c)
            if x is None or math.isnan(x):
                continue
            metric = metric or c["metric"]
            series.setdefault(name, []).append((x, c))
        scale = 100.0 if metric and metric["key"] == "accuracy" else 1.0
        dodge = float(panel.get("dodge", 0.0))
        for i, (name, pts) in enumerate(series.items()):
            pts.sort(key=lambda p: p[0])
            step = (1.0 + dodge) ** (i - (len(series) - 1) / 2)  # side by side where series share an x
            xs = [p[0] * step for p in pts]
            ys = [p[1]["mean"] * scale for p in pts]
            err = [[(p[1]["mean"] - p[1]["min"]) * scale for p in pts], [(p[1]["max"] - p[1]["mean"]) * scale
                                                                         for p in pts]]
            joined = len(pts) > 1 and panel.get("lines", True)
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, linestyle="-" if joined else "none", label=name)
            if "point_label" in panel:
                for x, (_, c), y in zip(xs, pts, ys):
                    ax.annotate(panel["point_label"](c), (x, y), textcoords="offset points", xytext=(3, 4),
                                fontsize=7)
        ax.set_xscale(panel.get("xscale", "linear"))
        if panel.get("xticks"):
            from matplotlib.ticker import NullFormatter

            ax.set_xticks(list(panel["xticks"]), [f"{t:g}" for t in panel["xticks"]])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(panel.get("xlabel", ""))
        default_y = "" if metric is None else metric["header"] + (" (%)" if scale == 100.0 else "")
        if metric is not None:
            default_y += " (lower is better)" if metric["lower_is_better"] and "lower" not in default_y else ""
        ax.set_ylabel(panel.get("ylabel", default_y))
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def failures_text(outcomes: list[Outcome]) -> list[str]:
    """One line per failed run: its key and the first line of why."""
    return [f"failed: {os.path.basename(o.path)[:-5]}: {o.error.splitlines()[0]} (log {o.log})"
            for o in outcomes if o.status == "failed"]


# ----------------------------------------------------------------------------------------------
# command line: a grid over one front end
# ----------------------------------------------------------------------------------------------
def add_sweep_arguments(p: argparse.ArgumentParser, name: str) -> None:
    """The options every sweep script shares: --steps, --jobs, --results (the cache folder
    results/<name>_runs), --md / --png (results/<name>.md / .png), --timeout, --dry-run."""
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every run (default: the environment variable STEPS, else each front "
                        "end's default)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one torch thread each (default 1)")
    p.add_argument("--results", default=os.path.join(ROOT, "results", f"{name}_runs"),
                   help=f"folder of the per-run JSON files, the cache (default results/{name}_runs)")
    p.add_argument("--md", default=os.path.join(ROOT, "results", f"{name}.md"), help="markdown output")
    p.add_argument("--png", default=os.path.join(ROOT, "results", f"{name}.png"), help="PNG output")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run (default: no limit)")
    p.add_argument("--dry-run", action="store_true", help="print the command lines and stop")


def check_sweep_arguments(p: argparse.ArgumentParser, args) -> int | None:
    """Check the options of :func:`add_sweep_arguments` (argparse errors naming the option);
    returns the steps of every run (``steps_from_env``)."""
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.timeout is not None and not args.timeout > 0:
        p.error(f"--timeout must be > 0, got {args.timeout}")
    try:
        return steps_from_env(args.steps)
    except ValueError as exc:
        p.error(str(exc))


def run_and_report(runs: dict[str, list[Run]], args, steps: int | None, tag: str,
                   report: Callable[[dict], str], panels: Callable[[dict], list[dict]], title: str) -> int:
    """Run the grids ``runs`` ({group: runs}) as :func:`add_sweep_arguments`' options say (or print
    their command lines with --dry-run), aggregate each group (the runs whose tags[tag] is the
    group), write report(cells per group) to --md and plot(panels(cells per group)) to --png.
    Returns the exit code: 1 when a run failed, else 0."""
    if args.dry_run:
        for group_runs in runs.values():
            for r in group_runs:
                print(" ".join(r.argv(os.path.join(args.results, r.key(steps) + ".json"), steps)[1:]))
        return 0
    every = [r for group_runs in runs.values() for r in group_runs]
    outcomes = run_grid(every, args.results, jobs=args.jobs, steps=steps, timeout=args.timeout)
    cells = {g: aggregate([o for o in outcomes if o.run.tags[tag] == g]) for g in runs}
    text = report(cells, outcomes)
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
    with open(args.md, "w") as f:
        f.write(text)
    plot(panels(cells), args.png, title=title)
    print(text)
    print(f"wrote {args.md} and {args.png}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _parse_axis(text: str) -> tuple[str, list]:
    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=V1,V2,... (for example energy=0.8,0.9), got {text!r}")
    return "--" + name.strip().lstrip("-"), [v for v in values.split(",") if v != ""]


def main(argv: list[str] | None = None) -> list[dict]:
    """The command line (see the module docstring); returns the cells."""
    p = argparse.ArgumentParser(description="Run a grid of one front end's runs (one process each, cached per "
                                            "run in --results, resumable) and aggregate them over seeds.")
    p.add_argument("script", help="the front-end script (python/finetune_*.py)")
    p.add_argument("--methods", nargs="+", required=True, help="values of --method")
    p.add_argument("--grid", type=_parse_axis, action="append", default=[], metavar="NAME=V1,V2",
                   help="an option and its values (repeatable: the cartesian product)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    p.add_argument("--results", required=True, help="folder of the per-run JSON files (the cache)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one torch thread each (default 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every run (default: the environment variable STEPS, else the front "
                        "end's default)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run (default: no limit)")
    p.add_argument("--table", default=None, help="write the markdown table here")
    p.add_argument("--png", default=None, help="write a plot of the metric against the first --grid axis here")
    args = p.parse_args(argv)
    if not os.path.isfile(args.script):
        p.error(f"script: expected a front-end script, got {args.script!r} (no such file)")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.timeout is not None and not args.timeout > 0:
        p.error(f"--timeout must be > 0, got {args.timeout}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds: expected distinct seeds, got {args.seeds}")
    try:
        steps = steps_from_env(args.steps)
    except ValueError as exc:
        p.error(str(exc))
    axes = dict(args.grid)
    runs = grid(args.script, args.methods, args.seeds, axes)
    outcomes = run_grid(runs, args.results, jobs=args.jobs, steps=steps, timeout=args.timeout)
    cells = aggregate(outcomes)
    table = markdown_table(cells)
    lines = [f"{os.path.basename(args.script)}: {len(runs)} runs, seeds {args.seeds}, "
             f"steps {steps if steps is not None else 'default'}", "", table, "", *failures_text(outcomes)]
    print("\n".join(lines))
    if args.table:
        with open(args.table, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.png:
        first = next(iter(axes), None)
        x = (lambda c: float(c["options"][first])) if first else (lambda c: 0.0)
        plot([{"cells": cells, "x": x, "xlabel": first or "", "series": lambda c: c["method"],
               "title": os.path.basename(args.script)}], args.png)
    if any(o.status == "failed" for o in outcomes):
        sys.exit(1)
    return cells


if __name__ == "__main__":
    main()
