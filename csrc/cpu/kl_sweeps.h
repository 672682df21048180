// The KL's row sweeps over fp32 rows, shared by the CPU kd_kl (cpu/kd_kl.cpp) and the CPU correlation
// (cpu/correlation.cpp), which sweeps each similarity row with them while it sits in L1/L2. Three
// versions, chosen once at run time: AVX-512 (16 lanes, masked tails), AVX2+FMA (8 lanes, masked
// tails) and a portable scalar one; MLKD_FAST_NO_SIMD=1 forces the scalar ones and
// MLKD_FAST_NO_AVX512=1 the AVX2 ones. A vector sweep never calls scalar (SSE-encoded) code: mixing
// the two with dirty upper register halves costs a state transition per call, which made a
// 100-column row cost ~0.7 us. fp32 partial sums per 1024 columns are summed in double.
//
// Every sweep reads rows x (the student's: logits, or raw similarity dot products) and y (the
// teacher's) as they are and applies the temperature itself (`scale` = 1 / T or 1 / tau), so that a
// row is read from memory once (the max) and swept again from cache.
#pragma once

#include <cstdint>

namespace mlkd_fast {

struct RowMax {
  float x, y;  // max over the row (NaN never wins; -inf when every entry is -inf)
};

struct KlSums {
  double z_x = 0.0, z_y = 0.0, a = 0.0;
};

struct KlSweeps {
  const char* name;  // "avx512", "avx2" or "scalar"
  // max of x and of y, unscaled.
  RowMax (*max2)(const float* x, const float* y, int64_t c);
  // e_x = e^(x scale - m_x), e_y = e^(y scale - m_y) (m_*: scaled maxima, finite); returns Z_x = sum e_x,
  // Z_y = sum e_y and A = sum e_y (y - x), unscaled (0 where y = -inf).
  KlSums (*exp_sums)(const float* x, const float* y, float scale, float m_x, float m_y, float* e_x, float* e_y,
                     int64_t c);
  // out = e_x w_x - e_y w_y (out may alias e_x or e_y).
  void (*student_grad)(const float* e_x, const float* e_y, float w_x, float w_y, float* out, int64_t c);
  // The same with non-temporal stores (the output bypasses the caches: no read for ownership, and
  // the inputs of the next rows stay cached); for outputs much larger than the caches. The caller
  // calls stream_fence() before another thread reads the output. Plain stores where unsupported.
  void (*student_grad_stream)(const float* e_x, const float* e_y, float w_x, float w_y, float* out, int64_t c);
  void (*stream_fence)();
  // out = e_y w_y ((y - x) scale + offset), 0 where y = -inf.
  void (*teacher_grad)(const float* x, const float* y, float scale, const float* e_y, float w_y, float offset,
                       float* out, int64_t c);
  // out = w_x e^(x scale - m_x) - w_y e^(y scale - m_y) (out may alias x or y): the correlation's
  // g (Q - P) / tau from raw similarity rows and saved log-sum-exps.
  void (*diff_exp)(const float* x, const float* y, float scale, float m_x, float m_y, float w_x, float w_y,
                   float* out, int64_t c);
  // Plain row algebra for the correlation's normalisation and its backward (fp32 lanes, summed in double):
  // sum x^2; sum x y; out = a x + b y (out may alias x or y).
  double (*sumsq)(const float* x, int64_t c);
  double (*dot)(const float* x, const float* y, int64_t c);
  void (*axpby)(const float* x, float a, const float* y, float b, float* out, int64_t c);
};

// The sweeps of this CPU, chosen once.
const KlSweeps& kl_sweeps();

}  // namespace mlkd_fast
