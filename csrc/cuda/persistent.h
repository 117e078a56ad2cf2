// The persistent recurrence: one launch runs every step of a layer-direction. Each block owns a
// slice of the hidden units and keeps the W_hh entries of that slice in shared memory for the
// whole sequence; per step it multiplies the state (h forward, the gate gradients backward) by
// its slice, applies the cell math of its units (step_elements.h, the step loop's own code),
// publishes them, and the grid synchronises before the next step reads them.
//
// Host-and-device code with the synchronisation points passed in (`Sync`): the kernel passes
// __syncthreads and the cooperative grid barrier, and csrc/tests/cuda_persistent_test.cpp runs
// the same bodies on the CPU, one std::thread per GPU thread, with barriers in their place.
//
// Every phase between two barriers is "each thread, items tid, tid + threads, ...": no thread
// reads what another writes in the same phase.
#pragma once

#include "step_elements.h"

#include <algorithm>
#include <cstdint>

namespace lstm_ext::cuda {

constexpr int64_t kPersistentThreads = 256;
// Each thread accumulates a 4 x 4 tile of (weight rows) x (batch rows): 8 shared-memory reads
// feed 16 multiply-adds.
constexpr int64_t kTileRows = 4;
constexpr int64_t kTileBatch = 4;
// Fewer, longer chunks: each costs a round trip to L2 and two barriers.
constexpr int64_t kPersistentMaxChunk = 1024;
// Loads a thread issues before it stores any of them: one wait for memory per this many
// elements copied, rather than one per element.
constexpr int kLoadsInFlight = 16;

// store(i, load(i)) for i = tid, tid + threads, ... < n, kLoadsInFlight loads at a time.
template <typename Load, typename Store>
LSTM_HOST_DEVICE void copy_in_flight(int64_t n, int64_t tid, int64_t threads, Load load,
                                     Store store) {
  for (int64_t base = tid; base < n; base += threads * kLoadsInFlight) {
    decltype(load(int64_t{0})) values[kLoadsInFlight];
    for (int u = 0; u < kLoadsInFlight; ++u) {
      const int64_t i = base + u * threads;
      if (i < n) values[u] = load(i);
    }
    for (int u = 0; u < kLoadsInFlight; ++u) {
      const int64_t i = base + u * threads;
      if (i < n) store(i, values[u]);
    }
  }
}

// What one launch looks like; the same for every block (the last may own fewer units).
struct PersistentPlan {
  int64_t blocks, threads;
  int64_t hidden, batch;
  int64_t units;      // hidden units per block
  int64_t rows;       // weight rows a block keeps: 4 * units forward, units backward
  int64_t depth;      // the length of each dot product: H forward, 4H backward
  int64_t chunk;      // columns of the multiplied state staged in shared memory at a time
  int64_t row_tiles, batch_tiles, k_groups;  // the product's items: tiles x k groups
  int64_t ld_w, ld_x;  // row strides (elements) of the weight slice and the staged chunk
  // Bytes; the weight slice is at 0. Forward also keeps the step's gate inputs of its units,
  // (rows, batch), fetched with the first chunk; backward has none.
  int64_t x_offset, partial_offset, inputs_offset, smem_bytes;
  bool fits;          // within smem_limit
};

constexpr int64_t align_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// max_blocks: blocks that can be resident at once (one per multiprocessor: the weight slice
// takes most of its shared memory). smem_limit: shared memory a block may have.
constexpr PersistentPlan plan_persistent(bool backward, int64_t hidden, int64_t batch,
                                         int64_t max_blocks, int64_t threads,
                                         int64_t smem_limit, int64_t scalar_bytes,
                                         int64_t acc_bytes,
                                         int64_t max_chunk = kPersistentMaxChunk) {
  PersistentPlan p{};
  p.threads = threads;
  p.hidden = hidden;
  p.batch = batch;
  p.units = (hidden + std::max<int64_t>(max_blocks, 1) - 1) / std::max<int64_t>(max_blocks, 1);
  p.blocks = (hidden + p.units - 1) / p.units;
  p.rows = backward ? p.units : kNumGates * p.units;
  p.depth = backward ? kNumGates * hidden : hidden;
  // One 4-byte word of padding per row, so rows a tile apart start in different banks.
  p.ld_w = p.depth + std::max<int64_t>(1, 4 / scalar_bytes);
  p.row_tiles = (p.rows + kTileRows - 1) / kTileRows;
  p.batch_tiles = (batch + kTileBatch - 1) / kTileBatch;
  const int64_t tiles = p.row_tiles * p.batch_tiles;
  // The largest chunk that fits, halving down to 8 columns.
  for (int64_t chunk = std::min(p.depth, max_chunk);; chunk = (chunk + 1) / 2) {
    p.chunk = chunk;
    p.k_groups = std::clamp<int64_t>(threads / tiles, 1, chunk);
    p.ld_x = chunk + 1;
    p.x_offset = align_up(p.rows * p.ld_w * scalar_bytes, 16);
    p.partial_offset = p.x_offset + align_up(batch * p.ld_x * acc_bytes, 16);
    p.inputs_offset = p.partial_offset + align_up(p.k_groups * p.rows * batch * acc_bytes, 16);
    p.smem_bytes = p.inputs_offset + (backward ? 0 : p.rows * batch * acc_bytes);
    p.fits = p.smem_bytes <= smem_limit;
    if (p.fits || chunk <= 8) break;
  }
  return p;
}

// One block's view of the plan and its shared memory.
template <typename scalar_t>
struct PersistentBlock {
  using acc_t = at::opmath_type<scalar_t>;
  const PersistentPlan& p;
  int64_t first_unit, units;  // this block's units [first_unit, first_unit + units)
  int64_t rows;               // its weight rows: 4 * units forward, units backward
  int64_t tid;
  scalar_t* w;       // (p.rows, ld_w)
  acc_t* x;          // (batch, ld_x)
  acc_t* partial;    // (k_groups, p.rows, batch)
  acc_t* inputs;     // forward: (p.rows, batch)

  LSTM_HOST_DEVICE PersistentBlock(const PersistentPlan& plan, bool backward, int64_t block,
                                   int64_t thread, unsigned char* smem)
      : p(plan),
        first_unit(block * plan.units),
        units(plan.hidden - block * plan.units < plan.units ? plan.hidden - block * plan.units
                                                            : plan.units),
        rows(backward ? units : kNumGates * units),
        tid(thread),
        w(reinterpret_cast<scalar_t*>(smem)),
        x(reinterpret_cast<acc_t*>(smem + plan.x_offset)),
        partial(reinterpret_cast<acc_t*>(smem + plan.partial_offset)),
        inputs(reinterpret_cast<acc_t*>(smem + plan.inputs_offset)) {}

  // Stage columns [c0, c0 + len) of a (batch, *) state, rows `stride` apart.
  LSTM_HOST_DEVICE void stage(const scalar_t* src, int64_t stride, int64_t c0,
                              int64_t len) const {
    // (32-bit division: the chunk has far fewer than 2^31 elements.)
    const auto row = [len](int64_t i) {
      return static_cast<int64_t>(static_cast<uint32_t>(i) / static_cast<uint32_t>(len));
    };
    copy_in_flight(
        p.batch * len, tid, p.threads,
        [&](int64_t i) {
          const int64_t b = row(i);
          return static_cast<acc_t>(src[b * stride + c0 + i - b * len]);
        },
        [&](int64_t i, acc_t v) {
          const int64_t b = row(i);
          x[b * p.ld_x + i - b * len] = v;
        });
  }

  // partial[kg][r][b] (+)= sum over this chunk's columns kk = kg, kg + k_groups, ... of
  // w[r][c0 + kk] * x[b][kk]. Rows and batch entries past the ends are read clamped (inside
  // shared memory) and their sums dropped.
  LSTM_HOST_DEVICE void accumulate(int64_t c0, int64_t len, bool first) const {
    const int64_t tiles = p.row_tiles * p.batch_tiles;
    for (int64_t item = tid; item < tiles * p.k_groups; item += p.threads) {
      const int64_t tile = item % tiles, kg = item / tiles;
      const int64_t r0 = (tile % p.row_tiles) * kTileRows;
      const int64_t b0 = (tile / p.row_tiles) * kTileBatch;
      if (r0 >= rows) continue;
      const scalar_t* wr[kTileRows];
      const acc_t* xr[kTileBatch];
      for (int64_t i = 0; i < kTileRows; ++i) {
        wr[i] = w + (r0 + i < p.rows ? r0 + i : p.rows - 1) * p.ld_w + c0;
      }
      for (int64_t j = 0; j < kTileBatch; ++j) {
        xr[j] = x + (b0 + j < p.batch ? b0 + j : p.batch - 1) * p.ld_x;
      }
      acc_t sum[kTileRows][kTileBatch] = {};
      for (int64_t kk = kg; kk < len; kk += p.k_groups) {
        acc_t wv[kTileRows], xv[kTileBatch];
        for (int64_t i = 0; i < kTileRows; ++i) wv[i] = static_cast<acc_t>(wr[i][kk]);
        for (int64_t j = 0; j < kTileBatch; ++j) xv[j] = xr[j][kk];
        for (int64_t i = 0; i < kTileRows; ++i) {
          for (int64_t j = 0; j < kTileBatch; ++j) sum[i][j] += wv[i] * xv[j];
        }
      }
      for (int64_t i = 0; i < kTileRows; ++i) {
        for (int64_t j = 0; j < kTileBatch; ++j) {
          if (r0 + i >= rows || b0 + j >= p.batch) continue;
          acc_t& slot = partial[(kg * p.rows + r0 + i) * p.batch + b0 + j];
          slot = first ? sum[i][j] : slot + sum[i][j];
        }
      }
    }
  }

  // The product over the whole depth: chunks staged and accumulated, two barriers each.
  // `prefetch` runs beside the first chunk's staging, in the same phase.
  template <typename Sync, typename Prefetch>
  LSTM_HOST_DEVICE void product(const scalar_t* src, int64_t stride, Sync& sync,
                                Prefetch prefetch) const {
    for (int64_t c0 = 0; c0 < p.depth; c0 += p.chunk) {
      const int64_t len = p.depth - c0 < p.chunk ? p.depth - c0 : p.chunk;
      stage(src, stride, c0, len);
      if (c0 == 0) prefetch();
      sync.threads();
      accumulate(c0, len, c0 == 0);
      sync.threads();
    }
  }

  // out(r, b, sum over the k groups) for each of this block's (row, batch) pairs.
  template <typename Out>
  LSTM_HOST_DEVICE void reduce(Out out) const {
    for (int64_t o = tid; o < rows * p.batch; o += p.threads) {
      const int64_t r = o / p.batch, b = o - r * p.batch;
      acc_t sum = 0;
      for (int64_t kg = 0; kg < p.k_groups; ++kg) sum += partial[(kg * p.rows + r) * p.batch + b];
      out(r, b, sum);
    }
  }
};

// Forward: a.gates holds the input projection with the biases, (T * B, 4H); each step adds
// W_hh h to its rows and runs the step loop's elementwise code on them. h of step t is read
// back from a.output (from a.hidden_state for the first step), so no block writes what another
// may still read; a.hidden_state gets h_n at the end, after every read of h0.
template <typename scalar_t, typename Sync>
LSTM_HOST_DEVICE void persistent_forward_body(const SequenceForward<scalar_t>& a,
                                              const PersistentPlan& p, int64_t block,
                                              int64_t thread, unsigned char* smem, Sync& sync) {
  using acc_t = at::opmath_type<scalar_t>;
  const PersistentBlock<scalar_t> blk(p, /*backward=*/false, block, thread, smem);
  const int64_t H = a.hidden, B = a.batch, U = blk.units, j0 = blk.first_unit;
  // Weight row r of the slice is gate r / U of unit j0 + r % U; rows past the block's units
  // are zeroed (read by the clamped tiles, never summed).
  copy_in_flight(
      p.rows * p.depth, thread, p.threads,
      [&](int64_t i) {
        const int64_t r = i / p.depth, k = i - r * p.depth;
        const int64_t g = r / U, j = j0 + r - g * U;
        return r < blk.rows ? a.w_hh[(g * H + j) * a.w_stride0 + k * a.w_stride1]
                            : scalar_t(0);
      },
      [&](int64_t i, scalar_t v) {
        const int64_t r = i / p.depth;
        blk.w[r * p.ld_w + i - r * p.depth] = v;
      });
  sync.threads();
  const scalar_t* h_prev = a.hidden_state;
  for (int64_t step = 0; step < a.steps; ++step) {
    const int64_t t = a.reverse ? a.steps - 1 - step : step;
    const int64_t offset = t * B;
    scalar_t* gates = a.gates + offset * kNumGates * H;
    // The step's gate inputs of this block's units, (rows, batch) in shared memory.
    const auto gate = [&](int64_t r, int64_t b) -> scalar_t& {
      const int64_t g = r / U;
      return gates[b * kNumGates * H + g * H + j0 + r - g * U];
    };
    blk.product(h_prev, H, sync, [&] {
      copy_in_flight(
          blk.rows * B, thread, p.threads,
          [&](int64_t i) { return static_cast<acc_t>(gate(i / B, i - i / B * B)); },
          [&](int64_t i, acc_t v) { blk.inputs[i] = v; });
    });
    blk.reduce([&](int64_t r, int64_t b, acc_t sum) {
      gate(r, b) = static_cast<scalar_t>(blk.inputs[r * B + b] + sum);
    });
    sync.threads();
    ForwardStep<scalar_t> s{};
    s.rows = B;
    s.hidden = H;
    s.gates = gates;
    s.cell = a.cell;
    s.cell_prev_saved = a.cell_prev_saved ? a.cell_prev_saved + offset * H : nullptr;
    s.hidden_out = a.output + offset * H;
    s.save_gates = a.save_gates;
    for (int64_t o = thread; o < U * B; o += p.threads) {
      const int64_t b = o / U, index = b * H + j0 + o - b * U;
      if (a.hidden_prev_saved) a.hidden_prev_saved[offset * H + index] = h_prev[index];
      forward_step_element(s, index);
      if (a.cells) a.cells[offset * H + index] = static_cast<scalar_t>(a.cell[index]);
    }
    sync.grid();
    h_prev = a.output + offset * H;
  }
  for (int64_t o = thread; o < U * B; o += p.threads) {
    const int64_t b = o / U, index = b * H + j0 + o - b * U;
    a.hidden_state[index] = h_prev[index];
  }
}

// Backward: per step (last first) each block turns dh = grad_output + the carried dh, and dc,
// of its units into their gate gradients; after the grid barrier it multiplies that step's
// gate gradients (all units) by its columns of W_hh into the dh it carries to the step before,
// kept in a.grad_hidden (its own units only, so nothing another block reads).
template <typename scalar_t, typename Sync>
LSTM_HOST_DEVICE void persistent_backward_body(const SequenceBackward<scalar_t>& a,
                                               const PersistentPlan& p, int64_t block,
                                               int64_t thread, unsigned char* smem, Sync& sync) {
  using acc_t = at::opmath_type<scalar_t>;
  const PersistentBlock<scalar_t> blk(p, /*backward=*/true, block, thread, smem);
  const int64_t H = a.hidden, B = a.batch, U = blk.units, j0 = blk.first_unit;
  copy_in_flight(
      p.rows * p.depth, thread, p.threads,
      [&](int64_t i) {
        const int64_t u = i / p.depth, k = i - u * p.depth;
        return u < U ? a.w_hh[k * a.w_stride0 + (j0 + u) * a.w_stride1] : scalar_t(0);
      },
      [&](int64_t i, scalar_t v) {
        const int64_t u = i / p.depth;
        blk.w[u * p.ld_w + i - u * p.depth] = v;
      });
  sync.threads();
  for (int64_t step = 0; step < a.steps; ++step) {
    const int64_t t = a.reverse ? step : a.steps - 1 - step;
    const int64_t offset = t * B;
    BackwardStep<scalar_t> s{};
    s.rows = B;
    s.hidden = H;
    s.gates = a.gates + offset * kNumGates * H;
    s.cell_prev = a.cell_prev + offset * H;
    s.grad_h = a.grad_output ? a.grad_output + offset * H : nullptr;
    s.grad_h_extra = a.grad_hidden;
    s.grad_cell = a.grad_cell;
    s.grad_gates = a.grad_gates + offset * kNumGates * H;
    for (int64_t o = thread; o < U * B; o += p.threads) {
      const int64_t b = o / U, j = j0 + o - b * U;
      backward_step_element(s, b * H + j);
      if (a.grad_gates_t) {
        for (int64_t g = 0; g < kNumGates; ++g) {
          a.grad_gates_t[(g * H + j) * a.rows + offset + b] =
              s.grad_gates[b * kNumGates * H + g * H + j];
        }
      }
    }
    sync.grid();
    blk.product(s.grad_gates, kNumGates * H, sync, [] {});
    blk.reduce([&](int64_t u, int64_t b, acc_t sum) {
      a.grad_hidden[b * H + j0 + u] = static_cast<scalar_t>(sum);
    });
    sync.threads();
  }
}

}  // namespace lstm_ext::cuda
