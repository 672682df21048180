// C entry points of the emulated CUDA kernels (loaded with ctypes by tests/simt_emulator/build.py) and the
// few CUDA runtime calls the launchers make, answered by the emulator.
#include "simt.h"

#include "launchers.h"

using simt::rt;

cudaError_t cudaGetLastError() {
  const cudaError_t e = rt().last;
  rt().last = cudaSuccess;
  return e;
}
const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? rt().sms : attr == cudaDevAttrComputeCapabilityMajor ? rt().cc_major : 0;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  // An H100 block may opt in to 227 KB of dynamic shared memory.
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;
  rt().max_dynamic_smem[func] = value;
  return cudaSuccess;
}

namespace {
mlkd_fast::CudaDtype dtype_of(int code) {
  return code == 0 ? mlkd_fast::CudaDtype::kFloat : code == 1 ? mlkd_fast::CudaDtype::kHalf : mlkd_fast::CudaDtype::kBFloat16;
}
}  // namespace

extern "C" {

// dtype codes: 0 fp32, 1 fp16, 2 bf16. Every launcher returns its cudaError_t; emulation failures
// (barriers, WMMA operands, __trap) are read with simt_error().
const char* simt_error() { return rt().error.c_str(); }

void simt_configure(int sms, int cc_major, int reverse) {
  rt().sms = sms;
  rt().cc_major = cc_major;
  rt().reverse = reverse != 0;
  rt().error.clear();
  rt().last = cudaSuccess;
}

void simt_kd_kl_split(int64_t n, int64_t c, int64_t* splits_and_span) {
  const mlkd_fast::KdKlSplit s = mlkd_fast::kd_kl_cuda_split(n, c);
  splits_and_span[0] = s.splits;
  splits_and_span[1] = s.span;
}

int simt_kd_kl(int dtype, const void* s, int64_t s_stride, const void* t, int64_t t_stride, const float* row_weight,
               float* rows, void* grad_s, void* grad_t, int64_t n, int64_t c, float temperature, int64_t splits,
               int64_t span, float* partials) {
  mlkd_fast::KdKlArgs a{dtype_of(dtype), s, s_stride, t, t_stride, row_weight, rows, grad_s, grad_t, n, c, temperature};
  a.splits = splits;
  a.span = span;
  a.partials = partials;
  return mlkd_fast::kd_kl_cuda_launch(a, nullptr);
}

int simt_scale_rows(int dtype, const void* x, const float* g, void* out, int64_t n, int64_t c) {
  return mlkd_fast::scale_rows_cuda_launch(dtype_of(dtype), x, g, out, n, c, nullptr);
}

int simt_scale_rows_inplace(int dtype, void* x, int64_t x_stride, const float* g, int64_t n, int64_t c) {
  return mlkd_fast::scale_rows_inplace_cuda_launch(dtype_of(dtype), x, x_stride, g, n, c, nullptr);
}

void simt_correlation_split(int64_t rows, int64_t cols, int64_t ds, int backward, int64_t* splits_and_span) {
  const mlkd_fast::CorrSplit s = mlkd_fast::correlation_cuda_split(rows, cols, ds, backward != 0);
  splits_and_span[0] = s.splits;
  splits_and_span[1] = s.span;
}

int simt_correlation_fused_supported(int dtype) { return mlkd_fast::correlation_cuda_fused_supported(dtype_of(dtype)); }

// features: rows.s, rows.t, cols.s, cols.t; strides likewise; norms: 1/||.|| of the same four; counts: rows.n, cols.n.
static mlkd_fast::CorrArgs corr_args(int dtype, const void* const* features, const int64_t* strides,
                                     const float* const* norms, const int64_t* counts, int64_t ds, int64_t dt,
                                     float inv_tau, int exclude_diagonal) {
  const mlkd_fast::CorrSide rows{features[0], strides[0], features[1], strides[1], norms[0], norms[1], counts[0]};
  const mlkd_fast::CorrSide cols{features[2], strides[2], features[3], strides[3], norms[2], norms[3], counts[1]};
  return mlkd_fast::CorrArgs{dtype_of(dtype), rows, cols, ds, dt, inv_tau, exclude_diagonal != 0};
}

int simt_correlation_fwd(int dtype, const void* const* features, const int64_t* strides, const float* const* norms,
                         const int64_t* counts, int64_t ds, int64_t dt, float inv_tau, int exclude_diagonal, float* loss,
                         float* lse_s, float* lse_t, int64_t col_splits, int64_t col_span, float* partials) {
  mlkd_fast::CorrArgs a = corr_args(dtype, features, strides, norms, counts, ds, dt, inv_tau, exclude_diagonal);
  a.col_splits = col_splits;
  a.col_span = col_span;
  a.partials = partials;
  a.loss = loss;
  a.lse_s_out = lse_s;
  a.lse_t_out = lse_t;
  return mlkd_fast::correlation_fwd_cuda_launch(a, nullptr);
}

int simt_correlation_bwd(int dtype, const void* const* features, const int64_t* strides, const float* const* norms,
                         const int64_t* counts, int64_t ds, int64_t dt, float inv_tau, int exclude_diagonal,
                         const float* lse_s, const float* lse_t, const float* grad, int stats_on_cols,
                         const float* operand_scale, float* d_rows, int64_t d_rows_stride, int64_t col_splits,
                         int64_t col_span, float* partials) {
  mlkd_fast::CorrArgs a = corr_args(dtype, features, strides, norms, counts, ds, dt, inv_tau, exclude_diagonal);
  a.col_splits = col_splits;
  a.col_span = col_span;
  a.partials = partials;
  a.lse_s = lse_s;
  a.lse_t = lse_t;
  a.grad = grad;
  a.stats_on_cols = stats_on_cols != 0;
  a.operand_scale = operand_scale;
  a.d_rows = d_rows;
  a.d_rows_stride = d_rows_stride;
  return mlkd_fast::correlation_bwd_cuda_launch(a, nullptr);
}

}  // extern "C"
