"""QLoRA as its users build it: bitsandbytes NF4 base layers with double quantization under PEFT LoRA.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") stores each frozen
pretrained weight W (out_features, in_features) as 4-bit NormalFloat codes in blocks of 64 numbers
with one absmax per block, quantizes those absmax values again (double quantization: 8-bit codes in
blocks of 256 with a float32 scale each, after subtracting their mean), and trains a LoRA delta
B A (lora_B (out, r), lora_A (r, in)) on top; every call dequantizes W to the compute dtype:

    y = x W_nf4^T + bias + (alpha / r) * x A^T B^T

``make_qlora`` does what ``transformers`` + ``peft`` do for ``from_pretrained(...,
quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=...))`` followed by ``get_peft_model``, on a
model that is already in memory: each targeted ``nn.Linear`` becomes a ``bitsandbytes.nn.Linear4bit``
holding the quantized weight (transformers' ``replace_with_bnb_linear`` builds the same module), the
model is marked ``is_loaded_in_4bit`` (as transformers' 4-bit quantizer does, which is how PEFT picks
its ``lora.bnb.Linear4bit`` layer), then ``peft.get_peft_model(model, LoraConfig(...))``.
``peft.prepare_model_for_kbit_training`` is not called: it turns on gradient checkpointing and casts
the other half-precision parameters to float32, which trades time for memory the same way for every
method and is not part of the quantized layer.

bitsandbytes runs on the CPU from version 0.48 (its ``libbitsandbytes_cpu`` library quantizes and
dequantizes; the training matmul is a dequantize followed by ``torch.nn.functional.linear``).  It is
an optional dependency: the functions import it when called and raise ImportError with the install
command when it is missing.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["BLOCK_SIZE", "COMPUTE_DTYPES", "make_qlora", "qlora_layers", "frozen_base_bytes", "nf4_bytes",
           "dequantized_weight"]

#: numbers per NF4 block (one absmax each): bitsandbytes' and QLoRA's default.
BLOCK_SIZE = 64
#: numbers per block of the second quantization level (double quantization of the absmax values).
NESTED_BLOCK_SIZE = 256
#: compute dtypes bitsandbytes' Linear4bit accepts.
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INSTALL_HINT = "pip install --no-deps bitsandbytes==0.50.2 numpy packaging"


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError(f"QLoRA needs bitsandbytes (>= 0.48 runs on the CPU); install it with "
                          f"`{INSTALL_HINT}`: {exc}") from exc
    return bnb


def _check(r, alpha, dropout, compute_dtype) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r: expected a positive int (the LoRA rank), got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha: expected a positive number (lora_alpha; scale = alpha / r), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype: expected one of {COMPUTE_DTYPES}, got {compute_dtype!r}")


def _linear4bit(lin: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes Linear4bit (NF4, double quantization, blocks of 64) holding ``lin``'s weight
    quantized, and its bias as a frozen copy; on ``lin``'s device."""
    bnb = _bnb()
    W = lin.weight.detach()
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                              quant_storage=torch.uint8, device="meta")
    # Params4bit quantizes when it is moved to its device (bitsandbytes' documented path).
    layer.weight = bnb.nn.Params4bit(W.to("cpu", copy=True).contiguous(), requires_grad=False,
                                     blocksize=BLOCK_SIZE, compress_statistics=True, quant_type="nf4",
                                     quant_storage=torch.uint8).to(W.device)
    if lin.bias is not None:
        layer.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return layer


def make_qlora(model: nn.Module, target_modules, r: int, alpha: float, dropout: float = 0.0,
               compute_dtype: torch.dtype = torch.float32):
    """QLoRA on ``model``: the targeted nn.Linear layers quantized to NF4 (bitsandbytes Linear4bit,
    blocks of 64, double quantization), then PEFT LoRA of rank ``r`` on them.

    model: any nn.Module; its targeted nn.Linear children are replaced in place (weights
      (out_features, in_features) in float32 / bfloat16 / float16, on the CPU or a GPU).
    target_modules: as ``peft.LoraConfig(target_modules=...)``: a list of names (a module matches when
      its dotted name equals one or ends with "." + one) or a regex string (full match).
    r: LoRA rank (lora_A (r, in_features), lora_B (out_features, r)); alpha: lora_alpha, scale alpha / r;
    dropout: lora_dropout; compute_dtype: the dtype W is dequantized to and the base matmul runs in
      (torch.float32, bfloat16 or float16); the output comes back in the input's dtype.
    Returns the ``peft.PeftModel``; only lora_A / lora_B require grad.
    Raises ValueError for a bad r / alpha / dropout / compute_dtype, for target_modules that match no
    module or a module that is not an nn.Linear (QLoRA quantizes only nn.Linear); ImportError without
    bitsandbytes or peft.  Nothing in ``model`` is changed before every layer is quantized.
    Source: Dettmers et al. 2023 (QLoRA), Sec. 3; bitsandbytes and peft documentation.
    """
    _check(r, alpha, dropout, compute_dtype)
    bnb = _bnb()
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=target_modules,
                        bias="none")
    targets = [(name, mod) for name, mod in model.named_modules()
               if name and check_target_module_exists(config, name)]
    if not targets:
        raise ValueError(f"target_modules: expected names or a regex matching modules of the model, got "
                         f"{target_modules!r}, which matches none")
    wrong = [f"{name} ({type(mod).__name__})" for name, mod in targets
             if type(mod) is not nn.Linear and not isinstance(mod, bnb.nn.Linear4bit)]
    if wrong:
        raise ValueError(f"target_modules: expected only nn.Linear layers (QLoRA quantizes nn.Linear), got "
                         f"{', '.join(wrong)}")
    # quantize everything first, then swap: an error leaves the model as it was
    new = {name: _linear4bit(mod, compute_dtype) for name, mod in targets if type(mod) is nn.Linear}
    for name, layer in new.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    model.is_loaded_in_4bit = True  # what transformers' bitsandbytes 4-bit quantizer sets; PEFT reads it
    return get_peft_model(model, config)


def qlora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, bitsandbytes Linear4bit) of every quantized base layer of ``model`` (empty without
    bitsandbytes)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def nf4_bytes(numel: int, block_size: int = BLOCK_SIZE, double_quant: bool = True) -> int:
    """Bytes the NF4 format stores for ``numel`` weights: ceil(numel / 2) packed codes, and per block of
    ``block_size`` an absmax (float32; with double quantization an 8-bit code, plus one float32
    scale per 256 blocks and one float32 mean).  About 4.127 bits per weight at blocks of 64 with
    double quantization (QLoRA Sec. 3: 4 + 8/64 + 32/(64*256)).  The fixed code tables (16 NF4
    levels, 256 second-level levels, float32) are not counted."""
    blocks = -(-numel // block_size)
    stats = blocks + 4 * (-(-blocks // NESTED_BLOCK_SIZE)) + 4 if double_quant else 4 * blocks
    return -(-numel // 2) + stats


def _state_bytes(layer) -> int:
    t = lambda x: x.numel() * x.element_size()  # noqa: E731
    qs = layer.weight.quant_state
    n = t(layer.weight.data) + t(qs.absmax)
    if qs.nested:
        n += t(qs.state2.absmax) + t(torch.as_tensor(qs.offset))
    return n


def frozen_base_bytes(model: nn.Module) -> int:
    """Bytes of the frozen quantized base weights of ``model``: for every bitsandbytes Linear4bit, the
    packed NF4 codes, the per-block absmax (8-bit codes with double quantization) and the
    double-quantization statistics (float32 scale per 256 blocks, float32 mean), as held in memory.
    Biases, the LoRA parameters and the fixed code tables are not counted (``nf4_bytes`` gives
    the same number from the shapes)."""
    return sum(_state_bytes(m) for _, m in qlora_layers(model))


def dequantized_weight(layer, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense (out_features, in_features) weight a bitsandbytes Linear4bit ``layer`` computes with,
    decoded by bitsandbytes (``bitsandbytes.functional.dequantize_4bit``), in ``dtype``."""
    import bitsandbytes.functional as F

    qs = layer.weight.quant_state
    # dequantize_4bit returns a weight of two numbers (one packed byte) transposed, (2, 1) for (1, 2):
    # the reshape to the stored shape is the identity everywhere else
    return F.dequantize_4bit(layer.weight.data, qs).reshape(qs.shape).to(dtype)
