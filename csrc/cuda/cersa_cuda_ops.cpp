// CUDA kernels of cersa::linear_forward / cersa::linear_backward (the extension
// cersa_kernels._C_cuda; schemas in ../cersa_ops.cpp).  Same algorithm as the CPU kernels
// (../cpu/cersa_cpu.cpp, DESIGN.md "Forward"/"Backward"):
//   * GEMMs through cuBLAS / cuBLASLt via ATen (at::mm_out / addmm_out), writing into strided
//     views of one (N, r + k) buffer (cuBLAS takes a leading dimension); the delta scale s rides
//     in the GEMM's alpha and the bias in cuBLASLt's bias epilogue (ATen picks it for a 1-D bias
//     with beta = 1).
//   * the S scaling, the xv copy, the dS / dbias reductions and dU's column scaling in raw
//     kernels (cersa_kernels.cu, plain pointers, compiled by nvcc without torch headers).
// This file is host code compiled by the C++ compiler; it only launches.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <Python.h>

#include <tuple>

#include "../cersa_common.h"
#include "cersa_kernels.h"

namespace cersa {
namespace {

using at::Tensor;
using std::optional;

cersa_cuda::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cersa_cuda::DType::Float32;
    case at::kDouble: return cersa_cuda::DType::Float64;
    case at::kHalf: return cersa_cuda::DType::Float16;
    case at::kBFloat16: return cersa_cuda::DType::BFloat16;
    default: TORCH_CHECK(false, "cersa: unsupported dtype ", t.scalar_type());
  }
}

void check_cuda(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "cersa: CUDA kernel ", what, " failed: ", cudaGetErrorString(e));
}

void gemm_into(Tensor& out, const Tensor& a, const Tensor& b, double alpha, bool accumulate) {
  if (a.size(1) == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  if (accumulate) {
    out.addmm_(a, b, 1.0, alpha);
  } else if (alpha == 1.0) {
    at::mm_out(out, a, b);
  } else {
    at::addmm_out(out, out, a, b, 0.0, alpha);  // beta = 0: out's old contents are not read
  }
}

std::tuple<Tensor, Tensor, Tensor> linear_forward_cuda(const Tensor& x_in, const Tensor& U,
                                                       const Tensor& S, const Tensor& Vh,
                                                       const optional<Tensor>& A,
                                                       const optional<Tensor>& B,
                                                       const optional<Tensor>& bias, double scale,
                                                       bool save_xv) {
  const Tensor x = (x_in.defined() && x_in.dim() == 2) ? blas_ready(x_in) : x_in;
  int64_t m, r, n, k;
  TORCH_CHECK(x.defined() && x.dim() == 2, "cersa: x: expected a 2-D tensor (N, in_features)");
  check_factors(x, U, S, Vh, A, B, m, r, n, k);
  check_size("x", x, 1, n, "in_features = Vh.size(1)");
  if (present(bias)) {
    check_tensor("bias", *bias, 1, x);
    check_size("bias", *bias, 0, m, "out_features = U.size(0)");
  }
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0);
  const auto opts = x.options();
  Tensor h = at::empty({N, r + k}, opts);  // [x Vh^T -> (x Vh^T) diag S | s x A^T]
  Tensor h_r = h.narrow(1, 0, r), h_k = h.narrow(1, r, k);
  Tensor y = at::empty({N, m}, opts);
  Tensor xv = at::empty({N, save_xv ? r : 0}, opts);
  if (N > 0) {
    if (r > 0) gemm_into(h_r, x, Vh.t(), 1.0, false);
    if (k > 0) gemm_into(h_k, x, A->t(), scale, false);
    Tensor Sc = S.contiguous();
    check_cuda(cersa_cuda::forward_epilogue(dtype_of(x), h.data_ptr(), r + k, N, r, Sc.const_data_ptr(),
                                            save_xv ? xv.data_ptr() : nullptr, r,
                                            at::cuda::getCurrentCUDAStream()),
               "forward_epilogue");
    if (r > 0) {
      if (present(bias)) at::addmm_out(y, *bias, h_r, U.t());  // cuBLASLt bias epilogue
      else at::mm_out(y, h_r, U.t());
    } else if (present(bias)) {
      y.copy_(bias->expand({N, m}));
    } else {
      y.zero_();
    }
    if (k > 0) gemm_into(y, h_k, B->t(), 1.0, true);
  }
  Tensor h_k_out = at::empty({N, k}, opts);
  if (N > 0 && k > 0) h_k_out.copy_(h_k);
  return {y, h_k_out, xv};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_backward_cuda(
    const Tensor& dy_in, const optional<Tensor>& x_in, const optional<Tensor>& h_k,
    const optional<Tensor>& xv, const Tensor& U, const Tensor& S, const Tensor& Vh,
    const optional<Tensor>& A, const optional<Tensor>& B, double scale, std::array<bool, 7> needs) {
  const Tensor dy = (dy_in.defined() && dy_in.dim() == 2) ? blas_ready(dy_in) : dy_in;
  optional<Tensor> x = x_in;
  if (present(x) && x->dim() == 2) x = blas_ready(*x);
  int64_t m, r, n, k;
  check_backward_inputs(dy, x, h_k, xv, U, S, Vh, A, B, needs, m, r, n, k);
  c10::cuda::CUDAGuard guard(dy.device());
  const int64_t N = dy.size(0);
  const bool has_delta = present(A);
  const bool need_x = needs[0], need_U = needs[1], need_S = needs[2], need_Vh = needs[3];
  const bool need_A = needs[4] && has_delta, need_B = needs[5] && has_delta, need_bias = needs[6];
  const auto opts = dy.options();
  auto none = [&] { return at::empty({0}, opts); };
  auto stream = at::cuda::getCurrentCUDAStream();

  const bool need_dhr = r > 0 && (need_x || need_S || need_Vh);
  const bool need_dhk = has_delta && k > 0 && (need_x || need_A);
  const int64_t rr = need_dhr ? r : 0, kk = need_dhk ? k : 0;
  Tensor dh = at::empty({N, rr + kk}, opts);  // [dy U -> (dy U) diag S | s dy B]
  Tensor dh_r = dh.narrow(1, 0, rr), dh_k = dh.narrow(1, rr, kk);
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
  const int64_t er = (want_dS || scale_dh) ? r : 0;
  Tensor ws = at::empty(
      {static_cast<int64_t>(cersa_cuda::backward_workspace_bytes(dtype_of(dy), N, er, need_bias ? m : 0))},
      opts.dtype(at::kByte));
  check_cuda(cersa_cuda::backward_epilogue(
                 dtype_of(dy), dh.data_ptr(), rr + kk, N, er, Sc.const_data_ptr(), scale_dh,
                 want_dS ? xvc.const_data_ptr() : nullptr, r, dy.const_data_ptr(), dy.stride(0),
                 dy.stride(1), m, want_dS ? dS.data_ptr() : nullptr,
                 need_bias ? dbias.data_ptr() : nullptr, ws.data_ptr(), stream),
             "backward_epilogue");
  if (need_S && r == 0) dS.zero_();

  Tensor dx = none(), dU = none(), dVh = none(), dA = none(), dB = none();
  if (need_x) {
    dx = at::empty({N, n}, opts);
    if (rr > 0) gemm_into(dx, dh_r, Vh, 1.0, false);
    if (kk > 0) gemm_into(dx, dh_k, *A, 1.0, rr > 0);
    if (rr == 0 && kk == 0) dx.zero_();
  }
  if (need_U) {
    dU = at::empty({m, r}, opts);
    if (r > 0) {
      gemm_into(dU, dy.t(), *xv, 1.0, false);
      check_cuda(cersa_cuda::scale_columns(dtype_of(dy), dU.data_ptr(), r, m, r, Sc.const_data_ptr(), stream),
                 "scale_columns");
    }
  }
  if (need_Vh) {
    dVh = at::empty({r, n}, opts);
    if (r > 0) gemm_into(dVh, dh_r.t(), *x, 1.0, false);
  }
  if (need_A) {
    dA = at::empty({k, n}, opts);
    if (k > 0) gemm_into(dA, dh_k.t(), *x, 1.0, false);
  }
  if (need_B) {
    dB = at::empty({m, k}, opts);
    if (k > 0) gemm_into(dB, dy.t(), *h_k, 1.0, false);
  }
  return {dx, dU, dS, dVh, dA, dB, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(cersa, CUDA, m) {
  m.impl("linear_forward", &linear_forward_cuda);
  m.impl("linear_backward", &linear_backward_cuda);
}

}  // namespace cersa

static struct PyModuleDef cersa_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                               "cersa:: op registrations (CUDA kernels)", -1, nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&cersa_cuda_module); }
