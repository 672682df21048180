// Launchers of the CUDA kernels (csrc/*.cu) on raw pointers: the .cu files need no torch headers,
// ops.cpp turns tensors into these arguments and registers the CUDA implementations.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mlkd_fast {

enum class CudaDtype { kFloat, kHalf, kBFloat16 };

struct KdKlArgs {
  CudaDtype dtype;
  const void* student;    // (N, C), last stride 1
  int64_t s_stride;       // elements between rows
  const void* teacher;    // (N, C), last stride 1, same dtype
  int64_t t_stride;
  const float* row_weight;  // (N,) fp32 w_i, or nullptr (all 1)
  float* rows;            // (N,) out: w_i T^2 l_i
  void* grad_student;     // (N, C) contiguous out, w_i d(T^2 l_i)/ds, or nullptr
  void* grad_teacher;     // (N, C) contiguous out, w_i d(T^2 l_i)/dt, or nullptr
  int64_t n, c;
  float temperature;
  int64_t splits = 1;         // blocks per row (kd_kl_cuda_split); > 1 needs partials
  int64_t span = 0;           // columns per block when split
  float* partials = nullptr;  // (N, splits, 5) fp32 workspace when split
};

struct KdKlSplit {
  int64_t splits, span;
};

// How kd_kl_cuda_launch cuts rows for (n, c) on the current device.
KdKlSplit kd_kl_cuda_split(int64_t n, int64_t c);

cudaError_t kd_kl_cuda_launch(const KdKlArgs& args, cudaStream_t stream);
cudaError_t scale_rows_cuda_launch(CudaDtype dtype, const void* x, const float* g, void* out, int64_t n, int64_t c,
                                   cudaStream_t stream);
// x[i, :] *= g[i] in place, rows with g[i] == 1 untouched (read N floats when all are 1).
cudaError_t scale_rows_inplace_cuda_launch(CudaDtype dtype, void* x, int64_t x_stride, const float* g, int64_t n,
                                           int64_t c, cudaStream_t stream);

}  // namespace mlkd_fast
