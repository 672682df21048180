// Large CPU outputs (the gradients, as big as the logits) come from a small cache of 2 MiB-aligned
// blocks advised onto transparent huge pages. Why: glibc maps every allocation over 32 MiB afresh,
// and a fresh 1024 x 32000 fp32 gradient (125 MiB) takes ~32k page faults when first written, ~50 ms
// on the 2-core development VM, more than the KL kernel itself; every step allocates one (the
// forward's gradient; the backward's scaled copy too when the graph is kept). The cache keeps the
// last freed blocks (at most kCachedBlocks, kCacheBytes in all) so that the next step reuses them
// without a fault, like the CUDA caching allocator does on the GPU. Outputs under 2 MiB, other
// devices, other systems, or MLKD_FAST_NO_OUTPUT_CACHE=1: plain at::empty.
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/util/accumulate.h>

#include <cstdlib>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mlkd_fast {

namespace {

#if defined(__linux__)
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kCachedBlocks = 16;
constexpr size_t kCacheBytes = size_t(1) << 30;

class OutputBlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t size = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    Block* block = take(size);
    if (block == nullptr) {
      void* p = nullptr;
      TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&p, kHugePage, size) == 0,
                       "mlkd_fast: could not allocate ", nbytes, " bytes on the CPU");
      madvise(p, size, MADV_HUGEPAGE);  // a hint; ignored where THP is off
      block = new Block{p, size};
    }
    return {block->ptr, block, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  static OutputBlockCache& get() {
    static auto* cache = new OutputBlockCache();  // never destroyed: blocks may outlive static teardown
    return *cache;
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };

  Block* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if ((*it)->size == size) {
        Block* b = *it;
        free_.erase(it);
        cached_bytes_ -= size;
        return b;
      }
    }
    return nullptr;
  }

  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    OutputBlockCache& cache = get();
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      if (block->size <= kCacheBytes) {
        cache.free_.push_back(block);  // newest last
        cache.cached_bytes_ += block->size;
        block = nullptr;
        while (cache.free_.size() > kCachedBlocks || cache.cached_bytes_ > kCacheBytes) {
          evicted.push_back(cache.free_.front());
          cache.cached_bytes_ -= cache.free_.front()->size;
          cache.free_.erase(cache.free_.begin());
        }
      }
    }
    if (block != nullptr) evicted.push_back(block);
    for (Block* b : evicted) {
      std::free(b->ptr);
      delete b;
    }
  }

  std::mutex mutex_;
  std::vector<Block*> free_;
  size_t cached_bytes_ = 0;
};
#endif

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
  static const bool enabled = std::getenv("MLKD_FAST_NO_OUTPUT_CACHE") == nullptr;
  const auto dtype = c10::typeMetaToScalarType(options.dtype());
  if (enabled && options.device().is_cpu() &&
      c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(dtype)) >= static_cast<int64_t>(kHugePage)) {
    return at::detail::empty_generic(sizes, &OutputBlockCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                     c10::nullopt);
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace mlkd_fast
