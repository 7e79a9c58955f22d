// Shared pieces of the cersa:: ops (CPU and CUDA implementations): the argument checks, the
// BLAS-ready operand copy and the GEMM through ATen.  The per-call plans built from them are in
// cersa_plan.h.
//
// The ops are public (other CERSA front ends call torch.ops.cersa.* directly), so each
// implementation validates its arguments and names the argument, the expected and the
// received value in the error.  Shapes follow docs/design.md "Notation":
//   x (N, n), U (m, r), S (r,), Vh (r, n), A (k, n), B (m, k), bias (m,), dy (N, m).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <sstream>
#include <string>

namespace cersa {

inline bool present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

// torch's Python spelling of a dtype, as the user wrote it (torch.float32, not "Float").
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    default: return c10::toString(t);
  }
}

inline void check_tensor(const char* name, const at::Tensor& t, int64_t dim,
                         const at::Tensor& like) {
  TORCH_CHECK(t.defined(), "cersa: ", name, ": expected a tensor, got None");
  TORCH_CHECK(t.dim() == dim, "cersa: ", name, ": expected a ", dim, "-D tensor, got shape ",
              shape_str(t));
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "cersa: ", name, ": expected dtype ",
              dtype_name(like.scalar_type()), " (x's dtype), got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == like.device(), "cersa: ", name, ": expected device ", like.device(),
              " (x's device), got ", t.device());
}

inline void check_size(const char* name, const at::Tensor& t, int64_t d, int64_t expected,
                       const char* meaning) {
  TORCH_CHECK(t.size(d) == expected, "cersa: ", name, ": expected size ", expected, " in dim ", d,
              " (", meaning, "), got shape ", shape_str(t));
}

// x's dtype must be one the kernels compute in.
inline void check_compute_dtype(const at::Tensor& like) {
  auto st = like.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "cersa: x: expected dtype torch.float32, torch.float64, torch.float16 or torch.bfloat16, got ",
              dtype_name(st));
}

// Checks the delta A (k, n), B (m, k) (both or neither); sets k (0 without a delta).
inline void check_delta(const at::Tensor& like, const std::optional<at::Tensor>& A,
                        const std::optional<at::Tensor>& B, int64_t m, int64_t n, int64_t& k) {
  TORCH_CHECK(present(A) == present(B), "cersa: A and B: expected both or neither, got A ",
              present(A) ? "given" : "None", " and B ", present(B) ? "given" : "None");
  k = 0;
  if (present(A)) {
    check_tensor("A", *A, 2, like);
    check_tensor("B", *B, 2, like);
    k = A->size(0);
    check_size("A", *A, 1, n, "in_features = Vh.size(1)");
    check_size("B", *B, 0, m, "out_features = U.size(0)");
    check_size("B", *B, 1, k, "delta_rank = A.size(0)");
  }
}

// Checks the factors shared by forward and backward; returns (m, r, n, k).
inline void check_factors(const at::Tensor& like, const at::Tensor& U, const at::Tensor& S,
                          const at::Tensor& Vh, const std::optional<at::Tensor>& A,
                          const std::optional<at::Tensor>& B, int64_t& m, int64_t& r,
                          int64_t& n, int64_t& k) {
  check_compute_dtype(like);
  check_tensor("U", U, 2, like);
  check_tensor("S", S, 1, like);
  check_tensor("Vh", Vh, 2, like);
  m = U.size(0);
  r = U.size(1);
  n = Vh.size(1);
  check_size("S", S, 0, r, "rank = U.size(1)");
  check_size("Vh", Vh, 0, r, "rank = U.size(1)");
  check_delta(like, A, B, m, n, k);
}

// `t` itself when BLAS can read it in place (a unit stride in one dimension and a leading
// dimension that covers the other), else a contiguous copy: made once here rather than once in
// every GEMM that reads it (an expanded grad_output, e.g. of y.sum(), has strides (0, 0)).
inline at::Tensor blas_ready(const at::Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  const bool row_major = t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, cols);
  const bool col_major = t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, rows);
  return (row_major || col_major) ? t : t.contiguous();
}

// The ATen operations that aten_gemm_into runs, through the dispatcher (the CUDA ops: cuBLAS /
// cuBLASLt).  The CPU kernels pass their own set that calls ATen's CPU kernels directly.
struct DispatchedGemm {
  static void mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
    at::mm_out(out, a, b);
  }
  static void addmm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta,
                    double alpha) {
    at::addmm_out(out, out, a, b, beta, alpha);
  }
  static void addmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha) {
    out.addmm_(a, b, 1.0, alpha);
  }
};

// out = alpha a @ b (accumulate false) or out += alpha a @ b, through ATen (`Ops`: the three
// operations above).  `out` may be a strided view of a larger buffer: the GEMM writes it in
// place through its leading dimension.  An empty inner dimension makes the product zero.
template <typename Ops = DispatchedGemm>
void aten_gemm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha,
                    bool accumulate) {
  if (a.size(1) == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  if (accumulate) {
    Ops::addmm_(out, a, b, alpha);
  } else if (alpha == 1.0) {
    Ops::mm(out, a, b);
  } else {
    Ops::addmm(out, a, b, 0.0, alpha);  // beta = 0: out's old contents are not read
  }
}

}  // namespace cersa
