// Correlation KL, materialised (docs/design.md §5.1): the CPU path for batches whose M x N matrices fit
// easily. The forward computes both similarity matrices with BLAS in blocks of rows of full width,
// sweeps each row in cache with the KL's vectorised sweeps (kl_sweeps.h) for its loss, and, when the
// student features need a gradient, overwrites the student's block with the gradient operand
// G0 = (Q - P) / tau (0 on an excluded diagonal), which it returns (M x N). The backward is then
// BLAS only, with the row weights g applied to the thin operands:
//   d a^ = g . (G0 b^)        d b^ = G0^T (g . a^)          (square: their sum, b^ = a^)
// That is 2 matmuls forward and 2 backward, as many as the eager loss (the fused tiled path,
// correlation.cpp, recomputes both matrices in the backward: 6), with one sweep per row instead of a
// dozen elementwise passes over M x N matrices. Extra memory: M x N floats (G0) plus one block of
// rows (kDenseBlockEntries floats) for the teacher's matrix. fp64 features take whole-matrix ATen ops.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/log_softmax.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../common.h"
#include "kl_sweeps.h"
#include "ops.h"
#include "output_cache.h"

namespace mlkd_fast {

namespace {

struct Normalised {
  at::Tensor hat, inv;  // x / max(||x||, eps) in the math dtype (contiguous), and 1 / max(||x||, eps)
};

// Rows of a floating tensor (last stride 1) as fp32, converted into `stage` unless they already are.
const float* f32_row(const at::Tensor& x, int64_t i, float* stage) {
  if (x.scalar_type() == at::kFloat) return x.const_data_ptr<float>() + i * x.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlkd_f32_row", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>() + i * x.stride(0);
    for (int64_t j = 0; j < x.size(1); ++j) stage[j] = static_cast<float>(src[j]);
  });
  return stage;
}

// fp32 (from fp32, fp16 or bf16 features): one pass per row, the norm in double.
Normalised normalise_f32(const at::Tensor& x_in) {
  const auto x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t m = x.size(0), d = x.size(1);
  Normalised o{empty_output({m, d}, x.options().dtype(at::kFloat)), at::empty({m}, x.options().dtype(at::kFloat))};
  float* hat = o.hat.data_ptr<float>();
  float* inv = o.inv.data_ptr<float>();
  const KlSweeps& sw = kl_sweeps();
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> stage(x.scalar_type() == at::kFloat ? 0 : d);
    for (int64_t i = begin; i < end; ++i) {
      const float* row = f32_row(x, i, stage.data());
      const float r = static_cast<float>(1.0 / std::max(std::sqrt(sw.sumsq(row, d)), kNormEps));
      inv[i] = r;
      sw.axpby(row, r, row, 0.0f, hat + i * d, d);
    }
  });
  return o;
}

Normalised normalise(const at::Tensor& x, at::ScalarType math) {
  if (math == at::kFloat) return normalise_f32(x);
  auto inv = inv_norms(x, math);
  return {(x.to(math) * inv.unsqueeze(1)).contiguous(), inv};
}

// d x from d x^ for rows of x^ = x r, r = 1 / max(||x||, eps): r (d x^ - x^ (x^ . d x^)) while ||x|| > eps
// (norm_backward, fused per row), written in `out`'s dtype; d_hat is overwritten.
void norm_backward_f32(const Normalised& n, at::Tensor& d_hat, at::Tensor& out) {
  const int64_t m = d_hat.size(0), d = d_hat.size(1);
  const float* hat = n.hat.const_data_ptr<float>();
  const float* inv = n.inv.const_data_ptr<float>();
  float* dh = d_hat.data_ptr<float>();
  const bool direct = out.scalar_type() == at::kFloat;
  const KlSweeps& sw = kl_sweeps();
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* h = hat + i * d;
      float* g = dh + i * d;
      const float r = inv[i];
      const float k = r < static_cast<float>(1.0 / kNormEps) ? static_cast<float>(sw.dot(h, g, d)) : 0.0f;
      float* dst = direct ? out.data_ptr<float>() + i * d : g;
      sw.axpby(g, r, h, -r * k, dst, d);
    }
  });
  if (!direct) out.copy_(d_hat);
}

// x_i = g_i x_i + y_i per row (x, y: (m, d) fp32 contiguous; y undefined: x_i = g_i x_i)
void scale_rows_add_f32(at::Tensor& x, const float* g, const at::Tensor& y) {
  const int64_t m = x.size(0), d = x.size(1);
  float* xp = x.data_ptr<float>();
  const float* yp = y.defined() ? y.const_data_ptr<float>() : nullptr;
  const KlSweeps& sw = kl_sweeps();
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      sw.axpby(xp + i * d, g[i], yp == nullptr ? xp + i * d : yp + i * d, yp == nullptr ? 0.0f : 1.0f, xp + i * d, d);
  });
}

void check_features(const at::Tensor& a_s, const at::Tensor& a_t, const c10::optional<at::Tensor>& b_s,
                    const c10::optional<at::Tensor>& b_t) {
  TORCH_CHECK(a_s.dim() == 2 && a_t.dim() == 2 && a_s.size(0) == a_t.size(0),
              "correlation: student_rows and teacher_rows must be (M, Ds) and (M, Dt)");
  TORCH_CHECK(b_s.has_value() == b_t.has_value(), "correlation: student_cols and teacher_cols go together");
  if (b_s.has_value()) {
    TORCH_CHECK(b_s->dim() == 2 && b_t->dim() == 2 && b_s->size(0) == b_t->size(0) &&
                    b_s->size(1) == a_s.size(1) && b_t->size(1) == a_t.size(1),
                "correlation: student_cols and teacher_cols must be (N, Ds) and (N, Dt)");
  }
}

// The rows [r0, r0 + rows) of a block, x_s / x_t the raw dot products a^ b^T (rows x n, contiguous):
// the loss of each row and, with `store`, G0's row written over x_s.
void sweep_block_f32(float* x_s, float* x_t, int64_t r0, int64_t rows, int64_t n, bool exclude_diagonal,
                     float inv_tau, bool store, float* loss) {
  const KlSweeps& sw = kl_sweeps();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;
    scratch.resize(std::max(scratch.size(), static_cast<size_t>(2 * n)));
    float* e_s = scratch.data();
    float* e_t = e_s + n;
    for (int64_t i = begin; i < end; ++i) {
      float* u = x_s + i * n;
      float* v = x_t + i * n;
      const int64_t row = r0 + i;
      if (exclude_diagonal && row < n) u[row] = v[row] = kNegInf;
      const RowMax mx = sw.max2(u, v, n);
      float m_s = mx.x * inv_tau, m_t = mx.y * inv_tau;
      if (m_s == kNegInf) m_s = 0.0f;  // keep the arithmetic finite; the sums say what the row holds
      if (m_t == kNegInf) m_t = 0.0f;
      const KlSums sums = sw.exp_sums(u, v, inv_tau, m_s, m_t, e_s, e_t, n);
      loss[row] = static_cast<float>(sums.a * inv_tau / sums.z_y + (m_s - m_t) +
                                     (std::log(sums.z_x) - std::log(sums.z_y)));
      if (store)  // (Q - P) / tau = e^s / (tau Z^s) - e^t / (tau Z^t)
        sw.student_grad(e_s, e_t, static_cast<float>(inv_tau / sums.z_x), static_cast<float>(inv_tau / sums.z_y),
                        u, n);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> dense_fwd_f32(const Normalised& a_s, const Normalised& a_t, const Normalised& b_s,
                                                 const Normalised& b_t, double tau, bool exclude_diagonal,
                                                 bool student_grad) {
  const int64_t m = a_s.hat.size(0), n = b_s.hat.size(0);
  const auto opts = a_s.hat.options();
  auto loss = at::empty({m}, opts);
  auto g0 = student_grad ? empty_output({m, n}, opts) : at::empty({0}, opts);
  const int64_t block = std::min(m, std::max<int64_t>(16, kDenseBlockEntries / n));
  auto scratch_t = empty_output({block * n}, opts);
  auto scratch_s = student_grad ? at::Tensor() : empty_output({block * n}, opts);
  const auto b_s_t = b_s.hat.t(), b_t_t = b_t.hat.t();
  for (int64_t r0 = 0; r0 < m; r0 += block) {
    const int64_t rows = std::min(block, m - r0);
    auto x_s = student_grad ? g0.narrow(0, r0, rows) : scratch_s.narrow(0, 0, rows * n).view({rows, n});
    auto x_t = scratch_t.narrow(0, 0, rows * n).view({rows, n});
    at::mm_out(x_s, a_s.hat.narrow(0, r0, rows), b_s_t);
    at::mm_out(x_t, a_t.hat.narrow(0, r0, rows), b_t_t);
    sweep_block_f32(x_s.data_ptr<float>(), x_t.data_ptr<float>(), r0, rows, n, exclude_diagonal,
                    static_cast<float>(1.0 / tau), student_grad, loss.data_ptr<float>());
  }
  return {loss, g0};
}

// fp64: the reference's formulas on whole matrices (the accuracy path, not a speed target).
std::tuple<at::Tensor, at::Tensor> dense_fwd_aten(const Normalised& a_s, const Normalised& a_t, const Normalised& b_s,
                                                  const Normalised& b_t, double tau, bool exclude_diagonal,
                                                  bool student_grad) {
  auto s_s = at::mm(a_s.hat, b_s.hat.t()).mul_(1.0 / tau);
  auto s_t = at::mm(a_t.hat, b_t.hat.t()).mul_(1.0 / tau);
  if (exclude_diagonal) {
    s_s.diagonal().fill_(-std::numeric_limits<double>::infinity());
    s_t.diagonal().fill_(-std::numeric_limits<double>::infinity());
  }
  auto log_q = at::log_softmax(s_s, 1);
  auto log_p = at::log_softmax(s_t, 1);
  auto p = log_p.exp();
  // p (log p - log q), exactly 0 where p = 0 (a -inf teacher entry), NaN kept
  auto has_mass = p > 0;
  auto zero = at::zeros_like(p);
  auto terms = at::where(has_mass, p * (at::where(has_mass, log_p, zero) - at::where(has_mass, log_q, zero)), p * 0);
  auto loss = terms.sum(1);
  auto g0 = student_grad ? (log_q.exp() - p).mul_(1.0 / tau) : at::empty({0}, p.options());
  return {loss, g0};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> correlation_dense_fwd_cpu(const at::Tensor& a_s, const at::Tensor& a_t,
                                                             const c10::optional<at::Tensor>& b_s,
                                                             const c10::optional<at::Tensor>& b_t, double tau,
                                                             bool exclude_diagonal, bool student_grad) {
  check_features(a_s, a_t, b_s, b_t);
  const auto math = corr_math_type(a_s, a_t, b_s, b_t);
  const auto na_s = normalise(a_s, math), na_t = normalise(a_t, math);
  const bool square = !b_s.has_value();
  const auto nb_s = square ? na_s : normalise(*b_s, math), nb_t = square ? na_t : normalise(*b_t, math);
  if (math == at::kFloat) return dense_fwd_f32(na_s, na_t, nb_s, nb_t, tau, exclude_diagonal, student_grad);
  return dense_fwd_aten(na_s, na_t, nb_s, nb_t, tau, exclude_diagonal, student_grad);
}

// The square backward's two products with the row weights folded into one matrix,
// H = diag(g) G0 + G0^T diag(g), then H a^: one matmul instead of two, for a pass over G0 (worth it once
// the features are wide: kDenseSymmetricMinDim). H is formed kDenseBlockEntries at a time (rows
// [r0, r1) of it, from those rows of G0 and those columns read in 64 x 64 tiles) and multiplied at once,
// so its extra memory stays one block.
static void symmetric_backward_f32(const at::Tensor& g0, const float* g, const at::Tensor& a_hat, at::Tensor& d_hat) {
  const int64_t m = g0.size(0);
  const int64_t block = std::min(m, std::max<int64_t>(64, kDenseBlockEntries / m / 64 * 64));
  auto h = empty_output({block * m}, g0.options());
  const float* src = g0.const_data_ptr<float>();
  constexpr int64_t kT = 64;
  for (int64_t r0 = 0; r0 < m; r0 += block) {
    const int64_t rows = std::min(block, m - r0);
    float* dst = h.data_ptr<float>();
    const int64_t col_tiles = (m + kT - 1) / kT;
    at::parallel_for(0, col_tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t tj = begin; tj < end; ++tj) {
        const int64_t j0 = tj * kT, j1 = std::min(m, j0 + kT);
        for (int64_t i0 = 0; i0 < rows; i0 += kT) {
          const int64_t i1 = std::min(rows, i0 + kT);
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t row = r0 + i;
            const float gi = g[row];
            const float* g0_row = src + row * m;
            float* h_row = dst + i * m;
            for (int64_t j = j0; j < j1; ++j) h_row[j] = gi * g0_row[j] + g[j] * src[j * m + row];
          }
        }
      }
    });
    auto d_rows = d_hat.narrow(0, r0, rows);
    at::mm_out(d_rows, h.narrow(0, 0, rows * m).view({rows, m}), a_hat);
  }
}

static std::tuple<at::Tensor, at::Tensor> dense_bwd_f32(const at::Tensor& grad_rows, const at::Tensor& g0,
                                                        const at::Tensor& a_s, const c10::optional<at::Tensor>& b_s) {
  const auto na = normalise_f32(a_s);
  const auto g_t = grad_rows.to(at::kFloat).contiguous();
  const float* g = g_t.const_data_ptr<float>();
  const int64_t m = a_s.size(0), d = a_s.size(1);
  auto out_a = a_s.scalar_type() == at::kFloat ? empty_output({m, d}, a_s.options()) : at::empty({m, d}, a_s.options());
  if (!b_s.has_value()) {
    auto d_hat = empty_output({m, d}, na.hat.options());
    if (d >= kDenseSymmetricMinDim) {
      symmetric_backward_f32(g0, g, na.hat, d_hat);  // H a^
    } else {
      auto ga = empty_output({m, d}, na.hat.options());
      ga.copy_(na.hat);
      scale_rows_add_f32(ga, g, at::Tensor());                  // g . a^
      auto cols = empty_output({m, d}, na.hat.options());
      at::mm_out(cols, g0.t(), ga);                             // G0^T (g . a^)
      at::mm_out(d_hat, g0, na.hat);                            // G0 a^
      scale_rows_add_f32(d_hat, g, cols);                       // g . (G0 a^) + G0^T (g . a^)
    }
    norm_backward_f32(na, d_hat, out_a);
    return {out_a, at::empty({0}, a_s.options())};
  }
  const auto nb = normalise_f32(*b_s);
  const int64_t n = b_s->size(0);
  auto ga = empty_output({m, d}, na.hat.options());
  ga.copy_(na.hat);
  scale_rows_add_f32(ga, g, at::Tensor());
  auto d_cols = empty_output({n, d}, na.hat.options());
  at::mm_out(d_cols, g0.t(), ga);  // G0^T (g . a^)
  auto d_rows = empty_output({m, d}, na.hat.options());
  at::mm_out(d_rows, g0, nb.hat);  // G0 b^, then . g
  scale_rows_add_f32(d_rows, g, at::Tensor());
  auto out_b = b_s->scalar_type() == at::kFloat ? empty_output({n, d}, b_s->options())
                                                : at::empty({n, d}, b_s->options());
  norm_backward_f32(na, d_rows, out_a);
  norm_backward_f32(nb, d_cols, out_b);
  return {out_a, out_b};
}

std::tuple<at::Tensor, at::Tensor> correlation_dense_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& g0,
                                                             const at::Tensor& a_s,
                                                             const c10::optional<at::Tensor>& b_s) {
  TORCH_CHECK(g0.dim() == 2 && g0.size(0) == a_s.size(0) && grad_rows.numel() == a_s.size(0),
              "correlation backward: the gradient operand must be (M, N) and grad_rows (M,)");
  TORCH_CHECK(b_s.has_value() ? g0.size(1) == b_s->size(0) : g0.size(1) == a_s.size(0),
              "correlation backward: the gradient operand has one column per column feature");
  const auto math = g0.scalar_type();
  if (math == at::kFloat) return dense_bwd_f32(grad_rows, g0.contiguous(), a_s, b_s);
  const auto na = normalise(a_s, math);
  const auto g = grad_rows.to(math).reshape({-1, 1});
  const auto ga = na.hat * g;  // g . a^
  auto d_cols = at::mm(g0.t(), ga);  // G0^T (g . a^)
  if (!b_s.has_value()) {  // square: both contributions reach the rows
    auto d_hat = at::mm(g0, na.hat).mul_(g).add_(d_cols);
    return {norm_backward(na.hat, na.inv, d_hat).to(a_s.scalar_type()), at::empty({0}, a_s.options())};
  }
  const auto nb = normalise(*b_s, math);
  auto d_rows = at::mm(g0, nb.hat).mul_(g);  // g . (G0 b^)
  return {norm_backward(na.hat, na.inv, d_rows).to(a_s.scalar_type()),
          norm_backward(nb.hat, nb.inv, d_cols).to(b_s->scalar_type())};
}

}  // namespace mlkd_fast
