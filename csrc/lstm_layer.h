// The step loop of one layer and one direction, shared by the CPU and CUDA implementations.
//
// The whole-sequence GEMMs go through ATen (MKL/oneDNN on the CPU, cuBLAS on the current stream
// on CUDA), so this file is device-agnostic; a device supplies the fused elementwise passes and
// the per-step GEMM through a `Kernels` policy:
//
//   template <typename scalar_t> static void forward_step(const ForwardStep<scalar_t>&);
//   template <typename scalar_t> static void backward_step(const BackwardStep<scalar_t>&);
//   static std::unique_ptr<StepProduct> step_product(const at::Tensor& weight, int64_t steps,
//                                                    int64_t batch);
//   static at::Tensor kept_linear(const at::Tensor& x, const at::Tensor& w,
//                                 const std::optional<at::Tensor>& bias,
//                                 cpu::Saved kind);  // x w^T + bias, (M, N), outliving the call
//   static bool wants_transposed_gate_gradients(at::ScalarType dtype);  // for dW's products
//   static bool reads_broadcast_gradients();  // backward_sequence takes grad_output_stride 0
//   static at::Tensor gate_gradients(bool transposed, at::IntArrayRef sizes,
//                                    const at::TensorOptions& options);  // backward's scratch
//
// A StepProduct is the per-step GEMM with one weight used at every step; a device may prepare
// the weight once per call (transpose, pack) to make the small per-step products faster.
//
// Forward: one GEMM for the input projection of every step (both biases folded in), then per
// step one GEMM adds W_hh h into that step's gate rows and one elementwise pass applies the
// gates. Backward walks the steps the other way: an elementwise pass turns dh, dc into gate
// gradients, one GEMM carries dh to the previous step; after the loop dx, dW_ih, dW_hh, the bias
// and projection gradients are each one GEMM or reduction over all steps.
//
// The per-step GEMMs and elementwise passes show in torch.profiler as lstm_ext::step_gemm and
// lstm_ext::step_elementwise (free when no profiler runs).
#pragma once

#include "cpu/workspace.h"
#include "gemm_plan.h"
#include "lstm_common.h"
#include "op_signatures.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/record_function.h>
#include <c10/core/DeviceGuard.h>

#include <memory>
#include <tuple>

namespace lstm_ext {

template <typename scalar_t>
struct ForwardStep {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t rows;              // sequences active in this step
  int64_t hidden;            // H
  scalar_t* gates;           // (rows, 4H): pre-activations in; activations out (required if
                             // save_gates, else the kernel may leave them or not)
  acc_t* cell;               // (rows, H): c in, c' out
  acc_t* cell_prev_saved;    // (rows, H) copy of c for backward, or null
  scalar_t* hidden_out;      // (rows, H): h' = o * tanh(c')
  scalar_t* hidden_state;    // (rows, H): h in, h' out (the recurrent state), or null
  scalar_t* hidden_prev_saved;  // (rows, H) copy of h as it entered (from hidden_state,
                                // before it is overwritten) for backward, or null
  bool save_gates;
};

template <typename scalar_t>
struct BackwardStep {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t rows;
  int64_t hidden;
  const scalar_t* gates;       // (rows, 4H) activations saved by forward
  const acc_t* cell_prev;      // (rows, H)
  const scalar_t* grad_h;      // (rows, H) gradient of h', or null for zero
  const scalar_t* grad_h_extra;  // (rows, H) second term added to grad_h, or null
  acc_t* grad_cell;            // (rows, H): dc' in, dc out
  scalar_t* grad_gates;        // (rows, 4H) out: gradients of the gate pre-activations
};

// A device may run the whole time loop of a layer-direction as one kernel (the CPU does, with
// or without a projection; CUDA without); these are its arguments, and the Kernels policy's
//   template <typename scalar_t> static bool forward_sequence(const SequenceForward<scalar_t>&);
//   template <typename scalar_t> static bool backward_sequence(const SequenceBackward<scalar_t>&);
// return false where the device has no such kernel, and the step loop below runs instead.
// The steps of one layer-direction (see LayerShape), as the whole-sequence kernels read them.
struct SequenceLayout {
  int64_t steps, batch, hidden;
  const int64_t* step_size;    // (T,)
  const int64_t* step_offset;  // (T,)
  bool reverse;
};

inline SequenceLayout sequence_layout(const LayerShape& s, bool reverse) {
  return {s.steps, s.batch, s.hidden_size, s.step_size.data(), s.step_offset.data(), reverse};
}

// The whole forward recurrence of one layer-direction. gates holds the input projection,
// (N, 4H), with both biases, or without them where b_ih and b_hh are given: the kernel adds
// them (where the Kernels policy's static bool sequence_handles_biases() says its kernels add
// the biases forward and sum their gradient backward). The W_hh h products are added here.
// Or, with input set, the kernel multiplies x by W_ih itself where it can (a decode step in
// inference; bf16 panels on the CPU), so that no separate product runs; gates is then null in
// inference (no (N, 4H) tensor is made), and in training receives the activations only. A
// kernel that cannot declines (false), and the caller makes the projection after all.
template <typename scalar_t>
struct SequenceForward : SequenceLayout {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* gates;             // (N, 4H): pre-activations in (unless input is set); activations
                               // out if save_gates
  const scalar_t* input;       // x (N, I), rows input_stride apart, or null
  int64_t input_size, input_stride;
  const scalar_t* w_ih;        // with input: (4H, I), rows w_ih_stride apart
  int64_t w_ih_stride;
  const scalar_t* b_ih;        // the biases (4H,) the kernel adds, or null
  const scalar_t* b_hh;
  // int8 weights (the CPU's int8 LSTM, fp32 only: read in place by the dot products of small
  // batches, dequantized into the panels of larger ones): W_hh and, with input set, W_ih as
  // int8 rows (strides as above) with one fp32 scale per row; w_hh and w_ih then point
  // nowhere. Null otherwise.
  const int8_t* w_hh_int8;
  const float* w_hh_scale;
  const int8_t* w_ih_int8;
  const float* w_ih_scale;
  acc_t* cell;                 // (B, H): c0 in, c_n out
  scalar_t* hidden_state;      // (B, H): h0 in, h_n out
  scalar_t* output;            // (N, H)
  acc_t* cell_prev_saved;      // (N, H) c entering each step, or null
  scalar_t* hidden_prev_saved;  // (N, H) h entering each step (times the mask), or null
  bool save_gates;
  const scalar_t* w_hh;        // (4H, H) with the strides below
  int64_t w_stride0, w_stride1;
  const acc_t* recurrent_mask;  // (B, H): multiplies h before every W_hh product, or null
  // Zoneout (see checked_zoneout): d of c and of h for row n at [n * stride + j] (stride 0:
  // one row for all), or null.
  const acc_t* zoneout_cell;
  int64_t zoneout_cell_stride;
  const acc_t* zoneout_hidden;
  int64_t zoneout_hidden_stride;
  scalar_t* cells;             // (N, H): c after each step, or null
  // With a projection (P = projection_size): W_hr (P, H) with its strides, or null without.
  // hidden_state, output and hidden_prev_saved are then P wide, and the h before the
  // projection goes to hidden_raw: row offset + r of step t with raw_every_step (training, for
  // W_hr's gradient), row r otherwise.
  const scalar_t* w_hr;
  int64_t w_hr_stride0, w_hr_stride1, projection_size;
  scalar_t* hidden_raw;
  bool raw_every_step;
  // Workspace, allocated by the device kernel that runs this: the forward panels, and h in
  // the math type: [h0, h of even steps, h of odd steps], each (B, H).
  acc_t* panel;
  acc_t* h_work;
};

// The whole backward recurrence of one layer-direction: gate gradients of every step and the
// gradients of h0 and c0.
template <typename scalar_t>
struct SequenceBackward : SequenceLayout {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gates;       // (N, 4H) activations saved by forward
  const acc_t* cell_prev;      // (N, H)
  const scalar_t* grad_output;  // (N, H), or null for zero
  int64_t grad_output_stride;  // between its rows: H, or 0 where one row stands for all N
  scalar_t* grad_hidden;       // (B, H): grad of h_n in, grad of h0 out
  acc_t* grad_cell;            // (B, H): grad of c_n in, grad of c0 out
  scalar_t* grad_gates;        // (N, 4H) out
  scalar_t* grad_gates_t;      // (4H, N) out, the same transposed, or null
  acc_t* grad_bias;            // (4H,) out: the gate gradients summed over all N rows, or null
  int64_t rows;                // N
  const scalar_t* w_hh;        // (4H, H)
  int64_t w_stride0, w_stride1;
  const acc_t* recurrent_mask;  // (B, H) as in SequenceForward: multiplies the carried dh
  const acc_t* zoneout_cell;    // as in SequenceForward
  int64_t zoneout_cell_stride;
  const acc_t* zoneout_hidden;
  int64_t zoneout_hidden_stride;
  acc_t* zoneout_carry;  // with zoneout_hidden, (B, H or P): d * dh of the step after, per sequence
  const scalar_t* grad_cells;  // (N, H): gradient of the c after each step, or null
  // With a projection (as in SequenceForward): grad_output and grad_hidden are P wide, and
  // grad_projected (N, P) gets the gradient of each step's output after the projection (from
  // the output and from the steps after), for W_hr's gradient.
  const scalar_t* w_hr;
  int64_t w_hr_stride0, w_hr_stride1, projection_size;
  scalar_t* grad_projected;
  // Workspace: the backward panels, the gate gradients of the last two steps in the math
  // type, 2 x (B, 4H) (bf16 storage only), and per thread the dh carried into a step for one
  // block of units.
  acc_t* panel;
  acc_t* grad_work;
  acc_t* carry_work;
};

// out (rows, N) = in (rows, K) @ weight (K, N), or out += ... with accumulate. `in` and `out` are
// row-contiguous; the same weight serves every step of one call.
class StepProduct {
 public:
  virtual ~StepProduct() = default;
  virtual void run(const at::Tensor& in, at::Tensor& out, bool accumulate) = 0;
};

inline MatrixLayout layout_of(const at::Tensor& matrix) {
  return {matrix.size(0), matrix.size(1), matrix.stride(0), matrix.stride(1)};
}

// Plain ATen GEMMs on the weight as given (any strides).
class AtenStepProduct final : public StepProduct {
 public:
  explicit AtenStepProduct(at::Tensor weight) : weight_(std::move(weight)) {}
  void run(const at::Tensor& in, at::Tensor& out, bool accumulate) override {
    if (accumulate) {
      out.addmm_(in, weight_);
    } else {
      at::mm_out(out, in, weight_);
    }
  }

 private:
  at::Tensor weight_;
};

using ForwardResult = LayerForwardResult;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor>;

// W_hr (P, H) into a sequence kernel's arguments (SequenceForward or SequenceBackward).
template <typename scalar_t, typename Args>
void set_projection(Args& a, const at::Tensor& w_hr) {
  a.w_hr = w_hr.const_data_ptr<scalar_t>();
  a.w_hr_stride0 = w_hr.stride(0);
  a.w_hr_stride1 = w_hr.stride(1);
  a.projection_size = w_hr.size(0);
}

template <typename scalar_t>
scalar_t* rows_ptr(const at::Tensor& t, int64_t row) {
  return t.data_ptr<scalar_t>() + row * t.size(1);
}

template <typename Kernels>
ForwardResult layer_forward(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                            const at::Tensor& w_ih, const at::Tensor& w_hh,
                            const std::optional<at::Tensor>& b_ih,
                            const std::optional<at::Tensor>& b_hh,
                            const std::optional<at::Tensor>& w_hr,
                            const std::optional<at::Tensor>& batch_sizes, bool reverse,
                            bool training, const std::optional<at::Tensor>& recurrent_mask,
                            const std::optional<at::Tensor>& zoneout_cell,
                            const std::optional<at::Tensor>& zoneout_hidden, bool return_cells) {
  constexpr const char* op = "lstm_layer_forward";
  // The products inside run in the dtypes the op was given (under torch.autocast, the ones
  // ops.cpp's autocast wrapper chose), never recast by autocast on their way to ATen.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const LayerShape s =
      checked_forward_args(op, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes);
  const std::optional<at::Tensor> mask = checked_recurrent_mask(op, s, input, recurrent_mask);
  const std::optional<at::Tensor> zone_c =
      checked_zoneout(op, s, input, zoneout_cell, s.hidden_size, "zoneout_cell");
  const std::optional<at::Tensor> zone_h =
      checked_zoneout(op, s, input, zoneout_hidden, s.output_size, "zoneout_hidden");
  c10::OptionalDeviceGuard device_guard(input.device());

  const int64_t H = s.hidden_size;
  const auto options = input.options();
  const auto acc_options = options.dtype(at::toOpMathType(input.scalar_type()));
  const at::Tensor x = input.reshape({s.rows, s.input_size});

  // gates: (N, 4H) = x W_ih^T + b_ih + b_hh, then per step += h W_hh^T. Where the sequence
  // kernel adds the biases itself (the CPU's, to its pre-activations as it reads them), the
  // product leaves them out: at::addmm would first copy the broadcast bias into all N rows.
  const bool bias_in_sequence = Kernels::sequence_handles_biases() &&
                                (b_ih.has_value() || b_hh.has_value()) &&
                                (!b_ih.has_value() || b_ih->is_contiguous()) &&
                                (!b_hh.has_value() || b_hh->is_contiguous());
  const auto biases = [&]() -> std::optional<at::Tensor> {
    if (b_ih.has_value() && b_hh.has_value()) return *b_ih + *b_hh;
    return b_ih.has_value() ? b_ih : b_hh;
  };
  const auto input_projection = [&] {
    const std::optional<at::Tensor> bias = bias_in_sequence ? std::nullopt : biases();
    return training ? Kernels::kept_linear(x, w_ih, bias, cpu::Saved::gates).contiguous()
                    : Kernels::inference_linear(x, w_ih, bias).contiguous();
  };
  // The sequence kernel is offered the input projection (a decode step, or bf16 panels: see
  // the CPU's run_forward), with, in training, a tensor for the activations it saves; where it
  // declines, the projection is made here after all.
  const bool offer_fused_input =
      !s.has_projection && x.stride(1) == 1 &&
      w_ih.stride(1) == 1 && (!b_ih.has_value() || b_ih->is_contiguous()) &&
      (!b_hh.has_value() || b_hh->is_contiguous());
  at::Tensor gates =
      !offer_fused_input ? input_projection()
      : training ? Kernels::saved_sequence(cpu::Saved::gates, {s.rows, kNumGates * H}, options)
                 : at::Tensor();

  // The caller drops the output by its next step: kept memory on the CPU too.
  at::Tensor output =
      Kernels::saved_sequence(cpu::Saved::output, {s.rows, s.output_size}, options);
  at::Tensor h_state = h0.contiguous().clone();
  at::Tensor c_state = c0.to(acc_options, /*non_blocking=*/false, /*copy=*/true).contiguous();
  SavedForBackward saved;
  saved.cell_prev =
      Kernels::saved_sequence(cpu::Saved::cell_prev, {training ? s.rows : 0, H}, acc_options);
  saved.hidden_prev = Kernels::saved_sequence(
      cpu::Saved::hidden_prev, {training ? s.rows : 0, s.output_size}, options);
  at::Tensor cells = at::empty({return_cells ? s.rows : 0, H}, options);
  // Without training only the current step's h before projection is needed.
  at::Tensor hidden_raw =
      at::empty({s.has_projection ? (training ? s.rows : s.batch) : 0, H}, options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    {
      SequenceForward<scalar_t> sequence{};
      static_cast<SequenceLayout&>(sequence) = sequence_layout(s, reverse);
      sequence.cell = c_state.data_ptr<acc_t>();
      sequence.hidden_state = h_state.data_ptr<scalar_t>();
      sequence.output = output.data_ptr<scalar_t>();
      sequence.cell_prev_saved = training ? saved.cell_prev.data_ptr<acc_t>() : nullptr;
      sequence.hidden_prev_saved = training ? saved.hidden_prev.data_ptr<scalar_t>() : nullptr;
      sequence.save_gates = training;
      sequence.w_hh = w_hh.const_data_ptr<scalar_t>();
      sequence.w_stride0 = w_hh.stride(0);
      sequence.w_stride1 = w_hh.stride(1);
      sequence.recurrent_mask = mask.has_value() ? mask->const_data_ptr<acc_t>() : nullptr;
      sequence.zoneout_cell = zone_c.has_value() ? zone_c->const_data_ptr<acc_t>() : nullptr;
      sequence.zoneout_cell_stride = zoneout_stride(zone_c);
      sequence.zoneout_hidden = zone_h.has_value() ? zone_h->const_data_ptr<acc_t>() : nullptr;
      sequence.zoneout_hidden_stride = zoneout_stride(zone_h);
      sequence.cells = return_cells ? cells.data_ptr<scalar_t>() : nullptr;
      if (s.has_projection) {
        set_projection<scalar_t>(sequence, *w_hr);
        sequence.hidden_raw = hidden_raw.data_ptr<scalar_t>();
        sequence.raw_every_step = training;
      }
      const auto biases_for_kernel = [&](bool wanted) {
        sequence.b_ih = wanted && b_ih.has_value() ? b_ih->const_data_ptr<scalar_t>() : nullptr;
        sequence.b_hh = wanted && b_hh.has_value() ? b_hh->const_data_ptr<scalar_t>() : nullptr;
      };
      if (offer_fused_input) {
        biases_for_kernel(true);
        sequence.input = x.const_data_ptr<scalar_t>();
        sequence.input_size = s.input_size;
        sequence.input_stride = x.stride(0);
        sequence.w_ih = w_ih.const_data_ptr<scalar_t>();
        sequence.w_ih_stride = w_ih.stride(0);
        sequence.gates = training ? gates.data_ptr<scalar_t>() : nullptr;
        if (Kernels::template forward_sequence<scalar_t>(sequence)) return;
        gates = at::Tensor();  // released before the projection takes its place
        gates = input_projection();
      }
      sequence.gates = gates.data_ptr<scalar_t>();
      sequence.input = nullptr;
      biases_for_kernel(bias_in_sequence);
      if (Kernels::template forward_sequence<scalar_t>(sequence)) return;
    }
    // The step loop reads the biases from the gates.
    if (bias_in_sequence) gates.add_(*biases());
    const auto recurrent = Kernels::step_product(w_hh.t(), s.steps, s.batch);
    const auto projection =
        s.has_projection ? Kernels::step_product(w_hr->t(), s.steps, s.batch) : nullptr;
    for (int64_t k = 0; k < s.steps; ++k) {
      const int64_t t = reverse ? s.steps - 1 - k : k;
      const int64_t rows = s.step_size[t];
      const int64_t offset = s.step_offset[t];
      if (rows == 0) continue;
      at::Tensor step_gates = gates.narrow(0, offset, rows);
      at::Tensor h_prev = h_state.narrow(0, 0, rows);
      // Zoneout keeps part of the previous state: c = d c_prev + (1 - d) c~, the same for h.
      const at::Tensor c_before = zone_c.has_value() ? c_state.narrow(0, 0, rows).clone()
                                                     : at::Tensor();
      const at::Tensor h_before = zone_h.has_value() ? h_prev.to(acc_options, false, true)
                                                     : at::Tensor();
      // What W_hh multiplies: h, or h times the recurrent-dropout mask, in the storage type.
      const at::Tensor h_in =
          mask.has_value() ? at::mul(h_prev, mask->narrow(0, 0, rows)).to(input.scalar_type())
                           : h_prev;
      // Without a projection or mask the elementwise pass saves h as it overwrites it (no
      // copy launch per step); otherwise it is copied here.
      const bool copy_hidden_prev = training && (s.has_projection || mask.has_value());
      if (copy_hidden_prev) saved.hidden_prev.narrow(0, offset, rows).copy_(h_in);
      {
        RECORD_FUNCTION("lstm_ext::step_gemm", std::vector<c10::IValue>());
        recurrent->run(h_in, step_gates, /*accumulate=*/true);
      }

      ForwardStep<scalar_t> step;
      step.rows = rows;
      step.hidden = H;
      step.gates = rows_ptr<scalar_t>(gates, offset);
      step.cell = c_state.data_ptr<acc_t>();
      step.cell_prev_saved = training ? rows_ptr<acc_t>(saved.cell_prev, offset) : nullptr;
      step.hidden_out = s.has_projection
                            ? rows_ptr<scalar_t>(hidden_raw, training ? offset : 0)
                            : rows_ptr<scalar_t>(output, offset);
      step.hidden_state = s.has_projection ? nullptr : h_state.data_ptr<scalar_t>();
      step.hidden_prev_saved = training && !copy_hidden_prev
                                   ? rows_ptr<scalar_t>(saved.hidden_prev, offset)
                                   : nullptr;
      step.save_gates = training;
      {
        RECORD_FUNCTION("lstm_ext::step_elementwise", std::vector<c10::IValue>());
        Kernels::template forward_step<scalar_t>(step);
      }

      if (s.has_projection) {
        at::Tensor y = output.narrow(0, offset, rows);
        RECORD_FUNCTION("lstm_ext::step_gemm", std::vector<c10::IValue>());
        projection->run(hidden_raw.narrow(0, training ? offset : 0, rows), y, false);
        h_prev.copy_(y);
      }
      if (zone_c.has_value()) {
        const at::Tensor d = zoneout_rows(*zone_c, offset, rows);
        at::Tensor c = c_state.narrow(0, 0, rows);
        c.copy_(d * c_before + (1 - d) * c);
      }
      if (zone_h.has_value()) {
        const at::Tensor d = zoneout_rows(*zone_h, offset, rows);
        at::Tensor y = output.narrow(0, offset, rows);
        y.copy_(d * h_before + (1 - d) * y);
        h_prev.copy_(y);
      }
      if (return_cells) cells.narrow(0, offset, rows).copy_(c_state.narrow(0, 0, rows));
    }
  });

  const at::Tensor c_n = c_state.to(input.scalar_type());
  if (training) {
    saved.gates = gates;
    saved.hidden_raw = s.has_projection ? hidden_raw : at::empty({0, H}, options);
  } else {
    saved.gates = at::empty({0, kNumGates * H}, options);
    saved.hidden_raw = at::empty({0, H}, options);
  }
  const at::Tensor y = s.packed ? output : output.view({s.steps, s.batch, s.output_size});
  if (return_cells && !s.packed) cells = cells.view({s.steps, s.batch, H});
  return {y, h_state, c_n, saved.gates, saved.cell_prev, saved.hidden_prev, saved.hidden_raw,
          cells};
}

// Gradients of one layer-direction; an absent grad_output counts as zero.
// Returns (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr); the bias
// gradient is the same for b_ih and b_hh. Gradients not asked for come back empty.
template <typename Kernels>
BackwardResult layer_backward(const std::optional<at::Tensor>& grad_output,
                              const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                              const at::Tensor& input,
                              const at::Tensor& w_ih, const at::Tensor& w_hh,
                              const std::optional<at::Tensor>& w_hr,
                              const std::optional<at::Tensor>& batch_sizes,
                              const at::Tensor& gates, const at::Tensor& cell_prev,
                              const at::Tensor& hidden_prev, const at::Tensor& hidden_raw,
                              bool reverse, bool has_bias, bool input_grad, bool weight_grads,
                              const std::optional<at::Tensor>& recurrent_mask,
                              const std::optional<at::Tensor>& zoneout_cell,
                              const std::optional<at::Tensor>& zoneout_hidden,
                              const std::optional<at::Tensor>& grad_cells) {
  constexpr const char* op = "lstm_layer_backward";
  // As in layer_forward: a backward run inside an autocast region (the engine carries the
  // caller's autocast state) keeps the forward's dtypes.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  // The kernels read the saved tensors through raw row pointers, so any other layout (a caller,
  // or a compiled graph, may pass one) is made contiguous first: a no-op for what forward saved.
  const SavedForBackward saved{gates.contiguous(), cell_prev.contiguous(), hidden_prev,
                               hidden_raw.contiguous()};
  const LayerShape s = layer_shape(op, input, w_ih, w_hh, w_hr, batch_sizes);
  check_saved(op, s, input, saved);
  const std::optional<at::Tensor> mask = checked_recurrent_mask(op, s, input, recurrent_mask);
  const std::optional<at::Tensor> zone_c =
      checked_zoneout(op, s, input, zoneout_cell, s.hidden_size, "zoneout_cell");
  const std::optional<at::Tensor> zone_h =
      checked_zoneout(op, s, input, zoneout_hidden, s.output_size, "zoneout_hidden");
  c10::OptionalDeviceGuard device_guard(input.device());

  const int64_t H = s.hidden_size;
  const int64_t R = s.output_size;
  const auto options = input.options();
  const auto acc_options = options.dtype(at::toOpMathType(input.scalar_type()));

  at::Tensor grad_y;
  if (grad_output.has_value()) {
    check_shape(op, *grad_output, s.packed ? at::IntArrayRef{s.rows, R}
                                           : at::IntArrayRef{s.steps, s.batch, R},
                "grad_output");
    check_same_dtype_and_device(op, input, *grad_output, "grad_output");
    // The gradient of a sum or mean of the output is one value (or row) broadcast over all
    // rows: where the sequence kernel reads row strides, it reads that one row N times instead
    // of a copy of it N rows long.
    grad_y = grad_output->reshape({s.rows, R});
    if (Kernels::reads_broadcast_gradients() && s.rows > 0 && grad_y.stride(0) == 0) {
      grad_y = grad_y.narrow(0, 0, 1).contiguous().expand({s.rows, R});
    } else {
      grad_y = grad_y.contiguous();
    }
  }
  at::Tensor grad_c_seq;
  if (grad_cells.has_value()) {
    check_shape(op, *grad_cells, s.packed ? at::IntArrayRef{s.rows, H}
                                          : at::IntArrayRef{s.steps, s.batch, H},
                "grad_cells");
    check_same_dtype_and_device(op, input, *grad_cells, "grad_cells");
    grad_c_seq = grad_cells->reshape({s.rows, H}).contiguous();
  }
  // dh and dc flowing backwards through time, one row per sequence.
  check_state(op, s, input, grad_h_n, grad_c_n, "grad_h_n", "grad_c_n");
  at::Tensor grad_h = grad_h_n.contiguous().clone();
  at::Tensor grad_c = grad_c_n.to(acc_options, /*non_blocking=*/false, /*copy=*/true).contiguous();

  at::Tensor grad_gates = Kernels::gate_gradients(false, {s.rows, kNumGates * H}, options);
  // The same transposed, where the device's recurrence writes it and the weight gradients'
  // products want it (they contract over N, which a product that copies operands into its own
  // layout wants innermost; one that reads a transposed operand in place gains nothing from
  // the copy), and their sum over N (the bias gradient, in the math type) where it sums them
  // as it goes.
  at::Tensor grad_gates_t, grad_bias_sum;
  // With a projection, dh of every step is kept for dW_hr, and dh W_hr feeds the cell.
  at::Tensor grad_h_all = at::empty({s.has_projection ? s.rows : 0, R}, options);
  at::Tensor grad_h_raw = at::empty({s.has_projection ? s.batch : 0, H}, options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    {
      SequenceBackward<scalar_t> sequence{};
      static_cast<SequenceLayout&>(sequence) = sequence_layout(s, reverse);
      sequence.gates = saved.gates.const_data_ptr<scalar_t>();
      sequence.cell_prev = saved.cell_prev.const_data_ptr<acc_t>();
      sequence.grad_output = grad_y.defined() ? grad_y.const_data_ptr<scalar_t>() : nullptr;
      sequence.grad_output_stride = grad_y.defined() ? grad_y.stride(0) : 0;
      sequence.grad_hidden = grad_h.data_ptr<scalar_t>();
      sequence.grad_cell = grad_c.data_ptr<acc_t>();
      sequence.grad_gates = grad_gates.data_ptr<scalar_t>();
      if (weight_grads && Kernels::wants_transposed_gate_gradients(input.scalar_type())) {
        grad_gates_t = Kernels::gate_gradients(true, {kNumGates * H, s.rows}, options);
        sequence.grad_gates_t = grad_gates_t.data_ptr<scalar_t>();
      }
      if (weight_grads && has_bias && Kernels::sequence_handles_biases()) {
        grad_bias_sum = at::empty({kNumGates * H}, acc_options);
        sequence.grad_bias = grad_bias_sum.data_ptr<acc_t>();
      }
      sequence.rows = s.rows;
      sequence.w_hh = w_hh.const_data_ptr<scalar_t>();
      sequence.w_stride0 = w_hh.stride(0);
      sequence.w_stride1 = w_hh.stride(1);
      sequence.recurrent_mask = mask.has_value() ? mask->const_data_ptr<acc_t>() : nullptr;
      sequence.zoneout_cell = zone_c.has_value() ? zone_c->const_data_ptr<acc_t>() : nullptr;
      sequence.zoneout_cell_stride = zoneout_stride(zone_c);
      sequence.zoneout_hidden = zone_h.has_value() ? zone_h->const_data_ptr<acc_t>() : nullptr;
      sequence.zoneout_hidden_stride = zoneout_stride(zone_h);
      const at::Tensor carry =
          at::empty({zone_h.has_value() ? s.batch : 0, s.output_size}, acc_options);
      sequence.zoneout_carry = zone_h.has_value() ? carry.data_ptr<acc_t>() : nullptr;
      sequence.grad_cells = grad_c_seq.defined() ? grad_c_seq.const_data_ptr<scalar_t>() : nullptr;
      if (s.has_projection) {
        set_projection<scalar_t>(sequence, *w_hr);
        sequence.grad_projected = grad_h_all.data_ptr<scalar_t>();
      }
      if (Kernels::template backward_sequence<scalar_t>(sequence)) return;
      // The step loop below reads whole rows.
      if (grad_y.defined()) grad_y = grad_y.contiguous();
      // Not written: the step loop below runs instead.
      grad_gates_t = at::Tensor();
      grad_bias_sum = at::Tensor();
    }
    const auto recurrent = Kernels::step_product(w_hh, s.steps, s.batch);
    const auto projection =
        s.has_projection ? Kernels::step_product(*w_hr, s.steps, s.batch) : nullptr;
    for (int64_t k = 0; k < s.steps; ++k) {
      const int64_t t = reverse ? k : s.steps - 1 - k;
      const int64_t rows = s.step_size[t];
      const int64_t offset = s.step_offset[t];
      if (rows == 0) continue;
      at::Tensor grad_h_rows = grad_h.narrow(0, 0, rows);
      if (grad_c_seq.defined()) grad_c.narrow(0, 0, rows).add_(grad_c_seq.narrow(0, offset, rows));
      // Zoneout: h = d h_prev + (1 - d) h~ sends d dh to the previous step directly and
      // (1 - d) dh into this step's cell (or projection); c likewise.
      at::Tensor dh_total, dh_new;
      if (zone_h.has_value()) {
        dh_total = grad_y.defined() ? grad_y.narrow(0, offset, rows) + grad_h_rows
                                    : grad_h_rows.clone();
        dh_new = ((1 - zoneout_rows(*zone_h, offset, rows)) * dh_total)
                     .to(input.scalar_type())
                     .contiguous();
      }
      at::Tensor dc_total;
      if (zone_c.has_value()) {
        at::Tensor dc = grad_c.narrow(0, 0, rows);
        dc_total = dc.clone();
        dc.mul_(1 - zoneout_rows(*zone_c, offset, rows));
      }

      BackwardStep<scalar_t> step;
      step.rows = rows;
      step.hidden = H;
      step.gates = rows_ptr<scalar_t>(saved.gates, offset);
      step.cell_prev = rows_ptr<acc_t>(saved.cell_prev, offset);
      step.grad_cell = grad_c.data_ptr<acc_t>();
      step.grad_gates = rows_ptr<scalar_t>(grad_gates, offset);
      if (s.has_projection) {
        at::Tensor dh = grad_h_all.narrow(0, offset, rows);
        if (dh_new.defined()) {
          dh.copy_(dh_new);
        } else if (grad_y.defined()) {
          at::add_out(dh, grad_y.narrow(0, offset, rows), grad_h_rows);
        } else {
          dh.copy_(grad_h_rows);
        }
        at::Tensor dh_raw = grad_h_raw.narrow(0, 0, rows);
        RECORD_FUNCTION("lstm_ext::step_gemm", std::vector<c10::IValue>());
        projection->run(dh, dh_raw, /*accumulate=*/false);
        step.grad_h = grad_h_raw.data_ptr<scalar_t>();
        step.grad_h_extra = nullptr;
      } else if (dh_new.defined()) {
        step.grad_h = dh_new.data_ptr<scalar_t>();
        step.grad_h_extra = nullptr;
      } else {
        step.grad_h = grad_y.defined() ? rows_ptr<scalar_t>(grad_y, offset) : nullptr;
        step.grad_h_extra = grad_h.data_ptr<scalar_t>();
      }
      {
        RECORD_FUNCTION("lstm_ext::step_elementwise", std::vector<c10::IValue>());
        Kernels::template backward_step<scalar_t>(step);
      }
      if (zone_c.has_value()) {
        grad_c.narrow(0, 0, rows).add_(zoneout_rows(*zone_c, offset, rows) * dc_total);
      }
      RECORD_FUNCTION("lstm_ext::step_gemm", std::vector<c10::IValue>());
      recurrent->run(grad_gates.narrow(0, offset, rows), grad_h_rows, /*accumulate=*/false);
      if (mask.has_value()) grad_h_rows.mul_(mask->narrow(0, 0, rows));
      if (zone_h.has_value()) {
        grad_h_rows.add_(zoneout_rows(*zone_h, offset, rows) * dh_total);
      }
    }
  });

  // Outputs of an op must not alias each other, so each gradient not asked for is its own
  // empty tensor.
  const auto none = [&] { return at::empty({0}, options); };
  at::Tensor grad_input =
      input_grad
          ? Kernels::kept_linear(grad_gates, w_ih.t(), std::nullopt, cpu::Saved::grad_input)
                .view(input.sizes())
          : none();
  at::Tensor grad_w_ih, grad_w_hh, grad_bias, grad_w_hr;
  if (weight_grads) {
    const at::Tensor x = input.reshape({s.rows, s.input_size});
    const at::Tensor gates_t = grad_gates_t.defined() ? grad_gates_t : grad_gates.t();
    grad_w_ih = Kernels::kept_linear(gates_t, x.t(), std::nullopt, cpu::Saved::grad_w_ih);
    grad_w_hh =
        Kernels::kept_linear(gates_t, saved.hidden_prev.t(), std::nullopt, cpu::Saved::grad_w_hh);
    // ATen's sums of bf16/fp16 accumulate in fp32 (on the CPU and CUDA alike), so the small
    // steps are kept without an fp32 copy of the (4H, N) gradients.
    grad_bias = !has_bias                 ? none()
                : grad_bias_sum.defined() ? grad_bias_sum.to(input.scalar_type())
                                          : at::sum(gates_t, {1});
    grad_w_hr = s.has_projection ? at::mm(grad_h_all.t(), saved.hidden_raw) : none();
  } else {
    grad_w_ih = none();
    grad_w_hh = none();
    grad_bias = none();
    grad_w_hr = none();
  }
  return {grad_input, grad_h, grad_c.to(input.scalar_type()), grad_w_ih, grad_w_hh, grad_bias,
          grad_w_hr};
}

}  // namespace lstm_ext
