// cpu::bernoulli_mask (random_mask.h): Philox over blocks of entries, once per instruction set.
#include "random_mask.h"

#include "isa.h"
#include "philox.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <bit>
#include <cstring>
#include <mutex>
#include <type_traits>

namespace lstm_ext {
namespace cpu {
namespace {

// Entries are taken in chunks of kChunk: chunk c runs the generator on the counters
// c * kCounters + i (the high two words 0), i < kCounters, and its entry w * kCounters + i is
// output word w of counter i.
constexpr int kVectors = 4;
constexpr int kCounters = kVectors * 8;
constexpr int64_t kChunk = 4 * kCounters;

template <typename T>
struct MaskFill {
  T* out;
  int64_t numel;
  uint64_t threshold;  // an entry is `value` where its word is below this
  T value;
  uint32_t key0, key1;
};

template <Isa isa, typename T>
inline void fill_chunks(const MaskFill<T>& a, int64_t begin, int64_t end) {
  // Branch-free: the comparison's all-ones lanes select value's bits.
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  using BitLanes = typename Vec<Bits, 8>::type;
  const Bits value = std::bit_cast<Bits>(a.value);
  for (int64_t c = begin; c < end; ++c) {
    PhiloxLanes x[4][kVectors] = {};
    for (int v = 0; v < kVectors; ++v) {
      const PhiloxLanes counter =
          static_cast<uint64_t>(c * kCounters + v * 8) + PhiloxLanes{0, 1, 2, 3, 4, 5, 6, 7};
      x[0][v] = counter & 0xFFFFFFFF;
      x[1][v] = counter >> 32;
    }
    philox4x32_10(x, a.key0, a.key1);
    T* out = a.out + c * kChunk;
    if ((c + 1) * kChunk <= a.numel) {
      for (int w = 0; w < 4; ++w) {
        for (int v = 0; v < kVectors; ++v) {
          const BitLanes kept =
              __builtin_convertvector(x[w][v] < a.threshold, BitLanes) & value;
          std::memcpy(out + w * kCounters + v * 8, &kept, sizeof kept);
        }
      }
    } else {
      for (int64_t e = 0; e < a.numel - c * kChunk; ++e) {
        const int w = static_cast<int>(e / kCounters), i = static_cast<int>(e % kCounters);
        out[e] = x[w][i / 8][i % 8] < a.threshold ? a.value : T(0);
      }
    }
  }
}

LSTM_EXT_KERNEL_VARIANTS(fill_kernel, fill_chunks,
                         (const MaskFill<T>& a, int64_t begin, int64_t end), (a, begin, end))

}  // namespace

at::Tensor bernoulli_mask(at::IntArrayRef size, double probability, double value,
                          at::ScalarType dtype) {
  TORCH_CHECK(probability >= 0 && probability <= 1,
              "bernoulli_mask: probability must be between 0 and 1, got ", probability);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "bernoulli_mask: dtype must be float32 or float64, got ", dtype);
  at::Tensor out = at::empty(size, at::TensorOptions().dtype(dtype));
  uint64_t seed;
  {
    auto* generator = at::get_generator_or_default<at::CPUGeneratorImpl>(
        std::nullopt, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(generator->mutex_);
    seed = generator->random64();
  }
  // P(word < threshold) = threshold / 2^32 for the 32-bit words, with threshold = floor(p 2^32).
  const auto threshold = static_cast<uint64_t>(probability * 4294967296.0);
  AT_DISPATCH_FLOATING_TYPES(dtype, "bernoulli_mask", [&] {
    const MaskFill<scalar_t> a{out.data_ptr<scalar_t>(), out.numel(), threshold,
                               static_cast<scalar_t>(value), static_cast<uint32_t>(seed),
                               static_cast<uint32_t>(seed >> 32)};
    const auto fill = fill_kernel<scalar_t>(active_isa());
    // Tasks of 16K entries: each about 10 us of generator work.
    at::parallel_for(0, (a.numel + kChunk - 1) / kChunk, 16384 / kChunk,
                     [&](int64_t begin, int64_t end) { fill(a, begin, end); });
  });
  return out;
}

}  // namespace cpu
}  // namespace lstm_ext
