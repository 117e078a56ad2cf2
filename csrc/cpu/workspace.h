// Scratch tensors kept across calls on one thread, for the large temporaries of a call (the
// backward's gate gradients, operands copied into the layout a product wants, the recurrence's
// weight panels and state). A fresh
// allocation of that size comes as fresh pages, which the OS zeroes on first touch (about
// 0.25 ms per MB on the development VMs, 10-15 % of a training step at LM sizes); a kept one
// does not. Each slot holds at most kMaxWorkspaceBytes; larger requests are plain allocations.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace lstm_ext {
namespace cpu {

enum class Workspace {
  grad_gates, grad_gates_t, operand_x, operand_w,  // the layer's backward and its products
  panel, recurrent_state, carried,  // the recurrence's (recurrence.cpp)
  grad_products_t, grad_input_products, grad_input_products_t,  // the LayerNorm backward's
  inference_gates,  // an inference forward's input projection (no backward keeps it)
  cast_input, cast_w_ih, cast_w_hh,  // an inference call's autocast copies (ops.cpp)
  count
};

// What outlives a call: what a training forward saves for its backward, which autograd holds
// until then (gates, products, cell and stats: the LayerNorm forward's only), and the results
// a training loop drops by its next step (the output sequence, the backward's dx and dW).
enum class Saved {
  gates, products, cell_prev, cell, hidden_prev, stats,
  output, grad_input, grad_w_ih, grad_w_hh,
  drop_connect_output, drop_connect_kept, drop_connect_grad,  // weight drop's (random_mask.h)
  count
};

constexpr int64_t kMaxWorkspaceBytes = int64_t{1} << 30;

// A contiguous tensor of these sizes and options in the slot's memory: uninitialized, only
// valid until the slot is asked for again on this thread (a slot still in use, or too small,
// is replaced).
at::Tensor workspace(Workspace slot, at::IntArrayRef sizes, const at::TensorOptions& options);

// A contiguous tensor of these sizes and options, uninitialized, that may outlive the call: in
// one of the last few buffers of its kind made on this thread, each handed out again, for a
// request of its exact size, once nothing but the pool holds it (a training loop's next
// forward, after the backward freed the last one's), so that each step's saved sequences do
// not come as fresh pages. A kind's pool holds at most kMaxWorkspaceBytes.
at::Tensor saved_buffer(Saved kind, at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace cpu
}  // namespace lstm_ext
