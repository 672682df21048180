// The KL's row sweeps over fp32 scratch, shared by the CPU kd_kl (cpu/kd_kl.cpp) and the CPU tiles of
// the correlation (cpu/correlation.cpp), which sweeps each similarity-tile row in L1 with them. An
// AVX2+FMA version (8 lanes, chosen at run time when the CPU has it and MLKD_FAST_NO_SIMD is unset)
// and a portable scalar one; fp32 partial sums per 1024 columns are summed in double.
#pragma once

#include <cstdint>

namespace mlkd_fast {

struct KlSums {
  double z_s = 0.0, z_t = 0.0, a = 0.0;
};

// The four sweeps. scale_and_max: out = x / T, returns max(out). exp_and_sums: e_s = e^(v - m_s),
// e_t = e^(u - m_t), Z_s, Z_t and A (0 where u = -inf). With keep the row weight (mask, reduction,
// loss weight): student_grad_row: T (q - p) keep = e_s w_s - e_t w_t. teacher_grad_row:
// T p (log p - log q - l) keep = e_t w_t ((u - v) + offset),
// 0 where u = -inf, offset = (m_s + log Z_s) - (m_t + log Z_t) - l.
struct KlSweeps {
  float (*scale_and_max)(const float* x, float inv_t, float* out, int64_t c);
  KlSums (*exp_and_sums)(const float* v, const float* u, float m_s, float m_t, float* e_s, float* e_t, int64_t c);
  void (*student_grad_row)(const float* e_s, const float* e_t, float w_s, float w_t, float* out, int64_t c);
  void (*teacher_grad_row)(const float* v, const float* u, const float* e_t, float w_t, float offset, float* out,
                           int64_t c);
};

// The sweeps of this CPU, chosen once.
const KlSweeps& kl_sweeps();

}  // namespace mlkd_fast
