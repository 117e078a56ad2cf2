// Host-side launch planning for the CUDA elementwise kernels. Plain C++ with no CUDA headers,
// so a CPU-only test (csrc/tests/launch_plan_test.cpp) checks the grids that no GPU may ever
// have run here.
#pragma once

#include <algorithm>
#include <cstdint>

namespace lstm_ext::cuda {

// A multiple of the warp size; 256 threads leave room for 8 resident blocks per multiprocessor.
constexpr int64_t kElementwiseThreads = 256;
// Enough resident blocks to hide latency; beyond that the grid-stride loop takes the rest.
constexpr int64_t kBlocksPerMultiprocessor = 8;
// gridDim.x's hardware limit.
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;

static_assert(kElementwiseThreads % 32 == 0 && kElementwiseThreads <= 1024,
              "whole warps, within the per-block thread limit");

struct ElementwiseLaunch {
  int64_t blocks;
  int64_t threads;
  // Grid-stride iterations the busiest thread runs: ceil(elements / (blocks * threads)).
  int64_t iterations;
};

// The grid for one thread per (row, hidden unit) over `elements` of them. Never an empty grid
// (a launch with zero blocks is an error even when there is no work).
constexpr ElementwiseLaunch plan_elementwise(int64_t elements, int64_t multiprocessors) {
  const int64_t wanted = (elements + kElementwiseThreads - 1) / kElementwiseThreads;
  const int64_t resident = std::max<int64_t>(1, multiprocessors) * kBlocksPerMultiprocessor;
  const int64_t blocks = std::clamp<int64_t>(std::min(wanted, resident), 1, kMaxGridX);
  const int64_t stride = blocks * kElementwiseThreads;
  return {blocks, kElementwiseThreads, (elements + stride - 1) / stride};
}

}  // namespace lstm_ext::cuda
