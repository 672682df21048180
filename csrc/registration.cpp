// The mlkd_fast op library's registrations: which implementation each device dispatches to, the C++
// kernels of cpu/ for CPU tensors and, when built with CUDA (MLKD_WITH_CUDA, set by setup.py), the
// CUDA glue of cuda/ for CUDA tensors. The Python side (mlkd_fast/_native.py) defines the schemas,
// loads the library and adds the fake implementations and autograd.
#include <torch/library.h>

#include "cpu/ops.h"
#ifdef MLKD_WITH_CUDA
#include "cuda/ops.h"
#endif

namespace mlkd_fast {

static bool built_with_cuda() {
#ifdef MLKD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The ops' schemas are not declared here: mlkd_fast/ops.py defines them (the one table every backend
// shares) before it loads this library, which only adds their kernels. The build flag lives in a
// namespace of its own.
TORCH_LIBRARY(mlkd_fast_build, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
}

TORCH_LIBRARY_IMPL(mlkd_fast, CPU, m) {
  m.impl("kd_kl", &kd_kl_cpu);
  m.impl("scale_rows", &scale_rows_cpu);
  m.impl("scale_rows_", &scale_rows_inplace_cpu);
  m.impl("correlation_fwd", &correlation_fwd_tiled);
  m.impl("correlation_bwd", &correlation_bwd_tiled);
}

// The materialised correlation, CPU only (mlkd_fast/ops.py DENSE_SCHEMAS declares its ops).
TORCH_LIBRARY_IMPL(mlkd_fast_dense, CPU, m) {
  m.impl("correlation_fwd", &correlation_dense_fwd_cpu);
  m.impl("correlation_bwd", &correlation_dense_bwd_cpu);
}

// The fused lm_head + divergence loss's row function, CPU only (mlkd_fast/ops.py LM_SCHEMAS declares it).
TORCH_LIBRARY_IMPL(mlkd_fast_lm_native, CPU, m) {
  m.impl("token_rows", &lm_token_rows_cpu);
}

// The KD method's whole loss in one pass, CPU only (mlkd_fast/ops.py KD_CE_SCHEMAS declares its ops); kd_ce's
// autograd is C++ (no Python on an eager step's path), kd_ce_fwd has none (kd_ce calls it below autograd).
TORCH_LIBRARY_IMPL(mlkd_fast_kd_ce, CPU, m) {
  m.impl("kd_ce_fwd", &kd_ce_fwd_cpu);
  m.impl("kd_ce", &kd_ce_cpu);
}
TORCH_LIBRARY_IMPL(mlkd_fast_kd_ce, Autograd, m) {
  m.impl("kd_ce", &kd_ce_autograd);
}

#ifdef MLKD_WITH_CUDA
TORCH_LIBRARY_IMPL(mlkd_fast, CUDA, m) {
  m.impl("kd_kl", &kd_kl_cuda);
  m.impl("scale_rows", &scale_rows_cuda);
  m.impl("scale_rows_", &scale_rows_inplace_cuda);
  m.impl("correlation_fwd", &correlation_fwd_cuda);
  m.impl("correlation_bwd", &correlation_bwd_cuda);
}
#endif

}  // namespace mlkd_fast
