#!/usr/bin/env python
"""Fine-tune a diffusion UNet (the guided-diffusion consistency UNet) to Fashion-MNIST with CERSA, PEFT LoRA or
full fine-tuning, on the denoising objective.

The diffusion-UNet front end of the package, run the way a researcher would:

* model: the 10.46M-parameter ADM UNet inside the terrain consistency model of the PyPI package
  ``adaptive-terrain-diffusion`` (``_guided_unet.py``; pip install --no-deps, plus onnx), with its
  consistency-model wrapper ``denoised = c_out F(c_in x, 250 ln sigma, difficulty) + c_skip x``
  (sigma_min 0.002, sigma_data 0.5), called with ``clip=False`` and a fixed ``--difficulty`` label;
* data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (``fashion_mnist_data.py``),
  28x28 grey images resized bilinearly to ``--image-size`` (default 32; any multiple of 16), one
  channel scaled to [-1, 1];
* budget: 60 steps of batch 8 at 32 x 32 and 32 test images per method; sized from measured CPU
  time per step (LoRA, the slowest: 0.76 CPU s at 32 x 32, 2.6 CPU s at 64 x 64, batch 8, 1 thread)
  so that the three methods finish within 15 minutes on 2 CPU cores even when other jobs load them
  (measured 2.7 s wall per step under a load average of 11-15) and in about 3-4 minutes when idle;
  one torch thread by default (``--threads 1``): under that load 2 threads made a step 5-20x slower
  in wall time (OpenMP spin-waiting), while an idle 2-core machine gains about 1.6x from 2;
* objective (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
  Models", EDM, Table 1): clean x, sigma drawn per image from EDM's log-normal (ln sigma ~
  N(-1.2, 1.2^2)) or log-uniformly (``--sigma-sampling``), clipped to [``--sigma-min``,
  ``--sigma-max``] = [0.002, 80]; loss = mean over images of lambda(sigma) * mean over pixels of
  (D(x + sigma n, sigma) - x)^2, n ~ N(0, I), with EDM's lambda(sigma) = (sigma^2 + sigma_data^2) /
  (sigma sigma_data)^2 (``--weighting edm``, default) or 1 (``--weighting none``);
* methods, all on the same 255 target layers (every nn.Linear and nn.Conv2d of the model: 3x3 and
  1x1 convolutions, the attention's 1x1 qkv / proj_out, the embedding MLPs): ``cersa``
  (``cersa_kernels.convert(model, energy=0.93, delta_rank=16, target_modules=...)``; layers whose
  factors would not save memory stay dense and frozen, and are reported; ``--calibration N``
  calibrates the truncation on the first N training batches), ``lora`` (the real ``peft``
  package, LoRA of rank 16 = the CERSA delta rank, lora_alpha = rank, on the same layers; PEFT's
  Conv2d LoRA is a conv with the layer's kernel down to rank r and a 1x1 conv up), ``full`` (every
  parameter).  There is no new head.
* metric: denoising MSE (on the [-1, 1] scale) of ``--test-size`` held-out test images at the fixed
  ``--eval-sigmas`` (default 0.1, 0.5, 2.0), with fixed seeded noise shared by every method, before
  training (the runner's ``FrontEnd.eval_before``, on the model as prepared: for CERSA after the
  conversion, calibrated or not, so it includes the truncation of the spectrum; the column
  "before") and after; the table's metric is the mean over the sigmas after training, the notes give each sigma
  and PSNR = 10 log10(2^2 / MSE) dB.  A PNG grid per method (noisy / denoised rows per sigma, then
  the clean images) goes to ``--out`` (default results/unet/).

The runner (``_frontend.py``) parses the command line, seeds, trains (AdamW, 10 % warm-up then
linear decay), measures and prints the table; ``--compare`` (default) runs each method in its own
subprocess, with the same data, noise, sigmas and steps.  Usage::

    python python/finetune_unet.py                                # --compare: cersa, lora, full
    STEPS=3 python python/finetune_unet.py                        # a short check run (make demo-unet STEPS=3)
    python python/finetune_unet.py --method cersa --energy 0.9 --image-size 64 --steps 200
"""
from __future__ import annotations

import math
import os
from pathlib import Path


import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import _frontend  # noqa: E402
import _guided_unet  # noqa: E402
from _frontend import FrontEnd, Metric, Task, base_weights, layer_names, mib, prepare_method  # noqa: E402
from fashion_mnist_data import DATA_DIR, load_fashion_mnist  # noqa: E402

METHODS = ("cersa", "lora", "full")
#: learning rate of the trainable parameters, per method: full fine-tuning moves every pretrained
#: weight (small rate); LoRA's zero-init B needs a larger one to move in a few dozen steps; CERSA takes
#: LoRA's rate too: the default init's
#: split (split_scale="auto") moves the delta in AdamW's first step as much as a LoRA delta's, and
#: CERSA's best rate in the init study was 1e-3 (README, "The init study so far").
DEFAULT_LR = {"cersa": 1e-3, "lora": 1e-3, "full": 1e-4}
#: the runner's --head-lr; this model has no new head, so it applies to nothing.
DEFAULT_HEAD_LR = 1e-3
#: layer types whose weights are the base weights and the methods' target layers.
TARGET_TYPES = (nn.Linear, nn.Conv2d)
#: EDM's log-normal training distribution of sigma (Karras et al. 2022, Table 1): ln sigma ~ N(P_mean, P_std^2).
P_MEAN, P_STD = -1.2, 1.2
EVAL_SIGMAS = (0.1, 0.5, 2.0)
DEFAULT_OUT = str(Path(__file__).resolve().parents[1] / "results" / "unet")


def to_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float32 (B, 1, size, size) in [-1, 1] (bilinear resize of x / 127.5 - 1)."""
    x = images.float().div(127.5).sub(1.0)[:, None]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    return x


def sample_sigmas(n: int, args, generator: torch.Generator) -> torch.Tensor:
    """(n,) float32 training sigmas: EDM log-normal or log-uniform, clipped to [sigma_min, sigma_max]."""
    if args.sigma_sampling == "lognormal":
        log_s = P_MEAN + P_STD * torch.randn(n, generator=generator)
    else:
        lo, hi = math.log(args.sigma_min), math.log(args.sigma_max)
        log_s = lo + (hi - lo) * torch.rand(n, generator=generator)
    return log_s.exp().clamp(args.sigma_min, args.sigma_max)


def loss_weight(sigma: torch.Tensor, weighting: str, sigma_data: float) -> torch.Tensor:
    """(B,) per-image loss weight: EDM's (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, or ones."""
    if weighting == "none":
        return torch.ones_like(sigma)
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def denoising_loss(args, sigma_data: float):
    """loss(model, batch (clean (B, 1, H, W), sigma (B,), noise (B, 1, H, W))) -> the weighted
    mean-squared error of the unclipped denoised output against the clean images (a scalar)."""
    def loss(model, batch):
        clean, sigma, noise = batch
        denoised = model(clean + sigma[:, None, None, None] * noise, sigma, args.difficulty, clip=False)
        per_image = (denoised - clean).square().mean(dim=(1, 2, 3))
        return (loss_weight(sigma, args.weighting, sigma_data) * per_image).mean()
    return loss


def psnr(mse: float) -> float:
    """PSNR in dB of a mean-squared error on the [-1, 1] scale (peak-to-peak 2): 10 log10(4 / mse)."""
    return 10.0 * math.log10(4.0 / mse) if mse > 0 else float("inf")


def sigma_key(sigma: float) -> str:
    """The row-field suffix of an evaluation sigma: 0.1 -> "0.1"."""
    return f"{sigma:g}"


@torch.no_grad()
def denoising_mse(model: nn.Module, clean: torch.Tensor, noise: torch.Tensor, sigmas, difficulty: float,
                  batch: int = 32) -> dict[float, float]:
    """{sigma: MSE of clamp-free denoised vs clean} over ``clean`` (N, 1, H, W) with the fixed ``noise``
    (len(sigmas), N, 1, H, W); the model's own output clip is off (clip=False)."""
    was_training = model.training
    model.eval()
    out = {}
    for j, s in enumerate(sigmas):
        total = 0.0
        for i in range(0, len(clean), batch):
            x = clean[i:i + batch]
            d = model(x + s * noise[j, i:i + batch], torch.full((len(x),), float(s)), difficulty, clip=False)
            total += float((d - x).square().sum())
        out[float(s)] = total / clean.numel()
    model.train(was_training)
    return out


@torch.no_grad()
def save_grid(model: nn.Module, clean: torch.Tensor, noise: torch.Tensor, sigmas, difficulty: float,
              path: str, title: str) -> str:
    """Write a PNG grid to ``path``: per sigma a row of noisy inputs and a row of denoised outputs
    (clip=True, as the model samples), then the clean images; columns are the images of ``clean``
    (N, 1, H, W).  Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    rows, labels = [], []
    for j, s in enumerate(sigmas):
        noisy = clean + s * noise[j, :len(clean)]
        rows += [noisy.clamp(-1, 1), model(noisy, torch.full((len(clean),), float(s)), difficulty, clip=True)]
        labels += [f"noisy\nσ={s:g}", f"denoised\nσ={s:g}"]
    rows.append(clean)
    labels.append("clean")
    n = len(clean)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 0.6, 1.1 * len(rows)), squeeze=False)
    for r, (imgs, label) in enumerate(zip(rows, labels)):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(imgs[c, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# one method: what the runner trains
# ----------------------------------------------------------------------------------------------
def load_model() -> nn.Module:
    """The pretrained consistency model (``_guided_unet.load_terrain_unet``), float32."""
    return _guided_unet.load_terrain_unet()


def setup(method: str, args) -> Task:
    """Data (a seeded test sample and fixed evaluation noise), the model prepared for ``method`` on its
    Linear and Conv2d layers (with --calibration the runner converts after this returns), the
    denoising MSE before training (``Task.evaluate_before``, fields ``*_before_sigma_*``) and after
    (``Task.evaluate``, fields ``*_after_sigma_*``), and training batches (images drawn with
    replacement, sigmas and noise) from a seeded generator."""
    xtr, _, xte, _ = load_fashion_mnist(args.data)
    g = torch.Generator().manual_seed(args.seed)
    te_idx = torch.randperm(len(xte), generator=g)[:args.test_size]
    test = to_input(xte[te_idx], args.image_size)
    sigmas = tuple(args.eval_sigmas)
    g_eval = torch.Generator().manual_seed(args.seed + 1)
    eval_noise = torch.randn((len(sigmas),) + tuple(test.shape), generator=g_eval)

    model = load_model()
    sigma_data = model.sigma_data
    targets = layer_names(model, TARGET_TYPES)
    dense_count, dense_bytes, _ = base_weights(model, TARGET_TYPES)
    model, extra = prepare_method(method, model, args, targets=targets, kind="Linear/Conv2d", what="UNet")
    extra.update({"target_layers": len(targets), "image_size": args.image_size, "difficulty": args.difficulty,
                  "eval_sigmas": list(sigmas), "sigma_sampling": args.sigma_sampling, "weighting": args.weighting})

    def measure(m, when: str) -> float:
        # the runner copies Task.extra into the row after the last evaluation: the per-sigma values ride along
        mse = denoising_mse(m, test, eval_noise, sigmas, args.difficulty)
        for s, v in mse.items():
            extra[f"mse_{when}_sigma_{sigma_key(s)}"] = v
            extra[f"psnr_{when}_sigma_{sigma_key(s)}"] = psnr(v)
        return sum(mse.values()) / len(mse)

    def after_training(m) -> None:
        if args.grid_images:
            path = os.path.join(args.out, f"{method}.png")
            save_grid(m, test[:args.grid_images], eval_noise, sigmas, args.difficulty, path,
                      f"{method}: {args.steps} steps, {args.image_size}x{args.image_size} Fashion-MNIST test images")
            extra["grid_png"] = path

    def train_batches():
        while True:
            idx = torch.randint(0, len(xtr), (args.batch_size,), generator=g)
            sigma = sample_sigmas(args.batch_size, args, g)
            clean = to_input(xtr[idx], args.image_size)
            yield clean, sigma, torch.randn(clean.shape, generator=g)

    return Task(model=model, head=[], batches=train_batches(), evaluate=lambda m: measure(m, "after"),
                evaluate_before=lambda m: measure(m, "before"), base=(model, TARGET_TYPES),
                dense_base=(dense_count, dense_bytes), loss=denoising_loss(args, sigma_data), n_train=len(xtr),
                n_test=len(test), extra=extra, after_training=after_training)


# ----------------------------------------------------------------------------------------------
# command line and table
# ----------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--image-size", type=int, default=32,
                   help="image side in pixels, a multiple of 16 (the UNet downsamples 4 times; default 32)")
    p.add_argument("--test-size", type=int, default=32, help="held-out test images evaluated (default 32)")
    p.add_argument("--eval-sigmas", type=float, nargs="+", default=list(EVAL_SIGMAS),
                   help="noise levels of the held-out evaluation (default 0.1 0.5 2.0)")
    p.add_argument("--sigma-sampling", choices=("lognormal", "loguniform"), default="lognormal",
                   help="training sigma distribution: EDM's log-normal ln sigma ~ N(-1.2, 1.2^2) (default) or "
                        "log-uniform over [--sigma-min, --sigma-max]; both clipped to that range")
    p.add_argument("--sigma-min", type=float, default=0.002, help="smallest training sigma (default 0.002)")
    p.add_argument("--sigma-max", type=float, default=80.0, help="largest training sigma (default 80)")
    p.add_argument("--weighting", choices=("edm", "none"), default="edm",
                   help="per-image loss weight: EDM's (sigma^2 + 0.25) / (0.5 sigma)^2 (default) or none")
    p.add_argument("--difficulty", type=float, default=0.5,
                   help="the model's label input in [0, 1], fixed for every image (default 0.5)")
    p.add_argument("--grid-images", type=int, default=8,
                   help="test images in the PNG grid per method (default 8; 0: no grid)")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder of the PNG grids (default results/unet/)")
    p.add_argument("--data", default=DATA_DIR, help=f"folder of the idx files (default {DATA_DIR})")


def check_args(p, args) -> None:
    """argparse errors (exit 2) for values out of range, naming the option."""
    if args.image_size < 16 or args.image_size % 16:
        p.error(f"--image-size must be a positive multiple of 16, got {args.image_size}")
    if not 1 <= args.test_size <= 10000:
        p.error(f"--test-size must be in [1, 10000] (the Fashion-MNIST test set), got {args.test_size}")
    bad = [s for s in args.eval_sigmas if not (s > 0 and math.isfinite(s))]
    if bad:
        p.error(f"--eval-sigmas must be finite and > 0, got {bad[0]}")
    if not (0 < args.sigma_min < args.sigma_max and math.isfinite(args.sigma_max)):
        p.error(f"--sigma-min and --sigma-max must satisfy 0 < sigma-min < sigma-max < inf, got "
                f"{args.sigma_min} and {args.sigma_max}")
    if args.sigma_min < 0.002:
        p.error(f"--sigma-min must be >= 0.002 (the model's sigma_min, where c_out = 0), got {args.sigma_min}")
    if not 0.0 <= args.difficulty <= 1.0:
        p.error(f"--difficulty must be in [0, 1], got {args.difficulty}")
    if not 0 <= args.grid_images <= args.test_size:
        p.error(f"--grid-images must be in [0, --test-size = {args.test_size}], got {args.grid_images}")


def notes(rows: list[dict]) -> list[str]:
    r0 = rows[0]
    sig = [sigma_key(s) for s in r0["eval_sigmas"]]
    lines = [f"denoising MSE: mean over sigma in {{{', '.join(sig)}}} of the MSE (on the [-1, 1] scale, clip=False) of "
             f"the denoised vs the clean {r0['image_size']} x {r0['image_size']} images, {r0['n_test']} Fashion-MNIST "
             f"test images (seeded sample) with fixed noise, after training; batches of images drawn with "
             f"replacement from the {r0['n_train']:,} training images, training sigma {r0['sigma_sampling']}, "
             f"weighting {r0['weighting']}, difficulty label {r0['difficulty']:g}.",
             f"Linear/conv base weights: W of the model's {r0['target_layers']} target layers (every nn.Linear and "
             f"nn.Conv2d; dense {mib(r0['dense_base_bytes'])} MiB), or U, S, Vh of CERSA layers; LoRA/CERSA deltas "
             f"and biases excluded.  total params: every parameter of the model.",
             "",
             "| method | " + " | ".join(f"MSE σ={s} before -> after (PSNR dB)" for s in sig) + " |",
             "|---|" + "---|" * len(sig)]
    for r in rows:
        cells = [f"{r[f'mse_before_sigma_{s}']:.5f} -> {r[f'mse_after_sigma_{s}']:.5f} "
                 f"({r[f'psnr_before_sigma_{s}']:.2f} -> {r[f'psnr_after_sigma_{s}']:.2f})" for s in sig]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    calib = "".join(f"; {r['method']} calibrated on {r['calibration']} training batches" for r in rows
                    if r.get("calibration"))
    lines.append("before: the prepared model before the first step (for CERSA: with the truncated spectrum"
                 f"{calib}; for LoRA and full: the pretrained model).  PSNR = 10 log10(4 / MSE).")
    grids = [r["grid_png"] for r in rows if r.get("grid_png")]
    if grids:
        lines.append("grids (noisy / denoised rows per sigma, clean last): " + ", ".join(grids))
    lines.append("")
    return lines


FRONT_END = FrontEnd(
    script=__file__,
    description="Fine-tune the guided-diffusion consistency UNet of adaptive-terrain-diffusion to Fashion-MNIST "
                "(denoising objective) with CERSA, PEFT LoRA or full fine-tuning; print the held-out denoising "
                "MSE, parameters, memory, speed.  Default: --compare.",
    methods=METHODS, default_lr=DEFAULT_LR, head_lr=DEFAULT_HEAD_LR, setup=setup,
    title=lambda args: f"Consistency UNet (adaptive-terrain-diffusion) on Fashion-MNIST: {args.steps} steps of batch "
                       f"{args.batch_size}, {args.image_size}x{args.image_size} images, seed {args.seed}, "
                       f"CERSA energy {args.energy} / delta rank {args.delta_rank}, "
                       f"LoRA rank {args.lora_rank or args.delta_rank}, "
                       f"{args.threads} threads",
    notes=notes, base_label="Linear/conv base weights (MiB)",
    metric=Metric(key="mse", header="denoising MSE", fmt=lambda v: f"{v:.5f}", lower_is_better=True),
    defaults={"energy": 0.93, "delta_rank": 16, "steps": 60, "batch_size": 8, "log_every": 10},
    add_arguments=add_arguments, check_args=check_args, eval_what="test images (mean MSE over the eval sigmas)",
    # One torch thread by default: on the shared 2-core machine, 2 threads under other jobs' load made a
    # step 5-20x slower in wall time (OpenMP spin-waiting); an idle machine gains ~1.6x from --threads 2.
    # The MSE before training is the runner's eval_before: after the conversion that --calibration defers.
    threads=1, eval_before=True, default_calibration=4)


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse ``argv`` (default sys.argv[1:]), run, print the table; returns the table's rows."""
    return _frontend.main(FRONT_END, argv)


if __name__ == "__main__":
    main()
