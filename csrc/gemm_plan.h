// Row-major per-step products as column-major BLAS calls: the one place that turns tensor strides
// into transposes and leading dimensions, for the CPU's packed MKL GEMM and for deciding which
// weights BLAS (cuBLAS too) takes as they are. Plain C++ on sizes and strides, so
// csrc/tests/gemm_plan_test.cpp checks it against at::mm through the BLAS contract and MKL.
#pragma once

#include <algorithm>
#include <cstdint>

namespace lstm_ext {

// out (rows, N) [+]= in (rows, K) @ W (K, N). Read column-major, out is out^T (N x rows) and in
// is in^T (K x rows), so the call is out^T = op(A) in^T with A the weight's memory: W^T itself
// (no transpose) when W is row-major, W when it is column-major.
struct ColumnMajorProduct {
  bool transpose_weight;  // op(A) = A^T
  int64_t m, n, k;        // op(A) is m x k, in^T is k x n: m = N, n = rows, k = K
  int64_t lda, ldb, ldc;
};

struct MatrixLayout {
  int64_t rows, cols, row_stride, col_stride;
};

// Whether BLAS takes this matrix as it is: row-major or column-major, with a leading dimension
// no smaller than BLAS allows.
constexpr bool row_major(const MatrixLayout& x) {
  return x.col_stride == 1 && x.row_stride >= std::max<int64_t>(1, x.cols);
}
constexpr bool column_major(const MatrixLayout& x) {
  return x.row_stride == 1 && x.col_stride >= std::max<int64_t>(1, x.rows);
}
constexpr bool blas_ready(const MatrixLayout& weight) {
  return row_major(weight) || column_major(weight);
}

// How BLAS reads a blas_ready weight W (K, N) as "A" of out^T = op(A) in^T: op(A) must be W^T.
struct WeightOperand {
  bool transpose;  // A is W (column-major W), so op(A) = A^T; else A is W^T (row-major W)
  int64_t ld;
};

constexpr WeightOperand weight_operand(const MatrixLayout& weight) {
  return row_major(weight) ? WeightOperand{false, weight.row_stride}
                           : WeightOperand{true, weight.col_stride};
}

// Requires a blas_ready weight and row-major in (rows, K) and out (rows, N).
constexpr ColumnMajorProduct plan_row_major_product(const MatrixLayout& in,
                                                    const MatrixLayout& weight,
                                                    const MatrixLayout& out) {
  const WeightOperand a = weight_operand(weight);
  return {a.transpose, weight.cols, in.rows, weight.rows, a.ld, in.row_stride, out.row_stride};
}

}  // namespace lstm_ext
