// CUDA implementation of the layer ops: the shared step loop (lstm_layer.h), whose GEMMs run
// through ATen on cuBLAS and the caller's current stream, with the fused elementwise passes
// below. The gate math is lstm_common.h's, the same the CPU uses.
#include "../lstm_layer.h"
#include "launch_plan.h"
#include "persistent.h"
#include "step_elements.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
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

// Planted bugs for gpu_check.sh's plants stage, which checks that the CUDA tests catch each:
// LSTM_EXT_TEST_PLANT=default_stream queues our kernels on the legacy default stream instead of
// the caller's, =cell adds 1e-3 to the h each forward step writes (output and state). Unset,
// as everywhere outside that stage, nothing changes.
enum class Plant { none, default_stream, cell };

Plant planted() {
  static const Plant plant = [] {
    const char* value = std::getenv("LSTM_EXT_TEST_PLANT");
    if (value == nullptr || *value == '\0') return Plant::none;
    if (std::strcmp(value, "default_stream") == 0) return Plant::default_stream;
    TORCH_CHECK(std::strcmp(value, "cell") == 0, "LSTM_EXT_TEST_PLANT is default_stream or cell "
                "(a bug gpu_check.sh plants), or unset, not '", value, "'");
    return Plant::cell;
  }();
  return plant;
}

cudaStream_t launch_stream() {
  return planted() == Plant::default_stream ? cudaStreamLegacy
                                            : at::cuda::getCurrentCUDAStream().stream();
}

template <typename scalar_t>
void plant_in_hidden(scalar_t* hidden, int64_t elements) {
  if (planted() != Plant::cell) return;
  at::from_blob(hidden, {elements},
                at::TensorOptions()
                    .dtype(c10::CppTypeToScalarType<scalar_t>::value)
                    .device(at::kCUDA, at::cuda::current_device()))
      .add_(1e-3);
}

// The persistent recurrence's barriers (csrc/cuda/persistent.h): the block's, and the grid's,
// which a cooperative launch provides.
// (Host-and-device in name only, as the bodies that call them are.)
struct DeviceSync {
  __host__ __device__ void threads() const {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
  __host__ __device__ void grid() const {
#ifdef __CUDA_ARCH__
    cooperative_groups::this_grid().sync();
#endif
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(cuda::kPersistentThreads)
    persistent_forward_kernel(SequenceForward<scalar_t> a, cuda::PersistentPlan p) {
  extern __shared__ __align__(16) unsigned char smem[];
  DeviceSync sync;
  cuda::persistent_forward_body(a, p, blockIdx.x, threadIdx.x, smem, sync);
}

template <typename scalar_t>
__global__ void __launch_bounds__(cuda::kPersistentThreads)
    persistent_backward_kernel(SequenceBackward<scalar_t> a, cuda::PersistentPlan p) {
  extern __shared__ __align__(16) unsigned char smem[];
  DeviceSync sync;
  cuda::persistent_backward_body(a, p, blockIdx.x, threadIdx.x, smem, sync);
}

// Whether the persistent recurrence runs: LSTM_EXT_CUDA_PERSISTENT=1 wherever it applies, =0
// never; unset, where an H200 measured it faster than the step loop in every row of the GPU
// benchmark (benchmarks/results/gpu-h200: fp32, bf16 and fp16, T 25 and 150): on compute
// capability 9.0, batches of up to 16, forward up to H 512, backward up to H 256.
bool persistent_wanted(bool backward, int64_t hidden, int64_t batch) {
  const char* value = std::getenv("LSTM_EXT_CUDA_PERSISTENT");
  if (value != nullptr && value[0] != '\0') {
    TORCH_CHECK(std::strcmp(value, "0") == 0 || std::strcmp(value, "1") == 0,
                "LSTM_EXT_CUDA_PERSISTENT must be 0 (never), 1 (wherever it applies) or unset "
                "(where measured faster), not '", value, "'");
    return value[0] == '1';
  }
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  return props->major == 9 && props->minor == 0 && batch <= 16 &&
         hidden <= (backward ? 256 : 512);
}

// Every step has the whole batch (no packed sequence shrinks it).
bool uniform_steps(const SequenceLayout& s) {
  for (int64_t t = 0; t < s.steps; ++t) {
    if (s.step_size[t] != s.batch || s.step_offset[t] != t * s.batch) return false;
  }
  return s.steps > 0 && s.batch > 0;
}

// Launches kernel(args, plan) cooperatively where the plan fits the device and every block can
// be resident at once; false (nothing launched) otherwise.
template <typename Args>
bool launch_persistent(void (*kernel)(Args, cuda::PersistentPlan), const Args& args,
                       bool backward, int64_t scalar_bytes, int64_t acc_bytes) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  if (!props->cooperativeLaunch) return false;
  const cuda::PersistentPlan plan = cuda::plan_persistent(
      backward, args.hidden, args.batch, props->multiProcessorCount, cuda::kPersistentThreads,
      static_cast<int64_t>(props->sharedMemPerBlockOptin), scalar_bytes, acc_bytes);
  if (!plan.fits) return false;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(plan.smem_bytes)));
  int resident = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &resident, kernel, static_cast<int>(plan.threads), static_cast<size_t>(plan.smem_bytes)));
  if (static_cast<int64_t>(resident) * props->multiProcessorCount < plan.blocks) return false;
  Args args_copy = args;
  cuda::PersistentPlan plan_copy = plan;
  void* params[] = {&args_copy, &plan_copy};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(
      reinterpret_cast<void*>(kernel), dim3(static_cast<unsigned>(plan.blocks)),
      dim3(static_cast<unsigned>(plan.threads)), params, static_cast<size_t>(plan.smem_bytes),
      launch_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

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

  // The caching allocator keeps memory already.
  static at::Tensor kept_linear(const at::Tensor& x, const at::Tensor& w,
                                const std::optional<at::Tensor>& bias, cpu::Saved) {
    return linear(x, w, bias);
  }

  static at::Tensor inference_linear(const at::Tensor& x, const at::Tensor& w,
                                     const std::optional<at::Tensor>& bias) {
    return linear(x, w, bias);
  }

  static bool wants_transposed_gate_gradients(at::ScalarType) { return true; }

  static bool reads_broadcast_gradients() { return false; }

  static at::Tensor gate_gradients(bool, at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::empty(sizes, options);  // the caching allocator keeps memory already
  }

  static at::Tensor saved_sequence(cpu::Saved, at::IntArrayRef sizes,
                                   const at::TensorOptions& options) {
    return at::empty(sizes, options);
  }

  // The persistent kernels read pre-activations with the biases in them.
  static bool sequence_handles_biases() { return false; }

  // The persistent recurrence where it applies and is wanted (see persistent_wanted): uniform
  // batches without recurrent dropout, zoneout or a projection, the input projection already
  // made.
  template <typename scalar_t>
  static bool forward_sequence(const SequenceForward<scalar_t>& a) {
    using acc_t = at::opmath_type<scalar_t>;
    if (a.input != nullptr || a.w_hr != nullptr || a.recurrent_mask != nullptr ||
        a.zoneout_cell != nullptr || a.zoneout_hidden != nullptr || a.w_hh_int8 != nullptr ||
        !uniform_steps(a) ||
        !persistent_wanted(/*backward=*/false, a.hidden, a.batch)) {
      return false;
    }
    if (!launch_persistent(&persistent_forward_kernel<scalar_t>, a, /*backward=*/false,
                           sizeof(scalar_t), sizeof(acc_t))) {
      return false;
    }
    plant_in_hidden(a.output, a.steps * a.batch * a.hidden);
    plant_in_hidden(a.hidden_state, a.batch * a.hidden);
    return true;
  }
  template <typename scalar_t>
  static bool backward_sequence(const SequenceBackward<scalar_t>& a) {
    using acc_t = at::opmath_type<scalar_t>;
    if (a.w_hr != nullptr || a.recurrent_mask != nullptr || a.zoneout_cell != nullptr ||
        a.zoneout_hidden != nullptr || a.grad_cells != nullptr || !uniform_steps(a) ||
        !persistent_wanted(/*backward=*/true, a.hidden, a.batch)) {
      return false;
    }
    return launch_persistent(&persistent_backward_kernel<scalar_t>, a, /*backward=*/true,
                             sizeof(scalar_t), sizeof(acc_t));
  }

  template <typename scalar_t>
  static void forward_step(const ForwardStep<scalar_t>& a) {
    const auto launch = elementwise_launch(a.rows * a.hidden);
    forward_step_kernel<scalar_t>
        <<<static_cast<unsigned>(launch.blocks), static_cast<unsigned>(launch.threads), 0,
           launch_stream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    plant_in_hidden(a.hidden_out, a.rows * a.hidden);
    if (a.hidden_state) plant_in_hidden(a.hidden_state, a.rows * a.hidden);
  }

  template <typename scalar_t>
  static void backward_step(const BackwardStep<scalar_t>& a) {
    const auto launch = elementwise_launch(a.rows * a.hidden);
    backward_step_kernel<scalar_t>
        <<<static_cast<unsigned>(launch.blocks), static_cast<unsigned>(launch.threads), 0,
           launch_stream()>>>(a);
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
