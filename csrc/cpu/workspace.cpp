#include "workspace.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <vector>

namespace lstm_ext {
namespace cpu {
namespace {

int64_t byte_size(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  return numel * static_cast<int64_t>(
                     c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
}

// A tensor of `sizes` over the start of a kept byte buffer.
at::Tensor view_of(const at::Tensor& buffer, at::IntArrayRef sizes,
                   const at::TensorOptions& options) {
  return at::empty({0}, options).set_(buffer.storage(), 0, sizes);
}

}  // namespace

at::Tensor workspace(Workspace slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  thread_local std::array<at::Tensor, static_cast<size_t>(Workspace::count)> kept;
  const int64_t bytes = byte_size(sizes, options);
  if (bytes > kMaxWorkspaceBytes) return at::empty(sizes, options);
  at::Tensor& buffer = kept[static_cast<size_t>(slot)];
  // Reused only while nothing else holds its memory (a tensor handed out earlier and still
  // alive keeps the storage's count above one).
  if (!buffer.defined() || buffer.nbytes() < static_cast<size_t>(bytes) ||
      buffer.storage().use_count() != 1) {
    buffer = at::empty({bytes}, options.dtype(at::kByte));
  }
  return view_of(buffer, sizes, options);
}

at::Tensor saved_buffer(Saved kind, at::IntArrayRef sizes, const at::TensorOptions& options) {
  // Enough for the layers and directions of one model's forward, each alive until its backward.
  constexpr size_t kBuffers = 8;
  thread_local std::array<std::vector<at::Tensor>, static_cast<size_t>(Saved::count)> pools;
  const int64_t bytes = byte_size(sizes, options);
  if (bytes == 0 || bytes > kMaxWorkspaceBytes) return at::empty(sizes, options);
  std::vector<at::Tensor>& pool = pools[static_cast<size_t>(kind)];
  const auto is_free = [](const at::Tensor& buffer) {
    return buffer.storage().use_count() == 1;  // nothing outside the pool holds it
  };
  // Only a buffer of exactly this size is handed out again, so that a tensor's storage is its
  // own size (torch.save writes whole storages) and holds nothing from an earlier call.
  int64_t held = 0;
  for (at::Tensor& buffer : pool) {
    if (is_free(buffer) && static_cast<int64_t>(buffer.nbytes()) == bytes) {
      return view_of(buffer, sizes, options);
    }
    held += static_cast<int64_t>(buffer.nbytes());
  }
  // Otherwise a new buffer, kept as the newest: to make room in count and bytes the pool lets
  // go of free buffers of other sizes first, then of the oldest ones still held (their holders
  // free them in time), so that what a training loop's next forward asks for is always kept.
  while (!pool.empty() && (pool.size() >= kBuffers || held + bytes > kMaxWorkspaceBytes)) {
    auto gone = std::find_if(pool.begin(), pool.end(), is_free);
    if (gone == pool.end()) gone = pool.begin();
    held -= static_cast<int64_t>(gone->nbytes());
    pool.erase(gone);
  }
  pool.push_back(at::empty({bytes}, options.dtype(at::kByte)));
  return view_of(pool.back(), sizes, options);
}

}  // namespace cpu
}  // namespace lstm_ext
