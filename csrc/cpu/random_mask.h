// Random masks for the variants (dropout of the recurrent state, zoneout, weight drop), drawn
// on the CPU from torch's default generator.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <tuple>

namespace lstm_ext {
namespace cpu {

// A new contiguous tensor of `size` (fp32 or fp64) whose entries are each `value` with
// probability `probability`, else 0, independently. One 64-bit seed is drawn from torch's
// default CPU generator per call (so torch.manual_seed repeats the masks) and keys Philox4x32-10
// over the entries' indices: the result does not depend on the number of threads. On two Zen 4
// cores it is about 15x faster than torch.rand(size) < p, which draws every entry from one
// Mersenne Twister in order; and P(value) is exact to 2^-32 rather than 2^-24.
at::Tensor bernoulli_mask(at::IntArrayRef size, double probability, double value,
                          at::ScalarType dtype);

// DropConnect of an fp32 or fp64 weight: (weight * M, kept) with M the mask
// bernoulli_mask(weight.sizes(), 1 - p, 1 / (1 - p), dtype) would draw at this point of the
// generator, in one pass and without the mask in memory. kept holds which entries M keeps, one
// bit each (16 bytes per 128 entries), for drop_connect_backward. Both come from memory kept
// across calls (workspace.h's saved buffers): a fresh weight-sized tensor each training step
// comes as fresh pages, which cost as much as the masking at B 1.
std::tuple<at::Tensor, at::Tensor> drop_connect(const at::Tensor& weight, double p);

// grad * M for the M that drop_connect(weight, p) drew with this `kept`: its weight's gradient.
at::Tensor drop_connect_backward(const at::Tensor& grad, const at::Tensor& kept, double p);

}  // namespace cpu
}  // namespace lstm_ext
