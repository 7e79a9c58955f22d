"""Which modules a conversion considers (cersa_kernels/targets.py): target_modules and exclude (names,
globs, regular expressions), patterns that match nothing, targets of an unsupported type, and
nn.Linear subclasses; a refused target leaves the model as it was."""
from __future__ import annotations

import pytest
from torch import nn

from cersa_kernels import CersaLinear, convert

from helpers import LINEARS, Toy, assert_unchanged, snapshot

# Small SVDs: one thread is as fast and avoids spin-waiting on a busy CI machine (conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("targets,exclude,expected", [
    (["q"], None, ["blocks.0.q", "blocks.1.q"]),
    (["blocks.1.ffn.0", "head"], None, ["blocks.1.ffn.0", "head"]),
    (r"blocks\.\d\.ffn\.[02]", None, ["blocks.0.ffn.0", "blocks.0.ffn.2", "blocks.1.ffn.0", "blocks.1.ffn.2"]),
    (["*.q"], None, ["blocks.0.q", "blocks.1.q"]),
    (None, ["head", "q"], ["blocks.0.ffn.0", "blocks.0.ffn.2", "blocks.1.ffn.0", "blocks.1.ffn.2"]),
    (["q", "head"], ["blocks.0.q"], ["blocks.1.q", "head"]),
])
def test_target_modules_and_exclude(targets, exclude, expected):
    model = convert(Toy(), energy=0.93, delta_rank=2, target_modules=targets, exclude=exclude, progress=False)
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, CersaLinear))
    assert converted == sorted(expected)
    for name in set(LINEARS) - set(expected):
        mod = model.get_submodule(name)
        assert type(mod) is nn.Linear and not mod.weight.requires_grad


@pytest.mark.parametrize("kw,pattern", [
    ({"target_modules": ["nonexistent"]}, r"target_modules.*'nonexistent'"),
    ({"target_modules": ["q", "kv"]}, r"target_modules.*'kv'"),
    ({"target_modules": r"enc\..*"}, r"target_modules.*enc"),
    ({"exclude": ["nothing_here"]}, r"exclude.*'nothing_here'"),
    ({"target_modules": "blocks.(0"}, r"target_modules.*regular expression"),
])
def test_pattern_matching_nothing_is_an_error(kw, pattern):
    model = Toy()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        convert(model, energy=0.93, progress=False, **kw)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("target,kind", [(["dw"], "Conv2d"), (["blocks.0.norm"], "LayerNorm"),
                                         (["blocks.0.ffn.1"], "GELU"), (["blocks.0.ffn"], "Sequential")])
def test_named_unsupported_type_is_an_error(target, kind):
    model = Toy()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=rf"{target[0]}.*{kind}"):
        convert(model, energy=0.93, target_modules=target, progress=False)
    assert_unchanged(model, snap)


def test_nn_linear_subclass_and_mha_projection():
    """nn.MultiheadAttention's out_proj (a NonDynamicallyQuantizableLinear) is never converted on its
    own; targeting it explicitly is an error naming it."""
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.proj = nn.Linear(16, 16)

    model = WithMHA()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"attn\.out_proj"):
        convert(model, energy=0.9, target_modules=["attn.out_proj"], progress=False)
    assert_unchanged(model, snap)
