// Conversions between the storage and math types that compile to vector code in the kernels'
// loops: c10::BFloat16's own fp32 -> bf16 conversion branches on NaN, so loops over it stay
// scalar. Bit-identical to c10's: round to nearest even, NaN to 0x7FC0.
#pragma once

#include <c10/util/BFloat16.h>

#include <bit>
#include <cstdint>
#include <type_traits>

namespace lstm_ext {
namespace cpu {

inline uint16_t bf16_bits(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  // NaN picked by integer masks, not a comparison of floats, which GCC keeps as a branch.
  const uint32_t nan = 0u - static_cast<uint32_t>((bits & 0x7FFFFFFFu) > 0x7F800000u);
  return static_cast<uint16_t>((rounded & ~nan) | (0x7FC0u & nan));
}

inline float bf16_value(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

// static_cast, except that bf16 goes through the functions above.
template <typename to_t, typename from_t>
inline to_t cast(from_t value) {
  if constexpr (std::is_same_v<to_t, c10::BFloat16> && std::is_same_v<from_t, float>) {
    return c10::BFloat16(bf16_bits(value), c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<to_t, float> && std::is_same_v<from_t, c10::BFloat16>) {
    return bf16_value(value.x);
  } else {
    return static_cast<to_t>(value);
  }
}

// to[j] = from[j] converted, for n values: the loops the kernels store and read back their rows
// with, written so that they vectorize (bf16 through its bits, since c10::BFloat16 stores do
// not; runs of 16 with a fixed count, since GCC leaves a short loop of unknown count scalar,
// and a row of 16 values written one by one and then read as one vector stalls the read).
template <typename to_t, typename from_t>
inline void convert_n(const from_t* __restrict__ from, to_t* __restrict__ to, int64_t n) {
  const auto run = [&](int64_t begin, auto count) {
    for (int64_t j = begin; j < begin + count; ++j) {
      if constexpr (std::is_same_v<to_t, c10::BFloat16> && std::is_same_v<from_t, float>) {
        reinterpret_cast<uint16_t*>(to)[j] = bf16_bits(from[j]);
      } else if constexpr (std::is_same_v<to_t, float> &&
                           std::is_same_v<from_t, c10::BFloat16>) {
        to[j] = bf16_value(reinterpret_cast<const uint16_t*>(from)[j]);
      } else {
        to[j] = static_cast<to_t>(from[j]);
      }
    }
  };
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) run(j, std::integral_constant<int64_t, 16>());
  if (j < n) run(j, n - j);
}

// to[j] += from[j] for n values, in runs of 16 as convert_n (a plain loop over a count of 16
// known at compile time is left as 16 scalar adds, whose stores stall the vector read after).
template <typename T>
inline void add_n(const T* __restrict__ from, T* __restrict__ to, int64_t n) {
  const auto run = [&](int64_t begin, auto count) {
    for (int64_t j = begin; j < begin + count; ++j) to[j] += from[j];
  };
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) run(j, std::integral_constant<int64_t, 16>());
  if (j < n) run(j, n - j);
}

}  // namespace cpu
}  // namespace lstm_ext
