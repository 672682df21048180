// The mlkd_fast op library: the schemas (defined once here) and which implementation each device
// dispatches to: the C++ kernels of cpu/ for CPU tensors and, when built with CUDA (MLKD_WITH_CUDA,
// set by setup.py), the CUDA glue of cuda/ for CUDA tensors. The Python side (mlkd_fast/_native.py)
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

TORCH_LIBRARY(mlkd_fast, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("kd_kl(Tensor student, Tensor teacher, Tensor? row_weight, float temperature, bool student_grad, "
        "bool teacher_grad) -> (Tensor, Tensor, Tensor)");
  m.def("scale_rows(Tensor x, Tensor g) -> Tensor");
  m.def("scale_rows_(Tensor(a!) x, Tensor g) -> ()");
  m.def("correlation_fwd(Tensor student_rows, Tensor teacher_rows, Tensor? student_cols, Tensor? teacher_cols, "
        "float tau, bool exclude_diagonal) -> (Tensor, Tensor, Tensor)");
  m.def("correlation_bwd(Tensor grad_rows, Tensor student_rows, Tensor teacher_rows, Tensor? student_cols, "
        "Tensor? teacher_cols, Tensor lse_s, Tensor lse_t, float tau, bool exclude_diagonal) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mlkd_fast, CPU, m) {
  m.impl("kd_kl", &kd_kl_cpu);
  m.impl("scale_rows", &scale_rows_cpu);
  m.impl("scale_rows_", &scale_rows_inplace_cpu);
  m.impl("correlation_fwd", &correlation_fwd_tiled);
  m.impl("correlation_bwd", &correlation_bwd_tiled);
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
