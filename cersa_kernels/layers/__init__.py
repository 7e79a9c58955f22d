"""The CERSA layers and the registry that convert, plan, save/load, merge and the CLI ask.

``LAYER_TYPES`` is ordered: the first class that claims a dense module replaces it (or, when it
claims the module but ``unsupported_reason`` says why not, the module is left dense and reported).
A new layer type is one ``CersaModule`` subclass plus one ``register_layer`` call.
``UNSUPPORTED`` names dense layer types no CERSA layer takes, so that the report says why they
stay as they are.  docs/design.md "Layer registry".

* ``CersaLinear`` (nn.Linear), ``CersaConv1D`` (transformers' Conv1D, fan_in_fan_out),
  ``CersaConv1d`` / ``CersaConv2d`` / ``CersaConv3d`` (nn.Conv{1,2,3}d, groups=1), ``CersaMultiheadAttention`` (nn.MultiheadAttention with
  packed projections); ``CersaLayer`` / ``CersaModule``: their base classes (layers/base.py).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .attention import CersaMultiheadAttention, mha_unsupported_reason
from .base import CersaLayer, CersaModule, compute_dtype
from .conv import CersaConv1d, CersaConv2d, CersaConv3d, CersaConvNd
from .linear import CersaConv1D, CersaLinear, is_hf_conv1d
from ..config import INITS

__all__ = ["CersaModule", "CersaLayer", "CersaLinear", "CersaConv1D", "CersaConv2d", "CersaConv1d", "CersaConv3d",
           "CersaConvNd", "CersaMultiheadAttention", "LAYER_TYPES", "UNSUPPORTED", "register_layer", "layer_type_for", "unsupported_reason", "is_cersa",
           "INITS", "is_hf_conv1d", "mha_unsupported_reason", "compute_dtype"]

#: class name (as saved in a file's config) -> CERSA module class, in claiming order.
LAYER_TYPES: dict[str, type[CersaModule]] = {}


def register_layer(cls: type[CersaModule]) -> type[CersaModule]:
    """Add a CersaModule subclass to the registry (after those already there); returns it.
    Raises TypeError for a class that is not a CersaModule, ValueError for a name already taken."""
    if not (isinstance(cls, type) and issubclass(cls, CersaModule)):
        raise TypeError(f"cls: expected a CersaModule subclass, got {cls!r}")
    if cls.__name__ in LAYER_TYPES and LAYER_TYPES[cls.__name__] is not cls:
        raise ValueError(f"cls: a layer type named {cls.__name__!r} is already registered")
    LAYER_TYPES[cls.__name__] = cls
    return cls


for _cls in (CersaLinear, CersaConv1D, CersaConv1d, CersaConv2d, CersaConv3d, CersaMultiheadAttention):
    register_layer(_cls)

#: (predicate, kind, reason) for dense layer types no registered class takes; reported, left as they are.
UNSUPPORTED: list[tuple[Callable[[nn.Module], bool], str, str]] = [
    (lambda m: isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)),
     "Conv", "is not supported"),
]


def is_cersa(module: nn.Module) -> bool:
    """Whether ``module`` is a CERSA module (any registered type)."""
    return isinstance(module, CersaModule)


def layer_type_for(module: nn.Module) -> type[CersaModule] | None:
    """The first registered class that claims ``module`` (convertible or not), else None."""
    return next((cls for cls in LAYER_TYPES.values() if cls.claims(module)), None)


def unsupported_reason(module: nn.Module) -> tuple[str, str] | None:
    """(kind, reason) when ``module`` is a layer type that stays dense, None when it converts or is
    not a layer type CERSA knows (containers, norms, embeddings)."""
    cls = layer_type_for(module)
    if cls is not None:
        why = cls.unsupported_reason(module)
        return (cls.kind, why) if why else None
    for pred, kind, why in UNSUPPORTED:
        if pred(module):
            return kind, f"{type(module).__name__} {why}"
    return None
