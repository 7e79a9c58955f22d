// CPU kernels of cersa::linear_forward and cersa::linear_backward (DESIGN.md "Forward"/"Backward").
//
// GEMMs go through ATen's CPU kernels (at::cpu::mm_out / addmm_out / addmm_: BLAS or oneDNN,
// called without a trip through the dispatcher) and write into strided views of one
// preallocated buffer: BLAS takes a leading dimension, so [x Vh^T | s x A^T] is produced in one
// (N, r + k) buffer without concatenating [Vh; A] and without any (m, n) tensor.  The scalar
// work (S, the delta scale s, the bias, the dS / dbias reductions) runs in epilogue loops
// parallelised with at::parallel_for.
//
// Layout of the (N, r + k) buffers h and dh.  For N >= kColumnMajorMinRows they are stored
// column-major, i.e. as a row-major (r + k, N) block seen through a transposed view: the GEMMs
// that produce them then have N, not r, as their output's contiguous dimension.  MKL runs the
// GEMMs x Vh^T and dy U at 69-82 % of its dense rate when r is odd (e.g. MiniLM's r = 263) with a
// row-major output, and at 88-95 % with the column-major one; the GEMMs that read h / dh run at
// the same rate either way.  Below that N the row-major layout is as fast or faster.
//
// Allocations (reference path in parentheses):
//   forward : h (N, r+k), y (N, m), h_k (N, k) returned copy, xv (N, r) only when saved
//             (reference: xv, h_r, y, h_k and its scaled copy)
//   backward: dh (N, r+k) and the gradients themselves; dS / dbias partial sums are per-chunk
//             rows of one small (chunks, r + m) accumulator
//             (reference: dh_r, dh_k, dh_r*S, xv*S (N, r), xv*dh_r (N, r), and the gradients)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../cersa_common.h"

namespace cersa {
namespace {

using at::Tensor;
using std::optional;

// From this many rows on, h and dh are stored column-major (see the header comment).
constexpr int64_t kColumnMajorMinRows = 128;

// An (N, w) buffer: row-major, or column-major (a transposed view of a row-major (w, N) block).
inline Tensor rows_buffer(int64_t N, int64_t w, bool column_major, const at::TensorOptions& opts) {
  return column_major ? at::empty({w, N}, opts).t() : at::empty({N, w}, opts);
}

// Rows per parallel chunk so that a chunk touches roughly 16K elements.
inline int64_t row_grain(int64_t width) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width));
}

// out = a @ b (beta = 0) or out += a @ b, alpha folded into the GEMM.  `out` may be a strided
// view (row stride >= cols, unit column stride): BLAS writes it in place through its leading
// dimension.
inline void gemm_into(Tensor& out, const Tensor& a, const Tensor& b, double alpha, bool accumulate) {
  if (a.size(1) == 0) {  // empty inner dimension: the product is zero
    if (!accumulate) out.zero_();
    return;
  }
  if (accumulate) {
    at::cpu::addmm_(out, a, b, 1.0, alpha);
  } else if (alpha == 1.0) {
    at::cpu::mm_out(out, a, b);
  } else {
    // beta = 0: `out`'s old contents are not read (BLAS semantics, ATen's documented contract).
    at::cpu::addmm_out(out, out, a, b, 0.0, alpha);
  }
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

std::tuple<Tensor, Tensor, Tensor> linear_forward_cpu(const Tensor& x_in, const Tensor& U,
                                                      const Tensor& S, const Tensor& Vh,
                                                      const optional<Tensor>& A,
                                                      const optional<Tensor>& B,
                                                      const optional<Tensor>& bias, double scale,
                                                      bool save_xv) {
  const Tensor x = (x_in.defined() && x_in.dim() == 2) ? blas_ready(x_in) : x_in;
  int64_t m, r, n, k;
  TORCH_CHECK(x.defined() && x.dim() == 2, "cersa: x: expected a 2-D tensor (N, in_features)",
              x.defined() ? ", got shape " + shape_str(x) : ", got None");
  check_factors(x, U, S, Vh, A, B, m, r, n, k);
  check_size("x", x, 1, n, "in_features = Vh.size(1)");
  if (present(bias)) {
    check_tensor("bias", *bias, 1, x);
    check_size("bias", *bias, 0, m, "out_features = U.size(0)");
  }
  const int64_t N = x.size(0);
  const auto opts = x.options();

  // h: the forward's one intermediate, (N, r + k), row- or column-major (header comment).
  // Columns [0, r): x Vh^T, scaled in place by S in the epilogue; columns [r, r + k): s x A^T
  // (s folded into the GEMM's alpha).
  const bool column_major = N >= kColumnMajorMinRows;
  Tensor h = rows_buffer(N, r + k, column_major, opts);
  Tensor h_r = h.narrow(1, 0, r);
  Tensor h_k = h.narrow(1, r, k);
  Tensor y = at::empty({N, m}, opts);                      // the output
  Tensor xv = at::empty({N, save_xv ? r : 0}, opts);       // x Vh^T, saved for dS / dU

  if (N > 0) {
    if (r > 0) gemm_into(h_r, x, Vh.t(), 1.0, false);
    if (k > 0) gemm_into(h_k, x, A->t(), scale, false);
    Tensor Sc = S.contiguous();
    Tensor bc = present(bias) ? bias->contiguous() : Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cersa_fwd_epi", [&] {
      forward_epilogue<scalar_t>(h.data_ptr<scalar_t>(), h.stride(0), h.stride(1), N, r,
                                 Sc.const_data_ptr<scalar_t>(),
                                 save_xv ? xv.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                                 bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr, m);
    });
    // y = bias + h_r U^T + h_k B^T: two GEMMs accumulating into the one output.
    const bool has_bias = present(bias);
    if (r > 0) gemm_into(y, h_r, U.t(), 1.0, has_bias);
    if (k > 0) gemm_into(y, h_k, B->t(), 1.0, has_bias || r > 0);
    if (r == 0 && k == 0 && !has_bias) y.zero_();
  }
  // h_k is returned as its own (N, k) tensor so that saving it for the backward does not keep
  // the whole (N, r + k) buffer alive (DESIGN.md: nothing of size (N, r) unless S trains).
  Tensor h_k_out = at::empty({N, k}, opts);
  if (N > 0 && k > 0) h_k_out.copy_(h_k);
  return {y, h_k_out, xv};
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

// Accumulator type of the dS / dbias sums: double for float and double, float for 16-bit types.
template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, at::BFloat16> ||
                                      std::is_same_v<scalar_t, at::Half>,
                                  float, double>;

// Epilogue of the dh GEMMs, one pass over the rows, in fixed row chunks (deterministic sums):
//   dS    += sum_i xv[i, :] * dh_r[i, :]          (before the scaling below)
//   dh_r[i, :] *= S                               (when dx or dVh is needed)
//   dbias += sum_i dy[i, :]
template <typename scalar_t>
void backward_epilogue(scalar_t* dh, int64_t lddh, int64_t N, int64_t r, const scalar_t* S,
                       bool scale_dh, const scalar_t* xv, const scalar_t* dy, int64_t dy_s0,
                       int64_t dy_s1, int64_t m, bool want_dS, bool want_db, scalar_t* dS_out,
                       scalar_t* db_out) {
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
  // Sum the chunk partials in chunk order.
  for (int64_t j = 0; j < rs; ++j) {
    acc_t s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += part[c * (rs + ms) + j];
    dS_out[j] = static_cast<scalar_t>(s);
  }
  for (int64_t j = 0; j < ms; ++j) {
    acc_t s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += part[c * (rs + ms) + rs + j];
    db_out[j] = static_cast<scalar_t>(s);
  }
}

// The same dS and scaling for a column-major dh (column j of dh_r contiguous at dh + j * lddh):
//   dS[j] = sum_i xv[i, j] * dh_r[i, j] (xv row-major (N, r));  dh_r[:, j] *= S[j].
// One column per task: each sum runs in a fixed order (deterministic).
template <typename scalar_t>
void backward_columns_epilogue(scalar_t* dh, int64_t lddh, int64_t N, int64_t r, const scalar_t* S,
                               bool scale_dh, const scalar_t* xv, scalar_t* dS_out) {
  using acc_t = acc_of<scalar_t>;
  using opmath_t = at::opmath_type<scalar_t>;
  if (r == 0 || (!scale_dh && dS_out == nullptr)) return;
  at::parallel_for(0, r, std::max<int64_t>(1, row_grain(N)), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      scalar_t* d = dh + j * lddh;
      if (dS_out != nullptr) {
        acc_t sum = 0;
        for (int64_t i = 0; i < N; ++i)
          sum += static_cast<acc_t>(static_cast<opmath_t>(xv[i * r + j]) * static_cast<opmath_t>(d[i]));
        dS_out[j] = static_cast<scalar_t>(sum);
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

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_backward_cpu(
    const Tensor& dy_in, const optional<Tensor>& x_in, const optional<Tensor>& h_k,
    const optional<Tensor>& xv, const Tensor& U, const Tensor& S, const Tensor& Vh,
    const optional<Tensor>& A, const optional<Tensor>& B, double scale, std::array<bool, 7> needs) {
  const Tensor dy = (dy_in.defined() && dy_in.dim() == 2) ? blas_ready(dy_in) : dy_in;
  optional<Tensor> x = x_in;
  if (present(x) && x->dim() == 2) x = blas_ready(*x);
  int64_t m, r, n, k;
  check_backward_inputs(dy, x, h_k, xv, U, S, Vh, A, B, needs, m, r, n, k);
  const int64_t N = dy.size(0);
  const bool has_delta = present(A);
  const bool need_x = needs[0], need_U = needs[1], need_S = needs[2], need_Vh = needs[3];
  const bool need_A = needs[4] && has_delta, need_B = needs[5] && has_delta, need_bias = needs[6];
  const auto opts = dy.options();
  // Gradients that are not computed come back as distinct (0,) tensors (outputs never alias).
  auto none = [&] { return at::empty({0}, opts); };

  const bool need_dhr = r > 0 && (need_x || need_S || need_Vh);
  const bool need_dhk = has_delta && k > 0 && (need_x || need_A);
  const int64_t rr = need_dhr ? r : 0, kk = need_dhk ? k : 0;
  // dh: the backward's one intermediate, (N, r + k).  Columns [0, r): dy U, then (dy U) diag(S)
  // after the epilogue; columns [r, r + k): s dy B (s folded into the GEMM's alpha).
  const bool column_major = N >= kColumnMajorMinRows;  // layout: see the header comment
  Tensor dh = rows_buffer(N, rr + kk, column_major, opts);
  Tensor dh_r = dh.narrow(1, 0, rr);
  Tensor dh_k = dh.narrow(1, rr, kk);
  if (N > 0) {
    if (rr > 0) gemm_into(dh_r, dy, U, 1.0, false);
    if (kk > 0) gemm_into(dh_k, dy, *B, scale, false);
  }

  Tensor dS = need_S ? at::empty({r}, opts) : none();
  Tensor dbias = need_bias ? at::empty({m}, opts) : none();
  const bool scale_dh = rr > 0 && (need_x || need_Vh);
  const bool want_dS = need_S && r > 0;
  Tensor xvc = want_dS ? xv->contiguous() : Tensor();
  Tensor Sc = S.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "cersa_bwd_epi", [&] {
    const scalar_t* xvp = want_dS ? xvc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dSp = need_S ? dS.data_ptr<scalar_t>() : nullptr;
    // Row-major dh: dS, the scaling and dbias in one pass over the rows.  Column-major dh: dS
    // and the scaling column by column, then dbias in the row pass over dy alone.
    backward_epilogue<scalar_t>(dh.data_ptr<scalar_t>(), rr + kk, N, r, Sc.const_data_ptr<scalar_t>(),
                                scale_dh && !column_major, xvp, dy.const_data_ptr<scalar_t>(),
                                dy.stride(0), dy.stride(1), m, want_dS && !column_major,
                                need_bias, dSp, need_bias ? dbias.data_ptr<scalar_t>() : nullptr);
    if (column_major)
      backward_columns_epilogue<scalar_t>(dh.data_ptr<scalar_t>(), dh.stride(1), N, r,
                                          Sc.const_data_ptr<scalar_t>(), scale_dh,
                                          want_dS ? xvp : nullptr, want_dS ? dSp : nullptr);
  });

  Tensor dx = none(), dU = none(), dVh = none(), dA = none(), dB = none();
  if (need_x) {  // dx = (dh_r diag S) Vh + s dh_k A: both segments accumulate into one output
    dx = at::empty({N, n}, opts);
    if (rr > 0) gemm_into(dx, dh_r, Vh, 1.0, false);
    if (kk > 0) gemm_into(dx, dh_k, *A, 1.0, rr > 0);
    if (rr == 0 && kk == 0) dx.zero_();
  }
  if (need_U) {  // dU = (dy^T xv) diag S
    dU = at::empty({m, r}, opts);
    if (r > 0) {
      gemm_into(dU, dy.t(), *xv, 1.0, false);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "cersa_dU", [&] {
        scale_columns<scalar_t>(dU.data_ptr<scalar_t>(), m, r, Sc.const_data_ptr<scalar_t>());
      });
    }
  }
  if (need_Vh) {  // dVh = (dh_r diag S)^T x
    dVh = at::empty({r, n}, opts);
    if (r > 0) gemm_into(dVh, dh_r.t(), *x, 1.0, false);
  }
  if (need_A) {  // dA = s dh_k^T x   (s already in dh_k)
    dA = at::empty({k, n}, opts);
    if (k > 0) gemm_into(dA, dh_k.t(), *x, 1.0, false);
  }
  if (need_B) {  // dB = dy^T h_k
    dB = at::empty({m, k}, opts);
    if (k > 0) gemm_into(dB, dy.t(), *h_k, 1.0, false);
  }
  return {dx, dU, dS, dVh, dA, dB, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(cersa, CPU, m) {
  m.impl("linear_forward", &linear_forward_cpu);
  m.impl("linear_backward", &linear_backward_cpu);
}

}  // namespace cersa
