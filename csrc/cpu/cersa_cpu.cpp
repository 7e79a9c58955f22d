// CPU kernels of cersa::linear_forward and cersa::linear_backward (docs/design.md "Forward",
// "Backward" and "C++ CPU kernels").  The argument checks, sizes and output allocations are the
// plans of ../cersa_plan.h, shared with the CUDA ops; the CPU schedule over them, described below,
// is forward_blocks / backward_blocks of cersa_cpu_common.h (shared with the quantized-factor
// kernels of cersa_cpu_quant.cpp); this file gives it the GEMMs that read the dense U and Vh.
//
// GEMMs go to BLAS: fp32 / fp64 ones straight to the sgemm_ / dgemm_ that torch's CPU library
// exports (see gemm_into), the rest through ATen's CPU kernels (at::cpu::mm_out / addmm_out /
// addmm_: BLAS or oneDNN, called without a trip through the dispatcher).  They write into strided
// blocks of one preallocated buffer: BLAS takes a leading dimension, so [x Vh^T | s x A^T] is
// produced in one (N, r + k) buffer without concatenating [Vh; A] and without any (m, n) tensor.
// The scalar work (S, the delta scale s, the bias, the dS / dbias reductions) runs in epilogue
// loops parallelised with at::parallel_for.
//
// Blocked schedule.  From N >= kColumnMajorMinRows rows on, forward and backward run over blocks of
// kBlockRows rows: for one block, the GEMMs that share its slice of x or dy run back to back, so
// the second (the delta segment, inner size k) reads it from cache, and the second segment of y
// or dx accumulates into a block that is still in cache.  Measured at N = 4096 (1 thread) this is
// 3-13 % faster than running each GEMM over all N rows.  In fp32 / fp64 the weight gradients
// (dU, dVh, dA, dB) also add up block by block; in 16-bit dtypes they run once over all rows.
//
// Layout of the (rows, r + k) buffers h and dh.  In the blocked schedule they are stored
// column-major, i.e. as a row-major (r + k, rows) block seen through a transposed view: the GEMMs
// that produce them then have the row count, not r, as their output's contiguous dimension.
// MKL runs the GEMMs x Vh^T and dy U at 69-82 % of its dense rate when r is odd (e.g. MiniLM's
// r = 263) with a row-major output, and at 88-95 % with the column-major one; the GEMMs that read
// h / dh run at the same rate either way.  Below kColumnMajorMinRows rows (one block) the
// row-major layout is as fast or faster.
//
// Allocations (reference path in parentheses):
//   forward : h (rows of one block, r+k), y (N, m), h_k (N, k) returned copy, xv (N, r) only
//             when saved (reference: xv, h_r, y, h_k and its scaled copy, all (N, .))
//   backward: dh (rows of one block, r+k; (N, r+k) in 16-bit dtypes when dVh or dA is needed)
//             and the gradients themselves; dS / dbias sums in (r,) / (m,) accumulators plus
//             per-chunk rows of one small (chunks, r + m) buffer
//             (reference: dh_r, dh_k, dh_r*S, xv*S (N, r), xv*dh_r (N, r), and the gradients)
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../cersa_plan.h"
#include "cersa_cpu_common.h"

namespace cersa {
namespace {

using at::Tensor;
using namespace cpu;

// The dense factors' GEMMs of the blocked schedules (cersa_cpu_common.h: forward_blocks).
template <typename T>
struct DenseForward {
  static constexpr const char* kDispatchName = "cersa_fwd";
  const Mat<const T> VhT, UT;
  DenseForward(const ForwardPlan& p, const at::TensorOptions&)
      : VhT(Mat<const T>::of(p.Vh).t()), UT(Mat<const T>::of(p.U).t()) {}
  void x_Vh(const Gemm<T>& gemm, const Mat<T>& h_r, const Mat<const T>& xb) const {
    gemm(h_r, xb, VhT, 1.0, false);
  }
  void h_U(const Gemm<T>& gemm, const Mat<T>& yb, const Mat<const T>& h_r, bool acc) const {
    gemm(yb, h_r, UT, 1.0, acc);
  }
};

// ... and of backward_blocks, with the factor gradients dU += dy^T xv (diag S applied at the
// end) and dVh += (dh_r diag S)^T x.  Inputs are wrapped only where used: x and xv may be passed
// when not needed, in any shape.
template <typename T>
struct DenseBackward {
  static constexpr const char* kDispatchName = "cersa_bwd";
  const BackwardPlan& p;
  const Mat<const T> Um, Vhm, X, XV;
  const Mat<T> DU, DVh;
  const bool reads_dh_r;
  DenseBackward(const BackwardPlan& p_, const at::TensorOptions&)
      : p(p_), Um(Mat<const T>::of(p_.U)), Vhm(Mat<const T>::of(p_.Vh)),
        X(p_.do_dVh ? Mat<const T>::of(*p_.x) : Mat<const T>{}),
        XV(p_.do_dU ? Mat<const T>::of(*p_.xv) : Mat<const T>{}),
        DU(p_.do_dU ? Mat<T>::of(p_.dU) : Mat<T>{}),
        DVh(p_.do_dVh ? Mat<T>::of(p_.dVh) : Mat<T>{}), reads_dh_r(p_.do_dVh) {}
  void dy_U(const Gemm<T>& gemm, const Mat<T>& dh_r, const Mat<const T>& dyb) const {
    gemm(dh_r, dyb, Um, 1.0, false);
  }
  void dh_Vh(const Gemm<T>& gemm, const Mat<T>& dxb, const Mat<const T>& dh_r) const {
    gemm(dxb, dh_r, Vhm, 1.0, false);
  }
  void weight_grads(const Gemm<T>& gemm, int64_t i0, int64_t rows, const Mat<const T>& dyb_t,
                    const Mat<const T>& dh_r, bool acc) const {
    if (p.do_dU) gemm(DU, dyb_t, XV.row_block(i0, rows), 1.0, acc);
    if (p.do_dVh) gemm(DVh, dh_r.t(), X.row_block(i0, rows), 1.0, acc);
  }
  void finish(const T* S) const {
    if (p.do_dU) scale_columns<T>(DU.p, p.m, p.r, S);  // dU = (dy^T xv) diag S
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(cersa, CPU, m) {
  m.impl("linear_forward", &forward_op<forward_kernel<DenseForward, ForwardPlan>>);
  m.impl("linear_backward", &backward_op<backward_kernel<DenseBackward, BackwardPlan>>);
}

}  // namespace cersa
