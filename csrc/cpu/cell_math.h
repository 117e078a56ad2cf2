// The CPU's gate math: fast branch-free tanh and sigmoid policies (fp32 and fp64) for
// lstm_common.h's cell formulas, and the loops over the cells of one row that the elementwise
// passes and the fused recurrence (recurrence.h) both run. Everything is inlined into its caller,
// which is compiled once per instruction set, so the loops vectorize for each.
#pragma once

#include "../lstm_common.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace lstm_ext {
namespace cpu {

// tanh and sigmoid for fp32 without calls or branches, so loops over them vectorize. tanh is a
// rational minimax approximation, x P(x^2) / Q(x^2) on [-8, 8] (fitted for this project; beyond
// 8, where tanh is within 2.3e-7 of +-1, the argument is clamped), and sigmoid is
// (1 + tanh(x/2)) / 2: about 20 vector operations per value including one division, against 40
// for exp and Newton reciprocals. tanh is within 3.3e-7 of its value with FMA (4.5e-7 without:
// the baseline build), sigmoid within 2.5e-7 absolute, and |tanh| never exceeds 1, so sigmoid
// stays within [0, 1] (csrc/tests/cell_math_test.cpp checks each build over the floats).
struct FastFloatMath {
  static LSTM_HOST_DEVICE float tanh(float x) {
    x = std::min(std::max(x, -8.0f), 8.0f);
    const float z = x * x;
    const float p = ((((2.5333794191097948e-11f * z - 1.5470153407212586e-08f) * z +
                       1.0148936273082023e-05f) * z + 3.016539360569811e-03f) * z +
                     1.3008111605669334e-01f) * z + 9.99999952315118e-01f;
    const float q = ((2.4138202075433434e-04f * z + 2.41546088735804e-02f) * z +
                     4.634144964402002e-01f) * z + 1.0f;
    return (x * p) / q;
  }
  static LSTM_HOST_DEVICE float sigmoid(float x) { return 0.5f * tanh(0.5f * x) + 0.5f; }
  template <typename T>
  static LSTM_HOST_DEVICE T constant(double value) {
    return static_cast<T>(value);
  }
};

// sigmoid and tanh for fp64 without calls or branches (relative error about 3e-16), so that
// fp64 loops vectorize too. Both come from Cephes' rational approximation of exp, kept as a
// fraction: e^x = (q + p) / (q - p) * s, with p odd and q even in the reduced argument and s a
// power of two. Each function ends in one division and chooses nothing per value: a vector
// division costs as much as a dozen other operations, and GCC turns a choice between two
// quotients into two masked divisions.
struct FastDoubleMath {
  struct ExpFraction {
    double p, q, s;
  };
  static LSTM_HOST_DEVICE ExpFraction exp_fraction(double x) {
    x = std::min(std::max(x, -708.0), 709.0);
    constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52: round to nearest
    const double shifted = x * 1.4426950408889634073599 + kRound;
    const double n = shifted - kRound;
    double r = x - n * 6.93145751953125e-1;
    r = r - n * 1.42860682030941723212e-6;
    const double rr = r * r;
    const double p = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr +
                          9.99999999999999999910e-1);
    const double q = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr +
                      2.27265548208155028766e-1) * rr + 2.00000000000000000009e0;
    // shifted's low bits hold n as an integer (shifted = 1.5 * 2^52 + n), so 2^n takes 64-bit
    // integer operations only: no conversion, and no 32-bit lanes, which would keep GCC from
    // filling 512-bit vectors.
    const int64_t bits =
        (std::bit_cast<int64_t>(shifted) - std::bit_cast<int64_t>(kRound) + 1023) << 52;
    return {p, q, std::bit_cast<double>(bits)};
  }
  // 1 / (1 + e^-x); where e^-x overflows the result is an exact 0.
  static LSTM_HOST_DEVICE double sigmoid(double x) {
    const ExpFraction e = exp_fraction(-x);
    return (e.q - e.p) / ((e.q - e.p) + (e.q + e.p) * e.s);
  }
  // (e^2x - 1) / (e^2x + 1) with e^2x as above. Near 0 (|x| < ln 2 / 4, where s = 1) that is
  // exactly 2p / 2q, so small values keep their relative accuracy; beyond |x| = 20 tanh
  // rounds to +-1.
  static LSTM_HOST_DEVICE double tanh(double x) {
    const ExpFraction e = exp_fraction(2.0 * std::min(std::max(x, -20.0), 20.0));
    return (e.q * (e.s - 1.0) + e.p * (e.s + 1.0)) / (e.q * (e.s + 1.0) + e.p * (e.s - 1.0));
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
