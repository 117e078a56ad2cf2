#include "workspace.h"

#include <ATen/ATen.h>

#include <array>
#include <vector>

namespace lstm_ext {
namespace cpu {

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
    buffer = at::empty({bytes}, options.dtype(at::kByte));
  }
  return at::empty({0}, options).set_(buffer.storage(), 0, sizes);
}

at::Tensor saved_buffer(Saved kind, at::IntArrayRef sizes, const at::TensorOptions& options) {
  // Enough for the layers and directions of one model's forward, each alive until its backward.
  constexpr size_t kBuffers = 8;
  thread_local std::array<std::vector<at::Tensor>, static_cast<size_t>(Saved::count)> pools;
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(
                                    c10::typeMetaToScalarType(options.dtype())));
  if (bytes == 0 || bytes > kMaxWorkspaceBytes) return at::empty(sizes, options);
  std::vector<at::Tensor>& pool = pools[static_cast<size_t>(kind)];
  // Only a buffer of exactly this size is handed out again, so that a tensor's storage is its
  // own size (torch.save writes whole storages) and holds nothing from an earlier call.
  at::Tensor* spare = nullptr;  // a free buffer of another size
  int64_t held = 0;
  for (at::Tensor& buffer : pool) {
    held += static_cast<int64_t>(buffer.nbytes());
    if (buffer.storage().use_count() != 1) continue;  // still held outside the pool
    if (static_cast<int64_t>(buffer.nbytes()) == bytes) {
      return at::empty({0}, options).set_(buffer.storage(), 0, sizes);
    }
    spare = &buffer;
  }
  at::Tensor* slot = nullptr;
  if (spare != nullptr &&
      held - static_cast<int64_t>(spare->nbytes()) + bytes <= kMaxWorkspaceBytes) {
    slot = spare;  // its old pages go back
  } else if (pool.size() < kBuffers && held + bytes <= kMaxWorkspaceBytes) {
    slot = &pool.emplace_back();
  } else {
    return at::empty(sizes, options);
  }
  *slot = at::empty({bytes}, options.dtype(at::kByte));
  return at::empty({0}, options).set_(slot->storage(), 0, sizes);
}

}  // namespace cpu
}  // namespace lstm_ext
