// The row math of the fused lm_head + divergence loss (lm_sweeps.h): one body (lm_sweeps_body.inc)
// compiled for three vector types, scalar, AVX2+FMA and AVX-512, each with a vectorised exp (simd_math.h,
// shared with kl_sweeps.cpp) and log (Cephes logf). Torch-free.
#include "lm_sweeps.h"

// GCC 12's AVX-512 headers start unmasked intrinsics from _mm512_undefined_*() (see kl_sweeps.cpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <cmath>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MLKD_LM_SIMD 1
#endif

#include "kl_sweeps.h"
#include "simd_math.h"

namespace mlkd_fast {

namespace {
using namespace simd;  // e^x's constants (simd_math.h)
// log x = e ln2 + log m, m in [sqrt(1/2), sqrt(2)), log(1 + r) by Cephes logf's polynomial
constexpr float kSqrtHalf = 0.707106781186547524f;
constexpr float kLogP0 = 7.0376836292e-2f, kLogP1 = -1.1514610310e-1f, kLogP2 = 1.1676998740e-1f,
                kLogP3 = -1.2420140846e-1f, kLogP4 = 1.4249322787e-1f, kLogP5 = -1.6668057665e-1f,
                kLogP6 = 2.0000714765e-1f, kLogP7 = -2.4999993993e-1f, kLogP8 = 3.3333331174e-1f;
}  // namespace

// ---- scalar ----
namespace lm_scalar {
struct V {
  using T = float;
  using M = bool;
  static constexpr int W = 1;
  static inline T load(const float* p) { return *p; }
  static inline void store(float* p, T v) { *p = v; }
  static inline T set1(float f) { return f; }
  static inline T zero() { return 0.0f; }
  static inline T add(T a, T b) { return a + b; }
  static inline T sub(T a, T b) { return a - b; }
  static inline T mul(T a, T b) { return a * b; }
  static inline T div(T a, T b) { return a / b; }
  static inline T fma(T a, T b, T c) { return a * b + c; }
  static inline T max(T a, T b) { return a > b ? a : b; }  // NaN in a loses
  static inline T min(T a, T b) { return a < b ? a : b; }
  static inline T abs(T a) { return std::fabs(a); }
  static inline M lt(T a, T b) { return a < b; }
  static inline M gt(T a, T b) { return a > b; }
  static inline M eq(T a, T b) { return a == b; }
  static inline M neq(T a, T b) { return !(a == b); }
  static inline T sel(M m, T a, T b) { return m ? a : b; }
  static inline float hsum(T a) { return a; }
  static inline float hmax(T a) { return a; }
  static inline T exp(T x) {
    if (x != x) return x;
    if (x < kExpLow) return 0.0f;
    const float xc = x > kExpHigh ? kExpHigh : x;
    const float k = std::nearbyint(xc * kLog2e);
    const float r = (xc - k * kLn2Hi) - k * kLn2Lo;
    float p = kExpP0;
    p = p * r + kExpP1;
    p = p * r + kExpP2;
    p = p * r + kExpP3;
    p = p * r + kExpP4;
    p = p * r + kExpP5;
    const float y = p * r * r + r + 1.0f;
    return std::ldexp(y, static_cast<int>(k));
  }
  static inline T log(T x) {
    if (!(x > 0.0f) || x == HUGE_VALF) return x == 0.0f ? -HUGE_VALF : (x == HUGE_VALF ? x : NAN);
    int e;
    float m = std::frexp(x, &e);  // m in [1/2, 1)
    if (m < kSqrtHalf) {
      m = 2.0f * m;
      e -= 1;
    }
    const float r = m - 1.0f, z = r * r;
    float y = kLogP0;
    y = y * r + kLogP1;
    y = y * r + kLogP2;
    y = y * r + kLogP3;
    y = y * r + kLogP4;
    y = y * r + kLogP5;
    y = y * r + kLogP6;
    y = y * r + kLogP7;
    y = y * r + kLogP8;
    y = y * r * z;
    const float fe = static_cast<float>(e);
    y += fe * kLn2Lo;
    y += -0.5f * z;
    return (r + y) + fe * kLn2Hi;
  }
};
#include "lm_sweeps_body.inc"
}  // namespace lm_scalar

#ifdef MLKD_LM_SIMD
// The vector versions: every function of their namespaces (the lambdas and templates of the body
// included) is compiled for the ISA, so the body never calls scalar SSE-encoded code (kl_sweeps.h).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace lm_avx2 {
struct V {
  using T = __m256;
  using M = __m256;
  static constexpr int W = 8;
  static inline T load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static inline T set1(float f) { return _mm256_set1_ps(f); }
  static inline T zero() { return _mm256_setzero_ps(); }
  static inline T add(T a, T b) { return _mm256_add_ps(a, b); }
  static inline T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static inline T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static inline T div(T a, T b) { return _mm256_div_ps(a, b); }
  static inline T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static inline T max(T a, T b) { return _mm256_max_ps(a, b); }  // NaN in a loses
  static inline T min(T a, T b) { return _mm256_min_ps(a, b); }
  static inline T abs(T a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static inline M lt(T a, T b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static inline M gt(T a, T b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static inline M eq(T a, T b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static inline M neq(T a, T b) { return _mm256_cmp_ps(a, b, _CMP_NEQ_UQ); }
  static inline T sel(M m, T a, T b) { return _mm256_blendv_ps(b, a, m); }
  static inline float hsum(T x) { return simd::hsum_avx2(x); }
  static inline float hmax(T x) { return simd::hmax_avx2(x); }
  static inline T exp(T x) { return simd::exp_avx2(x); }
  static inline T log(T x) {
    const __m256i bits = _mm256_castps_si256(x);
    __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
    T m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)),
                                              _mm256_set1_epi32(0x3f800000)));  // [1, 2)
    const T big = _mm256_cmp_ps(m, set1(2.0f * kSqrtHalf), _CMP_GT_OQ);        // to [sqrt(1/2), sqrt(2))
    m = sel(big, _mm256_mul_ps(m, set1(0.5f)), m);
    e = _mm256_add_epi32(e, _mm256_and_si256(_mm256_castps_si256(big), _mm256_set1_epi32(1)));
    const T fe = _mm256_cvtepi32_ps(e);
    const T r = _mm256_sub_ps(m, set1(1.0f)), z = _mm256_mul_ps(r, r);
    T y = set1(kLogP0);
    y = fma(y, r, set1(kLogP1));
    y = fma(y, r, set1(kLogP2));
    y = fma(y, r, set1(kLogP3));
    y = fma(y, r, set1(kLogP4));
    y = fma(y, r, set1(kLogP5));
    y = fma(y, r, set1(kLogP6));
    y = fma(y, r, set1(kLogP7));
    y = fma(y, r, set1(kLogP8));
    y = _mm256_mul_ps(_mm256_mul_ps(y, r), z);
    y = fma(fe, set1(kLn2Lo), y);
    y = fma(set1(-0.5f), z, y);
    T out = fma(fe, set1(kLn2Hi), _mm256_add_ps(r, y));
    // specials: 0 -> -inf, inf -> inf, negative or NaN -> NaN (subnormals are not handled: not used)
    out = sel(_mm256_cmp_ps(x, zero(), _CMP_EQ_OQ), set1(-HUGE_VALF), out);
    out = sel(_mm256_cmp_ps(x, set1(HUGE_VALF), _CMP_EQ_OQ), x, out);
    return sel(_mm256_cmp_ps(x, zero(), _CMP_NLT_UQ), out, set1(NAN));
  }
};
#include "lm_sweeps_body.inc"
}  // namespace lm_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#endif
namespace lm_avx512 {
struct V {
  using T = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  static inline T load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static inline T set1(float f) { return _mm512_set1_ps(f); }
  static inline T zero() { return _mm512_setzero_ps(); }
  static inline T add(T a, T b) { return _mm512_add_ps(a, b); }
  static inline T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static inline T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static inline T div(T a, T b) { return _mm512_div_ps(a, b); }
  static inline T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static inline T max(T a, T b) { return _mm512_max_ps(a, b); }  // NaN in a loses
  static inline T min(T a, T b) { return _mm512_min_ps(a, b); }
  static inline T abs(T a) {
    return _mm512_castsi512_ps(_mm512_and_epi32(_mm512_castps_si512(a), _mm512_set1_epi32(0x7fffffff)));
  }
  static inline M lt(T a, T b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static inline M gt(T a, T b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static inline M eq(T a, T b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static inline M neq(T a, T b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ); }
  static inline T sel(M m, T a, T b) { return _mm512_mask_blend_ps(m, b, a); }
  static inline float hsum(T x) { return simd::hsum_avx512(x); }
  static inline float hmax(T x) { return simd::hmax_avx512(x); }
  static inline T exp(T x) { return simd::exp_avx512(x); }
  static inline T log(T x) {
    // x = 2^e m, m in [1, 2) (getexp / getmant), moved to [sqrt(1/2), sqrt(2))
    T e = _mm512_getexp_ps(x);
    T m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
    const M big = _mm512_cmp_ps_mask(m, set1(2.0f * kSqrtHalf), _CMP_GT_OQ);
    m = _mm512_mask_mul_ps(m, big, m, set1(0.5f));
    e = _mm512_mask_add_ps(e, big, e, set1(1.0f));
    const T r = _mm512_sub_ps(m, set1(1.0f)), z = _mm512_mul_ps(r, r);
    T y = set1(kLogP0);
    y = fma(y, r, set1(kLogP1));
    y = fma(y, r, set1(kLogP2));
    y = fma(y, r, set1(kLogP3));
    y = fma(y, r, set1(kLogP4));
    y = fma(y, r, set1(kLogP5));
    y = fma(y, r, set1(kLogP6));
    y = fma(y, r, set1(kLogP7));
    y = fma(y, r, set1(kLogP8));
    y = _mm512_mul_ps(_mm512_mul_ps(y, r), z);
    y = fma(e, set1(kLn2Lo), y);
    y = fma(set1(-0.5f), z, y);
    T out = fma(e, set1(kLn2Hi), _mm512_add_ps(r, y));
    out = sel(eq(x, zero()), set1(-HUGE_VALF), out);
    out = sel(eq(x, set1(HUGE_VALF)), x, out);
    return sel(_mm512_cmp_ps_mask(x, zero(), _CMP_NLT_UQ), out, set1(NAN));
  }
};
#include "lm_sweeps_body.inc"
}  // namespace lm_avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // MLKD_LM_SIMD

const LmSweeps& lm_sweeps() {
  static const LmSweeps sweeps = [] {
    const char* name = kl_sweeps().name;  // the same choice as the KL's sweeps
#ifdef MLKD_LM_SIMD
    if (std::strcmp(name, "avx512") == 0) return LmSweeps{"avx512", lm_avx512::row};
    if (std::strcmp(name, "avx2") == 0) return LmSweeps{"avx2", lm_avx2::row};
#endif
    (void)name;
    return LmSweeps{"scalar", lm_scalar::row};
  }();
  return sweeps;
}

}  // namespace mlkd_fast
