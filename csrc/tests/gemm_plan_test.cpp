// The column-major BLAS calls of csrc/gemm_plan.h, which the CPU's packed per-step GEMM hands to
// MKL, compared with at::mm: run through the BLAS gemm contract
// itself (C = alpha op(A) B + beta C, column-major with leading dimensions), and through MKL's
// dgemm where torch exports it. Every weight layout (row- or column-major, tight or with a
// padded leading dimension), padded in/out rows, odd sizes, one row, accumulate or not.
#include "../gemm_plan.h"

#include <ATen/ATen.h>

#include <cstdio>
#include <vector>

extern "C" void dgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const double* alpha, const double* a, const int* lda,
                       const double* b, const int* ldb, const double* beta, double* c,
                       const int* ldc) __attribute__((weak));

namespace {

using lstm_ext::ColumnMajorProduct;
using lstm_ext::MatrixLayout;

int failures = 0;

void expect(bool condition, const char* what) {
  if (!condition) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

MatrixLayout layout_of(const at::Tensor& matrix) {
  return {matrix.size(0), matrix.size(1), matrix.stride(0), matrix.stride(1)};
}

// A (rows, cols) view with the given memory order and leading-dimension padding, holding
// `values`.
at::Tensor laid_out(const at::Tensor& values, bool column_major, int64_t padding) {
  const int64_t rows = values.size(0), cols = values.size(1);
  at::Tensor view = column_major
                        ? at::full({cols, rows + padding}, NAN, values.options())
                              .narrow(1, 0, rows)
                              .t()
                        : at::full({rows, cols + padding}, NAN, values.options()).narrow(1, 0, cols);
  view.copy_(values);
  return view;
}

// The BLAS definition, element by element: C(i, j) = alpha sum_l op(A)(i, l) B(l, j) + beta C(i, j),
// with X(i, j) at x[i + j * ldx] and op(A)(i, l) = A(l, i) when transposed.
void reference_gemm(const ColumnMajorProduct& p, double alpha, const double* a, const double* b,
                    double beta, double* c) {
  for (int64_t j = 0; j < p.n; ++j) {
    for (int64_t i = 0; i < p.m; ++i) {
      double sum = 0.0;
      for (int64_t l = 0; l < p.k; ++l) {
        const double a_il = p.transpose_weight ? a[l + i * p.lda] : a[i + l * p.lda];
        sum += a_il * b[l + j * p.ldb];
      }
      c[i + j * p.ldc] = alpha * sum + (beta == 0.0 ? 0.0 : beta * c[i + j * p.ldc]);
    }
  }
}

void mkl_gemm(const ColumnMajorProduct& p, double alpha, const double* a, const double* b,
              double beta, double* c) {
  const int m = static_cast<int>(p.m), n = static_cast<int>(p.n), k = static_cast<int>(p.k);
  const int lda = static_cast<int>(p.lda), ldb = static_cast<int>(p.ldb);
  const int ldc = static_cast<int>(p.ldc);
  dgemm_(p.transpose_weight ? "T" : "N", "N", &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c,
         &ldc);
}

void check_product(int64_t rows, int64_t K, int64_t N, bool column_major, int64_t weight_padding,
                   int64_t row_padding, bool accumulate) {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor weight_values = at::randn({K, N}, options);
  const at::Tensor weight = laid_out(weight_values, column_major, weight_padding);
  const at::Tensor in = laid_out(at::randn({rows, K}, options), false, row_padding);
  const at::Tensor start = at::randn({rows, N}, options);
  const at::Tensor expected = at::mm(in, weight_values) + (accumulate ? start : 0 * start);
  expect(lstm_ext::blas_ready(layout_of(weight)), "row- and column-major weights are ready");

  using Gemm = void (*)(const ColumnMajorProduct&, double, const double*, const double*, double,
                        double*);
  std::vector<std::pair<const char*, Gemm>> implementations = {{"reference", reference_gemm}};
  if (dgemm_) implementations.emplace_back("MKL", mkl_gemm);
  for (const auto& [name, gemm] : implementations) {
    at::Tensor out = laid_out(start, false, row_padding);
    const ColumnMajorProduct p = lstm_ext::plan_row_major_product(
        layout_of(in), layout_of(weight), layout_of(out));
    gemm(p, 1.0, weight.const_data_ptr<double>(), in.const_data_ptr<double>(),
         accumulate ? 1.0 : 0.0, out.data_ptr<double>());
    if (!at::allclose(out, expected, 1e-12, 1e-12)) {
      std::fprintf(stderr,
                   "FAILED: %s product rows %lld K %lld N %lld %s weight, padding %lld/%lld, %s\n",
                   name, static_cast<long long>(rows), static_cast<long long>(K),
                   static_cast<long long>(N), column_major ? "column-major" : "row-major",
                   static_cast<long long>(weight_padding), static_cast<long long>(row_padding),
                   accumulate ? "accumulate" : "overwrite");
      ++failures;
    }
  }
}

void check_readiness() {
  // Strided in both dimensions (every other column): BLAS cannot take it.
  const at::Tensor sliced = at::randn({6, 10}).slice(1, 0, 10, 2);
  expect(!lstm_ext::blas_ready(layout_of(sliced)), "an every-other-column slice is not ready");
  // A leading dimension smaller than the other size (overlapping rows) is refused too.
  expect(!lstm_ext::blas_ready({4, 5, 3, 1}), "overlapping rows are not ready");
  // One row or one column: degenerate strides still read right.
  expect(lstm_ext::blas_ready(layout_of(at::randn({4, 1}).t())), "a transposed column is ready");
}

}  // namespace

int main() {
  at::manual_seed(7);
  for (const int64_t rows : {1, 3, 16}) {
    for (const auto& [K, N] : std::vector<std::pair<int64_t, int64_t>>{{5, 12}, {1, 4}, {9, 1}}) {
      for (const bool column_major : {false, true}) {
        for (const int64_t weight_padding : {0, 3}) {
          for (const int64_t row_padding : {0, 2}) {
            for (const bool accumulate : {false, true}) {
              check_product(rows, K, N, column_major, weight_padding, row_padding, accumulate);
            }
          }
        }
      }
    }
  }
  check_readiness();
  if (failures == 0) std::printf("GEMM plans through CPU BLAS: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
