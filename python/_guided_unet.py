"""The terrain consistency UNet of ``adaptive-terrain-diffusion`` as a PyTorch module, plus its loader.

The PyPI package ``adaptive-terrain-diffusion`` (0.4.2) ships only an ONNX graph,
``terrain_diffusion/weights/terrain_consistency_unet_difficulty100.onnx``: a 10.46M-parameter UNet in
the layout of guided-diffusion's ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
Synthesis"), distilled into a one-step consistency model (Song et al. 2023, "Consistency Models").
onnx2torch cannot convert it (opset-18 ``Split``), so the network is written out here and the
graph's initializers are copied into it.  What the graph computes, read off its nodes:

* the consistency-model boundary-condition wrapper (Song et al. 2023, Appendix C; EDM's c_in, Karras
  et al. 2022, Table 1), with sigma_min = 0.002 and sigma_data = 0.5::

      c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)
      c_out  = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2)
      c_in   = 1 / sqrt(sigma^2 + sigma_data^2)
      denoised = clamp(c_out F(c_in x, 250 ln sigma, difficulty) + c_skip x, -1, 1)

* F: sinusoidal embedding (cos half first, then sin; 32 channels, max period 10000) of the
  timestep 250 ln sigma -> Linear(32, 128), SiLU, Linear(128, 128); plus the difficulty label
  (a float in [0, 1], (d - 1) / 99 for difficulty d in 1..100) -> Linear(1, 128), SiLU, Linear(128, 128);
* 32 base channels, channel multipliers (1, 1, 2, 3, 4), 4 residual blocks per level, scale-shift
  norm (GroupNorm(32) * (1 + scale) + shift from the embedding), resampling inside residual blocks
  (2x2 average pooling down, nearest 2x up), self-attention at downsampling factors 4, 8, 16
  (32 channels per head, q and k each scaled by ch^-1/4, q/k/v split before the heads are split);
  the attention's qkv and proj_out are 1x1 ``Conv`` nodes with (out, in, 1, 1) weights on the 4-D
  feature map, so they are ``nn.Conv2d(kernel_size=1)`` here, not ``nn.Conv1d``;
* GroupNorm is exported as InstanceNormalization over 32 groups followed by ``Mul``/``Add`` with
  anonymous (C, 1, 1) initializers (``val_NNN``); the loader finds which module each belongs to
  from the nodes' ``pkg.torch.onnx.name_scopes`` metadata.

Parameter names are the initializer names unchanged (the top module is the wrapper, its UNet is
``network``), e.g. ``network.input_blocks.11.1.qkv.weight``.  The graph itself is fixed to
(B, 1, 128, 128); the module accepts any height and width divisible by 16.

Needs ``pip install --no-deps adaptive-terrain-diffusion==0.4.2`` (its declared dependency is
onnxruntime-gpu) and ``pip install onnx`` to load; ``onnxruntime`` only to check against the graph.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GroupNorm32", "ResBlock", "AttentionBlock", "TimestepEmbedSequential", "TerrainUNet",
           "ConsistencyDenoiser", "timestep_embedding", "onnx_path", "load_terrain_unet"]

ONNX_RESOURCE = ("weights", "terrain_consistency_unet_difficulty100.onnx")
PIP_LINE = "pip install --no-deps adaptive-terrain-diffusion==0.4.2 && pip install onnx"
GROUPS = 32


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C, eps=1e-5) computed in float32 and cast back to the input dtype."""

    def __init__(self, channels: int) -> None:
        super().__init__(GROUPS, channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """t (B,) float, freqs (half,) -> (B, 2 half): [cos(t freqs), sin(t freqs)] (ADM's embedding)."""
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """ADM residual block with scale-shift norm and optional resampling.

    in_layers: GroupNorm, SiLU, Conv3x3(channels -> out_channels); emb_layers: SiLU, Linear(emb,
    2 out_channels) -> (scale, shift); out_layers: GroupNorm, SiLU, Dropout, Conv3x3.
    ``resample`` "down" (2x2 average pool) or "up" (nearest 2x) is applied to both paths between
    in_layers' SiLU and its conv.  skip_connection: identity or Conv1x1 when the width changes.
    forward(x (B, channels, H, W), emb (B, emb_channels)) -> (B, out_channels, H', W').
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, resample: str | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers[:-1](x)
        h, x = self._resample(h), self._resample(x)
        h = self.in_layers[-1](h)
        scale, shift = self.emb_layers(emb).type(h.dtype)[..., None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        h = self.out_layers[1:](h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual.

    norm: GroupNorm; qkv: Conv1x1(C -> 3C); proj_out: Conv1x1(C -> C).  q, k, v are split first, then
    each into C / head_channels heads; q and k are each scaled by head_channels^-1/4 (ADM's
    QKVAttention).  forward(x (B, C, H, W)) -> (B, C, H, W).
    """

    def __init__(self, channels: int, head_channels: int = 32) -> None:
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"channels ({channels}) must be a multiple of head_channels ({head_channels})")
        self.heads = channels // head_channels
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        ch = c // self.heads
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3 * c, hgt * wid).chunk(3, dim=1)
        scale = 1.0 / math.sqrt(math.sqrt(ch))
        q = (q * scale).reshape(b * self.heads, ch, -1)
        k = (k * scale).reshape(b * self.heads, ch, -1)
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k).float(), dim=-1).type(q.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v.reshape(b * self.heads, ch, -1))
        return x + self.proj_out(a.reshape(b, c, hgt, wid))


class TimestepEmbedSequential(nn.Sequential):
    """nn.Sequential whose ResBlocks also receive the embedding: forward(x, emb)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class TerrainUNet(nn.Module):
    """The ADM UNet F of the terrain model (defaults: the shipped 10.46M-parameter configuration).

    forward(x (B, in_channels, H, W) float, timesteps (B,) float, labels (B,) float)
    -> (B, out_channels, H, W); H and W must be multiples of 2^(len(channel_mult) - 1).
    Module names follow ADM: time_embed, label_emb, input_blocks, middle_block, output_blocks, out.
    """

    def __init__(self, in_channels: int = 1, model_channels: int = 32, out_channels: int = 1,
                 num_res_blocks: int = 4, channel_mult: tuple[int, ...] = (1, 1, 2, 3, 4),
                 attention_ds: tuple[int, ...] = (4, 8, 16), head_channels: int = 32,
                 label_dim: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        emb = 4 * model_channels
        self.downsample = 2 ** (len(channel_mult) - 1)
        half = model_channels // 2
        # ADM's frequencies; load_terrain_unet replaces them by the graph's constant table.
        self.register_buffer("freqs", torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half),
                             persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Sequential(nn.Linear(label_dim, emb), nn.SiLU(), nn.Linear(emb, emb))

        def block(*layers: nn.Module) -> TimestepEmbedSequential:
            return TimestepEmbedSequential(*layers)

        self.input_blocks = nn.ModuleList([block(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb, mult * model_channels, dropout=dropout)]
                ch = mult * model_channels
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, head_channels))
                self.input_blocks.append(block(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(block(ResBlock(ch, emb, ch, resample="down", dropout=dropout)))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = block(ResBlock(ch, emb, ch, dropout=dropout), AttentionBlock(ch, head_channels),
                                  ResBlock(ch, emb, ch, dropout=dropout))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb, mult * model_channels, dropout=dropout)]
                ch = mult * model_channels
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, head_channels))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb, ch, resample="up", dropout=dropout))
                    ds //= 2
                self.output_blocks.append(block(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.freqs))
        emb = emb + self.label_emb(labels.reshape(labels.shape[0], -1).to(emb.dtype))
        emb = emb.to(x.dtype)
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def _per_sample(value, name: str, batch: int, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(value, device=like.device)
    if not t.is_floating_point():
        t = t.to(like.dtype)
    if t.dim() == 0:
        t = t.expand(batch)
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name} must be a scalar or of shape ({batch},) (one per image), got shape {tuple(t.shape)}")
    return t


class ConsistencyDenoiser(nn.Module):
    """The shipped model: the consistency-model wrapper around ``network`` (a TerrainUNet).

    forward(noisy (B, 1, H, W) float, sigma (B,) or scalar, > 0, difficulty (B,) or scalar, the
    label (d - 1) / 99 in [0, 1]) -> denoised (B, 1, H, W), in [-1, 1] when ``clip`` (as the ONNX
    graph; pass clip=False for an unclipped training target).  Formulas: module docstring.
    Raises ValueError for a wrong shape of an argument or a sigma <= 0.
    """

    def __init__(self, network: TerrainUNet | None = None, sigma_min: float = 0.002, sigma_data: float = 0.5,
                 clip: bool = True) -> None:
        super().__init__()
        self.network = TerrainUNet() if network is None else network
        self.sigma_min, self.sigma_data, self.clip = sigma_min, sigma_data, clip
        #: initializer name -> why it is not a parameter (filled by load_terrain_unet).
        self.unused_initializers: dict[str, str] = {}

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """sigma (B,) -> (c_skip, c_out, c_in), each (B,)."""
        sd2 = self.sigma_data ** 2
        d = sigma - self.sigma_min
        root = torch.sqrt(sigma ** 2 + sd2)
        return sd2 / (d ** 2 + sd2), d * self.sigma_data / root, 1.0 / root

    def forward(self, noisy: torch.Tensor, sigma, difficulty, clip: bool | None = None) -> torch.Tensor:
        if noisy.dim() != 4 or noisy.shape[1] != 1:
            raise ValueError(f"noisy must be (B, 1, H, W), got shape {tuple(noisy.shape)}")
        m = self.network.downsample
        if noisy.shape[2] % m or noisy.shape[3] % m:
            raise ValueError(f"noisy's height and width must be multiples of {m}, got {tuple(noisy.shape[2:])}")
        b = noisy.shape[0]
        sigma = _per_sample(sigma, "sigma", b, noisy)
        difficulty = _per_sample(difficulty, "difficulty", b, noisy)
        if not bool((sigma > 0).all()):
            raise ValueError(f"sigma must be > 0 (its log is the timestep), got min {float(sigma.min())}")
        c_skip, c_out, c_in = (c[:, None, None, None] for c in self.scalings(sigma))
        out = self.network(c_in * noisy, 250.0 * torch.log(sigma), difficulty)
        denoised = c_out * out + c_skip * noisy
        return denoised.clamp(-1.0, 1.0) if (self.clip if clip is None else clip) else denoised


# ---------------------------------------------------------------------------------------- loading
def onnx_path() -> str | None:
    """Path of the ONNX file inside the installed adaptive-terrain-diffusion package, or None.
    Found without importing the package."""
    spec = importlib.util.find_spec("terrain_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, *ONNX_RESOURCE)
        if os.path.isfile(path):
            return path
    return None


def _module_scope(node) -> str | None:
    """The innermost ``network.*`` module path in a node's name_scopes metadata, Sequential slices
    (``in_layers.slice(None, -1, None).0``) folded back to the original index."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in re.findall(r"'([^']*)'", prop.value) if s.startswith("network.")]
            return re.sub(r"\.slice\([^)]*\)", "", scopes[-1]) if scopes else None
    return None


def _group_norm_affines(graph, inits: dict) -> dict[str, str]:
    """{module parameter name: initializer name} for every exported GroupNorm: the chain
    InstanceNormalization -> Reshape -> Mul(weight) -> Add(bias)."""
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def only(name: str, op: str):
        nxt = [n for n in consumers[name] if n.op_type == op]
        if len(nxt) != 1:
            raise ValueError(f"unexpected GroupNorm export: {name} feeds {[n.op_type for n in consumers[name]]}")
        return nxt[0]

    mapping: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "InstanceNormalization":
            continue
        mul = only(only(node.output[0], "Reshape").output[0], "Mul")
        add = only(mul.output[0], "Add")
        scope = _module_scope(mul)
        if scope is None:
            raise ValueError(f"node {mul.name} has no network.* name scope; cannot name its GroupNorm")
        for param, op in (("weight", mul), ("bias", add)):
            init = [x for x in op.input if x in inits]
            if len(init) != 1:
                raise ValueError(f"GroupNorm {scope}: {op.op_type} node {op.name} has {len(init)} initializers, not 1")
            key = f"{scope}.{param}"
            if mapping.get(key, init[0]) != init[0]:
                raise ValueError(f"GroupNorm {key} maps to two initializers, {mapping[key]} and {init[0]}")
            mapping[key] = init[0]
    return mapping


def _constant_role(name: str, value, model: ConsistencyDenoiser) -> str | None:
    """Why a non-parameter initializer is a graph constant of the computation written out above
    (None when it is none of them)."""
    import numpy as np

    if value.dtype == np.int64:
        return "int64 shape / axis constant"
    if value.dtype != np.float32:
        return None
    flat = value.reshape(-1)
    freqs = model.network.freqs.numpy()
    if flat.size == freqs.size and flat.size > 4 and np.allclose(flat, freqs, rtol=1e-6, atol=0):
        return "timestep-embedding frequencies (copied into network.freqs)"
    if flat.size > 4 and (np.all(flat == 1) or np.all(flat == 0)):
        return "InstanceNormalization unit scale / zero bias of the GroupNorm export"
    sd = model.sigma_data
    known = {model.sigma_min: "sigma_min", sd: "sigma_data", sd * sd: "sigma_data^2", 2.0: "exponent 2",
             250.0: "timestep scale 1000/4", 1.0: "1 (scale-shift norm; clamp max)", -1.0: "clamp min",
             32 ** -0.25: "attention q/k scale head_channels^-1/4"}
    if flat.size == 4 and flat.tolist() == [1.0, 1.0, 2.0, 2.0]:
        return "Resize scales of the nearest 2x upsampling"
    if flat.size == 1:
        for v, role in known.items():
            if abs(float(flat[0]) - v) <= 1e-6 * abs(v):
                return role
    return None


def load_terrain_unet(path: str | os.PathLike | None = None) -> ConsistencyDenoiser:
    """The terrain consistency model with the ONNX graph's weights, float32, eval mode, on the CPU.

    path: the .onnx file (default: the one in the installed adaptive-terrain-diffusion package).
    Strict: every parameter is filled from an initializer of the same name and shape (GroupNorm
    affines from their anonymous (C, 1, 1) initializers, named through the graph), and every other
    initializer must be a known constant of the computation: the frequency table of the timestep
    embedding is copied into ``network.freqs``, the rest (shapes, scalars, InstanceNormalization's
    unit scale) are listed, with their role, in the returned module's ``unused_initializers``.
    Raises FileNotFoundError (package missing, with the pip line), ImportError (onnx missing),
    ValueError (a parameter without initializer, a shape mismatch, an unexplained initializer).
    """
    if path is None:
        path = onnx_path()
        if path is None:
            raise FileNotFoundError(f"the terrain UNet ONNX file was not found; install it with: {PIP_LINE}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no such ONNX file: {path!r}")
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise ImportError(f"load_terrain_unet needs the onnx package: pip install onnx ({err})") from err

    proto = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    gn = _group_norm_affines(proto.graph, inits)
    model = ConsistencyDenoiser()
    state = model.state_dict()
    new_state, used = {}, set()
    for key, param in state.items():
        src = gn.get(key, key)
        if src not in inits:
            raise ValueError(f"parameter {key} {tuple(param.shape)}: no initializer {src!r} in {path}")
        value = torch.from_numpy(inits[src].copy())
        if key in gn and value.dim() == 3 and value.shape[1:] == (1, 1):
            value = value.reshape(-1)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"parameter {key}: expected shape {tuple(param.shape)}, initializer {src!r} "
                             f"has {tuple(value.shape)}")
        new_state[key] = value
        used.add(src)
    unused = {}
    for name, value in inits.items():
        if name in used:
            continue
        role = _constant_role(name, value, model)
        if role is None:
            raise ValueError(f"initializer {name!r} {value.shape} {value.dtype} is used by no parameter and is "
                             "no known constant of the graph")
        if role.startswith("timestep-embedding"):  # used: the forward takes the graph's table
            model.network.freqs.copy_(torch.from_numpy(value.reshape(-1).copy()))
        else:
            unused[name] = role
    model.load_state_dict(new_state, strict=True)
    model.unused_initializers = unused
    return model.eval()
