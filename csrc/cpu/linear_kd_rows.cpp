// The row function of the fused lm_head + divergence loss on the CPU (op mlkd_fast_lm_native::token_rows,
// schema in mlkd_fast/ops.py LM_SCHEMAS): one chunk's fp32 student logits (rows, V_s) and the teacher's
// (rows, >= vocab; fp32, or bf16/fp16 widened row by row in L1) in, the per-token divergence and CE out,
// d(total)/d(z_s) written over z_s. Rows in parallel, each swept three times while it sits in L1/L2
// (lm_sweeps.h). The sparse top-k teacher and fp64 stay with the torch function (mlkd_fast/linear_kd.py).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "lm_sweeps.h"
#include "ops.h"

namespace mlkd_fast {

static int lm_divergence_code(c10::string_view name) {
  const char* names[] = {"forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"};
  for (int i = 0; i < 5; ++i)
    if (name == names[i]) return i;
  TORCH_CHECK(false, "token_rows: divergence must be one of forward_kl, reverse_kl, jsd, skew_forward_kl, "
              "skew_reverse_kl; got '", std::string(name), "'");
  return -1;
}

std::tuple<at::Tensor, at::Tensor> lm_token_rows_cpu(const at::Tensor& z_s, const c10::optional<at::Tensor>& z_t,
                                                     const c10::optional<at::Tensor>& labels,
                                                     const at::Tensor& kd_weight, const at::Tensor& ce_weight,
                                                     c10::string_view divergence, double coef, double temperature,
                                                     double student_softcap, double teacher_softcap, int64_t vocab,
                                                     bool want_grad) {
  TORCH_CHECK(z_s.dim() == 2 && z_s.scalar_type() == at::kFloat && z_s.stride(1) == 1,
              "token_rows: z_s must be fp32 (rows, V_s) with unit column stride");
  const int64_t n = z_s.size(0), vs = z_s.size(1);
  const bool teacher = z_t.has_value();
  TORCH_CHECK(vocab >= 1 && vocab <= vs, "token_rows: vocab must be in [1, V_s = ", vs, "], got ", vocab);
  if (teacher) {
    const auto t = z_t->scalar_type();
    TORCH_CHECK(z_t->dim() == 2 && z_t->size(0) == n && z_t->size(1) >= vocab && z_t->stride(1) == 1 &&
                    (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf),
                "token_rows: z_t must be fp32, bf16 or fp16 (rows, >= vocab) with unit column stride");
  }
  TORCH_CHECK(kd_weight.dim() == 1 && kd_weight.size(0) == n && ce_weight.dim() == 1 && ce_weight.size(0) == n,
              "token_rows: kd_weight and ce_weight must be (rows,)");
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), "token_rows: temperature must be positive");
  at::Tensor lab;
  if (labels.has_value()) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == n && !labels->is_floating_point(),
                "token_rows: labels must be an integer (rows,) tensor");
    lab = labels->to(at::kLong).contiguous();
    const int64_t* l = lab.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK(l[i] >= -1 && l[i] < vs, "token_rows: labels must be in [-1, ", vs, "), got ", l[i]);
  }
  for (const at::Tensor* x : {&kd_weight, &ce_weight})
    TORCH_CHECK(x->device() == z_s.device(), "token_rows: every tensor must be on z_s's device");

  LmRowConsts k;
  k.vs = vs;
  k.v = vocab;
  k.div = teacher ? lm_divergence_code(divergence) : kLmNoTeacher;
  k.temperature = static_cast<float>(temperature);
  k.inv_t = static_cast<float>(1.0 / temperature);
  k.coef = static_cast<float>(coef);
  if (coef > 0.0 && coef < 1.0) {  // jsd's beta, the skews' alpha; in fp64 as the Triton launcher does
    k.log_a = static_cast<float>(std::log(coef));
    k.log_b = static_cast<float>(std::log1p(-coef));
  }
  k.s_cap = static_cast<float>(student_softcap);
  k.t_cap = static_cast<float>(teacher_softcap);
  k.labels = labels.has_value();

  auto kd = at::empty({n}, z_s.options());
  auto ce = at::empty({n}, z_s.options());
  const at::Tensor kd_w = kd_weight.to(at::kFloat).contiguous(), ce_w = ce_weight.to(at::kFloat).contiguous();
  const float* kw = kd_w.const_data_ptr<float>();
  const float* cw = ce_w.const_data_ptr<float>();
  const int64_t* lp = lab.defined() ? lab.const_data_ptr<int64_t>() : nullptr;
  float* zs = z_s.mutable_data_ptr<float>();
  const int64_t zs_stride = z_s.stride(0);
  const void* zt = teacher ? z_t->const_data_ptr() : nullptr;
  const at::ScalarType zt_type = teacher ? z_t->scalar_type() : at::kFloat;
  const int64_t zt_stride = teacher ? z_t->stride(0) : 0;
  float* kd_out = kd.mutable_data_ptr<float>();
  float* ce_out = ce.mutable_data_ptr<float>();
  const LmSweeps& sw = lm_sweeps();
  const bool stage_t = teacher && (zt_type != at::kFloat || k.t_cap != 0.0f);
  const bool stage_s = k.s_cap != 0.0f && !want_grad;

  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    // per-thread scratch: the teacher's row widened / softcapped, the softcapped student's without a gradient
    thread_local std::vector<float> scratch;
    const size_t need = static_cast<size_t>((stage_t ? vocab : 0) + (stage_s ? vs : 0));
    if (scratch.size() < need) scratch.resize(need);
    float* ys = stage_t ? scratch.data() : nullptr;
    float* xs = stage_s ? scratch.data() + (stage_t ? vocab : 0) : nullptr;
    for (int64_t i = begin; i < end; ++i) {
      float* x = zs + i * zs_stride;
      const float* y = nullptr;
      if (teacher) {
        if (zt_type == at::kFloat) {
          y = static_cast<const float*>(zt) + i * zt_stride;
        } else {
          AT_DISPATCH_REDUCED_FLOATING_TYPES(zt_type, "mlkd_lm_widen", [&] {
            const scalar_t* src = static_cast<const scalar_t*>(zt) + i * zt_stride;
            for (int64_t j = 0; j < vocab; ++j) ys[j] = static_cast<float>(src[j]);
          });
          y = ys;
        }
      }
      const LmRowOut r = sw.row(k, x, y, ys, want_grad ? x : nullptr, xs, lp == nullptr ? -1 : lp[i], kw[i], cw[i]);
      kd_out[i] = r.kd;
      ce_out[i] = r.ce;
    }
  });
  return {kd, ce};
}

}  // namespace mlkd_fast
