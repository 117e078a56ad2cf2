#include "linear.h"

#include "isa.h"
#include "recurrence.h"
#include "workspace.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <optional>
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

// LSTM_EXT_ONEDNN_LINEAR, or null where it is unset or empty.
const char* library_setting() {
  static const char* setting = [] {
    const char* value = std::getenv("LSTM_EXT_ONEDNN_LINEAR");
    return value && *value ? value : nullptr;
  }();
  return setting;
}

// Whether oneDNN takes the fp32 products. MKL (behind at::mm on x86 wheels) picks its kernels
// by CPU vendor: on AMD it ran at about half of oneDNN's speed (Zen 4 and Zen 5), on Intel it
// measured as fast or up to 20 % faster for the LSTM's shapes (Emerald Rapids), and it reads
// the backward's transposed operands in place where oneDNN takes copies. So: oneDNN except on
// Intel CPUs; LSTM_EXT_ONEDNN_LINEAR=1 or =0 forces either (=0 for bf16 too), and then takes
// every product there, none by panel_product below.
bool onednn_for_fp32() {
  static const bool use = library_setting() ? std::strcmp(library_setting(), "0") != 0
                                            : !cpu::intel_cpu();
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

// out (M, N) = x (M, K) w (N, K)^T, x's rows contiguous, w packed in panels of 4V of its rows
// (its columns contiguous in each: K rows of 4V values, zeros past N), each tile of rows and
// 4V columns the recurrence's tile_product. Read in place instead, w's columns a multiple of
// 4 KB apart (N = 1024 fp32) evicted each other from L1 and the product lost 10 % to oneDNN.
template <typename T>
struct PanelProduct {
  int64_t N, K;
  const T* x;
  int64_t x_stride;
  const T* panels;
  T* out;  // (M, N), contiguous
};

template <cpu::Isa isa, typename T>
void panel_product_kernel(const PanelProduct<T>& a, int64_t m_begin, int64_t m_end) {
  constexpr int V = cpu::Tiling<isa, T>::V;
  constexpr int R = cpu::Tiling<isa, T>::R;
  constexpr int64_t W = 4 * V;
  alignas(64) T tile[R * W];
  for (int64_t m = m_begin; m < m_end; m += R) {
    const int n_rows = static_cast<int>(std::min<int64_t>(R, m_end - m));
    const T* rows[R];
    for (int r = 0; r < n_rows; ++r) rows[r] = a.x + (m + r) * a.x_stride;
    for (int64_t n = 0; n < a.N; n += W) {
      cpu::tile_product_n<T, V, R>(n_rows, a.K, rows, a.panels + n * a.K, W, tile);
      T* to = a.out + m * a.N + n;
      if (n + W <= a.N) {
        for (int r = 0; r < n_rows; ++r) {
          for (int64_t c = 0; c < W; ++c) to[r * a.N + c] = tile[r * W + c];
        }
      } else {
        for (int r = 0; r < n_rows; ++r) {
          std::memcpy(to + r * a.N, tile + r * W, (a.N - n) * sizeof(T));
        }
      }
    }
  }
}

// w (N, K), its columns contiguous, packed as panel_product_kernel reads it: panel p holds
// w's rows [p 4V, (p + 1) 4V), one row of 4V values per k.
template <cpu::Isa isa, typename T>
void panel_pack(const T* w, int64_t w_stride1, int64_t N, int64_t K, T* panels) {
  constexpr int64_t W = 4 * cpu::Tiling<isa, T>::V;
  for (int64_t n = 0; n < N; n += W) {
    const int64_t cols = std::min(W, N - n);
    T* panel = panels + n * K;
    for (int64_t k = 0; k < K; ++k) {
      std::memcpy(panel + k * W, w + k * w_stride1 + n, cols * sizeof(T));
      std::fill(panel + k * W + cols, panel + (k + 1) * W, T(0));
    }
  }
}

LSTM_EXT_KERNEL_VARIANTS(panel_product_variant, panel_product_kernel,
                         (const PanelProduct<T>& a, int64_t m_begin, int64_t m_end),
                         (a, m_begin, m_end))
LSTM_EXT_KERNEL_VARIANTS(panel_pack_variant, panel_pack,
                         (const T* w, int64_t w_stride1, int64_t N, int64_t K, T* panels),
                         (w, w_stride1, N, K, panels))

// out (M, N) = x (M, K) w (N, K)^T [+ bias] on output columns [begin, end), by dot products
// over w's rows in place: four of them at a time against each tile of kDirectRows rows of x,
// so that the four stay in L1 while all of x passes them.
template <typename T>
struct SmallLinear {
  int64_t M, N, K;
  const T* x;
  int64_t x_stride;
  const T* w;
  int64_t w_stride;
  const T* bias;
  T* out;  // (M, N), contiguous
};

template <cpu::Isa isa, typename T>
void small_linear_columns(const SmallLinear<T>& a, int64_t begin, int64_t end) {
  constexpr int V = cpu::Tiling<isa, T>::V;
  constexpr int R = cpu::kDirectRows;
  for (int64_t n = begin; n < end; n += 4) {
    for (int64_t i0 = 0; i0 < a.M; i0 += R) {
      const int m = static_cast<int>(std::min<int64_t>(R, a.M - i0));
      const T* rows[R] = {};
      for (int i = 0; i < m; ++i) rows[i] = a.x + (i0 + i) * a.x_stride;
      T dots[4 * R];
      if (n + 4 <= a.N) {
        cpu::dot_rows_n<T, V, R>(m, a.K, a.w + n * a.w_stride, a.w_stride, rows, dots);
      } else {
        for (int64_t g = 0; g < 4; ++g) {
          for (int i = 0; i < m; ++i) {
            T sum = 0;
            for (int64_t k = 0; n + g < a.N && k < a.K; ++k) {
              sum += a.w[(n + g) * a.w_stride + k] * rows[i][k];
            }
            dots[g * m + i] = sum;
          }
        }
      }
      for (int64_t g = 0; g < 4 && n + g < a.N; ++g) {
        for (int i = 0; i < m; ++i) {
          a.out[(i0 + i) * a.N + n + g] = dots[g * m + i] + (a.bias ? a.bias[n + g] : T(0));
        }
      }
    }
  }
}

LSTM_EXT_KERNEL_VARIANTS(small_linear_variant, small_linear_columns,
                         (const SmallLinear<T>& a, int64_t begin, int64_t end), (a, begin, end))

// Whether small_linear takes x @ w^T: fp32 or fp64, x's and w's rows contiguous, and few rows
// of x. Every CPU takes up to kDirectRows (a decode step, read by w once, as its floor is;
// oneDNN would reorder w first). Off Intel, short sequences of one row take it too: oneDNN
// spent about 40 us on a call before its first row (Zen 4, K 256, N 1024: 60 us at 8 rows,
// 97 at 25, then 2.3 us a row), and this ran layer calls of H 256-1024, B 1, T 25 5-7 % faster
// (T 49: 3 %; T 64 lost 5 %). MKL on Intel was not measured against it.
bool small_linear_takes(const at::Tensor& x, const at::Tensor& w,
                        const std::optional<at::Tensor>& bias) {
  constexpr int64_t kSmallLinearRowsOffIntel = 48;
  const bool math_type = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  const int64_t max_rows = cpu::intel_cpu() || library_setting() ? cpu::kDirectRows
                                                                 : kSmallLinearRowsOffIntel;
  return math_type && x.dim() == 2 && x.size(0) > 0 && x.size(0) <= max_rows &&
         w.stride(1) == 1 && x.stride(1) == 1 && (!bias.has_value() || bias->is_contiguous());
}

// x @ w^T [+ bias] into out (M, N), contiguous, where small_linear_takes.
void small_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                  at::Tensor& out) {
  RECORD_FUNCTION("lstm_ext::small_linear", std::vector<c10::IValue>());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "small_linear", [&] {
    const SmallLinear<scalar_t> a{x.size(0), w.size(0), x.size(1),
                                  x.const_data_ptr<scalar_t>(), x.stride(0),
                                  w.const_data_ptr<scalar_t>(), w.stride(0),
                                  bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr,
                                  out.data_ptr<scalar_t>()};
    const auto kernel = small_linear_variant<scalar_t>(cpu::active_isa());
    // Tasks of whole groups of four columns, each worth a few thousand multiply-adds.
    const int64_t groups = cpu::ceil_div(a.N, 4);
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, a.K * a.M));
    at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
      kernel(a, 4 * begin, std::min(a.N, 4 * end));
    });
  });
}

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

// An uninitialized (rows, cols) result in the memory `into` names: a workspace slot, a saved
// buffer, or (none) a fresh tensor.
at::Tensor result_in(const LinearInto& into, int64_t rows, int64_t cols,
                     const at::TensorOptions& options) {
  const std::array<int64_t, 2> sizes{rows, cols};
  if (std::holds_alternative<cpu::Workspace>(into)) {
    return cpu::workspace(std::get<cpu::Workspace>(into), sizes, options);
  }
  if (std::holds_alternative<cpu::Saved>(into)) {
    return cpu::saved_buffer(std::get<cpu::Saved>(into), sizes, options);
  }
  return at::empty(sizes, options);
}

// x (M, K) @ w (N, K)^T by panel_product_kernel, into `into`'s memory, for fp32 or fp64 where w is
// the transpose of a row-major (K, N) matrix (the backward's products: dW = the gate gradients^T
// times x or h, dx = the gate gradients times W_ih) and w's panels fit in kPanelProductBytes; not
// on Intel (at::mm's MKL there, unmeasured against this), nor where LSTM_EXT_ONEDNN_LINEAR picks a
// library; nullopt for anything else. On the Zen 4 (family 25 model 17), oneDNN, which first copies
// w's transpose, ran the LSTMCell weight gradients (K = batch 8-32, N 128-1024) at 28-165 GFLOP/s
// and this at 85-200; from K 64 to 6400 with up to 6.5 MB of panels oneDNN took 1.0-2.2x this one's
// time (dx at H 256 and 512, B 32, T 50: 207 and 198 GFLOP/s against 220 and 217); 16 MB of panels
// (dx at H 1024) lost 10 % to it, 26 MB 20 %. fp64's at::mm (MKL) took 0.98-2.3x as long for K <=
// 256.
std::optional<at::Tensor> panel_product(const at::Tensor& x, const at::Tensor& w,
                                        const LinearInto& into) {
  constexpr int64_t kPanelProductBytes = 8 << 20;
  const auto dtype = x.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kDouble) || x.dim() != 2 || w.dim() != 2 ||
      x.size(0) == 0 || x.size(1) == 0 || w.size(0) == 0 ||
      (w.stride(0) != 1 && w.size(0) != 1) || cpu::intel_cpu() || library_setting()) {
    return std::nullopt;
  }
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  const cpu::Isa isa = cpu::active_isa();
  const int64_t W = 4 * (dtype == at::kFloat ? cpu::lanes<float>(isa) : cpu::lanes<double>(isa));
  const int64_t panel_values = (N + W - 1) / W * W * K;
  if (panel_values * static_cast<int64_t>(x.element_size()) > kPanelProductBytes) {
    return std::nullopt;
  }
  at::Tensor out = result_in(into, M, N, x.options());
  RECORD_FUNCTION("lstm_ext::panel_product", std::vector<c10::IValue>());
  // The gate gradients without their transposed copy (the step loop's backward) come as a
  // transposed x, whose rows the tiles want contiguous.
  const at::Tensor rows = x.stride(1) == 1 ? x : contiguous_in(x, cpu::Workspace::operand_x);
  const at::Tensor panels = cpu::workspace(cpu::Workspace::operand_w, {panel_values}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "lstm_ext_panel_product", [&] {
    panel_pack_variant<scalar_t>(isa)(w.const_data_ptr<scalar_t>(), w.stride(1), N, K,
                                      panels.data_ptr<scalar_t>());
    const PanelProduct<scalar_t> a{N, K, rows.const_data_ptr<scalar_t>(), rows.stride(0),
                                   panels.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>()};
    const auto kernel = panel_product_variant<scalar_t>(isa);
    // Tasks of at least 32 K multiply-adds.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (N * K));
    at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
  });
  return out;
}

}  // namespace

bool cpu_linear_reads_transposed(at::ScalarType dtype) {
  return (dtype == at::kFloat || dtype == at::kDouble) && !onednn_dtype(dtype);
}

at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& w,
                      const std::optional<at::Tensor>& bias, LinearInto into) {
  if (small_linear_takes(x, w, bias)) {
    at::Tensor out = result_in(into, x.size(0), w.size(0), x.options());
    small_linear(x, w, bias, out);
    return out;
  }
  if (!bias.has_value()) {
    if (auto product = panel_product(x, w, into)) return *product;
  }
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
    at::Tensor out = result_in(into, x.size(0), w.size(0), x.options());
    return bias.has_value() ? at::addmm_out(out, *bias, x, w.t()) : at::mm_out(out, x, w.t());
  }
  if (bias.has_value()) return at::addmm(*bias, x, w.t());
  return at::mm(x, w.t());
}

}  // namespace lstm_ext
