// Every op schema of the lstm_ext library, in one place, and the device-independent cell ops.
//
// The layer ops cover a whole sequence for one layer and one direction; the Python module
// composes layers, directions and dropout (in plain inference lstm_layers, here, does). Their
// device kernels live in cpu/ and cuda/, their autograd formulas here; their fake (shape)
// functions are registered from lstm_ext/ops.py.
#include "cpu/forward_plan.h"
#include "cpu/isa.h"
#include "cpu/random_mask.h"
#include "cpu/step_product.h"
#include "cpu/workspace.h"
#include "lstm_common.h"
#include "op_signatures.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace lstm_ext {
namespace {

using CellForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using CellBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;


// One step is a layer call with T = 1, through the dispatcher so that it reaches whichever
// device kernel the inputs live on.
CellForwardResult cell_forward(const at::Tensor& input, const at::Tensor& hx,
                               const at::Tensor& cx, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                               const std::optional<at::Tensor>& b_hh, bool training) {
  TORCH_CHECK(input.dim() == 2,
              "lstm_cell_forward: expected input of shape (batch, input_size), got ",
              input.sizes());
  auto [output, h, c, gates, cell_prev, hidden_prev, hidden_raw, cells] =
      layer_forward_op().call(input.unsqueeze(0), hx, cx, w_ih, w_hh, b_ih, b_hh, std::nullopt,
                              std::nullopt, /*reverse=*/false, training, std::nullopt,
                              std::nullopt, std::nullopt, /*return_cells=*/false);
  return {h, c, gates, cell_prev};
}

// Under torch.autocast, run in the autocast dtype the user chose (fp32 tensors are cast, fp64
// ones are left alone, as ATen's own autocast does), for CPU and CUDA alike. The dropout and
// zoneout masks are in the math dtype, which autocast's dtypes share with fp32, and stay.
template <c10::DeviceType device_type>
LayerForwardResult layer_forward_autocast(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes, bool reverse, bool training,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_cell,
    const std::optional<at::Tensor>& zoneout_hidden, bool return_cells) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  const auto cast = [&](const auto& tensor) {
    return at::autocast::cached_cast(dtype, tensor, device_type);
  };
  // An inference call on the CPU casts the input and weights into memory kept across calls
  // (cpu/workspace.h) rather than fresh allocations, which come as fresh pages: nothing it
  // casts outlives the call. Tensors that need a gradient, or that are not plain CPU tensors
  // (FakeTensor), take autocast's own cast.
  const auto kept_cast = [&](const at::Tensor& tensor, cpu::Workspace slot) {
    if (device_type != c10::DeviceType::CPU || training ||
        tensor.scalar_type() != at::kFloat || dtype == at::kFloat ||
        (at::GradMode::is_enabled() && tensor.requires_grad()) ||
        tensor.key_set().has(c10::DispatchKey::Python) || !tensor.is_cpu()) {
      return cast(tensor);
    }
    at::Tensor kept = cpu::workspace(slot, tensor.sizes(), tensor.options().dtype(dtype));
    kept.copy_(tensor);
    return kept;
  };
  return layer_forward_op().call(
      kept_cast(input, cpu::Workspace::cast_input), cast(h0), cast(c0),
      kept_cast(w_ih, cpu::Workspace::cast_w_ih), kept_cast(w_hh, cpu::Workspace::cast_w_hh),
      cast(b_ih), cast(b_hh), cast(w_hr), batch_sizes, reverse, training, recurrent_mask,
      zoneout_cell, zoneout_hidden, return_cells);
}

// LSTMCell under torch.autocast follows ATen's lists for aten::lstm_cell, as nn.LSTMCell
// does: on CUDA it runs in the autocast dtype; on the CPU, where lstm_cell is not on the list,
// in its inputs' own dtype. Either way the layer op it calls must not be autocast again.
template <c10::DeviceType device_type, bool lower_precision>
CellForwardResult cell_forward_autocast(const at::Tensor& input, const at::Tensor& hx,
                                        const at::Tensor& cx, const at::Tensor& w_ih,
                                        const at::Tensor& w_hh,
                                        const std::optional<at::Tensor>& b_ih,
                                        const std::optional<at::Tensor>& b_hh, bool training) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  const auto cast = [&](const auto& tensor) {
    if constexpr (lower_precision) {
      return at::autocast::cached_cast(dtype, tensor, device_type);
    } else {
      return tensor;
    }
  };
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lstm_ext::lstm_cell_forward", "")
                             .typed<decltype(cell_forward)>();
  return op.call(cast(input), cast(hx), cast(cx), cast(w_ih), cast(w_hh), cast(b_ih),
                 cast(b_hh), training);
}

CellBackwardResult cell_backward(const at::Tensor& grad_h, const at::Tensor& grad_c,
                                 const at::Tensor& input, const at::Tensor& hx,
                                 const at::Tensor& w_ih, const at::Tensor& w_hh,
                                 const at::Tensor& gates, const at::Tensor& cell_prev,
                                 bool has_bias, bool input_grad, bool weight_grads) {
  const at::Tensor no_projection = at::empty({0, w_hh.size(1)}, input.options());
  auto [grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] =
      layer_backward_op().call(std::nullopt, grad_h, grad_c, input.unsqueeze(0), w_ih, w_hh,
                               std::nullopt, std::nullopt, gates, cell_prev, hx, no_projection,
                               /*reverse=*/false, has_bias, input_grad, weight_grads,
                               std::nullopt, std::nullopt, std::nullopt, std::nullopt);
  if (input_grad) grad_input = grad_input.squeeze(0);
  return {grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias};
}

// The autograd formulas of the cell and layer ops (LayerNorm too) live here rather than in
// ops.py: a formula
// registered from Python costs ~25 us a call with gradients (the arguments boxed into Python
// and back, twice), and more in backward, as much as a whole LSTMCell step at H 128, B 8 (one
// op call per time step). Backward with create_graph=True goes to an op that ops.py implements
// on the differentiable reference, so that the math is written once.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// An optional tensor argument as a saved tensor (undefined where absent), and back.
at::Tensor or_none(const std::optional<at::Tensor>& tensor) {
  return tensor.value_or(at::Tensor());
}

std::optional<at::Tensor> given(const at::Tensor& tensor) {
  return tensor.defined() ? std::optional<at::Tensor>(tensor) : std::nullopt;
}

using CellDifferentiableBackwardSignature = std::vector<at::Tensor>(
    const std::optional<at::Tensor>& grad_h, const std::optional<at::Tensor>& grad_c,
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh);

// needs_input_grad per argument of a forward whose tensor arguments are flagged in `tensors`
// (an absent optional one unflagged): it counts the tensors given only.
template <size_t N>
std::array<bool, N> grads_needed(AutogradContext* ctx, const std::array<bool, N>& tensors) {
  std::array<bool, N> needs{};
  for (size_t i = 0, edge = 0; i < N; ++i) {
    if (tensors[i]) needs[i] = ctx->needs_input_grad(edge++);
  }
  return needs;
}

// An op's Autograd kernel from its torch::autograd::Function F: F's outputs as the op's tuple,
// those F::kSaved names (saved state for backward) detached. They have no gradient, as marking
// them non-differentiable would say, which compiled autograd refuses in a C++ function.
template <class F, class Signature>
struct AutogradKernel;

template <class F, class Result, class... Args>
struct AutogradKernel<F, Result(Args...)> {
  static Result call(Args... args) {
    variable_list out = F::apply(args...);
    for (int i : F::kSaved) out[i] = out[i].detach();
    return as_tuple(out, std::make_index_sequence<std::tuple_size_v<Result>>());
  }

  template <size_t... I>
  static Result as_tuple(const variable_list& out, std::index_sequence<I...>) {
    return Result{out[I]...};
  }
};

struct CellFunction : torch::autograd::Function<CellFunction> {
  static constexpr std::array<int, 2> kSaved = {2, 3};  // gates, cell_prev

  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const at::Tensor& hx,
      const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
      const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
      bool training) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lstm_ext::lstm_cell_forward", "")
                               .typed<decltype(cell_forward)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [h, c, gates, cell_prev] =
        op.call(input, hx, cx, w_ih, w_hh, b_ih, b_hh, training);
    // Unused outputs get undefined gradients rather than zero-filled ones.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward(
        {input, hx, cx, w_ih, w_hh, or_none(b_ih), or_none(b_hh), gates, cell_prev});
    return {h, c, gates, cell_prev};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &hx = saved[1], &cx = saved[2], &w_ih = saved[3],
                     &w_hh = saved[4], &b_ih = saved[5], &b_hh = saved[6];
    const at::Tensor &grad_h = grads[0], &grad_c = grads[1];
    variable_list result(8);  // the last for `training`
    if (!grad_h.defined() && !grad_c.defined()) return result;
    const auto needs = grads_needed<7>(
        ctx, {true, true, true, true, true, b_ih.defined(), b_hh.defined()});
    if (at::GradMode::is_enabled()) {
      // create_graph=True: gradients that are differentiable themselves (ops.py builds them
      // from the step in torch ops).
      static const auto op =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("lstm_ext::lstm_cell_differentiable_backward", "")
              .typed<CellDifferentiableBackwardSignature>();
      const auto graph = op.call(given(grad_h), given(grad_c), input, hx, cx, w_ih, w_hh,
                                 given(b_ih), given(b_hh));
      for (int i = 0; i < 7; ++i) {
        if (needs[i]) result[i] = graph[i];
      }
      return result;
    }
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lstm_ext::lstm_cell_backward", "")
                               .typed<decltype(cell_backward)>();
    auto [grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias] =
        op.call(grad_h.defined() ? grad_h : at::zeros_like(hx),
                grad_c.defined() ? grad_c : at::zeros_like(cx), input, hx, w_ih, w_hh,
                saved[7], saved[8], b_ih.defined() || b_hh.defined(), needs[0],
                needs[3] || needs[4] || needs[5] || needs[6]);
    const at::Tensor all[7] = {grad_input, grad_hx,  grad_cx,  grad_w_ih,
                               grad_w_hh,  grad_bias, grad_bias};
    for (int i = 0; i < 7; ++i) {
      if (needs[i]) result[i] = all[i];
    }
    return result;
  }
};

struct LayerFunction : torch::autograd::Function<LayerFunction> {
  static constexpr std::array<int, 4> kSaved = {3, 4, 5, 6};  // all but output, h_n, c_n, cells

  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
      const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
      const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
      const std::optional<at::Tensor>& batch_sizes, bool reverse, bool training,
      const std::optional<at::Tensor>& recurrent_mask,
      const std::optional<at::Tensor>& zoneout_cell,
      const std::optional<at::Tensor>& zoneout_hidden, bool return_cells) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, h_n, c_n, gates, cell_prev, hidden_prev, hidden_raw, cells] =
        layer_forward_op().call(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes,
                                reverse, training, recurrent_mask, zoneout_cell,
                                zoneout_hidden, return_cells);
    ctx->set_materialize_grads(false);
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["return_cells"] = return_cells;
    ctx->save_for_backward({input, h0, c0, w_ih, w_hh, or_none(b_ih), or_none(b_hh),
                            or_none(w_hr), or_none(batch_sizes), gates, cell_prev, hidden_prev,
                            hidden_raw, or_none(recurrent_mask), or_none(zoneout_cell),
                            or_none(zoneout_hidden)});
    return {output, h_n, c_n, gates, cell_prev, hidden_prev, hidden_raw, cells};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &h0 = saved[1], &c0 = saved[2], &w_ih = saved[3],
                     &w_hh = saved[4], &b_ih = saved[5], &b_hh = saved[6], &w_hr = saved[7],
                     &batch_sizes = saved[8], &recurrent_mask = saved[13],
                     &zoneout_cell = saved[14], &zoneout_hidden = saved[15];
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const at::Tensor &grad_output = grads[0], &grad_h_n = grads[1], &grad_c_n = grads[2];
    // The cell sequence's, where the op returned one (without return_cells it is empty).
    const at::Tensor grad_cells =
        ctx->saved_data["return_cells"].toBool() ? grads[7] : at::Tensor();
    variable_list result(15);
    if (!grad_output.defined() && !grad_h_n.defined() && !grad_c_n.defined() &&
        !grad_cells.defined()) {
      return result;
    }
    const auto needs = grads_needed<15>(
        ctx, {true, true, true, true, true, b_ih.defined(), b_hh.defined(), w_hr.defined(),
              batch_sizes.defined(), false, false, recurrent_mask.defined(),
              zoneout_cell.defined(), zoneout_hidden.defined(), false});
    std::vector<at::Tensor> all;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      static const auto op =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("lstm_ext::lstm_layer_differentiable_backward", "")
              .typed<LayerDifferentiableBackwardSignature>();
      all = op.call(given(grad_output), given(grad_h_n), given(grad_c_n), given(grad_cells),
                    input, h0, c0, w_ih, w_hh, given(b_ih), given(b_hh), given(w_hr),
                    given(batch_sizes), reverse, given(recurrent_mask), given(zoneout_cell),
                    given(zoneout_hidden));
    } else {
      auto [grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] =
          layer_backward_op().call(
              given(grad_output), grad_h_n.defined() ? grad_h_n : at::zeros_like(h0),
              grad_c_n.defined() ? grad_c_n : at::zeros_like(c0), input, w_ih, w_hh,
              given(w_hr), given(batch_sizes), saved[9], saved[10], saved[11], saved[12],
              reverse, b_ih.defined() || b_hh.defined(), needs[0],
              needs[3] || needs[4] || needs[5] || needs[6] || needs[7], given(recurrent_mask),
              given(zoneout_cell), given(zoneout_hidden), given(grad_cells));
      all = {grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_bias,
             grad_w_hr};
    }
    for (int i = 0; i < 8; ++i) {
      if (needs[i]) result[i] = all[i];
    }
    return result;
  }
};

using LayerNormForwardSignature = std::tuple<
    at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
    at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes, bool reverse, bool training,
    const at::Tensor& ln_ih_weight, const at::Tensor& ln_ih_bias, const at::Tensor& ln_hh_weight,
    const at::Tensor& ln_hh_bias, const at::Tensor& ln_cell_weight,
    const at::Tensor& ln_cell_bias, const std::optional<at::Tensor>& recurrent_mask,
    const std::optional<at::Tensor>& zoneout_cell, const std::optional<at::Tensor>& zoneout_hidden);

using LayerNormBackwardSignature = std::tuple<
    at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
    at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const std::optional<at::Tensor>& grad_output, const at::Tensor& grad_h_n,
    const at::Tensor& grad_c_n, const at::Tensor& input, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes, const at::Tensor& ln_ih_weight,
    const at::Tensor& ln_ih_bias, const at::Tensor& ln_hh_weight, const at::Tensor& ln_hh_bias,
    const at::Tensor& ln_cell_weight, const at::Tensor& ln_cell_bias, const at::Tensor& gates,
    const at::Tensor& cell_prev, const at::Tensor& cell, const at::Tensor& products,
    const at::Tensor& input_products, const at::Tensor& stats, const at::Tensor& hidden_prev,
    const at::Tensor& hidden_raw, bool reverse, bool has_bias,
    const std::optional<at::Tensor>& recurrent_mask, bool input_grad,
    const std::optional<at::Tensor>& grad_cells, const std::optional<at::Tensor>& zoneout_cell,
    const std::optional<at::Tensor>& zoneout_hidden);

using LayerNormDifferentiableBackwardSignature = std::vector<at::Tensor>(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const std::optional<at::Tensor>& grad_cells,
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes, bool reverse, at::TensorList norms,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_cell,
    const std::optional<at::Tensor>& zoneout_hidden);

// The LayerNorm LSTM layer's. Outputs after output, h_n, c_n are saved state for backward,
// but `cell` (5), which layer_norm_forward can return as the cell sequence.
struct LayerNormFunction : torch::autograd::Function<LayerNormFunction> {
  static constexpr std::array<int, 7> kSaved = {3, 4, 6, 7, 8, 9, 10};

  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
      const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
      const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
      const std::optional<at::Tensor>& batch_sizes, bool reverse, bool training,
      const at::Tensor& ln_ih_weight, const at::Tensor& ln_ih_bias,
      const at::Tensor& ln_hh_weight, const at::Tensor& ln_hh_bias,
      const at::Tensor& ln_cell_weight, const at::Tensor& ln_cell_bias,
      const std::optional<at::Tensor>& recurrent_mask,
      const std::optional<at::Tensor>& zoneout_cell,
      const std::optional<at::Tensor>& zoneout_hidden) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lstm_ext::lstm_layer_norm_forward", "")
                               .typed<LayerNormForwardSignature>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto out = op.call(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse,
                             training, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
                             ln_cell_weight, ln_cell_bias, recurrent_mask, zoneout_cell,
                             zoneout_hidden);
    variable_list outputs = std::apply(
        [](const auto&... tensors) { return variable_list{tensors...}; }, out);
    ctx->set_materialize_grads(false);
    ctx->saved_data["reverse"] = reverse;
    variable_list saved = {input, h0, c0, w_ih, w_hh, or_none(b_ih), or_none(b_hh),
                           or_none(w_hr), or_none(batch_sizes), ln_ih_weight, ln_ih_bias,
                           ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias};
    saved.insert(saved.end(), outputs.begin() + 3, outputs.end());  // 15 to 22
    saved.push_back(or_none(recurrent_mask));
    saved.push_back(or_none(zoneout_cell));
    saved.push_back(or_none(zoneout_hidden));
    ctx->save_for_backward(saved);
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &h0 = saved[1], &c0 = saved[2], &w_ih = saved[3],
                     &w_hh = saved[4], &b_ih = saved[5], &b_hh = saved[6], &w_hr = saved[7],
                     &batch_sizes = saved[8], &recurrent_mask = saved[23],
                     &zoneout_cell = saved[24], &zoneout_hidden = saved[25];
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const at::Tensor &grad_output = grads[0], &grad_h_n = grads[1], &grad_c_n = grads[2],
                     &grad_cells = grads[5];
    variable_list result(20);
    if (!grad_output.defined() && !grad_h_n.defined() && !grad_c_n.defined() &&
        !grad_cells.defined()) {
      return result;
    }
    const auto needs = grads_needed<20>(
        ctx, {true, true, true, true, true, b_ih.defined(), b_hh.defined(), w_hr.defined(),
              batch_sizes.defined(), false, false, true, true, true, true, true, true,
              recurrent_mask.defined(), zoneout_cell.defined(), zoneout_hidden.defined()});
    // Gradients of input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, then the six norms'.
    std::vector<at::Tensor> all;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      static const auto op =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("lstm_ext::lstm_layer_norm_differentiable_backward", "")
              .typed<LayerNormDifferentiableBackwardSignature>();
      const std::vector<at::Tensor> norms(saved.begin() + 9, saved.begin() + 15);
      all = op.call(given(grad_output), given(grad_h_n), given(grad_c_n), given(grad_cells),
                    input, h0, c0, w_ih, w_hh, given(b_ih), given(b_hh), given(w_hr),
                    given(batch_sizes), reverse, norms, given(recurrent_mask),
                    given(zoneout_cell), given(zoneout_hidden));
    } else {
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("lstm_ext::lstm_layer_norm_backward", "")
                                 .typed<LayerNormBackwardSignature>();
      const auto g = op.call(
          given(grad_output), grad_h_n.defined() ? grad_h_n : at::zeros_like(h0),
          grad_c_n.defined() ? grad_c_n : at::zeros_like(c0), input, w_ih, w_hh, given(w_hr),
          given(batch_sizes), saved[9], saved[10], saved[11], saved[12], saved[13], saved[14],
          saved[15], saved[16], saved[17], saved[18], saved[19], saved[20], saved[21],
          saved[22], reverse, b_ih.defined() || b_hh.defined(), given(recurrent_mask),
          needs[0], given(grad_cells), given(zoneout_cell), given(zoneout_hidden));
      all = std::apply([](const auto&... tensors) { return std::vector<at::Tensor>{tensors...}; },
                       g);
      all.insert(all.begin() + 6, all[5]);  // grad_bias is b_ih's and b_hh's alike
    }
    for (int i = 0; i < 8; ++i) {
      if (needs[i]) result[i] = all[i];
    }
    for (int i = 0; i < 6; ++i) {
      if (needs[11 + i]) result[11 + i] = all[8 + i];
    }
    return result;
  }
};

using DropConnectSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& weight,
                                                                 double p);
using DropConnectBackwardSignature = at::Tensor(const at::Tensor& grad, const at::Tensor& kept,
                                                double p);

// DropConnect's: the gradient is the output's times the same mask, read back from the bits
// the forward kept.
struct DropConnectFunction : torch::autograd::Function<DropConnectFunction> {
  static constexpr std::array<int, 1> kSaved = {1};  // kept

  static variable_list forward(AutogradContext* ctx, const at::Tensor& weight, double p) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lstm_ext::drop_connect", "")
                               .typed<DropConnectSignature>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, kept] = op.call(weight, p);
    ctx->set_materialize_grads(false);
    ctx->saved_data["p"] = p;
    ctx->save_for_backward({kept});
    return {output, kept};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lstm_ext::drop_connect_backward", "")
                               .typed<DropConnectBackwardSignature>();
    const at::Tensor kept = ctx->get_saved_variables()[0];
    const double p = ctx->saved_data["p"].toDouble();
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return {at::Tensor(), at::Tensor()};
    if (at::GradMode::is_enabled()) {
      // create_graph=True: grad times the mask as a tensor, which torch differentiates.
      at::Tensor mask;
      {
        at::NoGradGuard no_grad;
        mask = op.call(at::ones_like(grad, at::MemoryFormat::Contiguous), kept, p);
      }
      return {grad * mask, at::Tensor()};
    }
    return {op.call(grad, kept, p), at::Tensor()};
  }
};

using Int8LayerSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_ih_scale, const at::Tensor& w_hh, const at::Tensor& w_hh_scale,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& w_hr_scale,
    const std::optional<at::Tensor>& batch_sizes, bool reverse);

const c10::TypedOperatorHandle<Int8LayerSignature>& int8_layer_forward_op() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("lstm_ext::lstm_int8_layer_forward", "")
                                 .typed<Int8LayerSignature>();
  return handle;
}

// All layers and directions of an LSTM for inference in one call: lstm_layer_forward (or, given
// scales, lstm_int8_layer_forward) per layer and direction through the dispatcher, so each
// reaches its device's kernel, under autocast too; a bidirectional layer's outputs side by side
// as the next layer's input. From Python a layer op call costs ~10 us of argument handling, as
// much as a decode step's layer of H 512 takes beyond reading its weights; here a deep model
// pays it once.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layers_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, at::TensorList weights,
    bool has_biases, int64_t num_layers, bool bidirectional,
    const std::optional<at::Tensor>& batch_sizes, at::TensorList scales) {
  const int64_t directions = bidirectional ? 2 : 1;
  const int64_t count = static_cast<int64_t>(weights.size());
  TORCH_CHECK(num_layers >= 1, "lstm_layers: num_layers must be at least 1, got ", num_layers);
  const int64_t plain = has_biases ? 4 : 2;
  const int64_t per = count / (num_layers * directions);
  TORCH_CHECK(count == per * num_layers * directions && (per == plain || per == plain + 1),
              "lstm_layers: expected ", plain, " weights per layer and direction (", plain + 1,
              " with projections) for ", num_layers, " layers and ", directions,
              " directions, got ", count);
  const bool projections = per == plain + 1;
  for (const auto& [name, state] : {std::pair{"h0", &h0}, std::pair{"c0", &c0}}) {
    TORCH_CHECK(state->dim() == 3 && state->size(0) == num_layers * directions,
                "lstm_layers: expected ", name, " of shape (num_layers * directions = ",
                num_layers * directions, ", batch, size), got ", state->sizes());
  }
  // int8 weights: a scale for each weight matrix (not the biases), in the weights' order.
  const bool int8 = !scales.empty();
  const int64_t per_scales = projections ? 3 : 2;
  const int64_t matrices = per_scales * num_layers * directions;
  TORCH_CHECK(!int8 || static_cast<int64_t>(scales.size()) == matrices,
              "lstm_layers: expected a scale for each of the ", matrices,
              " weight matrices (w_ih, w_hh", projections ? ", w_hr" : "",
              " per layer and direction), got ", scales.size());
  const auto optional = [](bool present, const at::Tensor& tensor) {
    return present ? std::optional<at::Tensor>(tensor) : std::nullopt;
  };
  std::vector<at::Tensor> h_n, c_n;
  at::Tensor layer_input = input;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    std::vector<at::Tensor> outputs;
    for (int64_t direction = 0; direction < directions; ++direction) {
      const int64_t index = layer * directions + direction;
      const at::Tensor* w = weights.data() + index * per;
      const std::optional<at::Tensor> b_ih = optional(has_biases, w[2]);
      const std::optional<at::Tensor> b_hh = optional(has_biases, w[3]);
      const std::optional<at::Tensor> w_hr = optional(projections, w[per - 1]);
      const at::Tensor h = h0.select(0, index), c = c0.select(0, index);
      at::Tensor output, h_last, c_last;
      if (int8) {
        const at::Tensor* scale = scales.data() + index * per_scales;
        std::tie(output, h_last, c_last) = int8_layer_forward_op().call(
            layer_input, h, c, w[0], scale[0], w[1], scale[1], b_ih, b_hh, w_hr,
            optional(projections, scale[per_scales - 1]), batch_sizes, direction == 1);
      } else {
        std::tie(output, h_last, c_last, std::ignore, std::ignore, std::ignore, std::ignore,
                 std::ignore) =
            layer_forward_op().call(layer_input, h, c, w[0], w[1], b_ih, b_hh, w_hr,
                                    batch_sizes, /*reverse=*/direction == 1, /*training=*/false,
                                    std::nullopt, std::nullopt, std::nullopt,
                                    /*return_cells=*/false);
      }
      outputs.push_back(std::move(output));
      h_n.push_back(std::move(h_last));
      c_n.push_back(std::move(c_last));
    }
    layer_input = directions == 1 ? outputs[0] : at::cat(outputs, -1);
  }
  return {layer_input, at::stack(h_n), at::stack(c_n)};
}

}  // namespace

TORCH_LIBRARY(lstm_ext, m) {
  // One layer, one direction, whole sequence. input is (T, B, I) padded, or (N, I) packed with
  // batch_sizes (T,) as in PackedSequence. Returns output (T, B, R) or (N, R), h_n (B, R),
  // c_n (B, H), then what backward needs (all empty unless training): gate activations (N, 4H),
  // the cell entering each step (N, H, math dtype), h entering each step (N, R), and h before
  // the projection (N, H; empty without w_hr). The variants, in the math dtype where given:
  // recurrent_mask (B, R) multiplies h before every W_hh product (recurrent dropout;
  // hidden_prev is h times it); zoneout_cell (N or 1, H) and zoneout_hidden (N or 1, R) are
  // zoneout's weights d of the previous state, c = d c_prev + (1 - d) c~ (h likewise). With
  // return_cells, cells is c after every step (N, H) like output, else empty.
  m.def(
      "lstm_layer_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, "
      "bool training, Tensor? recurrent_mask=None, Tensor? zoneout_cell=None, "
      "Tensor? zoneout_hidden=None, bool return_cells=False) -> (Tensor output, Tensor h_n, "
      "Tensor c_n, Tensor gates, Tensor cell_prev, Tensor hidden_prev, Tensor hidden_raw, "
      "Tensor cells)");
  // Gradients of lstm_layer_forward; an absent grad_output counts as zero. Returns
  // (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr); grad_bias is
  // the gradient of b_ih and of b_hh alike. Gradients not asked for (input_grad,
  // weight_grads) or without a parameter (has_bias, w_hr) are empty. The variants' tensors
  // are the forward's; grad_cells, where given, is the gradient of its cells (N, H).
  m.def(
      "lstm_layer_backward(Tensor? grad_output, Tensor grad_h_n, Tensor grad_c_n, "
      "Tensor input, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, "
      "Tensor gates, Tensor cell_prev, Tensor hidden_prev, Tensor hidden_raw, bool reverse, "
      "bool has_bias, bool input_grad, bool weight_grads, Tensor? recurrent_mask=None, "
      "Tensor? zoneout_cell=None, Tensor? zoneout_hidden=None, Tensor? grad_cells=None) -> ("
      "Tensor grad_input, "
      "Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, "
      "Tensor grad_w_hr)");
  // The LayerNorm LSTM's layer (layer_norm_lstm.cpp): lstm_layer_forward's arguments and
  // outputs, plus the gains and biases of the norms of W_ih x and W_hh h (4H each) and of c
  // (H); what backward needs is all in the math dtype: gate activations (N, 4H), c before and
  // after each step (N, H), W_hh h and W_ih x before their norms (N, 4H each), the norms'
  // means and 1/std (N, 6), h entering each step (N, R) and h before the projection (N, H).
  m.def(
      "lstm_layer_norm_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, "
      "bool training, Tensor ln_ih_weight, Tensor ln_ih_bias, Tensor ln_hh_weight, "
      "Tensor ln_hh_bias, Tensor ln_cell_weight, Tensor ln_cell_bias, "
      "Tensor? recurrent_mask=None, Tensor? zoneout_cell=None, Tensor? zoneout_hidden=None) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, "
      "Tensor cell_prev, Tensor cell, Tensor products, Tensor input_products, Tensor stats, "
      "Tensor hidden_prev, Tensor hidden_raw)");
  // Its gradients: lstm_layer_backward's seven (grad_input empty unless input_grad), then the
  // six norm parameters'. grad_cells: the gradient of `cell` (c after each step and after any
  // zoneout, (N, H) in the math dtype) where forward's cell sequence was returned.
  m.def(
      "lstm_layer_norm_backward(Tensor? grad_output, Tensor grad_h_n, Tensor grad_c_n, "
      "Tensor input, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, "
      "Tensor ln_ih_weight, Tensor ln_ih_bias, Tensor ln_hh_weight, Tensor ln_hh_bias, "
      "Tensor ln_cell_weight, Tensor ln_cell_bias, Tensor gates, Tensor cell_prev, "
      "Tensor cell, Tensor products, Tensor input_products, Tensor stats, "
      "Tensor hidden_prev, Tensor hidden_raw, bool reverse, bool has_bias, "
      "Tensor? recurrent_mask=None, bool input_grad=True, Tensor? grad_cells=None, "
      "Tensor? zoneout_cell=None, Tensor? zoneout_hidden=None) -> ("
      "Tensor grad_input, "
      "Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, "
      "Tensor grad_w_hr, Tensor grad_ln_ih_weight, Tensor grad_ln_ih_bias, "
      "Tensor grad_ln_hh_weight, Tensor grad_ln_hh_bias, Tensor grad_ln_cell_weight, "
      "Tensor grad_ln_cell_bias)");
  // One layer, one direction, inference, with int8 weights (one fp32 scale per row: the
  // weight is w * scale[:, None]) and fp32 input, state and gate math; CPU only (cpu/
  // quantized.cpp). Returns output, h_n, c_n as lstm_layer_forward does.
  m.def(
      "lstm_int8_layer_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, "
      "Tensor w_ih_scale, Tensor w_hh, Tensor w_hh_scale, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? w_hr, Tensor? w_hr_scale, Tensor? batch_sizes, bool reverse) -> "
      "(Tensor output, Tensor h_n, Tensor c_n)");
  // Every layer and direction of an LSTM at once, for inference (nothing saved for backward):
  // input (T, B, I) or packed (N, I) with batch_sizes; h0 (L * D, B, R) and c0 (L * D, B, H);
  // weights as nn.LSTM's _flat_weights (w_ih, w_hh[, b_ih, b_hh][, w_hr] per layer and
  // direction). Returns output, h_n, c_n as nn.LSTM does. Made of lstm_layer_forward calls,
  // or given scales (one per weight matrix, in order; none for float weights) of
  // lstm_int8_layer_forward calls.
  m.def(
      "lstm_layers(Tensor input, Tensor h0, Tensor c0, Tensor[] weights, bool has_biases, "
      "int num_layers, bool bidirectional, Tensor? batch_sizes, Tensor[] scales) -> ("
      "Tensor output, Tensor h_n, Tensor c_n)");
  // One step of an LSTMCell: input (B, I), hx and cx (B, H). Returns h', c', then what
  // backward needs (empty unless training): gate activations (B, 4H) and cx in the math dtype.
  m.def(
      "lstm_cell_forward(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, bool training) -> (Tensor h, Tensor c, Tensor gates, "
      "Tensor cell_prev)");
  m.def(
      "lstm_cell_backward(Tensor grad_h, Tensor grad_c, Tensor input, Tensor hx, "
      "Tensor w_ih, Tensor w_hh, Tensor gates, Tensor cell_prev, bool has_bias, "
      "bool input_grad, bool weight_grads) -> (Tensor grad_input, Tensor grad_hx, "
      "Tensor grad_cx, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");
  // The layer's gradients for backward with create_graph=True, differentiable themselves:
  // those of input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, in that order (empty for an absent
  // tensor or one that needs none). Implemented in ops.py, in torch ops.
  m.def(
      "lstm_layer_differentiable_backward(Tensor? grad_output, Tensor? grad_h_n, "
      "Tensor? grad_c_n, Tensor? grad_cells, Tensor input, Tensor h0, Tensor c0, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, "
      "bool reverse, Tensor? recurrent_mask, Tensor? zoneout_cell, Tensor? zoneout_hidden) -> "
      "Tensor[]");
  // The same for lstm_layer_norm_forward: those of input, h0, c0, w_ih, w_hh, b_ih, b_hh,
  // w_hr, then of the six norm parameters (norms, in the forward's order).
  m.def(
      "lstm_layer_norm_differentiable_backward(Tensor? grad_output, Tensor? grad_h_n, "
      "Tensor? grad_c_n, Tensor? grad_cells, Tensor input, Tensor h0, Tensor c0, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, "
      "bool reverse, Tensor[] norms, Tensor? recurrent_mask, Tensor? zoneout_cell, "
      "Tensor? zoneout_hidden) -> Tensor[]");
  // The cell's gradients for backward with create_graph=True, differentiable themselves:
  // those of input, hx, cx, w_ih, w_hh, b_ih, b_hh, in that order (empty for an absent bias
  // or a tensor that needs none). Implemented in ops.py, in torch ops.
  m.def(
      "lstm_cell_differentiable_backward(Tensor? grad_h, Tensor? grad_c, Tensor input, "
      "Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) -> Tensor[]");
}

TORCH_LIBRARY_FRAGMENT(lstm_ext, m) {
  // Whether the CPU per-step GEMMs use MKL's packed weights (see cpu/step_product.h).
  m.def("cpu_packed_gemm_enabled() -> bool", &packed_gemm_enabled);
  // The instruction set the CPU kernels run with: "avx512", "avx2" or "baseline" (see
  // cpu/isa.h; LSTM_EXT_CPU_ISA picks a lower one).
  m.def("cpu_isa() -> str", [] { return std::string(cpu::isa_name(cpu::active_isa())); });
  // Test-only: the form the fused forward recurrence takes for a layer call of these sizes
  // (cpu/forward_plan.h), on this CPU and torch's thread count.
  m.def("_cpu_forward_plan(int batch, int steps, int hidden, int input_size, ScalarType dtype, "
        "bool input_offered, bool training) -> str",
        &cpu::forward_plan_name);
  // Test-only: writes one byte past the end of `target`'s memory, so that a memory checker
  // (AddressSanitizer on the CPU, compute-sanitizer on CUDA) can be shown to report an overrun
  // before its clean verdict is trusted. Refused unless LSTM_EXT_TEST_OVERRUN=1.
  m.def("_test_overrun(Tensor(a!) target) -> ()");
  // The variants' masks on the CPU (cpu/random_mask.h): a new (size) tensor of fp32 or fp64,
  // each entry `value` with probability `probability`, else 0, from torch's default CPU
  // generator. Tagged as a random op, so that a compiler never merges two equal calls.
  m.def("bernoulli_mask(SymInt[] size, float probability, float value, ScalarType dtype) -> "
        "Tensor",
        {at::Tag::nondeterministic_seeded});
  // DropConnect (weight drop) on the CPU (cpu/random_mask.h), fp32 and fp64: weight * M for a
  // fresh M of entries 1 / (1 - p) with probability 1 - p, else 0 (the mask bernoulli_mask
  // would draw in its place), and which entries M kept, as bits for the backward.
  m.def("drop_connect(Tensor weight, float p) -> (Tensor output, Tensor kept)",
        {at::Tag::nondeterministic_seeded});
  // drop_connect's gradient: grad * M, for the M whose bits `kept` holds.
  m.def("drop_connect_backward(Tensor grad, Tensor kept, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(lstm_ext, CPU, m) {
  m.impl("_test_overrun", [](const at::Tensor& target) {
    check_overrun_target(target);
    // volatile: the write must happen, though nothing reads it.
    auto* past_end = static_cast<volatile unsigned char*>(target.data_ptr()) + target.nbytes();
    *past_end = 1;
  });
  m.impl("drop_connect", &cpu::drop_connect);
  m.impl("drop_connect_backward", &cpu::drop_connect_backward);
}

TORCH_LIBRARY_IMPL(lstm_ext, AutocastCPU, m) {
  m.impl("lstm_layer_forward", &layer_forward_autocast<c10::DeviceType::CPU>);
  m.impl("lstm_cell_forward", &cell_forward_autocast<c10::DeviceType::CPU, false>);
}

TORCH_LIBRARY_IMPL(lstm_ext, AutocastCUDA, m) {
  m.impl("lstm_layer_forward", &layer_forward_autocast<c10::DeviceType::CUDA>);
  m.impl("lstm_cell_forward", &cell_forward_autocast<c10::DeviceType::CUDA, true>);
}

TORCH_LIBRARY_IMPL(lstm_ext, Autograd, m) {
  m.impl("lstm_layer_forward", &AutogradKernel<LayerFunction, LayerForwardSignature>::call);
  m.impl("lstm_layer_norm_forward",
         &AutogradKernel<LayerNormFunction, LayerNormForwardSignature>::call);
  m.impl("lstm_cell_forward", &AutogradKernel<CellFunction, decltype(cell_forward)>::call);
  m.impl("drop_connect", &AutogradKernel<DropConnectFunction, DropConnectSignature>::call);
}

TORCH_LIBRARY_IMPL(lstm_ext, CompositeImplicitAutograd, m) {
  m.impl("lstm_layers", &layers_forward);
}

TORCH_LIBRARY_IMPL(lstm_ext, CompositeExplicitAutograd, m) {
  // No tensor argument to dispatch on: the mask is always made on the CPU.
  m.impl("bernoulli_mask", &cpu::bernoulli_mask);
  m.impl("lstm_cell_forward", &cell_forward);
  m.impl("lstm_cell_backward", &cell_backward);
}

}  // namespace lstm_ext
