// Outputs as large as the logits (the KL gradients, scale_rows' copy) on the CPU: see output_cache.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace mlkd_fast {

// at::empty(sizes, options), except that CPU outputs of 2 MiB or more come from a small cache of
// 2 MiB-aligned blocks on transparent huge pages (MLKD_FAST_NO_OUTPUT_CACHE=1 turns it off).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace mlkd_fast
