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
#include <cstring>
#include <type_traits>
#include <vector>

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

// The same products the other way round, for more rows than dot_rows takes at once: the rows
// transposed once into columns (Columns below), and each weight value broadcast times the
// vector of every row's value at its k. Each weight is then read once for all the rows rather
// than once per dot_rows tile of them (which leaves the tile waiting on L2), and no lane sums
// remain. Where the rows fill at most half a vector of 4-byte values, a vector holds P = 2
// values of k per row (lane r * P + p: row r at k0 + p) and each broadcast is of the pair of
// weight values at k0; the pair's two sums are added at the end.

// The pair of weight values at w in every pair of lanes (one pair of 4-byte values moves as
// one 8-byte value).
template <typename acc_t, int V>
inline typename Vec<acc_t, V>::type broadcast_pair(const acc_t* w) {
  static_assert(sizeof(acc_t) == 4, "pairs of 4-byte values");
  uint64_t pair;
  std::memcpy(&pair, w, sizeof(pair));
  return (typename Vec<acc_t, V>::type)(typename Vec<uint64_t, V / 2>::type{} + pair);
}

// out[(g * V + u) * C * V + lane] (+)= sum over k of w[g * gate_step + u * unit_step + k] times
// the lane's row at k, for U units and their four gates, from columns laid out as Columns's.
template <typename acc_t, int V, int U, int C, int P>
inline void column_product(int64_t K, const acc_t* w, int64_t unit_step, int64_t gate_step,
                           const acc_t* columns, acc_t* out, bool accumulate) {
  using vec = typename Vec<acc_t, V>::type;
  // Four gate rows' pointers and the unit step: 3 units' rows are then addressed from them
  // with the step as index, where twelve pointers of their own would not stay in registers.
  const acc_t* gate[4];
  for (int g = 0; g < 4; ++g) gate[g] = w + g * gate_step;
  vec acc[4][U][C];
  const auto out_at = [&](int g, int u, int c) {
    return reinterpret_cast<vec*>(out + (g * V + u) * C * V + c * V);
  };
  for (int g = 0; g < 4; ++g) {
    for (int u = 0; u < U; ++u) {
      for (int c = 0; c < C; ++c) acc[g][u][c] = accumulate ? *out_at(g, u, c) : vec{};
    }
  }
  const int64_t whole = K / P;
  for (int64_t kp = 0; kp < whole; ++kp) {
    vec x[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) x[c] = *reinterpret_cast<const vec*>(columns + (kp * C + c) * V);
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const acc_t* at = gate[g] + u * unit_step + kp * P;
        if constexpr (P == 1) {
          const acc_t b = *at;
#pragma GCC unroll 4
          for (int c = 0; c < C; ++c) acc[g][u][c] += x[c] * b;
        } else {
          const vec b = broadcast_pair<acc_t, V>(at);
#pragma GCC unroll 2
          for (int c = 0; c < C; ++c) acc[g][u][c] += x[c] * b;
        }
      }
    }
  }
  if (whole * P < K) {  // a lone last value of k, whose pair's other lanes in the columns are 0
    for (int c = 0; c < C; ++c) {
      const vec x = *reinterpret_cast<const vec*>(columns + (whole * C + c) * V);
      for (int g = 0; g < 4; ++g) {
        for (int u = 0; u < U; ++u) acc[g][u][c] += x * gate[g][u * unit_step + K - 1];
      }
    }
  }
  for (int g = 0; g < 4; ++g) {
    for (int u = 0; u < U; ++u) {
      for (int c = 0; c < C; ++c) *out_at(g, u, c) = acc[g][u][c];
    }
  }
}

// Up to kMaxVectors vectors of rows as columns, and their products with a block of V units of
// weight rows read in place (instruction sets with 32 vector registers: the tiles keep up to 24
// accumulators).
template <typename acc_t, int V>
class Columns {
 public:
  static constexpr int kMaxVectors = 4;

  // Whether n rows take this form.
  static bool fits(int64_t n) { return n <= kMaxVectors * V; }

  // Rows [0, n) (each K values, contiguous) as the columns of input `which` (0 or 1).
  void set_rows(int which, int n, int64_t K, const acc_t* const* rows) {
    P_ = sizeof(acc_t) == 4 && 2 * n <= V ? 2 : 1;
    C_ = (n + V / P_ - 1) / (V / P_);
    std::vector<acc_t>& out = columns_[which];
    out.assign((K + P_ - 1) / P_ * C_ * V, acc_t(0));
    if (P_ == 2) {
      if constexpr (sizeof(acc_t) == 4) transpose<2>(n, K, rows, out.data());
    } else {
      transpose<1>(n, K, rows, out.data());
    }
  }

  // The block's products (units [0, n_units) of weight w: gate g of unit u at row
  // w + g * gate_step + u * unit_step) with input `which`'s columns, added to what is there
  // with accumulate.
  void product(int which, int64_t K, int64_t n_units, const acc_t* w, int64_t unit_step,
               int64_t gate_step, bool accumulate) {
    block_.resize(4 * V * kMaxVectors * V);
    if (P_ == 2) {
      if constexpr (sizeof(acc_t) == 4) {
        units<2, 1, 2>(which, K, n_units, w, unit_step, gate_step, accumulate);
      }
    } else if (C_ == 1) {
      units<2, 1, 1>(which, K, n_units, w, unit_step, gate_step, accumulate);
    } else if (C_ == 2) {
      units<3, 2, 1>(which, K, n_units, w, unit_step, gate_step, accumulate);
    } else if (C_ == 3) {
      units<2, 3, 1>(which, K, n_units, w, unit_step, gate_step, accumulate);
    } else {
      units<1, 4, 1>(which, K, n_units, w, unit_step, gate_step, accumulate);
    }
  }

  // Gate g of unit v for row r, from the last product.
  acc_t value(int64_t r, int g, int64_t v) const {
    const int64_t per_vector = V / P_;
    const acc_t* at =
        block_.data() + (g * V + v) * C_ * V + (r / per_vector) * V + (r % per_vector) * P_;
    return P_ == 2 ? at[0] + at[1] : at[0];
  }

 private:
  // The rows into the columns: squares of V / P rows by V / P groups of P values of k
  // transposed in registers (a pair of 4-byte values moving as one 8-byte value), and what
  // k is left over one value at a time.
  template <int P>
  void transpose(int n, int64_t K, const acc_t* const* rows, acc_t* out) {
    using T = std::conditional_t<P == 2, uint64_t, acc_t>;
    constexpr int L = V / P;
    using square_vec = typename Vec<T, L>::type;
    const int64_t squares_end = K / V * V;
    for (int c = 0; c < C_; ++c) {
      for (int64_t k0 = 0; k0 < squares_end; k0 += V) {
        square_vec square[L];
        for (int i = 0; i < L; ++i) {
          const int r = c * L + i;
          square[i] = r < n ? *reinterpret_cast<const square_vec*>(rows[r] + k0) : square_vec{};
        }
        transpose_square<T, L>(square);
        for (int t = 0; t < L; ++t) {
          *reinterpret_cast<square_vec*>(out + ((k0 / P + t) * C_ + c) * V) = square[t];
        }
      }
    }
    for (int r = 0; r < n; ++r) {
      acc_t* to = out + (r / L) * V + (r % L) * P;
      for (int64_t k = squares_end; k < K; ++k) to[(k / P) * C_ * V + k % P] = rows[r][k];
    }
  }

  // Over k in chunks of the columns that stay in L1 while every unit of the block passes over
  // them (whole, 64 rows' columns of 256 values of k fill L1 and more, and each unit then read
  // them from L2: half the speed).
  template <int U, int C, int P>
  void units(int which, int64_t K, int64_t n_units, const acc_t* w, int64_t unit_step,
             int64_t gate_step, bool accumulate) {
    constexpr int64_t kChunkBytes = 16 << 10;
    constexpr int64_t kChunk =
        std::max<int64_t>(P, kChunkBytes / (C * V * int64_t{sizeof(acc_t)}) / P * P);
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
      const int64_t kn = std::min(kChunk, K - k0);
      const acc_t* columns = columns_[which].data() + k0 / P * C * V;
      const bool add = accumulate || k0 > 0;
      int64_t u = 0;
      for (; u + U <= n_units; u += U) {
        column_product<acc_t, V, U, C, P>(kn, w + u * unit_step + k0, unit_step, gate_step,
                                          columns, block_.data() + u * C * V, add);
      }
      for (; u < n_units; ++u) {
        column_product<acc_t, V, 1, C, P>(kn, w + u * unit_step + k0, unit_step, gate_step,
                                          columns, block_.data() + u * C * V, add);
      }
    }
  }

  int P_ = 1, C_ = 1;
  std::vector<acc_t> columns_[2];
  std::vector<acc_t> block_;
};

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
// kVnni (a CPU with AVX512-VNNI, as every one with avx512_bf16 has): each multiply-add pair
// and its sum in one vpdpwssd, not vpmaddwd and vpaddd, with the same exact integer sums.
template <int V, int N, bool kVnni = false>
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
template <int N, bool kVnni>
struct Int16Dot<16, N, kVnni> {
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
          if constexpr (kVnni) {
            // In asm: x86-64-v4 does not include VNNI, and the kernels that pass kVnni run
            // only on CPUs that have it (isa.h).
            __m512i sum = acc[g][i];
            asm("vpdpwssd %2, %1, %0" : "+v"(sum) : "v"(wv[g]), "v"(xv));
            acc[g][i] = sum;
          } else {
            acc[g][i] = _mm512_add_epi32(acc[g][i], _mm512_madd_epi16(wv[g], xv));
          }
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
template <int V, int N, bool kVnni = false>
inline void int8_int16_dot_rows(int n, int64_t K, const int8_t* w, int64_t w_step,
                                const int16_t* const* q, const float* q_scale, float* out) {
  if constexpr (N > 1) {
    if (n < N) return int8_int16_dot_rows<V, N - 1, kVnni>(n, K, w, w_step, q, q_scale, out);
  }
  int32_t part[4 * N];
  if (K <= kInt16DotChunk) {  // one chunk: its int32 sums are exact
    Int16Dot<V, N, kVnni>::run(K, w, w_step, q, part);
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
    Int16Dot<V, N, kVnni>::run(std::min(kInt16DotChunk, K - k0), w + k0, w_step, rows,
                               part);
    for (int t = 0; t < 4 * N; ++t) sums[t] += part[t];
  }
  for (int g = 0; g < 4; ++g) {
    for (int i = 0; i < N; ++i) out[g * N + i] = static_cast<float>(sums[g * N + i]) * q_scale[i];
  }
}

}  // namespace cpu
}  // namespace lstm_ext
