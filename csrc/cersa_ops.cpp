// Op schemas of the `cersa` namespace and the Python module stub of cersa_kernels._C.
//
// The schemas are the public kernel API (docs/design.md "Forward" / "Backward"); the autograd of
// cersa::linear is in cersa_autograd.cpp, the CPU kernels are registered in cpu/cersa_cpu.cpp,
// the CUDA ones in cuda/cersa_cuda_ops.cpp (a second extension,
// cersa_kernels._C_cuda), and the fake (meta) kernels from Python in
// cersa_kernels/backends/_cpp_ops.py.
//
// Outputs that an op does not compute are returned as empty tensors of shape (0,):
//   linear_forward: h_k is (N, 0) when A is None, xv is (N, 0) when save_xv is false.
//   linear_backward: every gradient whose `needs` flag is false (or dA/dB when A is None) is (0,).
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
