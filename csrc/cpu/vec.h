// Fixed-width vectors of float or double as GCC vector types. Arithmetic on them compiles to
// whatever the enclosing function's instruction set offers (one zmm register, two ymm or four
// xmm for 64 bytes), which is how one kernel source serves every instruction set (isa.h).
// Loads and stores through them may be unaligned and may alias the element type.
#pragma once

#include <cstddef>
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

}  // namespace cpu
}  // namespace lstm_ext
