// The CPU implementations of the mlkd_fast ops (registered in registration.cpp), and the
// device-independent pieces of them that the CUDA glue (cuda/glue.cpp) reuses. Every op takes fp32,
// fp16, bf16 and fp64, student and teacher in any combination; the math is fp32, or fp64 when an input
// is fp64. Semantics are those of the Triton ops in kernels/ (see their docstrings).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace mlkd_fast {

// ---- registered for CPU tensors ----

// kd_kl.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_kl_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                         const c10::optional<at::Tensor>& row_weight,
                                                         double temperature, bool student_grad, bool teacher_grad);
// scale_rows.cpp
at::Tensor scale_rows_cpu(const at::Tensor& x, const at::Tensor& g);
void scale_rows_inplace_cpu(const at::Tensor& x, const at::Tensor& g);

// correlation.cpp; also the CUDA path of fp32 and fp64 features (cuBLAS tiles, ATen statistics).
std::tuple<at::Tensor, at::Tensor, at::Tensor> correlation_fwd_tiled(const at::Tensor& a_s, const at::Tensor& a_t,
                                                                   const c10::optional<at::Tensor>& b_s,
                                                                   const c10::optional<at::Tensor>& b_t, double tau,
                                                                   bool exclude_diagonal);
std::tuple<at::Tensor, at::Tensor> correlation_bwd_tiled(const at::Tensor& grad_rows, const at::Tensor& a_s,
                                                       const at::Tensor& a_t, const c10::optional<at::Tensor>& b_s,
                                                       const c10::optional<at::Tensor>& b_t, const at::Tensor& lse_s,
                                                       const at::Tensor& lse_t, double tau, bool exclude_diagonal);

// correlation_dense.cpp: the materialised CPU path, ops of their own namespace (mlkd_fast_dense; schemas in
// mlkd_fast/ops.py DENSE_SCHEMAS): the forward returns the loss rows and, with student_grad, the gradient
// operand G0 = (Q - P) / tau (M x N, math dtype); the backward needs only G0 and the student features.
std::tuple<at::Tensor, at::Tensor> correlation_dense_fwd_cpu(const at::Tensor& a_s, const at::Tensor& a_t,
                                                             const c10::optional<at::Tensor>& b_s,
                                                             const c10::optional<at::Tensor>& b_t, double tau,
                                                             bool exclude_diagonal, bool student_grad);
std::tuple<at::Tensor, at::Tensor> correlation_dense_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& g0,
                                                             const at::Tensor& a_s,
                                                             const c10::optional<at::Tensor>& b_s);

// linear_kd_rows.cpp: the fused lm_head + divergence loss's row function (op mlkd_fast_lm_native::token_rows,
// schema in mlkd_fast/ops.py LM_SCHEMAS): fp32 student logits (their gradient written over them in place
// when want_grad), an optional fp32/bf16/fp16 teacher; returns the fp32 kd and ce rows.
std::tuple<at::Tensor, at::Tensor> lm_token_rows_cpu(const at::Tensor& z_s, const c10::optional<at::Tensor>& z_t,
                                                     const c10::optional<at::Tensor>& labels,
                                                     const at::Tensor& kd_weight, const at::Tensor& ce_weight,
                                                     c10::string_view divergence, double coef, double temperature,
                                                     double student_softcap, double teacher_softcap, int64_t vocab,
                                                     bool want_grad);

// kd_ce.cpp: the KD method's whole loss (w_ce CE + w_kd T^2 KL, means over the rows) in one pass, ops of
// their own namespace (mlkd_fast_kd_ce; schemas in mlkd_fast/ops.py KD_CE_SCHEMAS). kd_ce_fwd returns the
// fp32 total, kd and ce terms and, with student_grad, d(total)/d(student) ((0,) otherwise); kd_ce returns
// the three terms, its autograd kernel (kd_ce_autograd) recording one C++ node that hands back the
// stored gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_ce_fwd_cpu(const at::Tensor& student,
                                                                         const at::Tensor& teacher,
                                                                         const at::Tensor& target, double temperature,
                                                                         double w_kd, double w_ce, bool student_grad);
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_ce_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                        const at::Tensor& target, double temperature, double w_kd,
                                                        double w_ce);
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_ce_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                                             const at::Tensor& target, double temperature,
                                                             double w_kd, double w_ce);

// ---- shared with the CUDA glue ----

// The math dtype of kd_kl: fp64 when either input is fp64, else fp32.
at::ScalarType kl_math_type(const at::Tensor& s, const at::Tensor& t);

// The checks and the outputs of kd_kl (kd_kl.cpp), shared by the CPU and the CUDA implementation.
// Student and teacher may differ in dtype; the loss rows and the row weights are in the math dtype, each
// gradient in its input's dtype.
struct KdKlOutputs {
  at::Tensor rows, grad_s, grad_t, weight;  // weight: contiguous row_weight in the math dtype, or undefined
};
KdKlOutputs kd_kl_outputs(const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& weight,
                          bool student_grad, bool teacher_grad);

// The correlation's math dtype: fp64 when any feature tensor is fp64, else fp32 (correlation.cpp).
at::ScalarType corr_math_type(const at::Tensor& a_s, const at::Tensor& a_t, const c10::optional<at::Tensor>& b_s,
                              const c10::optional<at::Tensor>& b_t);

// Inverse row norms 1 / max(||x||, kNormEps), computed in `math` (fp32, or fp64 for the fp64 path)
// (correlation.cpp).
at::Tensor inv_norms(const at::Tensor& x, at::ScalarType math);

// The normalisation backward: the gradient of x from that of x^ = x r, r = inv_norm (correlation.cpp).
at::Tensor norm_backward(const at::Tensor& x_hat, const at::Tensor& inv_norm, const at::Tensor& d_hat);

}  // namespace mlkd_fast
