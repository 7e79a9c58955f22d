// CPU building blocks shared by the CPU schedules of the cersa:: ops (cersa_cpu.cpp: dense
// factors; cersa_cpu_quant.cpp: quantized factors): the pointer + stride operands (Mat), the
// GEMM that calls sgemm_ / dgemm_ directly or ATen's CPU kernels, the blocked schedule's sizes and
// the epilogue loops, and the blocked schedules themselves (forward_blocks / backward_blocks).
// docs/design.md "C++ CPU kernels" describes them; the header comment of
// cersa_cpu.cpp gives the measurements behind the choices.
#pragma once

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <algorithm>
#include <climits>
#include <type_traits>
#include <vector>

#include "../cersa_common.h"

namespace cersa {
namespace cpu {

using at::Tensor;

// From this many rows on, h and dh are stored column-major (cersa_cpu.cpp's header comment).
constexpr int64_t kColumnMajorMinRows = 128;

// An (N, w) buffer: row-major, or column-major (a transposed view of a row-major (w, N) block).
inline Tensor rows_buffer(int64_t N, int64_t w, bool column_major, const at::TensorOptions& opts) {
  return column_major ? at::empty({w, N}, opts).t() : at::empty({N, w}, opts);
}

// Rows per block of the blocked schedule (cersa_cpu.cpp's header comment): all N rows in one
// row-major block below kColumnMajorMinRows, else blocks of kBlockRows rows.  Measured on MiniLM, BERT and
// 384x1536 shapes at N = 4096 (1 thread), blocks of 256 to 512 rows were 3-13 % faster than one
// block of all rows and within noise of each other.
constexpr int64_t kBlockRows = 384;
inline int64_t block_rows(int64_t N) {
  return N < kColumnMajorMinRows ? std::max<int64_t>(N, 1) : std::min(N, kBlockRows);
}

// Rows per parallel chunk so that a chunk touches roughly 16K elements.
inline int64_t row_grain(int64_t width) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width));
}

// Fortran BLAS entry points (LP64: 32-bit integers) of the BLAS that torch's CPU library links and
// exports (MKL in the x86-64 wheels; ATen calls the same functions).  Declared weak: where the
// loaded torch exports none, they resolve to null and every GEMM goes through ATen.
extern "C" {
__attribute__((weak)) void sgemm_(const char* transa, const char* transb, const int* m,
                                  const int* n, const int* k, const float* alpha, const float* a,
                                  const int* lda, const float* b, const int* ldb, const float* beta,
                                  float* c, const int* ldc);
__attribute__((weak)) void dgemm_(const char* transa, const char* transb, const int* m,
                                  const int* n, const int* k, const double* alpha, const double* a,
                                  const int* lda, const double* b, const int* ldb,
                                  const double* beta, double* c, const int* ldc);
}

// A matrix operand: a pointer and element strides, element (i, j) at p[i * s0 + j * s1].  The
// kernels slice and transpose these instead of Tensors: each Tensor view (narrow, t()) costs about
// 1 us to create, and at N = 1 the ~30 views of one forward + backward took a sixth of its time.
// Mat<const T> is a read-only operand (an input, or a block of h / dh being read).
template <typename T>
struct Mat {
  T* p = nullptr;
  int64_t rows = 0, cols = 0, s0 = 0, s1 = 0;
  // Over a 2-D tensor of dtype T.  Inputs are read through const_data_ptr, so that a
  // copy-on-write input is not materialised; buffers the kernel writes, through mutable_data_ptr.
  static Mat of(const Tensor& t) {
    T* p;
    if constexpr (std::is_const_v<T>)
      p = static_cast<T*>(t.const_data_ptr());
    else
      p = static_cast<T*>(t.mutable_data_ptr());
    return {p, t.size(0), t.size(1), t.stride(0), t.stride(1)};
  }
  operator Mat<const T>() const requires(!std::is_const_v<T>) { return {p, rows, cols, s0, s1}; }
  Mat t() const { return {p, cols, rows, s1, s0}; }
  Mat row_block(int64_t i0, int64_t n) const { return {p + i0 * s0, n, cols, s0, s1}; }
  Mat col_block(int64_t j0, int64_t n) const { return {p + j0 * s1, rows, n, s0, s1}; }
  // A Tensor over the same memory (not owning it), for the ATen fallback of gemm_into, which
  // only reads the operands it is given as inputs.
  Tensor tensor(const at::TensorOptions& opts) const {
    return at::from_blob(const_cast<std::remove_const_t<T>*>(p), {rows, cols}, {s0, s1}, opts);
  }
};

// dst = src, or dst = 0 (src == nullptr), element by element (small: (rows, k) slices).
template <typename T>
void copy_or_zero(const Mat<T>& dst, const Mat<const T>* src) {
  for (int64_t i = 0; i < dst.rows; ++i)
    for (int64_t j = 0; j < dst.cols; ++j)
      dst.p[i * dst.s0 + j * dst.s1] = src ? src->p[i * src->s0 + j * src->s1] : T(0);
}

// How BLAS reads a (rows, cols) operand: row-major with leading dimension `ld` (element (i, j)
// at i * ld + j), or column-major (at i + j * ld); ok = false when it has no such layout or a
// size or stride beyond BLAS's 32-bit integers.  A single row or column fits either layout.
struct BlasLayout {
  bool ok = false, row_major = true;
  int ld = 1;
};
template <typename T>
BlasLayout blas_layout(const Mat<T>& t) {
  const int64_t rows = t.rows, cols = t.cols, s0 = t.s0, s1 = t.s1;
  BlasLayout l;
  if (rows > INT_MAX || cols > INT_MAX) return l;
  if ((s1 == 1 || cols == 1) && (rows == 1 || s0 >= std::max<int64_t>(1, cols))) {
    const int64_t ld = rows == 1 ? std::max<int64_t>(1, cols) : s0;
    if (ld <= INT_MAX) l = {true, true, static_cast<int>(ld)};
  } else if ((s0 == 1 || rows == 1) && (cols == 1 || s1 >= std::max<int64_t>(1, rows))) {
    const int64_t ld = cols == 1 ? std::max<int64_t>(1, rows) : s1;
    if (ld <= INT_MAX) l = {true, false, static_cast<int>(ld)};
  }
  return l;
}

// out (M, P) = alpha a (M, K) b (K, P) + beta out, through sgemm_ / dgemm_ (Fortran BLAS is
// column-major: a row-major `out` is computed as out^T = b^T a^T).  False when it cannot run
// here (no BLAS symbol, an empty size, an operand without a BLAS layout); then nothing is written.
template <typename T, typename Fn>
bool blas_gemm(Fn* fn, const Mat<T>& out, const Mat<const T>& a, const Mat<const T>& b,
               double alpha, double beta) {
  if (fn == nullptr) return false;
  if (out.rows == 0 || out.cols == 0 || a.cols == 0 || a.cols > INT_MAX) return false;
  const BlasLayout lo = blas_layout(out), la = blas_layout(a), lb = blas_layout(b);
  if (!lo.ok || !la.ok || !lb.ok) return false;
  const int m_ = static_cast<int>(out.rows), p_ = static_cast<int>(out.cols);
  const int k_ = static_cast<int>(a.cols);
  const T al = static_cast<T>(alpha), be = static_cast<T>(beta);
  // In column-major terms a row-major operand is stored transposed.
  if (lo.row_major) {  // out^T (P, M) = b^T (P, K) a^T (K, M)
    const char tb = lb.row_major ? 'N' : 'T', ta = la.row_major ? 'N' : 'T';
    fn(&tb, &ta, &p_, &m_, &k_, &al, b.p, &lb.ld, a.p, &la.ld, &be, out.p, &lo.ld);
  } else {  // out (M, P) = a (M, K) b (K, P)
    const char ta = la.row_major ? 'T' : 'N', tb = lb.row_major ? 'T' : 'N';
    fn(&ta, &tb, &m_, &p_, &k_, &al, a.p, &la.ld, b.p, &lb.ld, &be, out.p, &lo.ld);
  }
  return true;
}

// Whether fp32 GEMMs may go straight to sgemm_: not when torch is set to run them in reduced
// precision through oneDNN (torch.set_float32_matmul_precision("medium" / "high") or
// torch.backends.mkldnn.matmul.fp32_precision), which only ATen's path honours.
inline bool fp32_gemm_is_ieee() {
  const auto p =
      at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  return p != at::Float32Precision::BF16 && p != at::Float32Precision::TF32;
}

// aten_gemm_into's operations on the CPU: ATen's CPU kernels, called without a trip through the
// dispatcher.
struct CpuGemm {
  static void mm(Tensor& out, const Tensor& a, const Tensor& b) { at::cpu::mm_out(out, a, b); }
  static void addmm(Tensor& out, const Tensor& a, const Tensor& b, double beta, double alpha) {
    at::cpu::addmm_out(out, out, a, b, beta, alpha);
  }
  static void addmm_(Tensor& out, const Tensor& a, const Tensor& b, double alpha) {
    at::cpu::addmm_(out, a, b, 1.0, alpha);
  }
};

// out = a @ b (beta = 0) or out += a @ b, alpha folded into the GEMM.  `out` may be a strided
// block of a buffer (row- or column-major): BLAS writes it in place through its leading
// dimension.  fp32 / fp64 GEMMs call sgemm_ / dgemm_ directly (`direct`, decided once per op
// call): at N = 1 that takes about 1.5 us less per GEMM than at::cpu::mm_out (4.6 vs 6.2 us for
// a 1x384 by 384x176 product, 1 thread).  16-bit GEMMs, and these when blas_gemm declines, go
// through ATen's CPU kernels on Tensors made over the same memory.
template <typename T>
void gemm_into(const Mat<T>& out, const Mat<const T>& a, const Mat<const T>& b, double alpha,
               bool accumulate, bool direct, const at::TensorOptions& opts) {
  if (a.cols == 0) {  // empty inner dimension: the product is zero
    if (!accumulate) copy_or_zero<T>(out, nullptr);
    return;
  }
  if (out.rows == 0 || out.cols == 0) return;
  const double beta = accumulate ? 1.0 : 0.0;
  if constexpr (std::is_same_v<T, float>) {
    if (direct && blas_gemm<float>(sgemm_, out, a, b, alpha, beta)) return;
  } else if constexpr (std::is_same_v<T, double>) {
    if (direct && blas_gemm<double>(dgemm_, out, a, b, alpha, beta)) return;
  }
  Tensor o = out.tensor(opts);
  aten_gemm_into<CpuGemm>(o, a.tensor(opts), b.tensor(opts), alpha, accumulate);
}

// Whether this op call's fp32 / fp64 GEMMs may call BLAS directly (gemm_into).
inline bool direct_blas(at::ScalarType t) {
  return (t == at::kFloat && sgemm_ != nullptr && fp32_gemm_is_ieee()) ||
         (t == at::kDouble && dgemm_ != nullptr);
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

// Epilogue of the first GEMM, one pass over h_r (N, r) (row i, column j at h[i * hs0 + j * hs1]):
//   xv[i, j] = h[i, j] (when saved; xv is row-major (N, r));  h[i, j] *= S[j];
// and y[i, :] = bias (when given).  A row-major h is walked row by row, a column-major one
// column by column, so the inner loop always runs over contiguous memory.
template <typename scalar_t>
void forward_epilogue(scalar_t* h, int64_t hs0, int64_t hs1, int64_t N, int64_t r,
                      const scalar_t* S, scalar_t* xv, scalar_t* y, const scalar_t* bias, int64_t m) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (hs1 == 1) {  // row-major: one pass over the rows does all three
    if (r == 0 && bias == nullptr) return;
    at::parallel_for(0, N, row_grain(r + (bias ? m : 0)), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* hr = h + i * hs0;
        if (xv != nullptr) std::copy(hr, hr + r, xv + i * r);
        for (int64_t j = 0; j < r; ++j)
          hr[j] = static_cast<scalar_t>(static_cast<opmath_t>(hr[j]) * static_cast<opmath_t>(S[j]));
        if (bias != nullptr) std::copy(bias, bias + m, y + i * m);
      }
    });
    return;
  }
  // column-major: column j of h_r is contiguous (stride hs0 == 1 between rows)
  if (r > 0) {
    at::parallel_for(0, r, std::max<int64_t>(1, row_grain(N)), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        scalar_t* hc = h + j * hs1;
        const opmath_t sj = static_cast<opmath_t>(S[j]);
        if (xv != nullptr)
          for (int64_t i = 0; i < N; ++i) xv[i * r + j] = hc[i];
        for (int64_t i = 0; i < N; ++i)
          hc[i] = static_cast<scalar_t>(static_cast<opmath_t>(hc[i]) * sj);
      }
    });
  }
  if (bias != nullptr) {
    at::parallel_for(0, N, row_grain(m), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) std::copy(bias, bias + m, y + i * m);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

// Accumulator type of the dS / dbias sums: double for float and double, float for 16-bit types.
template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, at::BFloat16> ||
                                      std::is_same_v<scalar_t, at::Half>,
                                  float, double>;

// Epilogue of the dh GEMMs for a row-major dh, one pass over the rows, in fixed row chunks
// (deterministic sums), adding to the accumulators dS_acc (r,) and db_acc (m,):
//   dS    += sum_i xv[i, :] * dh_r[i, :]          (before the scaling below)
//   dh_r[i, :] *= S                               (when dx or dVh is needed)
//   dbias += sum_i dy[i, :]
// With want_dS and scale_dh false it is the dbias pass alone (then dh is not touched).
template <typename scalar_t>
void backward_epilogue(scalar_t* dh, int64_t lddh, int64_t N, int64_t r, const scalar_t* S,
                       bool scale_dh, const scalar_t* xv, const scalar_t* dy, int64_t dy_s0,
                       int64_t dy_s1, int64_t m, bool want_dS, bool want_db,
                       acc_of<scalar_t>* dS_acc, acc_of<scalar_t>* db_acc) {
  using acc_t = acc_of<scalar_t>;
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t width = (want_dS || scale_dh ? r : 0) + (want_db ? m : 0);
  if (width == 0 && !want_dS && !want_db) return;
  const int64_t grain = row_grain(width);
  const int64_t max_chunks = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(max_chunks, (N + grain - 1) / grain));
  const int64_t rows_per = (N + chunks - 1) / std::max<int64_t>(1, chunks);
  const int64_t rs = want_dS ? r : 0, ms = want_db ? m : 0;
  std::vector<acc_t> part(static_cast<size_t>(chunks * (rs + ms)), acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      acc_t* pS = part.data() + c * (rs + ms);
      acc_t* pb = pS + rs;
      const int64_t i0 = c * rows_per, i1 = std::min(N, i0 + rows_per);
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t* d = dh + i * lddh;
        if (want_dS) {
          const scalar_t* v = xv + i * r;
          for (int64_t j = 0; j < r; ++j)
            pS[j] += static_cast<acc_t>(static_cast<opmath_t>(v[j]) * static_cast<opmath_t>(d[j]));
        }
        if (scale_dh) {
          for (int64_t j = 0; j < r; ++j)
            d[j] = static_cast<scalar_t>(static_cast<opmath_t>(d[j]) * static_cast<opmath_t>(S[j]));
        }
        if (want_db) {
          const scalar_t* g = dy + i * dy_s0;
          if (dy_s1 == 1) {
            for (int64_t j = 0; j < m; ++j) pb[j] += static_cast<acc_t>(g[j]);
          } else {
            for (int64_t j = 0; j < m; ++j) pb[j] += static_cast<acc_t>(g[j * dy_s1]);
          }
        }
      }
    }
  });
  // Add the chunk partials in chunk order.
  for (int64_t j = 0; j < rs; ++j) {
    acc_t s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += part[c * (rs + ms) + j];
    dS_acc[j] += s;
  }
  for (int64_t j = 0; j < ms; ++j) {
    acc_t s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += part[c * (rs + ms) + rs + j];
    db_acc[j] += s;
  }
}

// The same dS and scaling for a column-major dh (column j of dh_r contiguous at dh + j * lddh):
//   dS_acc[j] += sum_i xv[i, j] * dh_r[i, j] (xv row-major (N, r));  dh_r[:, j] *= S[j].
// One column per task: each sum runs in a fixed order (deterministic).
template <typename scalar_t>
void backward_columns_epilogue(scalar_t* dh, int64_t lddh, int64_t N, int64_t r, const scalar_t* S,
                               bool scale_dh, const scalar_t* xv, acc_of<scalar_t>* dS_acc) {
  using acc_t = acc_of<scalar_t>;
  using opmath_t = at::opmath_type<scalar_t>;
  if (r == 0 || (!scale_dh && dS_acc == nullptr)) return;
  at::parallel_for(0, r, std::max<int64_t>(1, row_grain(N)), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      scalar_t* d = dh + j * lddh;
      if (dS_acc != nullptr) {
        acc_t sum = 0;
        for (int64_t i = 0; i < N; ++i)
          sum += static_cast<acc_t>(static_cast<opmath_t>(xv[i * r + j]) * static_cast<opmath_t>(d[i]));
        dS_acc[j] += sum;
      }
      if (scale_dh) {
        const opmath_t sj = static_cast<opmath_t>(S[j]);
        for (int64_t i = 0; i < N; ++i) d[i] = static_cast<scalar_t>(static_cast<opmath_t>(d[i]) * sj);
      }
    }
  });
}

// dU (m, r) *= S column-wise (dU = dy^T (xv diag S) = (dy^T xv) diag S: no (N, r) temporary).
template <typename scalar_t>
void scale_columns(scalar_t* a, int64_t rows, int64_t cols, const scalar_t* S) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* row = a + i * cols;
      for (int64_t j = 0; j < cols; ++j)
        row[j] = static_cast<scalar_t>(static_cast<opmath_t>(row[j]) * static_cast<opmath_t>(S[j]));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The blocked schedules (cersa_cpu.cpp's header comment) of both CPU op pairs: forward_blocks
// over a ForwardPlan or QuantForwardPlan, backward_blocks over a BackwardPlan or QuantBackwardPlan
// (../cersa_plan.h; outputs allocated there), scalar_t the dtype the caller dispatched on.  They
// differ only in the GEMMs that read U and Vh, which a Factors class runs for one block (dense
// factors: cersa_cpu.cpp; quantized ones over decoded panels: cersa_cpu_quant.cpp).
// ---------------------------------------------------------------------------------------------

// gemm_into with one op call's `direct` and tensor options.
template <typename T>
struct Gemm {
  bool direct;
  const at::TensorOptions& opts;
  void operator()(const Mat<T>& out, const Mat<const T>& a, const Mat<const T>& b, double alpha,
                  bool accumulate) const {
    gemm_into<T>(out, a, b, alpha, accumulate, direct, opts);
  }
};

// Forward.  Factors f(p, opts) provides, for a block of rows:
//   f.x_Vh(gemm, h_r, x_b):            h_r = x_b Vh^T
//   f.h_U(gemm, y_b, h_r, accumulate): y_b (+)= h_r U^T
template <typename scalar_t, class Factors, class Plan>
void forward_blocks(Plan& p) {
  using M = Mat<scalar_t>;
  using CM = Mat<const scalar_t>;
  const int64_t N = p.N, m = p.m, r = p.r, k = p.k;
  const auto& opts = p.opts;
  const bool has_bias = p.has_bias;

  // h: the forward's one intermediate, (rows, r + k) for a block of rows, row- or column-major
  // (cersa_cpu.cpp's header comment), reused by every block.  Columns [0, r): x Vh^T, scaled in
  // place by S in the epilogue; columns [r, r + k): s x A^T (s folded into the GEMM's alpha).
  const bool column_major = N >= kColumnMajorMinRows;
  const int64_t nb = block_rows(N);
  Tensor h = rows_buffer(nb, r + k, column_major, opts);
  Tensor bc = has_bias ? p.bias->contiguous() : Tensor();

  const Gemm<scalar_t> gemm{direct_blas(p.x.scalar_type()), opts};
  const CM X = CM::of(p.x);
  const CM AT = k > 0 ? CM::of(*p.A).t() : CM{}, BT = k > 0 ? CM::of(*p.B).t() : CM{};
  const M H = M::of(h), Y = M::of(p.y), HK = M::of(p.h_k);
  const scalar_t* S_p = p.S.template const_data_ptr<scalar_t>();
  const scalar_t* bias_p = has_bias ? bc.const_data_ptr<scalar_t>() : nullptr;
  Factors f(p, opts);
  for (int64_t i0 = 0; i0 < N; i0 += nb) {  // one block of rows: its x, h and y stay in cache
    const int64_t rows = std::min(nb, N - i0);
    const CM xb = X.row_block(i0, rows);
    const M hb = H.row_block(0, rows), yb = Y.row_block(i0, rows);
    const M hb_r = hb.col_block(0, r), hb_k = hb.col_block(r, k);
    if (r > 0) f.x_Vh(gemm, hb_r, xb);
    if (k > 0) gemm(hb_k, xb, AT, p.scale, false);
    scalar_t* xv_p = p.save_xv ? p.xv.template data_ptr<scalar_t>() + i0 * r : nullptr;
    forward_epilogue<scalar_t>(hb.p, hb.s0, hb.s1, rows, r, S_p, xv_p, yb.p, bias_p, m);
    // y = bias + h_r U^T + h_k B^T: GEMMs accumulating into the one output block.
    if (r > 0) f.h_U(gemm, yb, hb_r, has_bias);
    if (k > 0) gemm(yb, hb_k, BT, 1.0, has_bias || r > 0);
    if (r == 0 && k == 0 && !has_bias) copy_or_zero<scalar_t>(yb, nullptr);
    if (k > 0) {
      const CM src = hb_k;
      copy_or_zero<scalar_t>(HK.row_block(i0, rows), &src);
    }
  }
}

// Backward.  Factors f(p, opts) provides, for a block of rows:
//   f.dy_U(gemm, dh_r, dy_b):   dh_r = dy_b U
//   f.dh_Vh(gemm, dx_b, dh_r):  dx_b = dh_r Vh   (dh_r already scaled by S)
//   f.weight_grads(gemm, i0, rows, dy_b^T, dh_r, accumulate): the factors' own gradients over
//                               rows [i0, i0 + rows) (dU, dVh; none for frozen factors)
//   f.finish(S):                after all blocks (dU's diag S)
//   f.reads_dh_r:               whether weight_grads reads dh_r (dVh)
template <typename scalar_t, class Factors, class Plan>
void backward_blocks(Plan& p) {
  using acc_t = acc_of<scalar_t>;
  using M = Mat<scalar_t>;
  using CM = Mat<const scalar_t>;
  const Tensor& dy = p.dy;
  const int64_t N = p.N, m = p.m, r = p.r, rr = p.rr, kk = p.kk;
  const bool need_x = p.need_x, need_bias = p.need_bias, want_dS = p.want_dS;
  const bool do_dA = p.do_dA, do_dB = p.do_dB;
  const auto& opts = p.opts;
  Factors f(p, opts);

  // dh: the backward's one intermediate, (rows, r + k) for a block of rows, row- or column-major
  // (cersa_cpu.cpp's header comment), reused by every block.  Columns [0, r): dy U, then
  // (dy U) diag(S) after the epilogue; columns [r, r + k): s dy B (s in the GEMM's alpha).
  const bool column_major = N >= kColumnMajorMinRows;
  const int64_t nb = block_rows(N);
  // The weight gradients sum over all rows.  In fp32 / fp64 each block adds its share into them
  // (the GEMM's beta = 1), while its dy / x / dh are in cache; in 16-bit dtypes that would round
  // the running sum to 16 bits once per block, so their GEMMs run once over all N rows instead,
  // and dh_r / dh_k are kept whole: one (N, r + k) buffer.
  const bool blocked_sums = dy.scalar_type() == at::kFloat || dy.scalar_type() == at::kDouble;
  const bool whole_dh = !blocked_sums && (f.reads_dh_r || do_dA) && nb < N;
  Tensor dh = rows_buffer(whole_dh ? N : nb, rr + kk, column_major, opts);
  const int64_t dh_rows = dh.size(0);
  const bool scale_dh = p.scale_dh;

  const Gemm<scalar_t> gemm{direct_blas(dy.scalar_type()), opts};
  // Inputs are wrapped only where used: x and h_k may be passed when not needed, in any shape.
  const CM DY = CM::of(dy);
  const CM Am = p.has_delta ? CM::of(*p.A) : CM{}, Bm = p.has_delta ? CM::of(*p.B) : CM{};
  const CM X = do_dA ? CM::of(*p.x) : CM{}, HK = do_dB ? CM::of(*p.h_k) : CM{};
  const M DH = M::of(dh), DX = need_x ? M::of(p.dx) : M{};
  const M DA = do_dA ? M::of(p.dA) : M{}, DB = do_dB ? M::of(p.dB) : M{};
  const scalar_t* S_p = p.S.template const_data_ptr<scalar_t>();
  // Weight-gradient GEMMs over rows [i0, i0 + rows): the factors' (dU, dVh), then
  // dA += (s dh_k)^T x and dB += dy^T h_k.
  auto weight_grads = [&](int64_t i0, int64_t rows, const CM& dhb_r, const CM& dhb_k) {
    const bool acc = i0 > 0;
    const CM dyb_t = DY.row_block(i0, rows).t();
    f.weight_grads(gemm, i0, rows, dyb_t, dhb_r, acc);
    if (do_dA) gemm(DA, dhb_k.t(), X.row_block(i0, rows), 1.0, acc);
    if (do_dB) gemm(DB, dyb_t, HK.row_block(i0, rows), 1.0, acc);
  };
  std::vector<acc_t> dS_acc(want_dS ? r : 0, acc_t(0)), db_acc(need_bias ? m : 0, acc_t(0));
  for (int64_t i0 = 0; i0 < N; i0 += nb) {  // one block of rows: its dy, dh and dx stay in cache
    const int64_t rows = std::min(nb, N - i0);
    const int64_t d0 = dh_rows == N ? i0 : 0;  // the block's first row in dh
    const CM dyb = DY.row_block(i0, rows);
    const M dhb = DH.row_block(d0, rows);
    const M dhb_r = dhb.col_block(0, rr), dhb_k = dhb.col_block(rr, kk);
    if (rr > 0) f.dy_U(gemm, dhb_r, dyb);
    if (kk > 0) gemm(dhb_k, dyb, Bm, p.scale, false);
    const scalar_t* xvp =
        want_dS ? p.xv_c.template const_data_ptr<scalar_t>() + i0 * r : nullptr;
    // Row-major dh: dS, the scaling and dbias in one pass over the rows.  Column-major dh: dS
    // and the scaling column by column, then dbias in a row pass over the block of dy.
    backward_epilogue<scalar_t>(dhb.p, dhb.s0, rows, r, S_p, scale_dh && !column_major, xvp,
                                dyb.p, dyb.s0, dyb.s1, m, want_dS && !column_major, need_bias,
                                dS_acc.data(), db_acc.data());
    if (column_major)
      backward_columns_epilogue<scalar_t>(dhb.p, dhb.s1, rows, r, S_p, scale_dh, xvp,
                                          want_dS ? dS_acc.data() : nullptr);
    if (need_x) {  // dx = (dh_r diag S) Vh + s dh_k A: both segments accumulate into one block
      const M dxb = DX.row_block(i0, rows);
      if (rr > 0) f.dh_Vh(gemm, dxb, dhb_r);
      if (kk > 0) gemm(dxb, dhb_k, Am, 1.0, rr > 0);
      if (rr == 0 && kk == 0) copy_or_zero<scalar_t>(dxb, nullptr);
    }
    if (blocked_sums) weight_grads(i0, rows, dhb_r, dhb_k);
  }
  if (!blocked_sums && N > 0) weight_grads(0, N, DH.col_block(0, rr), DH.col_block(rr, kk));
  for (int64_t j = 0; j < static_cast<int64_t>(dS_acc.size()); ++j)
    p.dS.template data_ptr<scalar_t>()[j] = static_cast<scalar_t>(dS_acc[j]);
  for (int64_t j = 0; j < static_cast<int64_t>(db_acc.size()); ++j)
    p.dbias.template data_ptr<scalar_t>()[j] = static_cast<scalar_t>(db_acc[j]);
  f.finish(S_p);
}

// The CPU kernels of the schedules: forward_blocks / backward_blocks with Factors<scalar_t>,
// scalar_t the plan's dtype; Factors<T>::kDispatchName names the dispatch (a build-time string).
template <template <typename> class Factors, class Plan>
void forward_kernel(Plan& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(),
                                  Factors<float>::kDispatchName,
                                  [&] { forward_blocks<scalar_t, Factors<scalar_t>>(p); });
}

template <template <typename> class Factors, class Plan>
void backward_kernel(Plan& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.dy.scalar_type(),
                                  Factors<float>::kDispatchName,
                                  [&] { backward_blocks<scalar_t, Factors<scalar_t>>(p); });
}

}  // namespace cpu
}  // namespace cersa
