// Constants shared by the CPU sources, the CUDA glue and the CUDA kernels. Torch-free, so that the .cu
// files can include it and stay fast to compile.
#pragma once

#include <cstdint>
#include <limits>

namespace mlkd_fast {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Feature rows are normalised as x / max(||x||, kNormEps) (the reference's F.normalize eps).
constexpr double kNormEps = 1e-8;

// Tiles of the tiled correlation (rows x columns of both similarity matrices per step). On the CPU a
// 1024 x 1024 fp32 tile (4 MiB) stays in L2/L3 while its rows are swept; on CUDA 4096 x 4096 cuBLAS
// tiles keep the GPU busy while bounding the extra memory to two 64 MiB buffers.
constexpr int64_t kCorrTileCpu = 1024;
constexpr int64_t kCorrTileCuda = 4096;

// CPU KL gradients of at least this size are written with streaming (non-temporal) stores.
constexpr int64_t kStreamOutputBytes = int64_t(64) << 20;

// The materialised CPU correlation (cpu/correlation_dense.cpp) computes both similarity matrices in blocks
// of rows of full width, at most this many entries (4 MiB of fp32) for the teacher's block.
constexpr int64_t kDenseBlockEntries = int64_t(1) << 20;
// From this feature width on, its square backward folds the row weights into one symmetric M x M
// operand (a pass over the matrix) and runs one matmul instead of two.
constexpr int64_t kDenseSymmetricMinDim = 256;

}  // namespace mlkd_fast
