"""Exact static training memory from shapes: parameters, gradients and AdamW state, per method.

Computed, not measured: activations, temporary buffers and allocator overhead are not included.
The parameter list comes from the public architecture itself, instantiated on the meta device
(no weights are read): BERT-base (transformers BertConfig() defaults, with the pooler), ViT-B/16
(ViTConfig() defaults: 224 px, patch 16, with the pooler), LLaMA-7B (LlamaConfig hidden 4096,
intermediate 11008, 32 layers, 32 heads, vocab 32000, untied lm_head: 6,738,415,616 parameters).

Rules (every number is elements x bytes per element):
  full   every parameter trains: gradient = parameter bytes; AdamW state = 2 x trainable bytes
         (exp_avg, exp_avg_sq) + 4 bytes per trainable tensor (its float32 ``step``).
  lora   the targeted Linear layers get A (k, n), B (m, k) (PEFT LoRA); everything else frozen.
  cersa  each targeted Linear (m, n) at rank r = round(f min(m, n)) (or a given rank function)
         is converted only when r(m + n + 1) < max_frozen_ratio m n, as
         ``cersa_kernels.convert`` decides; then it stores frozen U, S, Vh of rank r - min(k, r)
         (init "principal" moves k components into the delta; r with init "lora"), its frozen
         bias, and a trainable delta A (k, n), B (m, k).  A layer that would not shrink stays
         dense and frozen, with no delta.  Everything else is frozen.
Targets: the Linear layers inside the transformer blocks (q, k, v, o and the MLP), the same for
LoRA and CERSA; embeddings, norms, pooler and heads are frozen (full: trained).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, asdict

from torch import nn

#: Linear layers inside numbered transformer blocks ("encoder.layer.3.", "model.layers.7.").
BLOCK_LINEARS = r"(.*\.)?layers?\.\d+\..*"
ADAMW_STEP_BYTES = 4


@dataclass
class Accounting:
    """Static memory of one method on one model (bytes unless named *_params)."""

    method: str
    trainable_params: int
    frozen_params: int
    trainable_tensors: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    converted_layers: int = 0
    dense_layers: int = 0

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    def as_dict(self) -> dict:
        return dict(asdict(self), total_bytes=self.total_bytes)


def meta_model(arch: str) -> nn.Module:
    """BERT-base, ViT-B/16 or LLaMA-7B built on the meta device from its public config."""
    import torch
    import transformers as tf

    with torch.device("meta"):
        if arch == "BERT-base":
            return tf.BertModel(tf.BertConfig())
        if arch == "ViT-B/16":
            return tf.ViTModel(tf.ViTConfig())
        if arch == "LLaMA-7B":
            return tf.LlamaForCausalLM(tf.LlamaConfig(
                hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False))
    raise ValueError(f"arch: expected 'BERT-base', 'ViT-B/16' or 'LLaMA-7B', got {arch!r}")


def account(model: nn.Module, method: str, *, k: int = 16, rank_fraction: float | None = None,
            rank_fn=None, init: str = "principal", max_frozen_ratio: float | None = 1.0,
            targets: str = BLOCK_LINEARS, dtype_bytes: int | None = None) -> Accounting:
    """Static training memory of ``method`` ("full", "lora", "cersa") applied to ``model``.

    model: any nn.Module (meta tensors are fine).  k: delta / LoRA rank.  For "cersa" give
    rank_fraction f (r = round(f min(m, n))) or rank_fn(name, m, n) -> r.  targets: regex (full
    match) on Linear module names.  dtype_bytes: bytes per element for every tensor (default:
    each parameter's own element size; new deltas take the layer weight's).
    Raises ValueError for an unknown method or a missing rank for "cersa".
    """
    if method not in ("full", "lora", "cersa"):
        raise ValueError(f"method: expected 'full', 'lora' or 'cersa', got {method!r}")
    if method == "cersa" and rank_fraction is None and rank_fn is None:
        raise ValueError("cersa: give rank_fraction= or rank_fn=")
    rx = re.compile(targets)
    tr = fr = tensors = tb = fb = 0
    converted = dense = 0
    seen: set[int] = set()

    def size(p) -> int:
        return dtype_bytes if dtype_bytes is not None else p.element_size()

    def add(n_el: int, nbytes_each: int, trainable: bool, n_tensors: int = 1):
        nonlocal tr, fr, tensors, tb, fb
        if trainable:
            tr, tb, tensors = tr + n_el, tb + n_el * nbytes_each, tensors + n_tensors
        else:
            fr, fb = fr + n_el, fb + n_el * nbytes_each

    for name, mod in model.named_modules():
        own = [p for p in mod.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        if not own:
            continue
        is_target = type(mod) is nn.Linear and rx.fullmatch(name) is not None
        if method == "full" or not is_target:
            for p in own:
                add(p.numel(), size(p), method == "full")
            continue
        m, n = mod.out_features, mod.in_features
        es = size(mod.weight)
        bias = mod.bias.numel() if mod.bias is not None else 0
        if method == "lora":
            add(m * n + bias, es, False)
            add(k * (m + n), es, True, 2)
            continue
        r = int(round(rank_fraction * min(m, n))) if rank_fn is None else int(rank_fn(name, m, n))
        if max_frozen_ratio is not None and r * (m + n + 1) >= max_frozen_ratio * m * n:
            dense += 1
            add(m * n + bias, es, False)
            continue
        converted += 1
        frozen_rank = r - (min(k, r) if init == "principal" else 0)
        add(frozen_rank * (m + n + 1) + bias, es, False)
        add(k * (m + n), es, True, 2)
    return Accounting(method=method, trainable_params=tr, frozen_params=fr, trainable_tensors=tensors,
                      param_bytes=tb + fb, grad_bytes=tb, optimizer_bytes=2 * tb + ADAMW_STEP_BYTES * tensors,
                      converted_layers=converted, dense_layers=dense)


ARCHS = ("BERT-base", "ViT-B/16", "LLaMA-7B")
COMPUTED_FRACTIONS = (0.25, 0.50, 0.75)


def computed_table(k: int = 16, archs=ARCHS, fractions=COMPUTED_FRACTIONS) -> list[dict]:
    """Rows {arch, method, rank_fraction, ...Accounting} for full, LoRA and CERSA at each fraction
    (fp32 everywhere, each parameter's own element size)."""
    rows = []
    for arch in archs:
        model = meta_model(arch)
        specs = [("full", None), ("lora", None)] + [("cersa", f) for f in fractions]
        for method, f in specs:
            acc = account(model, method, k=k, rank_fraction=f)
            rows.append(dict(acc.as_dict(), arch=arch, rank_fraction=f,
                             label=method if f is None else f"cersa r={round(100 * f)}%"))
    return rows
