// CPU implementation of the layer ops. The whole time loop is the fused recurrence
// (recurrence.h; with a projection, projected_recurrence.cpp): per step, each thread's gate
// products and cell updates for its own hidden units, one barrier per step (two with a
// projection). Where it declines (a projection in bf16 or fp16) or LSTM_EXT_CPU_RECURRENCE=0
// says so, the shared step loop of lstm_layer.h runs, with the per-step GEMM of step_product.h
// and the fused elementwise passes below over the active rows.
//
// The passes do the gate math of cell_math.h on contiguous runs of one row's H cells, compiled
// for AVX-512, AVX2 and baseline x86-64 (isa.h). The build passes -fno-trapping-math, without
// which GCC keeps the selects as branches and the loops stay scalar; it changes no result.
#include "../lstm_layer.h"
#include "convert.h"
#include "isa.h"
#include "linear.h"
#include "recurrence.h"
#include "step_product.h"
#include "workspace.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lstm_ext {
namespace {

template <cpu::Isa, typename acc_t>
void forward_row_kernel(int64_t H, acc_t* gates, acc_t* cell, acc_t* hidden) {
  cpu::forward_cells<acc_t>(H, H, gates, cell, hidden);
}

template <cpu::Isa, typename acc_t>
void backward_row_kernel(int64_t H, const acc_t* gates, const acc_t* cell_prev,
                         const acc_t* grad_h, acc_t* grad_cell, acc_t* grad_gates) {
  cpu::backward_cells<acc_t>(H, H, gates, cell_prev, grad_h, grad_cell, grad_gates);
}

// bf16 <-> fp32 on the raw bits, so the loops vectorize (convert.h).
template <cpu::Isa, typename>
void bf16_to_f32_kernel(const uint16_t* from, float* to, int64_t count) {
  for (int64_t j = 0; j < count; ++j) to[j] = cpu::bf16_value(from[j]);
}

template <cpu::Isa, typename>
void f32_to_bf16_kernel(const float* from, uint16_t* to, int64_t count) {
  for (int64_t j = 0; j < count; ++j) to[j] = cpu::bf16_bits(from[j]);
}

LSTM_EXT_KERNEL_VARIANTS(forward_row_variant, forward_row_kernel,
                         (int64_t H, T* gates, T* cell, T* hidden), (H, gates, cell, hidden))
LSTM_EXT_KERNEL_VARIANTS(backward_row_variant, backward_row_kernel,
                         (int64_t H, const T* gates, const T* cell_prev, const T* grad_h,
                          T* grad_cell, T* grad_gates),
                         (H, gates, cell_prev, grad_h, grad_cell, grad_gates))
LSTM_EXT_KERNEL_VARIANTS(bf16_to_f32_variant, bf16_to_f32_kernel,
                         (const uint16_t* from, float* to, int64_t count), (from, to, count))
LSTM_EXT_KERNEL_VARIANTS(f32_to_bf16_variant, f32_to_bf16_kernel,
                         (const float* from, uint16_t* to, int64_t count), (from, to, count))

template <typename acc_t>
void forward_row(int64_t H, acc_t* gates, acc_t* cell, acc_t* hidden) {
  forward_row_variant<acc_t>(cpu::active_isa())(H, gates, cell, hidden);
}

template <typename acc_t>
void backward_row(int64_t H, const acc_t* gates, const acc_t* cell_prev, const acc_t* grad_h,
                  acc_t* grad_cell, acc_t* grad_gates) {
  backward_row_variant<acc_t>(cpu::active_isa())(H, gates, cell_prev, grad_h, grad_cell,
                                                 grad_gates);
}

template <typename to_t, typename from_t>
inline void convert(const from_t* from, to_t* to, int64_t count) {
  for (int64_t j = 0; j < count; ++j) to[j] = static_cast<to_t>(from[j]);
}

template <>
inline void convert(const c10::BFloat16* from, float* to, int64_t count) {
  bf16_to_f32_variant<float>(cpu::active_isa())(reinterpret_cast<const uint16_t*>(from), to,
                                                 count);
}

template <>
inline void convert(const float* from, c10::BFloat16* to, int64_t count) {
  f32_to_bf16_variant<float>(cpu::active_isa())(from, reinterpret_cast<uint16_t*>(to), count);
}

// Per-thread scratch in the math type, grown once and reused across steps and calls.
template <typename acc_t>
acc_t* scratch(int64_t count) {
  thread_local std::vector<acc_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

// Rows per task so that a task has enough cells to be worth a thread.
int64_t row_grain(int64_t hidden) {
  constexpr int64_t kCellsPerTask = 16384;
  return std::max<int64_t>(1, kCellsPerTask / std::max<int64_t>(1, hidden));
}

struct CpuKernels {
  // A product whose result outlives the call (a training forward's input projection, which
  // becomes the gates saved for the backward; the backward's dx and dW): a saved buffer (see
  // workspace.h), not fresh pages (3.3 MB of gates and 1 MB of each dW at H 256, B 32, T 25).
  static at::Tensor kept_linear(const at::Tensor& x, const at::Tensor& w,
                                const std::optional<at::Tensor>& bias, cpu::Saved kind) {
    return cpu_linear(x, w, bias, kind);
  }

  // An inference forward's input projection is dropped when the call returns: kept memory
  // (see workspace.h; it is 32 MB at H 256, B 64, T 128).
  static at::Tensor inference_linear(const at::Tensor& x, const at::Tensor& w,
                                     const std::optional<at::Tensor>& bias) {
    return cpu_linear(x, w, bias, cpu::Workspace::inference_gates);
  }

  // The recurrence's transposed copy of the gate gradients (streamed out step by step) only
  // where dW's product would copy them so itself: at::mm's MKL reads them in place, and on the
  // Intel Xeon (family 6 model 167) skipping the copy made fp32 and fp64 training calls 1-4 %
  // faster at H 256-1024 (the backward recurrence 7-19 %); bf16's oneDNN lost 14 % without it.
  static bool wants_transposed_gate_gradients(at::ScalarType dtype) {
    return !cpu_linear_reads_transposed(dtype);
  }

  // The backward's gate gradients never leave the call: kept memory (see workspace.h).
  static at::Tensor gate_gradients(bool transposed, at::IntArrayRef sizes,
                                   const at::TensorOptions& options) {
    return cpu::workspace(transposed ? cpu::Workspace::grad_gates_t : cpu::Workspace::grad_gates,
                          sizes, options);
  }

  // The forward's saved c and h entering each step, which autograd holds until the backward,
  // and its output, which the caller drops by its next step: kept memory too, handed out again
  // once freed (see workspace.h).
  static at::Tensor saved_sequence(cpu::Saved kind, at::IntArrayRef sizes,
                                   const at::TensorOptions& options) {
    return cpu::saved_buffer(kind, sizes, options);
  }

  static bool sequence_handles_biases() { return cpu::recurrence_enabled(); }

  static bool reads_broadcast_gradients() { return true; }

  template <typename scalar_t>
  static bool forward_sequence(const SequenceForward<scalar_t>& a) {
    if (!cpu::recurrence_enabled()) return false;
    return cpu::run_forward(a);  // recorded for the profiler where it takes the call
  }

  template <typename scalar_t>
  static bool backward_sequence(const SequenceBackward<scalar_t>& a) {
    if (!cpu::recurrence_enabled()) return false;
    RECORD_FUNCTION("lstm_ext::recurrence", std::vector<c10::IValue>());
    return cpu::run_backward(a);
  }

  static std::unique_ptr<StepProduct> step_product(const at::Tensor& weight, int64_t steps,
                                                   int64_t batch) {
    return cpu_step_product(weight, steps, batch);
  }

  template <typename scalar_t>
  static void forward_step(const ForwardStep<scalar_t>& a) {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool same = std::is_same_v<acc_t, scalar_t>;
    const int64_t H = a.hidden;
    at::parallel_for(0, a.rows, row_grain(H), [&](int64_t begin, int64_t end) {
      // Storage other than the math type is staged through scratch rows.
      acc_t* staged = same ? nullptr : scratch<acc_t>(5 * H);
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* gates = a.gates + r * kNumGates * H;
        acc_t* cell = a.cell + r * H;
        if (a.cell_prev_saved) std::memcpy(a.cell_prev_saved + r * H, cell, H * sizeof(acc_t));
        scalar_t* hidden = a.hidden_out + r * H;
        if constexpr (same) {
          forward_row(H, gates, cell, hidden);
        } else {
          convert(gates, staged, kNumGates * H);
          forward_row(H, staged, cell, staged + kNumGates * H);
          if (a.save_gates) convert(staged, gates, kNumGates * H);
          convert(staged + kNumGates * H, hidden, H);
        }
        if (a.hidden_state) {
          if (a.hidden_prev_saved) {
            std::memcpy(a.hidden_prev_saved + r * H, a.hidden_state + r * H,
                        H * sizeof(scalar_t));
          }
          std::memcpy(a.hidden_state + r * H, hidden, H * sizeof(scalar_t));
        }
      }
    });
  }

  template <typename scalar_t>
  static void backward_step(const BackwardStep<scalar_t>& a) {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool same = std::is_same_v<acc_t, scalar_t>;
    const int64_t H = a.hidden;
    at::parallel_for(0, a.rows, row_grain(H), [&](int64_t begin, int64_t end) {
      acc_t* grad_h = scratch<acc_t>(10 * H);
      acc_t* grad_h_extra = grad_h + H;
      acc_t* gates = grad_h + 2 * H;
      acc_t* grad_gates = grad_h + 6 * H;
      for (int64_t r = begin; r < end; ++r) {
        // dh = grad_h + grad_h_extra, either of which may be absent, in the math type.
        if (a.grad_h) {
          convert(a.grad_h + r * H, grad_h, H);
        } else {
          std::fill_n(grad_h, H, acc_t(0));
        }
        if (a.grad_h_extra) {
          convert(a.grad_h_extra + r * H, grad_h_extra, H);
          for (int64_t j = 0; j < H; ++j) grad_h[j] += grad_h_extra[j];
        }
        const scalar_t* row_gates = a.gates + r * kNumGates * H;
        scalar_t* row_grad_gates = a.grad_gates + r * kNumGates * H;
        acc_t* grad_cell = a.grad_cell + r * H;
        const acc_t* cell_prev = a.cell_prev + r * H;
        if constexpr (same) {
          backward_row(H, row_gates, cell_prev, grad_h, grad_cell, row_grad_gates);
        } else {
          convert(row_gates, gates, kNumGates * H);
          backward_row(H, gates, cell_prev, grad_h, grad_cell, grad_gates);
          convert(grad_gates, row_grad_gates, kNumGates * H);
        }
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(lstm_ext, CPU, m) {
  m.impl("lstm_layer_forward", &layer_forward<CpuKernels>);
  m.impl("lstm_layer_backward", &layer_backward<CpuKernels>);
}

}  // namespace lstm_ext
