#include "linear.h"

#include "isa.h"
#include "recurrence.h"
#include "workspace.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <variant>

namespace lstm_ext {
namespace {

using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, c10::string_view,
                                   c10::List<std::optional<at::Scalar>>,
                                   std::optional<c10::string_view>);

// torch's oneDNN linear, or null where this torch lacks it or it is turned off.
const c10::TypedOperatorHandle<LinearPointwise>* onednn_linear() {
  static const auto handle = []() -> std::optional<c10::TypedOperatorHandle<LinearPointwise>> {
    const char* setting = std::getenv("LSTM_EXT_ONEDNN_LINEAR");
    if (setting && std::strcmp(setting, "0") == 0) return std::nullopt;
    const auto op = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
    if (!op.has_value() || !op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
      return std::nullopt;
    }
    return op->typed<LinearPointwise>();
  }();
  return handle.has_value() ? &*handle : nullptr;
}

// Whether oneDNN takes the fp32 products. MKL (behind at::mm on x86 wheels) picks its kernels
// by CPU vendor: on AMD it ran at about half of oneDNN's speed (Zen 4 and Zen 5), on Intel it
// measured as fast or up to 20 % faster for the LSTM's shapes (Emerald Rapids), and it reads
// the backward's transposed operands in place where oneDNN takes copies. So: oneDNN except on
// Intel CPUs; LSTM_EXT_ONEDNN_LINEAR=1 or =0 forces either (=0 for bf16 too).
bool onednn_for_fp32() {
  static const bool use = [] {
    const char* setting = std::getenv("LSTM_EXT_ONEDNN_LINEAR");
    if (setting && *setting) return std::strcmp(setting, "0") != 0;
    return !cpu::intel_cpu();
  }();
  return use;
}

// Whether oneDNN takes products of this dtype: fp32 as above, bf16 where the CPU multiplies
// bf16 natively (on an AVX-512 CPU without it oneDNN emulates bf16, and at::addmm is no slower).
bool onednn_dtype(at::ScalarType dtype) {
  return (dtype == at::kFloat && onednn_for_fp32()) ||
         (dtype == at::kBFloat16 && cpu::active_isa() >= cpu::Isa::avx512_bf16);
}

// out (rows, cols), contiguous, from `in` holding it column by column (element (r, c) at
// in[c * rows + r]), rows [r_begin, r_end): squares of a cache line's values transposed in
// registers (recurrence.h's pack_square), the edges one value at a time.
template <cpu::Isa, typename T>
void transpose_kernel(const T* in, T* out, int64_t rows, int64_t cols, int64_t r_begin,
                      int64_t r_end) {
  constexpr int L = 64 / sizeof(T);
  const int64_t whole_cols = cols / L * L;
  for (int64_t r0 = r_begin; r0 < r_end; r0 += L) {
    if (r0 + L <= r_end) {
      for (int64_t c0 = 0; c0 < whole_cols; c0 += L) {
        cpu::pack_square<T, L>(in + c0 * rows, rows, r0, out + c0, cols);
      }
    }
    const int64_t c_from = r0 + L <= r_end ? whole_cols : 0;
    for (int64_t r = r0; r < std::min(r0 + L, r_end); ++r) {
      for (int64_t c = c_from; c < cols; ++c) out[r * cols + c] = in[c * rows + r];
    }
  }
}

LSTM_EXT_KERNEL_VARIANTS(transpose_variant, transpose_kernel,
                         (const T* in, T* out, int64_t rows, int64_t cols, int64_t r_begin,
                          int64_t r_end),
                         (in, out, rows, cols, r_begin, r_end))

// t as a contiguous tensor in the slot's kept memory. The backward's transposed operands (x^T,
// h^T of a contiguous x, h) are transposed by transpose_kernel on all threads: ATen's copy
// of a transposed fp32 matrix ran at about 3 GB/s on one thread (0.56 ms at H 256, B 32,
// T 50 on a Zen 4, 5 % of a training call).
at::Tensor contiguous_in(const at::Tensor& t, cpu::Workspace slot) {
  if (t.is_contiguous()) return t;
  at::Tensor out = cpu::workspace(slot, t.sizes(), t.options());
  const bool transposed = t.dim() == 2 && t.stride(0) == 1 && t.stride(1) == t.size(0);
  const auto dtype = t.scalar_type();
  if (!transposed || (dtype != at::kFloat && dtype != at::kDouble)) return out.copy_(t);
  const int64_t rows = t.size(0), cols = t.size(1);
  AT_DISPATCH_FLOATING_TYPES(dtype, "lstm_ext_transpose", [&] {
    constexpr int64_t L = 64 / sizeof(scalar_t);
    const auto kernel = transpose_variant<scalar_t>(cpu::active_isa());
    const scalar_t* in = t.const_data_ptr<scalar_t>();
    scalar_t* to = out.data_ptr<scalar_t>();
    // Blocks of L rows; a task of at least 64 K values.
    const int64_t grain =
        std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, L * cols));
    at::parallel_for(0, (rows + L - 1) / L, grain, [&](int64_t b0, int64_t b1) {
      kernel(in, to, rows, cols, b0 * L, std::min(b1 * L, rows));
    });
  });
  return out;
}

}  // namespace

bool cpu_linear_reads_transposed(at::ScalarType dtype) {
  return (dtype == at::kFloat || dtype == at::kDouble) && !onednn_dtype(dtype);
}

at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& w,
                      const std::optional<at::Tensor>& bias, LinearInto into) {
  // A few rows (a decode step) are bound by reading w once, which dot products on w in place
  // do; oneDNN would reorder w first.
  if (auto small = cpu::small_linear(x, w, bias)) return *small;
  // bf16 operands in another layout (the backward's transposed ones) stay with at::mm, whose
  // oneDNN matmul reads them in place; copying them would cost more than the product gains.
  const bool bf16_in_place = x.scalar_type() == at::kBFloat16 &&
                             !(x.is_contiguous() && w.is_contiguous());
  // bf16 with kept memory to write into takes at::mm_out, which is oneDNN's matmul for bf16
  // too and as fast, where mkldnn::_linear_pointwise's fresh result came as fresh pages (on
  // the Intel Xeon, family 6 model 167, 700-1100 page faults per autocast inference call at
  // H 512, B 32, T 50, and twice the product's time at 8192 rows).
  const bool bf16_into = x.scalar_type() == at::kBFloat16 &&
                         !std::holds_alternative<std::monostate>(into);
  const auto* onednn = onednn_dtype(x.scalar_type()) && !bf16_in_place && !bf16_into &&
                               x.numel() > 0 && w.numel() > 0
                           ? onednn_linear()
                           : nullptr;
  if (onednn != nullptr) {
    // Operands in another layout (the weight gradients' transposed ones) are copied into kept
    // memory, not fresh pages.
    return onednn->call(contiguous_in(x, cpu::Workspace::operand_x),
                        contiguous_in(w, cpu::Workspace::operand_w),
                        bias.has_value() ? std::optional<at::Tensor>(bias->contiguous())
                                         : std::nullopt,
                        "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
  }
  if (!std::holds_alternative<std::monostate>(into)) {
    const std::array<int64_t, 2> sizes{x.size(0), w.size(0)};
    at::Tensor out = std::holds_alternative<cpu::Workspace>(into)
                         ? cpu::workspace(std::get<cpu::Workspace>(into), sizes, x.options())
                         : cpu::saved_buffer(std::get<cpu::Saved>(into), sizes, x.options());
    return bias.has_value() ? at::addmm_out(out, *bias, x, w.t()) : at::mm_out(out, x, w.t());
  }
  if (bias.has_value()) return at::addmm(*bias, x, w.t());
  return at::mm(x, w.t());
}

}  // namespace lstm_ext
