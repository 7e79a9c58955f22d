// CUDA kernels of cersa::linear_forward / cersa::linear_backward (the extension
// cersa_kernels._C_cuda; schemas in ../cersa_ops.cpp).  The argument checks, sizes and output
// allocations are the plans of ../cersa_plan.h, shared with the CPU kernels (../cpu/cersa_cpu.cpp);
// same algorithm (docs/design.md "Forward", "Backward" and "CUDA kernels"), another schedule:
//   * GEMMs through cuBLAS / cuBLASLt via ATen (at::mm_out / addmm_out), writing into strided
//     views of one (N, r + k) buffer (cuBLAS takes a leading dimension); the delta scale s rides
//     in the GEMM's alpha and the bias in cuBLASLt's bias epilogue (ATen picks it for a 1-D bias
//     with beta = 1).
//   * the S scaling, the xv copy, the dS / dbias reductions and dU's column scaling in raw
//     kernels (cersa_kernels.cu, plain pointers, compiled by nvcc without torch headers).
// The quantized-factor ops (linear_forward_q / linear_backward_q) run the same schedule with the
// factor GEMMs over panels decoded by the raw kernel dequantize_panel (see below).
// This file is host code compiled by the C++ compiler; it only launches.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <Python.h>

#include "../cersa_plan.h"
#include "cersa_kernels.h"

namespace cersa {
namespace {

using at::Tensor;

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

// The forward epilogue of both forward plans (ForwardPlan, QuantForwardPlan) over
// h = [x Vh^T | s x A^T] (N, r + k): h_r *= S, and xv = x Vh^T when saved.
template <class Plan>
void run_forward_epilogue(Plan& p, Tensor& h) {
  void* xv_p = p.save_xv ? p.xv.data_ptr() : nullptr;
  check_cuda(cersa_cuda::forward_epilogue(dtype_of(p.x), h.data_ptr(), p.r + p.k, p.N, p.r,
                                          p.S.const_data_ptr(), xv_p, p.r,
                                          at::cuda::getCurrentCUDAStream()),
             "forward_epilogue");
}

// The backward epilogue of both backward plans (BackwardPlan, QuantBackwardPlan), one pass over
// dh (N, rr + kk) and dy: dS = sum_i xv * dh_r, dh_r *= S where dx or dVh reads it (scale_dh),
// dbias = sum_i dy, with its workspace for the reductions.
template <class Plan>
void run_backward_epilogue(Plan& p, Tensor& dh, cudaStream_t stream) {
  const Tensor& dy = p.dy;
  const int64_t N = p.N, m = p.m, r = p.r;
  const int64_t er = (p.want_dS || p.scale_dh) ? r : 0;
  const int64_t em = p.need_bias ? m : 0;
  Tensor ws = at::empty(
      {static_cast<int64_t>(cersa_cuda::backward_workspace_bytes(dtype_of(dy), N, er, em))},
      p.opts.dtype(at::kByte));
  check_cuda(cersa_cuda::backward_epilogue(
                 dtype_of(dy), dh.data_ptr(), p.rr + p.kk, N, er, p.S.const_data_ptr(),
                 p.scale_dh, p.want_dS ? p.xv_c.const_data_ptr() : nullptr, r,
                 dy.const_data_ptr(), dy.stride(0), dy.stride(1), m,
                 p.want_dS ? p.dS.data_ptr() : nullptr, p.need_bias ? p.dbias.data_ptr() : nullptr,
                 ws.data_ptr(), stream),
             "backward_epilogue");
}

// The forward schedule over a checked plan (../cersa_plan.h; y, h_k and xv allocated there).
void forward_cuda(ForwardPlan& p) {
  c10::cuda::CUDAGuard guard(p.x.device());
  const Tensor& x = p.x;
  const Tensor &U = p.U, &Vh = p.Vh;
  const int64_t N = p.N, m = p.m, r = p.r, k = p.k;
  Tensor h = at::empty({N, r + k}, p.opts);  // [x Vh^T -> (x Vh^T) diag S | s x A^T]
  Tensor h_r = h.narrow(1, 0, r), h_k = h.narrow(1, r, k);
  if (N > 0) {
    if (r > 0) aten_gemm_into(h_r, x, Vh.t(), 1.0, false);
    if (k > 0) aten_gemm_into(h_k, x, p.A->t(), p.scale, false);
    run_forward_epilogue(p, h);
    if (r > 0) {
      if (p.has_bias) at::addmm_out(p.y, *p.bias, h_r, U.t());  // cuBLASLt bias epilogue
      else at::mm_out(p.y, h_r, U.t());
    } else if (p.has_bias) {
      p.y.copy_(p.bias->expand({N, m}));
    } else {
      p.y.zero_();
    }
    if (k > 0) {
      aten_gemm_into(p.y, h_k, p.B->t(), 1.0, true);
      p.h_k.copy_(h_k);
    }
  }
}

// The backward schedule over a checked plan (../cersa_plan.h; the gradients allocated there).
void backward_cuda(BackwardPlan& p) {
  c10::cuda::CUDAGuard guard(p.dy.device());
  const Tensor& dy = p.dy;
  const int64_t N = p.N, m = p.m, r = p.r, rr = p.rr, kk = p.kk;
  auto stream = at::cuda::getCurrentCUDAStream();

  Tensor dh = at::empty({N, rr + kk}, p.opts);  // [dy U -> (dy U) diag S | s dy B]
  Tensor dh_r = dh.narrow(1, 0, rr), dh_k = dh.narrow(1, rr, kk);
  if (N > 0) {
    if (rr > 0) aten_gemm_into(dh_r, dy, p.U, 1.0, false);
    if (kk > 0) aten_gemm_into(dh_k, dy, *p.B, p.scale, false);
  }
  run_backward_epilogue(p, dh, stream);  // dS, dh_r *= S (for dx and dVh) and dbias

  if (p.need_x) {  // dx = (dh_r diag S) Vh + s dh_k A
    if (rr > 0) aten_gemm_into(p.dx, dh_r, p.Vh, 1.0, false);
    if (kk > 0) aten_gemm_into(p.dx, dh_k, *p.A, 1.0, rr > 0);
    if (rr == 0 && kk == 0) p.dx.zero_();
  }
  if (p.do_dU) {  // dU = (dy^T xv) diag S
    aten_gemm_into(p.dU, dy.t(), *p.xv, 1.0, false);
    check_cuda(cersa_cuda::scale_columns(dtype_of(dy), p.dU.data_ptr(), r, m, r,
                                         p.S.const_data_ptr(), stream),
               "scale_columns");
  }
  if (p.do_dVh) aten_gemm_into(p.dVh, dh_r.t(), *p.x, 1.0, false);
  if (p.do_dA) aten_gemm_into(p.dA, dh_k.t(), *p.x, 1.0, false);
  if (p.do_dB) aten_gemm_into(p.dB, dy.t(), *p.h_k, 1.0, false);
}

// ---------------------------------------------------------------------------------------------
// Quantized frozen factors (cersa::linear_forward_q / linear_backward_q; docs/design.md
// "Quantized factors").  The CPU schedule's panels (cpu/cersa_cpu_quant.cpp) over all N rows at
// once: each GEMM that reads a factor runs over panels of its rows or columns, each decoded by the
// raw kernel dequantize_panel into one reused buffer in the compute dtype and fed to cuBLAS; each
// panel writes its own block of output columns with the whole inner dimension.  With no blocks of
// rows every panel is decoded once per call.
// ---------------------------------------------------------------------------------------------

// Numbers per decoded panel (16 MiB in fp32): LLaMA-7B factors at 25 % rank are one to three panels.
constexpr int64_t kGpuPanelElems = int64_t{1} << 22;

// The panels of a quantized factor along its rows (panel i: rows [start(i), start(i) + size(i)),
// a row-major (size, cols) matrix) or its columns (a row-major (rows, size) matrix).
class GpuPanels : public PanelGrid {
 public:
  GpuPanels(const QuantFactor& F, bool by_rows, const at::TensorOptions& opts)
      : PanelGrid(F, by_rows, kGpuPanelElems, /*align=*/1), opts_(opts) {}

  // Panel i, decoded into the buffer (which the previous panel's GEMM has read: one stream).
  Tensor get(int64_t i) {
    if (!buf_.defined()) buf_ = at::empty({std::max<int64_t>(1, width * other)}, opts_);
    const int64_t s = size(i), c0 = start(i);
    const int64_t rows_p = by_rows ? s : F.rows, cols_p = by_rows ? F.cols : s;
    check_cuda(cersa_cuda::dequantize_panel(
                   dtype_of(buf_), F.type, F.codes.const_data_ptr(),
                   F.scales.const_data_ptr<float>(), F.block_shift, F.cols, by_rows ? c0 : 0,
                   rows_p, by_rows ? 0 : c0, cols_p, buf_.data_ptr(), cols_p,
                   at::cuda::getCurrentCUDAStream()),
               "dequantize_panel");
    return buf_.narrow(0, 0, rows_p * cols_p).view({rows_p, cols_p});
  }

 private:
  const at::TensorOptions opts_;
  Tensor buf_;
};

// The forward schedule over a checked plan (../cersa_plan.h): forward_cuda's, with panels of Vh's
// rows (columns of h_r) and of U's rows (columns of y).
void forward_q_cuda(QuantForwardPlan& p) {
  c10::cuda::CUDAGuard guard(p.x.device());
  const Tensor& x = p.x;
  const int64_t N = p.N, m = p.m, r = p.r, k = p.k;
  Tensor h = at::empty({N, r + k}, p.opts);  // [x Vh^T -> (x Vh^T) diag S | s x A^T]
  Tensor h_r = h.narrow(1, 0, r), h_k = h.narrow(1, r, k);
  if (N == 0) return;
  if (r > 0) {
    GpuPanels vh(*p.Vh, /*by_rows=*/true, p.opts);
    for (int64_t i = 0; i < vh.count(); ++i) {
      Tensor out = h_r.narrow(1, vh.start(i), vh.size(i));
      aten_gemm_into(out, x, vh.get(i).t(), 1.0, false);
    }
  }
  if (k > 0) aten_gemm_into(h_k, x, p.A->t(), p.scale, false);
  run_forward_epilogue(p, h);
  if (p.has_bias) p.y.copy_(p.bias->expand({N, m}));
  if (r > 0) {  // y[:, panel] (+)= h_r U[panel, :]^T
    GpuPanels u(*p.U, /*by_rows=*/true, p.opts);
    for (int64_t i = 0; i < u.count(); ++i) {
      Tensor out = p.y.narrow(1, u.start(i), u.size(i));
      aten_gemm_into(out, h_r, u.get(i).t(), 1.0, p.has_bias);
    }
  }
  if (k > 0) {
    aten_gemm_into(p.y, h_k, p.B->t(), 1.0, p.has_bias || r > 0);
    p.h_k.copy_(h_k);
  }
  if (r == 0 && k == 0 && !p.has_bias) p.y.zero_();
}

// The backward schedule over a checked plan (../cersa_plan.h): backward_cuda's without dU / dVh,
// with panels of U's columns (columns of dh_r) and of Vh's columns (columns of dx).
void backward_q_cuda(QuantBackwardPlan& p) {
  c10::cuda::CUDAGuard guard(p.dy.device());
  const Tensor& dy = p.dy;
  const int64_t N = p.N, rr = p.rr, kk = p.kk;
  auto stream = at::cuda::getCurrentCUDAStream();

  Tensor dh = at::empty({N, rr + kk}, p.opts);  // [dy U -> (dy U) diag S | s dy B]
  Tensor dh_r = dh.narrow(1, 0, rr), dh_k = dh.narrow(1, rr, kk);
  if (N > 0) {
    if (rr > 0) {
      GpuPanels u(*p.U, /*by_rows=*/false, p.opts);
      for (int64_t i = 0; i < u.count(); ++i) {
        Tensor out = dh_r.narrow(1, u.start(i), u.size(i));
        aten_gemm_into(out, dy, u.get(i), 1.0, false);
      }
    }
    if (kk > 0) aten_gemm_into(dh_k, dy, *p.B, p.scale, false);
  }
  run_backward_epilogue(p, dh, stream);  // dS, dh_r *= S (for dx) and dbias
  if (p.need_x && N > 0) {  // dx = (dh_r diag S) Vh + s dh_k A
    if (rr > 0) {
      GpuPanels vh(*p.Vh, /*by_rows=*/false, p.opts);
      for (int64_t i = 0; i < vh.count(); ++i) {
        Tensor out = p.dx.narrow(1, vh.start(i), vh.size(i));
        aten_gemm_into(out, dh_r, vh.get(i), 1.0, false);
      }
    }
    if (kk > 0) aten_gemm_into(p.dx, dh_k, *p.A, 1.0, rr > 0);
    if (rr == 0 && kk == 0) p.dx.zero_();
  }
  if (p.do_dA) aten_gemm_into(p.dA, dh_k.t(), *p.x, 1.0, false);
  if (p.do_dB) aten_gemm_into(p.dB, dy.t(), *p.h_k, 1.0, false);
}

}  // namespace
}  // namespace cersa

TORCH_LIBRARY_IMPL(cersa, CUDA, m) {
  m.impl("linear_forward", &cersa::forward_op<cersa::forward_cuda>);
  m.impl("linear_backward", &cersa::backward_op<cersa::backward_cuda>);
  m.impl("linear_forward_q", &cersa::forward_q_op<cersa::forward_q_cuda>);
  m.impl("linear_backward_q", &cersa::backward_q_op<cersa::backward_q_cuda>);
}

static struct PyModuleDef cersa_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                               "cersa:: op registrations (CUDA kernels)", -1, nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&cersa_cuda_module); }
