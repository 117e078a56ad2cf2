#include "workspace.h"

#include <ATen/ATen.h>

#include <array>

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

}  // namespace cpu
}  // namespace lstm_ext
