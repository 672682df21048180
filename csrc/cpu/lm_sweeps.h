// The row math of the fused lm_head + divergence loss on the CPU (cpu/linear_kd_rows.cpp; the Triton
// version and its derivation: mlkd_fast/kernels/linear_kd.py; the oracle: mlkd_fast/divergences.py
// token_rows). One fp32 row of the student's logits and one of the teacher's in, the row's divergence
// and CE out, and d(total)/d(z_s) written over the student's row. Three passes over the row while it
// sits in L1/L2: (1) softcaps, maxima, Z's (and the forward KL's A), (2) the divergence and
// S = sum QG (not for the forward KL, which has both from pass 1), (3) the gradient.
//
// AVX-512, AVX2+FMA and scalar versions of one body (lm_sweeps_body.inc, compiled once per ISA), with
// a vectorised exp, log and softcap; the version follows kl_sweeps() (MLKD_FAST_NO_SIMD=1,
// MLKD_FAST_NO_AVX512=1), chosen once per process. fp32 lanes per 1024 columns, summed in double.
// Torch-free.
#pragma once

#include <cstdint>

namespace mlkd_fast {

// divergence codes (as CODES in mlkd_fast/kernels/linear_kd.py); kLmNoTeacher: CE only
enum LmDivergence : int {
  kLmForwardKl = 0, kLmReverseKl = 1, kLmJsd = 2, kLmSkewForwardKl = 3, kLmSkewReverseKl = 4, kLmNoTeacher = -1
};

struct LmRowConsts {
  int64_t vs = 0;        // the student's columns (CE and the gradient)
  int64_t v = 0;         // the divergence's columns, the first v (v <= vs)
  int div = kLmNoTeacher;
  float inv_t = 1.0f;    // 1 / temperature
  float temperature = 1.0f;
  float coef = 0.0f;     // jsd's beta, the skews' alpha (0 < coef < 1 where they use it)
  float log_a = 0.0f, log_b = 0.0f;  // log coef, log(1 - coef)
  float s_cap = 0.0f, t_cap = 0.0f;  // softcaps, 0 = none
  bool labels = false;   // CE wanted (a row's label may still be -1: no CE)
};

struct LmRowOut {
  float kd, ce;
};

struct LmSweeps {
  const char* name;  // "avx512", "avx2" or "scalar"
  // One row. x: the student's logits (vs); y: the teacher's (>= v; null when div == kLmNoTeacher); ys: v
  // floats of scratch for the softcapped teacher when t_cap != 0 (may be y itself); grad: the gradient's
  // row (vs; may be x itself; null: no gradient), and otherwise xs, vs floats of scratch for the softcapped
  // student when s_cap != 0. label: -1 for none. Rows whose two weights are 0 get a zero gradient.
  LmRowOut (*row)(const LmRowConsts& k, const float* x, const float* y, float* ys, float* grad, float* xs,
                  int64_t label, float kd_w, float ce_w);
};

// The version of this CPU (the one kl_sweeps() chose).
const LmSweeps& lm_sweeps();

}  // namespace mlkd_fast
