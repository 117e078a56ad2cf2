// Loads the op library the way a libtorch program would, calls lstm_ext::lstm_layer_forward
// through the dispatcher on random fp64 input and checks it against ATen's own at::lstm.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <dlfcn.h>

#include <cstdio>
#include <tuple>

int main() {
  if (dlopen(LSTM_EXT_LIBRARY, RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "cannot load %s: %s\n", LSTM_EXT_LIBRARY, dlerror());
    return 1;
  }
  const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lstm_ext::lstm_layer_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, bool, bool, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool)>();

  at::manual_seed(0);
  const int64_t steps = 7, batch = 3, input_size = 5, hidden = 6;
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({steps, batch, input_size}, options);
  const at::Tensor h0 = at::randn({batch, hidden}, options);
  const at::Tensor c0 = at::randn({batch, hidden}, options);
  const at::Tensor w_ih = at::randn({4 * hidden, input_size}, options);
  const at::Tensor w_hh = at::randn({4 * hidden, hidden}, options);
  const at::Tensor b_ih = at::randn({4 * hidden}, options);
  const at::Tensor b_hh = at::randn({4 * hidden}, options);

  const auto [output, h_n, c_n, gates, cell_prev, hidden_prev, hidden_raw, cells] =
      op.call(x, h0, c0, w_ih, w_hh, b_ih, b_hh, std::nullopt, std::nullopt, false, false,
              std::nullopt, std::nullopt, std::nullopt, false);
  const auto [expected, expected_h, expected_c] =
      at::lstm(x, {h0.unsqueeze(0), c0.unsqueeze(0)}, {w_ih, w_hh, b_ih, b_hh},
               /*has_biases=*/true, /*num_layers=*/1, /*dropout=*/0.0, /*train=*/false,
               /*bidirectional=*/false, /*batch_first=*/false);

  const double errors[] = {
      (output - expected).abs().max().item<double>(),
      (h_n - expected_h[0]).abs().max().item<double>(),
      (c_n - expected_c[0]).abs().max().item<double>(),
  };
  for (double error : errors) {
    if (!(error < 1e-12)) {
      std::fprintf(stderr, "lstm_layer_forward differs from at::lstm by %g\n", error);
      return 1;
    }
  }
  std::printf("lstm_layer_forward matches at::lstm (max abs differences %g %g %g)\n", errors[0],
              errors[1], errors[2]);
  return 0;
}
