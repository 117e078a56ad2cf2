// CUDA implementation of the layer ops: the shared step loop (lstm_layer.h), whose GEMMs run
// through ATen on cuBLAS and the caller's current stream, with the fused elementwise passes
// below. The gate math is lstm_common.h's, the same the CPU uses.
#include "../lstm_layer.h"
#include "launch_plan.h"
#include "step_elements.h"

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
  const int64_t total = a.rows * a.hidden;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       index < total; index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    cuda::forward_step_element(a, index);
  }
}

template <typename scalar_t>
__global__ void backward_step_kernel(BackwardStep<scalar_t> a) {
  const int64_t total = a.rows * a.hidden;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       index < total; index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    cuda::backward_step_element(a, index);
  }
}

__global__ void overrun_kernel(unsigned char* past_end) { *past_end = 1; }

cuda::ElementwiseLaunch elementwise_launch(int64_t elements) {
  return cuda::plan_elementwise(elements,
                                at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

struct CudaKernels {
  // at::mm on cuBLAS, which takes a row- or column-major weight as it is. Any other strides (a
  // sliced weight, say) would make at::mm copy the weight at every step, so that copy is made
  // once here. (ATen's own cuBLAS wrapper, at::cuda::blas::gemm, would skip at::mm's per-call
  // overhead, but torch's wheels do not export it.)
  static std::unique_ptr<StepProduct> step_product(const at::Tensor& weight, int64_t, int64_t) {
    const bool as_is = blas_ready(layout_of(weight));
    return std::make_unique<AtenStepProduct>(as_is ? weight : weight.contiguous());
  }

  static at::Tensor linear(const at::Tensor& x, const at::Tensor& w,
                           const std::optional<at::Tensor>& bias) {
    return bias.has_value() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  }

  static at::Tensor gate_gradients(bool, at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::empty(sizes, options);  // the caching allocator keeps memory already
  }

  // No whole-sequence kernel on CUDA yet: the step loop runs.
  template <typename scalar_t>
  static bool forward_sequence(const SequenceForward<scalar_t>&) {
    return false;
  }
  template <typename scalar_t>
  static bool backward_sequence(const SequenceBackward<scalar_t>&) {
    return false;
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
  m.impl("_test_overrun", [](const at::Tensor& target) {
    check_overrun_target(target);
    overrun_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(
        static_cast<unsigned char*>(target.data_ptr()) + target.nbytes());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace lstm_ext
