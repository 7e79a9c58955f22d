// CPU kernels of cersa::linear_forward and cersa::linear_backward (docs/design.md "Forward",
// "Backward" and "C++ CPU kernels").  The argument checks, sizes and output allocations are the
// plans of ../cersa_plan.h, shared with the CUDA ops; this file is the CPU schedule over them.
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

// The forward schedule over a checked plan (cersa_plan.h; y, h_k and xv allocated there).
void forward_cpu(ForwardPlan& p) {
  const int64_t N = p.N, m = p.m, r = p.r, k = p.k;
  const auto& opts = p.opts;
  const bool has_bias = p.has_bias;

  // h: the forward's one intermediate, (rows, r + k) for a block of rows, row- or column-major
  // (header comment), reused by every block.  Columns [0, r): x Vh^T, scaled in place by S in the
  // epilogue; columns [r, r + k): s x A^T (s folded into the GEMM's alpha).
  const bool column_major = N >= kColumnMajorMinRows;
  const int64_t nb = block_rows(N);
  Tensor h = rows_buffer(nb, r + k, column_major, opts);
  Tensor bc = has_bias ? p.bias->contiguous() : Tensor();

  const bool direct = direct_blas(p.x.scalar_type());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "cersa_fwd", [&] {
    using M = Mat<scalar_t>;
    using CM = Mat<const scalar_t>;
    auto gemm = [&](const M& out, const CM& a, const CM& b, double alpha, bool accumulate) {
      gemm_into<scalar_t>(out, a, b, alpha, accumulate, direct, opts);
    };
    const CM X = CM::of(p.x), VhT = CM::of(p.Vh).t(), UT = CM::of(p.U).t();
    const CM AT = k > 0 ? CM::of(*p.A).t() : CM{}, BT = k > 0 ? CM::of(*p.B).t() : CM{};
    const M H = M::of(h), Y = M::of(p.y), HK = M::of(p.h_k);
    const scalar_t* S_p = p.S.const_data_ptr<scalar_t>();
    const scalar_t* bias_p = has_bias ? bc.const_data_ptr<scalar_t>() : nullptr;
    for (int64_t i0 = 0; i0 < N; i0 += nb) {  // one block of rows: its x, h and y stay in cache
      const int64_t rows = std::min(nb, N - i0);
      const CM xb = X.row_block(i0, rows);
      const M hb = H.row_block(0, rows), yb = Y.row_block(i0, rows);
      const M hb_r = hb.col_block(0, r), hb_k = hb.col_block(r, k);
      if (r > 0) gemm(hb_r, xb, VhT, 1.0, false);
      if (k > 0) gemm(hb_k, xb, AT, p.scale, false);
      scalar_t* xv_p = p.save_xv ? p.xv.data_ptr<scalar_t>() + i0 * r : nullptr;
      forward_epilogue<scalar_t>(hb.p, hb.s0, hb.s1, rows, r, S_p, xv_p, yb.p, bias_p, m);
      // y = bias + h_r U^T + h_k B^T: two GEMMs accumulating into the one output block.
      if (r > 0) gemm(yb, hb_r, UT, 1.0, has_bias);
      if (k > 0) gemm(yb, hb_k, BT, 1.0, has_bias || r > 0);
      if (r == 0 && k == 0 && !has_bias) copy_or_zero<scalar_t>(yb, nullptr);
      if (k > 0) {
        const CM src = hb_k;
        copy_or_zero<scalar_t>(HK.row_block(i0, rows), &src);
      }
    }
  });
}

// The backward schedule over a checked plan (cersa_plan.h; the gradients allocated there).
void backward_cpu(BackwardPlan& p) {
  const Tensor& dy = p.dy;
  const int64_t N = p.N, m = p.m, r = p.r, rr = p.rr, kk = p.kk;
  const bool need_x = p.need_x, need_bias = p.need_bias, want_dS = p.want_dS;
  const bool do_dU = p.do_dU, do_dVh = p.do_dVh, do_dA = p.do_dA, do_dB = p.do_dB;
  const auto& opts = p.opts;

  // dh: the backward's one intermediate, (rows, r + k) for a block of rows, row- or column-major
  // (header comment), reused by every block.  Columns [0, r): dy U, then (dy U) diag(S) after
  // the epilogue; columns [r, r + k): s dy B (s folded into the GEMM's alpha).
  const bool column_major = N >= kColumnMajorMinRows;
  const int64_t nb = block_rows(N);
  // The weight gradients sum over all rows.  In fp32 / fp64 each block adds its share into them
  // (the GEMM's beta = 1), while its dy / x / dh are in cache; in 16-bit dtypes that would round
  // the running sum to 16 bits once per block, so their GEMMs run once over all N rows instead,
  // and dh_r / dh_k are kept whole: one (N, r + k) buffer.
  const bool blocked_sums = dy.scalar_type() == at::kFloat || dy.scalar_type() == at::kDouble;
  const bool whole_dh = !blocked_sums && (do_dVh || do_dA) && nb < N;
  Tensor dh = rows_buffer(whole_dh ? N : nb, rr + kk, column_major, opts);
  const int64_t dh_rows = dh.size(0);
  const bool scale_dh = p.scale_dh;

  const bool direct = direct_blas(dy.scalar_type());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "cersa_bwd", [&] {
    using acc_t = acc_of<scalar_t>;
    using M = Mat<scalar_t>;
    using CM = Mat<const scalar_t>;
    auto gemm = [&](const M& out, const CM& a, const CM& b, double alpha, bool accumulate) {
      gemm_into<scalar_t>(out, a, b, alpha, accumulate, direct, opts);
    };
    // Inputs are wrapped only where used: x, h_k and xv may be passed when not needed, in any
    // shape.
    const CM DY = CM::of(dy), Um = CM::of(p.U), Vhm = CM::of(p.Vh);
    const CM Am = p.has_delta ? CM::of(*p.A) : CM{}, Bm = p.has_delta ? CM::of(*p.B) : CM{};
    const CM X = do_dVh || do_dA ? CM::of(*p.x) : CM{}, HK = do_dB ? CM::of(*p.h_k) : CM{};
    const CM XV = do_dU ? CM::of(*p.xv) : CM{};
    const M DH = M::of(dh), DX = need_x ? M::of(p.dx) : M{};
    const M DU = do_dU ? M::of(p.dU) : M{}, DVh = do_dVh ? M::of(p.dVh) : M{};
    const M DA = do_dA ? M::of(p.dA) : M{}, DB = do_dB ? M::of(p.dB) : M{};
    const scalar_t* S_p = p.S.const_data_ptr<scalar_t>();
    // Weight-gradient GEMMs over rows [i0, i0 + rows): dU += dy^T xv (diag S applied at the
    // end), dVh += (dh_r diag S)^T x, dA += (s dh_k)^T x, dB += dy^T h_k.
    auto weight_grads = [&](int64_t i0, int64_t rows, const CM& dhb_r, const CM& dhb_k) {
      const bool acc = i0 > 0;
      const CM dyb_t = DY.row_block(i0, rows).t();
      if (do_dU) gemm(DU, dyb_t, XV.row_block(i0, rows), 1.0, acc);
      if (do_dVh) gemm(DVh, dhb_r.t(), X.row_block(i0, rows), 1.0, acc);
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
      if (rr > 0) gemm(dhb_r, dyb, Um, 1.0, false);
      if (kk > 0) gemm(dhb_k, dyb, Bm, p.scale, false);
      const scalar_t* xvp = want_dS ? p.xv_c.const_data_ptr<scalar_t>() + i0 * r : nullptr;
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
        if (rr > 0) gemm(dxb, dhb_r, Vhm, 1.0, false);
        if (kk > 0) gemm(dxb, dhb_k, Am, 1.0, rr > 0);
        if (rr == 0 && kk == 0) copy_or_zero<scalar_t>(dxb, nullptr);
      }
      if (blocked_sums) weight_grads(i0, rows, dhb_r, dhb_k);
    }
    if (!blocked_sums && N > 0) weight_grads(0, N, DH.col_block(0, rr), DH.col_block(rr, kk));
    for (int64_t j = 0; j < static_cast<int64_t>(dS_acc.size()); ++j)
      p.dS.data_ptr<scalar_t>()[j] = static_cast<scalar_t>(dS_acc[j]);
    for (int64_t j = 0; j < static_cast<int64_t>(db_acc.size()); ++j)
      p.dbias.data_ptr<scalar_t>()[j] = static_cast<scalar_t>(db_acc[j]);
    if (do_dU)  // dU = (dy^T xv) diag S
      scale_columns<scalar_t>(DU.p, m, r, S_p);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(cersa, CPU, m) {
  m.impl("linear_forward", &forward_op<forward_cpu>);
  m.impl("linear_backward", &backward_op<backward_cpu>);
}

}  // namespace cersa
