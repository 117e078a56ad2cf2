// Runs the CUDA kernels' per-thread code (csrc/cuda/step_elements.h) on the CPU, one call per
// (row, hidden unit) in a shuffled order as independent GPU threads may run, and checks:
// forward against an fp64 reference for fp32/fp64/fp16/bf16 storage, with and without the
// optional outputs in each way the step loop calls it (saved gates; the copy of c, the
// recurrent state and the copy of h as it entered, per call mode); backward in fp64
// against central finite differences of that forward, and the other dtypes against the fp64
// instantiation; optional gradient inputs absent or present; nothing written outside the
// step's rows (guard cells around every buffer).
#include "../cuda/step_elements.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

namespace {

using lstm_ext::BackwardStep;
using lstm_ext::ForwardStep;
using lstm_ext::kNumGates;
using lstm_ext::cuda::backward_step_element;
using lstm_ext::cuda::forward_step_element;

int failures = 0;
std::mt19937 rng(1234);

void expect_close(double got, double want, double tolerance, const char* what, int64_t index) {
  if (!(std::abs(got - want) <= tolerance * (1.0 + std::abs(want)))) {
    std::fprintf(stderr, "FAILED: %s at %lld: got %.17g, want %.17g\n", what,
                 static_cast<long long>(index), got, want);
    ++failures;
  }
}

constexpr int64_t kGuard = 8;  // cells before and after every buffer that must stay untouched
constexpr double kSentinel = -12345.0;

// A buffer with guard cells on both sides; data() points past the leading guard.
template <typename T>
struct Guarded {
  std::vector<T> cells;
  explicit Guarded(int64_t size) : cells(size + 2 * kGuard, T(kSentinel)) {}
  T* data() { return cells.data() + kGuard; }
  T& operator[](int64_t i) { return data()[i]; }
  void check_guards(const char* what) {
    for (int64_t i = 0; i < kGuard; ++i) {
      if (static_cast<double>(cells[i]) != static_cast<double>(T(kSentinel)) ||
          static_cast<double>(cells[cells.size() - 1 - i]) != static_cast<double>(T(kSentinel))) {
        std::fprintf(stderr, "FAILED: %s written outside its rows\n", what);
        ++failures;
        return;
      }
    }
  }
};

std::vector<int64_t> shuffled(int64_t count) {
  std::vector<int64_t> order(static_cast<size_t>(count));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  return order;
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Inputs of one step, drawn in fp64 and rounded once to the storage type.
struct StepInputs {
  int64_t rows, hidden;
  std::vector<double> pre;     // (rows, 4H) gate pre-activations
  std::vector<double> c_prev;  // (rows, H)
  std::vector<double> h_prev;  // (rows, H) recurrent state entering the step
  StepInputs(int64_t rows_, int64_t hidden_) : rows(rows_), hidden(hidden_) {
    std::normal_distribution<double> normal(0.0, 2.0);
    std::uniform_real_distribution<double> uniform(-1.0, 1.0);
    pre.resize(rows * kNumGates * hidden);
    c_prev.resize(rows * hidden);
    h_prev.resize(rows * hidden);
    for (double& x : pre) x = normal(rng);
    for (double& x : c_prev) x = normal(rng);
    for (double& x : h_prev) x = uniform(rng);
  }
};

template <typename scalar_t>
struct ForwardResult {
  std::vector<double> activations, cell, cell_prev_saved, hidden, hidden_state, hidden_prev_saved;
};

// The optional outputs as the step loop (lstm_layer.h) sets them in each of the ways it runs:
// training saves a copy of c; without a projection h is also the recurrent state, and training
// then saves h as it entered.
struct CallMode {
  const char* name;
  bool cell_copy, hidden_state, hidden_copy;
};
constexpr CallMode kCallModes[] = {
    {"training", true, true, true},
    {"eval", false, true, false},
    {"training with projection", true, false, false},
    {"eval with projection", false, false, false},
};

// Runs forward_step_element for every index (shuffled). Inputs are rounded to scalar_t (gates)
// and acc_t (cell) first; `rounded` receives those rounded inputs for the reference.
template <typename scalar_t>
ForwardResult<scalar_t> run_forward(const StepInputs& in, bool save_gates, const CallMode& mode,
                                    StepInputs* rounded = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = in.rows * in.hidden;
  Guarded<scalar_t> gates(kNumGates * n), hidden(n), hidden_state(n), hidden_prev_saved(n);
  Guarded<acc_t> cell(n), cell_prev_saved(n);
  for (int64_t i = 0; i < kNumGates * n; ++i) gates[i] = static_cast<scalar_t>(in.pre[i]);
  for (int64_t i = 0; i < n; ++i) {
    cell[i] = static_cast<acc_t>(in.c_prev[i]);
    hidden_state[i] = static_cast<scalar_t>(in.h_prev[i]);
  }
  if (rounded) {
    for (int64_t i = 0; i < kNumGates * n; ++i) rounded->pre[i] = static_cast<double>(gates[i]);
    for (int64_t i = 0; i < n; ++i) {
      rounded->c_prev[i] = static_cast<double>(cell[i]);
      rounded->h_prev[i] = static_cast<double>(hidden_state[i]);
    }
  }
  ForwardStep<scalar_t> step{in.rows,
                             in.hidden,
                             gates.data(),
                             cell.data(),
                             mode.cell_copy ? cell_prev_saved.data() : nullptr,
                             hidden.data(),
                             mode.hidden_state ? hidden_state.data() : nullptr,
                             mode.hidden_copy ? hidden_prev_saved.data() : nullptr,
                             save_gates};
  for (int64_t index : shuffled(n)) forward_step_element(step, index);
  gates.check_guards("gates");
  cell.check_guards("cell");
  hidden.check_guards("hidden_out");
  cell_prev_saved.check_guards("cell_prev_saved");
  hidden_state.check_guards("hidden_state");
  hidden_prev_saved.check_guards("hidden_prev_saved");
  ForwardResult<scalar_t> out;
  for (int64_t i = 0; i < kNumGates * n; ++i) out.activations.push_back(gates[i]);
  for (int64_t i = 0; i < n; ++i) {
    out.cell.push_back(cell[i]);
    out.hidden.push_back(static_cast<double>(hidden[i]));
    out.cell_prev_saved.push_back(cell_prev_saved[i]);
    out.hidden_state.push_back(static_cast<double>(hidden_state[i]));
    out.hidden_prev_saved.push_back(static_cast<double>(hidden_prev_saved[i]));
  }
  return out;
}

template <typename scalar_t>
void check_forward(double tolerance, const char* dtype) {
  for (const bool save_gates : {true, false}) {
    for (const CallMode& mode : kCallModes) {
      const StepInputs drawn(3, 7);
      StepInputs in = drawn;
      const auto out = run_forward<scalar_t>(drawn, save_gates, mode, &in);
      const int64_t H = in.hidden;
      const double hidden_sentinel = static_cast<double>(static_cast<scalar_t>(kSentinel));
      for (int64_t r = 0; r < in.rows; ++r) {
        for (int64_t j = 0; j < H; ++j) {
          const int64_t index = r * H + j;
          const double* p = &in.pre[r * kNumGates * H + j];
          const double act[4] = {sigmoid(p[0]), sigmoid(p[H]), std::tanh(p[2 * H]),
                                 sigmoid(p[3 * H])};
          const double c = act[1] * in.c_prev[index] + act[0] * act[2];
          const double h = act[3] * std::tanh(c);
          expect_close(out.cell[index], c, tolerance, dtype, index);
          expect_close(out.hidden[index], h, tolerance, dtype, index);
          if (save_gates) {
            for (int k = 0; k < 4; ++k) {
              expect_close(out.activations[r * kNumGates * H + k * H + j], act[k], tolerance,
                           "saved activation", index);
            }
          }
          expect_close(out.cell_prev_saved[index], mode.cell_copy ? in.c_prev[index] : kSentinel,
                       0.0, mode.name, index);
          // The recurrent state becomes h' where the kernel has it, and is left alone where not.
          expect_close(out.hidden_state[index],
                       mode.hidden_state ? out.hidden[index] : in.h_prev[index], 0.0, mode.name,
                       index);
          expect_close(out.hidden_prev_saved[index],
                       mode.hidden_copy ? in.h_prev[index] : hidden_sentinel, 0.0, mode.name,
                       index);
        }
      }
    }
  }
}

// Gradients from backward_step_element for the loss sum(w_h * h' + w_c * c'), with w_h split
// between grad_h and grad_h_extra as `parts` says (0: only grad_h, 1: only extra, 2: both).
template <typename scalar_t>
void run_backward(const StepInputs& in, const std::vector<double>& activations,
                  const std::vector<double>& w_h, const std::vector<double>& w_c, int parts,
                  std::vector<double>& grad_pre, std::vector<double>& grad_c_prev) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = in.rows * in.hidden;
  Guarded<scalar_t> gates(kNumGates * n), grad_gates(kNumGates * n), grad_h(n), grad_extra(n);
  Guarded<acc_t> cell_prev(n), grad_cell(n);
  for (int64_t i = 0; i < kNumGates * n; ++i) gates[i] = static_cast<scalar_t>(activations[i]);
  for (int64_t i = 0; i < n; ++i) {
    cell_prev[i] = static_cast<acc_t>(in.c_prev[i]);
    grad_cell[i] = static_cast<acc_t>(w_c[i]);
    grad_h[i] = static_cast<scalar_t>(parts == 2 ? 0.25 * w_h[i] : w_h[i]);
    grad_extra[i] = static_cast<scalar_t>(parts == 2 ? 0.75 * w_h[i] : w_h[i]);
  }
  BackwardStep<scalar_t> step{in.rows, in.hidden, gates.data(), cell_prev.data(),
                              parts == 1 ? nullptr : grad_h.data(),
                              parts == 0 ? nullptr : grad_extra.data(), grad_cell.data(),
                              grad_gates.data()};
  for (int64_t index : shuffled(n)) backward_step_element(step, index);
  grad_gates.check_guards("grad_gates");
  grad_cell.check_guards("grad_cell");
  grad_pre.assign(kNumGates * n, 0.0);
  grad_c_prev.assign(n, 0.0);
  for (int64_t i = 0; i < kNumGates * n; ++i) grad_pre[i] = static_cast<double>(grad_gates[i]);
  for (int64_t i = 0; i < n; ++i) grad_c_prev[i] = grad_cell[i];
}

double loss(const StepInputs& in, const std::vector<double>& w_h,
            const std::vector<double>& w_c) {
  const auto out = run_forward<double>(in, false, kCallModes[3]);
  double total = 0.0;
  for (size_t i = 0; i < w_h.size(); ++i) total += w_h[i] * out.hidden[i] + w_c[i] * out.cell[i];
  return total;
}

void check_backward() {
  const StepInputs in(3, 7);
  const int64_t n = in.rows * in.hidden;
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> w_h(n), w_c(n);
  for (double& x : w_h) x = normal(rng);
  for (double& x : w_c) x = normal(rng);
  const auto forward = run_forward<double>(in, true, kCallModes[0]);

  for (int parts = 0; parts < 3; ++parts) {
    std::vector<double> grad_pre, grad_c_prev;
    run_backward<double>(in, forward.activations, w_h, w_c, parts, grad_pre, grad_c_prev);
    // fp64 against central differences of the forward
    const double eps = 1e-6;
    for (int64_t i = 0; i < kNumGates * n; ++i) {
      StepInputs plus = in, minus = in;
      plus.pre[i] += eps;
      minus.pre[i] -= eps;
      const double numeric = (loss(plus, w_h, w_c) - loss(minus, w_h, w_c)) / (2 * eps);
      expect_close(grad_pre[i], numeric, 1e-7, "d pre-activation (fp64)", i);
    }
    for (int64_t i = 0; i < n; ++i) {
      StepInputs plus = in, minus = in;
      plus.c_prev[i] += eps;
      minus.c_prev[i] -= eps;
      const double numeric = (loss(plus, w_h, w_c) - loss(minus, w_h, w_c)) / (2 * eps);
      expect_close(grad_c_prev[i], numeric, 1e-7, "d c_prev (fp64)", i);
    }
    // the storage types against the fp64 instantiation on the same values
    const auto compare = [&](auto zero, double tolerance, const char* dtype) {
      using scalar_t = decltype(zero);
      std::vector<double> got_pre, got_c;
      run_backward<scalar_t>(in, forward.activations, w_h, w_c, parts, got_pre, got_c);
      for (int64_t i = 0; i < kNumGates * n; ++i)
        expect_close(got_pre[i], grad_pre[i], tolerance, dtype, i);
      for (int64_t i = 0; i < n; ++i) expect_close(got_c[i], grad_c_prev[i], tolerance, dtype, i);
    };
    compare(float(0), 1e-5, "backward fp32");
    compare(at::Half(0), 2e-2, "backward fp16");
    compare(at::BFloat16(0), 5e-2, "backward bf16");
  }
}

}  // namespace

int main() {
  check_forward<double>(1e-14, "forward fp64");
  check_forward<float>(1e-6, "forward fp32");
  check_forward<at::Half>(2e-3, "forward fp16");
  check_forward<at::BFloat16>(1e-2, "forward bf16");
  check_backward();
  if (failures == 0) std::printf("CUDA step elements on the CPU: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
