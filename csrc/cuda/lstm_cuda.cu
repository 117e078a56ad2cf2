// CUDA implementation of the layer ops: the shared step loop (lstm_layer.h), whose GEMMs run
// through ATen on cuBLAS and the caller's current stream, with the fused elementwise passes
// below. The gate math is lstm_common.h's, the same the CPU uses.
#include "../lstm_layer.h"
#include "launch_plan.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <type_traits>

namespace lstm_ext {
namespace {

// The step arguments travel to the kernels by value, as kernel parameters.
template <typename Step>
constexpr bool kKernelArgument =
    std::is_trivially_copyable_v<Step> && std::is_standard_layout_v<Step> &&
    sizeof(Step) <= 4096;  // the kernel parameter limit
static_assert(kKernelArgument<ForwardStep<float>> && kKernelArgument<ForwardStep<double>> &&
              kKernelArgument<ForwardStep<at::Half>> &&
              kKernelArgument<ForwardStep<at::BFloat16>>);
static_assert(kKernelArgument<BackwardStep<float>> && kKernelArgument<BackwardStep<double>> &&
              kKernelArgument<BackwardStep<at::Half>> &&
              kKernelArgument<BackwardStep<at::BFloat16>>);
// The cell state is kept in fp32 (fp64 for fp64) whatever the storage type.
static_assert(std::is_same_v<ForwardStep<at::Half>::acc_t, float> &&
              std::is_same_v<ForwardStep<at::BFloat16>::acc_t, float> &&
              std::is_same_v<ForwardStep<double>::acc_t, double>);

// One thread per (row, hidden unit); a grid-stride loop covers any size with a bounded grid.
template <typename scalar_t>
__global__ void forward_step_kernel(ForwardStep<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.hidden;
  const int64_t total = a.rows * H;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       index < total; index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = index / H;
    const int64_t j = index - r * H;
    scalar_t* gates = a.gates + r * kNumGates * H + j;
    const acc_t c_prev = a.cell[index];
    const CellForward<ScalarMath, acc_t> cf(
        static_cast<acc_t>(gates[0]), static_cast<acc_t>(gates[H]),
        static_cast<acc_t>(gates[2 * H]), static_cast<acc_t>(gates[3 * H]), c_prev);
    if (a.save_gates) {
      gates[0] = static_cast<scalar_t>(cf.in);
      gates[H] = static_cast<scalar_t>(cf.forget);
      gates[2 * H] = static_cast<scalar_t>(cf.cell);
      gates[3 * H] = static_cast<scalar_t>(cf.out);
    }
    if (a.cell_prev_saved) a.cell_prev_saved[index] = c_prev;
    a.cell[index] = cf.c;
    a.hidden_out[index] = static_cast<scalar_t>(cf.h);
    if (a.hidden_state) a.hidden_state[index] = static_cast<scalar_t>(cf.h);
  }
}

template <typename scalar_t>
__global__ void backward_step_kernel(BackwardStep<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.hidden;
  const int64_t total = a.rows * H;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       index < total; index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = index / H;
    const int64_t j = index - r * H;
    const scalar_t* gates = a.gates + r * kNumGates * H + j;
    scalar_t* grad_gates = a.grad_gates + r * kNumGates * H + j;
    acc_t dh = 0;
    if (a.grad_h) dh += static_cast<acc_t>(a.grad_h[index]);
    if (a.grad_h_extra) dh += static_cast<acc_t>(a.grad_h_extra[index]);
    const CellBackward<ScalarMath, acc_t> cb(
        static_cast<acc_t>(gates[0]), static_cast<acc_t>(gates[H]),
        static_cast<acc_t>(gates[2 * H]), static_cast<acc_t>(gates[3 * H]), a.cell_prev[index],
        dh, a.grad_cell[index]);
    grad_gates[0] = static_cast<scalar_t>(cb.d_in);
    grad_gates[H] = static_cast<scalar_t>(cb.d_forget);
    grad_gates[2 * H] = static_cast<scalar_t>(cb.d_cell);
    grad_gates[3 * H] = static_cast<scalar_t>(cb.d_out);
    a.grad_cell[index] = cb.dc_prev;
  }
}

cuda::ElementwiseLaunch elementwise_launch(int64_t elements) {
  return cuda::plan_elementwise(elements,
                                at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

struct CudaKernels {
  // cuBLAS takes transposed operands at full speed: no per-call preparation.
  static std::unique_ptr<StepProduct> step_product(const at::Tensor& weight, int64_t, int64_t) {
    return std::make_unique<AtenStepProduct>(weight);
  }

  template <typename scalar_t>
  static void forward_step(const ForwardStep<scalar_t>& a) {
    const auto launch = elementwise_launch(a.rows * a.hidden);
    forward_step_kernel<scalar_t>
        <<<static_cast<unsigned>(launch.blocks), static_cast<unsigned>(launch.threads), 0,
           at::cuda::getCurrentCUDAStream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t>
  static void backward_step(const BackwardStep<scalar_t>& a) {
    const auto launch = elementwise_launch(a.rows * a.hidden);
    backward_step_kernel<scalar_t>
        <<<static_cast<unsigned>(launch.blocks), static_cast<unsigned>(launch.threads), 0,
           at::cuda::getCurrentCUDAStream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(lstm_ext, CUDA, m) {
  m.impl("lstm_layer_forward", &layer_forward<CudaKernels>);
  m.impl("lstm_layer_backward", &layer_backward<CudaKernels>);
}

}  // namespace lstm_ext
