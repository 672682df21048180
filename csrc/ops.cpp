// mlkd_fast compiled ops: the schemas (defined once here) and the C++ CPU kernels.
// CUDA kernels, when built, register for the CUDA dispatch key in csrc/*.cu.
//
// Semantics are those of the Triton ops in kernels/ (see their docstrings); the Python side
// (mlkd_fast/_native.py) adds the fake implementations and autograd.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace mlkd_fast {

constexpr double kNormEps = 1e-8;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------
// Temperature KL, one row at a time (rows in parallel).
//   l = A / Z_t + (m_s - m_t) + (log Z_s - log Z_t),  A = sum_c e^(u_c - m_t) (u_c - v_c)
//   d(T^2 l)/ds = T (q - p),   d(T^2 l)/dt = T p (log p - log q - l)
// Three sweeps over a row that stays in L1/L2: maxima, sums (exps kept), gradients.
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
static void kd_kl_rows_cpu(const scalar_t* s, int64_t s_stride, const scalar_t* t, int64_t t_stride,
                           const bool* mask, float* rows, scalar_t* gs, scalar_t* gt, int64_t n, int64_t c,
                           float temperature) {
  const float inv_t = 1.0f / temperature;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(c, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    // e^(v - m_s), e^(u - m_t) of the current row, kept for the gradient sweep (halves the exps).
    std::vector<float> e_s(c), e_t(c);
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* sr = s + i * s_stride;
      const scalar_t* tr = t + i * t_stride;
      const float keep = (mask == nullptr || mask[i]) ? 1.0f : 0.0f;
      float m_s = kNegInf, m_t = kNegInf;
      for (int64_t j = 0; j < c; ++j) {
        m_s = std::max(m_s, static_cast<float>(sr[j]) * inv_t);
        m_t = std::max(m_t, static_cast<float>(tr[j]) * inv_t);
      }
      // NaN never wins std::max, but it reaches the sums below and so the loss.
      if (m_s == kNegInf) m_s = 0.0f;
      if (m_t == kNegInf) m_t = 0.0f;
      double z_s = 0.0, z_t = 0.0, a = 0.0;  // long rows: fp32 running sums drift
      for (int64_t j = 0; j < c; ++j) {
        const float v = static_cast<float>(sr[j]) * inv_t;
        const float u = static_cast<float>(tr[j]) * inv_t;
        e_s[j] = std::exp(v - m_s);
        e_t[j] = std::exp(u - m_t);
        z_s += e_s[j];
        z_t += e_t[j];
        if (u != kNegInf) a += e_t[j] * (u - v);
      }
      const float log_z_s = static_cast<float>(std::log(z_s)), log_z_t = static_cast<float>(std::log(z_t));
      const float kl = static_cast<float>(a / z_t) + (m_s - m_t) + (log_z_s - log_z_t);
      rows[i] = kl * temperature * temperature * keep;
      const float inv_z_s = static_cast<float>(1.0 / z_s), inv_z_t = static_cast<float>(1.0 / z_t);
      if (gs != nullptr) {
        scalar_t* out = gs + i * c;
        for (int64_t j = 0; j < c; ++j)
          out[j] = static_cast<scalar_t>(temperature * (e_s[j] * inv_z_s - e_t[j] * inv_z_t) * keep);
      }
      if (gt != nullptr) {
        scalar_t* out = gt + i * c;
        for (int64_t j = 0; j < c; ++j) {
          const float u = static_cast<float>(tr[j]) * inv_t;
          const float v = static_cast<float>(sr[j]) * inv_t;
          const float log_ratio = ((u - m_t) - log_z_t) - ((v - m_s) - log_z_s);
          const float g = (u == kNegInf) ? 0.0f : temperature * e_t[j] * inv_z_t * (log_ratio - kl) * keep;
          out[j] = static_cast<scalar_t>(g);
        }
      }
    }
  });
}

static void check_kd_inputs(const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(s.dim() == 2 && t.sizes() == s.sizes(), "kd_kl: student and teacher must be (N, C) of one shape");
  TORCH_CHECK(s.stride(1) == 1 && t.stride(1) == 1, "kd_kl: the last stride must be 1");
  TORCH_CHECK(!mask.has_value() || (mask->scalar_type() == at::kBool && mask->numel() == s.size(0)),
              "kd_kl: row_mask must be a bool vector of length N");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_kl_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                         const c10::optional<at::Tensor>& row_mask,
                                                         double temperature, bool student_grad, bool teacher_grad) {
  check_kd_inputs(student, teacher, row_mask);
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "kd_kl (CPU): student and teacher dtypes differ");
  const int64_t n = student.size(0), c = student.size(1);
  auto rows = at::empty({n}, student.options().dtype(at::kFloat));
  auto grad_s = student_grad ? at::empty({n, c}, student.options()) : at::empty({0}, student.options());
  auto grad_t = teacher_grad ? at::empty({n, c}, teacher.options()) : at::empty({0}, teacher.options());
  at::Tensor mask = row_mask.has_value() ? row_mask->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_kl_cpu", [&] {
    kd_kl_rows_cpu<scalar_t>(student.const_data_ptr<scalar_t>(), student.stride(0),
                             teacher.const_data_ptr<scalar_t>(), teacher.stride(0),
                             mask.defined() ? mask.const_data_ptr<bool>() : nullptr, rows.mutable_data_ptr<float>(),
                             student_grad ? grad_s.mutable_data_ptr<scalar_t>() : nullptr,
                             teacher_grad ? grad_t.mutable_data_ptr<scalar_t>() : nullptr, n, c,
                             static_cast<float>(temperature));
  });
  return {rows, grad_s, grad_t};
}

at::Tensor scale_rows_cpu(const at::Tensor& x, const at::Tensor& g) {
  // fp32 math, result in x's dtype.
  return (x.to(at::kFloat) * g.to(at::kFloat).unsqueeze(1)).to(x.scalar_type());
}

// ------------------------------------------------------------------------------------------
// Correlation KL on CPU: (BM x BN) tiles of both similarity matrices from BLAS matmuls of the
// normalised features; per-row online log-sum-exps; never an (M x N) matrix. The backward walks
// the same tiles once, accumulating the row and the column gradients together.
// ------------------------------------------------------------------------------------------
constexpr int64_t kTile = 1024;

static at::Tensor inv_norms(const at::Tensor& x) {
  return at::linalg_vector_norm(x, 2, {1}, false, at::kFloat).clamp_min(kNormEps).reciprocal();
}

struct CorrOperands {
  bool square;
  at::Tensor a_s, a_t, b_s, b_t;      // normalised fp32 features
  at::Tensor ra_s, rb_s;              // student inverse norms (for the normalisation backward)
};

static CorrOperands corr_operands(const at::Tensor& a_s, const at::Tensor& a_t, const c10::optional<at::Tensor>& b_s,
                                  const c10::optional<at::Tensor>& b_t) {
  CorrOperands o;
  o.square = !b_s.has_value();
  o.ra_s = inv_norms(a_s);
  o.a_s = a_s.to(at::kFloat) * o.ra_s.unsqueeze(1);
  o.a_t = a_t.to(at::kFloat) * inv_norms(a_t).unsqueeze(1);
  if (o.square) {
    o.rb_s = o.ra_s;
    o.b_s = o.a_s;
    o.b_t = o.a_t;
  } else {
    o.rb_s = inv_norms(*b_s);
    o.b_s = b_s->to(at::kFloat) * o.rb_s.unsqueeze(1);
    o.b_t = b_t->to(at::kFloat) * inv_norms(*b_t).unsqueeze(1);
  }
  return o;
}

// Tiles of x^s and x^t for rows [r0, r1) and columns [c0, c1), -inf on the excluded diagonal.
static std::pair<at::Tensor, at::Tensor> corr_tiles(const CorrOperands& o, int64_t r0, int64_t r1, int64_t c0,
                                                    int64_t c1, double inv_tau, bool exclude_diag) {
  auto x_s = at::mm(o.a_s.slice(0, r0, r1), o.b_s.slice(0, c0, c1).t()).mul_(inv_tau);
  auto x_t = at::mm(o.a_t.slice(0, r0, r1), o.b_t.slice(0, c0, c1).t()).mul_(inv_tau);
  if (exclude_diag) {  // entries (i, i): tile coordinates (i - r0, i - c0), diagonal offset r0 - c0
    x_s.diagonal(r0 - c0).fill_(kNegInf);
    x_t.diagonal(r0 - c0).fill_(kNegInf);
  }
  return {x_s, x_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> correlation_fwd_cpu(const at::Tensor& a_s, const at::Tensor& a_t,
                                                                   const c10::optional<at::Tensor>& b_s,
                                                                   const c10::optional<at::Tensor>& b_t, double tau,
                                                                   bool exclude_diagonal) {
  const auto o = corr_operands(a_s, a_t, b_s, b_t);
  const int64_t m = o.a_s.size(0), n = o.b_s.size(0);
  const double inv_tau = 1.0 / tau;
  auto loss = at::empty({m}, o.a_s.options());
  auto lse_s = at::empty({m}, o.a_s.options());
  auto lse_t = at::empty({m}, o.a_s.options());
  for (int64_t r0 = 0; r0 < m; r0 += kTile) {
    const int64_t r1 = std::min(m, r0 + kTile), rows = r1 - r0;
    auto m_s = at::full({rows}, kNegInf, o.a_s.options());
    auto m_t = at::full({rows}, kNegInf, o.a_s.options());
    auto z_s = at::zeros({rows}, o.a_s.options());
    auto z_t = at::zeros({rows}, o.a_s.options());
    auto acc = at::zeros({rows}, o.a_s.options());
    for (int64_t c0 = 0; c0 < n; c0 += kTile) {
      const int64_t c1 = std::min(n, c0 + kTile);
      auto [x_s, x_t] = corr_tiles(o, r0, r1, c0, c1, inv_tau, exclude_diagonal);
      auto new_m_s = at::maximum(m_s, std::get<0>(x_s.max(1)));
      auto ref_s = at::where(new_m_s == kNegInf, at::zeros_like(new_m_s), new_m_s);
      z_s = z_s * (m_s - ref_s).exp() + (x_s - ref_s.unsqueeze(1)).exp().sum(1);
      m_s = new_m_s;
      auto new_m_t = at::maximum(m_t, std::get<0>(x_t.max(1)));
      auto ref_t = at::where(new_m_t == kNegInf, at::zeros_like(new_m_t), new_m_t);
      auto rescale = (m_t - ref_t).exp();
      auto e_t = (x_t - ref_t.unsqueeze(1)).exp();
      auto diff = at::where(x_t == kNegInf, at::zeros_like(x_t), e_t * (x_t - x_s));
      z_t = z_t * rescale + e_t.sum(1);
      acc = acc * rescale + diff.sum(1);
      m_t = new_m_t;
    }
    auto ls = m_s + z_s.log();
    auto lt = m_t + z_t.log();
    loss.slice(0, r0, r1).copy_(acc / z_t - lt + ls);
    lse_s.slice(0, r0, r1).copy_(ls);
    lse_t.slice(0, r0, r1).copy_(lt);
  }
  return {loss, lse_s, lse_t};
}

static at::Tensor norm_backward(const at::Tensor& x_hat, const at::Tensor& inv_norm, const at::Tensor& d_hat) {
  // x^ = x r with r = 1 / max(||x||, eps): d x = r (d x^ - x^ (x^ . d x^)) while ||x|| > eps.
  auto radial = (x_hat * d_hat).sum(1, true) * (inv_norm < 1.0 / kNormEps).unsqueeze(1);
  return inv_norm.unsqueeze(1) * (d_hat - x_hat * radial);
}

std::tuple<at::Tensor, at::Tensor> correlation_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& a_s,
                                                       const at::Tensor& a_t, const c10::optional<at::Tensor>& b_s,
                                                       const c10::optional<at::Tensor>& b_t, const at::Tensor& lse_s,
                                                       const at::Tensor& lse_t, double tau, bool exclude_diagonal) {
  const auto o = corr_operands(a_s, a_t, b_s, b_t);
  const int64_t m = o.a_s.size(0), n = o.b_s.size(0);
  const double inv_tau = 1.0 / tau;
  auto g = grad_rows.to(at::kFloat).contiguous();
  auto d_a_hat = at::zeros_like(o.a_s);
  auto d_b_hat = at::zeros_like(o.b_s);
  for (int64_t r0 = 0; r0 < m; r0 += kTile) {
    const int64_t r1 = std::min(m, r0 + kTile);
    auto ls = lse_s.slice(0, r0, r1).unsqueeze(1);
    auto lt = lse_t.slice(0, r0, r1).unsqueeze(1);
    auto gr = g.slice(0, r0, r1).unsqueeze(1) * inv_tau;
    for (int64_t c0 = 0; c0 < n; c0 += kTile) {
      const int64_t c1 = std::min(n, c0 + kTile);
      auto [x_s, x_t] = corr_tiles(o, r0, r1, c0, c1, inv_tau, exclude_diagonal);
      auto w = gr * ((x_s - ls).exp() - (x_t - lt).exp());  // g_i (Q - P)_ij / tau
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

bool built_with_cuda() {
#ifdef MLKD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(mlkd_fast, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("kd_kl(Tensor student, Tensor teacher, Tensor? row_mask, float temperature, bool student_grad, "
        "bool teacher_grad) -> (Tensor, Tensor, Tensor)");
  m.def("scale_rows(Tensor x, Tensor g) -> Tensor");
  m.def("correlation_fwd(Tensor student_rows, Tensor teacher_rows, Tensor? student_cols, Tensor? teacher_cols, "
        "float tau, bool exclude_diagonal) -> (Tensor, Tensor, Tensor)");
  m.def("correlation_bwd(Tensor grad_rows, Tensor student_rows, Tensor teacher_rows, Tensor? student_cols, "
        "Tensor? teacher_cols, Tensor lse_s, Tensor lse_t, float tau, bool exclude_diagonal) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mlkd_fast, CPU, m) {
  m.impl("kd_kl", &kd_kl_cpu);
  m.impl("scale_rows", &scale_rows_cpu);
  m.impl("correlation_fwd", &correlation_fwd_cpu);
  m.impl("correlation_bwd", &correlation_bwd_cpu);
}

}  // namespace mlkd_fast
