// Correlation KL, tiled: the CPU implementation, and on CUDA the path of fp32 and fp64 features or
// mixed dtypes (cuda/glue.cpp); fp64 anywhere makes the math fp64. (BM x BN) tiles of both similarity
// matrices from BLAS / cuBLAS matmuls of the normalised features; per-row online log-sum-exps (on CPU
// each tile row swept in L1 by the KL's vectorised loops, on CUDA ATen ops); never an (M x N) matrix
// (extra memory O(tile^2 + (M + N) D)). The backward walks the same tiles once, accumulating the row
// and the column gradients together.
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "../common.h"
#include "kl_sweeps.h"
#include "ops.h"
#include "output_cache.h"

namespace mlkd_fast {

static int64_t corr_tile(const at::Tensor& x) { return x.is_cuda() ? kCorrTileCuda : kCorrTileCpu; }

at::Tensor inv_norms(const at::Tensor& x, at::ScalarType math) {
  return at::linalg_vector_norm(x, 2, {1}, false, math).clamp_min(kNormEps).reciprocal();
}

// The tiled correlation's math dtype: fp64 when any feature tensor is fp64 (fp64 stays fp64), else
// fp32 (fp16/bf16 features are widened; mixed student/teacher dtypes meet there).
at::ScalarType corr_math_type(const at::Tensor& a_s, const at::Tensor& a_t,
                              const c10::optional<at::Tensor>& b_s, const c10::optional<at::Tensor>& b_t) {
  for (const at::Tensor* x : {&a_s, &a_t, b_s ? &*b_s : nullptr, b_t ? &*b_t : nullptr})
    if (x != nullptr && x->scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

namespace {

struct CorrOperands {
  bool square;
  at::Tensor a_s, a_t, b_s, b_t;      // normalised features in the math dtype
  at::Tensor ra_s, rb_s;              // student inverse norms (for the normalisation backward)
};

static CorrOperands corr_operands(const at::Tensor& a_s, const at::Tensor& a_t, const c10::optional<at::Tensor>& b_s,
                                  const c10::optional<at::Tensor>& b_t) {
  CorrOperands o;
  const auto math = corr_math_type(a_s, a_t, b_s, b_t);
  o.square = !b_s.has_value();
  o.ra_s = inv_norms(a_s, math);
  o.a_s = a_s.to(math) * o.ra_s.unsqueeze(1);
  o.a_t = a_t.to(math) * inv_norms(a_t, math).unsqueeze(1);
  if (o.square) {
    o.rb_s = o.ra_s;
    o.b_s = o.a_s;
    o.b_t = o.a_t;
  } else {
    o.rb_s = inv_norms(*b_s, math);
    o.b_s = b_s->to(math) * o.rb_s.unsqueeze(1);
    o.b_t = b_t->to(math) * inv_norms(*b_t, math).unsqueeze(1);
  }
  return o;
}

// Two flat fp32 buffers, one tile each, that every tile of a call is written into: fresh tensors per
// tile would page-fault ~100 MB per pass on CPU (4 MB each, beyond the allocator's cache). On CPU they
// come from the output block cache (output_cache.h), so that a call does not fault them in again either.
struct TileBuffers {
  at::Tensor s, t;
  TileBuffers(const at::Tensor& like, int64_t entries)
      : s(empty_output({entries}, like.options())), t(empty_output({entries}, like.options())) {}
};

}  // namespace

// Tiles of tau x^s and tau x^t (unscaled: their consumers scale them) for rows [r0, r1) and columns
// [c0, c1), contiguous views of the buffers, -inf on the excluded diagonal.
static std::pair<at::Tensor, at::Tensor> corr_tiles(const CorrOperands& o, TileBuffers& buf, int64_t r0, int64_t r1,
                                                    int64_t c0, int64_t c1, bool exclude_diag) {
  auto x_s = buf.s.narrow(0, 0, (r1 - r0) * (c1 - c0)).view({r1 - r0, c1 - c0});
  auto x_t = buf.t.narrow(0, 0, (r1 - r0) * (c1 - c0)).view({r1 - r0, c1 - c0});
  at::mm_out(x_s, o.a_s.slice(0, r0, r1), o.b_s.slice(0, c0, c1).t());
  at::mm_out(x_t, o.a_t.slice(0, r0, r1), o.b_t.slice(0, c0, c1).t());
  if (exclude_diag) {  // entries (i, i): tile coordinates (i - r0, i - c0), diagonal offset r0 - c0
    x_s.diagonal(r0 - c0).fill_(kNegInf);
    x_t.diagonal(r0 - c0).fill_(kNegInf);
  }
  return {x_s, x_t};
}

// One tile of the forward absorbed into its rows' running statistics (state: m^s, Z^s, m^t, Z^t, A).
// ATen version (CUDA, and fp64 on CPU, which the fp32 sweeps below cannot take): whole-tile ops,
// scaled by 1 / tau in place first.
static void absorb_tile_aten(at::Tensor& x_s, at::Tensor& x_t, double inv_tau, at::Tensor& state) {
  x_s.mul_(inv_tau);
  x_t.mul_(inv_tau);
  auto m_s = state[0], z_s = state[1], m_t = state[2], z_t = state[3], acc = state[4];
  auto new_m_s = at::maximum(m_s, std::get<0>(x_s.max(1)));
  auto ref_s = at::where(new_m_s == kNegInf, at::zeros_like(new_m_s), new_m_s);
  z_s.mul_((m_s - ref_s).exp()).add_((x_s - ref_s.unsqueeze(1)).exp().sum(1));
  auto new_m_t = at::maximum(m_t, std::get<0>(x_t.max(1)));
  auto ref_t = at::where(new_m_t == kNegInf, at::zeros_like(new_m_t), new_m_t);
  auto rescale = (m_t - ref_t).exp();
  auto e_t = (x_t - ref_t.unsqueeze(1)).exp();
  z_t.mul_(rescale).add_(e_t.sum(1));
  acc.mul_(rescale).add_(at::where(x_t == kNegInf, at::zeros_like(x_t), e_t * (x_t - x_s)).sum(1));
  m_s.copy_(new_m_s);
  m_t.copy_(new_m_t);
}

// CPU version: rows in parallel, each row of both tiles swept while it sits in L1 with the
// KL's sweeps (the max, then the exps with Z^s, Z^t and A, 0 where x^t = -inf; 1 / tau applied
// inside), instead of a dozen whole-tile ATen passes through memory.
static void absorb_tile_cpu(at::Tensor& x_s, at::Tensor& x_t, float inv_tau, at::Tensor& state) {
  const int64_t rows = x_s.size(0), cols = x_s.size(1);
  float* xs = x_s.data_ptr<float>();
  float* xt = x_t.data_ptr<float>();
  float* st = state.data_ptr<float>();
  const KlSweeps& sweeps = kl_sweeps();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> exps(2 * cols);
    for (int64_t i = begin; i < end; ++i) {
      const float* v = xs + i * cols;
      const float* u = xt + i * cols;
      float &m_s = st[i], &z_s = st[rows + i], &m_t = st[2 * rows + i], &z_t = st[3 * rows + i],
            &acc = st[4 * rows + i];
      const RowMax mx = sweeps.max2(v, u, cols);
      const float new_m_s = std::max(m_s, mx.x * inv_tau);
      const float new_m_t = std::max(m_t, mx.y * inv_tau);
      const float ref_s = new_m_s == kNegInf ? 0.0f : new_m_s;
      const float ref_t = new_m_t == kNegInf ? 0.0f : new_m_t;
      const KlSums sums = sweeps.exp_sums(v, u, inv_tau, ref_s, ref_t, exps.data(), exps.data() + cols, cols);
      const float rescale = std::exp(m_t - ref_t);
      z_s = z_s * std::exp(m_s - ref_s) + static_cast<float>(sums.z_x);
      z_t = z_t * rescale + static_cast<float>(sums.z_y);
      acc = acc * rescale + static_cast<float>(sums.a * inv_tau);
      m_s = new_m_s;
      m_t = new_m_t;
    }
  });
}

// The backward's matmul operand g_i (Q - P)_ij / tau of one CPU tile, written over x_s:
// per row, e^(x / tau - lse) of both sides, then e^s w - e^t w with w = g_i / tau (the KL's sweeps).
static at::Tensor grad_operand_tile_cpu(at::Tensor& x_s, at::Tensor& x_t, float inv_tau, const at::Tensor& lse_s,
                                        const at::Tensor& lse_t, const at::Tensor& g_over_tau) {
  const int64_t rows = x_s.size(0), cols = x_s.size(1);
  float* xs = x_s.data_ptr<float>();
  float* xt = x_t.data_ptr<float>();
  const auto ls = lse_s.contiguous(), lt = lse_t.contiguous(), gr = g_over_tau.contiguous();
  const float* ls_p = ls.const_data_ptr<float>();
  const float* lt_p = lt.const_data_ptr<float>();
  const float* gr_p = gr.const_data_ptr<float>();
  const KlSweeps& sweeps = kl_sweeps();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* v = xs + i * cols;
      sweeps.diff_exp(v, xt + i * cols, inv_tau, ls_p[i], lt_p[i], gr_p[i], gr_p[i], v, cols);
    }
  });
  return x_s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> correlation_fwd_tiled(const at::Tensor& a_s, const at::Tensor& a_t,
                                                                   const c10::optional<at::Tensor>& b_s,
                                                                   const c10::optional<at::Tensor>& b_t, double tau,
                                                                   bool exclude_diagonal) {
  const auto o = corr_operands(a_s, a_t, b_s, b_t);
  const int64_t m = o.a_s.size(0), n = o.b_s.size(0), kTile = corr_tile(a_s);
  const double inv_tau = 1.0 / tau;
  TileBuffers tiles(o.a_s, std::min(kTile, m) * std::min(kTile, n));
  auto loss = at::empty({m}, o.a_s.options());
  auto lse_s = at::empty({m}, o.a_s.options());
  auto lse_t = at::empty({m}, o.a_s.options());
  for (int64_t r0 = 0; r0 < m; r0 += kTile) {
    const int64_t r1 = std::min(m, r0 + kTile), rows = r1 - r0;
    // running m^s, Z^s, m^t, Z^t, A of the block's rows
    auto state = at::zeros({5, rows}, o.a_s.options());
    state[0].fill_(kNegInf);
    state[2].fill_(kNegInf);
    for (int64_t c0 = 0; c0 < n; c0 += kTile) {
      const int64_t c1 = std::min(n, c0 + kTile);
      auto [x_s, x_t] = corr_tiles(o, tiles, r0, r1, c0, c1, exclude_diagonal);
      if (x_s.is_cuda() || x_s.scalar_type() != at::kFloat)
        absorb_tile_aten(x_s, x_t, inv_tau, state);
      else
        absorb_tile_cpu(x_s, x_t, static_cast<float>(inv_tau), state);
    }
    auto ls = state[0] + state[1].log();
    auto lt = state[2] + state[3].log();
    loss.slice(0, r0, r1).copy_(state[4] / state[3] - lt + ls);
    lse_s.slice(0, r0, r1).copy_(ls);
    lse_t.slice(0, r0, r1).copy_(lt);
  }
  return {loss, lse_s, lse_t};
}

at::Tensor norm_backward(const at::Tensor& x_hat, const at::Tensor& inv_norm, const at::Tensor& d_hat) {
  // x^ = x r with r = 1 / max(||x||, eps): d x = r (d x^ - x^ (x^ . d x^)) while ||x|| > eps.
  auto radial = (x_hat * d_hat).sum(1, true) * (inv_norm < 1.0 / kNormEps).unsqueeze(1);
  return inv_norm.unsqueeze(1) * (d_hat - x_hat * radial);
}

std::tuple<at::Tensor, at::Tensor> correlation_bwd_tiled(const at::Tensor& grad_rows, const at::Tensor& a_s,
                                                       const at::Tensor& a_t, const c10::optional<at::Tensor>& b_s,
                                                       const c10::optional<at::Tensor>& b_t, const at::Tensor& lse_s,
                                                       const at::Tensor& lse_t, double tau, bool exclude_diagonal) {
  const auto o = corr_operands(a_s, a_t, b_s, b_t);
  const int64_t m = o.a_s.size(0), n = o.b_s.size(0), kTile = corr_tile(a_s);
  const double inv_tau = 1.0 / tau;
  TileBuffers tiles(o.a_s, std::min(kTile, m) * std::min(kTile, n));
  auto g = grad_rows.to(o.a_s.scalar_type()).contiguous();
  const auto lse_s_m = lse_s.to(o.a_s.scalar_type()), lse_t_m = lse_t.to(o.a_s.scalar_type());
  const bool aten_tiles = o.a_s.is_cuda() || o.a_s.scalar_type() != at::kFloat;  // CUDA, or fp64 on CPU
  auto d_a_hat = at::zeros_like(o.a_s);
  auto d_b_hat = at::zeros_like(o.b_s);
  for (int64_t r0 = 0; r0 < m; r0 += kTile) {
    const int64_t r1 = std::min(m, r0 + kTile);
    auto ls = lse_s_m.slice(0, r0, r1).unsqueeze(1);
    auto lt = lse_t_m.slice(0, r0, r1).unsqueeze(1);
    auto gr = g.slice(0, r0, r1).unsqueeze(1) * inv_tau;
    for (int64_t c0 = 0; c0 < n; c0 += kTile) {
      const int64_t c1 = std::min(n, c0 + kTile);
      auto [x_s, x_t] = corr_tiles(o, tiles, r0, r1, c0, c1, exclude_diagonal);
      // g_i (Q - P)_ij / tau
      auto w = aten_tiles ? gr * ((x_s.mul_(inv_tau) - ls).exp() - (x_t.mul_(inv_tau) - lt).exp())
                             : grad_operand_tile_cpu(x_s, x_t, static_cast<float>(inv_tau), ls, lt, gr);
      d_a_hat.slice(0, r0, r1).addmm_(w, o.b_s.slice(0, c0, c1));
      d_b_hat.slice(0, c0, c1).addmm_(w.t(), o.a_s.slice(0, r0, r1));
    }
  }
  if (o.square) {
    auto d_a = norm_backward(o.a_s, o.ra_s, d_a_hat + d_b_hat).to(a_s.scalar_type());
    return {d_a, at::empty({0}, a_s.options())};
  }
  auto d_a = norm_backward(o.a_s, o.ra_s, d_a_hat).to(a_s.scalar_type());
  auto d_b = norm_backward(o.b_s, o.rb_s, d_b_hat).to(b_s->scalar_type());
  return {d_a, d_b};
}

}  // namespace mlkd_fast
