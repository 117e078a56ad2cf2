// csrc/cpu/convert.h's bf16 conversions against c10::BFloat16's own, bit for bit: every
// finite, infinite and NaN class of fp32 (a stride through all 2^32 bit patterns plus the
// edges of each class and every rounding tie pattern of the low half).
#include "../cpu/convert.h"

#include <c10/util/BFloat16.h>

#include <bit>
#include <cstdint>
#include <cstdio>

namespace {

int failures = 0;

void check(uint32_t bits) {
  const float value = std::bit_cast<float>(bits);
  const uint16_t expected = c10::BFloat16(value).x;
  const uint16_t actual = lstm_ext::cpu::bf16_bits(value);
  if (actual != expected && failures++ < 10) {
    std::fprintf(stderr, "FAILED: fp32 0x%08x -> bf16 0x%04x, c10 gives 0x%04x\n", bits, actual,
                 expected);
  }
  const float back = lstm_ext::cpu::bf16_value(expected);
  const float c10_back = static_cast<float>(c10::BFloat16(expected, c10::BFloat16::from_bits()));
  if (std::bit_cast<uint32_t>(back) != std::bit_cast<uint32_t>(c10_back) && failures++ < 10) {
    std::fprintf(stderr, "FAILED: bf16 0x%04x -> fp32 differs from c10\n", expected);
  }
}

}  // namespace

int main() {
  for (uint64_t bits = 0; bits <= 0xFFFFFFFFull; bits += 257) check(static_cast<uint32_t>(bits));
  for (uint32_t high : {0x0000u, 0x0001u, 0x3F80u, 0x7F7Fu, 0x7F80u, 0x7FC0u, 0x8000u, 0xFF80u,
                        0xFFFFu}) {
    for (uint32_t low : {0x0000u, 0x0001u, 0x7FFFu, 0x8000u, 0x8001u, 0xFFFFu}) {
      check(high << 16 | low);
    }
  }
  if (failures) {
    std::fprintf(stderr, "%d conversions differ from c10\n", failures);
    return 1;
  }
  std::printf("bf16 conversions match c10\n");
  return 0;
}
