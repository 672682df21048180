// A CPU emulator of the CUDA execution model, just large enough to run csrc/cuda/*.cu unchanged on a machine
// without a GPU (tests/simt_emulator/build.py rewrites only the launch syntax and the dynamic shared
// memory declaration). It checks what a GPU run would check first: indexing, masking, barrier placement,
// shared-memory layout and WMMA operand rules. It says nothing about speed or the GPU memory model.
//
// Execution: the blocks of a grid run one after another; the threads of a block are coroutines
// (ucontext), each running until it reaches a barrier (__syncthreads, __syncwarp, a shuffle), in
// forward or reverse thread order (simt_configure). A thread that reads shared memory another thread
// writes before the barrier that should separate them sees stale data in one of the two orders, so a
// missing barrier changes the results. Dynamic shared memory starts as NaN bytes (0xFF).
// Failures (divergent barriers, deadlock, bad WMMA pointers, __trap) stop the grid and are reported by
// simt_error(); launch-configuration errors come back from cudaGetLastError() as on a GPU.
//
// WMMA: every lane holds the whole 16 x 16 tile (the lane layout of a real fragment is unspecified and
// the kernels never index fragments) but stores only its share of it; mma_sync multiplies in fp32 as
// tensor cores do (exact products of fp16/bf16 inputs, fp32 sums).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time, so a static is the block's shared variable
#define __align__(n) alignas(n)

namespace simt {

enum class State { kReady, kWaitBlock, kWaitWarp, kDone, kFailed };

struct Thread {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  State state = State::kReady;
  uint3 idx;
};

struct Runtime {
  static constexpr size_t kStack = 256 * 1024;
  std::vector<Thread> threads;
  ucontext_t scheduler;
  int current = -1;
  uint3 thread_idx{0, 0, 0}, block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
  std::vector<unsigned char> smem_storage;
  unsigned char* smem = nullptr;
  std::function<void()> body;
  std::vector<uint64_t> shuffle_slots;
  std::map<const void*, int> max_dynamic_smem;
  std::string error;
  cudaError_t last = cudaSuccess;
  bool reverse = false;
  int sms = 132, cc_major = 9;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline int linear_thread() {
  const Runtime& r = rt();
  return static_cast<int>(r.thread_idx.x + r.block_dim.x * (r.thread_idx.y + r.block_dim.y * r.thread_idx.z));
}

// Leaves the current thread for good and stops the grid.
[[noreturn]] inline void fail(const std::string& what) {
  Runtime& r = rt();
  if (r.error.empty()) {
    r.error = what + " (block " + std::to_string(r.block_idx.x) + "," + std::to_string(r.block_idx.y) + ", thread " +
              std::to_string(linear_thread()) + ")";
  }
  r.threads[r.current].state = State::kFailed;
  swapcontext(&r.threads[r.current].ctx, &r.scheduler);
  std::abort();  // never resumed
}

inline void wait(State s) {
  Runtime& r = rt();
  r.threads[r.current].state = s;
  swapcontext(&r.threads[r.current].ctx, &r.scheduler);
}

inline void trampoline() {
  Runtime& r = rt();
  r.body();
  r.threads[r.current].state = State::kDone;
}  // returns to the scheduler through uc_link

// Runs every thread of the current block to completion, releasing barriers as they fill.
inline void run_block() {
  Runtime& r = rt();
  const int n = static_cast<int>(r.block_dim.x * r.block_dim.y * r.block_dim.z);
  if (r.threads.size() < static_cast<size_t>(n)) r.threads.resize(n);
  r.shuffle_slots.assign(n, 0);
  for (int i = 0; i < n; ++i) {
    Thread& t = r.threads[i];
    if (!t.stack) t.stack.reset(new char[Runtime::kStack]);
    t.state = State::kReady;
    t.idx = make_uint3(i % r.block_dim.x, (i / r.block_dim.x) % r.block_dim.y, i / (r.block_dim.x * r.block_dim.y));
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack.get();
    t.ctx.uc_stack.ss_size = Runtime::kStack;
    t.ctx.uc_link = &r.scheduler;
    makecontext(&t.ctx, trampoline, 0);
  }
  for (;;) {
    for (int k = 0; k < n; ++k) {
      const int i = r.reverse ? n - 1 - k : k;
      if (r.threads[i].state != State::kReady) continue;
      r.current = i;
      r.thread_idx = r.threads[i].idx;
      swapcontext(&r.scheduler, &r.threads[i].ctx);
      if (!r.error.empty()) return;
    }
    // Every thread now waits or is done.
    bool released = false;
    for (int w0 = 0; w0 < n; w0 += 32) {
      const int w1 = std::min(n, w0 + 32);
      int at_warp = 0, at_block = 0, done = 0;
      for (int i = w0; i < w1; ++i) {
        at_warp += r.threads[i].state == State::kWaitWarp;
        at_block += r.threads[i].state == State::kWaitBlock;
        done += r.threads[i].state == State::kDone;
      }
      if (at_warp == 0) continue;
      if (at_warp != w1 - w0) {
        r.error = "warp " + std::to_string(w0 / 32) + ": " + std::to_string(at_warp) + " lanes at a warp barrier or shuffle, " +
                  std::to_string(at_block) + " at __syncthreads, " + std::to_string(done) + " exited (block " +
                  std::to_string(r.block_idx.x) + "," + std::to_string(r.block_idx.y) + ")";
        return;
      }
      for (int i = w0; i < w1; ++i) r.threads[i].state = State::kReady;
      released = true;
    }
    if (released) continue;
    int at_block = 0, done = 0;
    for (int i = 0; i < n; ++i) {
      at_block += r.threads[i].state == State::kWaitBlock;
      done += r.threads[i].state == State::kDone;
    }
    if (done == n) return;
    if (at_block + done != n) {
      r.error = "deadlock in block " + std::to_string(r.block_idx.x) + "," + std::to_string(r.block_idx.y);
      return;
    }
    if (done > 0) {
      r.error = "__syncthreads reached by " + std::to_string(at_block) + " threads while " + std::to_string(done) +
                " have exited (block " + std::to_string(r.block_idx.x) + "," + std::to_string(r.block_idx.y) + ")";
      return;
    }
    for (int i = 0; i < n; ++i) r.threads[i].state = State::kReady;
  }
}

template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A&&... args) {
  Runtime& r = rt();
  if (!r.error.empty()) return;
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    r.last = cudaErrorInvalidConfiguration;
    return;
  }
  const auto attr = r.max_dynamic_smem.find(reinterpret_cast<const void*>(kernel));
  const size_t smem_limit = attr == r.max_dynamic_smem.end() ? 48 * 1024 : static_cast<size_t>(attr->second);
  if (smem > smem_limit) {
    r.last = cudaErrorInvalidValue;
    return;
  }
  r.body = [=]() { kernel(args...); };
  r.block_dim = block;
  r.grid_dim = grid;
  r.smem_storage.assign(smem + 256, 0xFF);
  r.smem = r.smem_storage.data() + (256 - reinterpret_cast<uintptr_t>(r.smem_storage.data()) % 256) % 256;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        r.block_idx = make_uint3(x, y, z);
        std::memset(r.smem, 0xFF, smem);
        run_block();
        if (!r.error.empty()) return;
      }
}

template <class T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(rt().smem);
}

}  // namespace simt

#define threadIdx (::simt::rt().thread_idx)
#define blockIdx (::simt::rt().block_idx)
#define blockDim (::simt::rt().block_dim)
#define gridDim (::simt::rt().grid_dim)

inline void __syncthreads() { simt::wait(simt::State::kWaitBlock); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) simt::fail("__syncwarp with a partial mask is not emulated");
  simt::wait(simt::State::kWaitWarp);
}
[[noreturn]] inline void __trap() { simt::fail("__trap"); }

namespace simt {
template <class T>
T exchange(T v, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  Runtime& r = rt();
  const int me = linear_thread();
  std::memcpy(&r.shuffle_slots[me], &v, sizeof(T));
  wait(State::kWaitWarp);
  T out;
  std::memcpy(&out, &r.shuffle_slots[(me & ~31) | src_lane], sizeof(T));
  wait(State::kWaitWarp);  // nobody overwrites a slot before every lane has read
  return out;
}
}  // namespace simt

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  if (mask != 0xffffffffu || width != 32) simt::fail("shuffle with a partial mask or width is not emulated");
  return simt::exchange(v, (simt::linear_thread() & 31) ^ (lane_mask & 31));
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (mask != 0xffffffffu || width != 32) simt::fail("shuffle with a partial mask or width is not emulated");
  const int lane = simt::linear_thread() & 31;
  return simt::exchange(v, lane + static_cast<int>(delta) < 32 ? lane + static_cast<int>(delta) : lane);
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment;
template <int M, int N, int K, class T, class Layout>
struct fragment<matrix_a, M, N, K, T, Layout> {
  static constexpr int kRows = M, kCols = K, num_elements = M * K;
  T x[M * K];
};
template <int M, int N, int K, class T, class Layout>
struct fragment<matrix_b, M, N, K, T, Layout> {
  static constexpr int kRows = K, kCols = N, num_elements = K * N;
  T x[K * N];
};
template <int M, int N, int K, class T>
struct fragment<accumulator, M, N, K, T, void> {
  static constexpr int kRows = M, kCols = N, num_elements = M * N;
  T x[M * N];
};

inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// The CUDA rules for WMMA memory operands: a 256-bit aligned pointer, ldm a multiple of 16 bytes.
template <class T>
void check_operand(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) simt::fail(std::string(what) + ": pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) simt::fail(std::string(what) + ": ldm not a multiple of 16 bytes");
}

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  using Frag = fragment<Use, M, N, K, T, Layout>;
  for (int i = 0; i < Frag::num_elements; ++i) f.x[i] = static_cast<T>(v);
}

template <class Use, int M, int N, int K, class T, class Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  using Frag = fragment<Use, M, N, K, T, Layout>;
  check_operand(p, ldm, "load_matrix_sync");
  constexpr bool kColMajor = std::is_same<Layout, col_major>::value;
  for (int r = 0; r < Frag::kRows; ++r)
    for (int c = 0; c < Frag::kCols; ++c) f.x[r * Frag::kCols + c] = kColMajor ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K, class T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  check_operand(p, ldm, "store_matrix_sync");
  // As on a GPU, each element is written by one lane only: reading another lane's part needs __syncwarp.
  const int lane = simt::linear_thread() & 31;
  for (int e = lane; e < M * N; e += 32) {
    const int r = e / N, c = e % N;
    (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[e];
  }
}

template <int M, int N, int K, class T, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float av[M * K], bv[K * N], out[M * N];
  for (int i = 0; i < M * K; ++i) av[i] = as_float(a.x[i]);
  for (int i = 0; i < K * N; ++i) bv[i] = as_float(b.x[i]);
  std::memcpy(out, c.x, sizeof(out));
  for (int i = 0; i < M; ++i)
    for (int k = 0; k < K; ++k)
      for (int j = 0; j < N; ++j) out[i * N + j] += av[i * K + k] * bv[k * N + j];
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda

// nvcc's cuda_runtime.h has this overload for kernel pointers; a host compiler does not see it.
template <class... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
