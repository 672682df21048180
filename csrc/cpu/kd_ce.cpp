// The KD method's whole loss on the CPU in one pass over the logits (ops mlkd_fast_kd_ce::kd_ce_fwd and
// ::kd_ce, schemas in mlkd_fast/ops.py KD_CE_SCHEMAS; mlkd_fast/fused.py kd_ce_loss):
//
//   total = w_ce mean_i CE_i + w_kd T^2 mean_i KL_i,   CE_i = lse(s_i) - s_i[y_i],
//   KL_i = KL(softmax(t_i / T) || softmax(s_i / T)),
//   d total / d s_i = (w_ce / N) (softmax(s_i) - onehot(y_i)) + (w_kd T / N) (softmax(s_i / T) - softmax(t_i / T)).
//
// Both terms read the same student row, so one row function does both: the LM loss's (lm_sweeps.h,
// forward KL, no softcaps), which sweeps a row three times while it sits in L1/L2 and writes its
// gradient. Bytes: the student and teacher read once from memory, the gradient written once; the
// separate CE + KL of eager PyTorch read the student's logits four times and write two gradients.
//
// Why an autograd in C++: at classification sizes (64 x 10, say) the arithmetic is a microsecond, and
// a training step pays the Python around it (an autograd.Function's forward and backward, a Sum and an
// Add node, CE's own two nodes): 5-10% of a small CNN's CPU step. kd_ce's autograd kernel records one
// C++ node whose backward hands the stored gradient on when autograd frees the graph after it (scaled
// in place when the factor reaching it is not 1), and writes a scaled copy when the graph is kept.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "lm_sweeps.h"
#include "ops.h"

namespace mlkd_fast {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_ce_fwd_cpu(const at::Tensor& student,
                                                                         const at::Tensor& teacher,
                                                                         const at::Tensor& target, double temperature,
                                                                         double w_kd, double w_ce, bool student_grad) {
  TORCH_CHECK(student.dim() == 2 && student.scalar_type() == at::kFloat,
              "kd_ce: student must be an fp32 (N, C) tensor, got ", student.scalar_type(), " of ndim ", student.dim());
  const int64_t n = student.size(0), c = student.size(1);
  TORCH_CHECK(n >= 1 && c >= 1, "kd_ce: empty batch: student has shape ", student.sizes());
  const auto tt = teacher.scalar_type();
  TORCH_CHECK(teacher.sizes() == student.sizes() && (tt == at::kFloat || tt == at::kBFloat16 || tt == at::kHalf),
              "kd_ce: teacher must be an fp32, bf16 or fp16 tensor of the student's shape ", student.sizes(),
              ", got ", tt, " of shape ", teacher.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == n && !target.is_floating_point() &&
                  target.scalar_type() != at::kBool,
              "kd_ce: target must be an integer tensor of shape (", n, "), got ", target.scalar_type(), " of shape ",
              target.sizes());
  TORCH_CHECK(student.device() == teacher.device() && student.device() == target.device(),
              "kd_ce: student, teacher and target must be on one device");
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), "kd_ce: temperature must be positive, got ",
              temperature);
  TORCH_CHECK(std::isfinite(w_kd) && std::isfinite(w_ce), "kd_ce: w_kd and w_ce must be finite");

  const at::Tensor s = student.stride(1) == 1 ? student : student.contiguous();
  const at::Tensor t = teacher.stride(1) == 1 ? teacher : teacher.contiguous();
  const at::Tensor y = target.scalar_type() == at::kLong ? target.contiguous() : target.to(at::kLong).contiguous();
  const int64_t* labels = y.const_data_ptr<int64_t>();
  if (w_ce != 0.0)  // CE reads them (at w_ce = 0 no term does, as in the two-term path)
    for (int64_t i = 0; i < n; ++i)  // F.cross_entropy's error, as an IndexError
      TORCH_CHECK_INDEX(labels[i] >= 0 && labels[i] < c, "Target ", labels[i], " is out of bounds.");

  LmRowConsts k;
  k.vs = c;
  k.v = c;
  k.div = kLmForwardKl;
  k.temperature = static_cast<float>(temperature);
  k.inv_t = static_cast<float>(1.0 / temperature);
  k.labels = w_ce != 0.0;
  const float kd_w = static_cast<float>(w_kd * temperature * temperature / static_cast<double>(n));
  const float ce_w = static_cast<float>(w_ce / static_cast<double>(n));

  const std::vector<int64_t> grad_shape = student_grad ? std::vector<int64_t>{n, c} : std::vector<int64_t>{0};
  at::Tensor grad = at::empty(grad_shape, s.options());
  std::vector<float> kd_rows(n), ce_rows(n);
  const float* sp = s.const_data_ptr<float>();
  const int64_t s_stride = s.stride(0), t_stride = t.stride(0);
  const void* tp = t.const_data_ptr();
  float* gp = student_grad ? grad.mutable_data_ptr<float>() : nullptr;
  const LmSweeps& sw = lm_sweeps();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / c), [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> widened;  // a bf16 / fp16 teacher row in fp32
    if (tt != at::kFloat && static_cast<int64_t>(widened.size()) < c) widened.resize(c);
    for (int64_t i = begin; i < end; ++i) {
      const float* row_t;
      if (tt == at::kFloat) {
        row_t = static_cast<const float*>(tp) + i * t_stride;
      } else {
        AT_DISPATCH_REDUCED_FLOATING_TYPES(tt, "mlkd_kd_ce_widen", [&] {
          const scalar_t* src = static_cast<const scalar_t*>(tp) + i * t_stride;
          for (int64_t j = 0; j < c; ++j) widened[j] = static_cast<float>(src[j]);
        });
        row_t = widened.data();
      }
      // the row function reads x and writes the gradient row, which may be another buffer (here it is)
      const LmRowOut r = sw.row(k, sp + i * s_stride, row_t, nullptr, gp == nullptr ? nullptr : gp + i * c, nullptr,
                                k.labels ? labels[i] : -1, kd_w, ce_w);
      kd_rows[i] = r.kd;
      ce_rows[i] = r.ce;
    }
  });
  double kd_sum = 0.0, ce_sum = 0.0;  // in row order: the same value on any thread count
  for (int64_t i = 0; i < n; ++i) {
    kd_sum += static_cast<double>(kd_rows[i]);
    ce_sum += static_cast<double>(ce_rows[i]);
  }
  // the total is the fp32 sum of the two fp32 terms, as the separate terms would add up
  const float kd = static_cast<float>(kd_sum * static_cast<double>(kd_w));
  const float ce = static_cast<float>(ce_sum * static_cast<double>(ce_w));
  const auto scalar = s.options().dtype(at::kFloat);
  return {at::scalar_tensor(kd + ce, scalar), at::scalar_tensor(kd, scalar), at::scalar_tensor(ce, scalar), grad};
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The forward op, below autograd (its fake, for tracing, is registered from Python).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_kd_ce_fwd(const at::Tensor& student,
                                                                          const at::Tensor& teacher,
                                                                          const at::Tensor& target, double temperature,
                                                                          double w_kd, double w_ce, bool student_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mlkd_fast_kd_ce::kd_ce_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double, bool)>();
  return op.call(student, teacher, target, temperature, w_kd, w_ce, student_grad);
}

// Whether a tensor is an ordinary one (not a fake, functional or other Python-level tensor): only then
// are its values read and is it scaled in place.
bool plain(const at::Tensor& x) {
  return !x.key_set().has(c10::DispatchKey::Python) && !x.key_set().has(c10::DispatchKey::Functionalize) &&
         x.device().is_cpu();
}

class KdCeFunction : public torch::autograd::Function<KdCeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& target, double temperature, double w_kd, double w_ce,
                               bool student_grad) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [total, kd, ce, grad] = call_kd_ce_fwd(student, teacher, target, temperature, w_kd, w_ce, student_grad);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad});
    ctx->mark_non_differentiable({kd, ce});
    return {total, kd, ce};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);  // one per input of forward, undefined for all but the student
    const at::Tensor& g = grads[0];
    if (!g.defined()) return out;  // only the detached terms were used
    at::Tensor grad = ctx->get_saved_variables()[0];
    if (plain(g) && plain(grad) && !torch::autograd::get_current_graph_task_keep_graph()) {
      // freed after this backward, so the stored gradient is handed on: as it is after the usual
      // loss.backward() (factor 1), else scaled in place
      out[0] = g.item<double>() == 1.0 ? grad : grad.mul_(g);
    } else {
      out[0] = grad.mul(g);  // kept (or traced): a later backward reads the stored gradient again
    }
    return out;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_ce_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                        const at::Tensor& target, double temperature, double w_kd,
                                                        double w_ce) {
  auto [total, kd, ce, grad] = kd_ce_fwd_cpu(student, teacher, target, temperature, w_kd, w_ce, false);
  return {total, kd, ce};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_ce_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                                             const at::Tensor& target, double temperature,
                                                             double w_kd, double w_ce) {
  TORCH_CHECK(!teacher.requires_grad() || !c10::GradMode::is_enabled(),
              "kd_ce: the teacher's logits are constants here; detach them");
  const bool student_grad = c10::GradMode::is_enabled() && student.requires_grad();
  variable_list out = KdCeFunction::apply(student, teacher, target, temperature, w_kd, w_ce, student_grad);
  return {out[0], out[1], out[2]};
}

}  // namespace mlkd_fast
