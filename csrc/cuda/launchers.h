// Launchers of the CUDA kernels (the .cu files beside this header) on raw pointers, so that the .cu
// files need no torch headers; glue.cpp turns tensors into these arguments.
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

// Fused correlation KL (correlation_cuda.cu): fp16/bf16 features on tensor cores (sm_80+).
// One side of the similarity tiles: student and teacher features of the same n items.
struct CorrSide {
  const void* s;           // (n, Ds) student features, last stride 1
  int64_t s_stride;
  const void* t;           // (n, Dt) teacher features, last stride 1, same dtype
  int64_t t_stride;
  const float* inv_norm_s;  // (n,) 1 / max(||s_k||, eps)
  const float* inv_norm_t;  // (n,)
  int64_t n;
};

struct CorrArgs {
  CudaDtype dtype;         // kHalf or kBFloat16
  CorrSide rows, cols;     // the tile rows (a block owns 64) and the streamed tile columns
  int64_t ds, dt;
  float inv_tau;
  bool exclude_diagonal;   // entries with row index == column index left out
  // forward: (rows.n,) fp32 outputs l_i, lse^s_i, lse^t_i
  float* loss = nullptr;
  float* lse_s_out = nullptr;
  float* lse_t_out = nullptr;
  // backward: saved statistics and d loss / d l, indexed by the rows (row pass) or by the columns
  // (column pass, stats_on_cols); output d loss / d (normalised row features), (rows.n, Ds) fp32.
  const float* lse_s = nullptr;
  const float* lse_t = nullptr;
  const float* grad = nullptr;
  bool stats_on_cols = false;
  const float* operand_scale = nullptr;  // (1,) power of two keeping the fp16/bf16 operand in range
  float* d_rows = nullptr;
  int64_t d_rows_stride = 0;
  // Column split (correlation_cuda_split): blockIdx.z takes columns [z span, (z + 1) span); the blocks
  // write partials, (splits, rows.n, 5) forward statistics or (splits, rows.n, Ds) backward rows, which
  // a second kernel merges in a fixed order (deterministic).
  int64_t col_splits = 1;
  int64_t col_span = 0;
  float* partials = nullptr;
};

struct CorrSplit {
  int64_t splits, span;
};

// How the correlation launchers cut the columns of (rows x cols) tiles so that few rows still fill the
// GPU; splits == 1: no partials needed.
CorrSplit correlation_cuda_split(int64_t rows, int64_t cols, int64_t ds, bool backward);

// Whether the fused kernels run for this dtype on the current device (fp16/bf16, sm_80 or newer).
bool correlation_cuda_fused_supported(CudaDtype dtype);
cudaError_t correlation_fwd_cuda_launch(const CorrArgs& args, cudaStream_t stream);
cudaError_t correlation_bwd_cuda_launch(const CorrArgs& args, cudaStream_t stream);

}  // namespace mlkd_fast
