// The storage format of quantized frozen factors (cersa_kernels/quant.py, QuantizedMatrix;
// docs/design.md "Quantized factors"), for the kernels that decode it: no torch header, so that
// CPU code and nvcc-compiled CUDA code can share it.
//
// A factor F (rows, cols) is read row-major as one flat vector (element (i, j) at flat index
// i * cols + j) and cut into blocks of `block` consecutive numbers (a power of two); block b has
// a float32 scale a_b (its absmax, after the second level when double quantization is on:
// QuantizedMatrix.scales(), computed before the call).  Number f decodes, in float32, to
//   int8: (float(q_f) / 127.0f) * a_b            q_f = codes[f] (int8)
//   nf4 : kNF4Levels[q_f] * a_b                  q_f = (codes[f / 2] >> (4 * (f % 2))) & 15
// with b = f / block: exactly the float32 operations of quant.dequantize (a true division by 127,
// then one product), so a decoded factor is bit-identical to QuantizedMatrix.dequantize(float32)
// and, after a cast, to dequantize(dtype) for any dtype.
#pragma once

#include <cstdint>

namespace cersa {
namespace quant {

enum class QuantType : int { Int8 = 0, NF4 = 1 };

// The 16 NF4 levels as float32, ascending, index 7 the exact 0: quant.nf4_levels(torch.float32),
// i.e. the quantiles Phi^-1(p) of N(0, 1) at 8 points p from 1 - delta to 0.5 (positive side) and
// 7 (negative side), delta = (1/32 + 1/30) / 2, each side divided by its largest magnitude
// (the NF4 code of QLoRA, Dettmers et al. 2023, Sec. 3).  Hexadecimal floats, so that no decimal
// rounding stands between them and the Python table; tests/test_quant_kernels.py checks that
// the kernels decode every code to nf4_levels(torch.float32) exactly.
#define CERSA_NF4_LEVELS                                                                     \
  {-0x1.000000p+0f, -0x1.647362p-1f, -0x1.0cd65cp-1f, -0x1.94653cp-2f, -0x1.234496p-2f,      \
   -0x1.7a6a7ap-3f, -0x1.74f0d2p-4f, 0.0f,           0x1.45f602p-4f,  0x1.4995bep-3f,        \
   0x1.f809b4p-3f,  0x1.5a066cp-2f,  0x1.c3496ap-2f, 0x1.200f52p-1f,  0x1.722760p-1f,        \
   0x1.000000p+0f}

inline constexpr float kNF4Levels[16] = CERSA_NF4_LEVELS;

// Number of stored codes of a factor of `numel` numbers: int8 one byte per number, nf4 one byte
// per pair (the first number of a pair in the low nibble).
inline constexpr int64_t code_count(QuantType t, int64_t numel) {
  return t == QuantType::Int8 ? numel : (numel + 1) / 2;
}

// Number of blocks (float32 scales) of a factor of `numel` numbers.
inline constexpr int64_t block_count(int64_t numel, int64_t block) {
  return (numel + block - 1) / block;
}

}  // namespace quant
}  // namespace cersa
