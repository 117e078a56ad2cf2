// The CPU's gate math: fast branch-free exp/tanh/reciprocal policies for lstm_common.h's cell
// formulas, and the loops over the cells of one row that the elementwise passes and the fused
// recurrence (recurrence.h) both run. Everything is inlined into its caller, which is compiled
// once per instruction set, so the loops vectorize for each.
#pragma once

#include "../lstm_common.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace lstm_ext {
namespace cpu {

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

// n cells of one row: gates (gate k of cell j at gates[k * stride + j]; pre-activations in,
// activations out), cell (c in, c' out), h' out.
template <typename acc_t>
LSTM_HOST_DEVICE void forward_cells(int64_t n, int64_t stride, acc_t* __restrict__ gates,
                                    acc_t* __restrict__ cell, acc_t* __restrict__ hidden) {
  for (int64_t j = 0; j < n; ++j) {
    const CellForward<CpuMath<acc_t>, acc_t> cf(gates[j], gates[stride + j],
                                                gates[2 * stride + j], gates[3 * stride + j],
                                                cell[j]);
    gates[j] = cf.in;
    gates[stride + j] = cf.forget;
    gates[2 * stride + j] = cf.cell;
    gates[3 * stride + j] = cf.out;
    cell[j] = cf.c;
    hidden[j] = cf.h;
  }
}

// n cells of one row: gate gradients (laid out as the gates, gate k of cell j at
// [k * stride + j]) and dc (in: dc', out: dc) from the saved activations, c and dh.
template <typename acc_t>
LSTM_HOST_DEVICE void backward_cells(int64_t n, int64_t stride, const acc_t* __restrict__ gates,
                                     const acc_t* __restrict__ cell_prev,
                                     const acc_t* __restrict__ grad_h,
                                     acc_t* __restrict__ grad_cell,
                                     acc_t* __restrict__ grad_gates) {
  for (int64_t j = 0; j < n; ++j) {
    const CellBackward<CpuMath<acc_t>, acc_t> cb(gates[j], gates[stride + j],
                                                 gates[2 * stride + j], gates[3 * stride + j],
                                                 cell_prev[j], grad_h[j], grad_cell[j]);
    grad_gates[j] = cb.d_in;
    grad_gates[stride + j] = cb.d_forget;
    grad_gates[2 * stride + j] = cb.d_cell;
    grad_gates[3 * stride + j] = cb.d_out;
    grad_cell[j] = cb.dc_prev;
  }
}

}  // namespace cpu
}  // namespace lstm_ext
