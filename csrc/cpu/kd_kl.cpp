// Temperature KL on the CPU, one row at a time (rows in parallel).
//   v = s / T, u = t / T;  l = A / Z_t + (m_s - m_t) + (log Z_s - log Z_t),
//   A = sum_c e^(u_c - m_t) (u_c - v_c);  d(T^2 l)/ds = T (q - p),  d(T^2 l)/dt = T p (log p - log q - l)
// A row is read once from memory into fp32 scratch (v, u, and their exps) that stays in L1/L2, and
// swept there by kl_sweeps.h; fp64 inputs take portable fp64 loops.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "../common.h"
#include "kl_sweeps.h"
#include "ops.h"
#include "output_cache.h"

namespace mlkd_fast {

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

namespace {

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

}  // namespace

// fp32 math (fp32, fp16 and bf16 inputs in any combination): the vectorised sweeps. A row is read from
// memory once (the max of both inputs); the exps and sums sweep it again from L1/L2, writing e^s and
// e^t into per-thread scratch, and the gradient sweep reads those and writes the output row.
static void kd_kl_rows_cpu_f32(const KlRowsArgs& a, const float* weight, float* rows, float temperature) {
  const int64_t c = a.c;
  const float inv_t = 1.0f / temperature;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(c, 1));
  const KlSweeps& sw = kl_sweeps();
  const bool s_float = a.s_type == at::kFloat, t_float = a.t_type == at::kFloat;
  // A gradient far larger than the caches is written with streaming stores (no read for ownership of
  // its lines, the next rows' inputs stay cached); one that fits stays cached for its consumer.
  const bool stream = s_float && a.n * c * static_cast<int64_t>(sizeof(float)) >= kStreamOutputBytes;
  const auto student_grad = stream ? sw.student_grad_stream : sw.student_grad;
  at::parallel_for(0, a.n, grain, [&](int64_t begin, int64_t end) {
    // fp32 scratch: e^s, e^t, and staging rows for dtype conversions (s, t, a gradient). Kept per
    // thread across calls, so that a call neither allocates it nor faults it in again.
    thread_local std::vector<float> scratch;
    scratch.resize(std::max(scratch.size(), static_cast<size_t>(5) * c));
    float* e_s = scratch.data();
    float* e_t = e_s + c;
    float* s_stage = e_t + c;
    float* t_stage = s_stage + c;
    float* g_stage = t_stage + c;
    auto load = [&](const void* base, at::ScalarType dtype, int64_t offset, float* stage) -> const float* {
      if (dtype == at::kFloat) return static_cast<const float*>(base) + offset;
      load_row(base, dtype, offset, c, stage);
      return stage;
    };
    // the sweep writes straight into an fp32 gradient, else into the stage and is then converted
    auto grad_out = [&](void* base, at::ScalarType dtype, int64_t offset) -> float* {
      return dtype == at::kFloat ? static_cast<float*>(base) + offset : g_stage;
    };
    auto finish = [&](void* base, at::ScalarType dtype, int64_t offset) {
      if (dtype != at::kFloat) store_row(g_stage, base, dtype, offset, c);
    };
    for (int64_t i = begin; i < end; ++i) {
      const float keep = weight == nullptr ? 1.0f : weight[i];
      if (keep == 0.0f) {  // weight 0 (a masked row): exactly 0, whatever the row holds (NaN, all -inf)
        rows[i] = 0.0f;
        if (a.gs != nullptr) zero_row(a.gs, a.s_type, i * c, c);
        if (a.gt != nullptr) zero_row(a.gt, a.t_type, i * c, c);
        continue;
      }
      const float* x = s_float ? static_cast<const float*>(a.s) + i * a.s_stride : load(a.s, a.s_type, i * a.s_stride, s_stage);
      const float* y = t_float ? static_cast<const float*>(a.t) + i * a.t_stride : load(a.t, a.t_type, i * a.t_stride, t_stage);
      const RowMax mx = sw.max2(x, y, c);
      float m_s = mx.x * inv_t, m_t = mx.y * inv_t;
      if (m_s == kNegInf) m_s = 0.0f;  // an all -inf row: keep the arithmetic finite
      if (m_t == kNegInf) m_t = 0.0f;
      const KlSums sums = sw.exp_sums(x, y, inv_t, m_s, m_t, e_s, e_t, c);
      const float log_z_s = static_cast<float>(std::log(sums.z_x));
      const float log_z_t = static_cast<float>(std::log(sums.z_y));
      const float kl = static_cast<float>(sums.a * inv_t / sums.z_y) + (m_s - m_t) + (log_z_s - log_z_t);
      rows[i] = kl * temperature * temperature * keep;
      const float w_s = static_cast<float>(temperature * keep / sums.z_x);
      const float w_t = static_cast<float>(temperature * keep / sums.z_y);
      if (a.gs != nullptr) {
        student_grad(e_s, e_t, w_s, w_t, grad_out(a.gs, a.s_type, i * c), c);
        finish(a.gs, a.s_type, i * c);
      }
      if (a.gt != nullptr) {
        const float offset = (m_s + log_z_s) - (m_t + log_z_t) - kl;
        sw.teacher_grad(x, y, inv_t, e_t, w_t, offset, grad_out(a.gt, a.t_type, i * c), c);
        finish(a.gt, a.t_type, i * c);
      }
    }
    if (stream) sw.stream_fence();
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

at::ScalarType kl_math_type(const at::Tensor& s, const at::Tensor& t) {
  return s.scalar_type() == at::kDouble || t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

KdKlOutputs kd_kl_outputs(const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& weight,
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

}  // namespace mlkd_fast
