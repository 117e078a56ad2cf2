// The LayerNorm LSTM layer (Ba, Kiros & Hinton 2016, as in Haste) for one layer and one
// direction, forward and backward. The input products run once for the whole sequence. The
// recurrence, on the CPU without a projection, is one fused kernel (cpu/layer_norm_kernels.h),
// which also normalises the input products step by step; otherwise the input products are
// normalised at once and a C++ step loop runs the GEMMs through ATen and the rest per step in
// one pass over the step's rows (each norm is over one row): on the CPU that file's row
// kernels, on other devices (and with LSTM_EXT_CPU_RECURRENCE=0) ATen ops (native_layer_norm
// and its backward, pointwise math). No Python runs per step. All math is in the math dtype
// (fp32 for bf16/fp16).
//
//   z_t = LN(W_ih x_t; g_ih, b_ih') + b_ih + b_hh + LN(W_hh (m * h_{t-1}); g_hh, b_hh')
//   i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of z_t's four gate blocks
//   c_t = f c_{t-1} + i g,   h_t = o tanh(LN(c_t; g_c, b_c))   (then W_hr h_t with a projection)
//
// Each LN normalises its whole row (4H for the products, H for c), eps 1e-5 as nn.LayerNorm.
#include "cpu/layer_norm_kernels.h"
#include "cpu/linear.h"
#include "cpu/recurrence.h"
#include "cpu/workspace.h"
#include "lstm_common.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace lstm_ext {
namespace {

constexpr double kEps = 1e-5;

using ForwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor>;

// The six LayerNorm parameters in the math dtype: gain and bias of the input product's norm
// (4H), of the recurrent product's (4H) and of the cell's (H).
struct Norms {
  at::Tensor ih_weight, ih_bias, hh_weight, hh_bias, cell_weight, cell_bias;
};

Norms checked_norms(const char* op, const LayerShape& s, const at::Tensor& input,
                    const std::array<at::Tensor, 6>& given, at::ScalarType math) {
  const char* names[6] = {"ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias",
                          "ln_cell_weight", "ln_cell_bias"};
  std::array<at::Tensor, 6> up;
  for (int k = 0; k < 6; ++k) {
    const int64_t size = k < 4 ? kNumGates * s.hidden_size : s.hidden_size;
    check_shape(op, given[k], {size}, names[k]);
    check_same_dtype_and_device(op, input, given[k], names[k]);
    up[k] = given[k].to(math);
  }
  return {up[0], up[1], up[2], up[3], up[4], up[5]};
}

// A step's rows for the CPU row kernels, with the norms' parameters; the caller adds the rest.
template <typename scalar_t>
cpu::LayerNormRows<scalar_t> step_rows(int64_t rows, int64_t hidden, const Norms& ln) {
  cpu::LayerNormRows<scalar_t> a{};
  a.rows = rows;
  a.hidden = hidden;
  a.hh_gain = ln.hh_weight.const_data_ptr<scalar_t>();
  a.hh_bias = ln.hh_bias.const_data_ptr<scalar_t>();
  a.cell_gain = ln.cell_weight.const_data_ptr<scalar_t>();
  a.cell_bias = ln.cell_bias.const_data_ptr<scalar_t>();
  return a;
}

// The fused recurrence's arguments common to forward and backward (w: W_hh contiguous).
template <typename scalar_t>
cpu::LayerNormSequence<scalar_t> fused_sequence(const LayerShape& s, bool reverse,
                                                const at::Tensor& w, const Norms& ln,
                                                const std::optional<at::Tensor>& mask,
                                                const std::optional<at::Tensor>& zone_c,
                                                const std::optional<at::Tensor>& zone_h) {
  cpu::LayerNormSequence<scalar_t> a{};
  static_cast<SequenceLayout&>(a) = sequence_layout(s, reverse);
  a.w_hh = w.const_data_ptr<scalar_t>();
  a.hh_gain = ln.hh_weight.const_data_ptr<scalar_t>();
  a.hh_bias = ln.hh_bias.const_data_ptr<scalar_t>();
  a.cell_gain = ln.cell_weight.const_data_ptr<scalar_t>();
  a.cell_bias = ln.cell_bias.const_data_ptr<scalar_t>();
  a.recurrent_mask = mask.has_value() ? mask->const_data_ptr<scalar_t>() : nullptr;
  a.zoneout_cell = zone_c.has_value() ? zone_c->const_data_ptr<scalar_t>() : nullptr;
  a.zoneout_cell_stride = zoneout_stride(zone_c);
  a.zoneout_hidden = zone_h.has_value() ? zone_h->const_data_ptr<scalar_t>() : nullptr;
  a.zoneout_hidden_stride = zoneout_stride(zone_h);
  return a;
}

// The saved statistics: per row of data, mean and 1/std of the input product's, recurrent
// product's and cell's norms, as columns 0-5 of an (N, 6) tensor.
enum Stat { kMeanX, kRstdX, kMeanH, kRstdH, kMeanC, kRstdC };

// x (M, K) @ w (N, K)^T over every step at once: on the CPU through torch's oneDNN, as the
// plain layer's whole-sequence products (cpu/linear.h), into kept memory if given.
at::Tensor sequence_product(const at::Tensor& x, const at::Tensor& w, LinearInto into = {}) {
  return x.device().is_cpu() ? cpu_linear(x, w, std::nullopt, into) : at::mm(x, w.t());
}

// The per-step product in @ w^T for a weight w (N, K), made contiguous once per call: on the
// CPU through torch's oneDNN too (on an AMD EPYC 2-2.5x faster than ATen's GEMM at B 32, H
// 256-512), elsewhere at::mm.
class StepGemm {
 public:
  explicit StepGemm(const at::Tensor& w) : w_(w.contiguous()) {}
  at::Tensor operator()(const at::Tensor& in) const {
    return sequence_product(in.contiguous(), w_);
  }

 private:
  at::Tensor w_;
};

at::Tensor stat_view(const at::Tensor& stats, Stat which, int64_t offset, int64_t rows) {
  return stats.narrow(0, offset, rows).narrow(1, which, 1);
}

// A contiguous copy, as native_layer_norm_backward reads them.
at::Tensor stat(const at::Tensor& stats, Stat which, int64_t offset, int64_t rows) {
  return stat_view(stats, which, offset, rows).contiguous();
}

// Outputs: output, h_n, c_n (storage dtype), then what backward needs, in the math dtype and
// empty unless training: gate activations (N, 4H), c entering each step (N, H), c after it
// (N, H), the recurrent and the input products before their norms (N, 4H each), the
// statistics (N, 6), the h entering each step times the mask (N, R), and h before the
// projection (N, H).
ForwardResult layer_norm_forward(const at::Tensor& input, const at::Tensor& h0,
                                 const at::Tensor& c0, const at::Tensor& w_ih,
                                 const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                 const std::optional<at::Tensor>& b_hh,
                                 const std::optional<at::Tensor>& w_hr,
                                 const std::optional<at::Tensor>& batch_sizes, bool reverse,
                                 bool training, const at::Tensor& ln_ih_weight,
                                 const at::Tensor& ln_ih_bias, const at::Tensor& ln_hh_weight,
                                 const at::Tensor& ln_hh_bias, const at::Tensor& ln_cell_weight,
                                 const at::Tensor& ln_cell_bias,
                                 const std::optional<at::Tensor>& recurrent_mask,
                                 const std::optional<at::Tensor>& zoneout_cell,
                                 const std::optional<at::Tensor>& zoneout_hidden) {
  constexpr const char* op = "lstm_layer_norm_forward";
  const LayerShape s =
      checked_forward_args(op, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes);
  const std::optional<at::Tensor> mask = checked_recurrent_mask(op, s, input, recurrent_mask);
  const std::optional<at::Tensor> zone_c =
      checked_zoneout(op, s, input, zoneout_cell, s.hidden_size, "zoneout_cell");
  const std::optional<at::Tensor> zone_h =
      checked_zoneout(op, s, input, zoneout_hidden, s.output_size, "zoneout_hidden");
  const at::ScalarType math = at::toOpMathType(input.scalar_type());
  const Norms ln = checked_norms(
      op, s, input,
      {ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias}, math);
  c10::OptionalDeviceGuard device_guard(input.device());
  // The math is in the math dtype throughout, under torch.autocast too.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);

  const int64_t H = s.hidden_size, G = kNumGates * H, R = s.output_size;
  const auto acc = input.options().dtype(math);
  const at::Tensor x = input.reshape({s.rows, s.input_size}).to(math);
  const at::Tensor W_ih = w_ih.to(math), W_hh = w_hh.to(math);
  const std::optional<StepGemm> projection =
      w_hr.has_value() ? std::optional<StepGemm>(w_hr->to(math)) : std::nullopt;

  const int64_t saved = training ? s.rows : 0;
  // Held by autograd until the backward, or by the caller until its next step: kept memory on
  // the CPU (cpu::saved_buffer).
  const auto kept = [&](cpu::Saved kind, at::IntArrayRef sizes) {
    return input.device().is_cpu() ? cpu::saved_buffer(kind, sizes, acc) : at::empty(sizes, acc);
  };
  at::Tensor gates = kept(cpu::Saved::gates, {saved, G});
  at::Tensor cell_prev = kept(cpu::Saved::cell_prev, {saved, H});
  at::Tensor cell = kept(cpu::Saved::cell, {saved, H});
  at::Tensor products = kept(cpu::Saved::products, {saved, G});
  at::Tensor stats = kept(cpu::Saved::stats, {saved, 6});
  at::Tensor hidden_prev = kept(cpu::Saved::hidden_prev, {saved, R});
  at::Tensor hidden_raw = at::empty({training && s.has_projection ? s.rows : 0, H}, acc);

  // The input products of every step at once, normalised, with both biases (added to the
  // norm's own: one pass over the (N, G) values instead of three).
  const at::Tensor product_x = sequence_product(x, W_ih);
  at::Tensor input_bias = ln.ih_bias;
  if (b_ih.has_value()) input_bias = input_bias + b_ih->to(math);
  if (b_hh.has_value()) input_bias = input_bias + b_hh->to(math);
  const bool row_kernels = input.device().is_cpu() && cpu::recurrence_enabled();
  const bool fused = row_kernels && !s.has_projection;
  // Zoneout (Krueger et al.): c_t = d c_{t-1} + (1 - d) c~_t and h likewise, h~ made from
  // c~; `cell` keeps c_t, the cell sequence (backward makes c~ again from the gates).
  const auto zone = [&](at::Tensor& c_new, at::Tensor& h_new, const at::Tensor& c_prev,
                        const at::Tensor& h_prev, int64_t offset, int64_t rows) {
    if (zone_c) {
      const at::Tensor d = zoneout_rows(*zone_c, offset, rows);
      c_new = d * c_prev + (1 - d) * c_new;
      if (training) cell.narrow(0, offset, rows).copy_(c_new);
    }
    if (zone_h) {
      const at::Tensor d = zoneout_rows(*zone_h, offset, rows);
      h_new = d * h_prev + (1 - d) * h_new;
    }
  };
  // The step loop's input part: the products normalised for every step at once; the fused
  // kernel normalises them as it goes.
  at::Tensor z_x;
  if (!fused) {
    at::Tensor mean_x, rstd_x;
    std::tie(z_x, mean_x, rstd_x) =
        at::native_layer_norm(product_x, {G}, ln.ih_weight, input_bias, kEps);
    if (training) {
      stats.narrow(1, kMeanX, 1).copy_(mean_x.view({s.rows, 1}));
      stats.narrow(1, kRstdX, 1).copy_(rstd_x.view({s.rows, 1}));
    }
  }
  at::Tensor output = kept(cpu::Saved::output, {s.rows, R});
  at::Tensor h_state = h0.to(math).clone(at::MemoryFormat::Contiguous);
  at::Tensor c_state = c0.to(math).clone(at::MemoryFormat::Contiguous);
  if (fused) {
    const at::Tensor w = W_hh.contiguous();
    AT_DISPATCH_FLOATING_TYPES(math, "lstm_layer_norm_forward", [&] {
      auto a = fused_sequence<scalar_t>(s, reverse, w, ln, mask, zone_c, zone_h);
      a.input_products = product_x.const_data_ptr<scalar_t>();
      a.ih_gain = ln.ih_weight.const_data_ptr<scalar_t>();
      a.input_bias = input_bias.const_data_ptr<scalar_t>();
      a.hidden_state = h_state.data_ptr<scalar_t>();
      a.cell_state = c_state.data_ptr<scalar_t>();
      a.output = output.data_ptr<scalar_t>();
      if (training) {
        a.gates = gates.data_ptr<scalar_t>();
        a.cell_prev = cell_prev.data_ptr<scalar_t>();
        a.cell_out = cell.data_ptr<scalar_t>();
        a.products = products.data_ptr<scalar_t>();
        a.stats = stats.data_ptr<scalar_t>();
        a.hidden_prev = hidden_prev.data_ptr<scalar_t>();
      }
      cpu::layer_norm_sequence_forward(a);
    });
  }
  // Otherwise the step loop.
  const StepGemm recurrent(W_hh);
  for (int64_t k = 0; !fused && k < s.steps; ++k) {
    const int64_t t = reverse ? s.steps - 1 - k : k;
    const int64_t rows = s.step_size[t], offset = s.step_offset[t];
    at::Tensor h_prev = h_state.narrow(0, 0, rows);
    at::Tensor c_prev = c_state.narrow(0, 0, rows);
    const at::Tensor h_in = mask.has_value() ? h_prev * mask->narrow(0, 0, rows) : h_prev;
    const at::Tensor product = recurrent(h_in);
    if (row_kernels) {
      // Written in place where training keeps them, else into this step's scratch.
      at::Tensor z = training ? gates.narrow(0, offset, rows) : at::empty({rows, G}, acc);
      at::Tensor c_new = training ? cell.narrow(0, offset, rows) : at::empty({rows, H}, acc);
      at::Tensor step_stats =
          training ? stats.narrow(0, offset, rows) : at::empty({rows, 6}, acc);
      at::Tensor h_raw = at::empty({rows, H}, acc);
      AT_DISPATCH_FLOATING_TYPES(math, "lstm_layer_norm_forward", [&] {
        auto a = step_rows<scalar_t>(rows, H, ln);
        a.product = product.const_data_ptr<scalar_t>();
        a.stats = step_stats.data_ptr<scalar_t>();
        a.cell_prev = c_prev.const_data_ptr<scalar_t>();
        a.input_part = z_x.narrow(0, offset, rows).const_data_ptr<scalar_t>();
        a.gates = z.data_ptr<scalar_t>();
        a.cell = c_new.data_ptr<scalar_t>();
        a.hidden_out = h_raw.data_ptr<scalar_t>();
        cpu::layer_norm_forward_rows(a);
      });
      at::Tensor h_new = projection ? (*projection)(h_raw) : h_raw;
      if (training) {
        cell_prev.narrow(0, offset, rows).copy_(c_prev);
        products.narrow(0, offset, rows).copy_(product);
        hidden_prev.narrow(0, offset, rows).copy_(h_in);
        if (s.has_projection) hidden_raw.narrow(0, offset, rows).copy_(h_raw);
      }
      at::Tensor c_out = c_new;
      zone(c_out, h_new, c_prev, h_prev, offset, rows);
      output.narrow(0, offset, rows).copy_(h_new);
      h_prev.copy_(h_new);
      c_prev.copy_(c_out);
      continue;
    }
    auto [z_h, mean_h, rstd_h] =
        at::native_layer_norm(product, {G}, ln.hh_weight, ln.hh_bias, kEps);
    at::Tensor z = z_h.add_(z_x.narrow(0, offset, rows));
    z.narrow(1, 0, 2 * H).sigmoid_();
    z.narrow(1, 2 * H, H).tanh_();
    z.narrow(1, 3 * H, H).sigmoid_();
    const at::Tensor in = z.narrow(1, 0, H), forget = z.narrow(1, H, H);
    const at::Tensor cell_in = z.narrow(1, 2 * H, H), out = z.narrow(1, 3 * H, H);
    const at::Tensor c_new = forget * c_prev + in * cell_in;
    auto [c_norm, mean_c, rstd_c] =
        at::native_layer_norm(c_new, {H}, ln.cell_weight, ln.cell_bias, kEps);
    const at::Tensor h_raw = out * c_norm.tanh_();
    at::Tensor h_new = projection ? (*projection)(h_raw) : h_raw;
    if (training) {
      gates.narrow(0, offset, rows).copy_(z);
      cell_prev.narrow(0, offset, rows).copy_(c_prev);
      cell.narrow(0, offset, rows).copy_(c_new);
      products.narrow(0, offset, rows).copy_(product);
      stat_view(stats, kMeanH, offset, rows).copy_(mean_h.view({rows, 1}));
      stat_view(stats, kRstdH, offset, rows).copy_(rstd_h.view({rows, 1}));
      stat_view(stats, kMeanC, offset, rows).copy_(mean_c.view({rows, 1}));
      stat_view(stats, kRstdC, offset, rows).copy_(rstd_c.view({rows, 1}));
      hidden_prev.narrow(0, offset, rows).copy_(h_in);
      if (s.has_projection) hidden_raw.narrow(0, offset, rows).copy_(h_raw);
    }
    at::Tensor c_out = c_new;
    zone(c_out, h_new, c_prev, h_prev, offset, rows);
    output.narrow(0, offset, rows).copy_(h_new);
    h_prev.copy_(h_new);
    c_prev.copy_(c_out);
  }
  const auto storage = input.scalar_type();
  at::Tensor y = output.to(storage);
  if (!s.packed) y = y.view({s.steps, s.batch, R});
  return {y, h_state.to(storage), c_state.to(storage), gates, cell_prev, cell, products,
          training ? product_x : at::empty({0, G}, acc), stats, hidden_prev, hidden_raw};
}

// Returns (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr, and the
// gradients of the six norm parameters); grad_bias serves b_ih and b_hh alike, and is empty
// without has_bias, grad_w_hr without w_hr, grad_input without input_grad.
BackwardResult layer_norm_backward(
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
    const std::optional<at::Tensor>& zoneout_hidden) {
  constexpr const char* op = "lstm_layer_norm_backward";
  const LayerShape s = layer_shape(op, input, w_ih, w_hh, w_hr, batch_sizes);
  const int64_t H = s.hidden_size, G = kNumGates * H, R = s.output_size;
  const at::ScalarType math = at::toOpMathType(input.scalar_type());
  TORCH_CHECK(gates.numel() > 0 || s.rows == 0, op,
              ": the forward op ran with training=False and saved nothing for backward; "
              "run it with training=True");
  const std::pair<const at::Tensor*, std::array<int64_t, 2>> expected[] = {
      {&gates, {s.rows, G}}, {&cell_prev, {s.rows, H}}, {&cell, {s.rows, H}},
      {&products, {s.rows, G}}, {&input_products, {s.rows, G}}, {&stats, {s.rows, 6}},
      {&hidden_prev, {s.rows, R}}};
  for (const auto& [tensor, shape] : expected) {
    check_shape(op, *tensor, shape, "a saved tensor");
    TORCH_CHECK(tensor->scalar_type() == math, op, ": saved tensors have the math dtype ",
                math, ", got ", tensor->scalar_type());
  }
  check_state(op, s, input, grad_h_n, grad_c_n, "grad_h_n", "grad_c_n");
  const std::optional<at::Tensor> mask = checked_recurrent_mask(op, s, input, recurrent_mask);
  const std::optional<at::Tensor> zone_c =
      checked_zoneout(op, s, input, zoneout_cell, s.hidden_size, "zoneout_cell");
  const std::optional<at::Tensor> zone_h =
      checked_zoneout(op, s, input, zoneout_hidden, s.output_size, "zoneout_hidden");
  const Norms ln = checked_norms(
      op, s, input,
      {ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias}, math);
  c10::OptionalDeviceGuard device_guard(input.device());
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);

  const auto acc = input.options().dtype(math);
  const at::Tensor x = input.reshape({s.rows, s.input_size}).to(math);
  const at::Tensor W_ih = w_ih.to(math), W_hh = w_hh.to(math);
  const std::optional<at::Tensor> W_hr =
      w_hr.has_value() ? std::optional<at::Tensor>(w_hr->to(math)) : std::nullopt;
  at::Tensor grad_y;
  if (grad_output.has_value()) grad_y = grad_output->reshape({s.rows, R}).to(math).contiguous();
  // Of c after each step: added to the c gradient carried into that step.
  at::Tensor grad_c_seq;
  if (grad_cells.has_value()) {
    check_shape(op, *grad_cells, {s.rows, H}, "grad_cells");
    TORCH_CHECK(grad_cells->scalar_type() == math && grad_cells->device() == input.device(),
                op, ": grad_cells must be ", math, " on ", input.device(), " like the saved "
                "cell sequence, got ", grad_cells->scalar_type(), " on ", grad_cells->device());
    grad_c_seq = grad_cells->contiguous();
  }

  at::Tensor dh = grad_h_n.to(math).clone(at::MemoryFormat::Contiguous);
  at::Tensor dc = grad_c_n.to(math).clone(at::MemoryFormat::Contiguous);
  const bool row_kernels = input.device().is_cpu() && cpu::recurrence_enabled();
  const bool fused = row_kernels && !s.has_projection;
  // The step loop's: the gradients of the gate pre-activations and of LN(c), (N, G) and
  // (N, H) (the fused kernel keeps them per step).
  at::Tensor grad_z = at::empty({fused ? 0 : s.rows, G}, acc);
  at::Tensor grad_cell_norm = at::empty({fused ? 0 : s.rows, H}, acc);
  // Of W_hh h before its norm, (N, G); the fused kernel writes it transposed, (G, N), except
  // for a small batch (cpu::grads_in_rows), and the input products' likewise.
  const bool in_rows = fused && cpu::grads_in_rows(s.batch, c10::elementSize(math));
  at::Tensor grad_products =
      !fused    ? at::empty({s.rows, G}, acc)
      : in_rows ? cpu::workspace(cpu::Workspace::grad_products_t, {s.rows, G}, acc)
                : cpu::workspace(cpu::Workspace::grad_products_t, {G, s.rows}, acc).t();
  at::Tensor grad_h_all = at::empty({s.has_projection ? s.rows : 0, R}, acc);
  // The gradients of the norms' parameters (gains, biases), and of the input products before
  // their norm, (N, G) and transposed.
  at::Tensor grad_ih_weight, grad_ih_bias, grad_hh_weight, grad_hh_bias, grad_cell_weight,
      grad_cell_bias, grad_product_x, grad_product_x_t;
  if (fused) {
    const at::Tensor w = W_hh.contiguous();
    const at::Tensor grad_norms = at::zeros({3 * G + 2 * H}, acc);
    const at::Tensor saved[] = {gates.contiguous(),    cell_prev.contiguous(),
                                cell.contiguous(),     products.contiguous(),
                                stats.contiguous(),    input_products.contiguous()};
    // These never leave the call: kept memory, not fresh pages (see cpu/workspace.h).
    // Row-major, they are dx's operand, and at a small batch dW_ih's too: otherwise not
    // written where the input needs no gradient.
    grad_product_x = cpu::workspace(cpu::Workspace::grad_input_products,
                                    {input_grad || in_rows ? s.rows : 0, G}, acc);
    grad_product_x_t =
        in_rows ? grad_product_x.t()
                : cpu::workspace(cpu::Workspace::grad_input_products_t, {G, s.rows}, acc);
    AT_DISPATCH_FLOATING_TYPES(math, "lstm_layer_norm_backward", [&] {
      auto a = fused_sequence<scalar_t>(s, reverse, w, ln, mask, zone_c, zone_h);
      // Read only (the struct's pointers are writable for forward).
      a.gates = saved[0].data_ptr<scalar_t>();
      a.cell_prev = saved[1].data_ptr<scalar_t>();
      a.cell_out = saved[2].data_ptr<scalar_t>();
      a.products = saved[3].data_ptr<scalar_t>();
      a.stats = saved[4].data_ptr<scalar_t>();
      a.input_products = saved[5].const_data_ptr<scalar_t>();
      a.ih_gain = ln.ih_weight.const_data_ptr<scalar_t>();
      a.grad_input_products =
          input_grad || in_rows ? grad_product_x.data_ptr<scalar_t>() : nullptr;
      a.grad_input_products_t = in_rows ? nullptr : grad_product_x_t.data_ptr<scalar_t>();
      a.grad_output = grad_y.defined() ? grad_y.const_data_ptr<scalar_t>() : nullptr;
      a.grad_cells = grad_c_seq.defined() ? grad_c_seq.const_data_ptr<scalar_t>() : nullptr;
      a.grad_hidden = dh.data_ptr<scalar_t>();
      a.grad_cell = dc.data_ptr<scalar_t>();
      (in_rows ? a.grad_products : a.grad_products_t) = grad_products.data_ptr<scalar_t>();
      a.rows = s.rows;
      a.grad_norms = grad_norms.data_ptr<scalar_t>();
      cpu::layer_norm_sequence_backward(a);
    });
    grad_hh_weight = grad_norms.narrow(0, 0, G);
    grad_hh_bias = grad_norms.narrow(0, G, G);
    grad_cell_weight = grad_norms.narrow(0, 2 * G, H);
    grad_cell_bias = grad_norms.narrow(0, 2 * G + H, H);
    grad_ih_weight = grad_norms.narrow(0, 2 * G + 2 * H, G);
    // b_ih, b_hh and both product norms' biases all add to z alike.
    grad_ih_bias = grad_hh_bias;
  }

  // Otherwise the step loop (its W_hh^T, a contiguous copy, only where it runs).
  const std::optional<StepGemm> recurrent =
      fused ? std::nullopt : std::optional<StepGemm>(W_hh.t());
  // c~ of a step's rows, what the norm of c saw: with zoneout of c `cell` holds c after it, so
  // c~ = f c_prev + i g again from the saved gates.
  const auto cell_before_zoneout = [&](int64_t offset, int64_t rows) {
    if (!zone_c) return cell.narrow(0, offset, rows);
    const at::Tensor z = gates.narrow(0, offset, rows);
    return (z.narrow(1, H, H) * cell_prev.narrow(0, offset, rows) +
            z.narrow(1, 0, H) * z.narrow(1, 2 * H, H)).contiguous();
  };
  const std::array<bool, 3> input_only{true, false, false};
  for (int64_t k = 0; !fused && k < s.steps; ++k) {
    const int64_t t = reverse ? k : s.steps - 1 - k;
    const int64_t rows = s.step_size[t], offset = s.step_offset[t];
    at::Tensor dh_rows = dh.narrow(0, 0, rows), dc_rows = dc.narrow(0, 0, rows);
    if (grad_c_seq.defined()) dc_rows.add_(grad_c_seq.narrow(0, offset, rows));
    at::Tensor dh_t = grad_y.defined() ? dh_rows + grad_y.narrow(0, offset, rows) : dh_rows;
    // Zoneout: h_t = d h_{t-1} + (1 - d) h~_t sends d dh to the step before directly and
    // (1 - d) dh into this step's cell; c likewise.
    at::Tensor dh_total, dc_total;
    if (zone_h) {
      dh_total = dh_t.clone();
      dh_t = (1 - zoneout_rows(*zone_h, offset, rows)) * dh_total;
    }
    if (zone_c) {
      dc_total = dc_rows.clone();
      dc_rows.mul_(1 - zoneout_rows(*zone_c, offset, rows));
    }
    if (W_hr.has_value()) {
      grad_h_all.narrow(0, offset, rows).copy_(dh_t);
      dh_t = at::mm(dh_t, *W_hr);
    }
    at::Tensor dz = grad_z.narrow(0, offset, rows);
    at::Tensor grad_product = grad_products.narrow(0, offset, rows);
    at::Tensor grad_norm = grad_cell_norm.narrow(0, offset, rows);
    if (row_kernels) {
      const at::Tensor dh_in = dh_t.contiguous();
      const at::Tensor c_tilde = cell_before_zoneout(offset, rows);
      AT_DISPATCH_FLOATING_TYPES(math, "lstm_layer_norm_backward", [&] {
        auto a = step_rows<scalar_t>(rows, H, ln);
        a.product = products.narrow(0, offset, rows).const_data_ptr<scalar_t>();
        // Read only here (the struct's pointers are writable for forward).
        a.stats = stats.narrow(0, offset, rows).data_ptr<scalar_t>();
        a.cell_prev = cell_prev.narrow(0, offset, rows).const_data_ptr<scalar_t>();
        a.gates = gates.narrow(0, offset, rows).data_ptr<scalar_t>();
        a.cell = c_tilde.data_ptr<scalar_t>();
        a.grad_hidden = dh_in.const_data_ptr<scalar_t>();
        a.grad_cell = dc_rows.data_ptr<scalar_t>();
        a.grad_gates = dz.data_ptr<scalar_t>();
        a.grad_product = grad_product.data_ptr<scalar_t>();
        a.grad_cell_norm = grad_norm.data_ptr<scalar_t>();
        cpu::layer_norm_backward_rows(a);
      });
    } else {
      const at::Tensor z = gates.narrow(0, offset, rows);
      const at::Tensor in = z.narrow(1, 0, H), forget = z.narrow(1, H, H);
      const at::Tensor cell_in = z.narrow(1, 2 * H, H), out = z.narrow(1, 3 * H, H);
      const at::Tensor c_new = cell_before_zoneout(offset, rows);
      const at::Tensor tanh_c =  // LN(c) as forward made it
          std::get<0>(at::native_layer_norm(c_new, {H}, ln.cell_weight, ln.cell_bias, kEps))
              .tanh_();
      const at::Tensor grad_out = dh_t * tanh_c;
      grad_norm.copy_(dh_t * out * (1 - tanh_c * tanh_c));
      const at::Tensor grad_c_from_h = std::get<0>(at::native_layer_norm_backward(
          grad_norm, c_new, {H}, stat(stats, kMeanC, offset, rows),
          stat(stats, kRstdC, offset, rows), ln.cell_weight, ln.cell_bias, input_only));
      const at::Tensor dc_t = dc_rows + grad_c_from_h;
      dz.narrow(1, 0, H).copy_(dc_t * cell_in * in * (1 - in));
      dz.narrow(1, H, H).copy_(dc_t * cell_prev.narrow(0, offset, rows) * forget *
                               (1 - forget));
      dz.narrow(1, 2 * H, H).copy_(dc_t * in * (1 - cell_in * cell_in));
      dz.narrow(1, 3 * H, H).copy_(grad_out * out * (1 - out));
      dc_rows.copy_(dc_t * forget);
      grad_product.copy_(std::get<0>(at::native_layer_norm_backward(
          dz, products.narrow(0, offset, rows), {G}, stat(stats, kMeanH, offset, rows),
          stat(stats, kRstdH, offset, rows), ln.hh_weight, ln.hh_bias, input_only)));
    }
    if (zone_c) dc_rows.add_(zoneout_rows(*zone_c, offset, rows) * dc_total);
    at::Tensor carried = (*recurrent)(grad_product);
    if (mask.has_value()) carried.mul_(mask->narrow(0, 0, rows));
    dh_rows.copy_(carried);
    if (zone_h) dh_rows.add_(zoneout_rows(*zone_h, offset, rows) * dh_total);
  }

  // The norms' gains and biases: sums over every row of the output's gradient (times the
  // normalised input, for the gains).
  const auto normalised = [&](const at::Tensor& values, Stat mean, Stat rstd) {
    return (values - stat(stats, mean, 0, s.rows)) * stat(stats, rstd, 0, s.rows);
  };
  if (!fused) {
    grad_hh_weight = (grad_z * normalised(products, kMeanH, kRstdH)).sum(0);
    grad_hh_bias = grad_z.sum(0);
    grad_cell_weight =
        (grad_cell_norm * normalised(cell_before_zoneout(0, s.rows), kMeanC, kRstdC)).sum(0);
    grad_cell_bias = grad_cell_norm.sum(0);
  }

  // The input products' norm over every step at once, then the products themselves.
  if (!fused) {
    const std::array<bool, 3> all{true, true, true};
    std::tie(grad_product_x, grad_ih_weight, grad_ih_bias) = at::native_layer_norm_backward(
        grad_z, input_products, {G}, stat(stats, kMeanX, 0, s.rows),
        stat(stats, kRstdX, 0, s.rows), ln.ih_weight, ln.ih_bias, all);
    grad_product_x_t = grad_product_x.t();
  }
  const auto storage = input.scalar_type();
  const auto back = [&](const at::Tensor& t) { return t.to(storage); };
  const at::Tensor grad_input =
      input_grad
          ? back(sequence_product(grad_product_x, W_ih.t(), cpu::Saved::grad_input))
                .view(input.sizes())
          : at::empty({0}, input.options());
  const at::Tensor grad_w_ih =
      back(sequence_product(grad_product_x_t, x.t(), cpu::Saved::grad_w_ih));
  const at::Tensor grad_w_hh =
      back(sequence_product(grad_products.t(), hidden_prev.t(), cpu::Saved::grad_w_hh));
  // Every bias adds to z as the product norm's bias does.
  const at::Tensor grad_bias = has_bias ? back(grad_hh_bias) : at::empty({0}, input.options());
  const at::Tensor grad_w_hr = s.has_projection ? back(at::mm(grad_h_all.t(), hidden_raw))
                                                : at::empty({0}, input.options());
  return {grad_input, back(dh), back(dc), grad_w_ih, grad_w_hh, grad_bias, grad_w_hr,
          back(grad_ih_weight), back(grad_ih_bias), back(grad_hh_weight), back(grad_hh_bias),
          back(grad_cell_weight), back(grad_cell_bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_ext, CompositeExplicitAutograd, m) {
  m.impl("lstm_layer_norm_forward", &layer_norm_forward);
  m.impl("lstm_layer_norm_backward", &layer_norm_backward);
}

}  // namespace lstm_ext
