// Shared by the CPU and CUDA kernels: the per-element LSTM gate math (one definition, compiled
// for host and device), the sequence layout, and the argument checks of the ops.
//
// Notation used in every shape comment of this project:
//   T  steps, B  batch (largest batch of any step), N  rows of data (T*B padded, sum of
//   batch_sizes packed), I  input features, H  hidden size, R  size of h (proj_size or H).
// Gate order is PyTorch's: i, f, g, o; a gate block is (rows, 4H) with gate k in columns
// [k*H, (k+1)*H).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Formatting.h>  // TORCH_CHECK messages print tensors
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

// Always inlined: the CPU compiles its elementwise loops once per instruction set
// (target_clones), and the math must be inlined into each of them to be vectorized there.
#if defined(__CUDACC__)
#define LSTM_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define LSTM_HOST_DEVICE inline __attribute__((always_inline))
#else
#define LSTM_HOST_DEVICE inline
#endif

namespace lstm_ext {

constexpr int kNumGates = 4;

// Scalar math for float/double, usable on host and device: exp, tanh, reciprocal, constant.
// The CPU kernels pass faster policies (cpu/cell_math.h, which bring their own sigmoid in place
// of exp and reciprocal), so the formulas below exist once.
struct ScalarMath {
  template <typename T>
  static LSTM_HOST_DEVICE T exp(T x) {
#if defined(__CUDA_ARCH__)
    return ::exp(x);
#else
    return std::exp(x);
#endif
  }
  template <typename T>
  static LSTM_HOST_DEVICE T tanh(T x) {
#if defined(__CUDA_ARCH__)
    return ::tanh(x);
#else
    return std::tanh(x);
#endif
  }
  template <typename T>
  static LSTM_HOST_DEVICE T reciprocal(T x) {
    return static_cast<T>(1) / x;
  }
  template <typename T>
  static LSTM_HOST_DEVICE T constant(double value) {
    return static_cast<T>(value);
  }
};

// 1 / (1 + e^-x): for very negative x, e^-x overflows to inf and the result is an exact 0,
// never NaN. A policy with a sigmoid of its own (the CPU's) uses that instead.
template <typename Math, typename T>
LSTM_HOST_DEVICE T sigmoid(T x) {
  if constexpr (requires { Math::sigmoid(x); }) {
    return Math::sigmoid(x);
  } else {
    const T one = Math::template constant<T>(1.0);
    return Math::reciprocal(one + Math::exp(-x));
  }
}

// Gate activations and the new cell, from pre-activations (W_ih x + b_ih + W_hh h + b_hh).
template <typename Math, typename T>
struct CellForward {
  T in, forget, cell, out;  // activations of i, f, g, o
  T c;                      // c' = f * c + i * g
  T h;                      // h' = o * tanh(c')   (before the projection, if any)

  LSTM_HOST_DEVICE CellForward(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev)
      : in(sigmoid<Math>(pre_i)),
        forget(sigmoid<Math>(pre_f)),
        cell(Math::tanh(pre_g)),
        out(sigmoid<Math>(pre_o)),
        c(forget * c_prev + in * cell),
        h(out * Math::tanh(c)) {}
};

// Gradients of one cell with respect to its gate pre-activations and the previous cell.
// Inputs are what the forward saved (activations, previous cell) and the incoming gradients
// of h' (dh) and of c' (dc). c' and tanh(c') are recomputed here rather than stored: the
// expression is the one CellForward uses, so the value is bit-identical.
template <typename Math, typename T>
struct CellBackward {
  T d_in, d_forget, d_cell, d_out;  // gradients of the pre-activations of i, f, g, o
  T dc_prev;                        // gradient of the previous cell

  LSTM_HOST_DEVICE CellBackward(T in, T forget, T cell, T out, T c_prev, T dh, T dc) {
    const T one = Math::template constant<T>(1.0);
    const T c = forget * c_prev + in * cell;
    const T tanh_c = Math::tanh(c);
    const T dc_total = dc + dh * out * (one - tanh_c * tanh_c);
    d_out = dh * tanh_c * out * (one - out);
    d_in = dc_total * cell * in * (one - in);
    d_forget = dc_total * c_prev * forget * (one - forget);
    d_cell = dc_total * in * (one - cell * cell);
    dc_prev = dc_total * forget;
  }
};


// ---------------------------------------------------------------------------------------------
// Host side: the shape of one layer-direction call and the checks every device shares.

// Where the rows of each step live in the (N, features) data. Padded input is the special
// case batch_sizes = [B] * T, so one loop serves both layouts. Batch sizes never grow with the
// step (PackedSequence's rule), so step t owns rows [offset[t], offset[t] + size[t]) and within
// a step row b is sequence b. The reverse direction walks the same rows backwards.
struct LayerShape {
  int64_t steps = 0;        // T
  int64_t batch = 0;        // B
  int64_t rows = 0;         // N
  int64_t input_size = 0;   // I
  int64_t hidden_size = 0;  // H
  int64_t output_size = 0;  // R
  bool packed = false;
  bool has_projection = false;
  std::vector<int64_t> step_size;
  std::vector<int64_t> step_offset;
};

inline void check_same_dtype_and_device(const char* op, const at::Tensor& reference,
                                        const at::Tensor& other, const char* name) {
  TORCH_CHECK(other.scalar_type() == reference.scalar_type(), op, ": ", name, " has dtype ",
              other.scalar_type(), " but input has dtype ", reference.scalar_type(),
              "; convert them to one dtype");
  TORCH_CHECK(other.device() == reference.device(), op, ": ", name, " is on ", other.device(),
              " but input is on ", reference.device(), "; move them to one device");
}

inline void check_shape(const char* op, const at::Tensor& tensor, at::IntArrayRef expected,
                        const char* name) {
  TORCH_CHECK(tensor.sizes() == expected, op, ": expected ", name, " of shape ", expected,
              ", got ", tensor.sizes());
}

// Shapes from the input and the weights; validates the weights, the layout and batch_sizes.
inline LayerShape layer_shape(const char* op, const at::Tensor& input, const at::Tensor& w_ih,
                              const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                              const std::optional<at::Tensor>& batch_sizes) {
  LayerShape s;
  s.packed = batch_sizes.has_value();
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op,
              ": input must be a floating point tensor, got ", input.scalar_type());
  TORCH_CHECK(input.dim() == (s.packed ? 2 : 3), op, ": expected ",
              s.packed ? "packed input of shape (N, input_size)"
                       : "input of shape (steps, batch, input_size)",
              ", got ", input.dim(), "-D input of shape ", input.sizes());
  TORCH_CHECK(w_ih.dim() == 2 && w_hh.dim() == 2, op, ": weights must be 2-D");
  TORCH_CHECK(w_hh.size(0) % kNumGates == 0 && w_hh.size(0) > 0, op,
              ": w_hh must have 4 * hidden_size rows, got ", w_hh.size(0));
  s.hidden_size = w_hh.size(0) / kNumGates;
  s.output_size = w_hh.size(1);
  s.input_size = input.size(-1);
  check_shape(op, w_ih, {kNumGates * s.hidden_size, s.input_size}, "w_ih (4*hidden, input)");
  s.has_projection = w_hr.has_value();
  if (s.has_projection) {
    check_shape(op, *w_hr, {s.output_size, s.hidden_size}, "w_hr (proj, hidden)");
  } else {
    TORCH_CHECK(s.output_size == s.hidden_size, op, ": w_hh has shape ", w_hh.sizes(),
                "; without w_hr it must be (4*hidden, hidden)");
  }
  check_same_dtype_and_device(op, input, w_ih, "w_ih");
  check_same_dtype_and_device(op, input, w_hh, "w_hh");
  if (s.has_projection) check_same_dtype_and_device(op, input, *w_hr, "w_hr");

  if (!s.packed) {
    s.steps = input.size(0);
    s.batch = input.size(1);
    TORCH_CHECK(s.steps > 0, op, ": Expected sequence length to be larger than 0 in RNN");
    s.rows = s.steps * s.batch;
    s.step_size.assign(s.steps, s.batch);
    s.step_offset.resize(s.steps);
    for (int64_t t = 0; t < s.steps; ++t) s.step_offset[t] = t * s.batch;
    return s;
  }
  const at::Tensor& sizes = *batch_sizes;
  TORCH_CHECK(sizes.dim() == 1 && sizes.scalar_type() == at::kLong && sizes.device().is_cpu(),
              op, ": batch_sizes must be a 1-D int64 CPU tensor (PackedSequence.batch_sizes), got ",
              sizes.dim(), "-D ", sizes.scalar_type(), " on ", sizes.device());
  s.steps = sizes.size(0);
  TORCH_CHECK(s.steps > 0, op, ": Expected sequence length to be larger than 0 in RNN");
  const at::Tensor contiguous_sizes = sizes.contiguous();
  const int64_t* size_data = contiguous_sizes.const_data_ptr<int64_t>();
  s.batch = size_data[0];
  s.step_size.assign(size_data, size_data + s.steps);
  s.step_offset.resize(s.steps);
  int64_t offset = 0;
  for (int64_t t = 0; t < s.steps; ++t) {
    TORCH_CHECK(s.step_size[t] > 0 && s.step_size[t] <= (t ? s.step_size[t - 1] : s.batch), op,
                ": batch_sizes must be positive and non-increasing (as PackedSequence makes "
                "them), got ", sizes);
    s.step_offset[t] = offset;
    offset += s.step_size[t];
  }
  s.rows = offset;
  TORCH_CHECK(input.size(0) == s.rows, op, ": packed input has ", input.size(0),
              " rows but batch_sizes sum to ", s.rows);
  return s;
}

inline void check_state(const char* op, const LayerShape& s, const at::Tensor& input,
                        const at::Tensor& h, const at::Tensor& c, const char* h_name,
                        const char* c_name) {
  check_shape(op, h, {s.batch, s.output_size}, h_name);
  check_shape(op, c, {s.batch, s.hidden_size}, c_name);
  check_same_dtype_and_device(op, input, h, h_name);
  check_same_dtype_and_device(op, input, c, c_name);
}

inline void check_bias(const char* op, const LayerShape& s, const at::Tensor& input,
                       const std::optional<at::Tensor>& bias, const char* name) {
  if (!bias.has_value()) return;
  check_shape(op, *bias, {kNumGates * s.hidden_size}, name);
  check_same_dtype_and_device(op, input, *bias, name);
}

// The shapes of a layer-forward op's call, after checking its input, states and weights.
inline LayerShape checked_forward_args(const char* op, const at::Tensor& input,
                                       const at::Tensor& h0, const at::Tensor& c0,
                                       const at::Tensor& w_ih, const at::Tensor& w_hh,
                                       const std::optional<at::Tensor>& b_ih,
                                       const std::optional<at::Tensor>& b_hh,
                                       const std::optional<at::Tensor>& w_hr,
                                       const std::optional<at::Tensor>& batch_sizes) {
  const LayerShape s = layer_shape(op, input, w_ih, w_hh, w_hr, batch_sizes);
  check_state(op, s, input, h0, c0, "h0 (batch, proj_size or hidden_size)",
              "c0 (batch, hidden_size)");
  check_bias(op, s, input, b_ih, "b_ih (4*hidden)");
  check_bias(op, s, input, b_hh, "b_hh (4*hidden)");
  return s;
}

// The recurrent-dropout mask (B, R): what multiplies h before every W_hh product (already
// scaled by 1 / (1 - p)), in the math dtype; returned contiguous.
inline std::optional<at::Tensor> checked_recurrent_mask(const char* op, const LayerShape& s,
                                                        const at::Tensor& input,
                                                        const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return std::nullopt;
  check_shape(op, *mask, {s.batch, s.output_size}, "recurrent_mask (batch, proj_size or hidden)");
  const at::ScalarType math = at::toOpMathType(input.scalar_type());
  TORCH_CHECK(mask->scalar_type() == math, op, ": recurrent_mask must have the math dtype ", math,
              " of ", input.scalar_type(), " input, got ", mask->scalar_type());
  TORCH_CHECK(mask->device() == input.device(), op, ": recurrent_mask is on ", mask->device(),
              " but input is on ", input.device(), "; move them to one device");
  return mask->contiguous();
}

// Zoneout's weights d of the previous state (c_t = d c_{t-1} + (1 - d) c~_t, the same for h):
// (N, columns), one row per row of data, or (1, columns), one row for every step (eval mode's
// expectation), in the math dtype; returned contiguous.
inline std::optional<at::Tensor> checked_zoneout(const char* op, const LayerShape& s,
                                                 const at::Tensor& input,
                                                 const std::optional<at::Tensor>& zoneout,
                                                 int64_t columns, const char* name) {
  if (!zoneout.has_value()) return std::nullopt;
  TORCH_CHECK(zoneout->dim() == 2 && zoneout->size(1) == columns &&
                  (zoneout->size(0) == s.rows || zoneout->size(0) == 1),
              op, ": expected ", name, " of shape [", s.rows, ", ", columns, "] (a row per row "
              "of input) or [1, ", columns, "], got ", zoneout->sizes());
  const at::ScalarType math = at::toOpMathType(input.scalar_type());
  TORCH_CHECK(zoneout->scalar_type() == math, op, ": ", name, " must have the math dtype ", math,
              " of ", input.scalar_type(), " input, got ", zoneout->scalar_type());
  TORCH_CHECK(zoneout->device() == input.device(), op, ": ", name, " is on ", zoneout->device(),
              " but input is on ", input.device(), "; move them to one device");
  return zoneout->contiguous();
}

// The rows of a zoneout tensor for rows [offset, offset + rows) of data, and its row stride.
inline at::Tensor zoneout_rows(const at::Tensor& d, int64_t offset, int64_t rows) {
  return d.size(0) == 1 ? d.expand({rows, d.size(1)}) : d.narrow(0, offset, rows);
}
inline int64_t zoneout_stride(const std::optional<at::Tensor>& d) {
  return d.has_value() && d->size(0) > 1 ? d->size(1) : 0;
}

// Outputs of the forward op that the backward op reads; all empty unless training.
struct SavedForBackward {
  at::Tensor gates;        // (N, 4H) gate activations i, f, g, o
  at::Tensor cell_prev;    // (N, H) cell entering each step, in the math type (fp32 for bf16/fp16)
  at::Tensor hidden_prev;  // (N, R) h entering each step
  at::Tensor hidden_raw;   // (N, H) o * tanh(c) before the projection; empty without w_hr
};

inline void check_saved(const char* op, const LayerShape& s, const at::Tensor& input,
                        const SavedForBackward& saved) {
  TORCH_CHECK(saved.gates.numel() > 0 || s.rows == 0, op,
              ": the forward op ran with training=False and saved nothing for backward; "
              "run it with training=True");
  check_shape(op, saved.gates, {s.rows, kNumGates * s.hidden_size}, "gates");
  check_shape(op, saved.cell_prev, {s.rows, s.hidden_size}, "cell_prev");
  check_shape(op, saved.hidden_prev, {s.rows, s.output_size}, "hidden_prev");
  if (s.has_projection) check_shape(op, saved.hidden_raw, {s.rows, s.hidden_size}, "hidden_raw");
  check_same_dtype_and_device(op, input, saved.gates, "gates");
  TORCH_CHECK(saved.cell_prev.scalar_type() == at::toOpMathType(input.scalar_type()), op,
              ": cell_prev must have the math dtype ", at::toOpMathType(input.scalar_type()),
              ", got ", saved.cell_prev.scalar_type());
  TORCH_CHECK(saved.cell_prev.device() == input.device(), op, ": cell_prev is on ",
              saved.cell_prev.device(), " but input is on ", input.device(),
              "; move them to one device");
  check_same_dtype_and_device(op, input, saved.hidden_prev, "hidden_prev");
  if (s.has_projection) check_same_dtype_and_device(op, input, saved.hidden_raw, "hidden_raw");
}

// The test-only _test_overrun op writes one byte past the end of its target: only when asked
// for by name, and only where the target owns exactly its storage, so that the byte past its
// end is past the end of the allocation too.
inline void check_overrun_target(const at::Tensor& target) {
  const char* asked = std::getenv("LSTM_EXT_TEST_OVERRUN");
  TORCH_CHECK(asked != nullptr && std::strcmp(asked, "1") == 0,
              "_test_overrun writes past the end of its argument, to check that a memory "
              "checker reports it; it runs only with LSTM_EXT_TEST_OVERRUN=1");
  TORCH_CHECK(target.is_contiguous() && target.storage_offset() == 0 &&
                  target.storage().nbytes() == target.nbytes() && target.nbytes() > 0,
              "_test_overrun: the target must be a non-empty tensor that owns its whole storage");
}

}  // namespace lstm_ext
