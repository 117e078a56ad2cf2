// Dot products of a few weight rows with a few input rows, reading the weights where they lie
// (rows contiguous). For products too small to repay packing the weights into panels: a decode
// step (one row) reads each weight once, as the floor of such a step does.
#pragma once

#include "isa.h"
#include "vec.h"

#include <cstdint>
#include <type_traits>

#if LSTM_EXT_X86_VARIANTS
#include <immintrin.h>
#endif

namespace lstm_ext {
namespace cpu {

// V int8 values widened to fp32: sign-extend and convert instructions where the instruction set
// has them (GCC builds the plain conversion one lane at a time), a loop otherwise.
template <int V>
inline typename Vec<float, V>::type widen_int8(const int8_t* values) {
  typename Vec<float, V>::type out;
  for (int lane = 0; lane < V; ++lane) out[lane] = static_cast<float>(values[lane]);
  return out;
}
#if LSTM_EXT_X86_VARIANTS
template <>
__attribute__((target("arch=x86-64-v4"))) inline typename Vec<float, 16>::type widen_int8<16>(
    const int8_t* values) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(values));
  return (typename Vec<float, 16>::type)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
}
template <>
__attribute__((target("arch=x86-64-v3"))) inline typename Vec<float, 8>::type widen_int8<8>(
    const int8_t* values) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(values));
  return (typename Vec<float, 8>::type)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}
#endif

// out[g * N + i] = sum_k w[g * w_step + k] * x[i][k] for four weight rows g and N input rows.
// The weights are in the math type, or int8 (the int8 LSTM's rows, widened to fp32 as they are
// read, so the inputs keep full precision and a quarter of the bytes is read; the caller
// applies the rows' scales).
template <typename acc_t, int V, int N, typename weight_t = acc_t>
inline void dot_rows(int64_t K, const weight_t* w, int64_t w_step, const acc_t* const* x,
                     acc_t* out) {
  using vec = typename Vec<acc_t, V>::type;
  const auto load = [&](const weight_t* at) {
    if constexpr (std::is_same_v<weight_t, int8_t>) {
      return widen_int8<V>(at);
    } else {
      return *reinterpret_cast<const vec*>(at);
    }
  };
  vec acc[4][N];
  for (int g = 0; g < 4; ++g) {
    for (int i = 0; i < N; ++i) acc[g][i] = vec{};
  }
  int64_t k = 0;
  for (; k + V <= K; k += V) {
    vec wv[4];
    for (int g = 0; g < 4; ++g) wv[g] = load(w + g * w_step + k);
    for (int i = 0; i < N; ++i) {
      const vec xv = *reinterpret_cast<const vec*>(x[i] + k);
      for (int g = 0; g < 4; ++g) acc[g][i] += wv[g] * xv;
    }
  }
  for (int g = 0; g < 4; ++g) {
    for (int i = 0; i < N; ++i) {
      acc_t sum = 0;
      for (int lane = 0; lane < V; ++lane) sum += acc[g][i][lane];
      for (int64_t kk = k; kk < K; ++kk) sum += static_cast<acc_t>(w[g * w_step + kk]) * x[i][kk];
      out[g * N + i] = sum;
    }
  }
}

// dot_rows for n <= N input rows, n known only at run time.
template <typename acc_t, int V, int N, typename weight_t = acc_t>
inline void dot_rows_n(int n, int64_t K, const weight_t* w, int64_t w_step,
                       const acc_t* const* x, acc_t* out) {
  if constexpr (N > 1) {
    if (n < N) return dot_rows_n<acc_t, V, N - 1, weight_t>(n, K, w, w_step, x, out);
  }
  dot_rows<acc_t, V, N, weight_t>(K, w, w_step, x, out);
}

}  // namespace cpu
}  // namespace lstm_ext
