// See layer_norm_kernels.h. Variances are the biased (population) ones, as torch's layer_norm.
#include "layer_norm_kernels.h"

#include "cell_math.h"
#include "isa.h"
#include "recurrence.h"
#include "vec.h"
#include "workspace.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace lstm_ext {
namespace cpu {
namespace {

constexpr double kEps = 1e-5;
// Floats (a cache line) between the backward's per-step arrays, which are otherwise often a
// multiple of 4 KB apart: the same offset in each would share one L1 set, and a load at the
// same 4 KB offset as an earlier store waits for it (4K aliasing).
constexpr int64_t kSkew = 16;

// ---------------------------------------------------------------------------------------------
// The math of one unit, shared by both kernels.

// A gate's pre-activation: the input part plus the recurrent product's norm.
template <typename acc_t>
inline acc_t gate_input(acc_t input_part, acc_t product, acc_t mean, acc_t rstd, acc_t gain,
                        acc_t bias) {
  return input_part + gain * (product - mean) * rstd + bias;
}

// Units [begin, end) of a row of pre-activations (gate k of unit j at z[k * H + j]) to their
// activations, and c (c_prev in, c' out).
template <typename acc_t>
inline void gates_and_cell(acc_t* __restrict__ z, acc_t* __restrict__ c, int64_t H,
                           int64_t begin, int64_t end) {
  using Math = CpuMath<acc_t>;
  for (int64_t j = begin; j < end; ++j) {
    const acc_t i = sigmoid<Math>(z[j]), f = sigmoid<Math>(z[H + j]);
    const acc_t g = Math::tanh(z[2 * H + j]), o = sigmoid<Math>(z[3 * H + j]);
    z[j] = i;
    z[H + j] = f;
    z[2 * H + j] = g;
    z[3 * H + j] = o;
    c[j] = f * c[j] + i * g;
  }
}

// tanh(LN(c)) of one unit from c's normalised value x^.
template <typename acc_t>
inline acc_t tanh_cell_norm(acc_t xhat, acc_t gain, acc_t bias) {
  return CpuMath<acc_t>::tanh(gain * xhat + bias);
}

// Through h = o tanh(LN(c)): of dh, the output gate's pre-activation gradient and LN(c)'s.
template <typename acc_t>
inline void output_grads(acc_t dh, acc_t o, acc_t t, acc_t& grad_out, acc_t& grad_norm) {
  grad_out = dh * t * o * (acc_t(1) - o);
  grad_norm = dh * o * (acc_t(1) - t * t);
}

// Through c' = f c + i g: of dc' (all of it), the pre-activation gradients of i, f and g; dc
// becomes the gradient of the c before.
template <typename acc_t>
inline void cell_grads(acc_t& dc, acc_t i, acc_t f, acc_t g, acc_t c_prev, acc_t& grad_in,
                       acc_t& grad_forget, acc_t& grad_cell) {
  grad_in = dc * g * i * (acc_t(1) - i);
  grad_forget = dc * c_prev * f * (acc_t(1) - f);
  grad_cell = dc * i * (acc_t(1) - g * g);
  dc *= f;
}

// Layer norm's input gradient for one value, or a vector of them (one row's):
// rstd (dy - mean(dy) - x^ mean(dy x^)).
template <typename value_t, typename acc_t>
inline value_t norm_grad(value_t dy, value_t xhat, acc_t rstd, acc_t mean_dy,
                         acc_t mean_dy_xhat) {
  return rstd * (dy - mean_dy - xhat * mean_dy_xhat);
}

template <typename acc_t>
inline acc_t rstd_of(acc_t squares, int64_t n) {
  return acc_t(1) / std::sqrt(squares / acc_t(n) + acc_t(kEps));
}

// Sums in vectors of V lanes (the compiler may not reorder a scalar sum): of n values, of
// their squared deviations from m, and of the products of two runs.
template <typename acc_t, int V>
inline acc_t sum_of(const acc_t* x, int64_t n) {
  using vec = typename Vec<acc_t, V>::type;
  vec s{};
  int64_t j = 0;
  for (; j + V <= n; j += V) s += *reinterpret_cast<const vec*>(x + j);
  acc_t total = 0;
  for (int v = 0; v < V; ++v) total += s[v];
  for (; j < n; ++j) total += x[j];
  return total;
}

template <typename acc_t, int V>
inline acc_t squares_about(const acc_t* x, int64_t n, acc_t m) {
  using vec = typename Vec<acc_t, V>::type;
  vec s{};
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    const vec d = *reinterpret_cast<const vec*>(x + j) - m;
    s += d * d;
  }
  acc_t total = 0;
  for (int v = 0; v < V; ++v) total += s[v];
  for (; j < n; ++j) total += (x[j] - m) * (x[j] - m);
  return total;
}

template <typename acc_t, int V>
inline acc_t dot_of(const acc_t* x, const acc_t* y, int64_t n) {
  using vec = typename Vec<acc_t, V>::type;
  vec s{};
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    s += *reinterpret_cast<const vec*>(x + j) * *reinterpret_cast<const vec*>(y + j);
  }
  acc_t total = 0;
  for (int v = 0; v < V; ++v) total += s[v];
  for (; j < n; ++j) total += x[j] * y[j];
  return total;
}

// Mean and 1/std of n values (two passes).
template <typename acc_t, int V>
inline void moments(int64_t n, const acc_t* x, acc_t& mean, acc_t& rstd) {
  mean = sum_of<acc_t, V>(x, n) / acc_t(n);
  rstd = rstd_of(squares_about<acc_t, V>(x, n, mean), n);
}

// Layer norm's input gradient for n values from the output's, dy (gain folded in by the
// caller); dx may be dy.
template <typename acc_t, int V>
inline void norm_backward(int64_t n, const acc_t* x, acc_t mean, acc_t rstd, const acc_t* dy,
                          acc_t* dx) {
  acc_t sum_dy = 0, sum_dy_xhat = 0;
  for (int64_t j = 0; j < n; ++j) {
    sum_dy += dy[j];
    sum_dy_xhat += dy[j] * (x[j] - mean) * rstd;
  }
  const acc_t mean_dy = sum_dy / acc_t(n), mean_dy_xhat = sum_dy_xhat / acc_t(n);
  for (int64_t j = 0; j < n; ++j) {
    dx[j] = norm_grad(dy[j], (x[j] - mean) * rstd, rstd, mean_dy, mean_dy_xhat);
  }
}

// Loops over n units of one row, each pointer at the row's first unit and none overlapping
// another (so that they vectorize).

// The fused recurrence's pre-activations from both products and their norms (`bias` all the
// biases of the input side), their activations and c, in one pass over units [0, n) (each
// pointer at the row's first unit of gate 0, gate k's H further on): the activations into z,
// c (c_prev in, c' out).
template <typename acc_t>
inline void cell_of_products(int64_t n, int64_t H, const acc_t* __restrict__ input_product,
                             acc_t x_mean, acc_t x_rstd, const acc_t* __restrict__ ih_gain,
                             const acc_t* __restrict__ bias, const acc_t* __restrict__ product,
                             acc_t mean, acc_t rstd, const acc_t* __restrict__ hh_gain,
                             const acc_t* __restrict__ hh_bias, acc_t* __restrict__ z,
                             acc_t* __restrict__ c) {
  using Math = CpuMath<acc_t>;
  for (int64_t j = 0; j < n; ++j) {
    acc_t pre[4];
    for (int g = 0; g < 4; ++g) {
      const int64_t k = g * H + j;
      pre[g] = gate_input(ih_gain[k] * (input_product[k] - x_mean) * x_rstd + bias[k],
                          product[k], mean, rstd, hh_gain[k], hh_bias[k]);
    }
    const acc_t i = sigmoid<Math>(pre[0]), f = sigmoid<Math>(pre[1]);
    const acc_t g = Math::tanh(pre[2]), o = sigmoid<Math>(pre[3]);
    z[j] = i;
    z[H + j] = f;
    z[2 * H + j] = g;
    z[3 * H + j] = o;
    c[j] = f * c[j] + i * g;
  }
}

// The pre-activations: the input part plus the normalised products.
template <typename acc_t>
inline void normalised_gates(int64_t n, const acc_t* __restrict__ input_part,
                             const acc_t* __restrict__ product, acc_t mean, acc_t rstd,
                             const acc_t* __restrict__ gain, const acc_t* __restrict__ bias,
                             acc_t* __restrict__ z) {
  for (int64_t j = 0; j < n; ++j) {
    z[j] = gate_input(input_part[j], product[j], mean, rstd, gain[j], bias[j]);
  }
}

// h = o tanh(LN(c)).
template <typename acc_t>
inline void hidden_from_cell(int64_t n, const acc_t* __restrict__ out,
                             const acc_t* __restrict__ c, acc_t mean, acc_t rstd,
                             const acc_t* __restrict__ gain, const acc_t* __restrict__ bias,
                             acc_t* __restrict__ h) {
  for (int64_t j = 0; j < n; ++j) {
    h[j] = out[j] * tanh_cell_norm((c[j] - mean) * rstd, gain[j], bias[j]);
  }
}

// From dh (plus the output's gradient, if any): the output gate's gradient, LN(c)'s added to
// its gain's and bias's gradients, and LN(c)'s times the gain with c's normalised values (the
// norm backward's operands). The loops are functions of their own, their pointers restrict
// parameters: inside with_optional's lambda they are captured references, and GCC left such
// loops scalar.
template <typename acc_t, typename HasOutput>
inline void output_gate_grads_loop(HasOutput has_output, int64_t n,
                                   const acc_t* __restrict__ dh,
                                   const acc_t* __restrict__ from_output,
                                   const acc_t* __restrict__ out, const acc_t* __restrict__ c,
                                   acc_t mean, acc_t rstd, const acc_t* __restrict__ gain,
                                   const acc_t* __restrict__ bias, acc_t* __restrict__ grad_out,
                                   acc_t* __restrict__ grad_gain, acc_t* __restrict__ grad_bias,
                                   acc_t* __restrict__ scaled, acc_t* __restrict__ xhat) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t d = dh[j] + (has_output ? from_output[j] : acc_t(0));
    xhat[j] = (c[j] - mean) * rstd;
    acc_t grad_norm;
    output_grads(d, out[j], tanh_cell_norm(xhat[j], gain[j], bias[j]), grad_out[j], grad_norm);
    grad_gain[j] += grad_norm * xhat[j];
    grad_bias[j] += grad_norm;
    scaled[j] = grad_norm * gain[j];
  }
}

template <typename acc_t>
inline void output_gate_grads(int64_t n, const acc_t* dh, const acc_t* from_output,
                              const acc_t* out, const acc_t* c, acc_t mean, acc_t rstd,
                              const acc_t* gain, const acc_t* bias, acc_t* grad_out,
                              acc_t* grad_gain, acc_t* grad_bias, acc_t* scaled, acc_t* xhat) {
  with_optional(from_output, [&](auto has_output) {
    output_gate_grads_loop(has_output, n, dh, from_output, out, c, mean, rstd, gain, bias,
                           grad_out, grad_gain, grad_bias, scaled, xhat);
  });
}

// c~'s whole gradient (of dc carried in, the part through c~, plus LN(c~)'s backward), the
// gradients of i, f and g, and dc carried back (in dc). With zoneout of c (`keep` its d, else
// null), c = d c_prev + (1 - d) c~ sends (1 - d) of the carried dc through c~ and d straight
// back.
template <typename acc_t, typename Zoneout>
inline void cell_gate_grads_loop(Zoneout zoneout, int64_t n, const acc_t* __restrict__ scaled,
                                 const acc_t* __restrict__ xhat, acc_t rstd, acc_t mean_dy,
                                 acc_t mean_dy_xhat, const acc_t* __restrict__ in,
                                 const acc_t* __restrict__ forget,
                                 const acc_t* __restrict__ cell,
                                 const acc_t* __restrict__ c_prev,
                                 const acc_t* __restrict__ keep, acc_t* __restrict__ dc,
                                 acc_t* __restrict__ grad_in, acc_t* __restrict__ grad_forget,
                                 acc_t* __restrict__ grad_cell) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t d = zoneout ? keep[j] : acc_t(0);
    acc_t total = (acc_t(1) - d) * dc[j] +
                  norm_grad(scaled[j], xhat[j], rstd, mean_dy, mean_dy_xhat);
    cell_grads(total, in[j], forget[j], cell[j], c_prev[j], grad_in[j], grad_forget[j],
               grad_cell[j]);
    dc[j] = total + d * dc[j];
  }
}

template <typename acc_t>
inline void cell_gate_grads(int64_t n, const acc_t* scaled, const acc_t* xhat, acc_t rstd,
                            acc_t mean_dy, acc_t mean_dy_xhat, const acc_t* in,
                            const acc_t* forget, const acc_t* cell, const acc_t* c_prev,
                            const acc_t* keep, acc_t* dc, acc_t* grad_in, acc_t* grad_forget,
                            acc_t* grad_cell) {
  with_optional(keep, [&](auto zoneout) {
    cell_gate_grads_loop(zoneout, n, scaled, xhat, rstd, mean_dy, mean_dy_xhat, in, forget, cell,
                         c_prev, keep, dc, grad_in, grad_forget, grad_cell);
  });
}

// Both product norms' row sums from the pre-activations' gradient dz, in one pass (dz feeds
// both norms alike): with dy = dz times the norm's gain and hat its input normalised, the sums of
// dy and of dy * hat added to sums[0..1] (the recurrent norm) and sums[2..3] (the input norm),
// and dz * hat to each gain's gradient. The recurrent norm's bias gradient is added to as well;
// the input norm's is the same sum. Nothing row-sized is written: finish_transposed makes dy
// and hat again from the same rows, still in cache.
template <typename acc_t>
struct ProductNorm {
  const acc_t* values;  // the products before the norm
  acc_t mean, rstd;
  const acc_t* gain;
  acc_t* grad_gain;
};

// One step of product_norm_sums over W units at j (W = V, then 1 for the tail), adding to the
// sums' W-lane accumulators.
template <typename acc_t, int W>
inline void product_norms_step(int64_t j, const acc_t* __restrict__ dz,
                               const ProductNorm<acc_t>& hh, acc_t* __restrict__ grad_hh_bias,
                               const ProductNorm<acc_t>& ih,
                               typename Vec<acc_t, W>::type (&sums)[4]) {
  using vec = typename Vec<acc_t, W>::type;
  const auto at = [j](acc_t* p) -> vec& { return *reinterpret_cast<vec*>(p + j); };
  const auto in = [j](const acc_t* p) -> const vec& {
    return *reinterpret_cast<const vec*>(p + j);
  };
  const vec d = in(dz);
  const vec ph = (in(hh.values) - hh.mean) * hh.rstd;
  at(hh.grad_gain) += d * ph;
  at(grad_hh_bias) += d;
  const vec y = d * in(hh.gain);
  sums[0] += y;
  sums[1] += y * ph;
  const vec xh = (in(ih.values) - ih.mean) * ih.rstd;
  at(ih.grad_gain) += d * xh;
  const vec yx = d * in(ih.gain);
  sums[2] += yx;
  sums[3] += yx * xh;
}

template <typename acc_t, int V>
inline void product_norm_sums(int64_t n, const acc_t* __restrict__ dz,
                              const ProductNorm<acc_t>& hh, acc_t* __restrict__ grad_hh_bias,
                              const ProductNorm<acc_t>& ih, acc_t sums[4]) {
  typename Vec<acc_t, V>::type wide[4] = {};
  typename Vec<acc_t, 1>::type narrow[4] = {};
  int64_t j = 0;
  for (; j + V <= n; j += V) product_norms_step<acc_t, V>(j, dz, hh, grad_hh_bias, ih, wide);
  for (; j < n; ++j) product_norms_step<acc_t, 1>(j, dz, hh, grad_hh_bias, ih, narrow);
  for (int k = 0; k < 4; ++k) {
    for (int v = 0; v < V; ++v) sums[k] += wide[k][v];
    sums[k] += narrow[k][0];
  }
}

// ---------------------------------------------------------------------------------------------
// The fused recurrence.

// The units [begin, end) of a thread of `threads` over blocks of `block` units.
struct Units {
  int64_t begin, end;
  int64_t count() const { return end - begin; }
};
inline Units units_of(int64_t H, int64_t block, int thread, int threads) {
  const Share s = share_of(ceil_div(H, block), thread, threads);
  return {std::min(H, s.begin * block), std::min(H, s.end * block)};
}

// A barrier among the threads that share a step's rows (none where a thread has them alone).
inline void step_barrier(int threads) {
  if (threads > 1) {
#pragma omp barrier
  }
}

// How the threads share a step. Splitting the units (each thread all rows of its units) keeps a
// thread's slice of W_hh in its own cache, but every norm spans a whole row, which costs three
// barriers a step forward and four backward and moves h and the row statistics between cores.
// Splitting the rows (each thread all units of its rows) shares nothing within the time loop,
// but each thread reads all of W_hh every step. On an AMD EPYC Zen 4 with 2 threads the row
// split was 6-20 % faster at 4 or more rows a thread up to H 512 (W_hh of 4 MB in fp32), and
// with W_hh within 256 KB at 2 rows too; at 2 rows a thread and H 256-512 the tile product,
// with too few rows for each weight it loads, was 10-20 % slower, and at H 1024 neither won.
struct RowSplit {
  bool on;
  int64_t rows;  // the most rows a thread has (each thread's workspace slice)
};
template <typename acc_t>
RowSplit row_split(int64_t B, int64_t H, int threads) {
  constexpr int64_t kMinRows = 4;               // a thread's rows, at the least
  constexpr int64_t kMaxWeights = 4 << 20;      // bytes of W_hh, at the most
  constexpr int64_t kSmallWeights = 256 << 10;  // bytes of W_hh within which 2 rows will do
  const int64_t rows = ceil_div(B, std::max(threads, 1));
  const int64_t weights = 4 * H * H * static_cast<int64_t>(sizeof(acc_t));
  const bool on = threads > 1 && rows >= 2 && weights <= kMaxWeights &&
                  (rows >= kMinRows || weights <= kSmallWeights);
  return {on, on ? rows : B};
}

// The sequence as one thread of a row split sees it: rows [begin, end) of each step's, with
// its own state rows and workspace slice (work_size values per thread).
template <typename acc_t>
struct RowSlice {
  LayerNormSequence<acc_t> a;
  std::vector<int64_t> size, offset;
  RowSlice(const LayerNormSequence<acc_t>& whole, int thread, int threads, int64_t work_size)
      : a(whole), size(whole.steps), offset(whole.steps) {
    const Share s = share_of(whole.batch, thread, threads);
    const int64_t H = whole.hidden;
    for (int64_t t = 0; t < whole.steps; ++t) {
      size[t] = std::clamp<int64_t>(whole.step_size[t] - s.begin, 0, s.count());
      offset[t] = whole.step_offset[t] + s.begin;
    }
    a.batch = s.count();
    a.step_size = size.data();
    a.step_offset = offset.data();
    const auto shift = [&](auto* p) { return p ? p + s.begin * H : p; };
    a.recurrent_mask = shift(whole.recurrent_mask);
    a.hidden_state = shift(whole.hidden_state);
    a.cell_state = shift(whole.cell_state);
    a.grad_hidden = shift(whole.grad_hidden);
    a.grad_cell = shift(whole.grad_cell);
    a.work = whole.work + thread * work_size;
  }
};

// Values of forward workspace for B rows (the h that W_hh multiplies under a mask; in
// inference a step's products and gates and the c entering it).
inline int64_t forward_work_size(int64_t B, int64_t H, bool masked, bool training) {
  return (masked ? B * H : 0) + (training ? 0 : 2 * B * 4 * H + B * H);
}
inline int64_t backward_work_size(int64_t B, int64_t H) {
  return 2 * B * 4 * H + 3 * B * H + 4 * kSkew;
}

// Values of a workspace that a team of up to `threads` needs (OpenMP may start fewer than
// asked, which may change the split), given per_rows(n, team): what n rows need, of a slice
// shared by a team of that many threads.
template <typename acc_t, typename PerRows>
int64_t team_workspace(int64_t B, int64_t H, int threads, PerRows per_rows) {
  int64_t size = per_rows(B, threads);
  for (int team = 2; team <= threads; ++team) {
    const RowSplit split = row_split<acc_t>(B, H, team);
    if (split.on) size = std::max(size, team * per_rows(split.rows, 1));
  }
  return size;
}

template <Isa isa, typename acc_t>
void forward_steps(const LayerNormSequence<acc_t>& a, int thread, int threads);

template <Isa isa, typename acc_t>
void sequence_forward_thread(const LayerNormSequence<acc_t>& a, int thread, int threads) {
  constexpr int V = Tiling<isa, acc_t>::V;
  const int64_t H = a.hidden;
  const Share mine = share_of(ceil_div(H, V), thread, threads);
  for (int64_t jb = mine.begin; jb < mine.end; ++jb) {
    pack_forward_block<acc_t, V>(
        a.panel + jb * H * 4 * V, H, H, jb,
        [&](int64_t row, int64_t k) { return a.w_hh[row * H + k]; }, a.w_hh, H);
  }
  step_barrier(threads);
  const RowSplit split = row_split<acc_t>(a.batch, H, threads);
  if (split.on) {
    const RowSlice<acc_t> slice(
        a, thread, threads, forward_work_size(split.rows, H, a.recurrent_mask, a.gates));
    forward_steps<isa>(slice.a, 0, 1);
  } else {
    forward_steps<isa>(a, thread, threads);
  }
}

// The time loop of the forward: the products of a thread's units of every row, then the rest
// of its rows.
template <Isa isa, typename acc_t>
void forward_steps(const LayerNormSequence<acc_t>& a, int thread, int threads) {
  constexpr int V = Tiling<isa, acc_t>::V;
  constexpr int R = Tiling<isa, acc_t>::R;
  const int64_t H = a.hidden, B = a.batch, G = 4 * H;
  const Share mine = share_of(ceil_div(H, V), thread, threads);
  const Units own = units_of(H, V, thread, threads);
  // As the plain recurrence's forward: the next panel asked for ahead where they outgrow L2.
  const int64_t panel_bytes = H * 4 * V * static_cast<int64_t>(sizeof(acc_t));
  const bool fetch_panels = panels_outgrow_l2(mine.count() * panel_bytes);

  // Workspace: the h that W_hh multiplies (h itself without a mask), then in inference one
  // step's products and gates, and the c entering the step (zoneout mixes it in).
  acc_t* h_in = a.recurrent_mask ? a.work : a.hidden_state;
  acc_t* scratch = a.work + (a.recurrent_mask ? B * H : 0);
  const bool training = a.gates != nullptr;
  acc_t* c_entering = training ? a.cell_prev : scratch + 2 * B * G;
  // With zoneout of h, h~ of a row.
  std::vector<acc_t> fresh(a.zoneout_hidden ? H : 0);
  for (int64_t r = 0; a.recurrent_mask && r < B; ++r) {
    for (int64_t j = own.begin; j < own.end; ++j) {
      h_in[r * H + j] = a.hidden_state[r * H + j] * a.recurrent_mask[r * H + j];
    }
  }
  step_barrier(threads);

  for (int64_t k = 0; k < a.steps; ++k) {
    const int64_t t = a.reverse ? a.steps - 1 - k : k;
    const int64_t rows = a.step_size[t], offset = a.step_offset[t];
    if (rows == 0) continue;
    const auto product_row = [&](int64_t r) {
      return training ? a.products + (offset + r) * G : scratch + r * G;
    };
    const auto gate_row = [&](int64_t r) {
      return training ? a.gates + (offset + r) * G : scratch + (B + r) * G;
    };

    // The products of this thread's units for every row.
    for (int64_t nth = 0; nth < mine.count(); ++nth) {
      const int64_t jb = mine.visit(nth, k), after = mine.visit_after(nth, k);
      const acc_t* panel = a.panel + jb * H * 4 * V;
      const int64_t j0 = jb * V, n_units = std::min<int64_t>(V, H - j0);
      const Tiles tiles(rows, R);
      for (int64_t tile = 0; tile < tiles.count; ++tile) {
        const int64_t r0 = tiles.begin(tile);
        const int n = static_cast<int>(tiles.begin(tile + 1) - r0);
        const acc_t* in[R] = {};
        for (int i = 0; i < n; ++i) in[i] = h_in + (r0 + i) * H;
        alignas(64) acc_t out[R * 4 * V];
        const PanelAhead next =
            fetch_panels && rows >= kPanelAheadFromRows && after >= 0
                ? panel_ahead(a.panel + after * H * 4 * V, panel_bytes, tile,
                              tiles.count)
                : PanelAhead{};
        tile_product_n<acc_t, V, R>(n, H, in, panel, 4 * V, out, false, nullptr, 0, next);
        // A whole block's copy has a constant size, which the compiler makes one vector move
        // (a libc call per gate and row cost 4 % of the forward at B 64).
        const auto scatter = [&](auto units) {
          for (int i = 0; i < n; ++i) {
            acc_t* p = product_row(r0 + i);
            for (int g = 0; g < 4; ++g) {
              std::memcpy(p + g * H + j0, out + (i * 4 + g) * V, units * sizeof(acc_t));
            }
          }
        };
        if (n_units == V) {
          scatter(std::integral_constant<int64_t, V>{});
        } else {
          scatter(n_units);
        }
      }
    }
    // Every unit's product is in; each thread takes its share of the rows.
    step_barrier(threads);
    const Share my_rows = share_of(rows, thread, threads);
    for (int64_t r = my_rows.begin; r < my_rows.end; ++r) {
      const int64_t row = offset + r;
      const acc_t* p = product_row(r);
      const acc_t* px = a.input_products + row * G;
      acc_t mean, rstd, x_mean, x_rstd;
      moments<acc_t, V>(G, p, mean, rstd);
      moments<acc_t, V>(G, px, x_mean, x_rstd);
      acc_t* z = gate_row(r);
      acc_t* c = a.cell_state + r * H;
      acc_t* h = a.hidden_state + r * H;
      if (training || a.zoneout_cell) {
        std::memcpy(c_entering + (training ? row : r) * H, c, H * sizeof(acc_t));
      }
      cell_of_products(H, H, px, x_mean, x_rstd, a.ih_gain, a.input_bias, p, mean, rstd,
                       a.hh_gain, a.hh_bias, z, c);
      acc_t c_mean, c_rstd;
      moments<acc_t, V>(H, c, c_mean, c_rstd);
      if (training) {
        acc_t* stats = a.stats + row * 6;
        stats[0] = x_mean;
        stats[1] = x_rstd;
        stats[2] = mean;
        stats[3] = rstd;
        stats[4] = c_mean;
        stats[5] = c_rstd;
        std::memcpy(a.hidden_prev + row * H, h_in + r * H, H * sizeof(acc_t));
        // With zoneout of c the saved sequence is c after it (below).
        if (!a.zoneout_cell) std::memcpy(a.cell_out + row * H, c, H * sizeof(acc_t));
      }
      hidden_from_cell(H, z + 3 * H, c, c_mean, c_rstd, a.cell_gain, a.cell_bias,
                       a.zoneout_hidden ? fresh.data() : h);
      if (a.zoneout_hidden) {
        const acc_t* d = a.zoneout_hidden + row * a.zoneout_hidden_stride;
        for (int64_t u = 0; u < H; ++u) h[u] = d[u] * h[u] + (acc_t(1) - d[u]) * fresh[u];
      }
      if (a.zoneout_cell) {
        const acc_t* d = a.zoneout_cell + row * a.zoneout_cell_stride;
        const acc_t* before = c_entering + (training ? row : r) * H;
        for (int64_t u = 0; u < H; ++u) c[u] = d[u] * before[u] + (acc_t(1) - d[u]) * c[u];
        if (training) std::memcpy(a.cell_out + row * H, c, H * sizeof(acc_t));
      }
      std::memcpy(a.output + row * H, h, H * sizeof(acc_t));
      if (a.recurrent_mask) {
        for (int64_t j = 0; j < H; ++j) h_in[r * H + j] = h[j] * a.recurrent_mask[r * H + j];
      }
    }
    step_barrier(threads);
  }
}

// A norm's input gradient for a thread's rows of a step, from dz (the gate
// pre-activations' gradient) and the norm's input `values`: rstd (dy - mean(dy) - hat
// mean(dy hat)) with dy = dz gain and hat = (values - mean) rstd, each row's four coefficients
// from `coefficients` (rows of 4: mean, rstd, mean(dy), mean(dy hat)); dz, values, out and
// out_too have rows G apart. Into `out` and `out_too` (each unless null) and the transposed
// (G, N) copy (unless null), where each column gets the step's rows in one run. Through a small
// L1 tile, 64 bytes of a row at a time: storing straight down the columns, N apart (a multiple
// of 4 KB whenever N is a power of two), keeps sixteen lines of one L1 set in flight and misses
// on every store.
template <typename acc_t>
inline void finish_transposed(const LayerNormSequence<acc_t>& a, const acc_t* dz,
                              const acc_t* values, const acc_t* gain, const acc_t* coefficients,
                              acc_t* out, acc_t* out_too, acc_t* transposed, int64_t rows,
                              int64_t offset) {
  constexpr int kLine = 64 / sizeof(acc_t);
  constexpr int64_t kRows = 64;  // a multiple of kLine
  constexpr int64_t kFewRows = few_grad_rows(sizeof(acc_t));  // grads_in_rows's count
  using vec = typename Vec<acc_t, kLine>::type;
  const int64_t G = 4 * a.hidden;
  alignas(64) acc_t tile[kLine * kRows];
  // Row r's gradient from dz, values and the gain (a value each, or a line of each).
  const auto grad = [&](int64_t r, const auto& d, const auto& v, const auto& g) {
    const acc_t* c = coefficients + r * 4;
    return norm_grad(d * g, (v - c[0]) * c[1], c[1], c[2], c[3]);
  };
  for (int64_t j0 = 0; j0 < G && rows > 0; j0 += kLine) {
    const int64_t n = std::min<int64_t>(kLine, G - j0);
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const int64_t m = std::min(kRows, rows - r0);
      // A few rows (a small batch), or none transposed, do not repay a transpose of kLine
      // rows: each row's line is one vector, its lanes stored straight down their columns.
      if (n == kLine && (m <= kFewRows || !transposed)) {
        const vec g_line = *reinterpret_cast<const vec*>(gain + j0);
        for (int64_t r = r0; r < r0 + m; ++r) {
          alignas(64) acc_t line[kLine];
          *reinterpret_cast<vec*>(line) =
              grad(r, *reinterpret_cast<const vec*>(dz + r * G + j0),
                   *reinterpret_cast<const vec*>(values + r * G + j0), g_line);
          if (out) std::memcpy(out + r * G + j0, line, sizeof(line));
          if (out_too) std::memcpy(out_too + r * G + j0, line, sizeof(line));
          acc_t* __restrict__ column = transposed ? transposed + j0 * a.rows + offset + r
                                                  : nullptr;
          for (int64_t v = 0; column && v < kLine; ++v) column[v * a.rows] = line[v];
        }
        continue;
      }
      // A full line: kLine rows at a time, transposed in registers into the tile.
      for (int64_t rb = 0; n == kLine && rb < m; rb += kLine) {
        const vec g_line = *reinterpret_cast<const vec*>(gain + j0);
        vec block[kLine];
        for (int64_t q = 0; q < kLine; ++q) {
          const int64_t r = r0 + rb + q;
          if (rb + q >= m) {
            block[q] = vec{};
            continue;
          }
          block[q] = grad(r, *reinterpret_cast<const vec*>(dz + r * G + j0),
                          *reinterpret_cast<const vec*>(values + r * G + j0), g_line);
          if (out) *reinterpret_cast<vec*>(out + r * G + j0) = block[q];
          if (out_too) *reinterpret_cast<vec*>(out_too + r * G + j0) = block[q];
        }
        transpose_square<acc_t, kLine>(block);
        for (int64_t v = 0; v < kLine; ++v) {
          *reinterpret_cast<vec*>(tile + v * kRows + rb) = block[v];
        }
      }
      for (int64_t i = 0; n < kLine && i < m; ++i) {
        const int64_t r = r0 + i;
        for (int64_t v = 0; v < n; ++v) {
          const int64_t j = j0 + v;
          const acc_t value = grad(r, dz[r * G + j], values[r * G + j], gain[j]);
          if (out) out[r * G + j] = value;
          if (out_too) out_too[r * G + j] = value;
          tile[v * kRows + i] = value;
        }
      }
      for (int64_t v = 0; transposed && v < n; ++v) {
        acc_t* __restrict__ column = transposed + (j0 + v) * a.rows + offset + r0;
        const acc_t* __restrict__ run = tile + v * kRows;
        for (int64_t r = 0; r < m; ++r) column[r] = run[r];
      }
    }
  }
}

template <Isa isa, typename acc_t>
std::vector<acc_t> backward_steps(const LayerNormSequence<acc_t>& a, int thread, int threads);

// A thread's gradients of the norms' gains and biases (as backward_steps returns them, each
// part kSkew apart), added to the caller's (G + G + H + H + G).
template <typename acc_t>
void add_norm_grads(const LayerNormSequence<acc_t>& a, const std::vector<acc_t>& norm_grads) {
  const int64_t H = a.hidden, G = 4 * H;
  const acc_t* grad_hh_gain = norm_grads.data();
  const acc_t* grad_hh_bias = grad_hh_gain + G + kSkew;
  const acc_t* grad_cell_gain = grad_hh_bias + G + kSkew;
  const acc_t* grad_cell_bias = grad_cell_gain + H + kSkew;
  const acc_t* grad_ih_gain = grad_cell_bias + H + kSkew;
  for (int64_t j = 0; j < G; ++j) {
    a.grad_norms[j] += grad_hh_gain[j];
    a.grad_norms[G + j] += grad_hh_bias[j];
    a.grad_norms[2 * G + 2 * H + j] += grad_ih_gain[j];
  }
  for (int64_t j = 0; j < H; ++j) {
    a.grad_norms[2 * G + j] += grad_cell_gain[j];
    a.grad_norms[2 * G + H + j] += grad_cell_bias[j];
  }
}

template <Isa isa, typename acc_t>
void sequence_backward_thread(const LayerNormSequence<acc_t>& a, int thread, int threads) {
  constexpr int64_t U = 4 * Tiling<isa, acc_t>::V;
  const int64_t H = a.hidden;
  pack_column_panels<U>(a.panel, a.w_hh, H, int64_t(1), 4 * H, H,
                        share_of(ceil_div(H, U), thread, threads));
  step_barrier(threads);
  const RowSplit split = row_split<acc_t>(a.batch, H, threads);
  const std::vector<acc_t> norm_grads =
      split.on ? backward_steps<isa>(
                     RowSlice<acc_t>(a, thread, threads, backward_work_size(split.rows, H)).a,
                     0, 1)
               : backward_steps<isa>(a, thread, threads);
  // Each thread's sums are of its rows and every unit: added in thread order, so a run's bits
  // repeat.
  for (int t = 0; t < threads; ++t) {
    if (t == thread) add_norm_grads(a, norm_grads);
    step_barrier(threads);
  }
}

// The time loop of the backward: the product of a thread's units for every row, then the rest
// of its rows; returns its sums of the norms' gain and bias gradients over its rows.
template <Isa isa, typename acc_t>
std::vector<acc_t> backward_steps(const LayerNormSequence<acc_t>& a, int thread, int threads) {
  constexpr int V = Tiling<isa, acc_t>::V;
  constexpr int R = Tiling<isa, acc_t>::R;
  constexpr int64_t U = 4 * V;  // units per block: a tile's four vectors of columns
  const int64_t H = a.hidden, B = a.batch, G = 4 * H;
  const Share mine = share_of(ceil_div(H, U), thread, threads);
  const Units own = units_of(H, U, thread, threads);
  const bool fetch_panels =
      panels_outgrow_l2(mine.count() * G * U * static_cast<int64_t>(sizeof(acc_t)));

  // Workspace: the step's gate gradients and the gradient of the last step's products (what
  // the next W_hh product multiplies), each (B, G); d LN(c) times its gain and c's normalised
  // values, and with zoneout of h the d dh that the step after sends straight to h, each (B, H).
  acc_t* gate_grads = a.work;
  acc_t* grad_product = gate_grads + B * G + kSkew;
  acc_t* scaled = grad_product + B * G + kSkew;
  acc_t* cell_hat = scaled + B * H + kSkew;
  acc_t* carry = a.zoneout_hidden ? cell_hat + B * H + kSkew : nullptr;
  for (int64_t r = 0; carry && r < B; ++r) {
    std::fill(carry + r * H + own.begin, carry + r * H + own.end, acc_t(0));
  }
  std::vector<acc_t> norm_grads(3 * G + 2 * H + 4 * kSkew);
  acc_t* grad_hh_gain = norm_grads.data();
  acc_t* grad_hh_bias = grad_hh_gain + G + kSkew;
  acc_t* grad_cell_gain = grad_hh_bias + G + kSkew;
  acc_t* grad_cell_bias = grad_cell_gain + H + kSkew;
  acc_t* grad_ih_gain = grad_cell_bias + H + kSkew;
  // Per row of a step, the two product norms' backward coefficients (finish_transposed's), and
  // with zoneout of c a row's c~.
  std::vector<acc_t> coefficients(2 * B * 4);
  std::vector<acc_t> cell_fresh(a.zoneout_cell ? H : 0);
  // A block's product of the previous step's product gradients with W_hh, (B, U).
  struct alignas(64) Row {
    acc_t units[U];
  };
  std::vector<Row> carried_rows(B);
  acc_t* const carried = carried_rows.data()->units;

  // Step k (in backward order) first multiplies the previous step's product gradients by
  // W_hh: the dh carried into this step, and for rows of that step this one lacks (sequences
  // whose first step that was) their grad of h0. One more pass after the last step does the
  // same for its rows.
  int64_t prev_rows = 0;
  for (int64_t k = 0; k <= a.steps; ++k) {
    int64_t rows = 0, offset = 0;
    if (k < a.steps) {
      const int64_t t = a.reverse ? k : a.steps - 1 - k;
      rows = a.step_size[t];
      offset = a.step_offset[t];
      if (rows == 0) continue;
    }
    for (int64_t nth = 0; nth < mine.count(); ++nth) {
      const int64_t jb = mine.visit(nth, k), after = mine.visit_after(nth, k);
      const acc_t* panel = a.panel + jb * G * U;
      const int64_t j0 = jb * U, n_units = std::min<int64_t>(U, H - j0);
      const acc_t* next_panel = fetch_panels && prev_rows >= kPanelAheadFromRows && after >= 0
                                    ? a.panel + after * G * U
                                    : nullptr;
      for_backward_tiles<acc_t, U>(prev_rows, G, R, panel, next_panel,
                                   [&](int64_t k0, int64_t kn, int64_t r0, int n,
                                       PanelAhead next) {
        const acc_t* in[R] = {};
        for (int i = 0; i < n; ++i) in[i] = grad_product + (r0 + i) * G + k0;
        tile_product_n<acc_t, V, R>(n, kn, in, panel + k0 * U, U, carried + r0 * U,
                                    /*accumulate=*/k0 > 0, nullptr, 0, next);
      });
      for (int64_t r = 0; r < prev_rows; ++r) {
        const acc_t* sum = carried + r * U;
        acc_t* dh = a.grad_hidden + r * H + j0;
        const acc_t* mask = a.recurrent_mask ? a.recurrent_mask + r * H + j0 : nullptr;
        const acc_t* straight = carry ? carry + r * H + j0 : nullptr;
        with_optional(mask, [&](auto masked) {
          with_optional(straight, [&](auto zoneout) {
            for (int64_t u = 0; u < n_units; ++u) {
              dh[u] = (masked ? sum[u] * mask[u] : sum[u]) +
                      (zoneout ? straight[u] : acc_t(0));
            }
          });
        });
      }
    }

    // Every unit's dh is in; each thread takes its share of the rows.
    step_barrier(threads);
    const Share my_rows = share_of(rows, thread, threads);
    for (int64_t r = my_rows.begin; r < my_rows.end; ++r) {
      const int64_t row = offset + r;
      const acc_t* stats = a.stats + row * 6;
      const acc_t* z = a.gates + row * G;
      const acc_t* c_prev = a.cell_prev + row * H;
      const acc_t* c = a.cell_out + row * H;
      // With zoneout of c the saved sequence is c after it; the norm saw c~ = f c_prev + i g.
      if (a.zoneout_cell) {
        for (int64_t u = 0; u < H; ++u) {
          cell_fresh[u] = z[H + u] * c_prev[u] + z[u] * z[2 * H + u];
        }
        c = cell_fresh.data();
      }
      acc_t* dh = a.grad_hidden + r * H;
      const acc_t* from_output = a.grad_output ? a.grad_output + row * H : nullptr;
      // Zoneout of h: of h's whole gradient, d goes straight to the h before (carried into
      // the next product's result) and 1 - d through h~.
      if (carry) {
        const acc_t* d = a.zoneout_hidden + row * a.zoneout_hidden_stride;
        with_optional(from_output, [&](auto has_output) {
          for (int64_t u = 0; u < H; ++u) {
            const acc_t total = dh[u] + (has_output ? from_output[u] : acc_t(0));
            carry[r * H + u] = d[u] * total;
            dh[u] = (acc_t(1) - d[u]) * total;
          }
        });
        from_output = nullptr;
      }
      // The output gate's gradient and LN(c)'s.
      acc_t* dz = gate_grads + r * G;
      acc_t* s = scaled + r * H;
      acc_t* x = cell_hat + r * H;
      output_gate_grads(H, dh, from_output, z + 3 * H, c, stats[4], stats[5], a.cell_gain,
                        a.cell_bias, dz + 3 * H, grad_cell_gain, grad_cell_bias, s, x);
      const acc_t mean_dy = sum_of<acc_t, V>(s, H) / acc_t(H);
      const acc_t mean_dy_xhat = dot_of<acc_t, V>(s, x, H) / acc_t(H);
      // c's whole gradient, the other gates' and dc carried back.
      acc_t* dc = a.grad_cell + r * H;
      if (a.grad_cells) {
        const acc_t* extra = a.grad_cells + row * H;
        for (int64_t u = 0; u < H; ++u) dc[u] += extra[u];
      }
      const acc_t* keep = a.zoneout_cell ? a.zoneout_cell + row * a.zoneout_cell_stride : nullptr;
      cell_gate_grads(H, s, x, stats[5], mean_dy, mean_dy_xhat, z, z + H, z + 2 * H, c_prev,
                      keep, dc, dz, dz + H, dz + 2 * H);
      // Both product norms' row sums: their backward's coefficients.
      acc_t sums[4] = {};
      const ProductNorm<acc_t> hh{a.products + row * G, stats[2], stats[3], a.hh_gain,
                                  grad_hh_gain};
      const ProductNorm<acc_t> ih{a.input_products + row * G, stats[0], stats[1], a.ih_gain,
                                  grad_ih_gain};
      product_norm_sums<acc_t, V>(G, dz, hh, grad_hh_bias, ih, sums);
      acc_t* hh_coefficients = coefficients.data() + r * 4;
      acc_t* ih_coefficients = coefficients.data() + (B + r) * 4;
      for (int i = 0; i < 2; ++i) {
        hh_coefficients[i] = stats[2 + i];
        hh_coefficients[2 + i] = sums[i] / acc_t(G);
        ih_coefficients[i] = stats[i];
        ih_coefficients[2 + i] = sums[2 + i] / acc_t(G);
      }
    }
    // The products' gradients, in both layouts (the weight gradients' products read them
    // transposed).
    const int64_t first = my_rows.begin, count = my_rows.count();
    finish_transposed(a, gate_grads + first * G, a.products + (offset + first) * G, a.hh_gain,
                      coefficients.data() + first * 4, grad_product + first * G,
                      a.grad_products ? a.grad_products + (offset + first) * G : nullptr,
                      a.grad_products_t, count, offset + first);
    finish_transposed(
        a, gate_grads + first * G, a.input_products + (offset + first) * G, a.ih_gain,
        coefficients.data() + (B + first) * 4,
        a.grad_input_products ? a.grad_input_products + (offset + first) * G : nullptr,
        static_cast<acc_t*>(nullptr), a.grad_input_products_t, count, offset + first);
    prev_rows = rows;
    step_barrier(threads);
  }
  return norm_grads;
}

// ---------------------------------------------------------------------------------------------
// Row kernels (a layer with a projection).

template <Isa isa, typename acc_t>
void forward_rows_kernel(const LayerNormRows<acc_t>& a, int64_t begin, int64_t end) {
  constexpr int V = Tiling<isa, acc_t>::V;
  const int64_t H = a.hidden, G = 4 * H;
  for (int64_t r = begin; r < end; ++r) {
    const acc_t* p = a.product + r * G;
    acc_t* stats = a.stats + r * 6;
    moments<acc_t, V>(G, p, stats[2], stats[3]);
    acc_t* z = a.gates + r * G;
    const acc_t* zx = a.input_part + r * G;
    normalised_gates(G, zx, p, stats[2], stats[3], a.hh_gain, a.hh_bias, z);
    acc_t* c = a.cell + r * H;
    std::memcpy(c, a.cell_prev + r * H, H * sizeof(acc_t));
    gates_and_cell(z, c, H, 0, H);
    moments<acc_t, V>(H, c, stats[4], stats[5]);
    acc_t* h = a.hidden_out + r * H;
    hidden_from_cell(H, z + 3 * H, c, stats[4], stats[5], a.cell_gain, a.cell_bias, h);
  }
}

template <Isa isa, typename acc_t>
void backward_rows_kernel(const LayerNormRows<acc_t>& a, int64_t begin, int64_t end) {
  constexpr int V = Tiling<isa, acc_t>::V;
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
    // dz's cell block holds d LN(c) times its gain meanwhile.
    acc_t* scaled = dz + 2 * H;
    for (int64_t j = 0; j < H; ++j) {
      const acc_t t = tanh_cell_norm((c[j] - stats[4]) * stats[5], a.cell_gain[j],
                                     a.cell_bias[j]);
      output_grads(dh[j], z[3 * H + j], t, dz[3 * H + j], dn[j]);
      scaled[j] = dn[j] * a.cell_gain[j];
    }
    acc_t* dc_from_h = dz;  // the input gate's block, free until written below
    norm_backward<acc_t, V>(H, c, stats[4], stats[5], scaled, dc_from_h);
    for (int64_t j = 0; j < H; ++j) {
      dc[j] += dc_from_h[j];
      cell_grads(dc[j], z[j], z[H + j], z[2 * H + j], c_prev[j], dz[j], dz[H + j],
                 dz[2 * H + j]);
    }
    const acc_t* p = a.product + r * G;
    acc_t* dp = a.grad_product + r * G;
    for (int64_t j = 0; j < G; ++j) dp[j] = dz[j] * a.hh_gain[j];
    norm_backward<acc_t, V>(G, p, stats[2], stats[3], dp, dp);
  }
}

LSTM_EXT_KERNEL_VARIANTS(sequence_forward_variant, sequence_forward_thread,
                         (const LayerNormSequence<T>& a, int thread, int threads),
                         (a, thread, threads))
LSTM_EXT_KERNEL_VARIANTS(sequence_backward_variant, sequence_backward_thread,
                         (const LayerNormSequence<T>& a, int thread, int threads),
                         (a, thread, threads))
LSTM_EXT_KERNEL_VARIANTS(forward_rows_variant, forward_rows_kernel,
                         (const LayerNormRows<T>& a, int64_t begin, int64_t end), (a, begin, end))
LSTM_EXT_KERNEL_VARIANTS(backward_rows_variant, backward_rows_kernel,
                         (const LayerNormRows<T>& a, int64_t begin, int64_t end), (a, begin, end))

// Rows per task so that a task has enough cells to be worth a thread.
int64_t grain(int64_t hidden) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, hidden)); }

template <typename acc_t>
at::TensorOptions math_options() {
  return at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
}

}  // namespace

template <typename acc_t>
void layer_norm_sequence_forward(LayerNormSequence<acc_t> a) {
  const Isa isa = active_isa();
  const int64_t V = lanes<acc_t>(isa), H = a.hidden, B = a.batch;
  const int64_t blocks = ceil_div(H, V);
  const int threads = threads_for(blocks);
  const at::Tensor panel = workspace(Workspace::panel, {blocks * V * 4 * H}, math_options<acc_t>());
  const at::Tensor work = workspace(
      Workspace::recurrent_state, {team_workspace<acc_t>(B, H, threads, [&](int64_t n, int) {
        return forward_work_size(n, H, a.recurrent_mask, a.gates);
      })},
      math_options<acc_t>());
  a.panel = panel.data_ptr<acc_t>();
  a.work = work.data_ptr<acc_t>();
  run_parallel(a, sequence_forward_variant<acc_t>(isa), threads);
}

template <typename acc_t>
void layer_norm_sequence_backward(LayerNormSequence<acc_t> a) {
  const Isa isa = active_isa();
  const int64_t U = 4 * lanes<acc_t>(isa), H = a.hidden, B = a.batch;
  const int64_t blocks = ceil_div(H, U);
  const int threads = threads_for(blocks);
  const at::Tensor panel = workspace(Workspace::panel, {blocks * U * 4 * H}, math_options<acc_t>());
  const at::Tensor work = workspace(
      Workspace::recurrent_state,
      {team_workspace<acc_t>(B, H, threads, [&](int64_t n, int) {
        return backward_work_size(n, H);
      })},
      math_options<acc_t>());
  a.panel = panel.data_ptr<acc_t>();
  a.work = work.data_ptr<acc_t>();
  run_parallel(a, sequence_backward_variant<acc_t>(isa), threads);
}

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

#define LSTM_EXT_INSTANTIATE(acc_t)                                                    \
  template void layer_norm_sequence_forward<acc_t>(LayerNormSequence<acc_t>);          \
  template void layer_norm_sequence_backward<acc_t>(LayerNormSequence<acc_t>);         \
  template void layer_norm_forward_rows<acc_t>(const LayerNormRows<acc_t>&);           \
  template void layer_norm_backward_rows<acc_t>(const LayerNormRows<acc_t>&);
LSTM_EXT_INSTANTIATE(float)
LSTM_EXT_INSTANTIATE(double)
#undef LSTM_EXT_INSTANTIATE

}  // namespace cpu
}  // namespace lstm_ext
