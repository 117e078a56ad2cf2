#include "workspace.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#include <array>
#include <cstdlib>
#include <cstring>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace lstm_ext {
namespace cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

#ifdef MADV_HUGEPAGE
// Blocks of 2 MB multiples, 2 MB aligned (a huge page maps only an aligned 2 MB), advised for
// huge pages; smaller requests go to torch's CPU allocator. A storage keeps its allocator, so
// a resize of such a tensor comes back here.
class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kHugePage) return c10::GetDefaultCPUAllocator()->allocate(bytes);
    const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = nullptr;
    TORCH_CHECK(posix_memalign(&data, kHugePage, size) == 0 && data != nullptr,
                "lstm_ext: out of memory allocating ", bytes, " bytes");
    madvise(data, size, MADV_HUGEPAGE);  // advice only: without it the block still works
    return {data, data, &std::free, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

c10::Allocator* huge_page_allocator() {
  static HugePageAllocator allocator;
  static const bool enabled = [] {
    const char* setting = std::getenv("LSTM_EXT_HUGE_PAGES");
    return !(setting && std::strcmp(setting, "0") == 0);
  }();
  return enabled ? &allocator : nullptr;
}
#else
c10::Allocator* huge_page_allocator() { return nullptr; }
#endif

}  // namespace

at::Tensor large_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  c10::Allocator* allocator = huge_page_allocator();
  if (allocator == nullptr || !options.device().is_cpu() || options.requires_grad()) {
    return at::empty(sizes, options);
  }
  return at::detail::empty_generic(sizes, allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()),
                                   options.memory_format_opt());
}

at::Tensor workspace(Workspace slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  thread_local std::array<at::Tensor, static_cast<size_t>(Workspace::count)> kept;
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(
                                    c10::typeMetaToScalarType(options.dtype())));
  if (bytes > kMaxWorkspaceBytes) return at::empty(sizes, options);
  at::Tensor& buffer = kept[static_cast<size_t>(slot)];
  // Reused only while nothing else holds its memory (a tensor handed out earlier and still
  // alive keeps the storage's count above one).
  if (!buffer.defined() || buffer.nbytes() < static_cast<size_t>(bytes) ||
      buffer.storage().use_count() != 1) {
    buffer = large_empty({bytes}, options.dtype(at::kByte));
  }
  return at::empty({0}, options).set_(buffer.storage(), 0, sizes);
}

}  // namespace cpu
}  // namespace lstm_ext
