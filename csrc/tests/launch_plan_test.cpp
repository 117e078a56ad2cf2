// The CUDA kernels' launch planning, checked on the CPU: for every size, the grid is valid
// (1 .. gridDim.x limit blocks, whole warps), bounded by the resident blocks, and the
// grid-stride loop of the kernels visits every element exactly once.
#include "../cuda/launch_plan.h"

#include <cstdio>
#include <vector>

namespace {

int failures = 0;

void expect(bool condition, const char* what, int64_t elements, int64_t multiprocessors) {
  if (!condition) {
    std::fprintf(stderr, "FAILED: %s (elements %lld, multiprocessors %lld)\n", what,
                 static_cast<long long>(elements), static_cast<long long>(multiprocessors));
    ++failures;
  }
}

// Runs the kernels' loop `for (i = block * threads + thread; i < total; i += blocks * threads)`
// for every thread of the planned grid and counts the visits per element.
void check_coverage(int64_t elements, int64_t multiprocessors) {
  const auto launch = lstm_ext::cuda::plan_elementwise(elements, multiprocessors);
  std::vector<int> visits(static_cast<size_t>(elements), 0);
  int64_t busiest = 0;
  for (int64_t block = 0; block < launch.blocks; ++block) {
    for (int64_t thread = 0; thread < launch.threads; ++thread) {
      int64_t iterations = 0;
      for (int64_t i = block * launch.threads + thread; i < elements;
           i += launch.blocks * launch.threads) {
        ++visits[static_cast<size_t>(i)];
        ++iterations;
      }
      busiest = iterations > busiest ? iterations : busiest;
    }
  }
  bool once = true;
  for (int count : visits) once = once && count == 1;
  expect(once, "every element visited exactly once", elements, multiprocessors);
  expect(busiest == launch.iterations, "iterations is the busiest thread's count", elements,
         multiprocessors);
}

void check_grid(int64_t elements, int64_t multiprocessors) {
  const auto launch = lstm_ext::cuda::plan_elementwise(elements, multiprocessors);
  expect(launch.blocks >= 1, "at least one block", elements, multiprocessors);
  expect(launch.blocks <= lstm_ext::cuda::kMaxGridX, "within gridDim.x", elements,
         multiprocessors);
  expect(launch.threads % 32 == 0 && launch.threads <= 1024, "whole warps, <= 1024 threads",
         elements, multiprocessors);
  const int64_t resident =
      (multiprocessors < 1 ? 1 : multiprocessors) * lstm_ext::cuda::kBlocksPerMultiprocessor;
  expect(launch.blocks <= resident, "no more blocks than stay resident", elements,
         multiprocessors);
  // Small problems get one thread per element, none idle beyond the last block.
  if (elements > 0 && elements <= resident * launch.threads) {
    expect(launch.iterations == 1, "one pass when the grid covers everything", elements,
           multiprocessors);
    expect((launch.blocks - 1) * launch.threads < elements, "no fully idle block", elements,
           multiprocessors);
  }
  expect(launch.blocks * launch.threads * launch.iterations >= elements, "grid covers all",
         elements, multiprocessors);
}

}  // namespace

int main() {
  // 1 and 2 multiprocessors reach the grid-stride regime quickly; 108 (A100), 132 (H100/H200).
  for (const int64_t multiprocessors : {0, 1, 2, 108, 132}) {
    for (const int64_t elements :
         {0, 1, 31, 255, 256, 257, 4095, 4096, 4097, 64 * 512, 64 * 1024 + 3, 300000}) {
      check_grid(elements, multiprocessors);
      check_coverage(elements, multiprocessors);
    }
    // Sizes past 32 bits: the planning must not overflow.
    for (const int64_t elements : {int64_t{1} << 31, (int64_t{1} << 34) + 7}) {
      check_grid(elements, multiprocessors);
    }
  }
  static_assert(lstm_ext::cuda::plan_elementwise(1, 132).blocks == 1);
  static_assert(lstm_ext::cuda::plan_elementwise(64 * 512, 132).blocks == 128);
  static_assert(lstm_ext::cuda::plan_elementwise(1 << 20, 132).blocks == 132 * 8);
  if (failures == 0) std::printf("launch plan: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
