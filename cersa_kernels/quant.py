"""Blockwise quantization of the frozen factors U and Vh: int8 and NF4 codes with absmax scales.

A factor matrix F (rows, cols) is read in row-major order as one flat vector and cut into blocks
of ``block_size`` consecutive numbers (the last one padded with zeros).  Block b is stored as its
absmax a_b = max |F_i| over the block and one code per number (docs/design.md "Quantized factors"):

* "int8": q_i = round(127 F_i / a_b) in [-127, 127] (int8); F_i ~ a_b q_i / 127.
* "nf4":  q_i = the index of the NormalFloat-4 level nearest to F_i / a_b (4 bits, two codes per
  byte, the first number of a pair in the low nibble); F_i ~ a_b NF4[q_i].  NF4 is the 16-level
  code of QLoRA (Dettmers et al. 2023, Sec. 3): levels at the quantiles of N(0, 1) with an exact 0,
  scaled to [-1, 1] (``nf4_levels``).
* double quantization of the scales (option): the absmax values, minus their mean, are quantized
  again to int8 in blocks of 256 with a float32 absmax each, so a scale costs 8 + 32/256 bits
  instead of 32 (QLoRA Sec. 3, "double quantization", with a linear int8 second level).

Storage per number: int8 8 + 32/B bits; nf4 4 + 32/B bits, or 4 + 8/B + 32/(256 B) with double
quantization (B = block_size; 4.127 bits at B = 64).  Codes and scales are frozen nn.Parameters
(not buffers) so that FSDP2 shards them and DDP broadcasts them like the other frozen factors.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

__all__ = ["QUANT_TYPES", "DOUBLE_QUANT_BLOCK", "nf4_levels", "check_quantize", "check_block_size", "dequantize",
           "quantized_nbytes", "QuantizedMatrix"]

#: values of ``quantize=``.
QUANT_TYPES = ("int8", "nf4")
#: block size of the second quantization level of the scales.
DOUBLE_QUANT_BLOCK = 256
#: the offset of the outermost NF4 quantile (QLoRA's construction: 0.5 (1/32 + 1/30) from 1).
_NF4_OFFSET = 0.5 * (1.0 / 32.0 + 1.0 / 30.0)


@functools.lru_cache(maxsize=None)
def _nf4_levels64() -> Tensor:
    def quantiles(count: int) -> Tensor:
        p = torch.linspace(1.0 - _NF4_OFFSET, 0.5, count + 1, dtype=torch.float64)[:-1]
        return torch.special.ndtri(p)

    v = torch.cat([quantiles(8), torch.zeros(1, dtype=torch.float64), -quantiles(7)])
    v = v.sort().values
    return v / v.abs().max()


@functools.lru_cache(maxsize=None)
def _nf4_pairs_cpu() -> Tensor:
    byte = torch.arange(256)
    return _nf4_levels64().to(torch.float32)[torch.stack([byte & 15, byte >> 4], 1)]


def _nf4_pairs(device) -> Tensor:
    """(256, 2) float32: the two NF4 levels each packed byte holds."""
    pairs = _nf4_pairs_cpu()
    return pairs if torch.device(device).type == "cpu" else pairs.to(device)


def nf4_levels(dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The 16 NF4 levels, ascending, in [-1, 1] with an exact 0 (index 7): the quantiles
    Phi^-1(p) of N(0, 1) at 8 points p from 1 - offset to 0.5 (positive side) and 7 (negative side),
    offset = (1/32 + 1/30) / 2, each side scaled by the largest |level|.  Returns (16,) ``dtype``."""
    return _nf4_levels64().to(device=device, dtype=dtype)


def check_quantize(quantize) -> str | None:
    """None or one of QUANT_TYPES, returned; ValueError naming the known values otherwise."""
    if quantize is not None and quantize not in QUANT_TYPES:
        raise ValueError(f"quantize: expected None or one of {QUANT_TYPES}, got {quantize!r}")
    return quantize


def check_block_size(block_size, name: str = "quant_block_size") -> int:
    """A positive power of two (>= 2, so NF4 codes pack in pairs), returned; TypeError / ValueError."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{name}: expected a positive power of two (int), got {type(block_size).__name__} "
                        f"{block_size!r}")
    if block_size < 2 or block_size & (block_size - 1):
        raise ValueError(f"{name}: expected a power of two >= 2, got {block_size}")
    return block_size


def quantized_nbytes(rows: int, cols: int, quant_type: str, block_size: int = 64, double_quant: bool = False) -> int:
    """Bytes a ``QuantizedMatrix`` of a (rows, cols) matrix stores (what its ``nbytes()`` returns),
    from the shape alone: codes (int8: rows cols bytes; nf4: ceil(rows cols / 2)) plus the scales of
    the ceil(rows cols / block_size) blocks (float32 each, or with double_quant one int8 code each,
    a float32 per 256 of them and one float32 offset).  Raises ValueError for a bad quant_type /
    block_size or a negative size (the math: the module doc)."""
    check_quantize(quant_type)
    if quant_type is None:
        raise ValueError("quant_type: expected one of ('int8', 'nf4'), got None")
    check_block_size(block_size)
    if int(rows) < 0 or int(cols) < 0:
        raise ValueError(f"rows, cols: expected sizes >= 0, got ({rows}, {cols})")
    numel = int(rows) * int(cols)
    blocks = -(-numel // block_size)
    codes = numel if quant_type == "int8" else -(-numel // 2)
    scales = blocks + 4 * (-(-blocks // DOUBLE_QUANT_BLOCK)) + 4 if double_quant else 4 * blocks
    return codes + scales


def _blocks(flat: Tensor, block: int) -> Tensor:
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block)


def _quantize_scales(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """absmax (blocks,) float32 -> (codes int8, scales float32 per 256, offset float32 scalar)."""
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
    centred = _blocks(absmax - offset, DOUBLE_QUANT_BLOCK)
    scales = centred.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(centred / scales[:, None] * 127.0).clamp_(-127, 127).to(torch.int8)
    return codes.reshape(-1)[:absmax.numel()], scales, offset.reshape(1)


def dequantize(codes: Tensor, scales: Tensor, shape: tuple[int, int], quant_type: str, block_size: int,
               dtype: torch.dtype) -> Tensor:
    """The dense matrix of ``shape`` from its codes (int8 (numel,) or packed uint8 nf4) and float32
    block scales (blocks,), computed in float32 and returned in ``dtype``.  A pure function of
    tensors and static values (what the reference path and torch.compile trace)."""
    numel = shape[0] * shape[1]
    if quant_type == "int8":
        values = codes.to(torch.float32) / 127.0
    else:  # one lookup per byte: its pair of levels, low nibble first
        values = _nf4_pairs(codes.device)[codes.long()].reshape(-1)
    blocks = _blocks(values[:numel], block_size) * scales[:, None]
    return blocks.reshape(-1)[:numel].view(shape).to(dtype)


class QuantizedMatrix(nn.Module):
    """A frozen matrix stored as blockwise int8 or NF4 codes with absmax scales (see the module doc).

    Attributes: shape (rows, cols) of the dense matrix; quant_type ("int8" | "nf4"); block_size;
    double_quant; dtype: the floating dtype ``dequantize`` returns by default (the layer's dtype; it
    follows ``.to(dtype)`` while the codes and scales keep theirs).
    Parameters (requires_grad=False): ``codes`` (int8 (numel,) or, for nf4, uint8 (ceil(numel/2),));
    ``absmax`` float32 (blocks,), or with double_quant ``absmax_codes`` int8 (blocks,),
    ``absmax_scales`` float32 (ceil(blocks / 256),), ``absmax_offset`` float32 (1,).
    Build one with :meth:`quantize`, or empty (for load) with the constructor.
    """

    def __init__(self, rows: int, cols: int, quant_type: str, block_size: int = 64, double_quant: bool = False,
                 *, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        check_quantize(quant_type)
        if quant_type is None:
            raise ValueError("quant_type: expected one of ('int8', 'nf4'), got None")
        check_block_size(block_size)
        self.shape = (int(rows), int(cols))
        self.quant_type, self.block_size, self.double_quant = quant_type, block_size, bool(double_quant)
        self.dtype = dtype
        numel = self.shape[0] * self.shape[1]
        blocks = -(-numel // block_size)
        frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
        if quant_type == "int8":
            self.codes = frozen(torch.empty(numel, dtype=torch.int8, device=device))
        else:
            self.codes = frozen(torch.empty(-(-numel // 2), dtype=torch.uint8, device=device))
        if self.double_quant:
            self.absmax_codes = frozen(torch.empty(blocks, dtype=torch.int8, device=device))
            self.absmax_scales = frozen(torch.empty(-(-blocks // DOUBLE_QUANT_BLOCK), dtype=torch.float32,
                                                    device=device))
            self.absmax_offset = frozen(torch.empty(1, dtype=torch.float32, device=device))
        else:
            self.absmax = frozen(torch.empty(blocks, dtype=torch.float32, device=device))

    # ---- building -------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def quantize(cls, W: Tensor, quant_type: str, block_size: int = 64, double_quant: bool = False,
                 dtype: torch.dtype | None = None) -> "QuantizedMatrix":
        """Quantize the 2-D floating matrix W (computed in float32); ``dtype``: what dequantize returns
        (default W's dtype).  Raises TypeError / ValueError for a non-2-D, non-floating or non-finite W."""
        if not isinstance(W, Tensor) or W.dim() != 2 or not W.is_floating_point():
            raise TypeError(f"W: expected a 2-D floating tensor, got {type(W).__name__} "
                            f"{tuple(getattr(W, 'shape', ()))} {getattr(W, 'dtype', '')}")
        if W.numel() and not bool(torch.isfinite(W).all()):
            raise ValueError("W: expected finite values, got NaN or inf")
        q = cls(W.shape[0], W.shape[1], quant_type, block_size, double_quant, dtype=dtype or W.dtype,
                device=W.device)
        blocks = _blocks(W.detach().to(torch.float32).reshape(-1), block_size)
        absmax = blocks.abs().amax(1) if blocks.numel() else blocks.new_zeros(0)
        if q.double_quant:
            codes, scales, offset = _quantize_scales(absmax)
            q.absmax_codes.copy_(codes)
            q.absmax_scales.copy_(scales)
            q.absmax_offset.copy_(offset)
            absmax = q.scales()  # quantize against the scales that will be used to dequantize
        else:
            q.absmax.copy_(absmax)
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
        normed = (blocks / safe).clamp_(-1.0, 1.0)
        if quant_type == "int8":
            codes = torch.round(normed * 127.0).to(torch.int8).reshape(-1)[:W.numel()]
        else:
            levels = nf4_levels(torch.float32, W.device)
            mid = (levels[1:] + levels[:-1]) / 2  # nearest level by its decision boundaries
            idx = torch.bucketize(normed.reshape(-1), mid).to(torch.uint8)[:2 * q.codes.numel()]
            if idx.numel() % 2:
                idx = torch.cat([idx, idx.new_zeros(1)])
            codes = idx[0::2] | (idx[1::2] << 4)
        q.codes.copy_(codes)
        return q

    # ---- reading --------------------------------------------------------------------------------
    def scales(self) -> Tensor:
        """The absmax of every block as float32 (blocks,), after the second level when double_quant."""
        if not self.double_quant:
            return self.absmax
        n = self.absmax_codes.numel()
        per = self.absmax_scales.repeat_interleave(DOUBLE_QUANT_BLOCK)[:n]
        return self.absmax_codes.to(torch.float32) * (per / 127.0) + self.absmax_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense (rows, cols) matrix, computed in float32 and returned in ``dtype`` (default
        self.dtype).  A new tensor (see :func:`dequantize`)."""
        return dequantize(self.codes, self.scales(), self.shape, self.quant_type, self.block_size,
                          dtype or self.dtype)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def nbytes(self) -> int:
        """Bytes of the stored codes and scales."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def bits_per_number(self) -> float:
        numel = self.shape[0] * self.shape[1]
        return 8.0 * self.nbytes() / numel if numel else 0.0

    def config(self) -> dict:
        return {"quant_type": self.quant_type, "block_size": self.block_size, "double_quant": self.double_quant}

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() must not round the float32 scales: move them (device) but keep their
        # dtype, and let ``dtype`` (what dequantize returns) follow a floating cast instead.
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        for name, p in self._parameters.items():
            moved = fn(p.data)
            if moved.dtype != p.dtype:
                moved = p.data.to(moved.device)
            self._parameters[name] = nn.Parameter(moved, requires_grad=False)
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, quant_type={self.quant_type!r}, block_size={self.block_size}, "
                f"double_quant={self.double_quant}, bits_per_number={self.bits_per_number():.3f}")
