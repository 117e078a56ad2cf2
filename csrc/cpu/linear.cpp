#include "linear.h"

#include "isa.h"
#include "recurrence.h"
#include "workspace.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>
#include <cstring>

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
#if LSTM_EXT_X86_VARIANTS
    __builtin_cpu_init();
    return !__builtin_cpu_is("intel");
#else
    return true;
#endif
  }();
  return use;
}

// Whether oneDNN takes products of this dtype: fp32 as above, bf16 where the CPU multiplies
// bf16 natively (on an AVX-512 CPU without it oneDNN emulates bf16, and at::addmm is no slower).
bool onednn_dtype(at::ScalarType dtype) {
  return (dtype == at::kFloat && onednn_for_fp32()) ||
         (dtype == at::kBFloat16 && cpu::active_isa() >= cpu::Isa::avx512_bf16);
}

}  // namespace

at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& w,
                      const std::optional<at::Tensor>& bias, std::optional<cpu::Workspace> into) {
  // A few rows (a decode step) are bound by reading w once, which dot products on w in place
  // do; oneDNN would reorder w first.
  if (auto small = cpu::small_linear(x, w, bias)) return *small;
  // bf16 operands in another layout (the backward's transposed ones) stay with at::mm, whose
  // oneDNN matmul reads them in place; copying them would cost more than the product gains.
  const bool bf16_in_place = x.scalar_type() == at::kBFloat16 &&
                             !(x.is_contiguous() && w.is_contiguous());
  const auto* onednn =
      onednn_dtype(x.scalar_type()) && !bf16_in_place && x.numel() > 0 && w.numel() > 0
          ? onednn_linear()
          : nullptr;
  if (onednn != nullptr) {
    // Operands in another layout (the weight gradients' transposed ones) are copied into kept
    // memory, not fresh pages.
    const auto contiguous = [](const at::Tensor& t, cpu::Workspace slot) {
      return t.is_contiguous() ? t : cpu::workspace(slot, t.sizes(), t.options()).copy_(t);
    };
    return onednn->call(contiguous(x, cpu::Workspace::operand_x),
                        contiguous(w, cpu::Workspace::operand_w),
                        bias.has_value() ? std::optional<at::Tensor>(bias->contiguous())
                                         : std::nullopt,
                        "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
  }
  if (into.has_value()) {
    at::Tensor out = cpu::workspace(*into, {x.size(0), w.size(0)}, x.options());
    return bias.has_value() ? at::addmm_out(out, *bias, x, w.t()) : at::mm_out(out, x, w.t());
  }
  if (bias.has_value()) return at::addmm(*bias, x, w.t());
  return at::mm(x, w.t());
}

}  // namespace lstm_ext
