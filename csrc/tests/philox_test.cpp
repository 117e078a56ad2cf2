// csrc/cpu/philox.h's vectorized Philox4x32-10 against ATen's at::Philox4_32, word for word,
// compiled for each instruction set the kernels are compiled for that this CPU runs: keys and
// counters drawn at random (all four counter words, the edges 0 and 2^32 - 1 among them).
#include "../cpu/isa.h"
#include "../cpu/philox.h"

#include <ATen/core/PhiloxRNGEngine.h>

#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using lstm_ext::cpu::PhiloxLanes;
constexpr int kVectors = 3;  // more than one chain, as the mask kernel runs
constexpr int kCounters = kVectors * 8;

// counters[i] holds counter i's four words; outputs[i] gets its four output words.
template <int variant>
struct Generate;
#define PHILOX_GENERATOR(index, target)                                                       \
  template <>                                                                                 \
  struct Generate<index> {                                                                    \
    target static void run(const uint32_t (*counters)[4], uint32_t key0, uint32_t key1,       \
                           uint32_t (*outputs)[4]) {                                          \
      PhiloxLanes x[4][kVectors];                                                             \
      for (int w = 0; w < 4; ++w) {                                                           \
        for (int i = 0; i < kCounters; ++i) x[w][i / 8][i % 8] = counters[i][w];              \
      }                                                                                       \
      lstm_ext::cpu::philox4x32_10(x, key0, key1);                                            \
      for (int w = 0; w < 4; ++w) {                                                           \
        for (int i = 0; i < kCounters; ++i) {                                                 \
          outputs[i][w] = static_cast<uint32_t>(x[w][i / 8][i % 8]);                          \
        }                                                                                     \
      }                                                                                       \
    }                                                                                         \
  };
PHILOX_GENERATOR(0, LSTM_EXT_TARGET_BASELINE)
#if LSTM_EXT_X86_VARIANTS
PHILOX_GENERATOR(1, LSTM_EXT_TARGET_AVX2)
PHILOX_GENERATOR(2, LSTM_EXT_TARGET_AVX512)
#endif

struct Variant {
  const char* name;
  void (*run)(const uint32_t (*)[4], uint32_t, uint32_t, uint32_t (*)[4]);
  bool supported;
};

}  // namespace

int main() {
  std::vector<Variant> variants = {{"baseline", &Generate<0>::run, true}};
#if LSTM_EXT_X86_VARIANTS
  __builtin_cpu_init();
  variants.push_back({"avx2", &Generate<1>::run, __builtin_cpu_supports("x86-64-v3") != 0});
  variants.push_back({"avx512", &Generate<2>::run, __builtin_cpu_supports("x86-64-v4") != 0});
#endif
  std::mt19937_64 draw(20261201);
  const uint32_t edges[] = {0u, 1u, 0x7FFFFFFFu, 0x80000000u, 0xFFFFFFFFu};
  int failures = 0, checked = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    const uint64_t seed = trial < 5 ? edges[trial] * 0x100000001ull : draw();
    uint32_t counters[kCounters][4], outputs[kCounters][4];
    for (int i = 0; i < kCounters; ++i) {
      for (int w = 0; w < 4; ++w) {
        counters[i][w] = (draw() % 4 == 0) ? edges[draw() % 5] : static_cast<uint32_t>(draw());
      }
    }
    for (const Variant& v : variants) {
      if (!v.supported) continue;
      v.run(counters, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), outputs);
      for (int i = 0; i < kCounters; ++i) {
        // ATen's engine takes the counter's low 64 bits as the offset (in blocks of four
        // words) and the high 64 bits as the subsequence, then yields the four words in order.
        const uint64_t low = counters[i][0] | uint64_t{counters[i][1]} << 32;
        const uint64_t high = counters[i][2] | uint64_t{counters[i][3]} << 32;
        at::Philox4_32 reference(seed, high, low);
        for (int w = 0; w < 4; ++w) {
          const uint32_t want = reference();
          ++checked;
          if (outputs[i][w] != want && failures++ < 10) {
            std::fprintf(stderr,
                         "FAILED (%s): key %016llx counter %08x %08x %08x %08x word %d: "
                         "%08x, ATen gives %08x\n",
                         v.name, static_cast<unsigned long long>(seed), counters[i][0],
                         counters[i][1], counters[i][2], counters[i][3], w, outputs[i][w],
                         want);
          }
        }
      }
    }
  }
  for (const Variant& v : variants) {
    std::printf("%s: %s\n", v.name, v.supported ? "checked" : "not supported by this CPU");
  }
  if (failures) {
    std::fprintf(stderr, "%d of %d words differ from at::Philox4_32\n", failures, checked);
    return 1;
  }
  std::printf("%d words match at::Philox4_32\n", checked);
  return 0;
}
