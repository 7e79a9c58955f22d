"""Fashion-MNIST (70,000 grey 28 x 28 images, 10 classes) from Debian's ``dataset-fashion-mnist``.

The package installs the four idx files of Xiao, Rasul and Vollgraf (2017, "Fashion-MNIST: a Novel
Image Dataset for Benchmarking Machine Learning Algorithms") under /usr/share/datasets/fashion-mnist
(gzip-compressed; uncompressed files are read too).  The idx format: a big-endian magic (two zero
bytes, the element type 0x08 = unsigned byte, the number of dimensions), one 32-bit big-endian size
per dimension, then the data.  Used by the MobileNetV2 and the ViT front ends.
"""
from __future__ import annotations

import gzip
import math
import os
import struct

import torch

__all__ = ["DATA_DIR", "CLASSES", "IMAGENET_MEAN", "IMAGENET_STD", "read_idx", "load_fashion_mnist", "to_rgb_input",
           "accuracy"]

#: the ImageNet channel statistics the pretrained backbones were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATA_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: str) -> torch.Tensor:
    """The uint8 tensor (shape from the header) of the idx file ``path`` (``.gz`` decompressed).
    Raises ValueError when the magic is not that of unsigned bytes or the data size does not
    match the header."""
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
    """(train images (60000, 28, 28) uint8, train labels (60000,) int64, test images (10000, 28, 28),
    test labels (10000,)).  Raises FileNotFoundError with the apt line when the files are missing."""
    def find(stem):
        for name in (stem + ".gz", stem):
            p = os.path.join(root, name)
            if os.path.isfile(p):
                return p
        raise FileNotFoundError(f"{os.path.join(root, stem)}(.gz) not found: apt-get install -y "
                                f"dataset-fashion-mnist, or pass --data DIR")
    return (read_idx(find("train-images-idx3-ubyte")), read_idx(find("train-labels-idx1-ubyte")).long(),
            read_idx(find("t10k-images-idx3-ubyte")), read_idx(find("t10k-labels-idx1-ubyte")).long())


def to_rgb_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float32 (B, 3, size, size): bilinear resize, grey to RGB, ImageNet mean/std
    (the input of an ImageNet-pretrained backbone)."""
    import torch.nn.functional as F

    x = images.float().div(255.0)[:, None]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, size: int,
             batch: int = 250) -> float:
    """Accuracy (fraction in [0, 1]) of ``model`` on ``images`` (N, 28, 28) uint8 with ``labels`` (N,),
    fed through :func:`to_rgb_input` in batches."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = model(to_rgb_input(images[i:i + batch], size))
        correct += int((logits.argmax(-1) == labels[i:i + batch]).sum())
    return correct / max(1, len(images))
