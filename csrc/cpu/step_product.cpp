#include "step_product.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

// MKL's packed GEMM, Fortran interface with 32-bit integers. PyTorch's CPU library exports it
// when built with MKL (the x86-64 wheels are). Weak, so that a torch without it leaves these
// null and the ATen path serves instead; a self-test guards against a different ABI.
extern "C" {
size_t sgemm_pack_get_size(const char* identifier, const int* m, const int* n, const int* k)
    __attribute__((weak));
void sgemm_pack(const char* identifier, const char* trans, const int* m, const int* n,
                const int* k, const float* alpha, const float* src, const int* ld, float* dest)
    __attribute__((weak));
void sgemm_compute(const char* transa, const char* transb, const int* m, const int* n,
                   const int* k, const float* a, const int* lda, const float* b, const int* ldb,
                   const float* beta, float* c, const int* ldc) __attribute__((weak));
}

namespace lstm_ext {
namespace {

// MKL's packed GEMM, the weight packed once per call; how MKL reads the weight (transpose,
// leading dimension) comes from gemm_plan.h.
class PackedStepProduct final : public StepProduct {
 public:
  PackedStepProduct(const at::Tensor& weight, int64_t batch)
      : k_(static_cast<int>(weight.size(0))), n_(static_cast<int>(weight.size(1))) {
    const at::Tensor source = blas_ready(layout_of(weight)) ? weight : weight.contiguous();
    const WeightOperand a = weight_operand(layout_of(source));
    const int ld = static_cast<int>(a.ld);
    const int rows = static_cast<int>(std::max<int64_t>(1, batch));
    const size_t bytes = sgemm_pack_get_size("A", &n_, &rows, &k_);
    packed_ = at::empty({static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float))},
                        weight.options());
    const float one = 1.0f;
    sgemm_pack("A", a.transpose ? "T" : "N", &n_, &rows, &k_, &one,
               source.const_data_ptr<float>(), &ld, packed_.data_ptr<float>());
  }

  void run(const at::Tensor& in, at::Tensor& out, bool accumulate) override {
    const int rows = static_cast<int>(in.size(0));
    if (rows == 0) return;
    const MatrixLayout in_layout = layout_of(in), out_layout = layout_of(out);
    TORCH_INTERNAL_ASSERT(row_major(in_layout) && row_major(out_layout) && in.size(1) == k_ &&
                          out.size(1) == n_ && out.size(0) == rows);
    const int ldb = static_cast<int>(in_layout.row_stride);
    const int ldc = static_cast<int>(out_layout.row_stride);
    const float beta = accumulate ? 1.0f : 0.0f;
    sgemm_compute("P", "N", &n_, &rows, &k_, packed_.const_data_ptr<float>(), &n_,
                  in.const_data_ptr<float>(), &ldb, &beta, out.data_ptr<float>(), &ldc);
  }

 private:
  int k_, n_;
  at::Tensor packed_;
};

// Checks the packed path against plain arithmetic on a small odd-sized product, in both weight
// layouts with and without padded leading dimensions, once per process.
bool packed_gemm_works() {
  if (!sgemm_pack_get_size || !sgemm_pack || !sgemm_compute) return false;
  // Fixed values, not at::randn: a draw here would advance the user's global generator the
  // first time a process takes this path, and a resumed run would no longer replay exactly.
  const at::Tensor w = at::arange(35, at::kFloat).reshape({7, 5}).mul(0.37).sin();
  const at::Tensor in = at::arange(21, at::kFloat).reshape({3, 7}).mul(0.61).cos();
  const at::Tensor expected = at::mm(in.to(at::kDouble), w.to(at::kDouble));
  const at::Tensor padded_rows = at::zeros({7, 9}, at::kFloat).narrow(1, 0, 5).copy_(w);
  const at::Tensor padded_columns = at::zeros({5, 10}, at::kFloat).narrow(1, 0, 7).t().copy_(w);
  for (const at::Tensor& weight : {w, w.t().contiguous().t(), padded_rows, padded_columns}) {
    at::Tensor out = at::zeros({3, 5}, at::kFloat);
    PackedStepProduct(weight, 3).run(in, out, false);
    PackedStepProduct(weight, 3).run(in, out, true);  // accumulates: 2x
    if (!at::allclose(out.to(at::kDouble), 2 * expected, 1e-5, 1e-5)) return false;
  }
  return true;
}

}  // namespace

bool packed_gemm_enabled() {
  static const bool works = packed_gemm_works();
  const char* setting = std::getenv("LSTM_EXT_PACKED_GEMM");
  return works && !(setting && std::strcmp(setting, "0") == 0);
}

std::unique_ptr<StepProduct> cpu_step_product(const at::Tensor& weight, int64_t steps,
                                              int64_t batch) {
  // Packing costs about one product and pays from the second step on, but for one or two rows
  // MKL's matrix-vector path beats the packed kernel.
  if (weight.scalar_type() == at::kFloat && steps > 1 && batch >= 4 && packed_gemm_enabled()) {
    return std::make_unique<PackedStepProduct>(weight, batch);
  }
  // Small-batch products run up to 2x slower against a transposed view than against W^T stored
  // contiguously; one copy per call pays for itself within a few steps.
  const bool transposed_view = weight.stride(0) == 1 && weight.stride(1) != 1;
  if (transposed_view && steps > 1 && batch >= 4) {
    return std::make_unique<AtenStepProduct>(weight.contiguous());
  }
  return std::make_unique<AtenStepProduct>(weight);
}

}  // namespace lstm_ext
