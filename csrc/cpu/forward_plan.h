// The form the fused CPU forward recurrence takes for a call, named for the tests: the form is
// a speed choice (recurrence.cpp's plan_forward), invisible in the results, so a test asks for
// it here rather than timing it.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

namespace lstm_ext {
namespace cpu {

// For a layer call without a projection, weights contiguous: "direct" (W_hh read in place by
// dot products), "panels" or "pairs" (packed panels; pairs: bf16 pairs), with " with input"
// where the call was offered the input projection and takes it, or "declined" where it was
// offered it and the layer must make the projection first (and call again without it).
std::string forward_plan_name(int64_t batch, int64_t steps, int64_t hidden, int64_t input_size,
                              c10::ScalarType dtype, bool input_offered, bool training);

}  // namespace cpu
}  // namespace lstm_ext
