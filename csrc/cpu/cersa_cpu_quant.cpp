// CPU kernels of cersa::linear_forward_q and cersa::linear_backward_q: the forward and backward of
// docs/design.md "Forward" / "Backward" with the frozen U (m, r) and Vh (r, n) stored as int8 or
// NF4 codes with float32 block scales (docs/design.md "Quantized factors"; the format in
// ../cersa_quant_format.h).  The argument checks, sizes, needs and output allocations are the plans
// of ../cersa_plan.h (QuantForwardPlan / QuantBackwardPlan); this file is their CPU schedule.
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
class Panels {
 public:
  Panels(const QuantFactor& F, bool by_rows, const at::TensorOptions& opts)
      : F_(F), by_rows_(by_rows), opts_(opts) {
    extent_ = by_rows ? F.rows : F.cols;
    other_ = by_rows ? F.cols : F.rows;
    if (extent_ * other_ <= kPanelElems) {
      width_ = std::max<int64_t>(extent_, 1);
    } else {
      const int64_t count = (extent_ * other_ + kPanelElems - 1) / kPanelElems;
      width_ = (extent_ + count - 1) / count;
      width_ = (width_ + kPanelAlign - 1) / kPanelAlign * kPanelAlign;
      width_ = std::max<int64_t>(1, std::min(width_, extent_));
    }
    count_ = extent_ == 0 ? 0 : (extent_ + width_ - 1) / width_;
  }

  int64_t count() const { return count_; }
  int64_t start(int64_t i) const { return i * width_; }
  int64_t size(int64_t i) const { return std::min(width_, extent_ - i * width_); }

  // Panel i as a GEMM operand (decoded now unless it is the one in the buffer).
  Mat<const T> get(int64_t i) {
    if (!buf_.defined()) buf_ = at::empty({std::max<int64_t>(1, width_ * other_)}, opts_);
    T* p = buf_.mutable_data_ptr<T>();
    if (i != cached_) {
      decode(i, p);
      cached_ = i;
    }
    const int64_t s = size(i);
    if (by_rows_) return {p, s, other_, std::max<int64_t>(1, other_), 1};
    return {p, other_, s, std::max<int64_t>(1, s), 1};
  }

 private:
  void decode(int64_t i, T* dst) const {
    const void* codes = F_.codes.const_data_ptr();
    const float* scales = F_.scales.const_data_ptr<float>();
    const int64_t c0 = start(i), s = size(i);
    if (s == 0 || other_ == 0) return;
    if (by_rows_) {  // rows [c0, c0 + s): one run of the flat factor
      const int64_t f0 = c0 * F_.cols, len = s * F_.cols;
      at::parallel_for(0, len, kDecodeGrain, [&](int64_t b, int64_t e) {
        decode_run<T>(F_, codes, scales, f0 + b, e - b, dst + b);
      });
    } else {  // columns [c0, c0 + s) of every row: one run per row
      const int64_t cols = F_.cols;
      at::parallel_for(0, F_.rows, std::max<int64_t>(1, kDecodeGrain / s), [&](int64_t b, int64_t e) {
        for (int64_t row = b; row < e; ++row)
          decode_run<T>(F_, codes, scales, row * cols + c0, s, dst + row * s);
      });
    }
  }

  const QuantFactor& F_;
  const bool by_rows_;
  const at::TensorOptions opts_;
  int64_t extent_ = 0, other_ = 0, width_ = 1, count_ = 0;
  int64_t cached_ = -1;
  Tensor buf_;
};

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

// The forward schedule over a checked plan (cersa_plan.h; y, h_k and xv allocated there): that of
// cersa_cpu.cpp's forward_cpu with the two factor GEMMs run over panels.
void forward_q_cpu(QuantForwardPlan& p) {
  const int64_t N = p.N, m = p.m, r = p.r, k = p.k;
  const auto& opts = p.opts;
  const bool has_bias = p.has_bias;

  // h: (rows of one block, r + k), row- or column-major, reused by every block: columns [0, r)
  // x Vh^T, scaled in place by S in the epilogue; columns [r, r + k) s x A^T.
  const bool column_major = N >= kColumnMajorMinRows;
  const int64_t nb = block_rows(N);
  Tensor h = rows_buffer(nb, r + k, column_major, opts);
  Tensor bc = has_bias ? p.bias->contiguous() : Tensor();

  const bool direct = direct_blas(p.x.scalar_type());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "cersa_fwd_q", [&] {
    using M = Mat<scalar_t>;
    using CM = Mat<const scalar_t>;
    auto gemm = [&](const M& out, const CM& a, const CM& b, double alpha, bool accumulate) {
      gemm_into<scalar_t>(out, a, b, alpha, accumulate, direct, opts);
    };
    const CM X = CM::of(p.x);
    const CM AT = k > 0 ? CM::of(*p.A).t() : CM{}, BT = k > 0 ? CM::of(*p.B).t() : CM{};
    const M H = M::of(h), Y = M::of(p.y), HK = M::of(p.h_k);
    const scalar_t* S_p = p.S.const_data_ptr<scalar_t>();
    const scalar_t* bias_p = has_bias ? bc.const_data_ptr<scalar_t>() : nullptr;
    // Vh's rows are h_r's columns, U's rows are y's columns.
    Panels<scalar_t> vh_panels(*p.Vh, /*by_rows=*/true, opts), u_panels(*p.U, /*by_rows=*/true, opts);
    for (int64_t i0 = 0; i0 < N; i0 += nb) {  // one block of rows: its x, h and y stay in cache
      const int64_t rows = std::min(nb, N - i0);
      const CM xb = X.row_block(i0, rows);
      const M hb = H.row_block(0, rows), yb = Y.row_block(i0, rows);
      const M hb_r = hb.col_block(0, r), hb_k = hb.col_block(r, k);
      if (r > 0) {
        for (int64_t i = 0; i < vh_panels.count(); ++i)  // h_r[:, panel] = x_b Vh[panel, :]^T
          gemm(hb_r.col_block(vh_panels.start(i), vh_panels.size(i)), xb, vh_panels.get(i).t(),
               1.0, false);
      }
      if (k > 0) gemm(hb_k, xb, AT, p.scale, false);
      scalar_t* xv_p = p.save_xv ? p.xv.data_ptr<scalar_t>() + i0 * r : nullptr;
      forward_epilogue<scalar_t>(hb.p, hb.s0, hb.s1, rows, r, S_p, xv_p, yb.p, bias_p, m);
      // y = bias + h_r U^T + h_k B^T, all into the one output block.
      if (r > 0) {
        for (int64_t i = 0; i < u_panels.count(); ++i)  // y[:, panel] (+)= h_r U[panel, :]^T
          gemm(yb.col_block(u_panels.start(i), u_panels.size(i)), hb_r, u_panels.get(i).t(), 1.0,
               has_bias);
      }
      if (k > 0) gemm(yb, hb_k, BT, 1.0, has_bias || r > 0);
      if (r == 0 && k == 0 && !has_bias) copy_or_zero<scalar_t>(yb, nullptr);
      if (k > 0) {
        const CM src = hb_k;
        copy_or_zero<scalar_t>(HK.row_block(i0, rows), &src);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

// The backward schedule over a checked plan (cersa_plan.h; the gradients allocated there): that of
// cersa_cpu.cpp's backward_cpu without dU / dVh (frozen factors), with the two factor GEMMs run
// over panels.
void backward_q_cpu(QuantBackwardPlan& p) {
  const Tensor& dy = p.dy;
  const int64_t N = p.N, m = p.m, r = p.r, rr = p.rr, kk = p.kk;
  const bool need_x = p.need_x, need_bias = p.need_bias, want_dS = p.want_dS;
  const bool do_dA = p.do_dA, do_dB = p.do_dB;
  const auto& opts = p.opts;

  // dh: (rows of one block, r + k), reused by every block: columns [0, r) dy U, then
  // (dy U) diag(S); columns [r, r + k) s dy B.  In 16-bit dtypes dA and dB run once over all rows
  // (no 16-bit rounding of a running sum per block), so dh is then kept whole when dA reads it.
  const bool column_major = N >= kColumnMajorMinRows;
  const int64_t nb = block_rows(N);
  const bool blocked_sums = dy.scalar_type() == at::kFloat || dy.scalar_type() == at::kDouble;
  const bool whole_dh = !blocked_sums && do_dA && nb < N;
  Tensor dh = rows_buffer(whole_dh ? N : nb, rr + kk, column_major, opts);
  const int64_t dh_rows = dh.size(0);
  const bool scale_dh = p.scale_dh;

  const bool direct = direct_blas(dy.scalar_type());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "cersa_bwd_q", [&] {
    using acc_t = acc_of<scalar_t>;
    using M = Mat<scalar_t>;
    using CM = Mat<const scalar_t>;
    auto gemm = [&](const M& out, const CM& a, const CM& b, double alpha, bool accumulate) {
      gemm_into<scalar_t>(out, a, b, alpha, accumulate, direct, opts);
    };
    const CM DY = CM::of(dy);
    const CM Am = p.has_delta ? CM::of(*p.A) : CM{}, Bm = p.has_delta ? CM::of(*p.B) : CM{};
    const CM X = do_dA ? CM::of(*p.x) : CM{}, HK = do_dB ? CM::of(*p.h_k) : CM{};
    const M DH = M::of(dh), DX = need_x ? M::of(p.dx) : M{};
    const M DA = do_dA ? M::of(p.dA) : M{}, DB = do_dB ? M::of(p.dB) : M{};
    const scalar_t* S_p = p.S.const_data_ptr<scalar_t>();
    // U's columns are dh_r's columns, Vh's columns are dx's columns.
    Panels<scalar_t> u_panels(*p.U, /*by_rows=*/false, opts), vh_panels(*p.Vh, /*by_rows=*/false, opts);
    // dA += (s dh_k)^T x, dB += dy^T h_k over rows [i0, i0 + rows).
    auto weight_grads = [&](int64_t i0, int64_t rows, const CM& dhb_k) {
      const bool acc = i0 > 0;
      if (do_dA) gemm(DA, dhb_k.t(), X.row_block(i0, rows), 1.0, acc);
      if (do_dB) gemm(DB, DY.row_block(i0, rows).t(), HK.row_block(i0, rows), 1.0, acc);
    };
    std::vector<acc_t> dS_acc(want_dS ? r : 0, acc_t(0)), db_acc(need_bias ? m : 0, acc_t(0));
    for (int64_t i0 = 0; i0 < N; i0 += nb) {  // one block of rows: its dy, dh and dx stay in cache
      const int64_t rows = std::min(nb, N - i0);
      const int64_t d0 = dh_rows == N ? i0 : 0;
      const CM dyb = DY.row_block(i0, rows);
      const M dhb = DH.row_block(d0, rows);
      const M dhb_r = dhb.col_block(0, rr), dhb_k = dhb.col_block(rr, kk);
      if (rr > 0) {
        for (int64_t i = 0; i < u_panels.count(); ++i)  // dh_r[:, panel] = dy_b U[:, panel]
          gemm(dhb_r.col_block(u_panels.start(i), u_panels.size(i)), dyb, u_panels.get(i), 1.0,
               false);
      }
      if (kk > 0) gemm(dhb_k, dyb, Bm, p.scale, false);
      const scalar_t* xvp = want_dS ? p.xv_c.const_data_ptr<scalar_t>() + i0 * r : nullptr;
      backward_epilogue<scalar_t>(dhb.p, dhb.s0, rows, r, S_p, scale_dh && !column_major, xvp,
                                  dyb.p, dyb.s0, dyb.s1, m, want_dS && !column_major, need_bias,
                                  dS_acc.data(), db_acc.data());
      if (column_major)
        backward_columns_epilogue<scalar_t>(dhb.p, dhb.s1, rows, r, S_p, scale_dh, xvp,
                                            want_dS ? dS_acc.data() : nullptr);
      if (need_x) {  // dx = (dh_r diag S) Vh + s dh_k A, both into one block
        const M dxb = DX.row_block(i0, rows);
        if (rr > 0) {
          for (int64_t i = 0; i < vh_panels.count(); ++i)  // dx[:, panel] = dh_r Vh[:, panel]
            gemm(dxb.col_block(vh_panels.start(i), vh_panels.size(i)), dhb_r, vh_panels.get(i),
                 1.0, false);
        }
        if (kk > 0) gemm(dxb, dhb_k, Am, 1.0, rr > 0);
        if (rr == 0 && kk == 0) copy_or_zero<scalar_t>(dxb, nullptr);
      }
      if (blocked_sums) weight_grads(i0, rows, dhb_k);
    }
    if (!blocked_sums && N > 0) weight_grads(0, N, DH.col_block(rr, kk));
    for (int64_t j = 0; j < static_cast<int64_t>(dS_acc.size()); ++j)
      p.dS.data_ptr<scalar_t>()[j] = static_cast<scalar_t>(dS_acc[j]);
    for (int64_t j = 0; j < static_cast<int64_t>(db_acc.size()); ++j)
      p.dbias.data_ptr<scalar_t>()[j] = static_cast<scalar_t>(db_acc[j]);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(cersa, CPU, m) {
  m.impl("linear_forward_q", &forward_q_op<forward_q_cpu>);
  m.impl("linear_backward_q", &backward_q_op<backward_q_cpu>);
}

}  // namespace cersa
