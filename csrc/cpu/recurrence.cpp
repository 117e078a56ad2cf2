// The fused recurrence (recurrence.h) compiled once per instruction set, the choice of
// instruction set (isa.h), and the parallel region that runs it.
#include "recurrence.h"

#include "forward_plan.h"
#include "workspace.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <cstring>
#include <string>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace lstm_ext {
namespace cpu {
namespace {

#if LSTM_EXT_X86_VARIANTS
// Whether Linux lets this process use the AMX tile data (it must be asked for once per process;
// a kernel that does not know AMX says no).
bool amx_permitted() {
#if defined(__linux__)
  constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
#else
  return false;
#endif
}
#endif

Isa best_supported_isa() {
#if LSTM_EXT_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) {
    // avx512_bf16 also stands for AVX512-VNNI (the int8 dot products), which every CPU with
    // the bf16 instructions has.
    if (!__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("avx512vnni")) {
      return Isa::avx512;
    }
    const bool amx = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16");
    return amx && amx_permitted() ? Isa::amx : Isa::avx512_bf16;
  }
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::avx2;
#endif
  return Isa::baseline;
}

Isa choose_isa() {
  const Isa best = best_supported_isa();
  const char* setting = std::getenv("LSTM_EXT_CPU_ISA");
  if (setting == nullptr || *setting == '\0') return best;
  const std::string name(setting);
  Isa wanted;
  if (name == "amx") {
    wanted = Isa::amx;
  } else if (name == "avx512_bf16") {
    wanted = Isa::avx512_bf16;
  } else if (name == "avx512") {
    wanted = Isa::avx512;
  } else if (name == "avx2") {
    wanted = Isa::avx2;
  } else if (name == "baseline") {
    wanted = Isa::baseline;
  } else {
    TORCH_CHECK(false, "LSTM_EXT_CPU_ISA=", name,
                " is not an instruction set lstm_ext knows; use amx, avx512_bf16, avx512, "
                "avx2 or baseline, or leave it unset for the best this CPU supports");
  }
  TORCH_CHECK(wanted <= best, "LSTM_EXT_CPU_ISA=", name, " asks for instructions this CPU lacks; "
              "it supports up to ", isa_name(best));
  return wanted;
}

// One wrapper per instruction set and pass; flatten compiles the whole template for it.
LSTM_EXT_KERNEL_VARIANTS_AMX(forward_kernel, forward_thread,
                             (const SequenceForward<T>& a, int thread, int threads),
                             (a, thread, threads))
LSTM_EXT_KERNEL_VARIANTS_AMX(backward_kernel, backward_thread,
                             (const SequenceBackward<T>& a, int thread, int threads),
                             (a, thread, threads))

// A single step by columns (forward_thread's kColumns), compiled for AVX-512 only: fp32 and
// fp64 run as under avx512 in the two sets above it too.
#if LSTM_EXT_X86_VARIANTS
template <typename T>
LSTM_EXT_TARGET_AVX512 void forward_columns_kernel(const SequenceForward<T>& a, int thread,
                                                   int threads) {
  forward_thread<Isa::avx512, T, true>(a, thread, threads);
}
#endif

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::amx: return "amx";
    case Isa::avx512_bf16: return "avx512_bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

Isa active_isa() {
  static const Isa isa = choose_isa();
  return isa;
}

bool intel_cpu() {
#if LSTM_EXT_X86_VARIANTS
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return intel;
#else
  return false;
#endif
}

bool panels_outgrow_l2(int64_t bytes) {
  // A CPU (or a VM) that does not say gets the smallest L2 of the x86 cores we target.
  static const int64_t l2_bytes = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long size = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (size > 0) return static_cast<int64_t>(size);
#endif
    return int64_t{1} << 20;
  }();
  return 2 * bytes > l2_bytes;
}

bool recurrence_enabled() {
  const char* setting = std::getenv("LSTM_EXT_CPU_RECURRENCE");
  return !(setting && std::strcmp(setting, "0") == 0);
}

int64_t packing_pays_from(int64_t batch, bool panels_take_input, bool small_weights,
                          bool training) {
  // Where the panels take the input projection too, packing also saves the separate GEMM: on a
  // Xeon (family 6 model 167) inference at H 64-256, B 4, T 20-25 ran 10-25 % faster with
  // panels (training 2-10 %), at B 3, T 15 4 %, at B 4, T 10 even; at B 2, T 12 it lost 5-9 %
  // and at B 1 5-10 %, as the panels' tiles of one or two rows wait on their loads. On the Zen 4
  // (medians of 200 paired calls, interleaved in one process) panels took 0.68-0.84x the direct
  // form's time in inference at H 128-256, B 3-4, T 12-40 (training 0.88-0.94x); at H 512, with
  // 8 MB of weights packed every call, 0.91-0.93x in inference at T 25-40 but 1.00x at T 12,
  // and in training 1.03x at T 25, 0.99x at T 40.
  constexpr int64_t kWithInputFromRows = 3, kWithInputPaysFromSteps = 12,
                    kWithLargeInputPaysFromSteps = 25;
  if (!panels_take_input || batch < kWithInputFromRows) return kPackingPaysFromSteps;
  if (small_weights) return kWithInputPaysFromSteps;
  return training ? kPackingPaysFromSteps : kWithLargeInputPaysFromSteps;
}

bool direct_form(int64_t batch, int64_t steps, int64_t pays_from, bool panels_streamed,
                 bool one_row_packs) {
  // Up to kDirectRows rows when the sequence is too short to repay packing (pays_from steps),
  // one row at any length unless one_row_packs, and a single step (an LSTMCell call) up to
  // kSingleStepDirectRows. Panels streamed from L3 every step lost to the dot products at
  // every length on the Xeon (H 512 B 4 T 60-150 by 15 %, H 1024 B 4 T 150 by 25 %).
  if (panels_streamed && batch <= kDirectRows) return true;
  return (batch == 1 && !one_row_packs) || (batch <= kDirectRows && steps < pays_from) ||
         single_step_in_place(batch, steps);
}

// How run_forward runs a call without a projection: in the direct form or in panels, whether
// the panels or the dot products take the input projection, on how many threads, or whether it
// declines the call (offered the input projection where no form takes it).
struct ForwardPlan {
  bool direct, fused_panels, fused_pairs, declined;
  int threads;
};

template <typename scalar_t>
ForwardPlan plan_forward(const SequenceForward<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Isa isa = active_isa();
  const int64_t V = lanes<acc_t>(isa);
  const int64_t blocks = ceil_div(a.hidden, V);
  constexpr int64_t kFusedInputMaxBytes = 12 << 20, kFusedInputFromRows = 2;
  const int64_t weight_bytes =
      4 * a.hidden * (a.hidden + a.input_size) * static_cast<int64_t>(sizeof(acc_t));
  const int threads = threads_for(blocks);
  // Bytes of one row of k of the panels of a thread's blocks (the largest share).
  const int64_t thread_row_bytes =
      ceil_div(blocks, threads) * 4 * V * static_cast<int64_t>(sizeof(acc_t));
  const int64_t thread_weight_bytes = thread_row_bytes * (a.hidden + a.input_size);
  const int64_t thread_panel_bytes = thread_row_bytes * a.hidden;
  const bool project_input = a.input != nullptr;
  const bool intel = intel_cpu();
  // The input projection is fused into the dot products of the direct form for one step (in
  // training too, the gates then only written) or int8 weights in inference (over several fp32
  // steps one GEMM costs less than reading W_ih every step), and into the bf16 pair panels under
  // avx512_bf16, in training too (not amx, whose tiles take the gates' rows in place): there the
  // products of x and of h run in one tile at the instruction's full rate, where a separate GEMM
  // ran at 80 % of it and its (N, 4H) result came back from memory. fp32 and fp64 panels take it
  // too while W_ih and W_hh together stay within kFusedInputMaxBytes: on a Zen 5, inference gained
  // 6-19 % at H 256-512 and training at T 128 B 64 18 % (no fresh pages for the pre-activations),
  // while beyond that, with both panels streamed from L3 every step, H 650-1024 lost 2-12 %. An
  // Intel core reads its L3 far slower: on a Xeon (family 6 model 167) fused panels beyond L2 lost
  // 3-11 % in training and 1.3-1.9x in inference at B 4 (H 320-512, and H 256 on one thread), and
  // within half of L2 they measured even; there they are fused only within it.
  // One row packs panels of W_hh, without W_ih, over a sequence that repays the packing: on the
  // Zen 4, from 50 steps, H 128-1024 ran 6-16 % faster than with the direct form's dot
  // products (inference; training 3-10 %), and even at H 512, T 50; at T 25 it lost up to 16 %.
  // W_ih fused into the panels, read every step for one row, cost 10-80 % instead. One row on
  // Intel was measured only over short sequences, where it stays direct.
  const bool one_row_packs = !intel && a.w_hh_int8 == nullptr;
  const bool panels_take_input = std::is_same_v<acc_t, scalar_t> && a.w_hh_int8 == nullptr &&
                                 a.batch >= kFusedInputFromRows &&
                                 (intel ? !panels_outgrow_l2(thread_weight_bytes)
                                        : weight_bytes <= kFusedInputMaxBytes);
  // Streamed panels were measured on the Xeon only; elsewhere fused panels of more than
  // kSmallFusedBytes need a longer sequence to repay their packing, in inference only. Offered
  // the input projection, the layer gives the gates somewhere to go in training only.
  const bool training = project_input && a.gates != nullptr;
  constexpr int64_t kSmallFusedBytes = 2 << 20;
  const bool direct =
      std::is_same_v<acc_t, scalar_t> && a.w_stride1 == 1 &&
      direct_form(a.batch, a.steps,
                  packing_pays_from(a.batch, project_input && panels_take_input,
                                    intel || weight_bytes <= kSmallFusedBytes, training),
                  intel && panels_outgrow_l2(thread_panel_bytes), one_row_packs);
  const bool fused_panels = panels_take_input && !direct;
  const bool fused_pairs = std::is_same_v<scalar_t, c10::BFloat16> &&
                           isa == Isa::avx512_bf16 && !direct && a.hidden % 2 == 0 &&
                           a.input_size % 2 == 0 && a.recurrent_mask == nullptr &&
                           a.w_hh_int8 == nullptr;
  const bool fused_direct = direct && (a.steps == 1 || a.w_hh_int8 != nullptr);
  // A single step in place (a decode step, an LSTMCell call) pays for waking the threads every
  // call: below kStepBytesPerThread of weights read per thread, counted once per row, one
  // thread is faster. Measured on the Zen 5, 2-layer decode (B 1) at H 128, 512 KB per layer:
  // 18.9 us with two threads, 17.3 with one; at H 256, 2 MB: 29.6 with two, 37.3 with one. On
  // the Xeon (family 6 model 167), LSTMCell steps at H 128, B 2 (1 MB of rows): 15.4-16.7 us
  // with two, 17.7-18.0 with one; at H 64, B 2 (256 KB): 12.3 with two, 11.3 with one.
  constexpr int64_t kStepBytesPerThread = 512 << 10;
  int step_threads = threads;
  if (direct && a.steps == 1) {
    const int64_t bytes = 4 * a.hidden * (a.hidden + (project_input ? a.input_size : 0)) *
                          (a.w_hh_int8 ? 1 : int64_t{sizeof(scalar_t)});
    step_threads = static_cast<int>(
        std::clamp<int64_t>(bytes * a.batch / kStepBytesPerThread, 1, threads));
  }
  return {direct, fused_panels, fused_pairs,
          project_input && !fused_direct && !fused_pairs && !fused_panels, step_threads};
}

std::string forward_plan_name(int64_t batch, int64_t steps, int64_t hidden, int64_t input_size,
                              at::ScalarType dtype, bool input_offered, bool training) {
  TORCH_CHECK(batch > 0 && steps > 0 && hidden > 0 && input_size > 0,
              "_cpu_forward_plan: batch, steps, hidden and input_size must be positive");
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "forward_plan", [&] {
    SequenceForward<scalar_t> a{};
    a.steps = steps;
    a.batch = batch;
    a.hidden = hidden;
    a.input_size = input_size;
    a.w_stride1 = 1;
    // The plan reads only whether these point anywhere, as the layer sets them.
    scalar_t somewhere{};
    a.input = input_offered ? &somewhere : nullptr;
    a.gates = training || !input_offered ? &somewhere : nullptr;
    const ForwardPlan plan = plan_forward(a);
    if (plan.declined) return std::string("declined");
    std::string name = plan.direct ? "direct" : plan.fused_pairs ? "pairs" : "panels";
    return input_offered ? name + " with input" : name;
  });
}

template <typename scalar_t>
bool run_forward(SequenceForward<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  // Recorded for the profiler only where the call is taken, not where it is declined.
  if (a.w_hr != nullptr) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (a.input == nullptr) {
        RECORD_FUNCTION("lstm_ext::recurrence", std::vector<c10::IValue>());
        run_projected_forward(a);
        return true;
      }
    }
    return false;
  }
  const ForwardPlan plan = plan_forward(a);
  if (plan.declined) return false;
  const bool direct = plan.direct;
  const Isa isa = active_isa();
  const int64_t V = lanes<acc_t>(isa);
  const int64_t blocks = ceil_div(a.hidden, V);
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t input_room = a.input == nullptr || direct ? 0
                             : plan.fused_pairs           ? blocks * a.input_size / 2 * 4 * V
                                                          : blocks * a.input_size * 4 * V;
  const at::Tensor panel = workspace(
      Workspace::panel, {direct ? 0 : blocks * a.hidden * 4 * V + input_room}, options);
  const at::Tensor h_work =
      workspace(Workspace::recurrent_state, {3 * a.batch * a.hidden}, options);
  a.panel = direct ? nullptr : panel.data_ptr<acc_t>();
  a.h_work = h_work.data_ptr<acc_t>();
  const int threads = plan.threads;
  RECORD_FUNCTION("lstm_ext::recurrence", std::vector<c10::IValue>());
#if LSTM_EXT_X86_VARIANTS
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    if (direct && a.steps == 1 && a.batch > kDirectRows && a.w_hh_int8 == nullptr &&
        isa >= Isa::avx512) {
      run_parallel(a, forward_columns_kernel<scalar_t>, threads);
      return true;
    }
  }
#endif
  run_parallel(a, forward_kernel<scalar_t>(isa), threads);
  return true;
}

template <typename scalar_t>
bool run_backward(SequenceBackward<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  if (a.w_hr != nullptr) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      run_projected_backward(a);
      return true;
    }
    return false;
  }
  const Isa isa = active_isa();
  const int64_t V = lanes<acc_t>(isa);
  const int64_t U = 4 * V;
  // A single step's panels would cost as much as its one product: the kernel reads W_hh's
  // rows in place instead, where they are contiguous and whole vectors long (see
  // kSingleStepDirectRows); otherwise the step loop's product does. With the forward's input
  // projection fused too, LSTMCell training on the Xeon (family 6 model 167) went from
  // 1.08-1.30x nn.LSTMCell's speed to 1.37-1.44x at H 256 (B 8, 32), 1.19-1.23x to 1.28x at
  // H 512 B 16, where the rest is the weight gradients' products and autograd's sums of them.
  const bool in_place = std::is_same_v<acc_t, scalar_t> && single_step_in_place(a.batch, a.steps);
  if (in_place && (a.w_stride1 != 1 || a.hidden % V != 0)) return false;
  const int64_t blocks = ceil_div(a.hidden, U);
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor panel =
      workspace(Workspace::panel, {in_place ? 0 : blocks * 4 * a.hidden * U}, options);
  const int threads = threads_for(blocks);
  // Only gradients stored in bf16 need their math-type copy (see backward_thread).
  const int64_t work_rows = std::is_same_v<scalar_t, acc_t> ? 0 : 2 * a.batch;
  const at::Tensor grad_work =
      workspace(Workspace::recurrent_state, {work_rows * 4 * a.hidden}, options);
  const at::Tensor carry_work = workspace(Workspace::carried, {threads * a.batch * U}, options);
  a.panel = in_place ? nullptr : panel.data_ptr<acc_t>();
  a.grad_work = grad_work.data_ptr<acc_t>();
  a.carry_work = carry_work.data_ptr<acc_t>();
  run_parallel(a, backward_kernel<scalar_t>(isa), threads);
  return true;
}

#define LSTM_EXT_INSTANTIATE(scalar_t)                               \
  template bool run_forward<scalar_t>(SequenceForward<scalar_t>);   \
  template bool run_backward<scalar_t>(SequenceBackward<scalar_t>);
LSTM_EXT_INSTANTIATE(float)
LSTM_EXT_INSTANTIATE(double)
LSTM_EXT_INSTANTIATE(c10::BFloat16)
LSTM_EXT_INSTANTIATE(c10::Half)
#undef LSTM_EXT_INSTANTIATE

}  // namespace cpu
}  // namespace lstm_ext
