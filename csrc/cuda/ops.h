// The CUDA implementations of the mlkd_fast ops (glue.cpp), registered in registration.cpp. Torch-level,
// unlike launchers.h: only C++ files include it, never the .cu files.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace mlkd_fast {

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_kl_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                          const c10::optional<at::Tensor>& row_weight,
                                                          double temperature, bool student_grad, bool teacher_grad);
at::Tensor scale_rows_cuda(const at::Tensor& x, const at::Tensor& g);
void scale_rows_inplace_cuda(const at::Tensor& x, const at::Tensor& g);
std::tuple<at::Tensor, at::Tensor, at::Tensor> correlation_fwd_cuda(const at::Tensor& a_s, const at::Tensor& a_t,
                                                                  const c10::optional<at::Tensor>& b_s,
                                                                  const c10::optional<at::Tensor>& b_t, double tau,
                                                                  bool exclude_diagonal);
std::tuple<at::Tensor, at::Tensor> correlation_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& a_s,
                                                      const at::Tensor& a_t, const c10::optional<at::Tensor>& b_s,
                                                      const c10::optional<at::Tensor>& b_t, const at::Tensor& lse_s,
                                                      const at::Tensor& lse_t, double tau, bool exclude_diagonal);

}  // namespace mlkd_fast
