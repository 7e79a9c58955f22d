"""Tests of the sweep tool (python/_sweep.py) with a fake front end run as a real subprocess.

The fake front end (a small script written to a temporary folder, standard library only) accepts
the runner's command line (--method --seed --threads --quiet --json --steps and a few options),
appends one line per invocation to a log file, and writes the runner's --json layout with a metric
computed from its options and seed.  Checked: the command line of each run, one process per run
with --threads 1, the cache (a second sweep starts nothing, an added seed starts one process, a
failed run leaves no result and runs again), the aggregation numbers (mean, sample std, min, max
per cell over the seeds), a lower-is-better metric's ordering, the markdown table, the PNG, the
command line of the tool, and its errors.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import _sweep  # noqa: E402

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None

FAKE = r'''
import argparse, json, os, sys
p = argparse.ArgumentParser()
p.add_argument("--method", required=True)
p.add_argument("--seed", type=int, required=True)
p.add_argument("--threads", type=int, required=True)
p.add_argument("--quiet", action="store_true")
p.add_argument("--json", required=True)
p.add_argument("--steps", type=int, default=7)
p.add_argument("--energy", type=float, default=0.9)
p.add_argument("--double-quant", action="store_true")
p.add_argument("--exclude", nargs="+", default=None)
p.add_argument("--lower", action="store_true")
args = p.parse_args()
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "steps_env": os.environ.get("STEPS"), "pid": os.getpid()}) + "\n")
if os.environ.get("FAKE_FAIL_SEED") == str(args.seed):
    print("fake failure", file=sys.stderr)
    sys.exit(3)
value = args.energy + 0.01 * args.seed ** 2 + (0.1 if args.double_quant else 0.0)
metric = {"key": "mse" if args.lower else "accuracy", "header": "MSE" if args.lower else "accuracy",
          "lower_is_better": args.lower}
row = {"method": args.method, metric["key"]: value, "base_bytes": 2**20 * (1 + args.seed), "train_peak_rss_mib": 100.0,
       "s_per_step": 0.5, "trainable": 10, "peak_rss_mib": 120.0, "steps": args.steps, "threads": args.threads}
with open(args.json, "w") as f:
    json.dump({"title": "fake", "metric": metric, "options": vars(args), "rows": [row]}, f)
'''


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_frontend.py"
    script.write_text(FAKE)
    log = tmp_path / "invocations.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.delenv("FAKE_FAIL_SEED", raising=False)
    monkeypatch.setenv("STEPS", "99")  # the sweep must not pass it on

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return script, calls


def _runs(script, seeds=(0, 1, 2), **extra):
    return [_sweep.Run(str(script), "cersa", {"--energy": e, **extra}, s, {"energy": e})
            for e in (0.8, 0.9) for s in seeds]


def test_command_line_of_a_run():
    run = _sweep.Run("fe.py", "lora", {"--energy": 0.8, "--double-quant": True, "--init": None, "--flag": False,
                                       "--exclude": ["a.b", "c*"]}, seed=3)
    argv = run.argv("out.json", steps=5, python="py")
    assert argv == ["py", "fe.py", "--method", "lora", "--seed", "3", "--threads", "1", "--quiet", "--json",
                    "out.json", "--steps", "5", "--energy", "0.8", "--double-quant", "--exclude", "a.b", "c*"]
    assert "--steps" not in run.argv("out.json", steps=None)
    # the key follows what decides the result: not the tags, not None / False options
    same = _sweep.Run("other/fe.py", "lora", {"--exclude": ["a.b", "c*"], "--double-quant": True, "--energy": 0.8},
                      seed=3, tags={"x": 1})
    assert run.key(5) == same.key(5)
    assert run.key(5) != run.key(6) and run.key(5) != _sweep.Run("fe.py", "lora", run.options, 4).key(5)
    assert run.key(5).startswith("fe-lora-seed3-")
    for bad in ({"energy": 0.8}, {"--seed": 1}, {"--threads": 2}):
        with pytest.raises(ValueError, match="options"):
            _sweep.Run("fe.py", "cersa", bad)


def test_grid_is_the_cartesian_product():
    runs = _sweep.grid("fe.py", ["cersa", "lora"], [0, 1], {"--lr": [1e-3, 2e-3], "--init": ["a"]}, {"task": "t"})
    assert len(runs) == 8
    assert [(r.method, r.options["--lr"], r.seed) for r in runs[:4]] == [("cersa", 1e-3, 0), ("cersa", 1e-3, 1),
                                                                         ("cersa", 2e-3, 0), ("cersa", 2e-3, 1)]
    assert runs[0].tags == {"task": "t", "method": "cersa", "lr": 1e-3, "init": "a"}


def test_sweep_runs_caches_resumes_and_aggregates(fake, tmp_path):
    script, calls = fake
    results = tmp_path / "results"
    runs = _runs(script)
    outcomes = _sweep.run_grid(runs, str(results), jobs=2, steps=4, quiet=True)
    assert [o.status for o in outcomes] == ["ran"] * 6
    log = calls()
    assert len(log) == 6 and len({c["pid"] for c in log}) == 6  # one process per run
    assert all(c["steps_env"] is None for c in log)  # STEPS was not passed on
    for c in log:
        a = c["argv"]
        assert a[a.index("--threads") + 1] == "1" and a[a.index("--steps") + 1] == "4" and "--quiet" in a
    assert sorted(os.listdir(results)) == sorted([r.key(4) + ".json" for r in runs] + [r.key(4) + ".log" for r in runs])
    stored = json.loads((results / (runs[0].key(4) + ".json")).read_text())
    assert stored["run"]["seed"] == 0 and stored["run"]["steps"] == 4 and stored["result"]["rows"][0]["steps"] == 4

    cells = _sweep.aggregate(outcomes)
    assert [c["options"]["--energy"] for c in cells] == [0.8, 0.9]
    for c, e in zip(cells, (0.8, 0.9)):
        values = [e + 0.01 * s ** 2 for s in (0, 1, 2)]  # seeds 0, 1, 2
        assert c["n"] == 3 and c["seeds"] == [0, 1, 2] and c["failed"] == []
        assert c["values"] == pytest.approx(values)
        assert c["mean"] == pytest.approx(e + 0.05 / 3)
        assert c["std"] == pytest.approx(statistics.stdev(values)) and c["std"] == pytest.approx(0.0208167, rel=1e-5)
        assert (c["min"], c["max"]) == (pytest.approx(e), pytest.approx(e + 0.04))
        assert c["base_mib"] == pytest.approx(2.0)  # mean of 1, 2, 3 MiB
        assert c["train_peak_mib"] == 100.0 and c["s_per_step"] == 0.5 and c["metric"]["key"] == "accuracy"
        assert c["tags"] == {"energy": e}

    # the same sweep again: every run cached, no process started
    again = _sweep.run_grid(runs, str(results), jobs=2, steps=4, quiet=True)
    assert [o.status for o in again] == ["cached"] * 6 and len(calls()) == 6
    assert _sweep.aggregate(again)[0]["mean"] == cells[0]["mean"]
    # one more seed: only its two runs start; another step count is another run
    more = _runs(script, seeds=(0, 1, 2, 3))
    out = _sweep.run_grid(more, str(results), jobs=1, steps=4, quiet=True)
    assert [o.status for o in out].count("ran") == 2 and len(calls()) == 8
    assert _sweep.aggregate(out)[1]["max"] == pytest.approx(0.9 + 0.09)
    out = _sweep.run_grid(runs[:1], str(results), steps=5, quiet=True)
    assert out[0].status == "ran" and len(calls()) == 9


def test_an_interrupted_run_runs_again(fake, tmp_path):
    script, calls = fake
    results = tmp_path / "results"
    run = _runs(script, seeds=(0,))[0]
    results.mkdir()
    # a run killed before it finished leaves its part file and log, or a truncated result file
    (results / (run.key(None) + ".part.json")).write_text('{"title": "fa')
    (results / (run.key(None) + ".json")).write_text('{"run": ')
    (out,) = _sweep.run_grid([run], str(results), quiet=True)
    assert out.status == "ran" and len(calls()) == 1 and out.row["accuracy"] == pytest.approx(0.8)
    assert not (results / (run.key(None) + ".part.json")).exists()
    assert out.row["steps"] == 7  # the front end's default: no --steps given


def test_a_failed_run_is_reported_and_retried(fake, tmp_path, monkeypatch):
    script, calls = fake
    results = tmp_path / "results"
    monkeypatch.setenv("FAKE_FAIL_SEED", "1")
    runs = _runs(script)
    outcomes = _sweep.run_grid(runs, str(results), jobs=3, quiet=True)
    assert [o.status for o in outcomes] == ["ran", "failed", "ran"] * 2
    failed = outcomes[1]
    assert not os.path.exists(failed.path) and "exit code 3" in failed.error and "fake failure" in failed.error
    cells = _sweep.aggregate(outcomes)
    assert cells[0]["n"] == 2 and cells[0]["failed"] == [1] and cells[0]["seeds"] == [0, 2]
    assert cells[0]["mean"] == pytest.approx(0.8 + 0.02) and cells[0]["std"] == pytest.approx(0.04 / 2 ** 0.5)
    table = _sweep.markdown_table(cells)
    assert "2 (1 failed: 1)" in table
    assert len(_sweep.failures_text(outcomes)) == 2
    monkeypatch.delenv("FAKE_FAIL_SEED")
    again = _sweep.run_grid(runs, str(results), jobs=3, quiet=True)
    assert [o.status for o in again] == ["cached", "ran", "cached"] * 2 and len(calls()) == 8


def test_table_orders_by_the_metric_direction(fake, tmp_path):
    script, _ = fake
    hi = _sweep.aggregate(_sweep.run_grid(_runs(script, seeds=(0, 1)), str(tmp_path / "a"), jobs=2, quiet=True))
    lo = _sweep.aggregate(_sweep.run_grid(_runs(script, seeds=(0, 1), **{"--lower": True}), str(tmp_path / "b"),
                                          jobs=2, quiet=True))
    assert [c["options"]["--energy"] for c in _sweep.sort_cells(hi)] == [0.9, 0.8]  # higher accuracy first
    assert lo[0]["metric"] == {"key": "mse", "header": "MSE", "lower_is_better": True}
    assert [c["options"]["--energy"] for c in _sweep.sort_cells(lo)] == [0.8, 0.9]  # lower MSE first
    lines = _sweep.markdown_table(hi).splitlines()
    assert "accuracy % (higher is better): mean ± std" in lines[0]
    assert lines[2].startswith("| cersa --energy 0.9 ") and "90.50 ± 0.71" in lines[2] and "[90.00, 91.00]" in lines[2]
    lines = _sweep.markdown_table(lo, label=lambda c: f"e={c['tags']['energy']}").splitlines()
    assert "MSE (lower is better)" in lines[0] and lines[2].startswith("| e=0.8 ") and "0.805 ± 0.007071" in lines[2]
    with pytest.raises(ValueError, match="expected one metric"):
        _sweep.aggregate(_sweep.run_grid(_runs(script, seeds=(0, 1)), str(tmp_path / "a"), quiet=True)
                         + _sweep.run_grid(_runs(script, seeds=(0, 1), **{"--lower": True}), str(tmp_path / "b"),
                                           quiet=True))


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib not installed (pip install matplotlib)")
def test_plot_writes_a_png(fake, tmp_path):
    script, _ = fake
    cells = _sweep.aggregate(_sweep.run_grid(_runs(script, seeds=(0, 1)), str(tmp_path / "r"), jobs=2, quiet=True))
    path = tmp_path / "plots" / "p.png"
    panels = [{"cells": cells, "x": lambda c: c["base_mib"], "series": lambda c: c["method"], "title": "a",
               "point_label": lambda c: str(c["tags"]["energy"])},
              {"cells": cells, "x": lambda c: c["options"]["--energy"], "series": lambda c: None, "title": "empty"}]
    assert _sweep.plot(panels, str(path), title="t") == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_command_line_tool(fake, tmp_path):
    script, calls = fake
    table = tmp_path / "t.md"
    argv = [sys.executable, str(ROOT / "python" / "_sweep.py"), str(script), "--methods", "cersa", "--grid",
            "energy=0.8,0.9", "--seeds", "0", "1", "--results", str(tmp_path / "r"), "--table", str(table)]
    proc = subprocess.run(argv + ["--grid", "double-quant="], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "expected NAME=V1,V2" in proc.stderr
    argv += ["--jobs", "2", "--steps", "3"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    assert len(calls()) == 4 and all(c["argv"][c["argv"].index("--steps") + 1] == "3" for c in calls())
    text = table.read_text()
    assert "4 runs, seeds [0, 1], steps 3" in text and "| cersa --energy 0.9 " in text and "90.50 ± 0.71" in text
    for bad, msg in ((["--jobs", "0"], "--jobs must be >= 1"), (["--seeds", "1", "1"], "distinct seeds")):
        proc = subprocess.run(argv + bad, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and msg in proc.stderr


def test_bad_arguments(tmp_path, monkeypatch):
    run = _sweep.Run("fe.py", "cersa", {}, 0)
    with pytest.raises(ValueError, match="jobs"):
        _sweep.run_grid([run], str(tmp_path), jobs=0)
    with pytest.raises(ValueError, match="steps"):
        _sweep.run_grid([run], str(tmp_path), steps=0)
    with pytest.raises(ValueError, match="distinct runs"):
        _sweep.run_grid([run, _sweep.Run("fe.py", "cersa", {}, 0, {"other": "tag"})], str(tmp_path))
    monkeypatch.setenv("STEPS", "x")
    with pytest.raises(ValueError, match="STEPS"):
        _sweep.steps_from_env()
    assert _sweep.steps_from_env(3) == 3
    monkeypatch.setenv("STEPS", "12")
    assert _sweep.steps_from_env() == 12
    monkeypatch.delenv("STEPS")
    assert _sweep.steps_from_env() is None
