// Fused batch-correlation KL (docs/design.md §1.2) on tensor cores for fp16/bf16 features (WMMA, sm_80+):
// the CUDA implementation of mlkd_fast::correlation_fwd / correlation_bwd behind glue.cpp (fp32 features
// take the tiled cuBLAS path of cpu/correlation.cpp).
//
// x_kl = (a_k . b_l) r^a_k r^b_l / tau for the student (s) and the teacher (t), r = 1 / max(||.||, eps).
// A block owns 64 tile rows and streams tiles of 64 columns. For each tile:
//   S = A B^T over K chunks of 32 (16x16x16 WMMA, fp32 accumulators), scaled by the inverse norms and
//   1/tau in fp32 shared memory; the same for the teacher over its own Dt.
//   forward: per row the online max and sum of both and A = sum e^(x^t - m^t) (x^t - x^s), rescaled when a
//     maximum grows (kernels/correlation.py has the same loop); stores l = A/Z^t - lse^t + lse^s, lse^s, lse^t.
//   backward: W_kl = (Q - P)_kl f_l S in the input dtype, out_k += sum_l W_kl s_l (raw student features of
//     the tile's columns) on tensor cores, out_k *= h_k / S at the end, where
//       row pass    (rows a, columns b, statistics of row k):    f_l = r^b_l,          h_k = g_k / tau
//       column pass (rows b, columns a, statistics of column l): f_l = g_l r^a_l / tau, h_k = 1
//     gives d loss / d a^ and d loss / d b^ (glue.cpp finishes the normalisation backward). S is a power of
//     two (glue.cpp) making max |f| S ~ min(count, 1024): (Q - P) f is ~f / count and underflows fp16 unscaled.
// Few rows (e.g. 4096: 64 row blocks on 132 SMs) would leave the GPU idle: correlation_cuda_split then
// cuts the columns into blockIdx.z spans of >= 256; each block writes partial statistics (forward) or
// partial output rows (backward), merged by a second small kernel in a fixed order.
// Traffic per block and column tile: 64 (Ds + Dt) feature elements (plus 64 Ds in the backward), read
// from L2 after the first block; extra memory O(M + N): norms and statistics. Work per tile element:
// 2 (Ds + Dt) tensor-core flops (+ 2 Ds backward) and two exps.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>

#include "../common.h"
#include "launchers.h"

namespace mlkd_fast {
namespace {

using namespace nvcuda;

constexpr int kBlockRows = 64;   // tile rows per block: 16 per warp
constexpr int kBlockCols = 64;   // tile columns per step
constexpr int kThreads = 128;
constexpr int kChunk = 32;       // K (feature) chunk of the similarity matmuls
constexpr int kStageLd = kChunk + 8;       // padded rows (elements) of the staged features
constexpr int kTileLd = kBlockCols + 4;    // fp32 similarity tiles
constexpr int kWLd = kBlockCols + 8;       // backward operand W
constexpr int kPiece = 64;                 // output features per backward matmul step
constexpr int kPieceLd = kPiece + 8;
constexpr int64_t kMinSplitCols = 256;     // columns per split at least: the partials stay cheap

// Shared memory (bytes; every region 128-byte aligned, WMMA needs 32).
constexpr int kStageBytes = 2 * kBlockRows * kStageLd * 2;        // staged row and column chunks
constexpr int kTileBytes = kBlockRows * kTileLd * 4;               // one fp32 similarity tile
constexpr int kWBytes = kBlockRows * kWLd * 2;
constexpr int kFwdSmem = kStageBytes + 2 * kTileBytes;
constexpr int kBwdSmem = kFwdSmem + kWBytes;
static_assert(kBlockCols * kPieceLd * 2 <= kStageBytes, "the backward feature piece reuses the stage");
static_assert(kStageBytes % 128 == 0 && kTileBytes % 128 == 0, "regions stay aligned");

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// dst[r, k] = src[row0 + r, k0 + k] for r < 64, k < width, zero outside (n, d). 16-byte loads when
// every row start is 16-byte aligned and d is a multiple of 8 (vec).
template <typename T>
__device__ __forceinline__ void stage_rows(T* dst, int ld, const T* src, int64_t stride, int64_t row0, int64_t n,
                                           int64_t k0, int64_t d, int width, bool vec) {
  if (vec) {
    const int per_row = width / 8;
    for (int v = threadIdx.x; v < kBlockRows * per_row; v += kThreads) {
      const int r = v / per_row, k = (v % per_row) * 8;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (row0 + r < n && k0 + k < d) val = *reinterpret_cast<const uint4*>(src + (row0 + r) * stride + k0 + k);
      *reinterpret_cast<uint4*>(dst + r * ld + k) = val;
    }
  } else {
    for (int e = threadIdx.x; e < kBlockRows * width; e += kThreads) {
      const int r = e / width, k = e % width;
      T val = from_float<T>(0.0f);
      if (row0 + r < n && k0 + k < d) val = src[(row0 + r) * stride + k0 + k];
      dst[r * ld + k] = val;
    }
  }
}

// tile[r, c] = a_{row0 + r} . b_{col0 + c} (raw dot products, fp32); each warp writes its 16 rows.
// Ends with the block synchronised after its last use of the stage.
template <typename T>
__device__ void dot_tile(float* tile, T* stage, const T* a, int64_t a_stride, int64_t row0, int64_t a_n, const T* b,
                         int64_t b_stride, int64_t col0, int64_t b_n, int64_t d, bool vec) {
  const int warp = threadIdx.x / 32;
  T* stage_a = stage;
  T* stage_b = stage + kBlockRows * kStageLd;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
  for (int f = 0; f < 4; ++f) wmma::fill_fragment(acc[f], 0.0f);
  for (int64_t k0 = 0; k0 < d; k0 += kChunk) {
    stage_rows(stage_a, kStageLd, a, a_stride, row0, a_n, k0, d, kChunk, vec);
    stage_rows(stage_b, kStageLd, b, b_stride, col0, b_n, k0, d, kChunk, vec);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kChunk; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, stage_a + warp * 16 * kStageLd + kk, kStageLd);
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        // B^T as a col-major 16 x 16 operand: element (k, c) sits at stage_b[c * ld + k].
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, stage_b + f * 16 * kStageLd + kk, kStageLd);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < 4; ++f)
    wmma::store_matrix_sync(tile + warp * 16 * kTileLd + f * 16, acc[f], kTileLd, wmma::mem_row_major);
}

// A lane's place in the element sweeps: row `local` of the block (the warp's own 16 rows, so the
// warp needs no block barrier), the half of the 64 columns it covers, and a column rotation that
// spreads the 32 lanes over all 32 shared-memory banks (row stride 68 floats: bank 5 r + 16 h + j).
struct Lane {
  int local, half, rot;
  __device__ Lane() {
    const int lane = threadIdx.x % 32;
    local = (threadIdx.x / 32) * 16 + (lane & 15);
    half = lane >> 4;
    rot = (local + half * 16) & 31;
  }
  __device__ int col(int j) const { return half * 32 + ((j + rot) & 31); }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 3) corr_fwd_kernel(CorrArgs args, bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80; correlation_cuda_fused_supported keeps older GPUs on the tiled path
#else
  extern __shared__ __align__(128) unsigned char smem[];
  T* stage = reinterpret_cast<T*>(smem);
  float* tile_s = reinterpret_cast<float*>(smem + kStageBytes);
  float* tile_t = reinterpret_cast<float*>(smem + kStageBytes + kTileBytes);
  const CorrSide& R = args.rows;
  const CorrSide& C = args.cols;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const Lane ln;
  const int64_t row = row0 + ln.local;
  const bool row_ok = row < R.n;
  const float ra_s = row_ok ? R.inv_norm_s[row] * args.inv_tau : 0.0f;
  const float ra_t = row_ok ? R.inv_norm_t[row] * args.inv_tau : 0.0f;
  float m_s = kNegInf, z_s = 0.0f, m_t = kNegInf, z_t = 0.0f, acc = 0.0f;
  const int64_t col_begin = static_cast<int64_t>(blockIdx.z) * args.col_span;
  const int64_t col_end = min(C.n, col_begin + args.col_span);
  for (int64_t col0 = col_begin; col0 < col_end; col0 += kBlockCols) {
    dot_tile(tile_s, stage, static_cast<const T*>(R.s), R.s_stride, row0, R.n, static_cast<const T*>(C.s), C.s_stride,
             col0, C.n, args.ds, vec);
    dot_tile(tile_t, stage, static_cast<const T*>(R.t), R.t_stride, row0, R.n, static_cast<const T*>(C.t), C.t_stride,
             col0, C.n, args.dt, vec);
    __syncwarp();
    // Sweep 1: scaled, masked logits back into the tiles; tile maxima.
    float tmax_s = kNegInf, tmax_t = kNegInf;
#pragma unroll 4
    for (int j = 0; j < 32; ++j) {
      const int c = ln.col(j);
      const int64_t col = col0 + c;
      float* ps = tile_s + ln.local * kTileLd + c;
      float* pt = tile_t + ln.local * kTileLd + c;
      float xs = kNegInf, xt = kNegInf;
      if (col < C.n && !(args.exclude_diagonal && col == row)) {
        xs = *ps * ra_s * C.inv_norm_s[col];
        xt = *pt * ra_t * C.inv_norm_t[col];
      }
      *ps = xs;
      *pt = xt;
      tmax_s = fmaxf(tmax_s, xs);
      tmax_t = fmaxf(tmax_t, xt);
    }
    tmax_s = fmaxf(tmax_s, __shfl_xor_sync(0xffffffffu, tmax_s, 16));
    tmax_t = fmaxf(tmax_t, __shfl_xor_sync(0xffffffffu, tmax_t, 16));
    const float new_m_s = fmaxf(m_s, tmax_s), new_m_t = fmaxf(m_t, tmax_t);
    const float ref_s = new_m_s == kNegInf ? 0.0f : new_m_s;
    const float ref_t = new_m_t == kNegInf ? 0.0f : new_m_t;
    // Sweep 2: sums against the new maxima (NaN logits reach them, so the loss).
    float sum_s = 0.0f, sum_t = 0.0f, sum_a = 0.0f;
#pragma unroll 4
    for (int j = 0; j < 32; ++j) {
      const int c = ln.col(j);
      const float xs = tile_s[ln.local * kTileLd + c];
      const float xt = tile_t[ln.local * kTileLd + c];
      const float e_t = __expf(xt - ref_t);
      sum_s += __expf(xs - ref_s);
      sum_t += e_t;
      if (xt != kNegInf) sum_a += e_t * (xt - xs);
    }
    sum_s += __shfl_xor_sync(0xffffffffu, sum_s, 16);
    sum_t += __shfl_xor_sync(0xffffffffu, sum_t, 16);
    sum_a += __shfl_xor_sync(0xffffffffu, sum_a, 16);
    const float rescale_t = __expf(m_t - ref_t);
    z_s = z_s * __expf(m_s - ref_s) + sum_s;
    z_t = z_t * rescale_t + sum_t;
    acc = acc * rescale_t + sum_a;
    m_s = new_m_s;
    m_t = new_m_t;
    __syncwarp();  // the next tile's stores overwrite what this warp just read
  }
  if (row_ok && ln.half == 0) {
    if (args.col_splits > 1) {
      float* part = args.partials + (static_cast<int64_t>(blockIdx.z) * R.n + row) * 5;
      part[0] = m_s, part[1] = z_s, part[2] = m_t, part[3] = z_t, part[4] = acc;
    } else {
      const float lse_s = m_s + __logf(z_s), lse_t = m_t + __logf(z_t);
      args.loss[row] = acc / z_t - lse_t + lse_s;
      args.lse_s_out[row] = lse_s;
      args.lse_t_out[row] = lse_t;
    }
  }
#endif
}

// One thread per row: the column splits' statistics (m^s, Z^s, m^t, Z^t, A) merged against the
// overall maxima, then the loss row and both log-sum-exps.
__global__ void corr_fwd_merge_kernel(CorrArgs args) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = args.rows.n;
  if (row >= n) return;
  float m_s = kNegInf, m_t = kNegInf;
  for (int64_t z = 0; z < args.col_splits; ++z) {
    const float* part = args.partials + (z * n + row) * 5;
    m_s = fmaxf(m_s, part[0]);
    m_t = fmaxf(m_t, part[2]);
  }
  const float ref_s = m_s == kNegInf ? 0.0f : m_s, ref_t = m_t == kNegInf ? 0.0f : m_t;
  float z_s = 0.0f, z_t = 0.0f, acc = 0.0f;
  for (int64_t z = 0; z < args.col_splits; ++z) {
    const float* part = args.partials + (z * n + row) * 5;
    const float r_t = __expf(part[2] - ref_t);
    z_s += part[1] * __expf(part[0] - ref_s);
    z_t += part[3] * r_t;
    acc += part[4] * r_t;
  }
  const float lse_s = ref_s + __logf(z_s), lse_t = ref_t + __logf(z_t);
  args.loss[row] = acc / z_t - lse_t + lse_s;
  args.lse_s_out[row] = lse_s;
  args.lse_t_out[row] = lse_t;
}

// NF 16-wide output fragments per warp: the block computes output features [blockIdx.y * 16 NF, + 16 NF).
template <typename T, int NF>
__global__ void __launch_bounds__(kThreads) corr_bwd_kernel(CorrArgs args, bool vec) {
  static_assert(NF % 4 == 0, "the output is swept in pieces of 64 features");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  extern __shared__ __align__(128) unsigned char smem[];
  T* stage = reinterpret_cast<T*>(smem);
  T* piece = stage;  // the column features of one output piece, after the similarity tiles are done
  float* tile_s = reinterpret_cast<float*>(smem + kStageBytes);
  float* tile_t = reinterpret_cast<float*>(smem + kStageBytes + kTileBytes);
  T* w_tile = reinterpret_cast<T*>(smem + kFwdSmem);
  const CorrSide& R = args.rows;
  const CorrSide& C = args.cols;
  const int warp = threadIdx.x / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * 16 * NF;
  const Lane ln;
  const int64_t row = row0 + ln.local;
  const bool row_ok = row < R.n;
  const float ra_s = row_ok ? R.inv_norm_s[row] * args.inv_tau : 0.0f;
  const float ra_t = row_ok ? R.inv_norm_t[row] * args.inv_tau : 0.0f;
  const bool per_row = !args.stats_on_cols;
  const float row_lse_s = per_row && row_ok ? args.lse_s[row] : 0.0f;
  const float row_lse_t = per_row && row_ok ? args.lse_t[row] : 0.0f;
  const float scale = *args.operand_scale;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> out[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::fill_fragment(out[f], 0.0f);

  const int64_t col_begin = static_cast<int64_t>(blockIdx.z) * args.col_span;
  const int64_t col_end = min(C.n, col_begin + args.col_span);
  for (int64_t col0 = col_begin; col0 < col_end; col0 += kBlockCols) {
    dot_tile(tile_s, stage, static_cast<const T*>(R.s), R.s_stride, row0, R.n, static_cast<const T*>(C.s), C.s_stride,
             col0, C.n, args.ds, vec);
    dot_tile(tile_t, stage, static_cast<const T*>(R.t), R.t_stride, row0, R.n, static_cast<const T*>(C.t), C.t_stride,
             col0, C.n, args.dt, vec);
    __syncwarp();
#pragma unroll 4
    for (int j = 0; j < 32; ++j) {
      const int c = ln.col(j);
      const int64_t col = col0 + c;
      float w = 0.0f;
      if (row_ok && col < C.n && !(args.exclude_diagonal && col == row)) {
        const float rb_s = C.inv_norm_s[col];
        const float xs = tile_s[ln.local * kTileLd + c] * ra_s * rb_s;
        const float xt = tile_t[ln.local * kTileLd + c] * ra_t * C.inv_norm_t[col];
        const float lse_s = per_row ? row_lse_s : args.lse_s[col];
        const float lse_t = per_row ? row_lse_t : args.lse_t[col];
        const float f = per_row ? rb_s : args.grad[col] * rb_s * args.inv_tau;
        w = (__expf(xs - lse_s) - __expf(xt - lse_t)) * f * scale;
      }
      w_tile[ln.local * kWLd + c] = from_float<T>(w);
    }
    __syncwarp();
    // out[16 rows of this warp, d0 + 64 p + 16 f ...] += W[rows, 64 columns] . s[columns, features]
#pragma unroll
    for (int p = 0; p < NF / 4; ++p) {
      stage_rows(piece, kPieceLd, static_cast<const T*>(C.s), C.s_stride, col0, C.n, d0 + p * kPiece, args.ds, kPiece,
                 vec);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBlockCols; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, w_tile + warp * 16 * kWLd + kk, kWLd);
#pragma unroll
        for (int f = 0; f < 4; ++f) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, piece + kk * kPieceLd + f * 16, kPieceLd);
          wmma::mma_sync(out[p * 4 + f], fa, fb, out[p * 4 + f]);
        }
      }
      __syncthreads();  // the stage is reloaded next
    }
  }
  // Epilogue: each 16 x 64 piece through this warp's rows of tile_s, times h_k / S, to global memory
  // (to this split's partial rows when the columns are split).
  const bool split = args.col_splits > 1;
  float* dst = split ? args.partials + static_cast<int64_t>(blockIdx.z) * R.n * args.ds : args.d_rows;
  const int64_t dst_stride = split ? args.ds : args.d_rows_stride;
  float* mine = tile_s + warp * 16 * kTileLd;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int p = 0; p < NF / 4; ++p) {
#pragma unroll
    for (int f = 0; f < 4; ++f) wmma::store_matrix_sync(mine + f * 16, out[p * 4 + f], kTileLd, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 16 * kPiece; e += 32) {
      const int r = e / kPiece, c = e % kPiece;
      const int64_t k = row0 + warp * 16 + r, d = d0 + p * kPiece + c;
      if (k < R.n && d < args.ds) {
        const float h = per_row ? args.grad[k] * args.inv_tau : 1.0f;
        dst[k * dst_stride + d] = mine[r * kTileLd + c] * (h / scale);
      }
    }
    __syncwarp();
  }
#endif
}

// d_rows = the sum of the column splits' partial rows, in split order.
__global__ void corr_bwd_reduce_kernel(CorrArgs args) {
  const int64_t total = args.rows.n * args.ds;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int64_t z = 0; z < args.col_splits; ++z) sum += args.partials[z * total + i];
    args.d_rows[(i / args.ds) * args.d_rows_stride + i % args.ds] = sum;
  }
}

bool aligned16(const void* p, int64_t stride) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && stride % 8 == 0;
}

bool vector_loads(const CorrArgs& a) {
  return a.ds % 8 == 0 && a.dt % 8 == 0 && aligned16(a.rows.s, a.rows.s_stride) && aligned16(a.rows.t, a.rows.t_stride) &&
         aligned16(a.cols.s, a.cols.s_stride) && aligned16(a.cols.t, a.cols.t_stride);
}

int64_t row_blocks(int64_t rows) { return (rows + kBlockRows - 1) / kBlockRows; }

// Output features per backward block: up to 256 in registers (NF 16); wider Ds splits over blockIdx.y,
// each block recomputing the similarity tiles.
int64_t bwd_width(int64_t ds) { return ds <= 64 ? 64 : ds <= 128 ? 128 : 256; }

// Without a split, one span covers every column.
CorrArgs with_span(const CorrArgs& args) {
  CorrArgs a = args;
  if (a.col_splits <= 1) {
    a.col_splits = 1;
    a.col_span = a.cols.n;
  }
  return a;
}

template <typename T>
cudaError_t launch_fwd(const CorrArgs& args, cudaStream_t stream) {
  const CorrArgs a = with_span(args);
  const dim3 grid(static_cast<unsigned>(row_blocks(a.rows.n)), 1, static_cast<unsigned>(a.col_splits));
  corr_fwd_kernel<T><<<grid, kThreads, kFwdSmem, stream>>>(a, vector_loads(a));
  if (a.col_splits > 1) {
    corr_fwd_merge_kernel<<<static_cast<unsigned>((a.rows.n + 127) / 128), 128, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T, int NF>
cudaError_t launch_bwd_nf(const CorrArgs& args, cudaStream_t stream) {
  const auto kernel = corr_bwd_kernel<T, NF>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBwdSmem);
  if (err != cudaSuccess) return err;
  const CorrArgs a = with_span(args);
  const dim3 grid(static_cast<unsigned>(row_blocks(a.rows.n)),
                  static_cast<unsigned>((a.ds + 16 * NF - 1) / (16 * NF)), static_cast<unsigned>(a.col_splits));
  kernel<<<grid, kThreads, kBwdSmem, stream>>>(a, vector_loads(a));
  if (a.col_splits > 1) {
    const int64_t blocks = std::min<int64_t>((a.rows.n * a.ds + 255) / 256, 65535 * 8);
    corr_bwd_reduce_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const CorrArgs& args, cudaStream_t stream) {
  switch (bwd_width(args.ds)) {
    case 64: return launch_bwd_nf<T, 4>(args, stream);
    case 128: return launch_bwd_nf<T, 8>(args, stream);
    default: return launch_bwd_nf<T, 16>(args, stream);
  }
}

}  // namespace

CorrSplit correlation_cuda_split(int64_t rows, int64_t cols, int64_t ds, bool backward) {
  // About two blocks per SM (the forward fits three, the widest backward two), never a span of fewer
  // than kMinSplitCols columns.
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t blocks = row_blocks(rows) * (backward ? (ds + bwd_width(ds) - 1) / bwd_width(ds) : 1);
  const int64_t splits = std::min<int64_t>({2 * sms / std::max<int64_t>(blocks, 1),
                                            (cols + kMinSplitCols - 1) / kMinSplitCols, 65535});
  if (splits <= 1) return {1, cols};
  const int64_t span = ((cols + splits - 1) / splits + kBlockCols - 1) / kBlockCols * kBlockCols;
  return {(cols + span - 1) / span, span};
}

bool correlation_cuda_fused_supported(CudaDtype dtype) {
  if (dtype != CudaDtype::kHalf && dtype != CudaDtype::kBFloat16) return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 8;
}

cudaError_t correlation_fwd_cuda_launch(const CorrArgs& args, cudaStream_t stream) {
  if (args.rows.n == 0) return cudaSuccess;
  if (args.dtype == CudaDtype::kHalf) return launch_fwd<__half>(args, stream);
  if (args.dtype == CudaDtype::kBFloat16) return launch_fwd<__nv_bfloat16>(args, stream);
  return cudaErrorInvalidValue;
}

cudaError_t correlation_bwd_cuda_launch(const CorrArgs& args, cudaStream_t stream) {
  if (args.rows.n == 0) return cudaSuccess;
  if (args.dtype == CudaDtype::kHalf) return launch_bwd<__half>(args, stream);
  if (args.dtype == CudaDtype::kBFloat16) return launch_bwd<__nv_bfloat16>(args, stream);
  return cudaErrorInvalidValue;
}

}  // namespace mlkd_fast
