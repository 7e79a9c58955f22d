// CPU kernels of cersa::linear_forward_q and cersa::linear_backward_q: the forward and backward of
// docs/design.md "Forward" / "Backward" with the frozen U (m, r) and Vh (r, n) stored as int8 or
// NF4 codes with float32 block scales (docs/design.md "Quantized factors"; the format in
// ../cersa_quant_format.h).  The argument checks, sizes, needs and output allocations are the plans
// of ../cersa_plan.h (QuantForwardPlan / QuantBackwardPlan); their CPU schedule is that of
// cersa_cpu.cpp (cersa_cpu_common.h: forward_blocks / backward_blocks), given by this file the
// GEMMs that read the quantized U and Vh.
//
// Schedule: the blocked schedule of cersa_cpu.cpp (blocks of kBlockRows rows, h / dh column-major
// from kColumnMajorMinRows rows on, the same epilogues and the same GEMM calls: sgemm_ / dgemm_
// direct for fp32 / fp64, ATen's CPU kernels for 16-bit dtypes), with each GEMM that reads a
// factor split into panels of it.  A panel is a range of rows or of columns of the factor,
// decoded into a per-call buffer of at most kPanelElems numbers in the compute dtype and fed to
// the GEMM as an ordinary operand; the next panel reuses the buffer.  Each panel produces its own
// block of output columns with the whole inner dimension, so no partial sums are added up:
//   forward   h_r = x Vh^T   panels of Vh's rows     -> columns of h_r   (inner size n)
//             y   = h_r U^T  panels of U's rows      -> columns of y     (inner size r)
//   backward  dh_r = dy U    panels of U's columns   -> columns of dh_r  (inner size m)
//             dx  = dh_r Vh  panels of Vh's columns  -> columns of dx    (inner size r)
// A factor of at most kPanelElems numbers is one panel: it is decoded once per call and kept for
// every block of rows.  A larger one is decoded again for each block of rows (ceil(N / kBlockRows)
// times per call): each decoded number then serves 2 * kBlockRows FLOPs of GEMM, so the decoding
// costs a few per cent of the GEMMs (docs/design.md "Quantized factors on the CPU" has the
// measurements), while the buffer stays bounded and no dense factor tensor is created.  The delta (A, B), S and the
// bias are dense, as in cersa_cpu.cpp.
//
// Decoding is exactly quant.dequantize's float32 arithmetic (a true division by 127, or the NF4
// level, times the block scale) followed by the cast to the compute dtype, so the decoded numbers
// are bit-identical to QuantizedMatrix.dequantize(dtype).  Flat indices are int64.  For fp32 output
// on a CPU with AVX-512 (checked at run time) the loops run 16 numbers per step with the same IEEE
// operations (decode_run_avx512); otherwise, and for other dtypes, the scalar loop.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../cersa_plan.h"
#include "../cersa_quant_format.h"
#include "cersa_cpu_common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CERSA_DECODE_AVX512 1
#endif

namespace cersa {
namespace {

using at::Tensor;
using namespace cpu;

// Numbers per decoded panel (1 MiB in fp32): a factor up to this size (e.g. every MiniLM attention
// factor) is decoded once per call; a larger one in panels of at most this many numbers.  Measured
// at N = 512 and 4096 on the MiniLM and BERT shapes (1 thread), panels of 2^16, 2^18 and 2^20
// numbers gave forward + backward times within the machine's noise (+-5 %) of each other.
constexpr int64_t kPanelElems = int64_t{1} << 18;
// Numbers per parallel decoding task.
constexpr int64_t kDecodeGrain = int64_t{1} << 14;
// Panel widths are rounded up to a multiple of this (GEMM-friendly output column blocks).
constexpr int64_t kPanelAlign = 16;

#ifdef CERSA_DECODE_AVX512
// Whether this CPU runs the AVX-512 decoding loops below (checked once).
bool avx512_decode_ok() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

// (GCC 12 flags the deliberately undefined vectors inside its own AVX-512 intrinsics.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// decode_run for float32 output with AVX-512 (16 numbers per step): the same IEEE operations as
// the scalar loop (int8: convert, divide by 127, multiply; nf4: a permute from the 16 levels
// times the block scale), so the results are identical.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void decode_run_avx512(
    const QuantFactor& F, const void* codes, const float* scales, int64_t f0, int64_t len,
    float* dst) {
  const int sh = F.block_shift;
  const int64_t end = f0 + len;
  int64_t f = f0;
  if (F.type == quant::QuantType::Int8) {
    const int8_t* q = static_cast<const int8_t*>(codes);
    const __m512 d127 = _mm512_set1_ps(127.0f);
    while (f < end) {
      const int64_t b = f >> sh;
      const int64_t stop = std::min(end, (b + 1) << sh);
      const __m512 s = _mm512_set1_ps(scales[b]);
      float* d = dst + (f - f0);
      const int8_t* qb = q + f;
      const int64_t cnt = stop - f;
      int64_t i = 0;
      for (; i + 16 <= cnt; i += 16) {
        const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + i));
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c));
        _mm512_storeu_ps(d + i, _mm512_mul_ps(_mm512_div_ps(v, d127), s));
      }
      if (i < cnt) {
        const __mmask16 mk = static_cast<__mmask16>((1u << (cnt - i)) - 1u);
        const __m128i c = _mm_maskz_loadu_epi8(mk, qb + i);
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c));
        _mm512_mask_storeu_ps(d + i, mk, _mm512_mul_ps(_mm512_div_ps(v, d127), s));
      }
      f = stop;
    }
    return;
  }
  const uint8_t* q = static_cast<const uint8_t*>(codes);
  const __m512 levels = _mm512_loadu_ps(quant::kNF4Levels);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  while (f < end) {
    const int64_t b = f >> sh;
    const int64_t stop = std::min(end, (b + 1) << sh);
    const float s = scales[b];
    const __m512 lut = _mm512_mul_ps(levels, _mm512_set1_ps(s));
    float* d = dst + (f - f0);
    if (f & 1) {
      *d++ = quant::kNF4Levels[q[f >> 1] >> 4] * s;
      ++f;
    }
    const uint8_t* qp = q + (f >> 1);
    const int64_t pairs = (stop - f) >> 1;
    int64_t i = 0;
    for (; i + 8 <= pairs; i += 8) {  // 8 bytes -> 16 numbers, low nibble first
      const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qp + i));
      const __m128i lo = _mm_and_si128(c, low4);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(c, 4), low4);
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
      _mm512_storeu_ps(d + 2 * i, _mm512_permutexvar_ps(idx, lut));
    }
    for (; i < pairs; ++i) {
      const uint8_t c = qp[i];
      d[2 * i] = quant::kNF4Levels[c & 15] * s;
      d[2 * i + 1] = quant::kNF4Levels[c >> 4] * s;
    }
    f += 2 * pairs;
    d += 2 * pairs;
    if (f < stop) {
      *d = quant::kNF4Levels[q[f >> 1] & 15] * s;
      ++f;
    }
  }
}
#pragma GCC diagnostic pop
#endif

// dst[0, len) = numbers f0 .. f0 + len - 1 of the flat factor F decoded (../cersa_quant_format.h)
// and cast to T.
template <typename T>
void decode_run(const QuantFactor& F, const void* codes, const float* scales, int64_t f0,
                int64_t len, T* dst) {
#ifdef CERSA_DECODE_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (avx512_decode_ok()) return decode_run_avx512(F, codes, scales, f0, len, dst);
  }
#endif
  const int sh = F.block_shift;
  const int64_t end = f0 + len;
  int64_t f = f0;
  if (F.type == quant::QuantType::Int8) {
    const int8_t* q = static_cast<const int8_t*>(codes);
    while (f < end) {
      const int64_t b = f >> sh;
      const int64_t stop = std::min(end, (b + 1) << sh);
      const float s = scales[b];
      T* d = dst + (f - f0);
      const int8_t* qb = q + f;
      const int64_t cnt = stop - f;
      for (int64_t i = 0; i < cnt; ++i)
        d[i] = static_cast<T>(static_cast<float>(qb[i]) / 127.0f * s);
      f = stop;
    }
    return;
  }
  const uint8_t* q = static_cast<const uint8_t*>(codes);
  while (f < end) {
    const int64_t b = f >> sh;
    const int64_t stop = std::min(end, (b + 1) << sh);
    const float s = scales[b];
    T lut[16];  // the block's 16 decoded values
    for (int j = 0; j < 16; ++j) lut[j] = static_cast<T>(quant::kNF4Levels[j] * s);
    T* d = dst + (f - f0);
    if (f & 1) {  // the high nibble of a pair whose low nibble lies before the run
      *d++ = lut[q[f >> 1] >> 4];
      ++f;
    }
    const uint8_t* qp = q + (f >> 1);
    const int64_t pairs = (stop - f) >> 1;
    for (int64_t i = 0; i < pairs; ++i) {
      const uint8_t c = qp[i];
      d[2 * i] = lut[c & 15];
      d[2 * i + 1] = lut[c >> 4];
    }
    f += 2 * pairs;
    d += 2 * pairs;
    if (f < stop) {  // the low nibble of a pair whose high nibble lies after the run
      *d = lut[q[f >> 1] & 15];
      ++f;
    }
  }
}

// The panels of one quantized factor F (rows, cols) along its rows (panel i = rows
// [start(i), start(i) + size(i)), a row-major (size, cols) operand) or along its columns (columns
// [start(i), ...), a row-major (rows, size) operand), decoded on demand into one buffer that every
// panel reuses; a factor that is a single panel is decoded once and then served from the buffer.
template <typename T>
class Panels : public PanelGrid {
 public:
  Panels(const QuantFactor& F, bool by_rows, const at::TensorOptions& opts)
      : PanelGrid(F, by_rows, kPanelElems, kPanelAlign), opts_(opts) {}

  // Panel i as a GEMM operand (decoded now unless it is the one in the buffer).
  Mat<const T> get(int64_t i) {
    if (!buf_.defined()) buf_ = at::empty({std::max<int64_t>(1, width * other)}, opts_);
    T* p = buf_.mutable_data_ptr<T>();
    if (i != cached_) {
      decode(i, p);
      cached_ = i;
    }
    const int64_t s = size(i);
    if (by_rows) return {p, s, other, std::max<int64_t>(1, other), 1};
    return {p, other, s, std::max<int64_t>(1, s), 1};
  }

 private:
  void decode(int64_t i, T* dst) const {
    const void* codes = F.codes.const_data_ptr();
    const float* scales = F.scales.const_data_ptr<float>();
    const int64_t c0 = start(i), s = size(i);
    if (s == 0 || other == 0) return;
    if (by_rows) {  // rows [c0, c0 + s): one run of the flat factor
      const int64_t f0 = c0 * F.cols, len = s * F.cols;
      at::parallel_for(0, len, kDecodeGrain, [&](int64_t b, int64_t e) {
        decode_run<T>(F, codes, scales, f0 + b, e - b, dst + b);
      });
    } else {  // columns [c0, c0 + s) of every row: one run per row
      const int64_t cols = F.cols;
      at::parallel_for(0, F.rows, std::max<int64_t>(1, kDecodeGrain / s), [&](int64_t b, int64_t e) {
        for (int64_t row = b; row < e; ++row)
          decode_run<T>(F, codes, scales, row * cols + c0, s, dst + row * s);
      });
    }
  }

  const at::TensorOptions opts_;
  int64_t cached_ = -1;
  Tensor buf_;
};

// The quantized factors' GEMMs of the blocked schedules (cersa_cpu_common.h: forward_blocks,
// backward_blocks): those of cersa_cpu.cpp's dense ones, run over panels, and no dU / dVh (frozen
// factors).  Forward: Vh's rows are h_r's columns, U's rows are y's columns.
template <typename T>
struct PanelForward {
  static constexpr const char* kDispatchName = "cersa_fwd_q";
  Panels<T> vh, u;
  PanelForward(const QuantForwardPlan& p, const at::TensorOptions& opts)
      : vh(*p.Vh, /*by_rows=*/true, opts), u(*p.U, /*by_rows=*/true, opts) {}
  void x_Vh(const Gemm<T>& gemm, const Mat<T>& h_r, const Mat<const T>& xb) {
    for (int64_t i = 0; i < vh.count(); ++i)  // h_r[:, panel] = x_b Vh[panel, :]^T
      gemm(h_r.col_block(vh.start(i), vh.size(i)), xb, vh.get(i).t(), 1.0, false);
  }
  void h_U(const Gemm<T>& gemm, const Mat<T>& yb, const Mat<const T>& h_r, bool acc) {
    for (int64_t i = 0; i < u.count(); ++i)  // y[:, panel] (+)= h_r U[panel, :]^T
      gemm(yb.col_block(u.start(i), u.size(i)), h_r, u.get(i).t(), 1.0, acc);
  }
};

// Backward: U's columns are dh_r's columns, Vh's columns are dx's columns.
template <typename T>
struct PanelBackward {
  static constexpr const char* kDispatchName = "cersa_bwd_q";
  Panels<T> u, vh;
  const bool reads_dh_r = false;
  PanelBackward(const QuantBackwardPlan& p, const at::TensorOptions& opts)
      : u(*p.U, /*by_rows=*/false, opts), vh(*p.Vh, /*by_rows=*/false, opts) {}
  void dy_U(const Gemm<T>& gemm, const Mat<T>& dh_r, const Mat<const T>& dyb) {
    for (int64_t i = 0; i < u.count(); ++i)  // dh_r[:, panel] = dy_b U[:, panel]
      gemm(dh_r.col_block(u.start(i), u.size(i)), dyb, u.get(i), 1.0, false);
  }
  void dh_Vh(const Gemm<T>& gemm, const Mat<T>& dxb, const Mat<const T>& dh_r) {
    for (int64_t i = 0; i < vh.count(); ++i)  // dx[:, panel] = dh_r Vh[:, panel]
      gemm(dxb.col_block(vh.start(i), vh.size(i)), dh_r, vh.get(i), 1.0, false);
  }
  void weight_grads(const Gemm<T>&, int64_t, int64_t, const Mat<const T>&, const Mat<const T>&,
                    bool) const {}
  void finish(const T*) const {}
};

}  // namespace

TORCH_LIBRARY_IMPL(cersa, CPU, m) {
  m.impl("linear_forward_q", &forward_q_op<forward_kernel<PanelForward, QuantForwardPlan>>);
  m.impl("linear_backward_q", &backward_q_op<backward_kernel<PanelBackward, QuantBackwardPlan>>);
}

}  // namespace cersa
