// Fixed-width vectors of float or double as GCC vector types. Arithmetic on them compiles to
// whatever the enclosing function's instruction set offers (one zmm register, two ymm or four
// xmm for 64 bytes), which is how one kernel source serves every instruction set (isa.h).
// Loads and stores through them may be unaligned and may alias the element type.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

// Helpers that take or return these vectors by value are inlined into one instruction set's
// kernel (isa.h) and never called across sets, so GCC's note that their calling convention
// differs between instruction sets does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace lstm_ext {
namespace cpu {

template <typename T, int lanes>
struct Vec {
  typedef T type __attribute__((vector_size(lanes * sizeof(T)), aligned(sizeof(T)), may_alias));
};

// A square block of n x n values held as n vectors of n lanes (n a power of two), transposed
// in place: round s (1, 2, 4, ...) swaps the off-diagonal s x s blocks of every 2s x 2s block,
// that is, exchanges bit s of the row and the column index, with one two-input shuffle per
// output vector (the instruction set's permutes; n log2 n shuffles in all).
template <int s, typename vec, std::size_t... c>
inline void swap_blocks(vec& a, vec& b, std::index_sequence<c...>) {
  constexpr int n = sizeof...(c);
  const vec low = __builtin_shufflevector(a, b, ((c & s) == 0 ? int(c) : int(c) - s + n)...);
  b = __builtin_shufflevector(a, b, ((c & s) == 0 ? int(c) + s : int(c) + n)...);
  a = low;
}
template <typename T, int n, int s = 1>
inline void transpose_square(typename Vec<T, n>::type* rows) {
  if constexpr (s < n) {
    constexpr auto lanes = std::make_index_sequence<n>{};
    for (int i = 0; i < n; ++i) {
      if ((i & s) == 0) swap_blocks<s>(rows[i], rows[i + s], lanes);
    }
    transpose_square<T, n, 2 * s>(rows);
  }
}

// Sums of the lanes of M vectors of n lanes (M a power of two), the vectors overwritten: folded
// in pairs as transpose_square pairs them, the two halves of each swap added instead of kept,
// so that the vectors left halve each round (one left is folded with itself). Afterwards lane c
// of vector j holds the sum of vector j * n + c (M >= n), or lane c of vector 0 that of vector c
// (M < n): M - 1 vector adds and twice as many shuffles, against M * n dependent scalar adds
// (GCC keeps a plain loop over the lanes in order, as IEEE addition asks).
template <typename T, int n, int M, int s = 1>
inline void fold_lanes(typename Vec<T, n>::type* v) {
  if constexpr (s < n) {
    constexpr auto lanes = std::make_index_sequence<n>{};
    if constexpr (M > 1) {
      for (int i = 0; i < M / 2; ++i) {
        auto a = v[2 * i], b = v[2 * i + 1];
        swap_blocks<s>(a, b, lanes);
        v[i] = a + b;
      }
      fold_lanes<T, n, M / 2, 2 * s>(v);
    } else {
      auto a = v[0], b = v[0];
      swap_blocks<s>(a, b, lanes);
      v[0] = a + b;
      fold_lanes<T, n, 1, 2 * s>(v);
    }
  }
}

// body(std::true_type) where p is set, body(std::false_type) where it is null: for loops over
// an optional operand, written `has ? p[j] : 0` inside with `has` the argument. Tested inside
// the loop instead, GCC turns that read into a masked vector load that, for a null p, touches
// the unmapped page at address 0 with every lane masked off, and the CPU resolves each such
// load slowly (on a Zen 4 it was a quarter of the LayerNorm backward's time).
template <typename Body>
inline void with_optional(const void* p, Body&& body) {
  if (p) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

// out[m] = the sum of the lanes of v[m] for m < count <= M, by fold_lanes (v overwritten).
template <typename T, int n, int M>
inline void lane_sums(typename Vec<T, n>::type* v, int count, T* out) {
  fold_lanes<T, n, M>(v);
  for (int m = 0; m < count; ++m) out[m] = M >= n ? v[m / n][m % n] : v[0][m];
}

}  // namespace cpu
}  // namespace lstm_ext
