// cpu::bernoulli_mask and cpu::drop_connect (random_mask.h): Philox over blocks of entries, once
// per instruction set.
#include "random_mask.h"

#include "isa.h"
#include "philox.h"
#include "workspace.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <bit>
#include <cstring>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>

namespace lstm_ext {
namespace cpu {
namespace {

// Entries are taken in chunks of kChunk: chunk c runs the generator on the counters
// c * kCounters + i (the high two words 0), i < kCounters, and its entry w * kCounters + i is
// output word w of counter i.
constexpr int kVectors = 4;
constexpr int kCounters = kVectors * 8;
constexpr int64_t kChunk = 4 * kCounters;
// Tasks of 16K entries: each about 10 us of generator work (drop_connect's memory-bound
// backward takes the same).
constexpr int64_t kGrainChunks = 16384 / kChunk;

int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// The generator's words for chunk c: x[w][v][l] is word w of counter c * kCounters + v * 8 + l.
inline void draw_chunk(int64_t c, uint32_t key0, uint32_t key1,
                       PhiloxLanes (&x)[4][kVectors]) {
  for (int v = 0; v < kVectors; ++v) {
    const PhiloxLanes counter =
        static_cast<uint64_t>(c * kCounters + v * 8) + PhiloxLanes{0, 1, 2, 3, 4, 5, 6, 7};
    x[0][v] = counter & 0xFFFFFFFF;
    x[1][v] = counter >> 32;
    x[2][v] = x[3][v] = PhiloxLanes{};
  }
  philox4x32_10(x, key0, key1);
}

// Eight entries of T, and their bits (a kept entry's factor selected by an all-ones lane).
template <typename T>
using Lanes = typename Vec<T, 8>::type;
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
template <typename T>
using BitLanes = typename Vec<Bits<T>, 8>::type;

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
  const Bits<T> value = std::bit_cast<Bits<T>>(a.value);
  for (int64_t c = begin; c < end; ++c) {
    PhiloxLanes x[4][kVectors];
    draw_chunk(c, a.key0, a.key1, x);
    T* out = a.out + c * kChunk;
    if ((c + 1) * kChunk <= a.numel) {
      for (int w = 0; w < 4; ++w) {
        for (int v = 0; v < kVectors; ++v) {
          const BitLanes<T> kept =
              __builtin_convertvector(x[w][v] < a.threshold, BitLanes<T>) & value;
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

// drop_connect's kept bits: chunk c's are 8 16-bit words, one per lane l of the generator's
// vectors, whose bit w * kVectors + v says whether entry w * kCounters + v * 8 + l is kept (a
// layout the vectors write with one and-or each, rather than one bit per entry in order).
using KeptWord = uint16_t;
constexpr int64_t kKeptWords = 8;

int64_t kept_bytes(int64_t numel) {
  return chunks_of(numel) * kKeptWords * int64_t{sizeof(KeptWord)};
}

template <typename T>
struct DropConnectArgs {
  const T* in;    // the weight, or (backward) the gradient
  T* out;
  KeptWord* kept;  // written by the forward, read by the backward
  int64_t numel;
  uint64_t threshold;  // forward: an entry is kept where its word is below this
  T value;             // a kept entry's factor, 1 / (1 - p)
  uint32_t key0, key1;
};

template <Isa isa, typename T>
inline void drop_chunks(const DropConnectArgs<T>& a, int64_t begin, int64_t end) {
  const Bits<T> value = std::bit_cast<Bits<T>>(a.value);
  for (int64_t c = begin; c < end; ++c) {
    PhiloxLanes x[4][kVectors];
    draw_chunk(c, a.key0, a.key1, x);
    const T* in = a.in + c * kChunk;
    T* out = a.out + c * kChunk;
    if ((c + 1) * kChunk <= a.numel) {
      PhiloxLanes bits = {};
      for (int w = 0; w < 4; ++w) {
        for (int v = 0; v < kVectors; ++v) {
          const auto kept = reinterpret_cast<PhiloxLanes>(x[w][v] < a.threshold);
          bits |= kept & (uint64_t{1} << (w * kVectors + v));
          // The mask's value or +0 times the weight, as weight * mask would give (inf * 0 is
          // NaN there too).
          const BitLanes<T> factor = __builtin_convertvector(kept, BitLanes<T>) & value;
          Lanes<T> entries;
          std::memcpy(&entries, in + w * kCounters + v * 8, sizeof entries);
          entries *= reinterpret_cast<const Lanes<T>&>(factor);
          std::memcpy(out + w * kCounters + v * 8, &entries, sizeof entries);
        }
      }
      const auto words = __builtin_convertvector(bits, typename Vec<KeptWord, 8>::type);
      std::memcpy(a.kept + c * kKeptWords, &words, sizeof words);
    } else {
      KeptWord words[kKeptWords] = {};
      for (int64_t e = 0; e < a.numel - c * kChunk; ++e) {
        const int w = static_cast<int>(e / kCounters), i = static_cast<int>(e % kCounters);
        const bool kept = x[w][i / 8][i % 8] < a.threshold;
        words[i % 8] |= static_cast<KeptWord>(kept) << (w * kVectors + i / 8);
        out[e] = in[e] * (kept ? a.value : T(0));
      }
      std::memcpy(a.kept + c * kKeptWords, words, sizeof words);
    }
  }
}

template <Isa isa, typename T>
inline void undrop_chunks(const DropConnectArgs<T>& a, int64_t begin, int64_t end) {
  const Bits<T> value = std::bit_cast<Bits<T>>(a.value);
  for (int64_t c = begin; c < end; ++c) {
    const T* in = a.in + c * kChunk;
    T* out = a.out + c * kChunk;
    const KeptWord* kept = a.kept + c * kKeptWords;
    if ((c + 1) * kChunk <= a.numel) {
      typename Vec<KeptWord, 8>::type words;
      std::memcpy(&words, kept, sizeof words);
      const auto bits = __builtin_convertvector(words, BitLanes<T>);
      for (int w = 0; w < 4; ++w) {
        for (int v = 0; v < kVectors; ++v) {
          // 0 - bit: all ones where the entry is kept.
          const BitLanes<T> factor =
              (BitLanes<T>{} - ((bits >> (w * kVectors + v)) & 1)) & value;
          Lanes<T> entries;
          std::memcpy(&entries, in + w * kCounters + v * 8, sizeof entries);
          entries *= reinterpret_cast<const Lanes<T>&>(factor);
          std::memcpy(out + w * kCounters + v * 8, &entries, sizeof entries);
        }
      }
    } else {
      for (int64_t e = 0; e < a.numel - c * kChunk; ++e) {
        const int w = static_cast<int>(e / kCounters), i = static_cast<int>(e % kCounters);
        const bool on = (kept[i % 8] >> (w * kVectors + i / 8)) & 1;
        out[e] = in[e] * (on ? a.value : T(0));
      }
    }
  }
}

LSTM_EXT_KERNEL_VARIANTS(drop_kernel, drop_chunks,
                         (const DropConnectArgs<T>& a, int64_t begin, int64_t end),
                         (a, begin, end))
LSTM_EXT_KERNEL_VARIANTS(undrop_kernel, undrop_chunks,
                         (const DropConnectArgs<T>& a, int64_t begin, int64_t end),
                         (a, begin, end))

// One 64-bit seed from torch's default CPU generator, which keys a call's Philox counters.
uint64_t draw_seed() {
  auto* generator = at::get_generator_or_default<at::CPUGeneratorImpl>(
      std::nullopt, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(generator->mutex_);
  return generator->random64();
}

// P(word < threshold) = threshold / 2^32 for the 32-bit words, with threshold = floor(p 2^32).
uint64_t threshold_of(double probability) {
  return static_cast<uint64_t>(probability * 4294967296.0);
}

}  // namespace

at::Tensor bernoulli_mask(at::IntArrayRef size, double probability, double value,
                          at::ScalarType dtype) {
  TORCH_CHECK(probability >= 0 && probability <= 1,
              "bernoulli_mask: probability must be between 0 and 1, got ", probability);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "bernoulli_mask: dtype must be float32 or float64, got ", dtype);
  at::Tensor out = at::empty(size, at::TensorOptions().dtype(dtype));
  const uint64_t seed = draw_seed();
  const uint64_t threshold = threshold_of(probability);
  AT_DISPATCH_FLOATING_TYPES(dtype, "bernoulli_mask", [&] {
    const MaskFill<scalar_t> a{out.data_ptr<scalar_t>(), out.numel(), threshold,
                               static_cast<scalar_t>(value), static_cast<uint32_t>(seed),
                               static_cast<uint32_t>(seed >> 32)};
    const auto fill = fill_kernel<scalar_t>(active_isa());
    at::parallel_for(0, chunks_of(a.numel), kGrainChunks,
                     [&](int64_t begin, int64_t end) { fill(a, begin, end); });
  });
  return out;
}

namespace {

void check_drop_connect(const char* name, const at::Tensor& tensor, double p) {
  TORCH_CHECK(p >= 0 && p < 1, name, ": p must be at least 0 and below 1, got ", p);
  TORCH_CHECK(tensor.device().is_cpu() && tensor.layout() == at::kStrided,
              name, ": expected a dense CPU tensor, got one on ", tensor.device());
  TORCH_CHECK(tensor.scalar_type() == at::kFloat || tensor.scalar_type() == at::kDouble,
              name, ": expected a float32 or float64 tensor, got ", tensor.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> drop_connect(const at::Tensor& weight, double p) {
  check_drop_connect("drop_connect", weight, p);
  const at::Tensor in = weight.contiguous();
  at::Tensor out = saved_buffer(Saved::drop_connect_output, in.sizes(), in.options());
  at::Tensor kept = saved_buffer(Saved::drop_connect_kept,
                                 {kept_bytes(in.numel())},
                                 in.options().dtype(at::kByte));
  const uint64_t seed = draw_seed();
  // As bernoulli_mask(size, 1 - p, 1 / (1 - p), dtype) draws: the same mask for the same seed.
  const double keep = 1 - p;
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "drop_connect", [&] {
    const DropConnectArgs<scalar_t> a{
        in.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        reinterpret_cast<KeptWord*>(kept.data_ptr<uint8_t>()), in.numel(), threshold_of(keep),
        static_cast<scalar_t>(1 / keep), static_cast<uint32_t>(seed),
        static_cast<uint32_t>(seed >> 32)};
    const auto run = drop_kernel<scalar_t>(active_isa());
    at::parallel_for(0, chunks_of(a.numel), kGrainChunks,
                     [&](int64_t begin, int64_t end) { run(a, begin, end); });
  });
  return {out, kept};
}

at::Tensor drop_connect_backward(const at::Tensor& grad, const at::Tensor& kept, double p) {
  check_drop_connect("drop_connect_backward", grad, p);
  const int64_t bytes = kept_bytes(grad.numel());
  TORCH_CHECK(kept.scalar_type() == at::kByte && kept.is_contiguous() && kept.device().is_cpu() &&
                  kept.numel() == bytes,
              "drop_connect_backward: expected kept as drop_connect returned it for a weight of ",
              grad.numel(), " entries (", bytes, " bytes), got ", kept.numel(), " of ",
              kept.scalar_type());
  const at::Tensor in = grad.contiguous();
  at::Tensor out = saved_buffer(Saved::drop_connect_grad, in.sizes(), in.options());
  const double keep = 1 - p;
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "drop_connect_backward", [&] {
    const DropConnectArgs<scalar_t> a{
        in.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        const_cast<KeptWord*>(reinterpret_cast<const KeptWord*>(kept.data_ptr<uint8_t>())),
        in.numel(), 0, static_cast<scalar_t>(1 / keep), 0, 0};
    const auto run = undrop_kernel<scalar_t>(active_isa());
    at::parallel_for(0, chunks_of(a.numel), kGrainChunks,
                     [&](int64_t begin, int64_t end) { run(a, begin, end); });
  });
  return out;
}

}  // namespace cpu
}  // namespace lstm_ext
