// The CUDA implementations of the mlkd_fast ops (registered in registration.cpp): tensors turned into
// the plain launcher arguments of launchers.h, launched on the current stream with no host sync, plus
// the ATen paths the kernels do not cover: fp64 inputs (the kernels compute in fp32, and fp64 must keep
// fp64 math) and the correlation of fp32 features (the tiled code of cpu/correlation.cpp on cuBLAS).
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/exp2.h>
#include <ATen/ops/floor.h>
#include <ATen/ops/frexp.h>
#include <ATen/ops/log2.h>
#include <ATen/ops/log_softmax.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/promote_types.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>

#include "../cpu/ops.h"
#include "launchers.h"
#include "ops.h"

namespace mlkd_fast {

static CudaDtype cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CudaDtype::kFloat;
    case at::kHalf: return CudaDtype::kHalf;
    case at::kBFloat16: return CudaDtype::kBFloat16;
    default: TORCH_CHECK(false, "mlkd_fast CUDA kernels take float32, float16 or bfloat16, got ", t);
  }
}

// kd_kl in fp64 with ATen ops (the same formulas as the CPU kernels): the CUDA KL kernels compute in
// fp32 and read fp32/fp16/bf16 only, and fp64 inputs must keep fp64 math. Materialises a few (N, C)
// fp64 temporaries: fp64 is the accuracy path, not a speed target.
static std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_kl_aten_f64(const at::Tensor& student, const at::Tensor& teacher,
                                                                     const at::Tensor& weight, double temperature,
                                                                     bool student_grad, bool teacher_grad) {
  const double neg_inf = -std::numeric_limits<double>::infinity();
  const auto v = student.to(at::kDouble) / temperature;
  const auto u = teacher.to(at::kDouble) / temperature;
  const auto log_q = at::log_softmax(v, 1);
  const auto log_p = at::log_softmax(u, 1);
  const auto p = log_p.exp();
  const auto masked = u == neg_inf;  // a -inf teacher logit: p = 0, contributes exactly 0
  const auto zero = at::zeros({}, v.options());
  const auto kl = at::where(masked, zero, p * (log_p - log_q)).sum(1);
  const auto keep = weight.defined() ? weight.to(at::kDouble) : at::ones({v.size(0)}, v.options());
  const auto dropped = (keep == 0).unsqueeze(1);  // weight 0: exactly 0, whatever the row holds
  auto rows = at::where(keep == 0, zero, kl * (temperature * temperature) * keep);
  const auto w = (keep * temperature).unsqueeze(1);
  auto grad_s = student_grad ? at::where(dropped, zero, (log_q.exp() - p) * w).to(student.scalar_type())
                             : at::empty({0}, student.options());
  auto grad_t = teacher_grad
                    ? at::where(dropped | masked, zero, p * (log_p - log_q - kl.unsqueeze(1)) * w).to(teacher.scalar_type())
                    : at::empty({0}, teacher.options());
  return {rows, grad_s, grad_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_kl_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                          const c10::optional<at::Tensor>& row_weight,
                                                          double temperature, bool student_grad, bool teacher_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  if (kl_math_type(student, teacher) == at::kDouble) {
    auto out = kd_kl_outputs(student, teacher, row_weight, false, false);  // the checks; outputs come from ATen
    return kd_kl_aten_f64(student, teacher, out.weight, temperature, student_grad, teacher_grad);
  }
  if (student.scalar_type() != teacher.scalar_type()) {
    // The CUDA kernels read one dtype: the narrower input is widened (one copy of it) and its stored
    // gradient narrowed back to its own dtype.
    const auto common = at::promote_types(student.scalar_type(), teacher.scalar_type());
    auto [rows, gs, gt] = kd_kl_cuda(student.to(common), teacher.to(common), row_weight, temperature, student_grad,
                                     teacher_grad);
    return {rows, student_grad ? gs.to(student.scalar_type()) : at::empty({0}, student.options()),
            teacher_grad ? gt.to(teacher.scalar_type()) : at::empty({0}, teacher.options())};
  }
  auto [rows, grad_s, grad_t, weight] = kd_kl_outputs(student, teacher, row_weight, student_grad, teacher_grad);
  const int64_t n = student.size(0), c = student.size(1);
  KdKlArgs args{cuda_dtype(student.scalar_type()), student.const_data_ptr(), student.stride(0),
                teacher.const_data_ptr(), teacher.stride(0), weight.defined() ? weight.const_data_ptr<float>() : nullptr,
                rows.mutable_data_ptr<float>(), student_grad ? grad_s.mutable_data_ptr() : nullptr,
                teacher_grad ? grad_t.mutable_data_ptr() : nullptr, n, c, static_cast<float>(temperature)};
  const KdKlSplit split = kd_kl_cuda_split(n, c);
  at::Tensor partials;
  if (split.splits > 1) {
    partials = at::empty({n, split.splits, 5}, student.options().dtype(at::kFloat));
    args.splits = split.splits;
    args.span = split.span;
    args.partials = partials.mutable_data_ptr<float>();
  }
  const cudaError_t err = kd_kl_cuda_launch(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "kd_kl CUDA kernel launch failed: ", cudaGetErrorString(err));
  return {rows, grad_s, grad_t};
}

at::Tensor scale_rows_cuda(const at::Tensor& x, const at::Tensor& g) {
  TORCH_CHECK(x.dim() == 2 && g.dim() == 1 && g.size(0) == x.size(0), "scale_rows: x (N, C) and g (N,)");
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.scalar_type() == at::kDouble) return x * g.to(at::kDouble).unsqueeze(1);  // the kernel is fp32-math only
  auto xc = x.contiguous();
  auto gc = g.to(at::kFloat).contiguous();
  auto out = at::empty_like(xc);
  const cudaError_t err = scale_rows_cuda_launch(cuda_dtype(x.scalar_type()), xc.const_data_ptr(),
                                                 gc.const_data_ptr<float>(), out.mutable_data_ptr(), xc.size(0),
                                                 xc.size(1), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "scale_rows CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

void scale_rows_inplace_cuda(const at::Tensor& x, const at::Tensor& g) {
  TORCH_CHECK(x.dim() == 2 && g.dim() == 1 && g.size(0) == x.size(0), "scale_rows_: x (N, C) and g (N,)");
  TORCH_CHECK(x.stride(1) == 1, "scale_rows_: the last stride of x must be 1");
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.scalar_type() == at::kDouble) {  // the kernel is fp32-math only
    x.mul_(g.to(at::kDouble).unsqueeze(1));
    return;
  }
  auto gc = g.to(at::kFloat).contiguous();
  const cudaError_t err = scale_rows_inplace_cuda_launch(cuda_dtype(x.scalar_type()), x.mutable_data_ptr(), x.stride(0),
                                                         gc.const_data_ptr<float>(), x.size(0), x.size(1),
                                                         c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "scale_rows_ CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// Correlation on CUDA: fp16/bf16 features (one dtype for all four) on sm_80+ take the fused tensor-core
// kernels of correlation_cuda.cu; fp32, mixed dtypes (and MLKD_FAST_CORR_TILED=1) the tiled cuBLAS code
// of cpu/correlation.cpp in fp32, and fp64 the same code in fp64 (the fused kernels have fp16/bf16 tensor-core tiles only,
// and fp64 inputs must keep fp64 math).
static bool corr_fused(const at::Tensor& a_s, const at::Tensor& a_t, const c10::optional<at::Tensor>& b_s,
                       const c10::optional<at::Tensor>& b_t) {
  const auto t = a_s.scalar_type();
  if (t != at::kHalf && t != at::kBFloat16) return false;
  if (a_t.scalar_type() != t || (b_s && b_s->scalar_type() != t) || (b_t && b_t->scalar_type() != t)) return false;
  const char* tiled = std::getenv("MLKD_FAST_CORR_TILED");  // read per call: benchmarks compare both paths
  if (tiled != nullptr && *tiled != '\0' && std::strcmp(tiled, "0") != 0) return false;
  return correlation_cuda_fused_supported(cuda_dtype(t));
}

namespace {

struct FusedCorr {
  at::Tensor a_s, a_t, b_s, b_t;      // contiguous features (b = a in square mode)
  at::Tensor ra_s, ra_t, rb_s, rb_t;  // fp32 inverse norms
  CorrSide side_a() const {
    return {a_s.const_data_ptr(), a_s.stride(0), a_t.const_data_ptr(), a_t.stride(0), ra_s.const_data_ptr<float>(),
            ra_t.const_data_ptr<float>(), a_s.size(0)};
  }
  CorrSide side_b() const {
    return {b_s.const_data_ptr(), b_s.stride(0), b_t.const_data_ptr(), b_t.stride(0), rb_s.const_data_ptr<float>(),
            rb_t.const_data_ptr<float>(), b_s.size(0)};
  }
};

}  // namespace

static FusedCorr fused_corr(const at::Tensor& a_s, const at::Tensor& a_t, const c10::optional<at::Tensor>& b_s,
                            const c10::optional<at::Tensor>& b_t) {
  FusedCorr f;
  f.a_s = a_s.contiguous();
  f.a_t = a_t.contiguous();
  f.ra_s = inv_norms(f.a_s, at::kFloat);
  f.ra_t = inv_norms(f.a_t, at::kFloat);
  if (b_s.has_value()) {
    f.b_s = b_s->contiguous();
    f.b_t = b_t->contiguous();
    f.rb_s = inv_norms(f.b_s, at::kFloat);
    f.rb_t = inv_norms(f.b_t, at::kFloat);
  } else {
    f.b_s = f.a_s;
    f.b_t = f.a_t;
    f.rb_s = f.ra_s;
    f.rb_t = f.ra_t;
  }
  return f;
}

// (1,) fp32 power of two S with max |factors| S ~ min(count, 1024), computed on the device.
static at::Tensor operand_scale(const at::Tensor& factors, int64_t count) {
  const double target = static_cast<double>(std::min<int64_t>(count, 1024));
  return at::exp2(at::floor(at::log2(factors.abs().amax().clamp_min(1e-30).reciprocal() * target))).reshape({1});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> correlation_fwd_cuda(const at::Tensor& a_s, const at::Tensor& a_t,
                                                                  const c10::optional<at::Tensor>& b_s,
                                                                  const c10::optional<at::Tensor>& b_t, double tau,
                                                                  bool exclude_diagonal) {
  const c10::cuda::CUDAGuard guard(a_s.device());
  if (!corr_fused(a_s, a_t, b_s, b_t)) return correlation_fwd_tiled(a_s, a_t, b_s, b_t, tau, exclude_diagonal);
  const FusedCorr f = fused_corr(a_s, a_t, b_s, b_t);
  const int64_t m = a_s.size(0);
  auto loss = at::empty({m}, f.ra_s.options());
  auto lse_s = at::empty({m}, f.ra_s.options());
  auto lse_t = at::empty({m}, f.ra_s.options());
  CorrArgs args{cuda_dtype(a_s.scalar_type()), f.side_a(), f.side_b(), a_s.size(1), a_t.size(1),
                static_cast<float>(1.0 / tau), exclude_diagonal};
  args.loss = loss.mutable_data_ptr<float>();
  args.lse_s_out = lse_s.mutable_data_ptr<float>();
  args.lse_t_out = lse_t.mutable_data_ptr<float>();
  const CorrSplit split = correlation_cuda_split(m, f.b_s.size(0), a_s.size(1), false);
  at::Tensor partials;
  if (split.splits > 1) {
    partials = at::empty({split.splits, m, 5}, f.ra_s.options());
    args.col_splits = split.splits;
    args.col_span = split.span;
    args.partials = partials.mutable_data_ptr<float>();
  }
  const cudaError_t err = correlation_fwd_cuda_launch(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "correlation_fwd CUDA kernel launch failed: ", cudaGetErrorString(err));
  return {loss, lse_s, lse_t};
}

// The student's inverse norms as the fused backward passes take them: 0 for all-zero rows. Such a row's
// similarities are 0 whatever its factor and its matmul contribution is exactly 0, but its clamped
// 1 / eps would set the fp16/bf16 operand scale (operand_scale) and flush every other entry of the
// operands to zero. The normalisation backward keeps 1 / eps.
static at::Tensor pass_inv_norms(const at::Tensor& x, const at::Tensor& inv_norm) {
  if (x.size(1) == 0) return inv_norm;
  return inv_norm.masked_fill(x.abs().amax(1) == 0, 0.0);
}

// fp16 student features as the backward passes take them (kernels/correlation.py's _unit_scaled): every row
// times the power of two 2^(e + 7) giving it a norm in (2^7, 2^8] (r = m 2^e, m in [0.5, 1)), its inverse norm
// divided by it (m 2^-7). Exact; the operands (Q - P) f then no longer carry the norms, which at a norm spread
// of 1e6 or more made the large-norm rows' operands underflow fp16 under one operand scale.
static std::pair<at::Tensor, at::Tensor> unit_scaled(const at::Tensor& x, const at::Tensor& inv_norm) {
  const auto [mantissa, exponent] = at::frexp(inv_norm);
  const auto power = at::exp2((exponent + 7).to(at::kFloat));
  return {(x.to(at::kFloat) * power.unsqueeze(1)).to(x.scalar_type()).contiguous(), mantissa * (1.0 / 128.0)};
}

std::tuple<at::Tensor, at::Tensor> correlation_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& a_s,
                                                      const at::Tensor& a_t, const c10::optional<at::Tensor>& b_s,
                                                      const c10::optional<at::Tensor>& b_t, const at::Tensor& lse_s,
                                                      const at::Tensor& lse_t, double tau, bool exclude_diagonal) {
  const c10::cuda::CUDAGuard guard(a_s.device());
  if (!corr_fused(a_s, a_t, b_s, b_t))
    return correlation_bwd_tiled(grad_rows, a_s, a_t, b_s, b_t, lse_s, lse_t, tau, exclude_diagonal);
  const FusedCorr f = fused_corr(a_s, a_t, b_s, b_t);
  FusedCorr passes = f;  // the passes' inverse norms (pass_inv_norms); f keeps the true ones
  passes.ra_s = pass_inv_norms(f.a_s, f.ra_s);
  passes.rb_s = b_s.has_value() ? pass_inv_norms(f.b_s, f.rb_s) : passes.ra_s;
  if (f.a_s.scalar_type() == at::kHalf) {
    std::tie(passes.a_s, passes.ra_s) = unit_scaled(f.a_s, passes.ra_s);
    if (b_s.has_value()) {
      std::tie(passes.b_s, passes.rb_s) = unit_scaled(f.b_s, passes.rb_s);
    } else {
      passes.b_s = passes.a_s;
      passes.rb_s = passes.ra_s;
    }
  }
  const int64_t m = f.a_s.size(0), n = f.b_s.size(0), ds = f.a_s.size(1);
  const auto g = grad_rows.to(at::kFloat).contiguous();
  const auto ls = lse_s.to(at::kFloat).contiguous();
  const auto lt = lse_t.to(at::kFloat).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  auto pass = [&](const CorrSide& rows, const CorrSide& cols, bool stats_on_cols, const at::Tensor& scale,
                  at::Tensor& d_rows) {
    CorrArgs args{cuda_dtype(a_s.scalar_type()), rows, cols, ds, f.a_t.size(1), static_cast<float>(1.0 / tau),
                  exclude_diagonal};
    args.lse_s = ls.const_data_ptr<float>();
    args.lse_t = lt.const_data_ptr<float>();
    args.grad = g.const_data_ptr<float>();
    args.stats_on_cols = stats_on_cols;
    args.operand_scale = scale.const_data_ptr<float>();
    args.d_rows = d_rows.mutable_data_ptr<float>();
    args.d_rows_stride = d_rows.stride(0);
    const CorrSplit split = correlation_cuda_split(rows.n, cols.n, ds, true);
    at::Tensor partials;
    if (split.splits > 1) {
      partials = at::empty({split.splits, rows.n, ds}, f.ra_s.options());
      args.col_splits = split.splits;
      args.col_span = split.span;
      args.partials = partials.mutable_data_ptr<float>();
    }
    const cudaError_t err = correlation_bwd_cuda_launch(args, stream);
    TORCH_CHECK(err == cudaSuccess, "correlation_bwd CUDA kernel launch failed: ", cudaGetErrorString(err));
  };
  auto d_a_hat = at::empty({m, ds}, f.ra_s.options());
  auto d_b_hat = at::empty({n, ds}, f.ra_s.options());
  const auto scale_rows_pass = operand_scale(passes.rb_s, n);
  const auto scale_cols_pass = operand_scale(g * passes.ra_s * (1.0 / tau), m);
  pass(passes.side_a(), passes.side_b(), false, scale_rows_pass, d_a_hat);
  pass(passes.side_b(), passes.side_a(), true, scale_cols_pass, d_b_hat);
  const auto a_hat = f.a_s.to(at::kFloat) * f.ra_s.unsqueeze(1);
  if (!b_s.has_value()) {
    return {norm_backward(a_hat, f.ra_s, d_a_hat + d_b_hat).to(a_s.scalar_type()), at::empty({0}, a_s.options())};
  }
  const auto b_hat = f.b_s.to(at::kFloat) * f.rb_s.unsqueeze(1);
  return {norm_backward(a_hat, f.ra_s, d_a_hat).to(a_s.scalar_type()),
          norm_backward(b_hat, f.rb_s, d_b_hat).to(b_s->scalar_type())};
}

}  // namespace mlkd_fast
