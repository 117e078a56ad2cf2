// CPU implementation of the layer ops: the shared step loop (lstm_layer.h) with fused,
// vectorized elementwise passes parallelised over the active rows.
#include "../lstm_layer.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>

namespace lstm_ext {
namespace {

template <typename acc_t>
struct VecMath {
  using Vec = at::vec::Vectorized<acc_t>;
  static Vec exp(const Vec& x) { return x.exp(); }
  static Vec tanh(const Vec& x) { return x.tanh(); }
  template <typename T>
  static T constant(double value) {
    return T(static_cast<acc_t>(value));
  }
};

// Rows per task so that a task has enough elements to be worth a thread.
int64_t row_grain(int64_t hidden) {
  constexpr int64_t kElementsPerTask = 16384;
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, hidden));
}

// Elements are staged through small acc_t buffers: one code path converts any storage type
// (bf16, fp16, fp32, fp64) to the math type and back.
template <typename acc_t, typename scalar_t>
inline at::vec::Vectorized<acc_t> load(const scalar_t* src, int64_t count) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return Vec::loadu(src, count);
  } else {
    acc_t staged[Vec::size()];
    for (int64_t j = 0; j < count; ++j) staged[j] = static_cast<acc_t>(src[j]);
    return Vec::loadu(staged, count);
  }
}

template <typename acc_t, typename scalar_t>
inline void store(const at::vec::Vectorized<acc_t>& value, scalar_t* dst, int64_t count) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    value.store(dst, count);
  } else {
    acc_t staged[Vec::size()];
    value.store(staged, count);
    for (int64_t j = 0; j < count; ++j) dst[j] = static_cast<scalar_t>(staged[j]);
  }
}

struct CpuKernels {
  template <typename scalar_t>
  static void forward_step(const ForwardStep<scalar_t>& a) {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const int64_t H = a.hidden;
    at::parallel_for(0, a.rows, row_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* gates = a.gates + r * kNumGates * H;
        acc_t* cell = a.cell + r * H;
        for (int64_t j = 0; j < H; j += Vec::size()) {
          const int64_t n = std::min<int64_t>(Vec::size(), H - j);
          const Vec c_prev = Vec::loadu(cell + j, n);
          const CellForward<VecMath<acc_t>, Vec> cf(
              load<acc_t>(gates + j, n), load<acc_t>(gates + H + j, n),
              load<acc_t>(gates + 2 * H + j, n), load<acc_t>(gates + 3 * H + j, n), c_prev);
          if (a.save_gates) {
            store(cf.in, gates + j, n);
            store(cf.forget, gates + H + j, n);
            store(cf.cell, gates + 2 * H + j, n);
            store(cf.out, gates + 3 * H + j, n);
          }
          if (a.cell_prev_saved) c_prev.store(a.cell_prev_saved + r * H + j, n);
          cf.c.store(cell + j, n);
          store(cf.h, a.hidden_out + r * H + j, n);
          if (a.hidden_state) store(cf.h, a.hidden_state + r * H + j, n);
        }
      }
    });
  }

  template <typename scalar_t>
  static void backward_step(const BackwardStep<scalar_t>& a) {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const int64_t H = a.hidden;
    at::parallel_for(0, a.rows, row_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* gates = a.gates + r * kNumGates * H;
        scalar_t* grad_gates = a.grad_gates + r * kNumGates * H;
        acc_t* grad_cell = a.grad_cell + r * H;
        for (int64_t j = 0; j < H; j += Vec::size()) {
          const int64_t n = std::min<int64_t>(Vec::size(), H - j);
          Vec dh(acc_t(0));
          if (a.grad_h) dh = load<acc_t>(a.grad_h + r * H + j, n);
          if (a.grad_h_extra) dh = dh + load<acc_t>(a.grad_h_extra + r * H + j, n);
          const CellBackward<VecMath<acc_t>, Vec> cb(
              load<acc_t>(gates + j, n), load<acc_t>(gates + H + j, n),
              load<acc_t>(gates + 2 * H + j, n), load<acc_t>(gates + 3 * H + j, n),
              Vec::loadu(a.cell_prev + r * H + j, n), dh, Vec::loadu(grad_cell + j, n));
          store(cb.d_in, grad_gates + j, n);
          store(cb.d_forget, grad_gates + H + j, n);
          store(cb.d_cell, grad_gates + 2 * H + j, n);
          store(cb.d_out, grad_gates + 3 * H + j, n);
          cb.dc_prev.store(grad_cell + j, n);
        }
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(lstm_ext, CPU, m) {
  m.impl("lstm_layer_forward", &layer_forward<CpuKernels>);
  m.impl("lstm_layer_backward", &layer_backward<CpuKernels>);
}

}  // namespace lstm_ext
