// Per-call plans of the cersa:: ops, shared by the CPU kernels (cpu/cersa_cpu.cpp) and the CUDA
// ops (cuda/cersa_cuda_ops.cpp), which differ only in the schedule they run over a plan.
//
// A plan is made once at the top of an op (forward_op / backward_op below): it checks the
// arguments (errors name the argument, the expected and the received value), works out the sizes
// and which pieces are computed, and allocates the outputs.  A device's schedule then fills the
// outputs from the plan alone.  Math and shapes: docs/design.md "Notation", "Forward" and
// "Backward";  x (N, n), U (m, r), S (r,), Vh (r, n), A (k, n), B (m, k), bias (m,), dy (N, m).
// A plan holds references to the op's arguments and makes no Tensor view beyond the BLAS-ready
// copies of x and dy (and those only where BLAS cannot read them in place), so at N = 1 the CPU
// path's per-call cost stays that of its GEMMs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "cersa_common.h"
#include "cersa_quant_format.h"

namespace cersa {

using OptTensor = std::optional<at::Tensor>;

// linear_forward: y (N, m) = x Vh^T diag(S) U^T + s (x A^T) B^T + bias, h_k (N, k) = s x A^T,
// xv (N, r) = x Vh^T when save_xv (else (N, 0)); h_k is (N, 0) when A is None.
struct ForwardPlan {
  // The arguments, as given (U, Vh, A, B and bias are read in place, with their strides).
  const at::Tensor& U;
  const at::Tensor& Vh;
  const OptTensor& A;
  const OptTensor& B;
  const OptTensor& bias;
  const double scale;
  const bool save_xv;
  at::Tensor x;  // the input, BLAS-ready (blas_ready)
  at::Tensor S;  // S, contiguous (the epilogues read it through a pointer)
  int64_t N = 0, n = 0, m = 0, r = 0, k = 0;
  bool has_bias = false;
  at::TensorOptions opts;
  // The outputs, allocated uninitialised: the schedule writes every element.
  at::Tensor y, h_k, xv;

  ForwardPlan(const at::Tensor& x_in, const at::Tensor& U_, const at::Tensor& S_in,
              const at::Tensor& Vh_, const OptTensor& A_, const OptTensor& B_,
              const OptTensor& bias_, double scale_, bool save_xv_)
      : U(U_), Vh(Vh_), A(A_), B(B_), bias(bias_), scale(scale_), save_xv(save_xv_),
        x((x_in.defined() && x_in.dim() == 2) ? blas_ready(x_in) : x_in) {
    TORCH_CHECK(x.defined() && x.dim() == 2, "cersa: x: expected a 2-D tensor (N, in_features)",
                x.defined() ? ", got shape " + shape_str(x) : ", got None");
    check_factors(x, U, S_in, Vh, A, B, m, r, n, k);
    check_size("x", x, 1, n, "in_features = Vh.size(1)");
    has_bias = present(bias);
    if (has_bias) {
      check_tensor("bias", *bias, 1, x);
      check_size("bias", *bias, 0, m, "out_features = U.size(0)");
    }
    N = x.size(0);
    opts = x.options();
    S = S_in.contiguous();
    y = at::empty({N, m}, opts);
    xv = at::empty({N, save_xv ? r : 0}, opts);  // x Vh^T, saved for dS / dU
    // h_k is its own (N, k) tensor, so that saving it for the backward keeps no (N, r + k)
    // intermediate alive (docs/design.md "Forward", and "Saved for backward": nothing of size
    // (N, r) unless S or U trains).
    h_k = at::empty({N, k}, opts);
  }
};

// linear_backward: the seven gradients (dx, dU, dS, dVh, dA, dB, dbias) that `needs` asks for:
//   dh = [dy U | s dy B] (N, r + k),  dh_r diag S = (dy U) diag S,
//   dx = (dh_r diag S) Vh + s dh_k A,   dU = (dy^T xv) diag S,   dS = sum_i xv * dh_r,
//   dVh = (dh_r diag S)^T x,   dA = (s dh_k)^T x,   dB = dy^T h_k,   dbias = sum_i dy.
// A gradient that is not needed comes back as its own (0,) tensor (outputs never alias); with
// A None (no delta) there is no dA or dB.  A saved input that is not needed may be None or of
// any shape: x is read only for dVh or dA, h_k only for dB, xv only for dU or dS.
struct BackwardPlan {
  // The arguments, as given (read in place, with their strides).
  const OptTensor& h_k;
  const OptTensor& xv;
  const at::Tensor& U;
  const at::Tensor& Vh;
  const OptTensor& A;
  const OptTensor& B;
  const double scale;
  at::Tensor dy;  // BLAS-ready
  OptTensor x;    // BLAS-ready when it is a 2-D tensor
  at::Tensor S;   // contiguous
  at::Tensor xv_c;  // xv contiguous, when dS is a sum over rows (want_dS); else undefined
  int64_t N = 0, n = 0, m = 0, r = 0, k = 0;
  bool has_delta = false;
  // What is needed: needs[0..6], with dA / dB only when there is a delta.
  bool need_x = false, need_U = false, need_S = false, need_Vh = false;
  bool need_A = false, need_B = false, need_bias = false;
  // Columns of dh that are computed: rr = r when dh_r is needed (dx, dS or dVh), kk = k when
  // dh_k is (dx or dA); dh_r is scaled by S when dx or dVh reads it (scale_dh).
  int64_t rr = 0, kk = 0;
  bool scale_dh = false;
  bool want_dS = false;  // dS is a sum over rows (needed and r > 0)
  // A weight gradient is a GEMM only with rows and an inner size; else it is allocated as zeros.
  bool do_dU = false, do_dVh = false, do_dA = false, do_dB = false;
  at::TensorOptions opts;
  // The gradients: dx, dS, dbias and the do_* ones allocated uninitialised, for the schedule to
  // write; the others zeros or (0,).
  at::Tensor dx, dU, dS, dVh, dA, dB, dbias;

  BackwardPlan(const at::Tensor& dy_in, const OptTensor& x_in, const OptTensor& h_k_,
               const OptTensor& xv_, const at::Tensor& U_, const at::Tensor& S_in,
               const at::Tensor& Vh_, const OptTensor& A_, const OptTensor& B_, double scale_,
               const std::array<bool, 7>& needs)
      : h_k(h_k_), xv(xv_), U(U_), Vh(Vh_), A(A_), B(B_), scale(scale_),
        dy((dy_in.defined() && dy_in.dim() == 2) ? blas_ready(dy_in) : dy_in), x(x_in) {
    if (present(x) && x->dim() == 2) x = blas_ready(*x);
    TORCH_CHECK(dy.defined() && dy.dim() == 2, "cersa: dy: expected a 2-D tensor (N, out_features)",
                dy.defined() ? ", got shape " + shape_str(dy) : ", got None");
    check_factors(dy, U, S_in, Vh, A, B, m, r, n, k);
    check_size("dy", dy, 1, m, "out_features = U.size(0)");
    N = dy.size(0);
    has_delta = present(A);
    need_x = needs[0], need_U = needs[1], need_S = needs[2], need_Vh = needs[3];
    need_A = needs[4] && has_delta, need_B = needs[5] && has_delta, need_bias = needs[6];
    check_saved();

    rr = r > 0 && (need_x || need_S || need_Vh) ? r : 0;
    kk = has_delta && k > 0 && (need_x || need_A) ? k : 0;
    scale_dh = rr > 0 && (need_x || need_Vh);
    want_dS = need_S && r > 0;
    do_dU = need_U && r > 0 && N > 0, do_dVh = need_Vh && r > 0 && N > 0;
    do_dA = need_A && k > 0 && N > 0, do_dB = need_B && k > 0 && N > 0;
    opts = dy.options();
    S = S_in.contiguous();
    if (want_dS) xv_c = xv->contiguous();

    dx = need_x ? at::empty({N, n}, opts) : none();
    dU = weight_grad(need_U, do_dU, {m, r});
    dS = need_S ? at::empty({r}, opts) : none();
    dVh = weight_grad(need_Vh, do_dVh, {r, n});
    dA = weight_grad(need_A, do_dA, {k, n});
    dB = weight_grad(need_B, do_dB, {m, k});
    dbias = need_bias ? at::empty({m}, opts) : none();
  }

 private:
  at::Tensor none() const { return at::empty({0}, opts); }

  at::Tensor weight_grad(bool need, bool gemm, at::IntArrayRef sizes) const {
    return !need ? none() : (gemm ? at::empty(sizes, opts) : at::zeros(sizes, opts));
  }

  // The saved inputs that the needed gradients read, checked against dy and the factors.
  void check_saved() const {
    if (need_Vh || need_A) {
      TORCH_CHECK(present(x),
                  "cersa: x: expected the saved input (needed for dVh or dA), got None");
      check_tensor("x", *x, 2, dy);
      check_size("x", *x, 0, N, "N = dy.size(0)");
      check_size("x", *x, 1, n, "in_features = Vh.size(1)");
    }
    if ((need_U || need_S) && r > 0) {
      TORCH_CHECK(present(xv),
                  "cersa: xv: expected the saved x Vh^T (needed for dU or dS), got None");
      check_tensor("xv", *xv, 2, dy);
      check_size("xv", *xv, 0, N, "N = dy.size(0)");
      check_size("xv", *xv, 1, r, "rank = U.size(1)");
    }
    if (need_B) {
      TORCH_CHECK(present(h_k), "cersa: h_k: expected the saved s x A^T (needed for dB), got None");
      check_tensor("h_k", *h_k, 2, dy);
      check_size("h_k", *h_k, 0, N, "N = dy.size(0)");
      check_size("h_k", *h_k, 1, k, "delta_rank = A.size(0)");
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Quantized frozen factors (docs/design.md "Quantized factors"): linear_forward_q and
// linear_backward_q take U (m, r) and Vh (r, n) as codes + float32 block scales
// (cersa_quant_format.h) instead of dense tensors.  The factors are frozen: no dU, no dVh.
// ---------------------------------------------------------------------------------------------

inline quant::QuantType parse_quant_type(c10::string_view s) {
  if (s == "int8") return quant::QuantType::Int8;
  if (s == "nf4") return quant::QuantType::NF4;
  TORCH_CHECK(false, "cersa: quant_type: expected 'int8' or 'nf4', got '", std::string(s), "'");
}

// One quantized factor of the call: its codes and scales (contiguous), its dense shape and format.
struct QuantFactor {
  at::Tensor codes;   // int8 (rows * cols,) or, for nf4, uint8 (ceil(rows * cols / 2),)
  at::Tensor scales;  // float32 (ceil(rows * cols / block),)
  int64_t rows = 0, cols = 0;
  quant::QuantType type = quant::QuantType::Int8;
  int64_t block = 0;
  int block_shift = 0;  // log2(block)

  // Checks (errors name `<name>_codes` / `<name>_scales`, the expected and the received value).
  QuantFactor(const char* name, const at::Tensor& codes_in, const at::Tensor& scales_in,
              int64_t rows_, int64_t cols_, quant::QuantType type_, int64_t block_,
              const at::Tensor& like)
      : rows(rows_), cols(cols_), type(type_), block(block_) {
    const std::string cn = std::string(name) + "_codes", sn = std::string(name) + "_scales";
    const int64_t numel = rows * cols;
    const bool int8 = type == quant::QuantType::Int8;
    const at::ScalarType code_dtype = int8 ? at::kChar : at::kByte;
    TORCH_CHECK(codes_in.defined() && codes_in.dim() == 1, "cersa: ", cn,
                ": expected a 1-D tensor of codes, got ",
                codes_in.defined() ? "shape " + shape_str(codes_in) : std::string("None"));
    TORCH_CHECK(codes_in.scalar_type() == code_dtype, "cersa: ", cn, ": expected dtype ",
                int8 ? "torch.int8 (quant_type 'int8')" : "torch.uint8 (quant_type 'nf4')",
                ", got ", dtype_name(codes_in.scalar_type()));
    TORCH_CHECK(codes_in.device() == like.device(), "cersa: ", cn, ": expected device ",
                like.device(), " (x's device), got ", codes_in.device());
    TORCH_CHECK(codes_in.size(0) == quant::code_count(type, numel), "cersa: ", cn, ": expected ",
                quant::code_count(type, numel), " codes for a (", rows, ", ", cols, ") ",
                int8 ? "int8" : "nf4", " factor, got shape ", shape_str(codes_in));
    TORCH_CHECK(scales_in.defined() && scales_in.dim() == 1, "cersa: ", sn,
                ": expected a 1-D tensor of block scales, got ",
                scales_in.defined() ? "shape " + shape_str(scales_in) : std::string("None"));
    TORCH_CHECK(scales_in.scalar_type() == at::kFloat, "cersa: ", sn,
                ": expected dtype torch.float32, got ", dtype_name(scales_in.scalar_type()));
    TORCH_CHECK(scales_in.device() == like.device(), "cersa: ", sn, ": expected device ",
                like.device(), " (x's device), got ", scales_in.device());
    TORCH_CHECK(scales_in.size(0) == quant::block_count(numel, block), "cersa: ", sn,
                ": expected ", quant::block_count(numel, block), " scales (blocks of ", block,
                " of a (", rows, ", ", cols, ") factor), got shape ", shape_str(scales_in));
    codes = codes_in.contiguous();
    scales = scales_in.contiguous();
    while ((int64_t{1} << block_shift) < block) ++block_shift;
  }
};

// The static format arguments shared by both ops: quant_type and block_size.
inline quant::QuantType check_format(c10::string_view quant_type, int64_t block_size) {
  const quant::QuantType t = parse_quant_type(quant_type);
  TORCH_CHECK(block_size >= 2 && block_size <= (int64_t{1} << 30) &&
                  (block_size & (block_size - 1)) == 0,
              "cersa: block_size: expected a power of two >= 2, got ", block_size);
  return t;
}

// The layer sizes out_features (m) and in_features (n) and S (r,): checked and returned.
inline void check_quant_sizes(const at::Tensor& like, const at::Tensor& S, int64_t out_features,
                              int64_t in_features, int64_t& m, int64_t& r, int64_t& n) {
  check_compute_dtype(like);
  TORCH_CHECK(out_features >= 0, "cersa: out_features: expected >= 0, got ", out_features);
  TORCH_CHECK(in_features >= 0, "cersa: in_features: expected >= 0, got ", in_features);
  check_tensor("S", S, 1, like);
  m = out_features;
  n = in_features;
  r = S.size(0);
}

// linear_forward_q: linear_forward with U and Vh quantized (same outputs; see ForwardPlan).
struct QuantForwardPlan {
  const OptTensor& A;
  const OptTensor& B;
  const OptTensor& bias;
  const double scale;
  const bool save_xv;
  at::Tensor x;  // BLAS-ready
  at::Tensor S;  // contiguous
  int64_t N = 0, n = 0, m = 0, r = 0, k = 0;
  std::optional<QuantFactor> U, Vh;
  bool has_bias = false;
  at::TensorOptions opts;
  at::Tensor y, h_k, xv;

  QuantForwardPlan(const at::Tensor& x_in, const at::Tensor& U_codes, const at::Tensor& U_scales,
                   const at::Tensor& S_in, const at::Tensor& Vh_codes, const at::Tensor& Vh_scales,
                   const OptTensor& A_, const OptTensor& B_, const OptTensor& bias_,
                   int64_t out_features, int64_t in_features, c10::string_view quant_type,
                   int64_t block_size, double scale_, bool save_xv_)
      : A(A_), B(B_), bias(bias_), scale(scale_), save_xv(save_xv_),
        x((x_in.defined() && x_in.dim() == 2) ? blas_ready(x_in) : x_in) {
    TORCH_CHECK(x.defined() && x.dim() == 2, "cersa: x: expected a 2-D tensor (N, in_features)",
                x.defined() ? ", got shape " + shape_str(x) : ", got None");
    const quant::QuantType t = check_format(quant_type, block_size);
    check_quant_sizes(x, S_in, out_features, in_features, m, r, n);
    check_size("x", x, 1, n, "in_features");
    U.emplace("U", U_codes, U_scales, m, r, t, block_size, x);
    Vh.emplace("Vh", Vh_codes, Vh_scales, r, n, t, block_size, x);
    check_delta(x, A, B, m, n, k);
    has_bias = present(bias);
    if (has_bias) {
      check_tensor("bias", *bias, 1, x);
      check_size("bias", *bias, 0, m, "out_features");
    }
    N = x.size(0);
    opts = x.options();
    S = S_in.contiguous();
    y = at::empty({N, m}, opts);
    xv = at::empty({N, save_xv ? r : 0}, opts);
    h_k = at::empty({N, k}, opts);  // its own tensor (see ForwardPlan)
  }
};

// linear_backward_q: the gradients (dx, dS, dA, dB, dbias) that needs = (x, S, A, B, bias) asks
// for, with U and Vh quantized and frozen (the formulas of BackwardPlan without dU and dVh).
// A gradient that is not needed is its own (0,) tensor; with A None there is no dA or dB.
// x is read only for dA, h_k only for dB, xv only for dS.
struct QuantBackwardPlan {
  const OptTensor& h_k;
  const OptTensor& xv;
  const OptTensor& A;
  const OptTensor& B;
  const double scale;
  at::Tensor dy;  // BLAS-ready
  OptTensor x;    // BLAS-ready when it is a 2-D tensor
  at::Tensor S;   // contiguous
  at::Tensor xv_c;  // xv contiguous when want_dS
  int64_t N = 0, n = 0, m = 0, r = 0, k = 0;
  std::optional<QuantFactor> U, Vh;
  bool has_delta = false;
  bool need_x = false, need_S = false, need_A = false, need_B = false, need_bias = false;
  // As in BackwardPlan: rr = r when dh_r is needed (dx or dS), kk = k when dh_k is (dx or dA);
  // dh_r is scaled by S when dx reads it.
  int64_t rr = 0, kk = 0;
  bool scale_dh = false;
  bool want_dS = false;
  bool do_dA = false, do_dB = false;
  at::TensorOptions opts;
  at::Tensor dx, dS, dA, dB, dbias;

  QuantBackwardPlan(const at::Tensor& dy_in, const OptTensor& x_in, const OptTensor& h_k_,
                    const OptTensor& xv_, const at::Tensor& U_codes, const at::Tensor& U_scales,
                    const at::Tensor& S_in, const at::Tensor& Vh_codes,
                    const at::Tensor& Vh_scales, const OptTensor& A_, const OptTensor& B_,
                    int64_t out_features, int64_t in_features, c10::string_view quant_type,
                    int64_t block_size, double scale_, const std::array<bool, 5>& needs)
      : h_k(h_k_), xv(xv_), A(A_), B(B_), scale(scale_),
        dy((dy_in.defined() && dy_in.dim() == 2) ? blas_ready(dy_in) : dy_in), x(x_in) {
    if (present(x) && x->dim() == 2) x = blas_ready(*x);
    TORCH_CHECK(dy.defined() && dy.dim() == 2, "cersa: dy: expected a 2-D tensor (N, out_features)",
                dy.defined() ? ", got shape " + shape_str(dy) : ", got None");
    const quant::QuantType t = check_format(quant_type, block_size);
    check_quant_sizes(dy, S_in, out_features, in_features, m, r, n);
    check_size("dy", dy, 1, m, "out_features");
    U.emplace("U", U_codes, U_scales, m, r, t, block_size, dy);
    Vh.emplace("Vh", Vh_codes, Vh_scales, r, n, t, block_size, dy);
    check_delta(dy, A, B, m, n, k);
    N = dy.size(0);
    has_delta = present(A);
    need_x = needs[0], need_S = needs[1], need_A = needs[2] && has_delta;
    need_B = needs[3] && has_delta, need_bias = needs[4];
    check_saved();

    rr = r > 0 && (need_x || need_S) ? r : 0;
    kk = has_delta && k > 0 && (need_x || need_A) ? k : 0;
    scale_dh = rr > 0 && need_x;
    want_dS = need_S && r > 0;
    do_dA = need_A && k > 0 && N > 0, do_dB = need_B && k > 0 && N > 0;
    opts = dy.options();
    S = S_in.contiguous();
    if (want_dS) xv_c = xv->contiguous();

    dx = need_x ? at::empty({N, n}, opts) : none();
    dS = need_S ? at::empty({r}, opts) : none();
    dA = !need_A ? none() : (do_dA ? at::empty({k, n}, opts) : at::zeros({k, n}, opts));
    dB = !need_B ? none() : (do_dB ? at::empty({m, k}, opts) : at::zeros({m, k}, opts));
    dbias = need_bias ? at::empty({m}, opts) : none();
  }

 private:
  at::Tensor none() const { return at::empty({0}, opts); }

  void check_saved() const {
    if (need_A) {
      TORCH_CHECK(present(x), "cersa: x: expected the saved input (needed for dA), got None");
      check_tensor("x", *x, 2, dy);
      check_size("x", *x, 0, N, "N = dy.size(0)");
      check_size("x", *x, 1, n, "in_features");
    }
    if (need_S && r > 0) {
      TORCH_CHECK(present(xv), "cersa: xv: expected the saved x Vh^T (needed for dS), got None");
      check_tensor("xv", *xv, 2, dy);
      check_size("xv", *xv, 0, N, "N = dy.size(0)");
      check_size("xv", *xv, 1, r, "rank = S.size(0)");
    }
    if (need_B) {
      TORCH_CHECK(present(h_k), "cersa: h_k: expected the saved s x A^T (needed for dB), got None");
      check_tensor("h_k", *h_k, 2, dy);
      check_size("h_k", *h_k, 0, N, "N = dy.size(0)");
      check_size("h_k", *h_k, 1, k, "delta_rank = A.size(0)");
    }
  }
};

// The kernels of the two ops, as registered for a device (TORCH_LIBRARY_IMPL): make the plan, run
// the device's schedule over it, return the plan's outputs.  Schedule(plan) writes them all.
template <void (*Schedule)(ForwardPlan&)>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(
    const at::Tensor& x, const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh,
    const OptTensor& A, const OptTensor& B, const OptTensor& bias, double scale, bool save_xv) {
  ForwardPlan p(x, U, S, Vh, A, B, bias, scale, save_xv);
  Schedule(p);
  return {std::move(p.y), std::move(p.h_k), std::move(p.xv)};
}

template <void (*Schedule)(BackwardPlan&)>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_op(const at::Tensor& dy, const OptTensor& x, const OptTensor& h_k, const OptTensor& xv,
            const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh, const OptTensor& A,
            const OptTensor& B, double scale, std::array<bool, 7> needs) {
  BackwardPlan p(dy, x, h_k, xv, U, S, Vh, A, B, scale, needs);
  Schedule(p);
  return {std::move(p.dx), std::move(p.dU), std::move(p.dS), std::move(p.dVh),
          std::move(p.dA), std::move(p.dB), std::move(p.dbias)};
}

template <void (*Schedule)(QuantForwardPlan&)>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_q_op(
    const at::Tensor& x, const at::Tensor& U_codes, const at::Tensor& U_scales,
    const at::Tensor& S, const at::Tensor& Vh_codes, const at::Tensor& Vh_scales,
    const OptTensor& A, const OptTensor& B, const OptTensor& bias, int64_t out_features,
    int64_t in_features, c10::string_view quant_type, int64_t block_size, double scale,
    bool save_xv) {
  QuantForwardPlan p(x, U_codes, U_scales, S, Vh_codes, Vh_scales, A, B, bias, out_features,
                     in_features, quant_type, block_size, scale, save_xv);
  Schedule(p);
  return {std::move(p.y), std::move(p.h_k), std::move(p.xv)};
}

template <void (*Schedule)(QuantBackwardPlan&)>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_q_op(
    const at::Tensor& dy, const OptTensor& x, const OptTensor& h_k, const OptTensor& xv,
    const at::Tensor& U_codes, const at::Tensor& U_scales, const at::Tensor& S,
    const at::Tensor& Vh_codes, const at::Tensor& Vh_scales, const OptTensor& A,
    const OptTensor& B, int64_t out_features, int64_t in_features, c10::string_view quant_type,
    int64_t block_size, double scale, std::array<bool, 5> needs) {
  QuantBackwardPlan p(dy, x, h_k, xv, U_codes, U_scales, S, Vh_codes, Vh_scales, A, B,
                      out_features, in_features, quant_type, block_size, scale, needs);
  Schedule(p);
  return {std::move(p.dx), std::move(p.dS), std::move(p.dA), std::move(p.dB), std::move(p.dbias)};
}

}  // namespace cersa
