// Dot products of a few weight rows with a few input rows, reading the weights where they lie
// (rows contiguous). For products too small to repay packing the weights into panels: a decode
// step (one row) reads each weight once, as the floor of such a step does.
#pragma once

#include "vec.h"

#include <cstdint>

namespace lstm_ext {
namespace cpu {

// out[g * N + i] = sum_k w[g * w_step + k] * x[i][k] for four weight rows g and N input rows.
template <typename acc_t, int V, int N>
inline void dot_rows(int64_t K, const acc_t* w, int64_t w_step, const acc_t* const* x,
                     acc_t* out) {
  using vec = typename Vec<acc_t, V>::type;
  vec acc[4][N];
  for (int g = 0; g < 4; ++g) {
    for (int i = 0; i < N; ++i) acc[g][i] = vec{};
  }
  int64_t k = 0;
  for (; k + V <= K; k += V) {
    vec wv[4];
    for (int g = 0; g < 4; ++g) wv[g] = *reinterpret_cast<const vec*>(w + g * w_step + k);
    for (int i = 0; i < N; ++i) {
      const vec xv = *reinterpret_cast<const vec*>(x[i] + k);
      for (int g = 0; g < 4; ++g) acc[g][i] += wv[g] * xv;
    }
  }
  for (int g = 0; g < 4; ++g) {
    for (int i = 0; i < N; ++i) {
      acc_t sum = 0;
      for (int lane = 0; lane < V; ++lane) sum += acc[g][i][lane];
      for (int64_t kk = k; kk < K; ++kk) sum += w[g * w_step + kk] * x[i][kk];
      out[g * N + i] = sum;
    }
  }
}

// dot_rows for n <= N input rows, n known only at run time.
template <typename acc_t, int V, int N>
inline void dot_rows_n(int n, int64_t K, const acc_t* w, int64_t w_step, const acc_t* const* x,
                       acc_t* out) {
  if constexpr (N > 1) {
    if (n < N) return dot_rows_n<acc_t, V, N - 1>(n, K, w, w_step, x, out);
  }
  dot_rows<acc_t, V, N>(K, w, w_step, x, out);
}

}  // namespace cpu
}  // namespace lstm_ext
