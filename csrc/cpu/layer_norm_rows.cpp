// See layer_norm_rows.h. Variances are the biased (population) ones, as torch's layer_norm.
#include "layer_norm_rows.h"

#include "cell_math.h"
#include "isa.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace lstm_ext {
namespace cpu {
namespace {

constexpr double kEps = 1e-5;

// Mean and 1/std of n values.
template <typename acc_t>
inline void moments(int64_t n, const acc_t* x, acc_t& mean, acc_t& rstd) {
  acc_t sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += x[j];
  mean = sum / acc_t(n);
  acc_t squares = 0;
  for (int64_t j = 0; j < n; ++j) squares += (x[j] - mean) * (x[j] - mean);
  rstd = acc_t(1) / std::sqrt(squares / acc_t(n) + acc_t(kEps));
}

// Layer norm's input gradient from the output's, dy (n values; gain folded in by the caller):
// rstd (dy - mean(dy) - x^ mean(dy x^)), x^ = (x - mean) rstd.
template <typename acc_t>
inline void norm_backward(int64_t n, const acc_t* x, acc_t mean, acc_t rstd, const acc_t* dy,
                          acc_t* dx) {
  acc_t sum_dy = 0, sum_dy_xhat = 0;
  for (int64_t j = 0; j < n; ++j) {
    sum_dy += dy[j];
    sum_dy_xhat += dy[j] * (x[j] - mean) * rstd;
  }
  const acc_t mean_dy = sum_dy / acc_t(n), mean_dy_xhat = sum_dy_xhat / acc_t(n);
  for (int64_t j = 0; j < n; ++j) {
    dx[j] = rstd * (dy[j] - mean_dy - (x[j] - mean) * rstd * mean_dy_xhat);
  }
}

template <Isa, typename acc_t>
void forward_rows_kernel(const LayerNormRows<acc_t>& a, int64_t begin, int64_t end) {
  using Math = CpuMath<acc_t>;
  const int64_t H = a.hidden, G = 4 * H;
  for (int64_t r = begin; r < end; ++r) {
    const acc_t* p = a.product + r * G;
    acc_t* stats = a.stats + r * 6;
    moments(G, p, stats[2], stats[3]);
    acc_t* z = a.gates + r * G;
    const acc_t* zx = a.input_part + r * G;
    for (int64_t j = 0; j < G; ++j) {
      z[j] = zx[j] + a.hh_gain[j] * (p[j] - stats[2]) * stats[3] + a.hh_bias[j];
    }
    for (int64_t j = 0; j < 2 * H; ++j) z[j] = sigmoid<Math>(z[j]);
    for (int64_t j = 2 * H; j < 3 * H; ++j) z[j] = Math::tanh(z[j]);
    for (int64_t j = 3 * H; j < G; ++j) z[j] = sigmoid<Math>(z[j]);
    acc_t* c = a.cell + r * H;
    const acc_t* c_prev = a.cell_prev + r * H;
    for (int64_t j = 0; j < H; ++j) c[j] = z[H + j] * c_prev[j] + z[j] * z[2 * H + j];
    moments(H, c, stats[4], stats[5]);
    acc_t* h = a.hidden_out + r * H;
    for (int64_t j = 0; j < H; ++j) {
      const acc_t normed = a.cell_gain[j] * (c[j] - stats[4]) * stats[5] + a.cell_bias[j];
      h[j] = z[3 * H + j] * Math::tanh(normed);
    }
  }
}

template <Isa, typename acc_t>
void backward_rows_kernel(const LayerNormRows<acc_t>& a, int64_t begin, int64_t end) {
  using Math = CpuMath<acc_t>;
  const int64_t H = a.hidden, G = 4 * H;
  for (int64_t r = begin; r < end; ++r) {
    const acc_t* z = a.gates + r * G;
    const acc_t* stats = a.stats + r * 6;
    const acc_t* c = a.cell + r * H;
    const acc_t* c_prev = a.cell_prev + r * H;
    const acc_t* dh = a.grad_hidden + r * H;
    acc_t* dc = a.grad_cell + r * H;
    acc_t* dz = a.grad_gates + r * G;
    acc_t* dn = a.grad_cell_norm + r * H;
    // dh -> the output gate's and LN(c)'s gradients; dz's cell block holds d(x^)·gain meanwhile.
    acc_t* scaled = dz + 2 * H;
    for (int64_t j = 0; j < H; ++j) {
      const acc_t normed = a.cell_gain[j] * (c[j] - stats[4]) * stats[5] + a.cell_bias[j];
      const acc_t t = Math::tanh(normed), o = z[3 * H + j];
      dz[3 * H + j] = dh[j] * t * o * (acc_t(1) - o);
      dn[j] = dh[j] * o * (acc_t(1) - t * t);
      scaled[j] = dn[j] * a.cell_gain[j];
    }
    acc_t* dc_from_h = dz;  // the input gate's block, free until written below
    norm_backward(H, c, stats[4], stats[5], scaled, dc_from_h);
    for (int64_t j = 0; j < H; ++j) {
      const acc_t i = z[j], f = z[H + j], g = z[2 * H + j];
      const acc_t total = dc[j] + dc_from_h[j];
      dz[j] = total * g * i * (acc_t(1) - i);
      dz[H + j] = total * c_prev[j] * f * (acc_t(1) - f);
      dz[2 * H + j] = total * i * (acc_t(1) - g * g);
      dc[j] = total * f;
    }
    const acc_t* p = a.product + r * G;
    acc_t* dp = a.grad_product + r * G;
    for (int64_t j = 0; j < G; ++j) dp[j] = dz[j] * a.hh_gain[j];
    norm_backward(G, p, stats[2], stats[3], dp, dp);
  }
}

LSTM_EXT_KERNEL_VARIANTS(forward_rows_variant, forward_rows_kernel,
                         (const LayerNormRows<T>& a, int64_t begin, int64_t end), (a, begin, end))
LSTM_EXT_KERNEL_VARIANTS(backward_rows_variant, backward_rows_kernel,
                         (const LayerNormRows<T>& a, int64_t begin, int64_t end), (a, begin, end))

// Rows per task so that a task has enough cells to be worth a thread.
int64_t grain(int64_t hidden) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, hidden)); }

}  // namespace

template <typename acc_t>
void layer_norm_forward_rows(const LayerNormRows<acc_t>& a) {
  const auto kernel = forward_rows_variant<acc_t>(active_isa());
  at::parallel_for(0, a.rows, grain(a.hidden),
                   [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
}

template <typename acc_t>
void layer_norm_backward_rows(const LayerNormRows<acc_t>& a) {
  const auto kernel = backward_rows_variant<acc_t>(active_isa());
  at::parallel_for(0, a.rows, grain(a.hidden),
                   [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
}

template void layer_norm_forward_rows<float>(const LayerNormRows<float>&);
template void layer_norm_forward_rows<double>(const LayerNormRows<double>&);
template void layer_norm_backward_rows<float>(const LayerNormRows<float>&);
template void layer_norm_backward_rows<double>(const LayerNormRows<double>&);

}  // namespace cpu
}  // namespace lstm_ext
