// The CPU's per-step GEMM (see StepProduct in lstm_layer.h).
#pragma once

#include "../lstm_layer.h"

#include <memory>

namespace lstm_ext {

// weight is (K, N); a product for `steps` steps of at most `batch` rows each. fp32 weights are
// packed once into MKL's GEMM layout when the torch in use exports MKL's packed-GEMM API and a
// self-test of it passes (LSTM_EXT_PACKED_GEMM=0 turns this off); otherwise the product is
// ATen's GEMM, on a contiguous copy of W^T when that is faster for small batches.
std::unique_ptr<StepProduct> cpu_step_product(const at::Tensor& weight, int64_t steps,
                                              int64_t batch);

// Whether the packed fp32 path is available and enabled (for tests and benchmarks).
bool packed_gemm_enabled();

}  // namespace lstm_ext
