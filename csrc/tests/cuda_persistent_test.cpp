// Runs the persistent CUDA recurrence (csrc/cuda/persistent.h) on the CPU: one std::thread per
// GPU thread, a barrier per block for __syncthreads and one across all of them for the grid
// barrier, shared memory filled with NaN bytes. Forward and backward are checked against an
// fp64 LSTM written out here, for fp64, fp32 and bf16 storage, in both directions, with W_hh
// row-major and transposed, inference and training, with several blocks of which the last owns
// fewer units, and chunks that split the depth unevenly. Every output starts as NaN, so an
// element no block writes fails. Also checks the launch plans the GPU would get.
#include "../cuda/persistent.h"

#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

namespace {

using lstm_ext::kNumGates;
using lstm_ext::SequenceBackward;
using lstm_ext::SequenceForward;
using lstm_ext::cuda::PersistentPlan;
using lstm_ext::cuda::plan_persistent;

int failures = 0;
std::mt19937 rng(4321);

void fail(const char* what) {
  std::fprintf(stderr, "FAILED: %s\n", what);
  ++failures;
}

class Barrier {
 public:
  explicit Barrier(int64_t count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      changed_.notify_all();
    } else {
      changed_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  int64_t count_, waiting_ = 0, generation_ = 0;
};

struct CpuSync {
  Barrier* block_barrier;
  Barrier* grid_barrier;
  void threads() { block_barrier->wait(); }
  void grid() { grid_barrier->wait(); }
};

// Runs body(block, thread, smem, sync) as the plan's grid would.
void run_grid(const PersistentPlan& p,
              const std::function<void(int64_t, int64_t, unsigned char*, CpuSync&)>& body) {
  std::vector<std::vector<unsigned char>> smem(p.blocks);
  std::vector<std::unique_ptr<Barrier>> block_barriers;
  for (int64_t b = 0; b < p.blocks; ++b) {
    smem[b].assign(p.smem_bytes + 16, 0xFF);  // NaN in every float type
    block_barriers.push_back(std::make_unique<Barrier>(p.threads));
  }
  Barrier grid_barrier(p.blocks * p.threads);
  std::vector<std::thread> threads;
  for (int64_t b = 0; b < p.blocks; ++b) {
    for (int64_t t = 0; t < p.threads; ++t) {
      threads.emplace_back([&, b, t] {
        CpuSync sync{block_barriers[b].get(), &grid_barrier};
        body(b, t, smem[b].data(), sync);
      });
    }
  }
  for (auto& thread : threads) thread.join();
}

std::vector<double> random_vector(int64_t n, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<T>(v[i]);
  return out;
}

template <typename T>
std::vector<double> widen(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(v[i]);
  return out;
}

template <typename T>
std::vector<T> poisoned(int64_t n) {
  return std::vector<T>(n, static_cast<T>(std::numeric_limits<double>::quiet_NaN()));
}

void expect_close(const std::vector<double>& got, const std::vector<double>& want,
                  double tolerance, const char* what, const char* label) {
  if (got.size() != want.size()) return fail(what);
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(std::abs(got[i] - want[i]) <= tolerance * (1.0 + std::abs(want[i])))) {
      std::fprintf(stderr, "FAILED: %s %s at %zu: got %.10g, want %.10g\n", label, what, i,
                   got[i], want[i]);
      ++failures;
      return;
    }
  }
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

struct Shape {
  int64_t T, B, H, max_blocks, threads, max_chunk;
  bool reverse, transposed_weight;
};

// The fp64 LSTM: forward from the input projection, then backward from its saved activations.
struct Reference {
  std::vector<double> out, h_n, c_n, act, c_prev, h_prev, cells;
  std::vector<double> grad_gates, grad_h0, grad_c0;
};

double weight(const std::vector<double>& w, const Shape& s, int64_t r, int64_t k) {
  return s.transposed_weight ? w[k * kNumGates * s.H + r] : w[r * s.H + k];
}

Reference reference(const Shape& s, const std::vector<double>& gates_in,
                    const std::vector<double>& w, const std::vector<double>& h0,
                    const std::vector<double>& c0, const std::vector<double>& grad_out,
                    const std::vector<double>& grad_h_n, const std::vector<double>& grad_c_n) {
  const int64_t T = s.T, B = s.B, H = s.H, G = kNumGates * H;
  Reference ref;
  ref.out.assign(T * B * H, 0);
  ref.act.assign(T * B * G, 0);
  ref.c_prev.assign(T * B * H, 0);
  ref.h_prev.assign(T * B * H, 0);
  ref.cells.assign(T * B * H, 0);
  std::vector<double> h = h0, c = c0;
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = s.reverse ? T - 1 - step : step;
    std::vector<double> h_next(B * H), c_next(B * H);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < H; ++j) {
        double pre[4];
        for (int64_t g = 0; g < 4; ++g) {
          double sum = gates_in[(t * B + b) * G + g * H + j];
          for (int64_t k = 0; k < H; ++k) sum += h[b * H + k] * weight(w, s, g * H + j, k);
          pre[g] = sum;
        }
        const double i = sigmoid(pre[0]), f = sigmoid(pre[1]), gg = std::tanh(pre[2]),
                     o = sigmoid(pre[3]);
        const int64_t n = t * B + b;
        ref.act[n * G + j] = i;
        ref.act[n * G + H + j] = f;
        ref.act[n * G + 2 * H + j] = gg;
        ref.act[n * G + 3 * H + j] = o;
        ref.c_prev[n * H + j] = c[b * H + j];
        ref.h_prev[n * H + j] = h[b * H + j];
        c_next[b * H + j] = f * c[b * H + j] + i * gg;
        h_next[b * H + j] = o * std::tanh(c_next[b * H + j]);
        ref.out[n * H + j] = h_next[b * H + j];
        ref.cells[n * H + j] = c_next[b * H + j];
      }
    }
    h = h_next;
    c = c_next;
  }
  ref.h_n = h;
  ref.c_n = c;

  ref.grad_gates.assign(T * B * G, 0);
  std::vector<double> dh = grad_h_n, dc = grad_c_n;
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = s.reverse ? step : T - 1 - step;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = t * B + b;
      for (int64_t j = 0; j < H; ++j) {
        const double i = ref.act[n * G + j], f = ref.act[n * G + H + j],
                     gg = ref.act[n * G + 2 * H + j], o = ref.act[n * G + 3 * H + j];
        const double cp = ref.c_prev[n * H + j];
        const double dh_total = (grad_out.empty() ? 0.0 : grad_out[n * H + j]) + dh[b * H + j];
        const double tc = std::tanh(f * cp + i * gg);
        const double dc_total = dc[b * H + j] + dh_total * o * (1 - tc * tc);
        ref.grad_gates[n * G + j] = dc_total * gg * i * (1 - i);
        ref.grad_gates[n * G + H + j] = dc_total * cp * f * (1 - f);
        ref.grad_gates[n * G + 2 * H + j] = dc_total * i * (1 - gg * gg);
        ref.grad_gates[n * G + 3 * H + j] = dh_total * tc * o * (1 - o);
        dc[b * H + j] = dc_total * f;
      }
      for (int64_t k = 0; k < H; ++k) {
        double sum = 0;
        for (int64_t r = 0; r < G; ++r) sum += ref.grad_gates[n * G + r] * weight(w, s, r, k);
        dh[b * H + k] = sum;
      }
    }
  }
  ref.grad_h0 = dh;
  ref.grad_c0 = dc;
  return ref;
}

template <typename scalar_t>
void check_case(const Shape& s, bool training, bool with_grad_output, double tolerance,
                const char* label) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = s.T, B = s.B, H = s.H, G = kNumGates * H, N = T * B;
  // Inputs drawn in fp64 and rounded to the storage type, so the reference sees what the
  // kernel sees.
  const auto round = [](const std::vector<double>& v) { return widen(cast<scalar_t>(v)); };
  const std::vector<double> gates_in = round(random_vector(N * G)),
                            w = round(random_vector(G * H, 1.0 / std::sqrt(double(H)))),
                            h0 = round(random_vector(B * H)), c0 = round(random_vector(B * H));
  const std::vector<double> grad_out =
      with_grad_output ? round(random_vector(N * H)) : std::vector<double>();
  const std::vector<double> grad_h_n = round(random_vector(B * H)),
                            grad_c_n = round(random_vector(B * H));
  const Reference ref = reference(s, gates_in, w, h0, c0, grad_out, grad_h_n, grad_c_n);

  std::vector<int64_t> step_size(T, B), step_offset(T);
  for (int64_t t = 0; t < T; ++t) step_offset[t] = t * B;
  const lstm_ext::SequenceLayout layout{T, B, H, step_size.data(), step_offset.data(),
                                        s.reverse};
  const std::vector<scalar_t> w_s = cast<scalar_t>(w);

  // Forward.
  std::vector<scalar_t> gates = cast<scalar_t>(gates_in);
  std::vector<acc_t> cell = cast<acc_t>(c0);
  std::vector<scalar_t> hidden = cast<scalar_t>(h0);
  auto output = poisoned<scalar_t>(N * H), hidden_prev = poisoned<scalar_t>(N * H),
       cells = poisoned<scalar_t>(N * H);
  auto cell_prev = poisoned<acc_t>(N * H);
  SequenceForward<scalar_t> f{};
  static_cast<lstm_ext::SequenceLayout&>(f) = layout;
  f.gates = gates.data();
  f.cell = cell.data();
  f.hidden_state = hidden.data();
  f.output = output.data();
  f.cell_prev_saved = training ? cell_prev.data() : nullptr;
  f.hidden_prev_saved = training ? hidden_prev.data() : nullptr;
  f.save_gates = training;
  f.cells = training ? cells.data() : nullptr;
  f.w_hh = w_s.data();
  f.w_stride0 = s.transposed_weight ? 1 : H;
  f.w_stride1 = s.transposed_weight ? G : 1;
  const PersistentPlan pf = plan_persistent(false, H, B, s.max_blocks, s.threads, 1 << 20,
                                            sizeof(scalar_t), sizeof(acc_t), s.max_chunk);
  if (!pf.fits) fail("forward plan fits");
  run_grid(pf, [&](int64_t block, int64_t thread, unsigned char* smem, CpuSync& sync) {
    lstm_ext::cuda::persistent_forward_body(f, pf, block, thread, smem, sync);
  });
  expect_close(widen(output), ref.out, tolerance, "output", label);
  expect_close(widen(hidden), ref.h_n, tolerance, "h_n", label);
  expect_close(widen(cell), ref.c_n, tolerance, "c_n", label);
  if (training) {
    expect_close(widen(gates), ref.act, tolerance, "saved gate activations", label);
    expect_close(widen(cell_prev), ref.c_prev, tolerance, "saved c", label);
    expect_close(widen(hidden_prev), ref.h_prev, tolerance, "saved h", label);
    expect_close(widen(cells), ref.cells, tolerance, "cells", label);
  }
  if (!training) return;

  // Backward, from the reference's saved activations (rounded as forward would store them).
  const std::vector<scalar_t> act = cast<scalar_t>(ref.act);
  const std::vector<acc_t> saved_c = cast<acc_t>(ref.c_prev);
  const std::vector<scalar_t> grad_out_s = cast<scalar_t>(grad_out);
  std::vector<scalar_t> grad_hidden = cast<scalar_t>(grad_h_n);
  std::vector<acc_t> grad_cell = cast<acc_t>(grad_c_n);
  auto grad_gates = poisoned<scalar_t>(N * G), grad_gates_t = poisoned<scalar_t>(N * G);
  SequenceBackward<scalar_t> bw{};
  static_cast<lstm_ext::SequenceLayout&>(bw) = layout;
  bw.gates = act.data();
  bw.cell_prev = saved_c.data();
  bw.grad_output = with_grad_output ? grad_out_s.data() : nullptr;
  bw.grad_hidden = grad_hidden.data();
  bw.grad_cell = grad_cell.data();
  bw.grad_gates = grad_gates.data();
  bw.grad_gates_t = grad_gates_t.data();
  bw.rows = N;
  bw.w_hh = w_s.data();
  bw.w_stride0 = f.w_stride0;
  bw.w_stride1 = f.w_stride1;
  const PersistentPlan pb = plan_persistent(true, H, B, s.max_blocks, s.threads, 1 << 20,
                                            sizeof(scalar_t), sizeof(acc_t), s.max_chunk);
  if (!pb.fits) fail("backward plan fits");
  run_grid(pb, [&](int64_t block, int64_t thread, unsigned char* smem, CpuSync& sync) {
    lstm_ext::cuda::persistent_backward_body(bw, pb, block, thread, smem, sync);
  });
  std::vector<double> transposed(N * G);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t r = 0; r < G; ++r) transposed[r * N + n] = ref.grad_gates[n * G + r];
  }
  expect_close(widen(grad_gates), ref.grad_gates, tolerance, "grad_gates", label);
  expect_close(widen(grad_gates_t), transposed, tolerance, "grad_gates_t", label);
  expect_close(widen(grad_hidden), ref.grad_h0, tolerance, "grad_h0", label);
  expect_close(widen(grad_cell), ref.grad_c0, tolerance, "grad_c0", label);
}

void check_plans() {
  // The H200's numbers: 132 multiprocessors, 227 KB of shared memory per block.
  for (int64_t H : {1, 7, 256, 512, 650, 1024}) {
    for (int64_t B : {1, 5, 16, 64}) {
      for (bool backward : {false, true}) {
        for (int64_t bytes : {2, 4}) {
          const PersistentPlan p =
              plan_persistent(backward, H, B, 132, 256, 232448, bytes, bytes == 8 ? 8 : 4);
          const bool ok = p.blocks <= 132 && p.blocks * p.units >= H &&
                          (p.blocks - 1) * p.units < H && p.k_groups >= 1 &&
                          p.k_groups <= p.chunk && p.chunk <= p.depth &&
                          p.x_offset >= p.rows * p.ld_w * bytes &&
                          p.partial_offset >= p.x_offset + B * p.ld_x * 4 &&
                          p.inputs_offset >= p.partial_offset + p.k_groups * p.rows * B * 4 &&
                          p.smem_bytes >= p.inputs_offset + (backward ? 0 : p.rows * B * 4) &&
                          p.x_offset % 16 == 0 && p.partial_offset % 16 == 0 &&
                          p.inputs_offset % 16 == 0;
          if (!ok) fail("a plan's regions or units");
          // Up to H 1024 at B 64 everything fits the H200 in fp32.
          if (H <= 1024 && !p.fits) {
            std::fprintf(stderr, "H %lld B %lld backward %d bytes %lld: %lld bytes\n",
                         static_cast<long long>(H), static_cast<long long>(B), backward,
                         static_cast<long long>(bytes), static_cast<long long>(p.smem_bytes));
            fail("an H200 plan does not fit");
          }
        }
      }
    }
  }
}

}  // namespace

int main() {
  check_plans();
  const Shape shapes[] = {
      // four blocks of 3, 3, 3 and 2 units; chunks of 4 over depths 11 and 44
      {4, 5, 11, 4, 32, 4, false, false},
      {3, 5, 11, 4, 32, 4, true, true},
      // one unit per block, batch 1
      {3, 1, 7, 7, 16, 256, false, true},
      // more tiles than threads: items loop
      {2, 9, 16, 3, 8, 256, true, false},
  };
  for (const Shape& s : shapes) {
    for (bool training : {false, true}) {
      check_case<double>(s, training, true, 1e-12, "fp64");
      check_case<float>(s, training, training, 2e-5, "fp32");
      check_case<at::BFloat16>(s, training, true, 6e-2, "bf16");
    }
  }
  if (failures == 0) std::printf("cuda persistent recurrence on the CPU: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
