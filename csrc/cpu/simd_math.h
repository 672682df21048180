// The vectorised e^x and the horizontal reductions shared by the KL's sweeps (kl_sweeps.cpp) and the
// language-model loss's row math (lm_sweeps.cpp), for AVX2+FMA (8 lanes) and AVX-512 (16 lanes).
// Each function carries its own target attribute, so it inlines into callers compiled for the same
// or a wider ISA and never into plain SSE code. Torch-free.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MLKD_HAVE_SIMD_MATH 1
#endif

namespace mlkd_fast {
namespace simd {

// e^x: x = k ln2 + r, |r| <= ln2 / 2, e^r by the degree-6 Cephes polynomial (~1 ulp), 2^k through
// the exponent. Exactly 0 below kExpLow (so a -inf logit gives p = 0); NaN stays NaN.
constexpr float kExpLow = -87.0f, kExpHigh = 88.0f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500e-4f, kExpP1 = 1.3981999507e-3f, kExpP2 = 8.3334519073e-3f,
                kExpP3 = 4.1665795894e-2f, kExpP4 = 1.6666665459e-1f, kExpP5 = 5.0000001201e-1f;

#ifdef MLKD_HAVE_SIMD_MATH
#define MLKD_SIMD_AVX2 __attribute__((target("avx2,fma")))
#define MLKD_SIMD_AVX512 __attribute__((target("avx512f,avx2,fma")))

MLKD_SIMD_AVX2 static inline __m256 exp_avx2(__m256 x) {
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

MLKD_SIMD_AVX2 static inline float hsum_avx2(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

MLKD_SIMD_AVX2 static inline float hmax_avx2(__m256 x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

MLKD_SIMD_AVX512 static inline __m512 exp_avx512(__m512 x) {
  // No clamping: below kExpLow the result is zeroed by the mask (also for x = -inf, where r is NaN),
  // scalef saturates to inf above ~88.7 as e^x does in fp32, and NaN stays NaN throughout.
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Lo), _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Hi), x));
  __m512 p = _mm512_set1_ps(kExpP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP5));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512 e = _mm512_scalef_ps(y, k);  // y 2^k
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLow), _CMP_NLT_UQ), e);
}

// GCC's _mm512_reduce_* warn about their undefined start values: reduce through the 256-bit halves.
MLKD_SIMD_AVX512 static inline __m256 high_half_avx512(__m512 x) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
}

MLKD_SIMD_AVX512 static inline float hsum_avx512(__m512 x) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(x), high_half_avx512(x));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

MLKD_SIMD_AVX512 static inline float hmax_avx512(__m512 x) {
  const __m256 h = _mm256_max_ps(_mm512_castps512_ps256(x), high_half_avx512(x));
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

#undef MLKD_SIMD_AVX2
#undef MLKD_SIMD_AVX512
#endif  // MLKD_HAVE_SIMD_MATH

}  // namespace simd
}  // namespace mlkd_fast
