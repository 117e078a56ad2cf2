// CPU implementation of the layer ops: the shared step loop (lstm_layer.h) with fused
// elementwise passes over the active rows.
//
// The passes do the gate math of lstm_common.h on contiguous runs of one row's H cells. For
// fp32 math (fp32, bf16 and fp16 storage) the loop uses branch-free polynomial exp/tanh that the
// compiler vectorizes, and is compiled for AVX-512, AVX2 and baseline x86-64 with the best
// picked when the library loads (target_clones); fp64 the same way with its own approximations. The
// build passes -fno-trapping-math, without which GCC keeps the selects as branches and the loops
// stay scalar; it changes no result.
#include "../lstm_layer.h"
#include "step_product.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LSTM_EXT_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LSTM_EXT_CPU_CLONES
#endif

namespace lstm_ext {
namespace {

// exp, tanh and 1/x for fp32 without calls, branches or divisions, so loops over them vectorize
// and stay on the FMA units (a vector division costs as much as a dozen FMAs). Relative error
// about 2e-7, on the order of fp32 rounding. exp: Cody-Waite range reduction and a degree-6
// polynomial; tanh: an odd polynomial near zero, 1 - 2 / (e^{2|x|} + 1) elsewhere; 1/x: Newton
// steps from a bit-level first guess.
struct FastFloatMath {
  static LSTM_HOST_DEVICE float exp(float x) {
    // Capped at e^80 so that 1 + e^x stays inside reciprocal()'s range; sigmoid and tanh are
    // exactly 0 or +-1 in fp32 long before that.
    x = std::min(std::max(x, -87.3f), 80.0f);
    // Round to nearest by adding and subtracting 1.5 * 2^23, which needs no rounding
    // instruction (baseline x86-64 has none).
    constexpr float kRound = 12582912.0f;
    const float n = (x * 1.44269504088896341f + kRound) - kRound;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const float p =
        ((((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
            4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f) * r * r) +
        r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    return p * std::bit_cast<float>(bits);
  }
  // For 1 <= x <= e^80 (all its callers need): the first guess is within 12.5 %, and each
  // Newton step squares the error, so three reach fp32 precision.
  static LSTM_HOST_DEVICE float reciprocal(float x) {
    float r = std::bit_cast<float>(0x7EF311C3 - std::bit_cast<int32_t>(x));
    r = r * (2.0f - x * r);
    r = r * (2.0f - x * r);
    r = r * (2.0f - x * r);
    return r;
  }
  static LSTM_HOST_DEVICE float tanh(float x) {
    const float z = x * x;
    const float small =
        ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
          1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
    const float e = exp(2.0f * std::abs(x));
    const float large = std::copysign(1.0f - 2.0f * reciprocal(e + 1.0f), x);
    return std::abs(x) < 0.625f ? small : large;
  }
  template <typename T>
  static LSTM_HOST_DEVICE T constant(double value) {
    return static_cast<T>(value);
  }
};

// exp and tanh for fp64 without calls or branches (Cephes' rational approximations, relative
// error about 2e-16), so that fp64 loops vectorize too.
struct FastDoubleMath {
  static LSTM_HOST_DEVICE double exp(double x) {
    x = std::min(std::max(x, -708.0), 709.0);
    constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52: round to nearest
    const double n = (x * 1.4426950408889634073599 + kRound) - kRound;
    double r = x - n * 6.93145751953125e-1;
    r = r - n * 1.42860682030941723212e-6;
    const double rr = r * r;
    const double p = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr +
                          9.99999999999999999910e-1);
    const double q = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr +
                      2.27265548208155028766e-1) * rr + 2.00000000000000000009e0;
    const double e = 1.0 + 2.0 * (p / (q - p));
    // Through int32: double -> int64 conversion has no vector instruction before AVX-512DQ.
    const int64_t bits = static_cast<int64_t>(static_cast<int32_t>(n) + 1023) << 52;
    return e * std::bit_cast<double>(bits);
  }
  static LSTM_HOST_DEVICE double reciprocal(double x) { return 1.0 / x; }
  static LSTM_HOST_DEVICE double tanh(double x) {
    const double z = x * x;
    const double p = (-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z -
                     1.61468768441708447952e3;
    const double q = ((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z +
                     4.84406305325125486048e3;
    const double small = x + x * z * (p / q);
    const double e = exp(2.0 * std::abs(x));
    const double large = std::copysign(1.0 - 2.0 / (e + 1.0), x);
    return std::abs(x) < 0.625 ? small : large;
  }
  template <typename T>
  static LSTM_HOST_DEVICE T constant(double value) {
    return static_cast<T>(value);
  }
};

template <typename acc_t>
using CpuMath = std::conditional_t<std::is_same_v<acc_t, float>, FastFloatMath, FastDoubleMath>;

// One row: gates (4H, pre-activations in, activations out), cell (c in, c' out), h' out.
template <typename acc_t>
LSTM_HOST_DEVICE void forward_cells(int64_t H, acc_t* __restrict__ gates, acc_t* __restrict__ cell,
                          acc_t* __restrict__ hidden) {
  for (int64_t j = 0; j < H; ++j) {
    const CellForward<CpuMath<acc_t>, acc_t> cf(gates[j], gates[H + j], gates[2 * H + j],
                                                gates[3 * H + j], cell[j]);
    gates[j] = cf.in;
    gates[H + j] = cf.forget;
    gates[2 * H + j] = cf.cell;
    gates[3 * H + j] = cf.out;
    cell[j] = cf.c;
    hidden[j] = cf.h;
  }
}

// One row: gate gradients (4H) and dc (in: dc', out: dc) from the saved activations, c and dh.
template <typename acc_t>
LSTM_HOST_DEVICE void backward_cells(int64_t H, const acc_t* __restrict__ gates,
                           const acc_t* __restrict__ cell_prev, const acc_t* __restrict__ grad_h,
                           acc_t* __restrict__ grad_cell, acc_t* __restrict__ grad_gates) {
  for (int64_t j = 0; j < H; ++j) {
    const CellBackward<CpuMath<acc_t>, acc_t> cb(gates[j], gates[H + j], gates[2 * H + j],
                                                 gates[3 * H + j], cell_prev[j], grad_h[j],
                                                 grad_cell[j]);
    grad_gates[j] = cb.d_in;
    grad_gates[H + j] = cb.d_forget;
    grad_gates[2 * H + j] = cb.d_cell;
    grad_gates[3 * H + j] = cb.d_out;
    grad_cell[j] = cb.dc_prev;
  }
}

// One instantiation per math type, each compiled per instruction set (target_clones does not
// take templates).
LSTM_EXT_CPU_CLONES void forward_row(int64_t H, float* gates, float* cell, float* hidden) {
  forward_cells<float>(H, gates, cell, hidden);
}

LSTM_EXT_CPU_CLONES void forward_row(int64_t H, double* gates, double* cell, double* hidden) {
  forward_cells<double>(H, gates, cell, hidden);
}

LSTM_EXT_CPU_CLONES void backward_row(int64_t H, const float* gates, const float* cell_prev,
                                      const float* grad_h, float* grad_cell, float* grad_gates) {
  backward_cells<float>(H, gates, cell_prev, grad_h, grad_cell, grad_gates);
}

LSTM_EXT_CPU_CLONES void backward_row(int64_t H, const double* gates, const double* cell_prev,
                                      const double* grad_h, double* grad_cell,
                                      double* grad_gates) {
  backward_cells<double>(H, gates, cell_prev, grad_h, grad_cell, grad_gates);
}

template <typename to_t, typename from_t>
inline void convert(const from_t* from, to_t* to, int64_t count) {
  for (int64_t j = 0; j < count; ++j) to[j] = static_cast<to_t>(from[j]);
}

// bf16 <-> fp32 on the raw bits, branch-free so the loops vectorize (c10::BFloat16's own
// conversion is correct but scalar). fp32 -> bf16 rounds to nearest even and keeps NaN a NaN.
LSTM_EXT_CPU_CLONES void bf16_to_f32(const uint16_t* from, float* to, int64_t count) {
  for (int64_t j = 0; j < count; ++j) {
    to[j] = std::bit_cast<float>(static_cast<uint32_t>(from[j]) << 16);
  }
}

LSTM_EXT_CPU_CLONES void f32_to_bf16(const float* from, uint16_t* to, int64_t count) {
  for (int64_t j = 0; j < count; ++j) {
    const uint32_t bits = std::bit_cast<uint32_t>(from[j]);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    to[j] = static_cast<uint16_t>(from[j] != from[j] ? 0x7FC0u : rounded);
  }
}

template <>
inline void convert(const c10::BFloat16* from, float* to, int64_t count) {
  bf16_to_f32(reinterpret_cast<const uint16_t*>(from), to, count);
}

template <>
inline void convert(const float* from, c10::BFloat16* to, int64_t count) {
  f32_to_bf16(from, reinterpret_cast<uint16_t*>(to), count);
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
