"""Tests of the conversion report and the parameter count (cersa_kernels/report.py): get_report, the
ConversionReport table, count_parameters.  The report's rows of a conversion are checked with the
conversion itself in tests/test_convert.py."""
from __future__ import annotations

import pytest
from torch import nn

from cersa_kernels import convert, count_parameters, get_report

from helpers import LINEARS, Toy

# Small SVDs: one thread is as fast and avoids spin-waiting on a busy CI machine (conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_report_prints_a_table():
    model = convert(Toy(), energy=0.93, delta_rank=2, progress=False)
    text = str(get_report(model))
    lines = text.splitlines()
    assert "layer" in lines[0] and "rank" in lines[0] and "energy" in lines[0]
    for name in LINEARS + ["dw"]:
        assert any(line.startswith(name + " ") for line in lines), name
    rep = get_report(model)
    assert f"converted {len(rep.converted)} of {len(rep.layers)}" in text
    assert f"{rep.params_before:,}" in text and f"{rep.params_after:,}" in text
    assert rep.params_before == sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features
                                    for n in LINEARS)


def test_get_report_without_conversion():
    with pytest.raises(KeyError, match="convert"):
        get_report(Toy())


def test_count_parameters():
    model = Toy()
    pc0 = count_parameters(model)
    assert pc0.frozen == 0 and pc0.trainable == sum(p.numel() for p in model.parameters())
    convert(model, energy=0.93, delta_rank=2, progress=False)
    model.head.B.requires_grad_(True)
    pc = count_parameters(model)
    train = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert pc.trainable == sum(p.numel() for p in train) == sum(
        model.get_submodule(n).delta_rank * (model.get_submodule(n).in_features + model.get_submodule(n).out_features)
        for n in LINEARS)
    assert pc.frozen == sum(p.numel() for p in frozen)
    assert pc.trainable_bytes == 4 * pc.trainable and pc.frozen_bytes == 4 * pc.frozen
    model.half()
    pc16 = count_parameters(model)
    assert pc16.trainable_bytes == 2 * pc.trainable and pc16.frozen_bytes == 2 * pc.frozen
    assert "trainable" in str(pc16)
    # a shared parameter counts once
    shared = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    shared[1].weight = shared[0].weight
    assert count_parameters(shared).trainable == 16
