"""Tests of the runner every front end uses (python/_frontend.py), on a toy front end.

The toy front end (written to a temporary file, so --compare can run it as a script) trains a small
MLP on seeded synthetic data; its first layer has rank 4, so CERSA converts it.  Checked: each method
runs in its own process, the table's columns and JSON results, STEPS from the environment, the
number of batches a run consumes, the learning-rate schedule, the measured fields, the base-weight
accounting of dense / LoRA / CERSA layers (CERSA factors stored as int8 / NF4 codes, QLoRA's NF4
weights: counted from the shapes, independently of the storage classes), the method variants and
the --quantize / --double-quant options, and the errors (a failing method, batches that run out,
an unknown method, storage options that no method uses).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON_DIR = ROOT / "python"
sys.path.insert(0, str(PYTHON_DIR))

import _frontend  # noqa: E402

HAVE_PEFT = importlib.util.find_spec("peft") is not None
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_qlora = pytest.mark.skipif(not (HAVE_PEFT and HAVE_BNB), reason="qlora needs peft and bitsandbytes "
                                 "(pip install --no-deps bitsandbytes==0.50.2 numpy packaging)")
processes = pytest.mark.slow(reason="starts Python processes that import torch, one per method (~10-20 s on 2 cores)")

TOY = '''
import os, sys
sys.path.insert(0, {python_dir!r})
sys.path.append({root!r})
import torch
from torch import nn
import _frontend
from _frontend import FrontEnd, Metric, Task, base_weights, prepare_method

def setup(method, args):
    if os.environ.get("TOY_FAIL") == method:
        raise RuntimeError("toy failure")
    g = torch.Generator().manual_seed(args.seed)
    X = torch.randn(96, 32, generator=g)
    y = (X[:, 0] > 0).long()
    body = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))
    with torch.no_grad():  # rank 4, four equal singular values: CERSA keeps all 4 and saves memory
        qa = torch.linalg.qr(torch.randn(32, 4, generator=g))[0]
        qb = torch.linalg.qr(torch.randn(32, 4, generator=g))[0]
        body[0].weight.copy_(qa @ qb.T / 2)
    dense = base_weights(body)[:2]
    body, extra = prepare_method(method, body, args)
    model = nn.Sequential(body, nn.Linear(8, 2))
    used = []
    limit = int(os.environ.get("TOY_BATCHES", "1000000"))

    def batches():
        for _ in range(limit):
            used.append(1)
            idx = torch.randint(0, 96, (args.batch_size,), generator=g)
            yield (X[idx],), y[idx]

    def record(trained):
        extra["batches_used"] = len(used)

    extra["pid"] = os.getpid()
    return Task(model=model, head=list(model[1].parameters()), batches=batches(),
                evaluate=lambda m: float((m(X).argmax(-1) == y).float().mean()), base=(model[0], (nn.Linear,)),
                dense_base=dense, n_train=96, n_test=96, extra=extra, after_training=record)

FRONT_END = FrontEnd(script=__file__, description="toy", methods=("cersa", "lora", "full", "head"),
                     default_lr={{"cersa": 1e-2, "lora": 1e-2, "full": 1e-3, "head": 1e-2}}, head_lr=5e-2,
                     setup=setup, title=lambda args: f"toy: {{args.steps}} steps",
                     notes=lambda rows: [f"accuracy on {{rows[0]['n_test']}} toy points."],
                     base_label="toy base weights (MiB)", defaults={{"delta_rank": 2, "steps": 6, "log_every": 2}})

if __name__ == "__main__":
    _frontend.main(FRONT_END)
'''

HEADER = ("| method | accuracy | trainable params | toy base weights (MiB) | total params (MiB) | peak RSS (MiB) "
          "| train peak RSS (MiB) | s / step | lr")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "toy_frontend.py"
    path.write_text(TOY.format(python_dir=str(PYTHON_DIR), root=str(ROOT)))
    spec = importlib.util.spec_from_file_location("toy_frontend", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("STEPS", "TOY_FAIL", "TOY_BATCHES")}
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------
# --compare: one process per method, the table, JSON
# ------------------------------------------------------------------------------------------------
@processes
def test_compare_runs_each_method_in_its_own_process(toy, tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, toy.FRONT_END.script, "--methods", "full", "head", "--quiet",
                           "--json", str(out)], env=_env(STEPS="3"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    assert lines[header].replace(" ", "").startswith(HEADER.replace(" ", ""))
    assert [line.split("|")[1].strip() for line in lines[header + 2: header + 4]] == ["full", "head"]
    assert "toy: 3 steps; wall time" in proc.stdout and "accuracy on 96 toy points." in proc.stdout
    result = json.loads(out.read_text())
    assert result["options"]["steps"] == 3 and result["options"]["methods"] == ["full", "head"]
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["full", "head"]
    assert len({r["pid"] for r in rows} | {os.getpid()}) == 3  # two children, neither is this process
    for r in rows:
        assert r["steps"] == 3 and r["batches_used"] == 3  # STEPS reached the children; one batch a step
    full, head = rows
    assert full["base_frozen"] is False and head["base_frozen"] is True
    assert head["trainable"] == 8 * 2 + 2 and full["trainable"] == 32 * 32 + 32 + 32 * 8 + 8 + 18
    assert full["lr"] == 1e-3 and head["lr"] == 1e-2 and full["head_lr"] == 5e-2


@processes
def test_a_failing_method_is_named(toy, monkeypatch, capsys):
    monkeypatch.setenv("TOY_FAIL", "head")
    monkeypatch.delenv("STEPS", raising=False)
    with pytest.raises(RuntimeError, match=r"these runs failed: head \(exit code 1\)"):
        _frontend.main(toy.FRONT_END, ["--methods", "full", "head", "--steps", "2", "--quiet"])
    assert "| full" in capsys.readouterr().out  # the table of the runs that worked


# ------------------------------------------------------------------------------------------------
# one method in this process
# ------------------------------------------------------------------------------------------------
def _run(toy, method, monkeypatch, *argv):
    monkeypatch.delenv("STEPS", raising=False)
    (row,) = _frontend.main(toy.FRONT_END, ["--method", method, "--quiet", *argv])
    return row


def test_measured_fields(toy, monkeypatch):
    row = _run(toy, "full", monkeypatch, "--steps", "5")
    assert row["batches_used"] == 5 and row["steps"] == 5 and row["n_test"] == 96
    assert row["s_per_step"] > 0 and row["total_s"] >= row["train_s"] > 0
    assert row["peak_rss_mib"] >= row["train_peak_rss_mib"] > 0  # VmHWM was reset before the first step
    assert 0.0 <= row["accuracy"] <= 1.0 and math.isfinite(row["final_loss"])
    assert row["base_layers"] == row["dense_base_layers"] == 2
    assert row["base_bytes"] == row["dense_base_bytes"] == 4 * (32 * 32 + 32 * 8)


def test_cersa_counts_the_factors(toy, monkeypatch):
    import cersa_kernels  # noqa: F401  (the layers the row counts)

    row = _run(toy, "cersa", monkeypatch, "--steps", "2")
    assert row["layers_converted"] >= 1 and row["layers_candidates"] == 2
    assert row["base_bytes"] < row["dense_base_bytes"] and row["base_frozen"] is True
    assert row["rank_fraction_min"] == pytest.approx(4 / 32)  # the rank-4 layer


@pytest.mark.skipif(not HAVE_PEFT, reason="peft not installed (pip install peft)")
def test_lora_counts_only_the_base_layers(toy, monkeypatch):
    row = _run(toy, "lora", monkeypatch, "--steps", "2", "--delta-rank", "3")
    assert row["base_layers"] == 2 and row["base_bytes"] == row["dense_base_bytes"] and row["base_frozen"] is True
    assert row["trainable"] == 3 * (32 + 32) + 3 * (32 + 8) + 18


def test_batches_that_run_out_are_an_error(toy, monkeypatch):
    monkeypatch.setenv("TOY_BATCHES", "2")
    with pytest.raises(RuntimeError, match="ended after 2 steps, expected --steps 4"):
        _run(toy, "head", monkeypatch, "--steps", "4")


def test_unknown_method_is_an_error(toy):
    with pytest.raises(ValueError, match="method: expected one of"):
        _frontend.prepare_method("dora", None, None)
    spec = dict(script="x.py", description="", methods=("full", "head"), default_lr={"full": 1e-3}, head_lr=1e-2,
                setup=toy.setup, title=str, notes=lambda rows: [], base_label="base")
    with pytest.raises(ValueError, match=r"default_lr: .* missing \['head'\]"):
        _frontend.FrontEnd(**spec)
    with pytest.raises(ValueError, match="defaults: expected keys among"):
        _frontend.FrontEnd(**{**spec, "default_lr": {"full": 1e-3, "head": 1e-3}, "defaults": {"step": 3}})


# ------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------
def test_schedule_warms_up_then_decays_to_zero():
    f = _frontend.warmup_linear_decay(20)  # 2 warm-up steps
    assert [f(s) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert f(11) == pytest.approx(9 / 18) and f(19) == pytest.approx(1 / 18) and f(20) == 0.0
    g = _frontend.warmup_linear_decay(3)  # at least one warm-up step
    assert [g(s) for s in (0, 1, 2)] == [1.0, 1.0, 0.5]


def test_table_formatting():
    row = {"method": "m", "ppl": 12.345, "trainable": 1234567, "base_bytes": 2**20, "dense_base_bytes": 2**21,
           "base_frozen": True, "total_param_bytes": 3 * 2**20, "peak_rss_mib": 100.4,
           "train_peak_rss_mib": float("nan"), "s_per_step": 0.12345, "lr": 0.0005}
    metric = _frontend.Metric("ppl", "perplexity", lambda v: f"{v:.1f}")
    head, rule, line = _frontend.method_table([row], "base (MiB)", metric)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert [c.strip() for c in head.strip("|").split("|")][:2] == ["method", "perplexity"]
    assert cells == ["m", "12.3", "1,234,567", "1.00 frozen (0.500x dense)", "3.00", "100", "n/a", "0.123",
                     "0.0005"]
    assert set(rule) == {"|", "-"} and len(rule) == len(head) == len(line)


# ------------------------------------------------------------------------------------------------
# factor storage: cersa-int8 / cersa-nf4, --quantize / --double-quant, qlora
# ------------------------------------------------------------------------------------------------
def _blockwise_bytes(numel, bits, double_quant, block=64):
    """Bytes of ``numel`` numbers as blockwise codes of ``bits`` bits (rounded up to whole bytes) plus
    one float32 absmax per block, or with double quantization one int8 code per block, a float32
    scale per 256 blocks and one float32 mean."""
    blocks = -(-numel // block)
    scales = blocks + 4 * -(-blocks // 256) + 4 if double_quant else 4 * blocks
    return -(-numel * bits // 8) + scales


def _toy_body(seed=0):
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    body = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))
    with torch.no_grad():
        qa = torch.linalg.qr(torch.randn(32, 4, generator=g))[0]
        qb = torch.linalg.qr(torch.randn(32, 4, generator=g))[0]
        body[0].weight.copy_(qa @ qb.T / 2)
    return body


def _args(toy, *argv):
    parser = _frontend.build_parser(toy.FRONT_END)
    args = parser.parse_args(["--quiet", *argv])
    os.environ.pop("STEPS", None)
    _frontend.check_args(toy.FRONT_END, parser, args)
    return parser, args


@pytest.mark.parametrize("method,bits", [("cersa-int8", 8), ("cersa-nf4", 4)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantized_cersa_counts_codes_and_scales(toy, method, bits, double_quant):
    import cersa_kernels
    from torch import nn

    _, args = _args(toy, "--method", method, *(["--double-quant"] if double_quant else []))
    body, extra = _frontend.prepare_method(method, _toy_body(), args)
    assert extra["quantize"] == method.split("-")[1] and extra["double_quant"] is double_quant
    layers = [m for m in body.modules() if isinstance(m, cersa_kernels.layers.CersaLayer)]
    dense = [m for m in body.modules() if type(m) is nn.Linear]
    assert layers and len(layers) + len(dense) == 2
    for m in layers:
        assert isinstance(m.U, cersa_kernels.quant.QuantizedMatrix) and m.U.quant_type == extra["quantize"]
    expected = sum(_blockwise_bytes(m.out_features * m.frozen_rank, bits, double_quant)
                   + _blockwise_bytes(m.frozen_rank * m.in_features, bits, double_quant) + 4 * m.frozen_rank
                   for m in layers) + sum(4 * m.weight.numel() for m in dense)
    count, nbytes, trainable = _frontend.base_weights(body)
    assert (count, nbytes, trainable) == (2, expected, False)
    # the same layers unquantized store 4 bytes a number
    _, plain_args = _args(toy, "--method", "cersa")
    plain, plain_extra = _frontend.prepare_method("cersa", _toy_body(), plain_args)
    assert plain_extra["quantize"] == "none" and _frontend.base_weights(plain)[1] > nbytes


def test_quantize_option_sets_cersa_storage(toy, monkeypatch):
    import cersa_kernels

    row = _run(toy, "cersa", monkeypatch, "--steps", "2", "--quantize", "int8")
    assert row["quantize"] == "int8" and row["double_quant"] is False and row["base_frozen"] is True
    assert row["base_bytes"] < row["dense_base_bytes"]
    row_nf4 = _run(toy, "cersa-nf4", monkeypatch, "--steps", "2", "--double-quant")
    assert row_nf4["quantize"] == "nf4" and row_nf4["double_quant"] is True
    assert row_nf4["base_bytes"] < row["base_bytes"]
    assert row_nf4["lr"] == toy.FRONT_END.default_lr["cersa"]  # a variant trains at its base's rate
    assert cersa_kernels.quant.QUANT_TYPES == ("int8", "nf4")
    table = _frontend.format_table(toy.FRONT_END, [row, row_nf4])
    assert "| cersa-nf4" in table and "cersa-nf4 U, Vh as nf4 + double quant" in table
    assert "cersa U, Vh as int8 (" in table


@needs_qlora
def test_qlora_counts_the_packed_nf4_weights(toy):
    import torch

    _, args = _args(toy, "--method", "qlora", "--delta-rank", "3")
    body, extra = _frontend.prepare_method("qlora", _toy_body(), args)
    assert extra["quantize"] == "nf4" and extra["double_quant"] is True
    expected = _blockwise_bytes(32 * 32, 4, True) + _blockwise_bytes(8 * 32, 4, True)
    assert _frontend.base_weights(body) == (2, expected, False)
    lora = {n: p for n, p in body.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert sum(p.numel() for p in lora.values()) == 3 * (32 + 32) + 3 * (32 + 8)
    scale = {m.scaling["default"] for m in body.modules() if hasattr(m, "scaling") and m.scaling}
    assert scale == {1.0}  # lora_alpha = rank, as lora
    # a training step (train mode: bitsandbytes' CPU inference path repacks weights in blocks of 64
    # input features, which this 32-feature toy does not have; the BBC front end runs qlora end to end)
    body.train()
    body(torch.randn(5, 32)).square().sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in lora.values())
    assert _frontend.base_weights(body) == (2, expected, False)
    assert toy.FRONT_END.lr_for("qlora") == toy.FRONT_END.default_lr["lora"]


def test_variants_are_offered_and_storage_options_forwarded(toy):
    assert toy.FRONT_END.choices == ("cersa", "lora", "full", "head", "cersa-int8", "cersa-nf4", "qlora")
    assert _frontend.method_base("cersa-nf4") == "cersa" and _frontend.method_base("qlora") == "lora"
    parser, args = _args(toy, "--methods", "cersa", "cersa-int8", "cersa-nf4", "lora", "qlora",
                         "--quantize", "nf4", "--double-quant")
    argv = {m: _frontend.child_argv(toy.FRONT_END, parser, args, m, f"{m}.json") for m in args.methods}
    assert argv["cersa"][argv["cersa"].index("--quantize") + 1] == "nf4" and "--double-quant" in argv["cersa"]
    for m in ("cersa-int8", "cersa-nf4"):
        assert "--quantize" not in argv[m] and "--double-quant" in argv[m]
    for m in ("lora", "qlora"):
        assert "--quantize" not in argv[m] and "--double-quant" not in argv[m]
    # each child's command line passes the child's own checks
    for m, a in argv.items():
        child = parser.parse_args(a[2:])
        _frontend.check_args(toy.FRONT_END, parser, child)
        assert child.method == m
    # a front end without cersa gets no storage options
    spec = dict(script="x.py", description="", methods=("lora", "full"), default_lr={"lora": 1e-3, "full": 1e-3},
                head_lr=1e-2, setup=toy.setup, title=str, notes=lambda rows: [], base_label="base")
    fe = _frontend.FrontEnd(**spec)
    assert fe.choices == ("lora", "full", "qlora") and fe.lr_for("qlora") == 1e-3
    assert "--quantize" not in _frontend.build_parser(fe).format_help()


def test_storage_options_without_a_method_using_them_are_errors(toy, capsys):
    for argv, msg in ((["--method", "lora", "--quantize", "nf4"], "--quantize nf4 sets the factor storage"),
                      (["--methods", "lora", "full", "--double-quant"], "--double-quant needs a quantized"),
                      (["--method", "cersa", "--double-quant"], "--double-quant needs a quantized"),
                      (["--method", "cersa-int8", "--quantize", "nf4"], "--quantize: cersa-int8 stores"),
                      (["--method", "cersa-int9"], "invalid choice")):
        with pytest.raises(SystemExit) as exc:
            _args(toy, *argv)
        assert exc.value.code == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected a CERSA method"):
        _frontend.cersa_quantize("lora", None)


# ------------------------------------------------------------------------------------------------
# the options every front end shares: checks, STEPS, defaults, forwarding (each real front end too)
# ------------------------------------------------------------------------------------------------
FRONT_END_MODULES = ("finetune_bbc", "finetune_tweets", "finetune_llm", "finetune_vit", "finetune_unet")


def _front_end(name):
    import importlib

    return importlib.import_module(name)


SHARED_BAD_OPTIONS = [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--delta-rank", "0"], "--delta-rank must be >= 1, got 0"),
    (["--energy", "0"], "--energy must be in (0, 1]"),
    (["--energy", "1.5"], "--energy must be in (0, 1], got 1.5"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--method", "cersa", "--compare"], "not allowed"),
    (["--method", "lora", "--compare"], "not allowed"),
    (["--lora-alpha", "0"], "--lora-alpha must be > 0"),
    (["--lora-rank", "0"], "--lora-rank must be >= 1, got 0"),
    (["--budget", "0"], "--budget must be a finite fraction > 0"),
    (["--budget", "nan"], "--budget must be a finite fraction > 0"),
    (["--budget", "0.5", "--energy", "0.9"], "--energy and --budget both set the CERSA ranks"),
    (["--init", "bogus"], "--init: expected one of"),
    (["--method", "full", "--init", "lora"], "--init sets the CERSA delta init"),
    (["--method", "full", "--lora-rank", "4"], "--lora-rank sets LoRA's rank"),
    (["--method", "cersa", "--lora-alpha", "4"], "--lora-alpha sets LoRA's lora_alpha"),
    (["--method", "full", "--exclude", "x"], "--exclude removes layers from CERSA's and LoRA's targets"),
    (["--exclude", " "], "--exclude: expected non-empty patterns"),
]


@pytest.mark.parametrize("name", FRONT_END_MODULES)
def test_shared_bad_options_exit_with_a_message(name, capsys, monkeypatch):
    fe = _front_end(name)
    monkeypatch.delenv("STEPS", raising=False)
    for argv, msg in SHARED_BAD_OPTIONS:
        with pytest.raises(SystemExit) as exc:
            fe.main(argv)
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err
        assert msg in err, (argv, err)
    inits = ", ".join(_frontend.cersa_inits())
    with pytest.raises(SystemExit):
        fe.main(["--init", "bogus"])
    assert f"--init: expected one of {inits} (cersa_kernels.config.INITS), got 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("name", FRONT_END_MODULES)
def test_steps_from_the_environment(name, capsys, monkeypatch):
    from helpers import parse_frontend

    fe = _front_end(name).FRONT_END
    default = fe.defaults["steps"]
    assert parse_frontend(fe, [], monkeypatch, steps_env="7")[1].steps == 7
    assert parse_frontend(fe, ["--steps", "3"], monkeypatch, steps_env="7")[1].steps == 3  # the option wins
    assert parse_frontend(fe, [], monkeypatch, steps_env="")[1].steps == default
    assert parse_frontend(fe, [], monkeypatch)[1].steps == default
    for bad in ("0", "-2", "five", "zero"):
        monkeypatch.setenv("STEPS", bad)
        with pytest.raises(SystemExit) as exc:
            _front_end(name).main(["--method", "cersa"])
        assert exc.value.code == 2
        assert f"STEPS (environment) must be a positive integer, got {bad!r}" in capsys.readouterr().err


def test_per_front_end_defaults_of_threads_lora_alpha_and_metric():
    bbc, tweets, llm, vit, unet = (_front_end(n).FRONT_END for n in FRONT_END_MODULES)
    assert (bbc.threads, tweets.threads, llm.threads, vit.threads, unet.threads) == (2, 2, 2, 2, 1)
    assert tweets.lora_alpha == 16.0 and bbc.lora_alpha is None and vit.lora_alpha is None
    assert not bbc.metric.lower_is_better and not vit.metric.lower_is_better
    assert llm.metric.lower_is_better and unet.metric.lower_is_better
    for fe in (bbc, tweets, llm, vit, unet):
        args = _frontend.build_parser(fe).parse_args([])
        assert args.threads == fe.threads and args.energy is None and args.budget is None and args.init is None
        assert args.lora_rank is None and args.exclude is None
        assert hasattr(args, "calibration") is fe.calibration
    assert all(fe.calibration for fe in (bbc, tweets, llm, vit, unet))
    # llm and unet measure the converted model before training (after a held-back, calibrated conversion)
    assert (llm.eval_before, unet.eval_before, bbc.eval_before, vit.eval_before) == (True, True, False, False)
    spec = dict(script="x.py", description="", methods=("full",), default_lr={"full": 1e-3}, head_lr=1e-2,
                setup=None, title=str, notes=lambda rows: [], base_label="base")
    for bad, msg in (({"threads": 0}, "threads: expected an int >= 1"), ({"lora_alpha": 0.0}, "lora_alpha")):
        with pytest.raises(ValueError, match=msg):
            _frontend.FrontEnd(**spec, **bad)


def test_metric_direction_orders_and_describes():
    acc = _frontend.Metric()
    ppl = _frontend.Metric("perplexity", "perplexity", str, lower_is_better=True)
    vals = [3.0, float("nan"), 1.0, 2.0]
    assert sorted(vals, key=acc.sort_key)[:3] == [3.0, 2.0, 1.0] and math.isnan(sorted(vals, key=acc.sort_key)[3])
    assert sorted(vals, key=ppl.sort_key)[:3] == [1.0, 2.0, 3.0]
    assert ppl.describe() == {"key": "perplexity", "header": "perplexity", "lower_is_better": True}


def test_child_argv_forwards_method_options_only_where_they_apply(toy, monkeypatch):
    monkeypatch.delenv("STEPS", raising=False)
    parser = _frontend.build_parser(toy.FRONT_END)
    args = parser.parse_args(["--methods", "cersa", "cersa-nf4", "lora", "qlora", "full", "--init", "lora",
                              "--budget", "0.5", "--lora-rank", "4", "--lora-alpha", "8", "--exclude", "2", "0"])
    _frontend.check_args(toy.FRONT_END, parser, args)
    argv = {m: _frontend.child_argv(toy.FRONT_END, parser, args, m, f"{m}.json") for m in args.methods}
    value = lambda a, flag: a[a.index(flag) + 1] if flag in a else None  # noqa: E731
    for m in ("cersa", "cersa-nf4"):
        assert value(argv[m], "--init") == "lora" and "--lora-rank" not in argv[m] and "--lora-alpha" not in argv[m]
        assert argv[m][argv[m].index("--exclude"):][:3] == ["--exclude", "2", "0"]
    for m in ("lora", "qlora"):
        assert "--init" not in argv[m] and value(argv[m], "--lora-rank") == "4"
        assert value(argv[m], "--lora-alpha") == "8.0"
        assert "--exclude" in argv[m]
    assert not {"--init", "--lora-rank", "--lora-alpha", "--exclude"} & set(argv["full"])
    for m, a in argv.items():  # the budget reaches every process (no energy then), and each child's checks pass
        assert value(a, "--budget") == "0.5" and "--energy" not in a
        child = parser.parse_args(a[2:])
        _frontend.check_args(toy.FRONT_END, parser, child)
        assert child.budget == 0.5 and child.energy is None
    # without --budget every process gets the resolved energy
    args = parser.parse_args(["--methods", "cersa", "lora"])
    _frontend.check_args(toy.FRONT_END, parser, args)
    assert args.energy == 0.93 and args.lora_alpha is None
    assert value(_frontend.child_argv(toy.FRONT_END, parser, args, "lora", "x.json"), "--energy") == "0.93"


def test_budget_init_and_exclude_reach_the_conversion(toy, monkeypatch):
    import cersa_kernels  # noqa: F401

    inits = _frontend.cersa_inits()
    plain = _run(toy, "cersa", monkeypatch, "--steps", "2")
    assert plain["energy"] == 0.93 and plain["budget"] is None and plain["calibration"] == 0
    from cersa_kernels.config import CersaConfig

    assert plain["init"] == CersaConfig().init
    other = next(i for i in inits if i != plain["init"])
    row = _run(toy, "cersa", monkeypatch, "--steps", "2", "--budget", "0.5", "--init", other)
    assert row["budget"] == 0.5 and row["energy"] is None and row["init"] == other
    assert row["base_bytes"] <= 0.5 * row["dense_base_bytes"] + 4 * 64  # U, S, Vh within the budget (and S)
    table = _frontend.format_table(toy.FRONT_END, [plain, row])
    assert f"rank budget 0.5, init {other}." in table and f"energy 0.93, init {plain['init']}." in table
    excluded = _run(toy, "cersa", monkeypatch, "--steps", "2", "--exclude", "2")
    assert excluded["layers_candidates"] == 1 and excluded["base_layers"] == 2  # layer "2" stays dense
    with pytest.raises(ValueError, match="exclude"):
        _run(toy, "cersa", monkeypatch, "--steps", "2", "--exclude", "nothing")


@pytest.mark.skipif(not HAVE_PEFT, reason="peft not installed (pip install peft)")
def test_lora_rank_alpha_and_exclude(toy, monkeypatch):
    row = _run(toy, "lora", monkeypatch, "--steps", "2", "--delta-rank", "5", "--lora-rank", "3",
               "--lora-alpha", "6", "--exclude", "2")
    assert row["lora_rank"] == 3 and row["lora_alpha"] == 6.0
    assert row["trainable"] == 3 * (32 + 32) + 18  # only layer "0" adapted
    _, args = _args(toy, "--method", "lora", "--lora-rank", "4", "--lora-alpha", "12")
    body, _ = _frontend.prepare_method("lora", _toy_body(), args)
    assert {m.scaling["default"] for m in body.modules() if hasattr(m, "scaling") and m.scaling} == {3.0}
    # defaults: the delta rank, alpha = rank
    row = _run(toy, "lora", monkeypatch, "--steps", "2", "--delta-rank", "2")
    assert row["lora_rank"] == 2 and row["lora_alpha"] == 2.0
    assert _frontend.lora_targets(_toy_body(), None, None) == ["0", "2"]
    assert _frontend.lora_targets(_toy_body(), ["0", "2"], ["2*"]) == ["0"]
    with pytest.raises(ValueError, match="--exclude: the pattern 'x' matches no LoRA target"):
        _frontend.lora_targets(_toy_body(), None, ["x"])
    with pytest.raises(ValueError, match="remove every one"):
        _frontend.lora_targets(_toy_body(), None, ["0", "2"])


def test_tweets_lora_alpha_reaches_only_lora_processes(monkeypatch):
    ft = _front_end("finetune_tweets")
    monkeypatch.delenv("STEPS", raising=False)
    parser = _frontend.build_parser(ft.FRONT_END)
    args = parser.parse_args(["--methods", "cersa", "lora", "qlora", "full"])
    _frontend.check_args(ft.FRONT_END, parser, args)
    assert args.lora_alpha == 16.0
    for m in args.methods:
        a = _frontend.child_argv(ft.FRONT_END, parser, args, m, "x.json")
        assert ("--lora-alpha" in a) is (m in ("lora", "qlora"))


class _FakeModel:
    def __init__(self):
        self.training = True
        self.calls = []

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode


def test_deferred_conversion_calibrates_on_the_first_batches():
    import argparse

    import torch

    model = _FakeModel()
    seen = []

    def loss(m, batch):
        seen.append((batch, m.training, torch.is_grad_enabled()))
        return torch.zeros(())

    task = _frontend.Task(model=model, head=[], batches=iter(range(10)), evaluate=lambda m: 0.0, base=(None,),
                          dense_base=(0, 0), loss=loss)
    fe = _frontend.FrontEnd(script="fe.py", description="", methods=("cersa",), default_lr={"cersa": 1e-3},
                            head_lr=1e-2, setup=None, title=str, notes=lambda rows: [], base_label="base")
    calls = []

    def convert_now(fn):
        fn(None)
        fn(None)  # a conversion may run the calibration more than once (several passes)
        calls.append(1)
        return {"layers_converted": 3}

    args = argparse.Namespace(calibration=3, _deferred_conversions=[convert_now])
    _frontend._run_deferred_conversions(fe, task, args)
    assert calls == [1] and task.extra == {"layers_converted": 3} and args._deferred_conversions == []
    assert [b for b, _, _ in seen] == [0, 1, 2, 0, 1, 2]
    assert all(not training and not grad for _, training, grad in seen) and model.training is True
    assert list(task.batches) == list(range(10))  # training still starts with the calibration batches
    task.batches = iter(range(2))
    args._deferred_conversions = [convert_now]
    with pytest.raises(RuntimeError, match="--calibration 3: the batches of fe ended after 2"):
        _frontend._run_deferred_conversions(fe, task, args)


def test_calibration_runs_the_model_before_conversion(toy, monkeypatch):
    import cersa_kernels

    captured = {}
    setup = toy.FRONT_END.setup

    def capture(method, args):
        task = setup(method, args)
        after = task.after_training

        def record(m):
            after(m)
            captured["report"] = cersa_kernels.get_report(m[0])
        task.after_training = record
        return task

    import dataclasses

    fe = dataclasses.replace(toy.FRONT_END, setup=capture)
    monkeypatch.delenv("STEPS", raising=False)
    (row,) = _frontend.main(fe, ["--method", "cersa", "--quiet", "--steps", "3", "--calibration", "2"])
    assert row["calibration"] == 2 and row["layers_converted"] >= 1
    assert row["batches_used"] == 3  # the two calibration batches are the first two training batches
    assert captured["report"].policy.get("calibration") is not None
    (plain,) = _frontend.main(fe, ["--method", "cersa", "--quiet", "--steps", "3"])
    assert plain["calibration"] == 0 and captured["report"].policy.get("calibration") is None
    with pytest.raises(RuntimeError, match="--calibration 5: the batches of toy_frontend ended after 4"):
        monkeypatch.setenv("TOY_BATCHES", "4")
        _frontend.main(fe, ["--method", "cersa", "--quiet", "--steps", "3", "--calibration", "5"])


def test_calibration_option_checks(toy, capsys, monkeypatch):
    monkeypatch.delenv("STEPS", raising=False)
    cases = [(["--method", "lora", "--calibration", "2"], "--calibration calibrates the CERSA truncation"),
             (["--method", "cersa", "--calibration", "-1"], "--calibration must be >= 0 (training batches; 0: no "
                                                             "calibration), got -1"),
             (["--method", "cersa", "--calibration-damping", "0.1"], "needs --calibration N"),
             (["--method", "cersa", "--calibration", "0", "--calibration-damping", "0.1"], "needs --calibration N")]
    cases.append((["--method", "cersa", "--calibration", "2", "--calibration-damping", "0"],
                  "--calibration-damping must be finite and > 0"))
    for argv, msg in cases:
        with pytest.raises(SystemExit) as exc:
            _args(toy, *argv)
        assert exc.value.code == 2 and msg in capsys.readouterr().err
    import dataclasses

    no_cal = dataclasses.replace(toy.FRONT_END, calibration=False)  # a front end that cannot calibrate
    with pytest.raises(SystemExit):
        _frontend.build_parser(no_cal).parse_args(["--method", "cersa", "--calibration", "2"])
    assert "unrecognized arguments: --calibration" in capsys.readouterr().err


def test_default_calibration_applies_to_cersa_and_zero_turns_it_off(toy, capsys, monkeypatch):
    import dataclasses

    monkeypatch.delenv("STEPS", raising=False)
    fe = dataclasses.replace(toy.FRONT_END, default_calibration=3)
    parser = _frontend.build_parser(fe)

    def resolved(*argv):
        args = parser.parse_args(list(argv))
        _frontend.check_args(fe, parser, args)
        return args

    assert resolved("--method", "cersa").calibration == 3
    assert resolved("--method", "cersa", "--calibration", "2").calibration == 2
    assert resolved("--method", "cersa", "--calibration", "0").calibration is None
    assert resolved("--method", "lora").calibration is None  # nothing to calibrate, no error
    assert "(default 3)" in " ".join(parser.format_help().split())
    # --compare: each child gets the resolved value, "0" when off, so that it does not take the default again
    for argv, want in ((["--methods", "cersa", "lora"], "3"), (["--methods", "cersa", "lora", "--calibration", "0"], "0")):
        args = resolved(*argv)
        child = _frontend.child_argv(fe, parser, args, "cersa", "x.json")
        assert child[child.index("--calibration") + 1] == want
        assert "--calibration" not in _frontend.child_argv(fe, parser, args, "lora", "x.json")
    (row,) = _frontend.main(fe, ["--method", "cersa", "--quiet", "--steps", "3"])
    assert row["calibration"] == 3
    (plain,) = _frontend.main(fe, ["--method", "cersa", "--quiet", "--steps", "3", "--calibration", "0"])
    assert plain["calibration"] == 0
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="default_calibration: expected None or an int >= 1"):
            dataclasses.replace(toy.FRONT_END, default_calibration=bad)
    with pytest.raises(ValueError, match="default_calibration"):
        dataclasses.replace(toy.FRONT_END, default_calibration=2, calibration=False)


def test_eval_before_adds_a_column_and_json_names_the_metric(toy, tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.delenv("STEPS", raising=False)
    fe = dataclasses.replace(toy.FRONT_END, eval_before=True)
    out = tmp_path / "r.json"
    (row,) = _frontend.main(fe, ["--method", "full", "--quiet", "--steps", "2", "--json", str(out)])
    assert 0.0 <= row["accuracy_before"] <= 1.0 and row["eval_before_s"] >= 0
    result = json.loads(out.read_text())
    assert result["metric"] == {"key": "accuracy", "header": "accuracy", "lower_is_better": False}
    assert result["front_end"] == "toy_frontend" and result["rows"][0]["accuracy_before"] == row["accuracy_before"]
    assert not os.path.exists(str(out) + ".part")
    head, _, line = _frontend.method_table([row], "base", fe.metric)
    assert [c.strip() for c in head.strip("|").split("|")][:3] == ["method", "accuracy", "before"]
    assert [c.strip() for c in line.strip("|").split("|")][2] == _frontend.percent(row["accuracy_before"])
    (plain,) = _frontend.main(toy.FRONT_END, ["--method", "full", "--quiet", "--steps", "2"])
    assert "accuracy_before" not in plain and "before" not in _frontend.method_table([plain], "base")[0]


@processes
def test_sort_orders_the_table_best_first(toy, tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, toy.FRONT_END.script, "--methods", "head", "full", "--quiet", "--sort",
                           "--json", str(out)], env=_env(STEPS="3"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["head", "full"]  # the JSON keeps the --methods order
    best_first = [r["method"] for r in sorted(rows, key=lambda r: -r["accuracy"])]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    assert [line.split("|")[1].strip() for line in lines[header + 2: header + 4]] == best_first
    assert "--sort" in _frontend.build_parser(toy.FRONT_END).format_help()
