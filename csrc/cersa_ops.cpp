// Op schemas of the `cersa` namespace and the Python module stub of cersa_kernels._C.
//
// The schemas are the public kernel API (docs/design.md "Forward" / "Backward"); the autograd of
// cersa::linear is in cersa_autograd.cpp, the CPU kernels are registered in cpu/cersa_cpu.cpp
// (those of the quantized-factor ops in cpu/cersa_cpu_quant.cpp), the CUDA ones in
// cuda/cersa_cuda_ops.cpp (a second extension, cersa_kernels._C_cuda), and the fake (meta)
// kernels from Python in cersa_kernels/backends/_cpp_ops.py.
//
// Outputs that an op does not compute are returned as empty tensors of shape (0,):
//   linear_forward: h_k is (N, 0) when A is None, xv is (N, 0) when save_xv is false.
//   linear_backward: every gradient whose `needs` flag is false (or dA/dB when A is None) is (0,).
//   linear_forward_q / linear_backward_q: the same.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(cersa, m) {
  // y (N, m) = x Vh^T diag(S) U^T + s (x A^T) B^T + bias;  h_k (N, k) = s x A^T;
  // xv (N, r) = x Vh^T when save_xv.
  m.def(
      "linear_forward(Tensor x, Tensor U, Tensor S, Tensor Vh, Tensor? A, Tensor? B, "
      "Tensor? bias, float scale, bool save_xv) -> (Tensor y, Tensor h_k, Tensor xv)",
      {at::Tag::pt2_compliant_tag});
  // needs: (x, U, S, Vh, A, B, bias).  x may be None unless dVh or dA is needed; h_k may be None
  // unless dB is; xv may be None unless dU or dS is.
  m.def(
      "linear_backward(Tensor dy, Tensor? x, Tensor? h_k, Tensor? xv, Tensor U, Tensor S, "
      "Tensor Vh, Tensor? A, Tensor? B, float scale, bool[7] needs) -> (Tensor dx, Tensor dU, "
      "Tensor dS, Tensor dVh, Tensor dA, Tensor dB, Tensor dbias)",
      {at::Tag::pt2_compliant_tag});
  // linear_forward and linear_backward with the frozen factors quantized (docs/design.md
  // "Quantized factors"): U (out_features, r) and Vh (r, in_features) given as their codes (int8
  // (numel,) for quant_type "int8", packed uint8 (ceil(numel / 2),) for "nf4") and float32 block
  // scales (ceil(numel / block_size),), with r = S.size(0); the format is cersa_quant_format.h.
  // Same outputs as linear_forward; the backward has no dU / dVh (quantized factors are frozen):
  // needs = (x, S, A, B, bias) and it returns (dx, dS, dA, dB, dbias), (0,) where not needed.
  m.def(
      "linear_forward_q(Tensor x, Tensor U_codes, Tensor U_scales, Tensor S, Tensor Vh_codes, "
      "Tensor Vh_scales, Tensor? A, Tensor? B, Tensor? bias, int out_features, int in_features, "
      "str quant_type, int block_size, float scale, bool save_xv) -> (Tensor y, Tensor h_k, "
      "Tensor xv)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "linear_backward_q(Tensor dy, Tensor? x, Tensor? h_k, Tensor? xv, Tensor U_codes, "
      "Tensor U_scales, Tensor S, Tensor Vh_codes, Tensor Vh_scales, Tensor? A, Tensor? B, "
      "int out_features, int in_features, str quant_type, int block_size, float scale, "
      "bool[5] needs) -> (Tensor dx, Tensor dS, Tensor dA, Tensor dB, Tensor dbias)",
      {at::Tag::pt2_compliant_tag});
  // The differentiable op: y (N, m) = x Vh^T diag(S) U^T + s (x A^T) B^T + bias, with its autograd
  // in C++ (cersa_autograd.cpp) calling the two kernels above.
  m.def(
      "linear(Tensor x, Tensor U, Tensor S, Tensor Vh, Tensor? A, Tensor? B, Tensor? bias, "
      "float scale) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

// Importing cersa_kernels._C loads this library, which runs the registrations above.
static struct PyModuleDef cersa_module = {PyModuleDef_HEAD_INIT, "_C",
                                          "cersa:: op registrations (CPU kernels)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&cersa_module); }
