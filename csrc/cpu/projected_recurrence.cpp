// The fused CPU recurrence of a layer-direction with a projection (proj_size > 0): the whole
// time loop in one parallel region, as recurrence.h does without one, in two phases per step
// with a barrier after each, because the cell update and the projection split the work
// differently:
//
//   forward:  (a) each thread's blocks of V hidden units, all four gates of each: r_prev times
//             the unit block's forward panel of W_hh (P rows of 4V), then the cell update; h
//             before the projection goes to hidden_raw;
//             (b) each thread's blocks of U = 4V projected units: h times the block's (H, U)
//             panel of W_hr^T gives r, the step's output and the next step's state;
//   backward: (1) each thread's blocks of U projected units: the step after's gate gradients
//             times the block's (4H, U) panel of W_hh, plus the output's gradient, give dr;
//             (2) each thread's blocks of U hidden units: dr times the block's (P, U) panel of
//             W_hr gives dh, and the cell's gradients follow as in recurrence.h.
//
// Recurrent dropout multiplies the state entering each step (a masked copy of it, made as it is
// stored, is what W_hh multiplies); zoneout mixes c in the cell update and the projected state
// after the projection, as the step loop of lstm_layer.h does. fp32 and fp64 only (the storage
// type is the math type, so a step's rows are read where the step before stored them);
// run_forward and run_backward send bf16 and fp16 to the step loop.
#include "recurrence.h"

#include "workspace.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace lstm_ext {
namespace cpu {
namespace {

template <Isa isa, typename scalar_t>
void projected_forward_thread(const SequenceForward<scalar_t>& a, int thread, int threads) {
  static_assert(std::is_same_v<scalar_t, at::opmath_type<scalar_t>>, "fp32 and fp64 only");
  using acc_t = scalar_t;
  constexpr int V = Tiling<isa, acc_t>::V;
  constexpr int R = Tiling<isa, acc_t>::R;
  constexpr int64_t U = 4 * V;
  const int64_t H = a.hidden, P = a.projection_size, G = 4 * H;
  const int64_t unit_blocks = ceil_div(H, V), out_blocks = ceil_div(P, U);
  const Share units = share_of(unit_blocks, thread, threads);
  const Share outs = share_of(out_blocks, thread, threads);
  acc_t* const gate_panels = a.panel;  // per unit block, (P, 4V)
  acc_t* const projection_panels = a.panel + unit_blocks * P * U;  // per output block, (H, U)
  for (int64_t jb = units.begin; jb < units.end; ++jb) {
    pack_forward_block<acc_t, V>(
        gate_panels + jb * P * U, H, P, jb,
        [&](int64_t row, int64_t k) { return a.w_hh[row * a.w_stride0 + k * a.w_stride1]; },
        a.w_stride1 == 1 ? a.w_hh : nullptr, a.w_stride0);
  }
  // Row k of W_hr^T is column k of W_hr.
  pack_column_panels<U>(projection_panels, a.w_hr, a.w_hr_stride1, a.w_hr_stride0, H, P, outs);
  const int64_t unit_begin = std::min(H, units.begin * V), unit_end = std::min(H, units.end * V);
  const int64_t out_begin = std::min(P, outs.begin * U), out_end = std::min(P, outs.end * U);
  // With recurrent dropout, W_hh multiplies the state times the mask: h0's first, then each
  // step's output's as it is stored.
  acc_t* const masked = a.recurrent_mask ? a.h_work : nullptr;
  for (int64_t r = 0; masked && r < a.batch; ++r) {
    for (int64_t j = out_begin; j < out_end; ++j) {
      masked[r * P + j] = a.hidden_state[r * P + j] * a.recurrent_mask[r * P + j];
    }
  }
  const bool add_biases = a.b_ih || a.b_hh;
  std::vector<acc_t> biases(add_biases ? G : 0);
  for (int64_t g = 0; g < 4 && add_biases; ++g) {
    for (int64_t j = unit_begin; j < unit_end; ++j) {
      biases[g * H + j] = fused_bias<acc_t>(a, g * H + j);
    }
  }
#pragma omp barrier

  int64_t prev_rows = 0, prev_offset = 0;
  for (int64_t k = 0; k < a.steps; ++k) {
    const int64_t t = a.reverse ? a.steps - 1 - k : k;
    const int64_t rows = a.step_size[t], offset = a.step_offset[t];
    if (rows == 0) continue;
    // The state entering the step: the step before's output rows, or h0.
    const auto state_row = [&](int64_t r) {
      return r < prev_rows ? a.output + (prev_offset + r) * P : a.hidden_state + r * P;
    };
    const auto raw_row = [&](int64_t r) {
      return a.hidden_raw + (a.raw_every_step ? offset + r : r) * H;
    };
    const Tiles tiles(rows, R);

    // (a) Gates and cells of this thread's units.
    for (int64_t jb = units.begin; jb < units.end; ++jb) {
      const int64_t j0 = jb * V, n_units = std::min<int64_t>(V, H - j0);
      for (int64_t tile = 0; tile < tiles.count; ++tile) {
        const int64_t r0 = tiles.begin(tile);
        const int n = static_cast<int>(tiles.begin(tile + 1) - r0);
        const acc_t* in[R] = {};
        for (int i = 0; i < n; ++i) in[i] = masked ? masked + (r0 + i) * P : state_row(r0 + i);
        // The tile's pre-activations come from memory, and the lines its cell update writes
        // are untouched since the step before: asked for while the products run (as in
        // forward_thread).
        const void* ahead[R * 8];
        int n_ahead = 0;
        for (int i = 0; i < n; ++i) {
          const int64_t row = offset + r0 + i, at = row * H + j0;
          for (int g = 0; g < 4; ++g) ahead[n_ahead++] = a.gates + row * G + j0 + g * H;
          ahead[n_ahead++] = raw_row(r0 + i) + j0;
          if (a.cell_prev_saved) ahead[n_ahead++] = a.cell_prev_saved + at;
          if (a.cells) ahead[n_ahead++] = a.cells + at;
        }
        alignas(64) acc_t products[R * U];
        tile_product_n<acc_t, V, R>(n, P, in, gate_panels + jb * P * U, U, products, false,
                                    ahead, n_ahead);
        const auto row_cells = [&](int i, auto n_units) {
          const int64_t r = r0 + i, row = offset + r;
          scalar_t* gate_row = a.gates + row * G;
          alignas(64) acc_t z[U];
          alignas(64) acc_t h[V];
          for (int g = 0; g < 4; ++g) {
            std::memcpy(z + g * V, gate_row + g * H + j0, n_units * sizeof(acc_t));
            if (add_biases) add_n(biases.data() + g * H + j0, z + g * V, n_units);
            add_n(products + i * U + g * V, z + g * V, n_units);
          }
          acc_t* c = a.cell + r * H + j0;
          zoned_forward_cells<acc_t, V>(
              n_units, z, c, h, a.cell_prev_saved ? a.cell_prev_saved + row * H + j0 : nullptr,
              a.zoneout_cell ? a.zoneout_cell + row * a.zoneout_cell_stride + j0 : nullptr);
          if (a.cells) std::memcpy(a.cells + row * H + j0, c, n_units * sizeof(acc_t));
          if (a.save_gates) {
            for (int g = 0; g < 4; ++g) {
              std::memcpy(gate_row + g * H + j0, z + g * V, n_units * sizeof(acc_t));
            }
          }
          std::memcpy(raw_row(r) + j0, h, n_units * sizeof(acc_t));
        };
        for (int i = 0; i < n; ++i) {
          if (n_units != V) {
            row_cells(i, n_units);
          } else {
            row_cells(i, std::integral_constant<int64_t, V>());
          }
        }
      }
    }
#pragma omp barrier

    // (b) This thread's projected units: the step's output, and the state it entered with
    // saved for the backward.
    for (int64_t jb = outs.begin; jb < outs.end; ++jb) {
      const int64_t p0 = jb * U, n_out = std::min<int64_t>(U, P - p0);
      for (int64_t tile = 0; tile < tiles.count; ++tile) {
        const int64_t r0 = tiles.begin(tile);
        const int n = static_cast<int>(tiles.begin(tile + 1) - r0);
        const acc_t* in[R] = {};
        for (int i = 0; i < n; ++i) in[i] = raw_row(r0 + i);
        alignas(64) acc_t products[R * U];
        // Only the vectors the block's units fill (the last block's may be fewer).
        with_vectors(static_cast<int>(ceil_div(n_out, V)), [&](auto nv) {
          tile_product_n<acc_t, V, R, decltype(nv)::value>(
              n, H, in, projection_panels + jb * H * U, U, products);
        });
        for (int i = 0; i < n; ++i) {
          const int64_t r = r0 + i, row = offset + r;
          // The state as W_hh multiplied it, before this step's replaces it.
          if (a.hidden_prev_saved) {
            std::memcpy(a.hidden_prev_saved + row * P + p0,
                        (masked ? masked + r * P : state_row(r)) + p0, n_out * sizeof(acc_t));
          }
          acc_t* y = products + i * U;
          // Zoneout keeps part of the state that entered: y = d y_prev + (1 - d) y~.
          if (a.zoneout_hidden) {
            const acc_t* d = a.zoneout_hidden + row * a.zoneout_hidden_stride + p0;
            const acc_t* y_prev = state_row(r) + p0;
            for (int64_t u = 0; u < n_out; ++u) {
              y[u] = d[u] * y_prev[u] + (acc_t(1) - d[u]) * y[u];
            }
          }
          std::memcpy(a.output + row * P + p0, y, n_out * sizeof(acc_t));
          if (masked) {
            const acc_t* mask = a.recurrent_mask + r * P + p0;
            for (int64_t u = 0; u < n_out; ++u) masked[r * P + p0 + u] = y[u] * mask[u];
          }
        }
      }
    }
    prev_rows = rows;
    prev_offset = offset;
#pragma omp barrier
  }

  // h_n: each sequence's output after its last step (see forward_thread).
  for (int64_t t = a.reverse ? 0 : a.steps - 1; t >= 0; --t) {
    const int64_t first = a.reverse || t + 1 == a.steps ? 0 : a.step_size[t + 1];
    for (int64_t r = first; r < a.step_size[t]; ++r) {
      const scalar_t* y = a.output + (a.step_offset[t] + r) * P;
      for (int64_t j = out_begin; j < out_end; ++j) a.hidden_state[r * P + j] = y[j];
    }
    if (a.reverse) break;
  }
}

template <Isa isa, typename scalar_t>
void projected_backward_thread(const SequenceBackward<scalar_t>& a, int thread, int threads) {
  static_assert(std::is_same_v<scalar_t, at::opmath_type<scalar_t>>, "fp32 and fp64 only");
  using acc_t = scalar_t;
  constexpr int V = Tiling<isa, acc_t>::V;
  constexpr int R = Tiling<isa, acc_t>::R;
  constexpr int64_t U = 4 * V;
  const int64_t H = a.hidden, P = a.projection_size, B = a.batch, G = 4 * H;
  const int64_t out_blocks = ceil_div(P, U), unit_blocks = ceil_div(H, U);
  const Share outs = share_of(out_blocks, thread, threads);
  const Share units = share_of(unit_blocks, thread, threads);
  acc_t* const recurrent_panels = a.panel;  // per output block, (4H, U) of W_hh
  acc_t* const projection_panels = a.panel + out_blocks * G * U;  // per unit block, (P, U) of W_hr
  pack_column_panels<U>(recurrent_panels, a.w_hh, a.w_stride0, a.w_stride1, G, P, outs);
  pack_column_panels<U>(projection_panels, a.w_hr, a.w_hr_stride0, a.w_hr_stride1, P, H, units);
  std::vector<acc_t> bias_sums(a.grad_bias ? units.count() * 4 * U : 0);
#pragma omp barrier

  int64_t prev_rows = 0, prev_offset = 0;
  for (int64_t k = 0; k <= a.steps; ++k) {
    int64_t rows = 0, offset = 0;
    if (k < a.steps) {
      const int64_t t = a.reverse ? k : a.steps - 1 - k;
      rows = a.step_size[t];
      offset = a.step_offset[t];
      if (rows == 0) continue;
    }
    const int64_t span = std::max(rows, prev_rows);

    // (1) dr of this thread's projected units: the output's gradient plus what the step after
    // carries back through W_hh (for rows the step after had; the others' comes in as the
    // gradient of h_n). Rows the step after had and this one lacks are sequences whose first
    // step that was: theirs is the gradient of h0.
    for (int64_t jb = outs.begin; jb < outs.end; ++jb) {
      const int64_t p0 = jb * U, n_out = std::min<int64_t>(U, P - p0);
      const acc_t* panel = recurrent_panels + jb * G * U;
      acc_t* carried = a.carry_work + thread * B * U;
      for_backward_tiles<acc_t, U>(prev_rows, G, R, panel, nullptr,
                                   [&](int64_t k0, int64_t kn, int64_t r0, int n, PanelAhead) {
        const acc_t* in[R] = {};
        for (int i = 0; i < n; ++i) in[i] = a.grad_gates + (prev_offset + r0 + i) * G + k0;
        with_vectors(static_cast<int>(ceil_div(n_out, V)), [&](auto nv) {
          tile_product_n<acc_t, V, R, decltype(nv)::value>(
              n, kn, in, panel + k0 * U, U, carried + r0 * U, /*accumulate=*/k0 > 0);
        });
      });
      for (int64_t r = 0; r < span; ++r) {
        acc_t* grad_h = a.grad_hidden + r * P + p0;
        // What reaches this step's state from the step after: through W_hh (and the mask
        // that multiplied the state there), and with zoneout d dh of that step directly.
        acc_t* through = carried + r * U;
        if (r < prev_rows) {
          const acc_t* mask = a.recurrent_mask ? a.recurrent_mask + r * P + p0 : nullptr;
          const acc_t* carry = a.zoneout_carry ? a.zoneout_carry + r * P + p0 : nullptr;
          for (int64_t u = 0; u < n_out && mask; ++u) through[u] *= mask[u];
          for (int64_t u = 0; u < n_out && carry; ++u) through[u] += carry[u];
        }
        if (r >= rows) {
          std::memcpy(grad_h, through, n_out * sizeof(acc_t));
          continue;
        }
        const int64_t row = offset + r;
        const acc_t* from_next = r < prev_rows ? through : grad_h;
        acc_t* dr = a.grad_projected + row * P + p0;
        if (a.grad_output) {
          const acc_t* from_output = a.grad_output + row * a.grad_output_stride + p0;
          for (int64_t u = 0; u < n_out; ++u) dr[u] = from_output[u] + from_next[u];
        } else {
          std::memcpy(dr, from_next, n_out * sizeof(acc_t));
        }
        // Zoneout: of the state's gradient, d goes straight to the step before and 1 - d
        // through the projection and the cell.
        if (a.zoneout_carry) {
          const acc_t* d = a.zoneout_hidden + row * a.zoneout_hidden_stride + p0;
          acc_t* carry = a.zoneout_carry + r * P + p0;
          for (int64_t u = 0; u < n_out; ++u) {
            carry[u] = d[u] * dr[u];
            dr[u] *= acc_t(1) - d[u];
          }
        }
      }
    }
#pragma omp barrier
    if (rows == 0) break;  // the pass after the last step

    // (2) dh = dr W_hr for this thread's hidden units, and their cells' gradients.
    for (int64_t jb = units.begin; jb < units.end; ++jb) {
      const int64_t u0 = jb * U, n_units = std::min<int64_t>(U, H - u0);
      const Tiles tiles(rows, R);
      for (int64_t tile = 0; tile < tiles.count; ++tile) {
        const int64_t r0 = tiles.begin(tile);
        const int n = static_cast<int>(tiles.begin(tile + 1) - r0);
        const acc_t* in[R] = {};
        for (int i = 0; i < n; ++i) in[i] = a.grad_projected + (offset + r0 + i) * P;
        // What the next tile's cell gradients read (saved gates and c) comes from memory: asked
        // for while this one is computed (as in backward_thread).
        const int64_t next = tiles.begin(tile + 1);
        const int64_t next_end = tiles.begin(std::min(tile + 2, tiles.count));
        for (int64_t r = next; r < next_end; ++r) {
          const int64_t row = offset + r;
          for (int g = 0; g < 4; ++g) {
            for (int64_t u = 0; u < n_units; u += 64 / sizeof(acc_t)) {
              __builtin_prefetch(a.gates + row * G + g * H + u0 + u);
            }
          }
          for (int64_t u = 0; u < n_units; u += 64 / sizeof(acc_t)) {
            __builtin_prefetch(a.cell_prev + row * H + u0 + u);
          }
        }
        alignas(64) acc_t dh[R * U];
        with_vectors(static_cast<int>(ceil_div(n_units, V)), [&](auto nv) {
          tile_product_n<acc_t, V, R, decltype(nv)::value>(
              n, P, in, projection_panels + jb * P * U, U, dh);
        });
        const auto row_cells = [&](int i, auto n_units) {
          const int64_t row = offset + r0 + i;
          acc_t* dc = a.grad_cell + (r0 + i) * H + u0;
          if (a.grad_cells) add_n(a.grad_cells + row * H + u0, dc, n_units);
          alignas(64) acc_t z[4 * U];
          alignas(64) acc_t dz[4 * U];
          const scalar_t* gate_row = a.gates + row * G;
          for (int g = 0; g < 4; ++g) {
            std::memcpy(z + g * U, gate_row + g * H + u0, n_units * sizeof(acc_t));
          }
          zoned_backward_cells<acc_t, U>(
              n_units, z, a.cell_prev + row * H + u0, dh + i * U, dc, dz,
              a.zoneout_cell ? a.zoneout_cell + row * a.zoneout_cell_stride + u0 : nullptr);
          if (a.grad_bias) {
            acc_t* sums = bias_sums.data() + (jb - units.begin) * 4 * U;
            for (int g = 0; g < 4; ++g) add_n(dz + g * U, sums + g * U, n_units);
          }
          scalar_t* grad_row = a.grad_gates + row * G;
          for (int g = 0; g < 4; ++g) {
            std::memcpy(grad_row + g * H + u0, dz + g * U, n_units * sizeof(acc_t));
          }
        };
        for (int i = 0; i < n; ++i) {
          if (n_units != U) {
            row_cells(i, n_units);
          } else {
            row_cells(i, std::integral_constant<int64_t, U>());
          }
        }
      }
      if (a.grad_gates_t) {
        transpose_columns<isa, scalar_t, U>(a.grad_gates + offset * G + u0, G, H, n_units, rows,
                                            a.grad_gates_t + u0 * a.rows + offset, H * a.rows,
                                            a.rows);
      }
    }
    prev_rows = rows;
    prev_offset = offset;
    stream_fence();  // transpose_columns' stores, before the other threads read them
#pragma omp barrier
  }
  for (int64_t jb = units.begin; jb < units.end && a.grad_bias; ++jb) {
    const int64_t u0 = jb * U, n_units = std::min<int64_t>(U, H - u0);
    for (int g = 0; g < 4; ++g) {
      std::memcpy(a.grad_bias + g * H + u0, bias_sums.data() + ((jb - units.begin) * 4 + g) * U,
                  n_units * sizeof(acc_t));
    }
  }
}

LSTM_EXT_KERNEL_VARIANTS(projected_forward_kernel, projected_forward_thread,
                         (const SequenceForward<T>& a, int thread, int threads),
                         (a, thread, threads))
LSTM_EXT_KERNEL_VARIANTS(projected_backward_kernel, projected_backward_thread,
                         (const SequenceBackward<T>& a, int thread, int threads),
                         (a, thread, threads))

}  // namespace

template <typename scalar_t>
void run_projected_forward(SequenceForward<scalar_t> a) {
  const Isa isa = active_isa();
  const int64_t V = lanes<scalar_t>(isa), U = 4 * V;
  const int64_t unit_blocks = ceil_div(a.hidden, V), out_blocks = ceil_div(a.projection_size, U);
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const at::Tensor panel = workspace(
      Workspace::panel,
      {unit_blocks * a.projection_size * U + out_blocks * a.hidden * U}, options);
  const at::Tensor masked = workspace(
      Workspace::recurrent_state, {a.recurrent_mask ? a.batch * a.projection_size : 0}, options);
  a.panel = panel.data_ptr<scalar_t>();
  a.h_work = masked.data_ptr<scalar_t>();
  run_parallel(a, projected_forward_kernel<scalar_t>(isa),
               threads_for(std::max(unit_blocks, out_blocks)));
}

template <typename scalar_t>
void run_projected_backward(SequenceBackward<scalar_t> a) {
  const Isa isa = active_isa();
  const int64_t U = 4 * lanes<scalar_t>(isa);
  const int64_t out_blocks = ceil_div(a.projection_size, U), unit_blocks = ceil_div(a.hidden, U);
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const at::Tensor panel = workspace(
      Workspace::panel,
      {out_blocks * 4 * a.hidden * U + unit_blocks * a.projection_size * U}, options);
  const int threads = threads_for(std::max(out_blocks, unit_blocks));
  const at::Tensor carry_work = workspace(Workspace::carried, {threads * a.batch * U}, options);
  a.panel = panel.data_ptr<scalar_t>();
  a.carry_work = carry_work.data_ptr<scalar_t>();
  run_parallel(a, projected_backward_kernel<scalar_t>(isa), threads);
}

template void run_projected_forward<float>(SequenceForward<float>);
template void run_projected_forward<double>(SequenceForward<double>);
template void run_projected_backward<float>(SequenceBackward<float>);
template void run_projected_backward<double>(SequenceBackward<double>);

}  // namespace cpu
}  // namespace lstm_ext
