"""The two sweep scripts built on python/_sweep.py: the memory / quality frontier (python/frontier.py)
and the delta-init study (python/study_init.py).

Checked without training anything: the grid each script plans (runs per job / task, their methods,
options and tags), that every planned command line is accepted by the real front end's parser and
checks (python/_frontend.py ``build_parser`` / ``check_args``) and resolves to what the run's tags
say (energy or budget, quantized storage, LoRA rank, calibration on or off), ``--dry-run``'s output,
and the argument errors (exit 2, naming the option).
"""
from __future__ import annotations

import importlib
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import _frontend  # noqa: E402
import frontier  # noqa: E402
import study_init  # noqa: E402


def _resolved(run, steps=None):
    """The front end's parsed and checked arguments of ``run``'s command line."""
    fe = importlib.import_module(Path(run.script).stem).FRONT_END
    parser = _frontend.build_parser(fe)
    args = parser.parse_args(run.argv("x.json", steps)[2:])
    _frontend.check_args(fe, parser, args)
    return fe, args


@pytest.mark.parametrize("job", sorted(frontier.JOBS))
def test_frontier_grid_and_every_command_line_parses(job):
    runs = frontier.runs_for(job, [0, 3])
    assert len(runs) == 2 * 18 and {r.seed for r in runs} == {0, 3}
    one_seed = [r for r in runs if r.seed == 0]
    families = [r.tags["family"] for r in one_seed]
    assert {f: families.count(f) for f in frontier.FAMILIES} == {
        "CERSA energy": 5, "CERSA budget": 2, "CERSA int8": 3, "CERSA nf4": 3, "LoRA": 3, "QLoRA": 1, "full": 1}
    for r in one_seed:
        fe, args = _resolved(r)
        family = r.tags["family"]
        assert args.method == r.method and args.seed == 0 and args.threads == 1
        if family.startswith("CERSA"):
            if "--budget" in r.options:
                assert args.budget == r.options["--budget"] and args.energy is None
            else:
                assert args.energy == r.options["--energy"] and args.budget is None
            want = {"CERSA int8": "int8", "CERSA nf4": "nf4"}.get(family)
            assert _frontend.cersa_quantize(r.method, args) == want
            # the CERSA runs calibrate exactly as the front end does by default
            assert args.calibration == fe.default_calibration
        elif family == "LoRA":
            assert args.lora_rank == r.options["--lora-rank"] and r.tags["point"] == f"r{args.lora_rank}"
        elif family == "QLoRA":
            assert args.exclude == frontier.QLORA_OPTIONS.get(job, {}).get("--exclude")
    assert sorted(r.options["--energy"] for r in one_seed if r.tags["family"] == "CERSA energy") == \
        sorted(frontier.ENERGIES)


def test_study_init_grid_calibration_off_is_explicit():
    runs = study_init.runs_for("tweets", ["principal", "lora"], ["off", "on"], [5e-4, 1e-3], [0, 1, 2])
    assert len(runs) == (2 * 2 * 2 + 2) * 3
    for r in runs:
        fe, args = _resolved(r)
        assert args.lr == r.tags["lr"]
        if r.method == "cersa":
            on = r.tags["series"].endswith("calibration on")
            # "off" must be said on the command line: the tweets front end calibrates by default
            assert r.options["--calibration"] == (study_init.CALIBRATION_BATCHES if on else 0)
            assert args.calibration == (study_init.CALIBRATION_BATCHES if on else None)
            assert args.init == r.options["--init"] and r.tags["series"].startswith(f"cersa init={args.init} ")
        else:
            assert r.method == "lora" and "--calibration" not in r.options and args.calibration is None
    assert study_init.runs_for("bbc", ["principal"], ["on"], [1e-3], [0], lora=False)[0].script.endswith(
        "finetune_bbc.py")


@pytest.mark.parametrize("script, argv, count", [
    (frontier, ["--tasks", "bbc", "--seeds", "0"], 18),
    (study_init, ["--tasks", "tweets", "--inits", "principal", "--calibration", "both", "--lrs", "0.001",
                  "--seeds", "0", "1"], 6),
])
def test_dry_run_lists_the_command_lines(script, argv, count, tmp_path, capsys):
    assert script.main([*argv, "--dry-run", "--results", str(tmp_path), "--steps", "3"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == count
    for ln in lines:
        words = shlex.split(ln)
        assert words[0].endswith(".py") and "--steps" in words and words[words.index("--steps") + 1] == "3"
        assert words[words.index("--json") + 1].startswith(str(tmp_path))
    assert not any(tmp_path.iterdir())  # a dry run starts nothing and writes nothing


@pytest.mark.parametrize("script, argv, message", [
    (frontier, ["--seeds", "0", "0"], "--seeds: expected distinct seeds"),
    (frontier, ["--tasks", "llm"], "invalid choice: 'llm'"),
    (frontier, ["--jobs", "0"], "--jobs must be >= 1, got 0"),
    (study_init, ["--inits", "nope"], "--inits: expected values among"),
    (study_init, ["--lrs", "0.001", "0.001"], "--lrs: expected distinct values"),
    (study_init, ["--lrs", "0", "1e-3"], "--lrs: expected finite learning rates > 0, got [0.0]"),
    (study_init, ["--steps", "0"], "--steps must be >= 1, got 0"),
    (study_init, ["--calibration", "sometimes"], "invalid choice: 'sometimes'"),
])
def test_bad_arguments_name_the_option(script, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main([*argv, "--dry-run", "--results", str(tmp_path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err
