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

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "cersa_common.h"
#include "cersa_quant_format.h"

namespace cersa {

using OptTensor = std::optional<at::Tensor>;

// x or dy as the plans hold it: BLAS-ready when it is a 2-D tensor, else as given (for the check).
inline at::Tensor blas_ready_2d(const at::Tensor& t) {
  return (t.defined() && t.dim() == 2) ? blas_ready(t) : t;
}

// The input `name` (x or dy): a 2-D tensor of dimensions `dims`.
inline void check_2d_input(const char* name, const at::Tensor& t, const char* dims) {
  TORCH_CHECK(t.defined() && t.dim() == 2, "cersa: ", name, ": expected a 2-D tensor (", dims, ")",
              t.defined() ? ", got shape " + shape_str(t) : ", got None");
}

// The optional bias (m,), checked against x; whether it is given.  `m_what` names m.
inline bool check_bias(const OptTensor& bias, const at::Tensor& x, int64_t m, const char* m_what) {
  if (!present(bias)) return false;
  check_tensor("bias", *bias, 1, x);
  check_size("bias", *bias, 0, m, m_what);
  return true;
}

// A saved input of the backward (x, xv or h_k) that a needed gradient reads: given (else the
// error says what it is), 2-D, like dy, with N rows and `cols` columns (`cols_what` names them).
inline void check_saved_input(const char* name, const OptTensor& t, const char* what,
                              const at::Tensor& dy, int64_t N, int64_t cols,
                              const char* cols_what) {
  TORCH_CHECK(present(t), "cersa: ", name, ": expected ", what, ", got None");
  check_tensor(name, *t, 2, dy);
  check_size(name, *t, 0, N, "N = dy.size(0)");
  check_size(name, *t, 1, cols, cols_what);
}

// A gradient that is not needed: its own (0,) tensor.
inline at::Tensor no_grad_tensor(const at::TensorOptions& opts) { return at::empty({0}, opts); }

// A weight gradient: (0,) when not needed, else uninitialised when a GEMM writes it, else zeros.
inline at::Tensor weight_grad(bool need, bool gemm, at::IntArrayRef sizes,
                              const at::TensorOptions& opts) {
  return !need ? no_grad_tensor(opts) : (gemm ? at::empty(sizes, opts) : at::zeros(sizes, opts));
}

// The outputs of both forward plans and the sizes they are made from: y (N, m), h_k (N, k) and
// xv (N, r) (or (N, 0) unless save_xv), allocated uninitialised (the schedule writes every
// element), and S contiguous (the epilogues read it through a pointer).
struct ForwardOutputs {
  at::Tensor S;
  int64_t N = 0;
  at::TensorOptions opts;
  at::Tensor y, h_k, xv;

  void allocate(const at::Tensor& x, const at::Tensor& S_in, int64_t m, int64_t r, int64_t k,
                bool save_xv) {
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

// linear_forward: y (N, m) = x Vh^T diag(S) U^T + s (x A^T) B^T + bias, h_k (N, k) = s x A^T,
// xv (N, r) = x Vh^T when save_xv (else (N, 0)); h_k is (N, 0) when A is None.
struct ForwardPlan : ForwardOutputs {
  // The arguments, as given (U, Vh, A, B and bias are read in place, with their strides).
  const at::Tensor& U;
  const at::Tensor& Vh;
  const OptTensor& A;
  const OptTensor& B;
  const OptTensor& bias;
  const double scale;
  const bool save_xv;
  at::Tensor x;  // the input, BLAS-ready (blas_ready)
  int64_t n = 0, m = 0, r = 0, k = 0;
  bool has_bias = false;

  ForwardPlan(const at::Tensor& x_in, const at::Tensor& U_, const at::Tensor& S_in,
              const at::Tensor& Vh_, const OptTensor& A_, const OptTensor& B_,
              const OptTensor& bias_, double scale_, bool save_xv_)
      : U(U_), Vh(Vh_), A(A_), B(B_), bias(bias_), scale(scale_), save_xv(save_xv_),
        x(blas_ready_2d(x_in)) {
    check_2d_input("x", x, "N, in_features");
    check_factors(x, U, S_in, Vh, A, B, m, r, n, k);
    check_size("x", x, 1, n, "in_features = Vh.size(1)");
    has_bias = check_bias(bias, x, m, "out_features = U.size(0)");
    allocate(x, S_in, m, r, k, save_xv);
  }
};

// The arguments and prepared inputs of both backward plans (BackwardPlan, QuantBackwardPlan),
// read in place with their strides; dy (checked here) and x BLAS-ready.
struct BackwardInputs {
  const OptTensor& h_k;
  const OptTensor& xv;
  const OptTensor& A;
  const OptTensor& B;
  const double scale;
  at::Tensor dy;    // BLAS-ready
  OptTensor x;      // BLAS-ready when it is a 2-D tensor
  at::Tensor S;     // contiguous (set by the plan)
  at::Tensor xv_c;  // xv contiguous, when dS is a sum over rows (want_dS); else undefined

  BackwardInputs(const at::Tensor& dy_in, const OptTensor& x_in, const OptTensor& h_k_,
                 const OptTensor& xv_, const OptTensor& A_, const OptTensor& B_, double scale_)
      : h_k(h_k_), xv(xv_), A(A_), B(B_), scale(scale_), dy(blas_ready_2d(dy_in)), x(x_in) {
    if (present(x) && x->dim() == 2) x = blas_ready(*x);
    check_2d_input("dy", dy, "N, out_features");
  }
};

// linear_backward: the seven gradients (dx, dU, dS, dVh, dA, dB, dbias) that `needs` asks for:
//   dh = [dy U | s dy B] (N, r + k),  dh_r diag S = (dy U) diag S,
//   dx = (dh_r diag S) Vh + s dh_k A,   dU = (dy^T xv) diag S,   dS = sum_i xv * dh_r,
//   dVh = (dh_r diag S)^T x,   dA = (s dh_k)^T x,   dB = dy^T h_k,   dbias = sum_i dy.
// A gradient that is not needed comes back as its own (0,) tensor (outputs never alias); with
// A None (no delta) there is no dA or dB.  A saved input that is not needed may be None or of
// any shape: x is read only for dVh or dA, h_k only for dB, xv only for dU or dS.
struct BackwardPlan : BackwardInputs {
  // The factors, as given (read in place, with their strides).
  const at::Tensor& U;
  const at::Tensor& Vh;
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
      : BackwardInputs(dy_in, x_in, h_k_, xv_, A_, B_, scale_), U(U_), Vh(Vh_) {
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

    dx = need_x ? at::empty({N, n}, opts) : no_grad_tensor(opts);
    dU = weight_grad(need_U, do_dU, {m, r}, opts);
    dS = need_S ? at::empty({r}, opts) : no_grad_tensor(opts);
    dVh = weight_grad(need_Vh, do_dVh, {r, n}, opts);
    dA = weight_grad(need_A, do_dA, {k, n}, opts);
    dB = weight_grad(need_B, do_dB, {m, k}, opts);
    dbias = need_bias ? at::empty({m}, opts) : no_grad_tensor(opts);
  }

 private:
  // The saved inputs that the needed gradients read, checked against dy and the factors.
  void check_saved() const {
    if (need_Vh || need_A)
      check_saved_input("x", x, "the saved input (needed for dVh or dA)", dy, N, n,
                        "in_features = Vh.size(1)");
    if ((need_U || need_S) && r > 0)
      check_saved_input("xv", xv, "the saved x Vh^T (needed for dU or dS)", dy, N, r,
                        "rank = U.size(1)");
    if (need_B)
      check_saved_input("h_k", h_k, "the saved s x A^T (needed for dB)", dy, N, k,
                        "delta_rank = A.size(0)");
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

// How the CPU and CUDA schedules split a quantized factor F (rows, cols) into panels, decoded one at
// a time: along its rows (panel i = rows [start(i), start(i) + size(i)), a row-major (size, cols)
// operand) or along its columns (columns [start(i), ...), a row-major (rows, size) operand).  A
// panel holds at most about max_elems numbers; its width is rounded up to a multiple of `align`
// (at most the extent), and a factor of at most max_elems numbers is one panel.
struct PanelGrid {
  const QuantFactor& F;
  const bool by_rows;
  int64_t extent = 0, other = 0, width = 1, count_ = 0;

  PanelGrid(const QuantFactor& F_, bool by_rows_, int64_t max_elems, int64_t align)
      : F(F_), by_rows(by_rows_) {
    extent = by_rows ? F.rows : F.cols;
    other = by_rows ? F.cols : F.rows;
    const int64_t panels = std::max<int64_t>(1, (extent * other + max_elems - 1) / max_elems);
    width = panels == 1 ? extent : ((extent + panels - 1) / panels + align - 1) / align * align;
    width = std::max<int64_t>(1, std::min(width, extent));
    count_ = extent == 0 ? 0 : (extent + width - 1) / width;
  }

  int64_t count() const { return count_; }
  int64_t start(int64_t i) const { return i * width; }
  int64_t size(int64_t i) const { return std::min(width, extent - i * width); }
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

// The arguments that both quantized plans share, checked against `like` (x or dy, named
// like_name): quant_type and block_size, out_features (m), in_features (n), S (r,), like's columns
// (n for x, m for dy), the codes and scales of U (m, r) and Vh (r, n), and the delta A, B (k).
struct QuantArgs {
  int64_t n = 0, m = 0, r = 0, k = 0;
  std::optional<QuantFactor> U, Vh;

  void check_args(const char* like_name, const at::Tensor& like, const at::Tensor& U_codes,
                  const at::Tensor& U_scales, const at::Tensor& S, const at::Tensor& Vh_codes,
                  const at::Tensor& Vh_scales, const OptTensor& A, const OptTensor& B,
                  int64_t out_features, int64_t in_features, c10::string_view quant_type,
                  int64_t block_size) {
    const bool like_is_x = like_name[0] == 'x';  // "x" or "dy"
    const quant::QuantType t = check_format(quant_type, block_size);
    check_quant_sizes(like, S, out_features, in_features, m, r, n);
    check_size(like_name, like, 1, like_is_x ? n : m, like_is_x ? "in_features" : "out_features");
    U.emplace("U", U_codes, U_scales, m, r, t, block_size, like);
    Vh.emplace("Vh", Vh_codes, Vh_scales, r, n, t, block_size, like);
    check_delta(like, A, B, m, n, k);
  }
};

// linear_forward_q: linear_forward with U and Vh quantized (same outputs; see ForwardPlan).
struct QuantForwardPlan : ForwardOutputs, QuantArgs {
  const OptTensor& A;
  const OptTensor& B;
  const OptTensor& bias;
  const double scale;
  const bool save_xv;
  at::Tensor x;  // BLAS-ready
  bool has_bias = false;

  QuantForwardPlan(const at::Tensor& x_in, const at::Tensor& U_codes, const at::Tensor& U_scales,
                   const at::Tensor& S_in, const at::Tensor& Vh_codes, const at::Tensor& Vh_scales,
                   const OptTensor& A_, const OptTensor& B_, const OptTensor& bias_,
                   int64_t out_features, int64_t in_features, c10::string_view quant_type,
                   int64_t block_size, double scale_, bool save_xv_)
      : A(A_), B(B_), bias(bias_), scale(scale_), save_xv(save_xv_),
        x(blas_ready_2d(x_in)) {
    check_2d_input("x", x, "N, in_features");
    check_args("x", x, U_codes, U_scales, S_in, Vh_codes, Vh_scales, A, B, out_features,
               in_features, quant_type, block_size);
    has_bias = check_bias(bias, x, m, "out_features");
    allocate(x, S_in, m, r, k, save_xv);
  }
};

// linear_backward_q: the gradients (dx, dS, dA, dB, dbias) that needs = (x, S, A, B, bias) asks
// for, with U and Vh quantized and frozen (the formulas of BackwardPlan without dU and dVh).
// A gradient that is not needed is its own (0,) tensor; with A None there is no dA or dB.
// x is read only for dA, h_k only for dB, xv only for dS.
struct QuantBackwardPlan : QuantArgs, BackwardInputs {
  int64_t N = 0;
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
      : BackwardInputs(dy_in, x_in, h_k_, xv_, A_, B_, scale_) {
    check_args("dy", dy, U_codes, U_scales, S_in, Vh_codes, Vh_scales, A, B, out_features,
               in_features, quant_type, block_size);
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

    dx = need_x ? at::empty({N, n}, opts) : no_grad_tensor(opts);
    dS = need_S ? at::empty({r}, opts) : no_grad_tensor(opts);
    dA = weight_grad(need_A, do_dA, {k, n}, opts);
    dB = weight_grad(need_B, do_dB, {m, k}, opts);
    dbias = need_bias ? at::empty({m}, opts) : no_grad_tensor(opts);
  }

 private:
  void check_saved() const {
    if (need_A)
      check_saved_input("x", x, "the saved input (needed for dA)", dy, N, n, "in_features");
    if (need_S && r > 0)
      check_saved_input("xv", xv, "the saved x Vh^T (needed for dS)", dy, N, r, "rank = S.size(0)");
    if (need_B)
      check_saved_input("h_k", h_k, "the saved s x A^T (needed for dB)", dy, N, k,
                        "delta_rank = A.size(0)");
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
