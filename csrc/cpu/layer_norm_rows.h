// The CPU's per-step row kernels of the LayerNorm LSTM (layer_norm_lstm.cpp): everything of a
// step but its GEMMs, one row (sequence) at a time, since each norm is over one row. Compiled
// per instruction set (isa.h) with the branch-free gate math of cell_math.h.
#pragma once

#include <cstdint>

namespace lstm_ext {
namespace cpu {

// One step's rows, all row-major and contiguous, in the math type. G = 4H; stats rows are 6
// apart (layer_norm_lstm.cpp's columns: mean and 1/std of the input product's, the recurrent
// product's and the cell's norms), of which the step reads or writes columns 2-5.
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
