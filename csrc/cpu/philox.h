// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the
// counter-based generator behind torch's CUDA and Inductor random numbers, for many counters
// at once, eight to a vector. Each 32-bit word sits in a 64-bit lane, so that a round is two whole-vector 64-bit
// multiplies (the 32 x 32 -> 64-bit products whose halves Philox takes) and a few shifts and
// xors, in whatever the enclosing function's instruction set offers (vec.h). ATen-free, so that
// csrc/tests can check it word for word against at::Philox4_32.
#pragma once

#include "vec.h"

#include <cstdint>

namespace lstm_ext {
namespace cpu {

using PhiloxLanes = Vec<uint64_t, 8>::type;

// For n vectors of counters: on entry word w of the 128-bit counter in lane l of vector v
// (word 0 the lowest) is x[w][v][l], below 2^32; on exit the generator's four output words for
// it. (k0, k1) is the 64-bit key, low word first. The vectors are independent chains, which
// hide the multiplies' latency from each other.
template <int n>
inline void philox4x32_10(PhiloxLanes (&x)[4][n], uint32_t k0, uint32_t k1) {
  constexpr uint64_t kMul0 = 0xD2511F53, kMul1 = 0xCD9E8D57, kLow = 0xFFFFFFFF;
  constexpr uint32_t kBump0 = 0x9E3779B9, kBump1 = 0xBB67AE85;
  for (int round = 0; round < 10; ++round) {
    for (int v = 0; v < n; ++v) {
      const PhiloxLanes p0 = x[0][v] * kMul0, p1 = x[2][v] * kMul1;
      x[0][v] = (p1 >> 32) ^ x[1][v] ^ uint64_t{k0};
      x[1][v] = p1 & kLow;
      x[2][v] = (p0 >> 32) ^ x[3][v] ^ uint64_t{k1};
      x[3][v] = p0 & kLow;
    }
    k0 += kBump0;
    k1 += kBump1;
  }
}

}  // namespace cpu
}  // namespace lstm_ext
