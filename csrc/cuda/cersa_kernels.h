// Raw CUDA kernels of the cersa ops: the scalar work around the cuBLAS GEMMs.
//
// Plain pointers, leading dimensions and strides only: this header and cersa_kernels.cu include
// no torch header, so `nvcc -c csrc/cuda/cersa_kernels.cu` compiles them on their own (CI does
// this for sm_80 and sm_90).  The torch binding is cersa_cuda_ops.cpp.
// Matrices are row-major: element (i, j) of a matrix with leading dimension ld is p[i * ld + j].
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "../cersa_quant_format.h"

namespace cersa_cuda {

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// Forward epilogue (docs/design.md "Forward"), over the rows i < N of h (N, r), leading dim ldh:
//   if xv: xv[i, j] = h[i, j]            (x Vh^T saved for dS / dU)
//   h[i, j] *= S[j]                      (h_r = (x Vh^T) diag S)
cudaError_t forward_epilogue(DType dtype, void* h, int64_t ldh, int64_t N, int64_t r,
                             const void* S, void* xv, int64_t ldxv, cudaStream_t stream);

// Bytes of scratch that backward_epilogue needs (0 when N == 0 or r + m == 0).
size_t backward_workspace_bytes(DType dtype, int64_t N, int64_t r, int64_t m);

// Backward epilogue (docs/design.md "Backward"), one pass over the rows of dh and dy:
//   if dS:     dS[j]    = sum_i xv[i, j] * dh[i, j]   (j < r, before the scaling below)
//   if scale:  dh[i, j] *= S[j]                        (dh_r diag S, for dx and dVh)
//   if dbias:  dbias[c] = sum_i dy[i * dy_s0 + c * dy_s1]  (c < m; dy may have any strides)
// Sums run in float (double for Float64) in fixed row blocks, then one pass over the blocks:
// deterministic.  `workspace` holds backward_workspace_bytes(dtype, N, r, m) bytes.
cudaError_t backward_epilogue(DType dtype, void* dh, int64_t lddh, int64_t N, int64_t r,
                              const void* S, bool scale_dh, const void* xv, int64_t ldxv,
                              const void* dy, int64_t dy_s0, int64_t dy_s1, int64_t m,
                              void* dS, void* dbias, void* workspace, cudaStream_t stream);

// A panel of a quantized frozen factor F (docs/design.md "Quantized factors"; the format in
// ../cersa_quant_format.h): dst[i * ldd + j] = F[row0 + i, col0 + j] for i < rows_p, j < cols_p,
// decoded in float32 exactly as quant.dequantize does (int8: q / 127.0f times the block scale;
// nf4: the level times the scale) and rounded to `dtype`.  F has `cols` columns; its number
// (row, col) is the flat index row * cols + col of `codes` (int8, or packed uint8 for nf4: low
// nibble first) and of the float32 `scales`, one per block of 2^block_shift numbers.
cudaError_t dequantize_panel(DType dtype, cersa::quant::QuantType quant_type, const void* codes,
                             const float* scales, int block_shift, int64_t cols, int64_t row0,
                             int64_t rows_p, int64_t col0, int64_t cols_p, void* dst, int64_t ldd,
                             cudaStream_t stream);

// a[i, j] *= S[j] for i < rows, j < cols (dU = (dy^T xv) diag S).
cudaError_t scale_columns(DType dtype, void* a, int64_t lda, int64_t rows, int64_t cols,
                          const void* S, cudaStream_t stream);

}  // namespace cersa_cuda
