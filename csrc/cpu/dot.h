// Dot products of a few weight rows with a few input rows, reading the weights where they lie
// (rows contiguous). For products too small to repay packing the weights into panels: a decode
// step (one row) reads each weight once, as the floor of such a step does.
#pragma once

#include "isa.h"
#include "vec.h"

#include <algorithm>
#include <bit>
#include <cmath>
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
  // The 4N accumulators' lanes summed by vector folds (vec.h), padded to a power of two.
  constexpr int M = std::bit_ceil(unsigned{4 * N});
  vec all[M];
  for (int m = 0; m < M; ++m) all[m] = m < 4 * N ? acc[m / N][m % N] : vec{};
  acc_t sums[M];
  lane_sums<acc_t, V, M>(all, 4 * N, sums);
  for (int g = 0; g < 4; ++g) {
    for (int i = 0; i < N; ++i) {
      acc_t sum = sums[g * N + i];
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

// int8 weights times activations rounded to int16. Each activation row is scaled so that its
// largest magnitude becomes 32767 and rounded (error at most 1/65534 of that magnitude, far
// below the weights' own rounding to 1/254 of theirs), so the products run in integers
// (vpmaddwd: 32 multiply-adds per instruction, where widening int8 to fp32 costs three
// instructions per 16 weights) and are exact whatever the instruction set.

// Rows of at most this many values are summed in int32 without overflow (|sum| <= 512 * 127 *
// 32767 < 2^31); longer rows are summed in chunks of it.
constexpr int64_t kInt16DotChunk = 512;

// q = x rounded to int16 on its own scale; returns the scale (x = q * scale within rounding):
// 0 for a row of zeros, NaN for one holding a NaN or an infinity (the products then carry the
// NaN, as fp32 arithmetic would).
inline float quantize_int16(int64_t K, const float* x, int16_t* q) {
  // The largest magnitude through the bits, whose order as integers is that of the values (an
  // integer maximum vectorizes where a float one does not); NaN and infinity lie above all.
  uint32_t top = 0;
  for (int64_t k = 0; k < K; ++k) {
    top = std::max(top, std::bit_cast<uint32_t>(x[k]) & 0x7FFFFFFFu);
  }
  if (top >= 0x7F800000u || top == 0) {
    std::fill(q, q + K, int16_t{0});
    return top == 0 ? 0.0f : NAN;
  }
  const float largest = std::bit_cast<float>(top);
  const float inverse = 32767.0f / largest;
  // The product rounded to fp32, then to the nearest integer (ties to even): nearbyint keeps
  // the compiler from fusing the two roundings into one, which only FMA instruction sets would.
  for (int64_t k = 0; k < K; ++k) {
    q[k] = static_cast<int16_t>(static_cast<int32_t>(std::nearbyint(x[k] * inverse)));
  }
  return largest / 32767.0f;
}

// sums[g * N + i] = sum_k w[g * w_step + k] * q[i][k] for four int8 weight rows and N int16
// rows, K <= kInt16DotChunk, by lanes V of the instruction set's fp32 vectors (as widen_int8
// above). The plain loop, k outermost, GCC vectorizes into pmaddwd/vpmaddwd; with AVX-512 the
// intrinsics below keep all 4N sums in registers and are 15 % faster in a decode step.
template <int V, int N>
struct Int16Dot {
  static inline void run(int64_t K, const int8_t* w, int64_t w_step, const int16_t* const* q,
                         int32_t* sums) {
    int32_t acc[4][N] = {};
    for (int64_t k = 0; k < K; ++k) {
      for (int g = 0; g < 4; ++g) {
        for (int i = 0; i < N; ++i) acc[g][i] += int32_t{w[g * w_step + k]} * q[i][k];
      }
    }
    for (int g = 0; g < 4; ++g) {
      for (int i = 0; i < N; ++i) sums[g * N + i] = acc[g][i];
    }
  }
};
#if LSTM_EXT_X86_VARIANTS
template <int N>
struct Int16Dot<16, N> {
  __attribute__((target("arch=x86-64-v4"))) static inline void run(int64_t K, const int8_t* w,
                                                                   int64_t w_step,
                                                                   const int16_t* const* q,
                                                                   int32_t* sums) {
    __m512i acc[4][N];
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
#pragma GCC unroll 4
      for (int i = 0; i < N; ++i) acc[g][i] = _mm512_setzero_si512();
    }
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      __m512i wv[4];
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        wv[g] = _mm512_cvtepi8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * w_step + k)));
      }
#pragma GCC unroll 4
      for (int i = 0; i < N; ++i) {
        const __m512i xv = _mm512_loadu_si512(q[i] + k);
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) {
          acc[g][i] = _mm512_add_epi32(acc[g][i], _mm512_madd_epi16(wv[g], xv));
        }
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
#pragma GCC unroll 4
      for (int i = 0; i < N; ++i) {
        int32_t sum = _mm512_reduce_add_epi32(acc[g][i]);
        for (int64_t kk = k; kk < K; ++kk) sum += int32_t{w[g * w_step + kk]} * q[i][kk];
        sums[g * N + i] = sum;
      }
    }
  }
};
#endif

// out[g * n + i] = sum_k w[g * w_step + k] * q[i][k] * q_scale[i] for n <= N rows of any
// length: exact integer sums, chunk by chunk, scaled once.
template <int V, int N>
inline void int8_int16_dot_rows(int n, int64_t K, const int8_t* w, int64_t w_step,
                                const int16_t* const* q, const float* q_scale, float* out) {
  if constexpr (N > 1) {
    if (n < N) return int8_int16_dot_rows<V, N - 1>(n, K, w, w_step, q, q_scale, out);
  }
  int32_t part[4 * N];
  if (K <= kInt16DotChunk) {  // one chunk: its int32 sums are exact
    Int16Dot<V, N>::run(K, w, w_step, q, part);
    for (int g = 0; g < 4; ++g) {
      for (int i = 0; i < N; ++i) {
        out[g * N + i] = static_cast<float>(part[g * N + i]) * q_scale[i];
      }
    }
    return;
  }
  int64_t sums[4 * N] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kInt16DotChunk) {
    const int16_t* rows[N];
    for (int i = 0; i < N; ++i) rows[i] = q[i] + k0;
    Int16Dot<V, N>::run(std::min(kInt16DotChunk, K - k0), w + k0, w_step, rows, part);
    for (int t = 0; t < 4 * N; ++t) sums[t] += part[t];
  }
  for (int g = 0; g < 4; ++g) {
    for (int i = 0; i < N; ++i) out[g * N + i] = static_cast<float>(sums[g * N + i]) * q_scale[i];
  }
}

}  // namespace cpu
}  // namespace lstm_ext
