// The KL's row sweeps (kl_sweeps.h): scalar, and AVX2+FMA with a vectorised exp. Torch-free.
#include "kl_sweeps.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "../common.h"

namespace mlkd_fast {

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

const KlSweeps& kl_sweeps() {
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

}  // namespace mlkd_fast
