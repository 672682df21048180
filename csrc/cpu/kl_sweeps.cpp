// The KL's row sweeps (kl_sweeps.h): scalar, AVX2+FMA and AVX-512, each with a vectorised exp. Torch-free.
#include "kl_sweeps.h"

// GCC 12's AVX-512 headers start unmasked intrinsics from _mm512_undefined_*(), which -Wall reports as
// uninitialised at every inlined use; the values are never read.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "../common.h"
#include "simd_math.h"

namespace mlkd_fast {

constexpr int64_t kSumBlock = 1024;

// e^x's constants and vector versions: simd_math.h; the scalar exp here rounds k with a magic number.
using namespace simd;
constexpr float kRoundMagic = 12582912.0f;

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
static RowMax max2(const float* x, const float* y, int64_t c) {
  float mx = kNegInf, my = kNegInf;
  for (int64_t j = 0; j < c; ++j) {
    mx = x[j] > mx ? x[j] : mx;  // NaN never wins; it reaches the sums and so the loss
    my = y[j] > my ? y[j] : my;
  }
  return {mx, my};
}

static KlSums exp_sums(const float* x, const float* y, float scale, float m_x, float m_y, float* e_x, float* e_y,
                       int64_t c) {
  KlSums sums;
  for (int64_t b0 = 0; b0 < c; b0 += kSumBlock) {
    const int64_t b1 = std::min(c, b0 + kSumBlock);
    float aa = 0.0f;
    for (int64_t j = b0; j < b1; ++j) {
      const float ex = exp_scalar(x[j] * scale - m_x), ey = exp_scalar(y[j] * scale - m_y);
      e_x[j] = ex;
      e_y[j] = ey;
      sums.z_x += ex;  // Z in double: see the AVX-512 exp_sums
      sums.z_y += ey;
      aa += y[j] == kNegInf ? 0.0f : ey * (y[j] - x[j]);
    }
    sums.a += aa;
  }
  return sums;
}

static void student_grad(const float* e_x, const float* e_y, float w_x, float w_y, float* out, int64_t c) {
  for (int64_t j = 0; j < c; ++j) out[j] = e_x[j] * w_x - e_y[j] * w_y;
}

static void no_fence() {}

static void teacher_grad(const float* x, const float* y, float scale, const float* e_y, float w_y, float offset,
                         float* out, int64_t c) {
  for (int64_t j = 0; j < c; ++j)
    out[j] = y[j] == kNegInf ? 0.0f : e_y[j] * w_y * ((y[j] - x[j]) * scale + offset);
}

static void diff_exp(const float* x, const float* y, float scale, float m_x, float m_y, float w_x, float w_y,
                     float* out, int64_t c) {
  for (int64_t j = 0; j < c; ++j)
    out[j] = w_x * exp_scalar(x[j] * scale - m_x) - w_y * exp_scalar(y[j] * scale - m_y);
}

static double sumsq(const float* x, int64_t c) {
  double acc = 0.0;
  for (int64_t j = 0; j < c; ++j) acc += static_cast<double>(x[j]) * x[j];
  return acc;
}

static double dot(const float* x, const float* y, int64_t c) {
  double acc = 0.0;
  for (int64_t j = 0; j < c; ++j) acc += static_cast<double>(x[j]) * y[j];
  return acc;
}

static void axpby(const float* x, float a, const float* y, float b, float* out, int64_t c) {
  for (int64_t j = 0; j < c; ++j) out[j] = a * x[j] + b * y[j];
}
}  // namespace scalar_sweeps

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MLKD_HAVE_SIMD_SWEEPS 1

// ---- AVX2 + FMA: 8 lanes; a row's last c % 8 entries go through an 8-wide stack buffer padded with
// neutral values (-inf, 0), in the same (VEX-encoded) function ----
namespace avx2_sweeps {
#define MLKD_AVX2 __attribute__((target("avx2,fma")))

// a tail of n < 8 entries copied into an 8-wide buffer padded with `pad`
MLKD_AVX2 static inline void pad8(float* dst, const float* src, int64_t n, float pad) {
  for (int64_t j = 0; j < 8; ++j) dst[j] = j < n ? src[j] : pad;
}

MLKD_AVX2 static RowMax max2(const float* x, const float* y, int64_t c) {
  __m256 mx = _mm256_set1_ps(kNegInf), my = mx;
  int64_t j = 0;
  for (; j + 8 <= c; j += 8) {
    mx = _mm256_max_ps(_mm256_loadu_ps(x + j), mx);  // a NaN entry loses to mx
    my = _mm256_max_ps(_mm256_loadu_ps(y + j), my);
  }
  if (j < c) {
    alignas(32) float tx[8], ty[8];
    pad8(tx, x + j, c - j, kNegInf);
    pad8(ty, y + j, c - j, kNegInf);
    mx = _mm256_max_ps(_mm256_load_ps(tx), mx);
    my = _mm256_max_ps(_mm256_load_ps(ty), my);
  }
  return {simd::hmax_avx2(mx), simd::hmax_avx2(my)};
}

MLKD_AVX2 static inline __m256d add_pd8(__m256d acc, __m256 v) {
  return _mm256_add_pd(_mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(v))),
                       _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

MLKD_AVX2 static inline double hsum_pd(__m256d x) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

// Z in double lanes, A in fp32 per 1024 columns: see the AVX-512 exp_sums
MLKD_AVX2 static inline void exp_sums_step(const float* x, const float* y, __m256 sc, __m256 nmx, __m256 nmy,
                                           float* e_x, float* e_y, __m256d& zx, __m256d& zy, __m256& aa) {
  const __m256 xx = _mm256_loadu_ps(x), yy = _mm256_loadu_ps(y);
  const __m256 ex = simd::exp_avx2(_mm256_fmadd_ps(xx, sc, nmx)), ey = simd::exp_avx2(_mm256_fmadd_ps(yy, sc, nmy));
  _mm256_storeu_ps(e_x, ex);
  _mm256_storeu_ps(e_y, ey);
  zx = add_pd8(zx, ex);
  zy = add_pd8(zy, ey);
  const __m256 d = _mm256_mul_ps(ey, _mm256_sub_ps(yy, xx));
  aa = _mm256_add_ps(aa, _mm256_andnot_ps(_mm256_cmp_ps(yy, _mm256_set1_ps(kNegInf), _CMP_EQ_OQ), d));
}

MLKD_AVX2 static KlSums exp_sums(const float* x, const float* y, float scale, float m_x, float m_y, float* e_x,
                                 float* e_y, int64_t c) {
  KlSums sums;
  const __m256 sc = _mm256_set1_ps(scale), nmx = _mm256_set1_ps(-m_x), nmy = _mm256_set1_ps(-m_y);
  const int64_t c8 = c - c % 8;
  __m256d zx = _mm256_setzero_pd(), zy = _mm256_setzero_pd();
  for (int64_t b0 = 0; b0 < c; b0 += kSumBlock) {
    const int64_t b1 = std::min(c8, b0 + kSumBlock);
    __m256 aa = _mm256_setzero_ps();
    for (int64_t j = b0; j < b1; j += 8) exp_sums_step(x + j, y + j, sc, nmx, nmy, e_x + j, e_y + j, zx, zy, aa);
    if (b0 + kSumBlock >= c && c8 < c) {  // the tail, in the row's last block
      alignas(32) float tx[8], ty[8], tex[8], tey[8];
      pad8(tx, x + c8, c - c8, kNegInf);
      pad8(ty, y + c8, c - c8, kNegInf);
      exp_sums_step(tx, ty, sc, nmx, nmy, tex, tey, zx, zy, aa);
      for (int64_t j = c8; j < c; ++j) {
        e_x[j] = tex[j - c8];
        e_y[j] = tey[j - c8];
      }
    }
    sums.a += simd::hsum_avx2(aa);
  }
  sums.z_x = hsum_pd(zx);
  sums.z_y = hsum_pd(zy);
  return sums;
}

MLKD_AVX2 static void student_grad(const float* e_x, const float* e_y, float w_x, float w_y, float* out, int64_t c) {
  const __m256 wx = _mm256_set1_ps(w_x), wy = _mm256_set1_ps(w_y);
  int64_t j = 0;
  for (; j + 8 <= c; j += 8)
    _mm256_storeu_ps(out + j, _mm256_fmsub_ps(_mm256_loadu_ps(e_x + j), wx, _mm256_mul_ps(_mm256_loadu_ps(e_y + j), wy)));
  for (; j < c; ++j) out[j] = e_x[j] * w_x - e_y[j] * w_y;  // VEX-encoded scalar code
}

MLKD_AVX2 static void teacher_grad(const float* x, const float* y, float scale, const float* e_y, float w_y,
                                   float offset, float* out, int64_t c) {
  const __m256 wy = _mm256_set1_ps(w_y), off = _mm256_set1_ps(offset), sc = _mm256_set1_ps(scale),
               ninf = _mm256_set1_ps(kNegInf);
  int64_t j = 0;
  for (; j + 8 <= c; j += 8) {
    const __m256 yy = _mm256_loadu_ps(y + j);
    const __m256 g = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(e_y + j), wy),
                                   _mm256_fmadd_ps(_mm256_sub_ps(yy, _mm256_loadu_ps(x + j)), sc, off));
    _mm256_storeu_ps(out + j, _mm256_andnot_ps(_mm256_cmp_ps(yy, ninf, _CMP_EQ_OQ), g));
  }
  for (; j < c; ++j) out[j] = y[j] == kNegInf ? 0.0f : e_y[j] * w_y * ((y[j] - x[j]) * scale + offset);
}

MLKD_AVX2 static void diff_exp(const float* x, const float* y, float scale, float m_x, float m_y, float w_x,
                               float w_y, float* out, int64_t c) {
  const __m256 sc = _mm256_set1_ps(scale), nmx = _mm256_set1_ps(-m_x), nmy = _mm256_set1_ps(-m_y),
               wx = _mm256_set1_ps(w_x), wy = _mm256_set1_ps(w_y);
  int64_t j = 0;
  for (; j + 8 <= c; j += 8) {
    const __m256 ex = simd::exp_avx2(_mm256_fmadd_ps(_mm256_loadu_ps(x + j), sc, nmx));
    const __m256 ey = simd::exp_avx2(_mm256_fmadd_ps(_mm256_loadu_ps(y + j), sc, nmy));
    _mm256_storeu_ps(out + j, _mm256_fmsub_ps(ex, wx, _mm256_mul_ps(ey, wy)));
  }
  if (j < c) {
    alignas(32) float tx[8], ty[8], to[8];
    pad8(tx, x + j, c - j, kNegInf);
    pad8(ty, y + j, c - j, kNegInf);
    const __m256 ex = simd::exp_avx2(_mm256_fmadd_ps(_mm256_load_ps(tx), sc, nmx));
    const __m256 ey = simd::exp_avx2(_mm256_fmadd_ps(_mm256_load_ps(ty), sc, nmy));
    _mm256_store_ps(to, _mm256_fmsub_ps(ex, wx, _mm256_mul_ps(ey, wy)));
    for (int64_t i = j; i < c; ++i) out[i] = to[i - j];
  }
}

MLKD_AVX2 static double dot(const float* x, const float* y, int64_t c) {
  double acc = 0.0;
  for (int64_t b0 = 0; b0 < c; b0 += kSumBlock) {
    const int64_t b1 = std::min(c, b0 + kSumBlock);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t j = b0;
    for (; j + 16 <= b1; j += 16) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), _mm256_loadu_ps(y + j + 8), s1);
    }
    float tail = 0.0f;
    for (; j < b1; ++j) tail += x[j] * y[j];
    acc += static_cast<double>(simd::hsum_avx2(_mm256_add_ps(s0, s1))) + tail;
  }
  return acc;
}

MLKD_AVX2 static double sumsq(const float* x, int64_t c) { return dot(x, x, c); }

MLKD_AVX2 static void axpby(const float* x, float a, const float* y, float b, float* out, int64_t c) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  int64_t j = 0;
  for (; j + 8 <= c; j += 8)
    _mm256_storeu_ps(out + j, _mm256_fmadd_ps(_mm256_loadu_ps(x + j), va, _mm256_mul_ps(_mm256_loadu_ps(y + j), vb)));
  for (; j < c; ++j) out[j] = a * x[j] + b * y[j];
}
#undef MLKD_AVX2
}  // namespace avx2_sweeps

// ---- AVX-512: 16 lanes, every load and store masked in the row's last step ----
namespace avx512_sweeps {
#define MLKD_AVX512 __attribute__((target("avx512f,avx2,fma")))

MLKD_AVX512 static inline double hsum8d(__m512d x) {
  const __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(x), _mm512_extractf64x4_pd(x, 1));
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

MLKD_AVX512 static inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

MLKD_AVX512 static RowMax max2(const float* x, const float* y, int64_t c) {
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  __m512 mx0 = ninf, my0 = ninf, mx1 = ninf, my1 = ninf;
  int64_t j = 0;
  for (; j + 32 <= c; j += 32) {  // two accumulators each: the loads, not the max latency, bound it
    mx0 = _mm512_max_ps(_mm512_loadu_ps(x + j), mx0);  // a NaN entry loses to the accumulator
    my0 = _mm512_max_ps(_mm512_loadu_ps(y + j), my0);
    mx1 = _mm512_max_ps(_mm512_loadu_ps(x + j + 16), mx1);
    my1 = _mm512_max_ps(_mm512_loadu_ps(y + j + 16), my1);
  }
  for (; j < c; j += 16) {
    const __mmask16 m = tail_mask(c - j);
    mx0 = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, m, x + j), mx0);
    my0 = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, m, y + j), my0);
  }
  return {simd::hmax_avx512(_mm512_max_ps(mx0, mx1)), simd::hmax_avx512(_mm512_max_ps(my0, my1))};
}

// Z^x and Z^y, which the gradient divides by, are summed in fp32 lanes over 64 columns and then in
// double lanes (q - p cancels to a few ulp of q where student and teacher agree: fp32 lane sums over
// 1024 columns lost entries of an fp16 gradient there); A, which only the loss value reads, in fp32
// lanes per 1024 columns.
MLKD_AVX512 static inline __m512d add_pd16(__m512d acc, __m512 v) {
  return _mm512_add_pd(_mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(v))), _mm512_cvtps_pd(simd::high_half_avx512(v)));
}

MLKD_AVX512 static KlSums exp_sums(const float* x, const float* y, float scale, float m_x, float m_y, float* e_x,
                                   float* e_y, int64_t c) {
  KlSums sums;
  const __m512 sc = _mm512_set1_ps(scale), nmx = _mm512_set1_ps(-m_x), nmy = _mm512_set1_ps(-m_y),
               ninf = _mm512_set1_ps(kNegInf);
  __m512d zx = _mm512_setzero_pd(), zy = _mm512_setzero_pd();
  for (int64_t b0 = 0; b0 < c; b0 += kSumBlock) {
    const int64_t b1 = std::min(c, b0 + kSumBlock);
    __m512 aa = _mm512_setzero_ps();
    for (int64_t j0 = b0; j0 < b1; j0 += 64) {
      __m512 zx4 = _mm512_setzero_ps(), zy4 = _mm512_setzero_ps();
      for (int64_t j = j0; j < std::min(b1, j0 + 64); j += 16) {
        const __mmask16 m = tail_mask(b1 - j);
        const __m512 xx = _mm512_mask_loadu_ps(ninf, m, x + j), yy = _mm512_mask_loadu_ps(ninf, m, y + j);
        const __m512 ex = simd::exp_avx512(_mm512_fmadd_ps(xx, sc, nmx)), ey = simd::exp_avx512(_mm512_fmadd_ps(yy, sc, nmy));
        _mm512_mask_storeu_ps(e_x + j, m, ex);
        _mm512_mask_storeu_ps(e_y + j, m, ey);
        zx4 = _mm512_add_ps(zx4, ex);  // padding lanes hold -inf: e = 0 there
        zy4 = _mm512_add_ps(zy4, ey);
        const __mmask16 finite_y = _mm512_cmp_ps_mask(yy, ninf, _CMP_NEQ_UQ);
        aa = _mm512_mask_add_ps(aa, finite_y, aa, _mm512_mul_ps(ey, _mm512_sub_ps(yy, xx)));
      }
      zx = add_pd16(zx, zx4);
      zy = add_pd16(zy, zy4);
    }
    sums.a += simd::hsum_avx512(aa);
  }
  sums.z_x = hsum8d(zx);
  sums.z_y = hsum8d(zy);
  return sums;
}

MLKD_AVX512 static void student_grad(const float* e_x, const float* e_y, float w_x, float w_y, float* out,
                                     int64_t c) {
  const __m512 wx = _mm512_set1_ps(w_x), wy = _mm512_set1_ps(w_y);
  int64_t j = 0;
  for (; j + 16 <= c; j += 16)
    _mm512_storeu_ps(out + j, _mm512_fmsub_ps(_mm512_loadu_ps(e_x + j), wx, _mm512_mul_ps(_mm512_loadu_ps(e_y + j), wy)));
  if (j < c) {
    const __mmask16 m = tail_mask(c - j);
    _mm512_mask_storeu_ps(out + j, m, _mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, e_x + j), wx,
                                                      _mm512_mul_ps(_mm512_maskz_loadu_ps(m, e_y + j), wy)));
  }
}

// Masked stores up to the first 64-byte boundary, streaming stores of whole cache lines, a masked tail.
MLKD_AVX512 static void student_grad_stream(const float* e_x, const float* e_y, float w_x, float w_y, float* out,
                                            int64_t c) {
  const __m512 wx = _mm512_set1_ps(w_x), wy = _mm512_set1_ps(w_y);
  if (reinterpret_cast<uintptr_t>(out) % 4 != 0) return student_grad(e_x, e_y, w_x, w_y, out, c);
  int64_t j = 0;
  const int64_t head = std::min<int64_t>(c, ((64 - reinterpret_cast<uintptr_t>(out) % 64) % 64) / 4);
  if (head > 0) {
    const __mmask16 m = tail_mask(head);
    _mm512_mask_storeu_ps(out, m, _mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, e_x), wx,
                                                  _mm512_mul_ps(_mm512_maskz_loadu_ps(m, e_y), wy)));
    j = head;
  }
  for (; j + 16 <= c; j += 16)
    _mm512_stream_ps(out + j, _mm512_fmsub_ps(_mm512_loadu_ps(e_x + j), wx, _mm512_mul_ps(_mm512_loadu_ps(e_y + j), wy)));
  if (j < c) {
    const __mmask16 m = tail_mask(c - j);
    _mm512_mask_storeu_ps(out + j, m, _mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, e_x + j), wx,
                                                      _mm512_mul_ps(_mm512_maskz_loadu_ps(m, e_y + j), wy)));
  }
}

MLKD_AVX512 static void stream_fence() { _mm_sfence(); }

MLKD_AVX512 static void teacher_grad(const float* x, const float* y, float scale, const float* e_y, float w_y,
                                     float offset, float* out, int64_t c) {
  const __m512 wy = _mm512_set1_ps(w_y), off = _mm512_set1_ps(offset), sc = _mm512_set1_ps(scale),
               ninf = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0; j < c; j += 16) {
    const __mmask16 m = tail_mask(c - j);
    const __m512 yy = _mm512_mask_loadu_ps(ninf, m, y + j);
    const __m512 g = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, e_y + j), wy),
                                   _mm512_fmadd_ps(_mm512_sub_ps(yy, _mm512_maskz_loadu_ps(m, x + j)), sc, off));
    _mm512_mask_storeu_ps(out + j, m, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(yy, ninf, _CMP_NEQ_UQ), g));
  }
}

MLKD_AVX512 static void diff_exp(const float* x, const float* y, float scale, float m_x, float m_y, float w_x,
                                 float w_y, float* out, int64_t c) {
  const __m512 sc = _mm512_set1_ps(scale), nmx = _mm512_set1_ps(-m_x), nmy = _mm512_set1_ps(-m_y),
               wx = _mm512_set1_ps(w_x), wy = _mm512_set1_ps(w_y), ninf = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0; j < c; j += 16) {
    const __mmask16 m = tail_mask(c - j);
    const __m512 ex = simd::exp_avx512(_mm512_fmadd_ps(_mm512_mask_loadu_ps(ninf, m, x + j), sc, nmx));
    const __m512 ey = simd::exp_avx512(_mm512_fmadd_ps(_mm512_mask_loadu_ps(ninf, m, y + j), sc, nmy));
    _mm512_mask_storeu_ps(out + j, m, _mm512_fmsub_ps(ex, wx, _mm512_mul_ps(ey, wy)));
  }
}

MLKD_AVX512 static double dot(const float* x, const float* y, int64_t c) {
  double acc = 0.0;
  for (int64_t b0 = 0; b0 < c; b0 += kSumBlock) {
    const int64_t b1 = std::min(c, b0 + kSumBlock);
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t j = b0;
    for (; j + 32 <= b1; j += 32) {
      s0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + j), _mm512_loadu_ps(y + j), s0);
      s1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + j + 16), _mm512_loadu_ps(y + j + 16), s1);
    }
    for (; j < b1; j += 16) {
      const __mmask16 m = tail_mask(b1 - j);
      s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + j), _mm512_maskz_loadu_ps(m, y + j), s0);
    }
    acc += simd::hsum_avx512(_mm512_add_ps(s0, s1));
  }
  return acc;
}

MLKD_AVX512 static double sumsq(const float* x, int64_t c) { return dot(x, x, c); }

MLKD_AVX512 static void axpby(const float* x, float a, const float* y, float b, float* out, int64_t c) {
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
  for (int64_t j = 0; j < c; j += 16) {
    const __mmask16 m = tail_mask(c - j);
    _mm512_mask_storeu_ps(out + j, m, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + j), va,
                                                      _mm512_mul_ps(_mm512_maskz_loadu_ps(m, y + j), vb)));
  }
}
#undef MLKD_AVX512
}  // namespace avx512_sweeps
#endif

const KlSweeps& kl_sweeps() {
  static const KlSweeps sweeps = [] {
#ifdef MLKD_HAVE_SIMD_SWEEPS
    if (std::getenv("MLKD_FAST_NO_SIMD") == nullptr) {
      __builtin_cpu_init();
      if (std::getenv("MLKD_FAST_NO_AVX512") == nullptr && __builtin_cpu_supports("avx512f"))
        return KlSweeps{"avx512", avx512_sweeps::max2, avx512_sweeps::exp_sums, avx512_sweeps::student_grad,
                        avx512_sweeps::student_grad_stream, avx512_sweeps::stream_fence,
                        avx512_sweeps::teacher_grad, avx512_sweeps::diff_exp, avx512_sweeps::sumsq,
                        avx512_sweeps::dot, avx512_sweeps::axpby};
      if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return KlSweeps{"avx2", avx2_sweeps::max2, avx2_sweeps::exp_sums, avx2_sweeps::student_grad,
                        avx2_sweeps::student_grad, scalar_sweeps::no_fence,
                        avx2_sweeps::teacher_grad, avx2_sweeps::diff_exp, avx2_sweeps::sumsq, avx2_sweeps::dot,
                        avx2_sweeps::axpby};
    }
#endif
    return KlSweeps{"scalar", scalar_sweeps::max2, scalar_sweeps::exp_sums, scalar_sweeps::student_grad,
                    scalar_sweeps::student_grad, scalar_sweeps::no_fence,
                    scalar_sweeps::teacher_grad, scalar_sweeps::diff_exp, scalar_sweeps::sumsq, scalar_sweeps::dot,
                    scalar_sweeps::axpby};
  }();
  return sweeps;
}

}  // namespace mlkd_fast
