// Raw CUDA kernels of the cersa ops (declarations and contracts in cersa_kernels.h).
// No torch headers: compiles with `nvcc -c` alone, for sm_80 and sm_90.
#include "cersa_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace cersa_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowsPerBlock = 64;   // rows one reduction block sums before writing a partial
constexpr int64_t kMaxRowBlocks = 256;  // cap on partials per column

// Load/store through float (double for double).
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// grid: (ceil(r / kThreads), rows blocks); one thread per column, a grid-stride loop over rows.
template <typename T>
__global__ void forward_epilogue_kernel(T* __restrict__ h, int64_t ldh, int64_t N, int64_t r,
                                        const T* __restrict__ S, T* __restrict__ xv, int64_t ldxv) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= r) return;
  const auto s = to_acc(S[j]);
  for (int64_t i = blockIdx.y; i < N; i += gridDim.y) {
    T v = h[i * ldh + j];
    if (xv != nullptr) xv[i * ldxv + j] = v;
    h[i * ldh + j] = from_acc<T>(to_acc(v) * s);
  }
}

// Pass 1: block (x, y) sums rows [y * rows_per, ...) of columns [x * kThreads, ...) of the
// virtual row [dS terms (r) | dbias terms (m)] into part[y, col].
template <typename T>
__global__ void backward_partial_kernel(T* __restrict__ dh, int64_t lddh, int64_t N, int64_t r,
                                        const T* __restrict__ S, bool scale_dh,
                                        const T* __restrict__ xv, int64_t ldxv,
                                        const T* __restrict__ dy, int64_t dy_s0, int64_t dy_s1,
                                        int64_t m, bool want_dS, bool want_db,
                                        typename Acc<T>::type* __restrict__ part, int64_t rows_per) {
  using acc_t = typename Acc<T>::type;
  const int64_t width = r + m;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= width) return;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * rows_per;
  const int64_t i1 = min(N, i0 + rows_per);
  acc_t acc = 0;
  if (col < r) {
    const int64_t j = col;
    const acc_t s = to_acc(S[j]);
    for (int64_t i = i0; i < i1; ++i) {
      T* p = dh + i * lddh + j;
      const acc_t d = to_acc(*p);
      if (want_dS) acc += to_acc(xv[i * ldxv + j]) * d;
      if (scale_dh) *p = from_acc<T>(d * s);
    }
  } else if (want_db) {
    const int64_t c = col - r;
    for (int64_t i = i0; i < i1; ++i) acc += to_acc(dy[i * dy_s0 + c * dy_s1]);
  }
  part[static_cast<int64_t>(blockIdx.y) * width + col] = acc;
}

// Pass 2: out[col] = sum over row blocks of part[., col], in block order.
template <typename T>
__global__ void backward_finish_kernel(const typename Acc<T>::type* __restrict__ part,
                                       int64_t blocks, int64_t r, int64_t m, T* __restrict__ dS,
                                       T* __restrict__ dbias) {
  using acc_t = typename Acc<T>::type;
  const int64_t width = r + m;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= width) return;
  acc_t s = 0;
  for (int64_t b = 0; b < blocks; ++b) s += part[b * width + col];
  if (col < r) {
    if (dS != nullptr) dS[col] = from_acc<T>(s);
  } else if (dbias != nullptr) {
    dbias[col - r] = from_acc<T>(s);
  }
}

template <typename T>
__global__ void scale_columns_kernel(T* __restrict__ a, int64_t lda, int64_t rows, int64_t cols,
                                     const T* __restrict__ S) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  const auto s = to_acc(S[j]);
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) a[i * lda + j] = from_acc<T>(to_acc(a[i * lda + j]) * s);
}

// The NF4 levels (../cersa_quant_format.h), in constant memory.
__constant__ float kNF4Device[16] = CERSA_NF4_LEVELS;

// grid-stride over the rows_p * cols_p numbers of a panel, one number per thread.
template <typename T>
__global__ void dequantize_panel_kernel(bool nf4, const void* __restrict__ codes,
                                        const float* __restrict__ scales, int block_shift,
                                        int64_t cols, int64_t row0, int64_t rows_p, int64_t col0,
                                        int64_t cols_p, T* __restrict__ dst, int64_t ldd) {
  const int64_t total = rows_p * cols_p;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const int64_t i = e / cols_p, j = e - i * cols_p;
    const int64_t f = (row0 + i) * cols + col0 + j;
    const float s = scales[f >> block_shift];
    float v;
    if (nf4) {
      const unsigned c = static_cast<const uint8_t*>(codes)[f >> 1];
      v = kNF4Device[(f & 1) ? (c >> 4) : (c & 15u)] * s;
    } else {
      v = static_cast<float>(static_cast<const int8_t*>(codes)[f]) / 127.0f * s;  // IEEE division
    }
    dst[i * ldd + j] = from_acc<T>(static_cast<typename Acc<T>::type>(v));
  }
}

inline unsigned col_blocks(int64_t cols) { return static_cast<unsigned>((cols + kThreads - 1) / kThreads); }
inline unsigned row_grid(int64_t rows) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows, 1024)));
}
inline int64_t row_blocks(int64_t N) {
  const int64_t rows_per = std::max<int64_t>(kRowsPerBlock, (N + kMaxRowBlocks - 1) / kMaxRowBlocks);
  return (N + rows_per - 1) / rows_per;
}

template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: f(float{}); break;
    case DType::Float64: f(double{}); break;
    case DType::Float16: f(__half{}); break;
    case DType::BFloat16: f(__nv_bfloat16{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

size_t acc_size(DType dtype) { return dtype == DType::Float64 ? sizeof(double) : sizeof(float); }

}  // namespace

cudaError_t forward_epilogue(DType dtype, void* h, int64_t ldh, int64_t N, int64_t r,
                             const void* S, void* xv, int64_t ldxv, cudaStream_t stream) {
  if (N == 0 || r == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    dim3 grid(col_blocks(r), row_grid(N));
    forward_epilogue_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<T*>(h), ldh, N, r, static_cast<const T*>(S), static_cast<T*>(xv), ldxv);
  });
}

size_t backward_workspace_bytes(DType dtype, int64_t N, int64_t r, int64_t m) {
  if (N == 0 || r + m == 0) return 0;
  return static_cast<size_t>(row_blocks(N) * (r + m)) * acc_size(dtype);
}

cudaError_t backward_epilogue(DType dtype, void* dh, int64_t lddh, int64_t N, int64_t r,
                              const void* S, bool scale_dh, const void* xv, int64_t ldxv,
                              const void* dy, int64_t dy_s0, int64_t dy_s1, int64_t m,
                              void* dS, void* dbias, void* workspace, cudaStream_t stream) {
  const bool want_dS = dS != nullptr, want_db = dbias != nullptr;
  if (!want_dS && !scale_dh) r = 0;  // nothing to do on the dh columns
  if (!want_db) m = 0;
  if (r + m == 0) return cudaSuccess;
  if (N == 0) {  // empty sums are zero
    if (want_dS && r > 0) {
      cudaError_t e = cudaMemsetAsync(dS, 0, r * (dtype == DType::Float64 ? 8 : dtype == DType::Float32 ? 4 : 2), stream);
      if (e != cudaSuccess) return e;
    }
    if (want_db && m > 0)
      return cudaMemsetAsync(dbias, 0, m * (dtype == DType::Float64 ? 8 : dtype == DType::Float32 ? 4 : 2), stream);
    return cudaSuccess;
  }
  const int64_t blocks = row_blocks(N);
  const int64_t rows_per = (N + blocks - 1) / blocks;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = typename Acc<T>::type;
    acc_t* part = static_cast<acc_t*>(workspace);
    dim3 grid(col_blocks(r + m), static_cast<unsigned>(blocks));
    backward_partial_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<T*>(dh), lddh, N, r, static_cast<const T*>(S), scale_dh,
        static_cast<const T*>(xv), ldxv, static_cast<const T*>(dy), dy_s0, dy_s1, m, want_dS,
        want_db, part, rows_per);
    backward_finish_kernel<T><<<col_blocks(r + m), kThreads, 0, stream>>>(
        part, blocks, r, m, static_cast<T*>(dS), static_cast<T*>(dbias));
  });
}

cudaError_t dequantize_panel(DType dtype, cersa::quant::QuantType quant_type, const void* codes,
                             const float* scales, int block_shift, int64_t cols, int64_t row0,
                             int64_t rows_p, int64_t col0, int64_t cols_p, void* dst, int64_t ldd,
                             cudaStream_t stream) {
  const int64_t total = rows_p * cols_p;
  if (total == 0) return cudaSuccess;
  const bool nf4 = quant_type == cersa::quant::QuantType::NF4;
  const unsigned grid =
      static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_panel_kernel<T><<<grid, kThreads, 0, stream>>>(nf4, codes, scales, block_shift,
                                                             cols, row0, rows_p, col0, cols_p,
                                                             static_cast<T*>(dst), ldd);
  });
}

cudaError_t scale_columns(DType dtype, void* a, int64_t lda, int64_t rows, int64_t cols,
                          const void* S, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    dim3 grid(col_blocks(cols), row_grid(rows));
    scale_columns_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<T*>(a), lda, rows, cols,
                                                           static_cast<const T*>(S));
  });
}

}  // namespace cersa_cuda
