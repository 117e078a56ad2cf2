// What one CUDA thread does for one (row, hidden unit) of a step: the bodies of the fused
// elementwise kernels. Host-and-device code, so csrc/tests/cuda_step_elements_test.cpp runs the
// very same code on the CPU — every index in any order, as independent threads would — and
// checks it against an fp64 reference and finite differences, with or without a GPU.
#pragma once

#include "../lstm_layer.h"

namespace lstm_ext::cuda {

// Where element `index` = (row r, unit j) of a (rows, H) block finds its input-gate column in
// the matching (rows, 4H) gate block; gate k is kH further on.
LSTM_HOST_DEVICE int64_t gate_offset(int64_t index, int64_t H) {
  const int64_t r = index / H;
  return r * kNumGates * H + (index - r * H);
}

template <typename scalar_t>
LSTM_HOST_DEVICE void forward_step_element(const ForwardStep<scalar_t>& a, int64_t index) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.hidden;
  scalar_t* gates = a.gates + gate_offset(index, H);
  const acc_t c_prev = a.cell[index];
  const CellForward<ScalarMath, acc_t> cf(
      static_cast<acc_t>(gates[0]), static_cast<acc_t>(gates[H]),
      static_cast<acc_t>(gates[2 * H]), static_cast<acc_t>(gates[3 * H]), c_prev);
  if (a.save_gates) {
    gates[0] = static_cast<scalar_t>(cf.in);
    gates[H] = static_cast<scalar_t>(cf.forget);
    gates[2 * H] = static_cast<scalar_t>(cf.cell);
    gates[3 * H] = static_cast<scalar_t>(cf.out);
  }
  if (a.cell_prev_saved) a.cell_prev_saved[index] = c_prev;
  a.cell[index] = cf.c;
  a.hidden_out[index] = static_cast<scalar_t>(cf.h);
  if (a.hidden_state) {
    if (a.hidden_prev_saved) a.hidden_prev_saved[index] = a.hidden_state[index];
    a.hidden_state[index] = static_cast<scalar_t>(cf.h);
  }
}

template <typename scalar_t>
LSTM_HOST_DEVICE void backward_step_element(const BackwardStep<scalar_t>& a, int64_t index) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.hidden;
  const int64_t offset = gate_offset(index, H);
  const scalar_t* gates = a.gates + offset;
  scalar_t* grad_gates = a.grad_gates + offset;
  acc_t dh = 0;
  if (a.grad_h) dh += static_cast<acc_t>(a.grad_h[index]);
  if (a.grad_h_extra) dh += static_cast<acc_t>(a.grad_h_extra[index]);
  const CellBackward<ScalarMath, acc_t> cb(
      static_cast<acc_t>(gates[0]), static_cast<acc_t>(gates[H]),
      static_cast<acc_t>(gates[2 * H]), static_cast<acc_t>(gates[3 * H]), a.cell_prev[index],
      dh, a.grad_cell[index]);
  grad_gates[0] = static_cast<scalar_t>(cb.d_in);
  grad_gates[H] = static_cast<scalar_t>(cb.d_forget);
  grad_gates[2 * H] = static_cast<scalar_t>(cb.d_cell);
  grad_gates[3 * H] = static_cast<scalar_t>(cb.d_out);
  a.grad_cell[index] = cb.dc_prev;
}

}  // namespace lstm_ext::cuda
