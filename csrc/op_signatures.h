// The C++ types of the layer ops' schemas (ops.cpp), for the kernels that call them back
// through the dispatcher, so that the device kernel the inputs live on runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>
#include <vector>

namespace lstm_ext {

// output, h_n, c_n, gates, cell_prev, hidden_prev, hidden_raw, cells
using LayerForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                      at::Tensor, at::Tensor, at::Tensor>;

using LayerForwardSignature =
    LayerForwardResult(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                           const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const std::optional<at::Tensor>& b_ih,
                           const std::optional<at::Tensor>& b_hh,
                           const std::optional<at::Tensor>& w_hr,
                           const std::optional<at::Tensor>& batch_sizes, bool reverse,
                           bool training, const std::optional<at::Tensor>& recurrent_mask,
                           const std::optional<at::Tensor>& zoneout_cell,
                           const std::optional<at::Tensor>& zoneout_hidden, bool return_cells);

using LayerBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                          at::Tensor, at::Tensor, at::Tensor>(
    const std::optional<at::Tensor>& grad_output, const at::Tensor& grad_h_n,
    const at::Tensor& grad_c_n, const at::Tensor& input, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes, const at::Tensor& gates,
    const at::Tensor& cell_prev, const at::Tensor& hidden_prev, const at::Tensor& hidden_raw,
    bool reverse, bool has_bias, bool input_grad, bool weight_grads,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_cell,
    const std::optional<at::Tensor>& zoneout_hidden, const std::optional<at::Tensor>& grad_cells);

using LayerDifferentiableBackwardSignature = std::vector<at::Tensor>(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const std::optional<at::Tensor>& grad_cells,
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes, bool reverse,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_cell,
    const std::optional<at::Tensor>& zoneout_hidden);

inline const c10::TypedOperatorHandle<LayerForwardSignature>& layer_forward_op() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("lstm_ext::lstm_layer_forward", "")
                                 .typed<LayerForwardSignature>();
  return handle;
}

inline const c10::TypedOperatorHandle<LayerBackwardSignature>& layer_backward_op() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("lstm_ext::lstm_layer_backward", "")
                                 .typed<LayerBackwardSignature>();
  return handle;
}

}  // namespace lstm_ext
