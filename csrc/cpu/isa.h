// Which x86-64 instruction set the CPU kernels run with, and how a kernel is compiled once per
// instruction set from one source.
//
// A kernel is a function template written with GCC vector types (vec.h); a wrapper per
// instruction set carries a `target` attribute and `flatten`, so the template and everything it
// calls are inlined into the wrapper and compiled for that instruction set, and nothing compiled
// for AVX-512 is ever shared with code that runs on a lesser CPU. The best set the CPU supports
// is picked once; LSTM_EXT_CPU_ISA=amx|avx512_bf16|avx512|avx2|baseline picks a lower one (CI
// runs the tests with each, so that no variant rots on an AVX-512 machine). avx512_bf16 is
// AVX-512 plus the bf16 dot products and VNNI (Zen 4 and later, Cooper Lake and Sapphire Rapids
// and later): bf16 recurrences multiply bf16 pairs there, the int8 ones sum int16 products with
// vpdpwssd; everything else runs as under avx512. amx adds the AMX tiles of Sapphire Rapids and
// later (where Linux grants them): the bf16 fused recurrence multiplies with tile instructions;
// every other kernel runs its avx512_bf16 variant.
#pragma once

namespace lstm_ext {
namespace cpu {

enum class Isa { baseline = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3, amx = 4 };

// The instruction set in use: the best this CPU supports, or LSTM_EXT_CPU_ISA if set. Throws
// (c10::Error, a RuntimeError in Python) for an unknown name or a set this CPU lacks.
Isa active_isa();
const char* isa_name(Isa isa);

// Whether the CPU is Intel's: where a choice measured differently on the two vendors' cores
// (MKL against oneDNN, streaming weight panels from the L3), the choice follows the vendor.
bool intel_cpu();

}  // namespace cpu
}  // namespace lstm_ext

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LSTM_EXT_X86_VARIANTS 1
#define LSTM_EXT_TARGET_AVX512 __attribute__((target("arch=x86-64-v4"), flatten))
#define LSTM_EXT_TARGET_AVX512_BF16 \
  __attribute__((target("arch=x86-64-v4,avx512bf16"), flatten))
#define LSTM_EXT_TARGET_AMX \
  __attribute__((target("arch=x86-64-v4,avx512bf16,amx-tile,amx-bf16"), flatten))
#define LSTM_EXT_TARGET_AVX2 __attribute__((target("arch=x86-64-v3"), flatten))
#else
#define LSTM_EXT_X86_VARIANTS 0
#endif
#define LSTM_EXT_TARGET_BASELINE __attribute__((flatten))

// Defines, for a kernel template `kernel<Isa, T>`, one wrapper per instruction set,
// `template <typename T> void name_<isa> params` calling `kernel<isa, T> args`, and
// `name<T>(isa)`, the wrapper for an instruction set, as a function pointer. Under amx a kernel
// runs its avx512_bf16 wrapper; LSTM_EXT_KERNEL_VARIANTS_AMX also compiles an amx one, for the
// kernels that use the tiles.
#define LSTM_EXT_KERNEL_WRAPPER(name, isa, target, kernel, params, args) \
  template <typename T>                                                  \
  target void name##_##isa params {                                      \
    kernel<::lstm_ext::cpu::Isa::isa, T> args;                           \
  }
#if LSTM_EXT_X86_VARIANTS
#define LSTM_EXT_KERNEL_DISPATCH(name, amx_wrapper)                              \
  template <typename T>                                                          \
  auto name(::lstm_ext::cpu::Isa isa) {                                          \
    switch (isa) {                                                               \
      case ::lstm_ext::cpu::Isa::amx: return &amx_wrapper<T>;                    \
      case ::lstm_ext::cpu::Isa::avx512_bf16: return &name##_avx512_bf16<T>;     \
      case ::lstm_ext::cpu::Isa::avx512: return &name##_avx512<T>;               \
      case ::lstm_ext::cpu::Isa::avx2: return &name##_avx2<T>;                   \
      default: return &name##_baseline<T>;                                       \
    }                                                                            \
  }
#define LSTM_EXT_KERNEL_WRAPPERS(name, kernel, params, args)                                  \
  LSTM_EXT_KERNEL_WRAPPER(name, avx512_bf16, LSTM_EXT_TARGET_AVX512_BF16, kernel, params, args) \
  LSTM_EXT_KERNEL_WRAPPER(name, avx512, LSTM_EXT_TARGET_AVX512, kernel, params, args)           \
  LSTM_EXT_KERNEL_WRAPPER(name, avx2, LSTM_EXT_TARGET_AVX2, kernel, params, args)               \
  LSTM_EXT_KERNEL_WRAPPER(name, baseline, LSTM_EXT_TARGET_BASELINE, kernel, params, args)
#define LSTM_EXT_KERNEL_VARIANTS(name, kernel, params, args) \
  LSTM_EXT_KERNEL_WRAPPERS(name, kernel, params, args)       \
  LSTM_EXT_KERNEL_DISPATCH(name, name##_avx512_bf16)
#define LSTM_EXT_KERNEL_VARIANTS_AMX(name, kernel, params, args)                    \
  LSTM_EXT_KERNEL_WRAPPERS(name, kernel, params, args)                              \
  LSTM_EXT_KERNEL_WRAPPER(name, amx, LSTM_EXT_TARGET_AMX, kernel, params, args)     \
  LSTM_EXT_KERNEL_DISPATCH(name, name##_amx)
#else
#define LSTM_EXT_KERNEL_VARIANTS(name, kernel, params, args)                            \
  LSTM_EXT_KERNEL_WRAPPER(name, baseline, LSTM_EXT_TARGET_BASELINE, kernel, params, args) \
  template <typename T>                                                                \
  auto name(::lstm_ext::cpu::Isa) {                                                    \
    return &name##_baseline<T>;                                                        \
  }
#define LSTM_EXT_KERNEL_VARIANTS_AMX LSTM_EXT_KERNEL_VARIANTS
#endif
