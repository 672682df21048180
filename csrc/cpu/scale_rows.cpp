// scale_rows on the CPU: the KL backward, which scales the stored gradient by d loss / d row.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>

#include "ops.h"
#include "output_cache.h"

namespace mlkd_fast {

// dst[i, :] = src[i, :] * g[i], fp32 math for half types, result in src's dtype. In place (dst is src),
// rows whose factor is exactly 1 are skipped: after `total.backward()` that is every row of the KL's
// stored gradient (its weights are folded in), so that backward reads N floats and writes nothing.
static void scale_rows_cpu_into(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& g) {
  TORCH_CHECK(src.dim() == 2 && g.dim() == 1 && g.size(0) == src.size(0), "scale_rows: x must be (N, C), g (N,)");
  TORCH_CHECK(src.stride(1) == 1 && dst.stride(1) == 1, "scale_rows: the last stride must be 1");
  const bool in_place = src.is_same(dst);
  const auto gf = g.to(src.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  const int64_t n = src.size(0), c = src.size(1), src_stride = src.stride(0), dst_stride = dst.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "scale_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* gp = gf.const_data_ptr<acc_t>();
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    scalar_t* out = dst.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 32768 / std::max<int64_t>(c, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t gi = gp[i];
        if (in_place && gi == acc_t(1)) continue;
        const scalar_t* row_in = in + i * src_stride;
        scalar_t* row_out = out + i * dst_stride;
        for (int64_t j = 0; j < c; ++j) row_out[j] = static_cast<scalar_t>(static_cast<acc_t>(row_in[j]) * gi);
      }
    });
  });
}

at::Tensor scale_rows_cpu(const at::Tensor& x, const at::Tensor& g) {
  const auto xc = x.contiguous();
  auto out = empty_output(xc.sizes(), xc.options());
  scale_rows_cpu_into(xc, out, g);
  return out;
}

void scale_rows_inplace_cpu(const at::Tensor& x, const at::Tensor& g) { scale_rows_cpu_into(x, x, g); }

}  // namespace mlkd_fast
