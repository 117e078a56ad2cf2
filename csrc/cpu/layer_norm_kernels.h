// The CPU kernels of the LayerNorm LSTM (layer_norm_lstm.cpp), everything of it but the
// whole-sequence products and the input product's norm:
//
// - the fused recurrence (no projection): the whole time loop of one layer-direction in one
//   parallel region, as recurrence.h's. Where each thread gets enough of a step's rows the
//   threads split the rows and share nothing inside the loop. Otherwise they split the hidden
//   units for the products (each thread multiplies its own panels of W_hh for every row), then,
//   after a barrier, the rows for the rest: a norm spans a whole row, so a thread with whole
//   rows needs no other barrier before the step's end: two barriers a step, forward and
//   backward (with the norms' sums split by units as well, three, and every row's statistics
//   moved between cores). The norms' gains and biases are summed per thread over its rows and
//   added in thread order.
// - per-step row kernels for a layer with a projection, whose step products go through ATen.
//
// Compiled per instruction set (isa.h) with the branch-free gate math of cell_math.h.
#pragma once

#include "../lstm_layer.h"

#include <cstdint>

namespace lstm_ext {
namespace cpu {

// The whole LayerNorm-LSTM recurrence of one layer-direction without projection, in the math
// type; every tensor row-major and contiguous. G = 4H, N rows of data, B of state.
template <typename acc_t>
struct LayerNormSequence : SequenceLayout {
  const acc_t* w_hh;        // (G, H)
  const acc_t* hh_gain;     // (G) gain and bias of the recurrent product's norm
  const acc_t* hh_bias;
  const acc_t* cell_gain;   // (H) of the cell's
  const acc_t* cell_bias;
  const acc_t* recurrent_mask;  // (B, H): multiplies h before every W_hh product, or null
  const acc_t* input_products;  // (N, G) W_ih x before its norm
  const acc_t* ih_gain;         // (G) that norm's gain
  // Zoneout (Krueger et al.), or null: c = d c_prev + (1 - d) c~ and h likewise, with d of c
  // and of h for row n at [n * stride + j] (stride 0: one row for every step, eval's
  // expectations). The norm of c sees c~; cell_out keeps c after zoneout (the cell sequence),
  // and backward makes c~ again from the gates and cell_prev.
  const acc_t* zoneout_cell;
  int64_t zoneout_cell_stride;
  const acc_t* zoneout_hidden;
  int64_t zoneout_hidden_stride;
  // Forward: the saved tensors (what backward reads; layer_norm_lstm.cpp's) are written where
  // given, all null in inference.
  const acc_t* input_bias;  // (G) the input product norm's bias plus b_ih and b_hh
  acc_t* hidden_state;      // (B, H): h0 in, h_n out
  acc_t* cell_state;        // (B, H): c0 in, c_n out
  acc_t* output;            // (N, H)
  acc_t* gates;             // (N, G) activations
  acc_t* cell_prev;         // (N, H) c entering each step
  acc_t* cell_out;          // (N, H) c after it
  acc_t* products;          // (N, G) W_hh (m * h) before its norm
  acc_t* stats;             // (N, 6): mean and 1/std of the input product's, the recurrent
                            // product's and c's norms
  acc_t* hidden_prev;       // (N, H) m * h entering each step
  // Backward: reads the saved tensors above (never writes them).
  const acc_t* grad_output;  // (N, H), or null for zero
  const acc_t* grad_cells;   // (N, H): of c after each step (the cell sequence), or null
  acc_t* grad_hidden;        // (B, H): grad of h_n in, of h0 out
  acc_t* grad_cell;          // (B, H): grad of c_n in, of c0 out
  // The gradients of the products before their norms, written in rows, (N, G), where the
  // pointer is set, and transposed, (G, N), where that one is (grads_in_rows says which the
  // weight gradients' products read).
  acc_t* grad_products;          // of W_hh (m * h)
  acc_t* grad_products_t;
  acc_t* grad_input_products;    // of W_ih x (in rows also where dx is wanted)
  acc_t* grad_input_products_t;
  int64_t rows;              // N
  // (G + G + H + H + G), added to: gradients of the recurrent product norm's gain and bias,
  // of the cell norm's, then of the input product norm's gain (its bias's is the first's).
  acc_t* grad_norms;
  // Workspace, filled in by the run functions: panels and state.
  acc_t* panel;
  acc_t* work;
};

template <typename acc_t>
void layer_norm_sequence_forward(LayerNormSequence<acc_t> a);
template <typename acc_t>
void layer_norm_sequence_backward(LayerNormSequence<acc_t> a);

// Whether the backward of a batch of `batch` rows writes the products' gradients in rows for
// the weight gradients (whose products then transpose them once) rather than transposed step by
// step: with at most a quarter of a cache line's values per step, every transposed store is a
// line of its own (at B 1, H 256, T 50 on a Zen 4 they took 40 % of the backward kernel).
constexpr int64_t few_grad_rows(int64_t value_bytes) { return 64 / value_bytes / 4; }
inline bool grads_in_rows(int64_t batch, int64_t value_bytes) {
  return batch <= few_grad_rows(value_bytes);
}

// One step's rows for a layer with a projection, all row-major and contiguous, in the math
// type. stats rows are 6 apart, of which the step reads or writes columns 2-5.
template <typename acc_t>
struct LayerNormRows {
  int64_t rows, hidden;
  const acc_t* hh_gain;    // (G) gain and bias of the recurrent product's norm
  const acc_t* hh_bias;
  const acc_t* cell_gain;  // (H)
  const acc_t* cell_bias;
  const acc_t* product;    // (rows, G) W_hh h before its norm
  acc_t* stats;            // (rows, 6)
  const acc_t* cell_prev;  // (rows, H)
  // Forward: in, the normalised input product with both biases; out, the gate activations,
  // c after the step and h before any projection.
  const acc_t* input_part;  // (rows, G)
  acc_t* gates;             // (rows, G)
  acc_t* cell;              // (rows, H)
  acc_t* hidden_out;        // (rows, H)
  // Backward: in, dh (before any projection, times W_hr) and the saved activations and c; dc
  // in and out (the carried gradient of c); out, the gradients of the gate pre-activations,
  // of the recurrent product before its norm and of LN(c).
  const acc_t* grad_hidden;  // (rows, H)
  acc_t* grad_cell;          // (rows, H)
  acc_t* grad_gates;         // (rows, G)
  acc_t* grad_product;       // (rows, G)
  acc_t* grad_cell_norm;     // (rows, H)
};

template <typename acc_t>
void layer_norm_forward_rows(const LayerNormRows<acc_t>& a);
template <typename acc_t>
void layer_norm_backward_rows(const LayerNormRows<acc_t>& a);

}  // namespace cpu
}  // namespace lstm_ext
