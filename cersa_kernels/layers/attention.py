"""CersaMultiheadAttention: nn.MultiheadAttention with its packed in_proj (3E x E) and out_proj as
CersaLinear layers; attention recomputed from the projections (F.multi_head_attention_forward
reads raw weights, so a swapped submodule would be bypassed).  docs/design.md "Layers beyond
nn.Linear".
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import CersaConfig
from .base import CersaModule
from .linear import CersaLinear

__all__ = ["CersaMultiheadAttention", "mha_unsupported_reason"]


def mha_unsupported_reason(mha: nn.MultiheadAttention) -> str:
    """"" when :class:`CersaMultiheadAttention` can replace ``mha``, else why not."""
    if not mha._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim (separate q/k/v projection weights) are not supported"
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True is not supported"
    if mha.add_zero_attn:
        return "add_zero_attn=True is not supported"
    return ""


def _as_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A plain nn.Linear holding ``weight`` (out, in) and ``bias`` themselves (no copy)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = weight
    lin.bias = bias
    return lin


def _float_mask(mask: Tensor | None, dtype: torch.dtype, name: str) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{name}: expected a bool or floating mask, got dtype {mask.dtype}")
    return mask.to(dtype)


class CersaMultiheadAttention(CersaModule):
    """nn.MultiheadAttention with CERSA projections: in_proj (CersaLinear, 3E x E: the packed
    q, k, v projection) and out_proj (CersaLinear, E x E).

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) has nn.MultiheadAttention's signature, shapes
    ((L, N, E), or (N, L, E) with batch_first, or unbatched (L, E)), mask conventions (bool: True =
    not allowed; float: added) and outputs (attn_output, attn_weights or None).  Self-attention
    (query is key is value) projects once; otherwise q, k, v use the row blocks of in_proj's U, B and
    bias (W_q = U[:E] diag(S) Vh + s B[:E] A, ...).  Attention: softmax(q k^T / sqrt(d) + mask) v with
    dropout in training (explicit when weights are returned, else F.scaled_dot_product_attention).
    ``is_causal`` is a hint, as in PyTorch: attn_mask must then be given and is used.
    Supported: packed projections (kdim = vdim = embed_dim), no add_bias_kv / add_zero_attn.
    ``in_proj_bias`` is None on purpose: it turns off nn.TransformerEncoderLayer's fused fast path,
    which reads the raw projection weights this module does not have.
    """

    kind = "MultiheadAttention"
    dense_types = (nn.MultiheadAttention,)
    arg = "mha"
    in_proj_bias = None
    in_proj_weight = None

    def __init__(self, in_proj: CersaLinear, out_proj: CersaLinear, num_heads: int, *, dropout: float = 0.0,
                 batch_first: bool = False) -> None:
        super().__init__()
        E = out_proj.out_features
        if in_proj.out_features != 3 * E or in_proj.in_features != E or out_proj.in_features != E:
            raise ValueError(f"in_proj/out_proj: expected shapes (3E, E) and (E, E), got "
                             f"({in_proj.out_features}, {in_proj.in_features}) and "
                             f"({out_proj.out_features}, {out_proj.in_features})")
        if E % num_heads:
            raise ValueError(f"num_heads: embed_dim {E} is not divisible by num_heads {num_heads}")
        self.embed_dim = self.kdim = self.vdim = E
        self.in_features = self.out_features = E  # the (E, E) matrix view the report shows
        self.num_heads = num_heads
        self.head_dim = E // num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self._qkv_same_embed_dim = True
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.in_proj = in_proj
        self.out_proj = out_proj

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str:
        return mha_unsupported_reason(module) or super().unsupported_reason(module)

    @classmethod
    def matrices(cls, module: nn.Module) -> list[tuple[str, Tensor]]:
        return [("in_proj_weight", module.in_proj_weight), ("out_proj.weight", module.out_proj.weight)]

    @classmethod
    def dense_shape(cls, module: nn.Module) -> tuple[int, int]:
        return module.embed_dim, module.embed_dim

    def parts(self) -> list[CersaLinear]:
        return [self.in_proj, self.out_proj]

    @property
    def rank(self) -> int:
        return sum(p.rank for p in self.parts())

    @property
    def frozen_rank(self) -> int:
        return sum(p.frozen_rank for p in self.parts())

    @property
    def delta_rank(self) -> int:
        return self.in_proj.delta_rank

    @property
    def energy(self) -> float:
        return min(p.energy for p in self.parts())


    def mismatch(self, dense: nn.Module) -> str:
        why = super().mismatch(dense)
        bias_dense, bias_file = dense.in_proj_bias is not None, self.in_proj.bias is not None
        if not why and bias_dense != bias_file:
            why = (f"the file's layer {'has' if bias_file else 'has no'} bias, the model's {type(dense).__name__} "
                   f"{'has' if bias_dense else 'has no'} bias")
        return why

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, config=None, *, name: str = "attn", out_rank: int | None = None,
                 **options) -> "CersaMultiheadAttention":
        """Decompose in_proj_weight (3E, E) and out_proj.weight (E, E) separately (each to the config's
        energy or rank; ``out_rank`` overrides the rank of out_proj); config / options as
        CersaLinear.from_linear.  Raises ValueError naming ``name`` for an unsupported configuration
        (mha_unsupported_reason)."""
        config = CersaConfig.make(config, **options)
        ranks = None if out_rank is None else [config.rank, out_rank]
        return cls.from_dense(mha, config, ranks=ranks, name=name)

    @classmethod
    def from_dense(cls, module: nn.Module, config=None, *, ranks=None, name: str = "attn", factors=None,
                   **options) -> "CersaMultiheadAttention":
        """As ``CersaModule.from_dense``: in_proj_weight (3E, E) and out_proj.weight (E, E) decomposed
        separately; factors: None or two entries (in_proj, out_proj), each None or precomputed
        (U, S, Vh, info)."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"mha: expected an nn.MultiheadAttention, got {type(module).__name__}")
        why = cls.unsupported_reason(module)
        if why:
            raise ValueError(f"{name}: nn.MultiheadAttention cannot be converted: {why}")
        config = CersaConfig.make(config, **options)
        ranks = list(ranks) if ranks is not None else [None, None]
        if factors is not None:
            factors = list(factors)
            if len(factors) != 2:
                raise ValueError(f"factors: {name} has 2 matrices to decompose (in_proj_weight, out_proj.weight), "
                                 f"got {len(factors)} factor entries")
        else:
            factors = [None, None]
        in_proj = CersaLinear.from_dense(_as_linear(module.in_proj_weight, module.in_proj_bias), config,
                                         ranks=ranks[:1], name=f"{name}.in_proj_weight", factors=factors[:1])
        out_proj = CersaLinear.from_dense(_as_linear(module.out_proj.weight, module.out_proj.bias), config,
                                          ranks=ranks[1:], name=f"{name}.out_proj", factors=factors[1:])
        return cls(in_proj, out_proj, module.num_heads, dropout=module.dropout, batch_first=module.batch_first)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal: a hint that attn_mask is the causal mask; attn_mask must be given "
                               "(as in nn.MultiheadAttention)")
        batched = query.dim() == 3
        same = query is key and key is value
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        L, N, E = query.shape
        S_len = key.shape[0]
        H, d = self.num_heads, self.head_dim
        if same:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:
            q = self.in_proj.project(query, slice(0, E))
            k = self.in_proj.project(key, slice(E, 2 * E))
            v = self.in_proj.project(value, slice(2 * E, 3 * E))
        q = q.reshape(L, N, H, d).permute(1, 2, 0, 3)  # (N, H, L, d)
        k = k.reshape(S_len, N, H, d).permute(1, 2, 0, 3)
        v = v.reshape(S_len, N, H, d).permute(1, 2, 0, 3)
        mask = _float_mask(attn_mask, q.dtype, "attn_mask")
        if mask is not None:
            if mask.dim() == 2:
                mask = mask.view(1, 1, L, S_len)
            elif mask.dim() == 3:
                mask = mask.view(N, H, L, S_len)
            else:
                raise ValueError(f"attn_mask: expected 2-D (L, S) or 3-D (N*num_heads, L, S), got shape "
                                 f"{tuple(attn_mask.shape)}")
        kpm = _float_mask(key_padding_mask, q.dtype, "key_padding_mask")
        if kpm is not None:
            kpm = kpm.view(N, 1, 1, S_len)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if p > 0:
                weights = F.dropout(weights, p=p)
            out = torch.matmul(weights, v)
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.permute(2, 0, 1, 3).reshape(L, N, E)
        out = self.out_proj(out)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights

    @torch.no_grad()
    def merge(self) -> nn.MultiheadAttention:
        """An nn.MultiheadAttention with in_proj_weight / out_proj.weight the merged CERSA weights."""
        ip, op = self.in_proj, self.out_proj
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, bias=ip.bias is not None,
                                    batch_first=self.batch_first, device=ip.U.device, dtype=ip.U.dtype)
        mha.in_proj_weight.copy_(ip.merged_weight())
        if ip.bias is not None:
            mha.in_proj_bias.copy_(ip.bias)
        mha.out_proj.weight.copy_(op.merged_weight())
        if op.bias is not None and mha.out_proj.bias is not None:
            mha.out_proj.bias.copy_(op.bias)
        return mha

    def cersa_config(self) -> dict:
        return {"type": "CersaMultiheadAttention", "num_heads": self.num_heads, "dropout": self.dropout,
                "batch_first": self.batch_first, "in_proj": self.in_proj.cersa_config(),
                "out_proj": self.out_proj.cersa_config(), "in_features": self.embed_dim,
                "out_features": self.embed_dim}

    @classmethod
    def from_config(cls, cfg: dict, device=None, dtype=None, like: nn.Module | None = None
                    ) -> "CersaMultiheadAttention":
        return cls(CersaLinear.from_config(cfg["in_proj"], device=device, dtype=dtype),
                   CersaLinear.from_config(cfg["out_proj"], device=device, dtype=dtype),
                   cfg["num_heads"], dropout=cfg["dropout"], batch_first=cfg["batch_first"])

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
