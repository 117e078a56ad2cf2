// csrc/cpu/cell_math.h's tanh and sigmoid, compiled for each instruction set the kernels are
// compiled for (with each one's FMA contraction and vectorization) that this CPU runs. fp32
// against the fp64 library functions: the floats with 2^-12 <= |x| < 18 (all positive ones), a
// stride through the rest (tiny, denormal and huge values), and 0, +-inf and NaN. fp64 against
// the long double ones: a fine grid over [-40, 40], both sides of the points where tanh's form
// changes, a geometric sweep from 1e-300 to 1e300 of either sign, random bit patterns, and 0,
// +-inf and NaN.
#include "../cpu/cell_math.h"
#include "../cpu/isa.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

// The bounds cell_math.h promises: tanh within 4.5e-7 of its value (under 4 ulp; the FMA builds
// reach 3.3e-7) and never past +-1; sigmoid within 2.5e-7 absolute (its relative accuracy is not
// kept where it falls towards 0) and within [0, 1].
constexpr double kTanhRelative = 4.5e-7;
constexpr double kSigmoidAbsolute = 2.5e-7;
// fp64: tanh within 6e-16 relative (under 3 ulp) and never past +-1; sigmoid within 6e-16
// relative wherever it is above 1e-300 (e^-x's argument is clamped at 709, so below x = -709
// it stays near 1e-308 while the true value falls to 0), and within [0, 1].
constexpr double kDoubleTanhRelative = 6e-16;
constexpr double kDoubleSigmoidRelative = 6e-16;
constexpr long double kDoubleSigmoidFloor = 1e-300L;

template <int variant>
struct Evaluate;
#define CELL_MATH_EVALUATOR(index, target)                                                    \
  template <>                                                                                 \
  struct Evaluate<index> {                                                                    \
    template <typename T>                                                                     \
    target static void run(const T* x, T* t, T* s, int64_t n) {                               \
      using Math = lstm_ext::cpu::CpuMath<T>;                                                 \
      for (int64_t i = 0; i < n; ++i) t[i] = Math::tanh(x[i]);                                \
      for (int64_t i = 0; i < n; ++i) s[i] = lstm_ext::sigmoid<Math>(x[i]);                   \
    }                                                                                         \
  };
CELL_MATH_EVALUATOR(0, LSTM_EXT_TARGET_BASELINE)
#if LSTM_EXT_X86_VARIANTS
CELL_MATH_EVALUATOR(1, LSTM_EXT_TARGET_AVX2)
CELL_MATH_EVALUATOR(2, LSTM_EXT_TARGET_AVX512)
#endif

struct Variant {
  const char* name;
  void (*run)(const float*, float*, float*, int64_t);
  void (*run64)(const double*, double*, double*, int64_t);
  bool supported;
  double tanh_error = 0, sigmoid_error = 0;  // the largest seen: relative, absolute
  double tanh_error64 = 0, sigmoid_error64 = 0;  // fp64, both relative
};

int failures = 0;
int64_t checked = 0;

void fail(const char* variant, const char* what, double x, double got, double want) {
  if (failures++ < 10) {
    std::fprintf(stderr, "FAILED (%s): %s(%.17g) = %.17g, want %.17g\n", variant, what, x, got,
                 want);
  }
}

void check(Variant& v, const std::vector<float>& x) {
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<float> t(n), s(n);
  v.run(x.data(), t.data(), s.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    const double want_t = std::tanh(static_cast<double>(x[i]));
    const double want_s = 1.0 / (1.0 + std::exp(-static_cast<double>(x[i])));
    if (std::isnan(x[i])) {
      if (!std::isnan(t[i])) fail(v.name, "tanh", x[i], t[i], want_t);
      if (!std::isnan(s[i])) fail(v.name, "sigmoid", x[i], s[i], want_s);
      continue;
    }
    if (want_t != 0) {
      v.tanh_error = std::max(v.tanh_error, std::abs(t[i] - want_t) / std::abs(want_t));
    }
    v.sigmoid_error = std::max(v.sigmoid_error, std::abs(s[i] - want_s));
    if (!(std::abs(t[i] - want_t) <= kTanhRelative * std::abs(want_t)) ||
        std::abs(t[i]) > 1.0f) {
      fail(v.name, "tanh", x[i], t[i], want_t);
    }
    if (!(std::abs(s[i] - want_s) <= kSigmoidAbsolute) || s[i] < 0.0f || s[i] > 1.0f) {
      fail(v.name, "sigmoid", x[i], s[i], want_s);
    }
  }
}

void check64(Variant& v, const std::vector<double>& x) {
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<double> t(n), s(n);
  v.run64(x.data(), t.data(), s.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    const long double xl = x[i];
    const long double want_t = std::tanh(xl);
    const long double want_s = 1.0L / (1.0L + std::exp(-xl));
    if (std::isnan(x[i])) {
      if (!std::isnan(t[i])) fail(v.name, "tanh64", x[i], t[i], want_t);
      if (!std::isnan(s[i])) fail(v.name, "sigmoid64", x[i], s[i], want_s);
      continue;
    }
    const double t_error =
        want_t == 0 ? std::abs(t[i]) : std::abs(t[i] - want_t) / std::abs(want_t);
    v.tanh_error64 = std::max(v.tanh_error64, t_error);
    if (!(t_error <= kDoubleTanhRelative) || std::abs(t[i]) > 1.0) {
      fail(v.name, "tanh64", x[i], t[i], want_t);
    }
    const bool tiny = want_s < kDoubleSigmoidFloor;
    const double s_error = tiny ? 0.0 : std::abs(s[i] - want_s) / want_s;
    v.sigmoid_error64 = std::max(v.sigmoid_error64, s_error);
    if (!(s_error <= kDoubleSigmoidRelative) || (tiny && !(s[i] < kDoubleSigmoidFloor)) ||
        s[i] < 0.0 || s[i] > 1.0) {
      fail(v.name, "sigmoid64", x[i], s[i], want_s);
    }
  }
}

std::vector<double> double_inputs() {
  std::vector<double> x;
  for (int64_t i = -400000; i <= 400000; ++i) x.push_back(i * 1e-4);
  // Where the power of two of e^2x leaves 1 (tanh's exact small-value form ends), and where
  // tanh's argument is clamped.
  for (double edge : {0.25 * std::log(2.0), -0.25 * std::log(2.0), 20.0, -20.0}) {
    double below = edge, above = edge;
    for (int i = 0; i < 64; ++i) {
      below = std::nextafter(below, 0.0);
      above = std::nextafter(above, 2 * edge);
      x.push_back(below);
      x.push_back(above);
    }
  }
  for (double m = 1e-300; m < 1e300; m *= 1.01) {
    x.push_back(m);
    x.push_back(-m);
  }
  uint64_t state = 0x9e3779b97f4a7c15ull;  // splitmix64
  for (int i = 0; i < 200000; ++i) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    x.push_back(std::bit_cast<double>(z ^ (z >> 31)));
  }
  for (double special : {0.0, -0.0, double(INFINITY), double(-INFINITY), double(NAN)}) {
    x.push_back(special);
  }
  return x;
}

}  // namespace

int main() {
  std::vector<Variant> variants = {
      {"baseline", &Evaluate<0>::run<float>, &Evaluate<0>::run<double>, true}};
#if LSTM_EXT_X86_VARIANTS
  // The levels the wrappers target, asked as the library asks (cpu/recurrence.cpp).
  __builtin_cpu_init();
  variants.push_back({"avx2", &Evaluate<1>::run<float>, &Evaluate<1>::run<double>,
                      __builtin_cpu_supports("x86-64-v3") != 0});
  variants.push_back({"avx512", &Evaluate<2>::run<float>, &Evaluate<2>::run<double>,
                      __builtin_cpu_supports("x86-64-v4") != 0});
#endif
  const uint32_t dense_low = std::bit_cast<uint32_t>(0x1p-12f);
  const uint32_t dense_high = std::bit_cast<uint32_t>(18.0f);
  // Batches of floats by bit pattern: every positive one between 2^-12 and 18 and every fifth
  // negative one there (the functions are odd about 0 and 1/2 by construction), every 997th
  // pattern elsewhere below infinity; then +-inf and NaN.
  std::vector<float> batch;
  auto flush = [&] {
    for (Variant& v : variants) {
      if (v.supported) check(v, batch);
    }
    checked += static_cast<int64_t>(batch.size());
    batch.clear();
  };
  const uint32_t infinity = std::bit_cast<uint32_t>(INFINITY);
  for (uint32_t bits = 0; bits < infinity;) {
    const bool dense = bits >= dense_low && bits < dense_high;
    batch.push_back(std::bit_cast<float>(bits));
    if (!dense || bits % 5 == 0) batch.push_back(std::bit_cast<float>(bits | 0x80000000u));
    if (batch.size() >= (1u << 20)) flush();
    bits += dense ? 1 : 997;
  }
  batch.push_back(INFINITY);
  batch.push_back(-INFINITY);
  batch.push_back(NAN);
  flush();
  const std::vector<double> doubles = double_inputs();
  for (Variant& v : variants) {
    if (v.supported) check64(v, doubles);
  }
  for (const Variant& v : variants) {
    if (v.supported) {
      std::printf("%s: tanh within %.3g relative, sigmoid within %.3g absolute; fp64: tanh "
                  "within %.3g, sigmoid within %.3g relative\n",
                  v.name, v.tanh_error, v.sigmoid_error, v.tanh_error64, v.sigmoid_error64);
    } else {
      std::printf("%s: not supported by this CPU\n", v.name);
    }
  }
  std::printf("%lld floats and %lld doubles per variant checked, %d failures\n",
              static_cast<long long>(checked), static_cast<long long>(doubles.size()),
              failures);
  return failures == 0 ? 0 : 1;
}
