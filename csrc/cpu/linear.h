// The CPU's whole-sequence products (input projection, dx, dW): x @ w^T + bias.
#pragma once

#include "workspace.h"

#include <ATen/core/Tensor.h>

#include <optional>
#include <variant>

namespace lstm_ext {

// x (M, K) @ w (N, K)^T [+ bias (N,)], as a new contiguous (M, N) tensor. Few rows of fp32 or
// fp64 (up to 4; off Intel up to 48) are dot products on w in place (linear.cpp's small_linear);
// off Intel, fp32 and fp64 with w the transpose of a row-major matrix (the backward's dW and
// dx) are the recurrence's tile products on w packed in panels (linear.cpp's panel_product);
// otherwise fp32, and bf16 on a CPU with bf16 dot products, go through the oneDNN that torch
// ships (mkldnn::_linear_pointwise), which runs at the CPU's own vector width on any vendor's
// x86 CPU (the MKL behind at::mm ran at about half of it on AMD, and at::addmm first copies the
// broadcast bias into its output); other dtypes, empty products, a torch without oneDNN, or
// LSTM_EXT_ONEDNN_LINEAR=0 use at::addmm.
// With a workspace slot (a result that never leaves the caller's call) or a saved-buffer kind
// (one autograd keeps until the backward), the result is written into kept memory where the
// product can write into given memory (at::addmm's route; mkldnn::_linear_pointwise allocates
// its own), instead of fresh pages: so bf16 then takes at::addmm, whose bf16 is oneDNN too.
using LinearInto = std::variant<std::monostate, cpu::Workspace, cpu::Saved>;
at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& w,
                      const std::optional<at::Tensor>& bias, LinearInto into = {});

// Whether cpu_linear reads a transposed fp32/fp64 operand in place (at::mm, whose MKL packs it
// as it goes) rather than copying it into its own layout first (oneDNN).
bool cpu_linear_reads_transposed(at::ScalarType dtype);

}  // namespace lstm_ext
