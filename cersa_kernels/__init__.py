"""cersa_kernels: fused kernels for CERSA fine-tuning (arXiv 2605.08174).

Each pretrained weight W (out_features x in_features) becomes its energy-truncated SVD
U diag(S) Vh (frozen) plus a trainable low-rank delta B A:  y = x (U diag(S) Vh + s B A)^T + bias,
computed by fused forward/backward kernels that never build the dense W.

    import cersa_kernels
    cersa_kernels.convert(model, energy=0.93)     # in place; print(cersa_kernels.get_report(model))
    ...train...
    cersa_kernels.save(model, "model.safetensors")

Modules, in import order (docs/design.md "Architecture"): backends (kernels, op catalogue,
backend table) -> ops (cersa_linear) -> config (CersaConfig) -> layers (registry) -> targets,
report, planning, convert, io -> cli.
"""
__version__ = "0.1.0"

from .backends import available_backends  # noqa: E402
from .decompose import energy_rank, truncated_svd  # noqa: E402
from .ops import cersa_linear  # noqa: E402
from .config import CersaConfig  # noqa: E402
from .layers import (CersaConv1D, CersaConv1d, CersaConv2d, CersaConv3d, CersaLayer, CersaLinear, CersaModule,  # noqa: E402,E501
                     CersaMultiheadAttention, register_layer)
from .report import ConversionReport, ParamCount, count_parameters, get_report  # noqa: E402
from .calibrate import CalibrationStats, collect_moments, weighted_truncated_svd  # noqa: E402
from .planning import Plan, plan  # noqa: E402
from .convert import convert, merge  # noqa: E402
from .io import load, load_adapter, save, save_adapter  # noqa: E402
from .stream import convert_file  # noqa: E402

__all__ = ["__version__", "available_backends", "energy_rank", "truncated_svd", "cersa_linear", "CersaConfig",
           "CersaModule", "CersaLayer", "CersaLinear", "CersaConv1D", "CersaConv1d", "CersaConv2d", "CersaConv3d",
           "CersaMultiheadAttention",
           "register_layer", "ConversionReport", "ParamCount", "Plan", "plan", "convert", "count_parameters",
           "get_report", "merge", "load", "load_adapter", "save", "save_adapter", "convert_file",
           "CalibrationStats", "collect_moments", "weighted_truncated_svd"]
