// CUDA kernels of the temperature KL (docs/design.md §1.1): plain launchers on raw pointers, so that this
// file needs only the CUDA headers (fast to compile); glue.cpp wraps them as the CUDA implementation of
// mlkd_fast::kd_kl and mlkd_fast::scale_rows.
//
// One block per row (or, for few long rows, a row split over blocks; see kd_kl_partials_kernel).
// v = s / T, u = t / T.
//   pass 1 (online, per thread, then merged across the block):
//     m_s = max v, Z_s = sum e^(v - m_s);  m_t = max u, Z_t = sum e^(u - m_t),
//     A = sum e^(u - m_t) (u - v)   (rescaled by e^(m_old - m_new) whenever a maximum grows)
//   l = A / Z_t + (m_s - m_t) + (log Z_s - log Z_t)                       (KL(p || q) of the row)
//   pass 2: d(T^2 l)/ds = T (q - p);  d(T^2 l)/dt = T p ((u - v) + (m_s + log Z_s) - (m_t + log Z_t) - l)
// Bytes per element: pass 1 reads s and t; pass 2 reads them again (mostly from L2: the block has
// just read the row) and writes the gradient(s). 16-byte vector loads when the rows are aligned.
// -inf teacher entries have p = 0 and add nothing (never 0 * inf); NaN reaches the sums, so the loss.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../common.h"
#include "launchers.h"

namespace mlkd_fast {
namespace {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

struct RowStats {
  float m_s, z_s, m_t, z_t, a;
};

__device__ __forceinline__ float rescale(float m_old, float m_new) {
  return m_old == kNegInf ? 0.0f : __expf(m_old - m_new);  // an empty partial contributes nothing
}

__device__ __forceinline__ void add_element(RowStats& st, float v, float u) {
  if (v > st.m_s) {
    st.z_s = st.z_s * rescale(st.m_s, v) + 1.0f;
    st.m_s = v;
  } else if (v != kNegInf) {
    st.z_s += __expf(v - st.m_s);  // NaN v lands here and poisons Z_s
  }
  if (u > st.m_t) {
    const float r = rescale(st.m_t, u);
    st.z_t = st.z_t * r + 1.0f;
    st.a = st.a * r + (u - v);
    st.m_t = u;
  } else if (u != kNegInf) {
    const float e = __expf(u - st.m_t);
    st.z_t += e;
    st.a += e * (u - v);
  }
}

__device__ __forceinline__ RowStats merge(const RowStats& x, const RowStats& y) {
  // rescale() of an empty partial (max -inf) is 0, never e^(-inf + inf); a NaN sum stays NaN (NaN * 0).
  RowStats r;
  r.m_s = fmaxf(x.m_s, y.m_s);
  r.z_s = x.z_s * rescale(x.m_s, r.m_s) + y.z_s * rescale(y.m_s, r.m_s);
  r.m_t = fmaxf(x.m_t, y.m_t);
  const float fx = rescale(x.m_t, r.m_t), fy = rescale(y.m_t, r.m_t);
  r.z_t = x.z_t * fx + y.z_t * fy;
  r.a = x.a * fx + y.a * fy;
  return r;
}

__device__ __forceinline__ RowStats shfl_down(const RowStats& s, int offset) {
  RowStats r;
  r.m_s = __shfl_down_sync(0xffffffffu, s.m_s, offset);
  r.z_s = __shfl_down_sync(0xffffffffu, s.z_s, offset);
  r.m_t = __shfl_down_sync(0xffffffffu, s.m_t, offset);
  r.z_t = __shfl_down_sync(0xffffffffu, s.z_t, offset);
  r.a = __shfl_down_sync(0xffffffffu, s.a, offset);
  return r;
}

// Merges every thread's partial stats; the result is returned to all threads.
template <int kThreads>
__device__ RowStats block_merge(RowStats st) {
  __shared__ RowStats warp_stats[kThreads / 32];
  __shared__ RowStats total;
  for (int offset = 16; offset > 0; offset >>= 1) st = merge(st, shfl_down(st, offset));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kThreads / 32 ? warp_stats[lane] : RowStats{kNegInf, 0.0f, kNegInf, 0.0f, 0.0f};
    for (int offset = 16; offset > 0; offset >>= 1) st = merge(st, shfl_down(st, offset));
    if (lane == 0) total = st;
  }
  __syncthreads();
  return total;
}

// kVec elements of T in 16 bytes (or 1 element when the rows are not 16-byte aligned).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T x[kVec];
};

// Stats of packs [p0, p1) of one row, merged across the block (every thread gets them).
template <typename T, int kVec, int kThreads>
__device__ __forceinline__ RowStats span_stats(const T* __restrict__ sr, const T* __restrict__ tr, int64_t p0,
                                               int64_t p1, float inv_t) {
  RowStats st{kNegInf, 0.0f, kNegInf, 0.0f, 0.0f};
  for (int64_t p = p0 + threadIdx.x; p < p1; p += kThreads) {
    const Pack<T, kVec> ps = reinterpret_cast<const Pack<T, kVec>*>(sr)[p];
    const Pack<T, kVec> pt = reinterpret_cast<const Pack<T, kVec>*>(tr)[p];
#pragma unroll
    for (int k = 0; k < kVec; ++k) add_element(st, to_float(ps.x[k]) * inv_t, to_float(pt.x[k]) * inv_t);
  }
  return block_merge<kThreads>(st);
}

struct RowResult {
  float kl, lse_s, lse_t;
};

__device__ __forceinline__ RowResult finish(const RowStats& st) {
  const float m_s = st.m_s == kNegInf ? 0.0f : st.m_s;  // an all -inf row: keep the arithmetic finite
  const float m_t = st.m_t == kNegInf ? 0.0f : st.m_t;
  const float log_z_s = __logf(st.z_s), log_z_t = __logf(st.z_t);
  return {st.a / st.z_t + (m_s - m_t) + (log_z_s - log_z_t), m_s + log_z_s, m_t + log_z_t};
}

// Pass 2 over packs [p0, p1): p = e^(u - lse_t), q = e^(v - lse_s); scale = T * w_i. `reverse` walks
// the span last packs first: right after pass 1 over the same span those are the likeliest in L2.
template <typename T, int kVec, int kThreads>
__device__ __forceinline__ void span_grads(const T* __restrict__ sr, const T* __restrict__ tr, T* gs_row, T* gt_row,
                                           int64_t p0, int64_t p1, float inv_t, const RowResult& r, float scale,
                                           bool reverse) {
  const float offset = r.lse_s - r.lse_t - r.kl;
  for (int64_t i = p0 + threadIdx.x; i < p1; i += kThreads) {
    const int64_t p = reverse ? p1 - 1 - (i - p0) : i;
    const Pack<T, kVec> ps = reinterpret_cast<const Pack<T, kVec>*>(sr)[p];
    const Pack<T, kVec> pt = reinterpret_cast<const Pack<T, kVec>*>(tr)[p];
    Pack<T, kVec> out_s, out_t;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float v = to_float(ps.x[k]) * inv_t, u = to_float(pt.x[k]) * inv_t;
      const float prob_t = u == kNegInf ? 0.0f : __expf(u - r.lse_t);
      const float prob_s = __expf(v - r.lse_s);
      out_s.x[k] = from_float<T>(scale * (prob_s - prob_t));
      out_t.x[k] = from_float<T>(u == kNegInf ? 0.0f : scale * prob_t * ((u - v) + offset));
    }
    if (gs_row != nullptr) reinterpret_cast<Pack<T, kVec>*>(gs_row)[p] = out_s;
    if (gt_row != nullptr) reinterpret_cast<Pack<T, kVec>*>(gt_row)[p] = out_t;
  }
}

// Weight 0 (a masked row): zero gradients over packs [p0, p1), whatever the row holds.
template <typename T, int kVec, int kThreads>
__device__ __forceinline__ void span_zero(T* gs_row, T* gt_row, int64_t p0, int64_t p1) {
  Pack<T, kVec> zero;
#pragma unroll
  for (int k = 0; k < kVec; ++k) zero.x[k] = from_float<T>(0.0f);
  for (int64_t p = p0 + threadIdx.x; p < p1; p += kThreads) {
    if (gs_row != nullptr) reinterpret_cast<Pack<T, kVec>*>(gs_row)[p] = zero;
    if (gt_row != nullptr) reinterpret_cast<Pack<T, kVec>*>(gt_row)[p] = zero;
  }
}

// One block per row: stats, loss row, gradients (the row is re-read mostly from L2, last packs first).
template <typename T, int kVec, int kThreads>
__global__ void __launch_bounds__(kThreads) kd_kl_rows_kernel(
    const T* __restrict__ s, int64_t s_stride,   // (N, C) student logits, last stride 1
    const T* __restrict__ t, int64_t t_stride,   // (N, C) teacher logits
    const float* __restrict__ weight,            // (N,) row weights w_i, or null (all 1)
    float* __restrict__ rows,                    // (N,) w_i T^2 l_i
    T* __restrict__ grad_s, T* __restrict__ grad_t,  // (N, C) contiguous, or null
    int64_t c, float temperature) {
  const int64_t row = blockIdx.x;
  const T* sr = s + row * s_stride;
  const T* tr = t + row * t_stride;
  const float inv_t = 1.0f / temperature;
  const float keep = weight == nullptr ? 1.0f : weight[row];
  const int64_t packs = c / kVec;
  T* gs_row = grad_s == nullptr ? nullptr : grad_s + row * c;
  T* gt_row = grad_t == nullptr ? nullptr : grad_t + row * c;
  if (keep == 0.0f) {  // uniform across the block
    if (threadIdx.x == 0) rows[row] = 0.0f;
    span_zero<T, kVec, kThreads>(gs_row, gt_row, 0, packs);
    return;
  }
  const RowResult r = finish(span_stats<T, kVec, kThreads>(sr, tr, 0, packs, inv_t));
  if (threadIdx.x == 0) rows[row] = r.kl * temperature * temperature * keep;
  if (gs_row == nullptr && gt_row == nullptr) return;
  span_grads<T, kVec, kThreads>(sr, tr, gs_row, gt_row, 0, packs, inv_t, r, temperature * keep, /*reverse=*/true);
}

// Few rows, long rows: each row split over `splits` blocks of `span` columns (a multiple of 16, so of
// kVec). Kernel 1 writes each span's stats to partials (N, splits, 5); kernel 2 merges a row's
// partials in every block (splits is small), then writes the loss row (split 0) and its span's
// gradients. Bytes per element as in the one-block path; the row is re-read from HBM or L2.
template <typename T, int kVec, int kThreads>
__global__ void __launch_bounds__(kThreads) kd_kl_partials_kernel(
    const T* __restrict__ s, int64_t s_stride, const T* __restrict__ t, int64_t t_stride,
    float* __restrict__ partials, int64_t c, int64_t span, float temperature) {
  const int64_t row = blockIdx.y, split = blockIdx.x;
  const int64_t packs = c / kVec, p0 = split * span / kVec, p1 = min(packs, (split + 1) * span / kVec);
  const RowStats st = span_stats<T, kVec, kThreads>(s + row * s_stride, t + row * t_stride, p0, p1,
                                                    1.0f / temperature);
  if (threadIdx.x == 0) {
    float* out = partials + (row * gridDim.x + split) * 5;
    out[0] = st.m_s, out[1] = st.z_s, out[2] = st.m_t, out[3] = st.z_t, out[4] = st.a;
  }
}

template <typename T, int kVec, int kThreads>
__global__ void __launch_bounds__(kThreads) kd_kl_split_grads_kernel(
    const T* __restrict__ s, int64_t s_stride, const T* __restrict__ t, int64_t t_stride,
    const float* __restrict__ weight, const float* __restrict__ partials, float* __restrict__ rows,
    T* __restrict__ grad_s, T* __restrict__ grad_t, int64_t c, int64_t span, float temperature) {
  const int64_t row = blockIdx.y, split = blockIdx.x;
  const int64_t packs = c / kVec, p0 = split * span / kVec, p1 = min(packs, (split + 1) * span / kVec);
  T* gs_row = grad_s == nullptr ? nullptr : grad_s + row * c;
  T* gt_row = grad_t == nullptr ? nullptr : grad_t + row * c;
  const float keep = weight == nullptr ? 1.0f : weight[row];
  if (keep == 0.0f) {
    if (split == 0 && threadIdx.x == 0) rows[row] = 0.0f;
    span_zero<T, kVec, kThreads>(gs_row, gt_row, p0, p1);
    return;
  }
  RowStats st{kNegInf, 0.0f, kNegInf, 0.0f, 0.0f};
  for (unsigned k = 0; k < gridDim.x; ++k) {
    const float* in = partials + (row * gridDim.x + k) * 5;
    st = merge(st, RowStats{in[0], in[1], in[2], in[3], in[4]});
  }
  const RowResult r = finish(st);
  if (split == 0 && threadIdx.x == 0) rows[row] = r.kl * temperature * temperature * keep;
  if (gs_row == nullptr && gt_row == nullptr) return;
  span_grads<T, kVec, kThreads>(s + row * s_stride, t + row * t_stride, gs_row, gt_row, p0, p1, 1.0f / temperature,
                                r, temperature * keep, /*reverse=*/false);
}

template <typename T>
__global__ void scale_rows_kernel(const T* __restrict__ x, const float* __restrict__ g, T* __restrict__ out,
                                  int64_t numel, int64_t c) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = from_float<T>(to_float(x[i]) * g[i / c]);
}

template <typename T>
__global__ void scale_rows_inplace_kernel(T* __restrict__ x, int64_t x_stride, const float* __restrict__ g, int64_t n,
                                          int64_t c) {
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const float gi = g[row];
    if (gi == 1.0f) continue;  // the same for the whole block: no divergence
    T* xr = x + row * x_stride;
    for (int64_t j = threadIdx.x; j < c; j += blockDim.x) xr[j] = from_float<T>(to_float(xr[j]) * gi);
  }
}

template <typename T, int kVec>
void launch_rows(const KdKlArgs& a, cudaStream_t stream) {
  const T* s = static_cast<const T*>(a.student);
  const T* t = static_cast<const T*>(a.teacher);
  T* gs = static_cast<T*>(a.grad_student);
  T* gt = static_cast<T*>(a.grad_teacher);
  if (a.splits > 1) {  // rows of >= 16384 columns (kd_kl_cuda_splits): 1024 threads
    const dim3 grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(a.n));
    kd_kl_partials_kernel<T, kVec, 1024><<<grid, 1024, 0, stream>>>(s, a.s_stride, t, a.t_stride, a.partials, a.c,
                                                                    a.span, a.temperature);
    kd_kl_split_grads_kernel<T, kVec, 1024><<<grid, 1024, 0, stream>>>(s, a.s_stride, t, a.t_stride, a.row_weight,
                                                                       a.partials, a.rows, gs, gt, a.c, a.span,
                                                                       a.temperature);
    return;
  }
  const dim3 grid(static_cast<unsigned>(a.n));
  if (a.c >= 16384) {
    kd_kl_rows_kernel<T, kVec, 1024><<<grid, 1024, 0, stream>>>(s, a.s_stride, t, a.t_stride, a.row_weight, a.rows, gs, gt,
                                                                a.c, a.temperature);
  } else if (a.c >= 2048) {
    kd_kl_rows_kernel<T, kVec, 512><<<grid, 512, 0, stream>>>(s, a.s_stride, t, a.t_stride, a.row_weight, a.rows, gs, gt,
                                                              a.c, a.temperature);
  } else {
    kd_kl_rows_kernel<T, kVec, 128><<<grid, 128, 0, stream>>>(s, a.s_stride, t, a.t_stride, a.row_weight, a.rows, gs, gt,
                                                              a.c, a.temperature);
  }
}

template <typename T>
void launch_typed(const KdKlArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  auto aligned = [&](const void* p, int64_t stride) {
    return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16 == 0 && (stride * sizeof(T)) % 16 == 0);
  };
  const bool vector_ok = a.c % kVec == 0 && aligned(a.student, a.s_stride) && aligned(a.teacher, a.t_stride) &&
                         aligned(a.grad_student, a.c) && aligned(a.grad_teacher, a.c);
  if (vector_ok)
    launch_rows<T, kVec>(a, stream);
  else
    launch_rows<T, 1>(a, stream);
}

}  // namespace

KdKlSplit kd_kl_cuda_split(int64_t n, int64_t c) {
  // One block per row keeps every SM busy once there are a few rows per SM; below that, long rows
  // are cut into spans of >= 8192 columns so that about two blocks per SM run.
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (c < 16384 || n >= 2 * sms || n > 65535) return {1, c};
  const int64_t splits = std::min<int64_t>((c + 8191) / 8192, (2 * sms + n - 1) / n);
  if (splits <= 1) return {1, c};
  const int64_t span = ((c + splits - 1) / splits + 15) / 16 * 16;
  return {(c + span - 1) / span, span};
}

cudaError_t kd_kl_cuda_launch(const KdKlArgs& args, cudaStream_t stream) {
  if (args.n == 0) return cudaSuccess;
  switch (args.dtype) {
    case CudaDtype::kFloat: launch_typed<float>(args, stream); break;
    case CudaDtype::kHalf: launch_typed<__half>(args, stream); break;
    case CudaDtype::kBFloat16: launch_typed<__nv_bfloat16>(args, stream); break;
  }
  return cudaGetLastError();
}

cudaError_t scale_rows_cuda_launch(CudaDtype dtype, const void* x, const float* g, void* out, int64_t n, int64_t c,
                                   cudaStream_t stream) {
  const int64_t numel = n * c;
  if (numel == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (numel + threads - 1) / threads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 32 ? blocks : 65535 * 32);
  switch (dtype) {
    case CudaDtype::kFloat:
      scale_rows_kernel<float><<<grid, threads, 0, stream>>>(static_cast<const float*>(x), g, static_cast<float*>(out), numel, c);
      break;
    case CudaDtype::kHalf:
      scale_rows_kernel<__half><<<grid, threads, 0, stream>>>(static_cast<const __half*>(x), g, static_cast<__half*>(out), numel, c);
      break;
    case CudaDtype::kBFloat16:
      scale_rows_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), g,
                                                                     static_cast<__nv_bfloat16*>(out), numel, c);
      break;
  }
  return cudaGetLastError();
}

cudaError_t scale_rows_inplace_cuda_launch(CudaDtype dtype, void* x, int64_t x_stride, const float* g, int64_t n,
                                           int64_t c, cudaStream_t stream) {
  if (n == 0 || c == 0) return cudaSuccess;
  const int threads = c >= 1024 ? 256 : 128;
  const unsigned grid = static_cast<unsigned>(n < 65535 * 4 ? n : 65535 * 4);
  switch (dtype) {
    case CudaDtype::kFloat:
      scale_rows_inplace_kernel<float><<<grid, threads, 0, stream>>>(static_cast<float*>(x), x_stride, g, n, c);
      break;
    case CudaDtype::kHalf:
      scale_rows_inplace_kernel<__half><<<grid, threads, 0, stream>>>(static_cast<__half*>(x), x_stride, g, n, c);
      break;
    case CudaDtype::kBFloat16:
      scale_rows_inplace_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(static_cast<__nv_bfloat16*>(x), x_stride, g,
                                                                             n, c);
      break;
  }
  return cudaGetLastError();
}

}  // namespace mlkd_fast
