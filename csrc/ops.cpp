// mlkd_fast compiled ops: the schemas (defined once here), the C++ CPU kernels, and (when built with
// CUDA) the CUDA registrations: the KL kernels of csrc/kd_kl_cuda.cu and, for fp16/bf16 features,
// the fused correlation of csrc/correlation_cuda.cu, launched on the current stream; fp32 and fp64
// features (and mixed dtypes) take the tiled correlation below, whose tiles are cuBLAS matmuls on the
// GPU. Every op takes fp32, fp16, bf16 and fp64, student and teacher in any combination; the math is
// fp32, or fp64 when an input is fp64.
//
// Semantics are those of the Triton ops in kernels/ (see their docstrings); the Python side
// (mlkd_fast/_native.py) adds the fake implementations and autograd.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <limits>
#include <mutex>
#include <tuple>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef MLKD_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda_ops.h"
#endif

namespace mlkd_fast {

constexpr double kNormEps = 1e-8;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------
// Large CPU outputs (the gradients, as big as the logits) come from a small cache of 2 MiB-aligned
// blocks advised onto transparent huge pages. Why: glibc maps every allocation over 32 MiB afresh,
// and a fresh 1024 x 32000 fp32 gradient (125 MiB) takes ~32k page faults when first written, ~50 ms
// on the 2-core development VM, more than the KL kernel itself; every step allocates one (the
// forward's gradient; the backward's scaled copy too when the graph is kept). The cache keeps the
// last freed blocks (at most kCachedBlocks, kCacheBytes in all) so that the next step reuses them
// without a fault, like the CUDA caching allocator does on the GPU. Outputs under 2 MiB, other
// devices, other systems, or MLKD_FAST_NO_OUTPUT_CACHE=1: plain at::empty.
// ------------------------------------------------------------------------------------------
#if defined(__linux__)
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kCachedBlocks = 4;
constexpr size_t kCacheBytes = size_t(1) << 30;

class OutputBlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t size = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    Block* block = take(size);
    if (block == nullptr) {
      void* p = nullptr;
      TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&p, kHugePage, size) == 0,
                       "mlkd_fast: could not allocate ", nbytes, " bytes on the CPU");
      madvise(p, size, MADV_HUGEPAGE);  // a hint; ignored where THP is off
      block = new Block{p, size};
    }
    return {block->ptr, block, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  static OutputBlockCache& get() {
    static auto* cache = new OutputBlockCache();  // never destroyed: blocks may outlive static teardown
    return *cache;
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };

  Block* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if ((*it)->size == size) {
        Block* b = *it;
        free_.erase(it);
        cached_bytes_ -= size;
        return b;
      }
    }
    return nullptr;
  }

  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    OutputBlockCache& cache = get();
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      if (block->size <= kCacheBytes) {
        cache.free_.push_back(block);  // newest last
        cache.cached_bytes_ += block->size;
        block = nullptr;
        while (cache.free_.size() > kCachedBlocks || cache.cached_bytes_ > kCacheBytes) {
          evicted.push_back(cache.free_.front());
          cache.cached_bytes_ -= cache.free_.front()->size;
          cache.free_.erase(cache.free_.begin());
        }
      }
    }
    if (block != nullptr) evicted.push_back(block);
    for (Block* b : evicted) {
      std::free(b->ptr);
      delete b;
    }
  }

  std::mutex mutex_;
  std::vector<Block*> free_;
  size_t cached_bytes_ = 0;
};
#endif

static at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
  static const bool enabled = std::getenv("MLKD_FAST_NO_OUTPUT_CACHE") == nullptr;
  const auto dtype = c10::typeMetaToScalarType(options.dtype());
  if (enabled && options.device().is_cpu() &&
      c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(dtype)) >= static_cast<int64_t>(kHugePage)) {
    return at::detail::empty_generic(sizes, &OutputBlockCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                     c10::nullopt);
  }
#endif
  return at::empty(sizes, options);
}

// ------------------------------------------------------------------------------------------
// Temperature KL, one row at a time (rows in parallel).
//   v = s / T, u = t / T;  l = A / Z_t + (m_s - m_t) + (log Z_s - log Z_t),
//   A = sum_c e^(u_c - m_t) (u_c - v_c);  d(T^2 l)/ds = T (q - p),  d(T^2 l)/dt = T p (log p - log q - l)
// A row is read once from memory into fp32 scratch (v, u, and their exps) that stays in L1/L2.
// The sweeps over the scratch have an AVX2+FMA version (8 lanes, chosen at run time when the CPU
// has it) and a portable scalar one; fp32 partial sums per 1024 columns are summed in double.
// ------------------------------------------------------------------------------------------
constexpr int64_t kSumBlock = 1024;

// e^x, branch-free: x = k ln2 + r, |r| <= ln2 / 2, e^r by the degree-6 Cephes polynomial (~1 ulp),
// 2^k through the exponent bits. Below -87 it returns exactly 0 (a -inf logit gives p = 0);
// inputs are <= 0 here (x - row max); NaN stays NaN.
constexpr float kExpLow = -87.0f, kExpHigh = 88.0f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f, kRoundMagic = 12582912.0f;
constexpr float kExpP0 = 1.9875691500e-4f, kExpP1 = 1.3981999507e-3f, kExpP2 = 8.3334519073e-3f,
                kExpP3 = 4.1665795894e-2f, kExpP4 = 1.6666665459e-1f, kExpP5 = 5.0000001201e-1f;

static inline float exp_scalar(float x) {
  const float xc = std::min(std::max(x, kExpLow), kExpHigh);
  const float k = (xc * kLog2e + kRoundMagic) - kRoundMagic;
  const float r = (xc - k * kLn2Hi) - k * kLn2Lo;
  float p = kExpP0;
  p = p * r + kExpP1;
  p = p * r + kExpP2;
  p = p * r + kExpP3;
  p = p * r + kExpP4;
  p = p * r + kExpP5;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < kExpLow ? 0.0f : y * scale;
}

struct KlSums {
  double z_s = 0.0, z_t = 0.0, a = 0.0;
};

// The four sweeps. scale_and_max: out = x / T, returns max(out). exp_and_sums: e_s = e^(v - m_s),
// e_t = e^(u - m_t), Z_s, Z_t and A (0 where u = -inf). With keep the row weight (mask, reduction,
// loss weight): student_grad_row: T (q - p) keep = e_s w_s - e_t w_t. teacher_grad_row:
// T p (log p - log q - l) keep = e_t w_t ((u - v) + offset),
// 0 where u = -inf, offset = (m_s + log Z_s) - (m_t + log Z_t) - l.
namespace scalar_sweeps {
static float scale_and_max(const float* x, float inv_t, float* out, int64_t c) {
  float m = kNegInf;
  for (int64_t j = 0; j < c; ++j) {
    out[j] = x[j] * inv_t;
    m = out[j] > m ? out[j] : m;  // NaN never wins; it reaches the sums and so the loss
  }
  return m;
}

static KlSums exp_and_sums(const float* v, const float* u, float m_s, float m_t, float* e_s, float* e_t,
                           int64_t c) {
  KlSums sums;
  for (int64_t b0 = 0; b0 < c; b0 += kSumBlock) {
    const int64_t b1 = std::min(c, b0 + kSumBlock);
    float zs = 0.0f, zt = 0.0f, aa = 0.0f;
    for (int64_t j = b0; j < b1; ++j) {
      e_s[j] = exp_scalar(v[j] - m_s);
      e_t[j] = exp_scalar(u[j] - m_t);
      zs += e_s[j];
      zt += e_t[j];
      aa += u[j] == kNegInf ? 0.0f : e_t[j] * (u[j] - v[j]);
    }
    sums.z_s += zs;
    sums.z_t += zt;
    sums.a += aa;
  }
  return sums;
}

static void student_grad_row(const float* e_s, const float* e_t, float w_s, float w_t, float* out, int64_t c) {
  for (int64_t j = 0; j < c; ++j) out[j] = e_s[j] * w_s - e_t[j] * w_t;
}

static void teacher_grad_row(const float* v, const float* u, const float* e_t, float w_t, float offset, float* out,
                             int64_t c) {
  for (int64_t j = 0; j < c; ++j) out[j] = u[j] == kNegInf ? 0.0f : e_t[j] * w_t * ((u[j] - v[j]) + offset);
}
}  // namespace scalar_sweeps

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MLKD_HAVE_AVX2_SWEEPS 1
namespace avx2_sweeps {
#define MLKD_AVX2 __attribute__((target("avx2,fma")))

MLKD_AVX2 static inline __m256 exp8(__m256 x) {
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpLow)), _mm256_set1_ps(kExpHigh));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Lo), _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Hi), xc));
  __m256 p = _mm256_set1_ps(kExpP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP5));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
  // max/min above turned NaN into a bound: put NaN back (unordered compare), then zero below kExpLow.
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 low = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLow), _CMP_LT_OQ);
  return _mm256_andnot_ps(low, _mm256_blendv_ps(e, x, nan));
}

MLKD_AVX2 static inline float hsum(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

MLKD_AVX2 static float scale_and_max(const float* x, float inv_t, float* out, int64_t c) {
  const __m256 it = _mm256_set1_ps(inv_t);
  __m256 mv = _mm256_set1_ps(kNegInf);
  int64_t j = 0;
  for (; j + 8 <= c; j += 8) {
    const __m256 y = _mm256_mul_ps(_mm256_loadu_ps(x + j), it);
    _mm256_storeu_ps(out + j, y);
    mv = _mm256_max_ps(y, mv);  // a NaN y loses to mv, as in the scalar sweep
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  float m = scalar_sweeps::scale_and_max(x + j, inv_t, out + j, c - j);
  for (float l : lanes) m = l > m ? l : m;
  return m;
}

MLKD_AVX2 static KlSums exp_and_sums(const float* v, const float* u, float m_s, float m_t, float* e_s, float* e_t,
                                     int64_t c) {
  KlSums sums;
  const __m256 ms = _mm256_set1_ps(m_s), mt = _mm256_set1_ps(m_t), ninf = _mm256_set1_ps(kNegInf);
  const int64_t c8 = c - c % 8;
  for (int64_t b0 = 0; b0 < c8; b0 += kSumBlock) {
    __m256 zs = _mm256_setzero_ps(), zt = _mm256_setzero_ps(), aa = _mm256_setzero_ps();
    for (int64_t j = b0; j < std::min(c8, b0 + kSumBlock); j += 8) {
      const __m256 vv = _mm256_loadu_ps(v + j), uu = _mm256_loadu_ps(u + j);
      const __m256 es = exp8(_mm256_sub_ps(vv, ms)), et = exp8(_mm256_sub_ps(uu, mt));
      _mm256_storeu_ps(e_s + j, es);
      _mm256_storeu_ps(e_t + j, et);
      zs = _mm256_add_ps(zs, es);
      zt = _mm256_add_ps(zt, et);
      const __m256 d = _mm256_mul_ps(et, _mm256_sub_ps(uu, vv));
      aa = _mm256_add_ps(aa, _mm256_andnot_ps(_mm256_cmp_ps(uu, ninf, _CMP_EQ_OQ), d));
    }
    sums.z_s += hsum(zs);
    sums.z_t += hsum(zt);
    sums.a += hsum(aa);
  }
  const KlSums tail = scalar_sweeps::exp_and_sums(v + c8, u + c8, m_s, m_t, e_s + c8, e_t + c8, c - c8);
  sums.z_s += tail.z_s;
  sums.z_t += tail.z_t;
  sums.a += tail.a;
  return sums;
}

MLKD_AVX2 static void student_grad_row(const float* e_s, const float* e_t, float w_s, float w_t, float* out,
                                       int64_t c) {
  const __m256 ws = _mm256_set1_ps(w_s), wt = _mm256_set1_ps(w_t);
  int64_t j = 0;
  for (; j + 8 <= c; j += 8)
    _mm256_storeu_ps(out + j, _mm256_fmsub_ps(_mm256_loadu_ps(e_s + j), ws,
                                              _mm256_mul_ps(_mm256_loadu_ps(e_t + j), wt)));
  scalar_sweeps::student_grad_row(e_s + j, e_t + j, w_s, w_t, out + j, c - j);
}

MLKD_AVX2 static void teacher_grad_row(const float* v, const float* u, const float* e_t, float w_t, float offset,
                                       float* out, int64_t c) {
  const __m256 wt = _mm256_set1_ps(w_t), off = _mm256_set1_ps(offset), ninf = _mm256_set1_ps(kNegInf);
  int64_t j = 0;
  for (; j + 8 <= c; j += 8) {
    const __m256 uu = _mm256_loadu_ps(u + j);
    const __m256 g = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(e_t + j), wt),
                                   _mm256_add_ps(_mm256_sub_ps(uu, _mm256_loadu_ps(v + j)), off));
    _mm256_storeu_ps(out + j, _mm256_andnot_ps(_mm256_cmp_ps(uu, ninf, _CMP_EQ_OQ), g));
  }
  scalar_sweeps::teacher_grad_row(v + j, u + j, e_t + j, w_t, offset, out + j, c - j);
}
#undef MLKD_AVX2
}  // namespace avx2_sweeps
#endif

// The sweeps of this CPU, chosen once.
struct KlSweeps {
  float (*scale_and_max)(const float*, float, float*, int64_t);
  KlSums (*exp_and_sums)(const float*, const float*, float, float, float*, float*, int64_t);
  void (*student_grad_row)(const float*, const float*, float, float, float*, int64_t);
  void (*teacher_grad_row)(const float*, const float*, const float*, float, float, float*, int64_t);
};

static const KlSweeps& kl_sweeps() {
  static const KlSweeps sweeps = [] {
#ifdef MLKD_HAVE_AVX2_SWEEPS
    if (std::getenv("MLKD_FAST_NO_SIMD") == nullptr && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma"))
      return KlSweeps{avx2_sweeps::scale_and_max, avx2_sweeps::exp_and_sums, avx2_sweeps::student_grad_row,
                      avx2_sweeps::teacher_grad_row};
#endif
    return KlSweeps{scalar_sweeps::scale_and_max, scalar_sweeps::exp_and_sums, scalar_sweeps::student_grad_row,
                    scalar_sweeps::teacher_grad_row};
  }();
  return sweeps;
}

// Rows of any floating dtype in the math dtype acc_t, and back: student and teacher (and so their
// gradients) may have different dtypes, converted row by row in L1 instead of a promoted copy of
// the narrower input. `offset` counts elements from `base`.
template <typename acc_t>
static void load_row(const void* base, at::ScalarType dtype, int64_t offset, int64_t c, acc_t* dst) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mlkd_load_row", [&] {
    const scalar_t* src = static_cast<const scalar_t*>(base) + offset;
    for (int64_t j = 0; j < c; ++j) dst[j] = static_cast<acc_t>(src[j]);
  });
}

template <typename acc_t>
static void store_row(const acc_t* src, void* base, at::ScalarType dtype, int64_t offset, int64_t c) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mlkd_store_row", [&] {
    scalar_t* dst = static_cast<scalar_t*>(base) + offset;
    for (int64_t j = 0; j < c; ++j) dst[j] = static_cast<scalar_t>(src[j]);
  });
}

static void zero_row(void* base, at::ScalarType dtype, int64_t offset, int64_t c) {
  std::memset(static_cast<char*>(base) + offset * static_cast<int64_t>(c10::elementSize(dtype)), 0,
              static_cast<size_t>(c) * c10::elementSize(dtype));
}

// The operands of one CPU kd_kl call: inputs with their row strides, contiguous gradients (null when
// not wanted), each pointer with its own dtype.
struct KlRowsArgs {
  const void* s;
  at::ScalarType s_type;
  int64_t s_stride;
  const void* t;
  at::ScalarType t_type;
  int64_t t_stride;
  void* gs;  // (N, C), s_type
  void* gt;  // (N, C), t_type
  int64_t n, c;
};

// fp32 math (fp32, fp16 and bf16 inputs in any combination): the vectorised sweeps.
static void kd_kl_rows_cpu_f32(const KlRowsArgs& a, const float* weight, float* rows, float temperature) {
  const int64_t c = a.c;
  const float inv_t = 1.0f / temperature;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(c, 1));
  const KlSweeps& sw = kl_sweeps();
  const bool all_float = a.s_type == at::kFloat && a.t_type == at::kFloat;
  at::parallel_for(0, a.n, grain, [&](int64_t begin, int64_t end) {
    // fp32 scratch: v, u, e_s, e_t, and a staging row for dtype conversions. Kept per thread across
    // calls, so that a call neither allocates it nor faults it in again.
    thread_local std::vector<float> scratch;
    scratch.resize(std::max(scratch.size(), static_cast<size_t>(all_float ? 4 : 5) * c));
    float* v = scratch.data();
    float* u = v + c;
    float* e_s = u + c;
    float* e_t = e_s + c;
    float* stage = all_float ? nullptr : e_t + c;
    auto load = [&](const void* base, at::ScalarType dtype, int64_t offset, float* dst) -> float {
      if (dtype == at::kFloat) return sw.scale_and_max(static_cast<const float*>(base) + offset, inv_t, dst, c);
      load_row(base, dtype, offset, c, stage);
      return sw.scale_and_max(stage, inv_t, dst, c);
    };
    // the sweep writes straight into an fp32 gradient, else into the stage and is then converted
    auto grad_out = [&](void* base, at::ScalarType dtype, int64_t offset) -> float* {
      return dtype == at::kFloat ? static_cast<float*>(base) + offset : stage;
    };
    auto finish = [&](void* base, at::ScalarType dtype, int64_t offset) {
      if (dtype != at::kFloat) store_row(stage, base, dtype, offset, c);
    };
    for (int64_t i = begin; i < end; ++i) {
      const float keep = weight == nullptr ? 1.0f : weight[i];
      if (keep == 0.0f) {  // weight 0 (a masked row): exactly 0, whatever the row holds (NaN, all -inf)
        rows[i] = 0.0f;
        if (a.gs != nullptr) zero_row(a.gs, a.s_type, i * c, c);
        if (a.gt != nullptr) zero_row(a.gt, a.t_type, i * c, c);
        continue;
      }
      float m_s = load(a.s, a.s_type, i * a.s_stride, v);
      float m_t = load(a.t, a.t_type, i * a.t_stride, u);
      if (m_s == kNegInf) m_s = 0.0f;  // an all -inf row: keep the arithmetic finite
      if (m_t == kNegInf) m_t = 0.0f;
      const KlSums sums = sw.exp_and_sums(v, u, m_s, m_t, e_s, e_t, c);
      const float log_z_s = static_cast<float>(std::log(sums.z_s));
      const float log_z_t = static_cast<float>(std::log(sums.z_t));
      const float kl = static_cast<float>(sums.a / sums.z_t) + (m_s - m_t) + (log_z_s - log_z_t);
      rows[i] = kl * temperature * temperature * keep;
      const float w_s = static_cast<float>(temperature * keep / sums.z_s);
      const float w_t = static_cast<float>(temperature * keep / sums.z_t);
      if (a.gs != nullptr) {
        sw.student_grad_row(e_s, e_t, w_s, w_t, grad_out(a.gs, a.s_type, i * c), c);
        finish(a.gs, a.s_type, i * c);
      }
      if (a.gt != nullptr) {
        const float offset = (m_s + log_z_s) - (m_t + log_z_t) - kl;
        sw.teacher_grad_row(v, u, e_t, w_t, offset, grad_out(a.gt, a.t_type, i * c), c);
        finish(a.gt, a.t_type, i * c);
      }
    }
  });
}

// fp64 math (either input fp64): the same formulas in double, portable loops (fp64 is the
// accuracy path, not a speed target).
static void kd_kl_rows_cpu_f64(const KlRowsArgs& a, const double* weight, double* rows, double temperature) {
  const int64_t c = a.c;
  const double inv_t = 1.0 / temperature;
  const double neg_inf = -std::numeric_limits<double>::infinity();
  at::parallel_for(0, a.n, std::max<int64_t>(1, 8192 / std::max<int64_t>(c, 1)), [&](int64_t begin, int64_t end) {
    std::vector<double> scratch(4 * c);
    double* v = scratch.data();
    double* u = v + c;
    double* e_s = u + c;
    double* e_t = e_s + c;
    auto load = [&](const void* base, at::ScalarType dtype, int64_t offset, double* dst) -> double {
      load_row(base, dtype, offset, c, dst);
      double m = neg_inf;
      for (int64_t j = 0; j < c; ++j) {
        dst[j] *= inv_t;
        m = dst[j] > m ? dst[j] : m;  // NaN never wins; it reaches the sums and so the loss
      }
      return m == neg_inf ? 0.0 : m;  // an all -inf row: keep the arithmetic finite
    };
    for (int64_t i = begin; i < end; ++i) {
      const double keep = weight == nullptr ? 1.0 : weight[i];
      if (keep == 0.0) {
        rows[i] = 0.0;
        if (a.gs != nullptr) zero_row(a.gs, a.s_type, i * c, c);
        if (a.gt != nullptr) zero_row(a.gt, a.t_type, i * c, c);
        continue;
      }
      const double m_s = load(a.s, a.s_type, i * a.s_stride, v);
      const double m_t = load(a.t, a.t_type, i * a.t_stride, u);
      double z_s = 0.0, z_t = 0.0, acc = 0.0;
      for (int64_t j = 0; j < c; ++j) {
        e_s[j] = std::exp(v[j] - m_s);
        e_t[j] = std::exp(u[j] - m_t);
        z_s += e_s[j];
        z_t += e_t[j];
        acc += u[j] == neg_inf ? 0.0 : e_t[j] * (u[j] - v[j]);
      }
      const double log_z_s = std::log(z_s), log_z_t = std::log(z_t);
      const double kl = acc / z_t + (m_s - m_t) + (log_z_s - log_z_t);
      rows[i] = kl * temperature * temperature * keep;
      const double w_s = temperature * keep / z_s, w_t = temperature * keep / z_t;
      if (a.gs != nullptr) {  // T (q - p) keep, written over e_s (not needed after)
        for (int64_t j = 0; j < c; ++j) e_s[j] = e_s[j] * w_s - e_t[j] * w_t;
        store_row(e_s, a.gs, a.s_type, i * c, c);
      }
      if (a.gt != nullptr) {  // T p (log p - log q - l) keep, 0 where the teacher logit is -inf
        const double offset = (m_s + log_z_s) - (m_t + log_z_t) - kl;
        for (int64_t j = 0; j < c; ++j) e_t[j] = u[j] == neg_inf ? 0.0 : e_t[j] * w_t * ((u[j] - v[j]) + offset);
        store_row(e_t, a.gt, a.t_type, i * c, c);
      }
    }
  });
}

// The math dtype of kd_kl: fp64 when either input is fp64, else fp32.
static at::ScalarType kl_math_type(const at::Tensor& s, const at::Tensor& t) {
  return s.scalar_type() == at::kDouble || t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The checks and the outputs of kd_kl, shared by the CPU and the CUDA implementation. Student and
// teacher may differ in dtype; the loss rows and the row weights are in the math dtype, each
// gradient in its input's dtype.
struct KdKlOutputs {
  at::Tensor rows, grad_s, grad_t, weight;  // weight: contiguous row_weight in the math dtype, or undefined
};

static KdKlOutputs kd_kl_outputs(const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& weight,
                                 bool student_grad, bool teacher_grad) {
  TORCH_CHECK(s.dim() == 2 && t.sizes() == s.sizes(), "kd_kl: student and teacher must be (N, C) of one shape");
  TORCH_CHECK(s.stride(1) == 1 && t.stride(1) == 1, "kd_kl: the last stride must be 1");
  TORCH_CHECK(s.is_floating_point() && t.is_floating_point(), "kd_kl: student and teacher must be floating point");
  TORCH_CHECK(!weight.has_value() || (weight->is_floating_point() && weight->numel() == s.size(0)),
              "kd_kl: row_weight must be a floating vector of length N");
  TORCH_CHECK(t.device() == s.device() && (!weight.has_value() || weight->device() == s.device()),
              "kd_kl: student, teacher and row_weight must be on one device");
  const int64_t n = s.size(0), c = s.size(1);
  const auto math = kl_math_type(s, t);
  return {at::empty({n}, s.options().dtype(math)),
          student_grad ? empty_output({n, c}, s.options()) : at::empty({0}, s.options()),
          teacher_grad ? empty_output({n, c}, t.options()) : at::empty({0}, t.options()),
          weight.has_value() ? weight->to(math).contiguous() : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_kl_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                         const c10::optional<at::Tensor>& row_weight,
                                                         double temperature, bool student_grad, bool teacher_grad) {
  auto [rows, grad_s, grad_t, weight] = kd_kl_outputs(student, teacher, row_weight, student_grad, teacher_grad);
  const KlRowsArgs args{student.const_data_ptr(), student.scalar_type(), student.stride(0),
                        teacher.const_data_ptr(), teacher.scalar_type(), teacher.stride(0),
                        student_grad ? grad_s.mutable_data_ptr() : nullptr,
                        teacher_grad ? grad_t.mutable_data_ptr() : nullptr, student.size(0), student.size(1)};
  if (rows.scalar_type() == at::kDouble) {
    kd_kl_rows_cpu_f64(args, weight.defined() ? weight.const_data_ptr<double>() : nullptr,
                       rows.mutable_data_ptr<double>(), temperature);
  } else {
    kd_kl_rows_cpu_f32(args, weight.defined() ? weight.const_data_ptr<float>() : nullptr,
                       rows.mutable_data_ptr<float>(), static_cast<float>(temperature));
  }
  return {rows, grad_s, grad_t};
}

// dst[i, :] = src[i, :] * g[i], fp32 math for half types, result in src's dtype. In place (dst is src),
// rows whose factor is exactly 1 are skipped: after `total.backward()` that is every row of the KL's
// stored gradient (its weights are folded in), so that backward reads N floats and writes nothing.
static void scale_rows_cpu_into(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& g) {
  TORCH_CHECK(src.dim() == 2 && g.dim() == 1 && g.size(0) == src.size(0), "scale_rows: x must be (N, C), g (N,)");
  TORCH_CHECK(src.stride(1) == 1 && dst.stride(1) == 1, "scale_rows: the last stride must be 1");
  const bool in_place = src.is_same(dst);
  const auto gf = g.to(src.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  const int64_t n = src.size(0), c = src.size(1), src_stride = src.stride(0), dst_stride = dst.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "scale_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* gp = gf.const_data_ptr<acc_t>();
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    scalar_t* out = dst.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 32768 / std::max<int64_t>(c, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t gi = gp[i];
        if (in_place && gi == acc_t(1)) continue;
        const scalar_t* row_in = in + i * src_stride;
        scalar_t* row_out = out + i * dst_stride;
        for (int64_t j = 0; j < c; ++j) row_out[j] = static_cast<scalar_t>(static_cast<acc_t>(row_in[j]) * gi);
      }
    });
  });
}

at::Tensor scale_rows_cpu(const at::Tensor& x, const at::Tensor& g) {
  const auto xc = x.contiguous();
  auto out = empty_output(xc.sizes(), xc.options());
  scale_rows_cpu_into(xc, out, g);
  return out;
}

void scale_rows_inplace_cpu(const at::Tensor& x, const at::Tensor& g) { scale_rows_cpu_into(x, x, g); }

// ------------------------------------------------------------------------------------------
// Correlation KL, tiled (CPU, and CUDA for fp32 and fp64 features or mixed dtypes; fp64 anywhere
// makes the math fp64): (BM x BN) tiles of both similarity
// matrices from BLAS / cuBLAS matmuls of the normalised features; per-row online log-sum-exps (on CPU
// each tile row swept in L1 by the KL's vectorised loops, on CUDA ATen ops); never an (M x N) matrix
// (extra memory O(tile^2 + (M + N) D)). The backward walks the same tiles once, accumulating the row
// and the column gradients together.
// ------------------------------------------------------------------------------------------
static int64_t corr_tile(const at::Tensor& x) { return x.is_cuda() ? 4096 : 1024; }

// Inverse row norms 1 / max(||x||, eps), computed in `math` (fp32, or fp64 for the fp64 path).
static at::Tensor inv_norms(const at::Tensor& x, at::ScalarType math) {
  return at::linalg_vector_norm(x, 2, {1}, false, math).clamp_min(kNormEps).reciprocal();
}

// The tiled correlation's math dtype: fp64 when any feature tensor is fp64 (fp64 stays fp64), else
// fp32 (fp16/bf16 features are widened; mixed student/teacher dtypes meet there).
static at::ScalarType corr_math_type(const at::Tensor& a_s, const at::Tensor& a_t,
                                     const c10::optional<at::Tensor>& b_s, const c10::optional<at::Tensor>& b_t) {
  for (const at::Tensor* x : {&a_s, &a_t, b_s ? &*b_s : nullptr, b_t ? &*b_t : nullptr})
    if (x != nullptr && x->scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

struct CorrOperands {
  bool square;
  at::Tensor a_s, a_t, b_s, b_t;      // normalised features in the math dtype
  at::Tensor ra_s, rb_s;              // student inverse norms (for the normalisation backward)
};

static CorrOperands corr_operands(const at::Tensor& a_s, const at::Tensor& a_t, const c10::optional<at::Tensor>& b_s,
                                  const c10::optional<at::Tensor>& b_t) {
  CorrOperands o;
  const auto math = corr_math_type(a_s, a_t, b_s, b_t);
  o.square = !b_s.has_value();
  o.ra_s = inv_norms(a_s, math);
  o.a_s = a_s.to(math) * o.ra_s.unsqueeze(1);
  o.a_t = a_t.to(math) * inv_norms(a_t, math).unsqueeze(1);
  if (o.square) {
    o.rb_s = o.ra_s;
    o.b_s = o.a_s;
    o.b_t = o.a_t;
  } else {
    o.rb_s = inv_norms(*b_s, math);
    o.b_s = b_s->to(math) * o.rb_s.unsqueeze(1);
    o.b_t = b_t->to(math) * inv_norms(*b_t, math).unsqueeze(1);
  }
  return o;
}

// Two flat fp32 buffers, one tile each, that every tile of a call is written into: fresh tensors per
// tile would page-fault ~100 MB per pass on CPU (4 MB each, beyond the allocator's cache).
struct TileBuffers {
  at::Tensor s, t;
  TileBuffers(const at::Tensor& like, int64_t entries)
      : s(at::empty({entries}, like.options())), t(at::empty({entries}, like.options())) {}
};

// Tiles of tau x^s and tau x^t (unscaled: their consumers scale them) for rows [r0, r1) and columns
// [c0, c1), contiguous views of the buffers, -inf on the excluded diagonal.
static std::pair<at::Tensor, at::Tensor> corr_tiles(const CorrOperands& o, TileBuffers& buf, int64_t r0, int64_t r1,
                                                    int64_t c0, int64_t c1, bool exclude_diag) {
  auto x_s = buf.s.narrow(0, 0, (r1 - r0) * (c1 - c0)).view({r1 - r0, c1 - c0});
  auto x_t = buf.t.narrow(0, 0, (r1 - r0) * (c1 - c0)).view({r1 - r0, c1 - c0});
  at::mm_out(x_s, o.a_s.slice(0, r0, r1), o.b_s.slice(0, c0, c1).t());
  at::mm_out(x_t, o.a_t.slice(0, r0, r1), o.b_t.slice(0, c0, c1).t());
  if (exclude_diag) {  // entries (i, i): tile coordinates (i - r0, i - c0), diagonal offset r0 - c0
    x_s.diagonal(r0 - c0).fill_(kNegInf);
    x_t.diagonal(r0 - c0).fill_(kNegInf);
  }
  return {x_s, x_t};
}

// One tile of the forward absorbed into its rows' running statistics (state: m^s, Z^s, m^t, Z^t, A).
// ATen version (CUDA, and fp64 on CPU, which the fp32 sweeps below cannot take): whole-tile ops,
// scaled by 1 / tau in place first.
static void absorb_tile_aten(at::Tensor& x_s, at::Tensor& x_t, double inv_tau, at::Tensor& state) {
  x_s.mul_(inv_tau);
  x_t.mul_(inv_tau);
  auto m_s = state[0], z_s = state[1], m_t = state[2], z_t = state[3], acc = state[4];
  auto new_m_s = at::maximum(m_s, std::get<0>(x_s.max(1)));
  auto ref_s = at::where(new_m_s == kNegInf, at::zeros_like(new_m_s), new_m_s);
  z_s.mul_((m_s - ref_s).exp()).add_((x_s - ref_s.unsqueeze(1)).exp().sum(1));
  auto new_m_t = at::maximum(m_t, std::get<0>(x_t.max(1)));
  auto ref_t = at::where(new_m_t == kNegInf, at::zeros_like(new_m_t), new_m_t);
  auto rescale = (m_t - ref_t).exp();
  auto e_t = (x_t - ref_t.unsqueeze(1)).exp();
  z_t.mul_(rescale).add_(e_t.sum(1));
  acc.mul_(rescale).add_(at::where(x_t == kNegInf, at::zeros_like(x_t), e_t * (x_t - x_s)).sum(1));
  m_s.copy_(new_m_s);
  m_t.copy_(new_m_t);
}

// CPU version: rows in parallel, each row of both tiles swept while it sits in L1 with the
// KL's sweeps (scale by 1 / tau and max, then the exps with Z^s, Z^t and A, 0 where x^t = -inf), instead
// of a dozen whole-tile ATen passes through memory.
static void absorb_tile_cpu(at::Tensor& x_s, at::Tensor& x_t, float inv_tau, at::Tensor& state) {
  const int64_t rows = x_s.size(0), cols = x_s.size(1);
  float* xs = x_s.data_ptr<float>();
  float* xt = x_t.data_ptr<float>();
  float* st = state.data_ptr<float>();
  const KlSweeps& sweeps = kl_sweeps();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> exps(2 * cols);
    for (int64_t i = begin; i < end; ++i) {
      float* v = xs + i * cols;
      float* u = xt + i * cols;
      float &m_s = st[i], &z_s = st[rows + i], &m_t = st[2 * rows + i], &z_t = st[3 * rows + i],
            &acc = st[4 * rows + i];
      const float new_m_s = std::max(m_s, sweeps.scale_and_max(v, inv_tau, v, cols));
      const float new_m_t = std::max(m_t, sweeps.scale_and_max(u, inv_tau, u, cols));
      const float ref_s = new_m_s == kNegInf ? 0.0f : new_m_s;
      const float ref_t = new_m_t == kNegInf ? 0.0f : new_m_t;
      const KlSums sums = sweeps.exp_and_sums(v, u, ref_s, ref_t, exps.data(), exps.data() + cols, cols);
      const float rescale = std::exp(m_t - ref_t);
      z_s = z_s * std::exp(m_s - ref_s) + static_cast<float>(sums.z_s);
      z_t = z_t * rescale + static_cast<float>(sums.z_t);
      acc = acc * rescale + static_cast<float>(sums.a);
      m_s = new_m_s;
      m_t = new_m_t;
    }
  });
}

// The backward's matmul operand g_i (Q - P)_ij / tau of one CPU tile, written over x_s:
// per row, scale, exps against the saved lse's, then e^s w - e^t w with w = g_i / tau (the KL's sweeps).
static at::Tensor grad_operand_tile_cpu(at::Tensor& x_s, at::Tensor& x_t, float inv_tau, const at::Tensor& lse_s,
                                        const at::Tensor& lse_t, const at::Tensor& g_over_tau) {
  const int64_t rows = x_s.size(0), cols = x_s.size(1);
  float* xs = x_s.data_ptr<float>();
  float* xt = x_t.data_ptr<float>();
  const auto ls = lse_s.contiguous(), lt = lse_t.contiguous(), gr = g_over_tau.contiguous();
  const float* ls_p = ls.const_data_ptr<float>();
  const float* lt_p = lt.const_data_ptr<float>();
  const float* gr_p = gr.const_data_ptr<float>();
  const KlSweeps& sweeps = kl_sweeps();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> exps(2 * cols);
    for (int64_t i = begin; i < end; ++i) {
      float* v = xs + i * cols;
      float* u = xt + i * cols;
      sweeps.scale_and_max(v, inv_tau, v, cols);
      sweeps.scale_and_max(u, inv_tau, u, cols);
      sweeps.exp_and_sums(v, u, ls_p[i], lt_p[i], exps.data(), exps.data() + cols, cols);
      sweeps.student_grad_row(exps.data(), exps.data() + cols, gr_p[i], gr_p[i], v, cols);
    }
  });
  return x_s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> correlation_fwd_tiled(const at::Tensor& a_s, const at::Tensor& a_t,
                                                                   const c10::optional<at::Tensor>& b_s,
                                                                   const c10::optional<at::Tensor>& b_t, double tau,
                                                                   bool exclude_diagonal) {
  const auto o = corr_operands(a_s, a_t, b_s, b_t);
  const int64_t m = o.a_s.size(0), n = o.b_s.size(0), kTile = corr_tile(a_s);
  const double inv_tau = 1.0 / tau;
  TileBuffers tiles(o.a_s, std::min(kTile, m) * std::min(kTile, n));
  auto loss = at::empty({m}, o.a_s.options());
  auto lse_s = at::empty({m}, o.a_s.options());
  auto lse_t = at::empty({m}, o.a_s.options());
  for (int64_t r0 = 0; r0 < m; r0 += kTile) {
    const int64_t r1 = std::min(m, r0 + kTile), rows = r1 - r0;
    // running m^s, Z^s, m^t, Z^t, A of the block's rows
    auto state = at::zeros({5, rows}, o.a_s.options());
    state[0].fill_(kNegInf);
    state[2].fill_(kNegInf);
    for (int64_t c0 = 0; c0 < n; c0 += kTile) {
      const int64_t c1 = std::min(n, c0 + kTile);
      auto [x_s, x_t] = corr_tiles(o, tiles, r0, r1, c0, c1, exclude_diagonal);
      if (x_s.is_cuda() || x_s.scalar_type() != at::kFloat)
        absorb_tile_aten(x_s, x_t, inv_tau, state);
      else
        absorb_tile_cpu(x_s, x_t, static_cast<float>(inv_tau), state);
    }
    auto ls = state[0] + state[1].log();
    auto lt = state[2] + state[3].log();
    loss.slice(0, r0, r1).copy_(state[4] / state[3] - lt + ls);
    lse_s.slice(0, r0, r1).copy_(ls);
    lse_t.slice(0, r0, r1).copy_(lt);
  }
  return {loss, lse_s, lse_t};
}

static at::Tensor norm_backward(const at::Tensor& x_hat, const at::Tensor& inv_norm, const at::Tensor& d_hat) {
  // x^ = x r with r = 1 / max(||x||, eps): d x = r (d x^ - x^ (x^ . d x^)) while ||x|| > eps.
  auto radial = (x_hat * d_hat).sum(1, true) * (inv_norm < 1.0 / kNormEps).unsqueeze(1);
  return inv_norm.unsqueeze(1) * (d_hat - x_hat * radial);
}

std::tuple<at::Tensor, at::Tensor> correlation_bwd_tiled(const at::Tensor& grad_rows, const at::Tensor& a_s,
                                                       const at::Tensor& a_t, const c10::optional<at::Tensor>& b_s,
                                                       const c10::optional<at::Tensor>& b_t, const at::Tensor& lse_s,
                                                       const at::Tensor& lse_t, double tau, bool exclude_diagonal) {
  const auto o = corr_operands(a_s, a_t, b_s, b_t);
  const int64_t m = o.a_s.size(0), n = o.b_s.size(0), kTile = corr_tile(a_s);
  const double inv_tau = 1.0 / tau;
  TileBuffers tiles(o.a_s, std::min(kTile, m) * std::min(kTile, n));
  auto g = grad_rows.to(o.a_s.scalar_type()).contiguous();
  const auto lse_s_m = lse_s.to(o.a_s.scalar_type()), lse_t_m = lse_t.to(o.a_s.scalar_type());
  const bool aten_tiles = o.a_s.is_cuda() || o.a_s.scalar_type() != at::kFloat;  // CUDA, or fp64 on CPU
  auto d_a_hat = at::zeros_like(o.a_s);
  auto d_b_hat = at::zeros_like(o.b_s);
  for (int64_t r0 = 0; r0 < m; r0 += kTile) {
    const int64_t r1 = std::min(m, r0 + kTile);
    auto ls = lse_s_m.slice(0, r0, r1).unsqueeze(1);
    auto lt = lse_t_m.slice(0, r0, r1).unsqueeze(1);
    auto gr = g.slice(0, r0, r1).unsqueeze(1) * inv_tau;
    for (int64_t c0 = 0; c0 < n; c0 += kTile) {
      const int64_t c1 = std::min(n, c0 + kTile);
      auto [x_s, x_t] = corr_tiles(o, tiles, r0, r1, c0, c1, exclude_diagonal);
      // g_i (Q - P)_ij / tau
      auto w = aten_tiles ? gr * ((x_s.mul_(inv_tau) - ls).exp() - (x_t.mul_(inv_tau) - lt).exp())
                             : grad_operand_tile_cpu(x_s, x_t, static_cast<float>(inv_tau), ls, lt, gr);
      d_a_hat.slice(0, r0, r1).addmm_(w, o.b_s.slice(0, c0, c1));
      d_b_hat.slice(0, c0, c1).addmm_(w.t(), o.a_s.slice(0, r0, r1));
    }
  }
  if (o.square) {
    auto d_a = norm_backward(o.a_s, o.ra_s, d_a_hat + d_b_hat).to(a_s.scalar_type());
    return {d_a, at::empty({0}, a_s.options())};
  }
  auto d_a = norm_backward(o.a_s, o.ra_s, d_a_hat).to(a_s.scalar_type());
  auto d_b = norm_backward(o.b_s, o.rb_s, d_b_hat).to(b_s->scalar_type());
  return {d_a, d_b};
}

bool built_with_cuda() {
#ifdef MLKD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(mlkd_fast, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("kd_kl(Tensor student, Tensor teacher, Tensor? row_weight, float temperature, bool student_grad, "
        "bool teacher_grad) -> (Tensor, Tensor, Tensor)");
  m.def("scale_rows(Tensor x, Tensor g) -> Tensor");
  m.def("scale_rows_(Tensor(a!) x, Tensor g) -> ()");
  m.def("correlation_fwd(Tensor student_rows, Tensor teacher_rows, Tensor? student_cols, Tensor? teacher_cols, "
        "float tau, bool exclude_diagonal) -> (Tensor, Tensor, Tensor)");
  m.def("correlation_bwd(Tensor grad_rows, Tensor student_rows, Tensor teacher_rows, Tensor? student_cols, "
        "Tensor? teacher_cols, Tensor lse_s, Tensor lse_t, float tau, bool exclude_diagonal) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mlkd_fast, CPU, m) {
  m.impl("kd_kl", &kd_kl_cpu);
  m.impl("scale_rows", &scale_rows_cpu);
  m.impl("scale_rows_", &scale_rows_inplace_cpu);
  m.impl("correlation_fwd", &correlation_fwd_tiled);
  m.impl("correlation_bwd", &correlation_bwd_tiled);
}

#ifdef MLKD_WITH_CUDA
static CudaDtype cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CudaDtype::kFloat;
    case at::kHalf: return CudaDtype::kHalf;
    case at::kBFloat16: return CudaDtype::kBFloat16;
    default: TORCH_CHECK(false, "mlkd_fast CUDA kernels take float32, float16 or bfloat16, got ", t);
  }
}

// kd_kl in fp64 with ATen ops (the same formulas as the CPU kernels): the CUDA KL kernels compute in
// fp32 and read fp32/fp16/bf16 only, and fp64 inputs must keep fp64 math. Materialises a few (N, C)
// fp64 temporaries: fp64 is the accuracy path, not a speed target.
static std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_kl_aten_f64(const at::Tensor& student, const at::Tensor& teacher,
                                                                     const at::Tensor& weight, double temperature,
                                                                     bool student_grad, bool teacher_grad) {
  const double neg_inf = -std::numeric_limits<double>::infinity();
  const auto v = student.to(at::kDouble) / temperature;
  const auto u = teacher.to(at::kDouble) / temperature;
  const auto log_q = at::log_softmax(v, 1);
  const auto log_p = at::log_softmax(u, 1);
  const auto p = log_p.exp();
  const auto masked = u == neg_inf;  // a -inf teacher logit: p = 0, contributes exactly 0
  const auto zero = at::zeros({}, v.options());
  const auto kl = at::where(masked, zero, p * (log_p - log_q)).sum(1);
  const auto keep = weight.defined() ? weight.to(at::kDouble) : at::ones({v.size(0)}, v.options());
  const auto dropped = (keep == 0).unsqueeze(1);  // weight 0: exactly 0, whatever the row holds
  auto rows = at::where(keep == 0, zero, kl * (temperature * temperature) * keep);
  const auto w = (keep * temperature).unsqueeze(1);
  auto grad_s = student_grad ? at::where(dropped, zero, (log_q.exp() - p) * w).to(student.scalar_type())
                             : at::empty({0}, student.options());
  auto grad_t = teacher_grad
                    ? at::where(dropped | masked, zero, p * (log_p - log_q - kl.unsqueeze(1)) * w).to(teacher.scalar_type())
                    : at::empty({0}, teacher.options());
  return {rows, grad_s, grad_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_kl_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                          const c10::optional<at::Tensor>& row_weight,
                                                          double temperature, bool student_grad, bool teacher_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  if (kl_math_type(student, teacher) == at::kDouble) {
    auto out = kd_kl_outputs(student, teacher, row_weight, false, false);  // the checks; outputs come from ATen
    return kd_kl_aten_f64(student, teacher, out.weight, temperature, student_grad, teacher_grad);
  }
  if (student.scalar_type() != teacher.scalar_type()) {
    // The CUDA kernels read one dtype: the narrower input is widened (one copy of it) and its stored
    // gradient narrowed back to its own dtype.
    const auto common = at::promote_types(student.scalar_type(), teacher.scalar_type());
    auto [rows, gs, gt] = kd_kl_cuda(student.to(common), teacher.to(common), row_weight, temperature, student_grad,
                                     teacher_grad);
    return {rows, student_grad ? gs.to(student.scalar_type()) : at::empty({0}, student.options()),
            teacher_grad ? gt.to(teacher.scalar_type()) : at::empty({0}, teacher.options())};
  }
  auto [rows, grad_s, grad_t, weight] = kd_kl_outputs(student, teacher, row_weight, student_grad, teacher_grad);
  const int64_t n = student.size(0), c = student.size(1);
  KdKlArgs args{cuda_dtype(student.scalar_type()), student.const_data_ptr(), student.stride(0),
                teacher.const_data_ptr(), teacher.stride(0), weight.defined() ? weight.const_data_ptr<float>() : nullptr,
                rows.mutable_data_ptr<float>(), student_grad ? grad_s.mutable_data_ptr() : nullptr,
                teacher_grad ? grad_t.mutable_data_ptr() : nullptr, n, c, static_cast<float>(temperature)};
  const KdKlSplit split = kd_kl_cuda_split(n, c);
  at::Tensor partials;
  if (split.splits > 1) {
    partials = at::empty({n, split.splits, 5}, student.options().dtype(at::kFloat));
    args.splits = split.splits;
    args.span = split.span;
    args.partials = partials.mutable_data_ptr<float>();
  }
  const cudaError_t err = kd_kl_cuda_launch(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "kd_kl CUDA kernel launch failed: ", cudaGetErrorString(err));
  return {rows, grad_s, grad_t};
}

at::Tensor scale_rows_cuda(const at::Tensor& x, const at::Tensor& g) {
  TORCH_CHECK(x.dim() == 2 && g.dim() == 1 && g.size(0) == x.size(0), "scale_rows: x (N, C) and g (N,)");
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.scalar_type() == at::kDouble) return x * g.to(at::kDouble).unsqueeze(1);  // the kernel is fp32-math only
  auto xc = x.contiguous();
  auto gc = g.to(at::kFloat).contiguous();
  auto out = at::empty_like(xc);
  const cudaError_t err = scale_rows_cuda_launch(cuda_dtype(x.scalar_type()), xc.const_data_ptr(),
                                                 gc.const_data_ptr<float>(), out.mutable_data_ptr(), xc.size(0),
                                                 xc.size(1), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "scale_rows CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

void scale_rows_inplace_cuda(const at::Tensor& x, const at::Tensor& g) {
  TORCH_CHECK(x.dim() == 2 && g.dim() == 1 && g.size(0) == x.size(0), "scale_rows_: x (N, C) and g (N,)");
  TORCH_CHECK(x.stride(1) == 1, "scale_rows_: the last stride of x must be 1");
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.scalar_type() == at::kDouble) {  // the kernel is fp32-math only
    x.mul_(g.to(at::kDouble).unsqueeze(1));
    return;
  }
  auto gc = g.to(at::kFloat).contiguous();
  const cudaError_t err = scale_rows_inplace_cuda_launch(cuda_dtype(x.scalar_type()), x.mutable_data_ptr(), x.stride(0),
                                                         gc.const_data_ptr<float>(), x.size(0), x.size(1),
                                                         c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "scale_rows_ CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// Correlation on CUDA: fp16/bf16 features (one dtype for all four) on sm_80+ take the fused tensor-core
// kernels of correlation_cuda.cu; fp32, mixed dtypes (and MLKD_FAST_CORR_TILED=1) the tiled cuBLAS code
// above in fp32, and fp64 the same code in fp64 (the fused kernels have fp16/bf16 tensor-core tiles only,
// and fp64 inputs must keep fp64 math).
static bool corr_fused(const at::Tensor& a_s, const at::Tensor& a_t, const c10::optional<at::Tensor>& b_s,
                       const c10::optional<at::Tensor>& b_t) {
  const auto t = a_s.scalar_type();
  if (t != at::kHalf && t != at::kBFloat16) return false;
  if (a_t.scalar_type() != t || (b_s && b_s->scalar_type() != t) || (b_t && b_t->scalar_type() != t)) return false;
  const char* tiled = std::getenv("MLKD_FAST_CORR_TILED");  // read per call: benchmarks compare both paths
  if (tiled != nullptr && *tiled != '\0' && std::strcmp(tiled, "0") != 0) return false;
  return correlation_cuda_fused_supported(cuda_dtype(t));
}

struct FusedCorr {
  at::Tensor a_s, a_t, b_s, b_t;      // contiguous features (b = a in square mode)
  at::Tensor ra_s, ra_t, rb_s, rb_t;  // fp32 inverse norms
  CorrSide side_a() const {
    return {a_s.const_data_ptr(), a_s.stride(0), a_t.const_data_ptr(), a_t.stride(0), ra_s.const_data_ptr<float>(),
            ra_t.const_data_ptr<float>(), a_s.size(0)};
  }
  CorrSide side_b() const {
    return {b_s.const_data_ptr(), b_s.stride(0), b_t.const_data_ptr(), b_t.stride(0), rb_s.const_data_ptr<float>(),
            rb_t.const_data_ptr<float>(), b_s.size(0)};
  }
};

static FusedCorr fused_corr(const at::Tensor& a_s, const at::Tensor& a_t, const c10::optional<at::Tensor>& b_s,
                            const c10::optional<at::Tensor>& b_t) {
  FusedCorr f;
  f.a_s = a_s.contiguous();
  f.a_t = a_t.contiguous();
  f.ra_s = inv_norms(f.a_s, at::kFloat);
  f.ra_t = inv_norms(f.a_t, at::kFloat);
  if (b_s.has_value()) {
    f.b_s = b_s->contiguous();
    f.b_t = b_t->contiguous();
    f.rb_s = inv_norms(f.b_s, at::kFloat);
    f.rb_t = inv_norms(f.b_t, at::kFloat);
  } else {
    f.b_s = f.a_s;
    f.b_t = f.a_t;
    f.rb_s = f.ra_s;
    f.rb_t = f.ra_t;
  }
  return f;
}

// (1,) fp32 power of two S with max |factors| S ~ min(count, 1024), computed on the device.
static at::Tensor operand_scale(const at::Tensor& factors, int64_t count) {
  const double target = static_cast<double>(std::min<int64_t>(count, 1024));
  return at::exp2(at::floor(at::log2(factors.abs().amax().clamp_min(1e-30).reciprocal() * target))).reshape({1});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> correlation_fwd_cuda(const at::Tensor& a_s, const at::Tensor& a_t,
                                                                  const c10::optional<at::Tensor>& b_s,
                                                                  const c10::optional<at::Tensor>& b_t, double tau,
                                                                  bool exclude_diagonal) {
  const c10::cuda::CUDAGuard guard(a_s.device());
  if (!corr_fused(a_s, a_t, b_s, b_t)) return correlation_fwd_tiled(a_s, a_t, b_s, b_t, tau, exclude_diagonal);
  const FusedCorr f = fused_corr(a_s, a_t, b_s, b_t);
  const int64_t m = a_s.size(0);
  auto loss = at::empty({m}, f.ra_s.options());
  auto lse_s = at::empty({m}, f.ra_s.options());
  auto lse_t = at::empty({m}, f.ra_s.options());
  CorrArgs args{cuda_dtype(a_s.scalar_type()), f.side_a(), f.side_b(), a_s.size(1), a_t.size(1),
                static_cast<float>(1.0 / tau), exclude_diagonal};
  args.loss = loss.mutable_data_ptr<float>();
  args.lse_s_out = lse_s.mutable_data_ptr<float>();
  args.lse_t_out = lse_t.mutable_data_ptr<float>();
  const CorrSplit split = correlation_cuda_split(m, f.b_s.size(0), a_s.size(1), false);
  at::Tensor partials;
  if (split.splits > 1) {
    partials = at::empty({split.splits, m, 5}, f.ra_s.options());
    args.col_splits = split.splits;
    args.col_span = split.span;
    args.partials = partials.mutable_data_ptr<float>();
  }
  const cudaError_t err = correlation_fwd_cuda_launch(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "correlation_fwd CUDA kernel launch failed: ", cudaGetErrorString(err));
  return {loss, lse_s, lse_t};
}

// The student's inverse norms as the fused backward passes take them: 0 for all-zero rows. Such a row's
// similarities are 0 whatever its factor and its matmul contribution is exactly 0, but its clamped
// 1 / eps would set the fp16/bf16 operand scale (operand_scale) and flush every other entry of the
// operands to zero. The normalisation backward keeps 1 / eps.
static at::Tensor pass_inv_norms(const at::Tensor& x, const at::Tensor& inv_norm) {
  if (x.size(1) == 0) return inv_norm;
  return inv_norm.masked_fill(x.abs().amax(1) == 0, 0.0);
}

std::tuple<at::Tensor, at::Tensor> correlation_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& a_s,
                                                      const at::Tensor& a_t, const c10::optional<at::Tensor>& b_s,
                                                      const c10::optional<at::Tensor>& b_t, const at::Tensor& lse_s,
                                                      const at::Tensor& lse_t, double tau, bool exclude_diagonal) {
  const c10::cuda::CUDAGuard guard(a_s.device());
  if (!corr_fused(a_s, a_t, b_s, b_t))
    return correlation_bwd_tiled(grad_rows, a_s, a_t, b_s, b_t, lse_s, lse_t, tau, exclude_diagonal);
  const FusedCorr f = fused_corr(a_s, a_t, b_s, b_t);
  FusedCorr passes = f;  // the passes' inverse norms (pass_inv_norms); f keeps the true ones
  passes.ra_s = pass_inv_norms(f.a_s, f.ra_s);
  passes.rb_s = b_s.has_value() ? pass_inv_norms(f.b_s, f.rb_s) : passes.ra_s;
  const int64_t m = f.a_s.size(0), n = f.b_s.size(0), ds = f.a_s.size(1);
  const auto g = grad_rows.to(at::kFloat).contiguous();
  const auto ls = lse_s.to(at::kFloat).contiguous();
  const auto lt = lse_t.to(at::kFloat).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  auto pass = [&](const CorrSide& rows, const CorrSide& cols, bool stats_on_cols, const at::Tensor& scale,
                  at::Tensor& d_rows) {
    CorrArgs args{cuda_dtype(a_s.scalar_type()), rows, cols, ds, f.a_t.size(1), static_cast<float>(1.0 / tau),
                  exclude_diagonal};
    args.lse_s = ls.const_data_ptr<float>();
    args.lse_t = lt.const_data_ptr<float>();
    args.grad = g.const_data_ptr<float>();
    args.stats_on_cols = stats_on_cols;
    args.operand_scale = scale.const_data_ptr<float>();
    args.d_rows = d_rows.mutable_data_ptr<float>();
    args.d_rows_stride = d_rows.stride(0);
    const CorrSplit split = correlation_cuda_split(rows.n, cols.n, ds, true);
    at::Tensor partials;
    if (split.splits > 1) {
      partials = at::empty({split.splits, rows.n, ds}, f.ra_s.options());
      args.col_splits = split.splits;
      args.col_span = split.span;
      args.partials = partials.mutable_data_ptr<float>();
    }
    const cudaError_t err = correlation_bwd_cuda_launch(args, stream);
    TORCH_CHECK(err == cudaSuccess, "correlation_bwd CUDA kernel launch failed: ", cudaGetErrorString(err));
  };
  auto d_a_hat = at::empty({m, ds}, f.ra_s.options());
  auto d_b_hat = at::empty({n, ds}, f.ra_s.options());
  const auto scale_rows_pass = operand_scale(passes.rb_s, n);
  const auto scale_cols_pass = operand_scale(g * passes.ra_s * (1.0 / tau), m);
  pass(passes.side_a(), passes.side_b(), false, scale_rows_pass, d_a_hat);
  pass(passes.side_b(), passes.side_a(), true, scale_cols_pass, d_b_hat);
  const auto a_hat = f.a_s.to(at::kFloat) * f.ra_s.unsqueeze(1);
  if (!b_s.has_value()) {
    return {norm_backward(a_hat, f.ra_s, d_a_hat + d_b_hat).to(a_s.scalar_type()), at::empty({0}, a_s.options())};
  }
  const auto b_hat = f.b_s.to(at::kFloat) * f.rb_s.unsqueeze(1);
  return {norm_backward(a_hat, f.ra_s, d_a_hat).to(a_s.scalar_type()),
          norm_backward(b_hat, f.rb_s, d_b_hat).to(b_s->scalar_type())};
}

TORCH_LIBRARY_IMPL(mlkd_fast, CUDA, m) {
  m.impl("kd_kl", &kd_kl_cuda);
  m.impl("scale_rows", &scale_rows_cuda);
  m.impl("scale_rows_", &scale_rows_inplace_cuda);
  m.impl("correlation_fwd", &correlation_fwd_cuda);
  m.impl("correlation_bwd", &correlation_bwd_cuda);
}
#endif

}  // namespace mlkd_fast
