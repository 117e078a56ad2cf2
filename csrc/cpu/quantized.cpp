// The int8 LSTM layer (lstm_int8_layer_forward): weights stored as int8 with one fp32 scale per
// row, input, state and gate math in fp32. Batches the recurrence reads W_hh in place for (a
// decode step, short small-batch sequences) run its dot products on the int8 rows, a quarter
// of the bytes of fp32 weights, times h rounded to int16 per row (dot.h), and x (rounded the
// same way) by int8 W_ih in the same pass.
// Larger batches dequantize W_hh straight into the recurrence's panels (the input projection
// runs on dequantized W_ih); a projection runs the fp32 layer on dequantized weights.
#include "../lstm_layer.h"
#include "../op_signatures.h"
#include "linear.h"
#include "recurrence.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace lstm_ext {
namespace {

constexpr const char* kOp = "lstm_int8_layer_forward";

void check_int8_weight(const at::Tensor& weight, const at::Tensor& scale, const char* name) {
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2, kOp, ": ", name,
              " must be a 2-D int8 tensor, got ", weight.dim(), "-D ", weight.scalar_type());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 &&
                  scale.size(0) == weight.size(0),
              kOp, ": the scale of ", name, " must be a float32 tensor of ", weight.size(0),
              " values (one per row), got ", scale.scalar_type(), " of shape ", scale.sizes());
  TORCH_CHECK(weight.device().is_cpu() && scale.device().is_cpu(), kOp,
              ": int8 weights run on the CPU only, got ", name, " on ", weight.device());
}

// weight (R, K) as fp32 times its row's scale, in one pass over the rows in parallel: at 4096 x
// 1024 on the Xeon (family 6 model 167) 2 ms a call, where the conversion and the product as
// two tensor ops (twice the fp32 traffic) took 5. The same products, so the same bits.
at::Tensor dequantized(const at::Tensor& weight, const at::Tensor& scale) {
  const at::Tensor w = weight.contiguous();
  const at::Tensor scales = scale.contiguous();
  const int64_t R = w.size(0), K = w.size(1);
  at::Tensor out = at::empty({R, K}, scales.options());
  const int8_t* from = w.const_data_ptr<int8_t>();
  const float* row_scale = scales.const_data_ptr<float>();
  float* to = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, K));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float factor = row_scale[r];
      for (int64_t k = 0; k < K; ++k) to[r * K + k] = static_cast<float>(from[r * K + k]) * factor;
    }
  });
  return out;
}

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Result int8_layer_forward(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                          const at::Tensor& w_ih, const at::Tensor& w_ih_scale,
                          const at::Tensor& w_hh, const at::Tensor& w_hh_scale,
                          const std::optional<at::Tensor>& b_ih,
                          const std::optional<at::Tensor>& b_hh,
                          const std::optional<at::Tensor>& w_hr,
                          const std::optional<at::Tensor>& w_hr_scale,
                          const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  check_int8_weight(w_ih, w_ih_scale, "w_ih");
  check_int8_weight(w_hh, w_hh_scale, "w_hh");
  TORCH_CHECK(w_hr.has_value() == w_hr_scale.has_value(), kOp,
              ": w_hr and w_hr_scale come together");
  if (w_hr.has_value()) check_int8_weight(*w_hr, *w_hr_scale, "w_hr");
  TORCH_CHECK(input.scalar_type() == at::kFloat, kOp, ": input must be float32, got ",
              input.scalar_type());
  // The fp32 checks, on stand-ins with the weights' shapes that take no memory.
  const auto shaped_like = [&](const at::Tensor& w) {
    return at::empty({1}, input.options()).expand(w.sizes());
  };
  const LayerShape s = layer_shape(
      kOp, input, shaped_like(w_ih), shaped_like(w_hh),
      w_hr.has_value() ? std::optional<at::Tensor>(shaped_like(*w_hr)) : std::nullopt,
      batch_sizes);
  check_state(kOp, s, input, h0, c0, "h0 (batch, proj_size or hidden_size)",
              "c0 (batch, hidden_size)");
  check_bias(kOp, s, input, b_ih, "b_ih (4*hidden)");
  check_bias(kOp, s, input, b_hh, "b_hh (4*hidden)");

  const int64_t H = s.hidden_size;
  if (!s.has_projection && cpu::recurrence_enabled()) {
    const at::Tensor x = input.reshape({s.rows, s.input_size}).contiguous();
    const at::Tensor w_ih_rows = w_ih.contiguous(), w_hh_rows = w_hh.contiguous();
    const at::Tensor ih_scale = w_ih_scale.contiguous(), hh_scale = w_hh_scale.contiguous();
    const std::optional<at::Tensor> bias_ih =
        b_ih.has_value() ? std::optional<at::Tensor>(b_ih->contiguous()) : std::nullopt;
    const std::optional<at::Tensor> bias_hh =
        b_hh.has_value() ? std::optional<at::Tensor>(b_hh->contiguous()) : std::nullopt;
    at::Tensor output = at::empty({s.rows, H}, input.options());
    at::Tensor h_state = h0.contiguous().clone();
    at::Tensor c_state = c0.contiguous().clone();
    at::Tensor gates;
    SequenceForward<float> a{};
    static_cast<SequenceLayout&>(a) = sequence_layout(s, reverse);
    a.cell = c_state.data_ptr<float>();
    a.hidden_state = h_state.data_ptr<float>();
    a.output = output.data_ptr<float>();
    a.w_stride0 = H;
    a.w_stride1 = 1;
    a.w_hh_int8 = w_hh_rows.const_data_ptr<int8_t>();
    a.w_hh_scale = hh_scale.const_data_ptr<float>();
    if (cpu::direct_form(s.batch, s.steps)) {
      // W_ih's products in the same pass, on the int8 rows: no dequantized copy of W_ih and no
      // separate product (at B 4 x T 25, H 512, 20 % faster than those on the Zen 5).
      a.input = x.const_data_ptr<float>();
      a.input_size = s.input_size;
      a.input_stride = s.input_size;
      a.w_ih_int8 = w_ih_rows.const_data_ptr<int8_t>();
      a.w_ih_scale = ih_scale.const_data_ptr<float>();
      a.w_ih_stride = s.input_size;
    } else {
      // The kernel adds the biases to the gates as it reads them.
      gates = cpu_linear(x, dequantized(w_ih_rows, ih_scale), std::nullopt).contiguous();
      a.gates = gates.data_ptr<float>();
    }
    a.b_ih = bias_ih.has_value() ? bias_ih->const_data_ptr<float>() : nullptr;
    a.b_hh = bias_hh.has_value() ? bias_hh->const_data_ptr<float>() : nullptr;
    TORCH_CHECK(cpu::run_forward(a), kOp, ": the recurrence declined the int8 weights");
    return {s.packed ? output : output.view({s.steps, s.batch, H}), h_state, c_state};
  }
  // A projection (or LSTM_EXT_CPU_RECURRENCE=0): the fp32 layer on the dequantized weights.
  const auto outputs = layer_forward_op().call(
      input, h0, c0, dequantized(w_ih, w_ih_scale), dequantized(w_hh, w_hh_scale), b_ih, b_hh,
      w_hr.has_value() ? std::optional<at::Tensor>(dequantized(*w_hr, *w_hr_scale))
                       : std::nullopt,
      batch_sizes, reverse, /*training=*/false, std::nullopt, std::nullopt, std::nullopt,
      /*return_cells=*/false);
  return {std::get<0>(outputs), std::get<1>(outputs), std::get<2>(outputs)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_ext, CPU, m) {
  m.impl("lstm_int8_layer_forward", &int8_layer_forward);
}

}  // namespace lstm_ext
