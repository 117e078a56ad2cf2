// Fixed-width vectors of float or double as GCC vector types. Arithmetic on them compiles to
// whatever the enclosing function's instruction set offers (one zmm register, two ymm or four
// xmm for 64 bytes), which is how one kernel source serves every instruction set (isa.h).
// Loads and stores through them may be unaligned and may alias the element type.
#pragma once

namespace lstm_ext {
namespace cpu {

template <typename T, int lanes>
struct Vec {
  typedef T type __attribute__((vector_size(lanes * sizeof(T)), aligned(sizeof(T)), may_alias));
};

}  // namespace cpu
}  // namespace lstm_ext
