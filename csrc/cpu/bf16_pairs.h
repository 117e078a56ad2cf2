// bf16 products on the CPU's bf16 dot-product instruction (vdpbf16ps: 16 fp32 lanes, each
// adding the products of one pair of bf16 numbers), for bf16 recurrences under avx512_bf16, and
// on AMX tiles (tdpbf16ps: a 16 x 32 bf16 tile times a 16-pair x 16 tile, into 16 x 16 fp32)
// under amx. Weights are packed in pairs of consecutive k (the VNNI layout, which is also the
// layout of an AMX right-hand tile); the rows they multiply are the bf16 tensors themselves.
#pragma once

#include "isa.h"
#include "panel_ahead.h"

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if LSTM_EXT_X86_VARIANTS
#include <immintrin.h>
#endif

namespace lstm_ext {
namespace cpu {

// Two bf16 numbers as one 32-bit lane, the first in the low half (vdpbf16ps' order).
inline uint32_t bf16_pair(c10::BFloat16 first, c10::BFloat16 second) {
  return static_cast<uint32_t>(first.x) | (static_cast<uint32_t>(second.x) << 16);
}

#if LSTM_EXT_X86_VARIANTS
// out[r][c] = sum_k in[r][k] * W[k][c] for r < N rows and 64 columns c (out's rows 64 apart),
// k over 2 * pairs values; with accumulate, out += the same. Panel row p holds, for each c,
// (W[2p][c], W[2p+1][c]); ld is the distance between panel rows in pairs.
template <int N>
__attribute__((target("arch=x86-64-v4,avx512bf16"))) inline void pair_tile_product(
    int64_t pairs, const c10::BFloat16* const* in, const uint32_t* panel, int64_t ld, float* out,
    bool accumulate, PanelAhead next = {}) {
  __m512 acc[N][4];
  for (int r = 0; r < N; ++r) {
    for (int g = 0; g < 4; ++g) {
      acc[r][g] = accumulate ? _mm512_loadu_ps(out + (r * 4 + g) * 16) : _mm512_setzero_ps();
    }
  }
  const c10::BFloat16* rows[N];
  for (int r = 0; r < N; ++r) rows[r] = in[r];
  LinesAhead lines(next, pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    if (p % LinesAhead::kGroup == 0) lines.group();
    const uint32_t* w = panel + p * ld;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 16);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 32);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 48);
#pragma GCC unroll 8
    for (int r = 0; r < N; ++r) {
      uint32_t pair;
      std::memcpy(&pair, rows[r] + 2 * p, sizeof(pair));
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], x, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], x, w3);
    }
  }
  lines.rest();
  for (int r = 0; r < N; ++r) {
    for (int g = 0; g < 4; ++g) _mm512_storeu_ps(out + (r * 4 + g) * 16, acc[r][g]);
  }
}

// pair_tile_product for n <= R rows, n known only at run time.
template <int R>
__attribute__((target("arch=x86-64-v4,avx512bf16"))) inline void pair_tile_product_n(
    int n, int64_t pairs, const c10::BFloat16* const* in, const uint32_t* panel, int64_t ld,
    float* out, bool accumulate, PanelAhead next = {}) {
  if constexpr (R > 1) {
    if (n < R) return pair_tile_product_n<R - 1>(n, pairs, in, panel, ld, out, accumulate, next);
  }
  pair_tile_product<R>(pairs, in, panel, ld, out, accumulate, next);
}

// AMX: rows per tile, and pairs of k per step of the tile product.
constexpr int kAmxRows = 16;
constexpr int kAmxPairs = 16;

// The tile shapes amx_product uses, loaded into this thread's tile registers: tiles 0-3 the
// four 16 x 16 fp32 accumulators (64 output columns), 4 the rows (16 x 32 bf16), 5-7 the
// panel (16 pairs x 16 columns). Released with amx_release() before the thread leaves the
// kernel, so that other code sees the tiles as it left them (unconfigured).
__attribute__((target("amx-tile"))) inline void amx_configure() {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};
  } config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = 16;
  }
  // ldtilecfg reads all 64 bytes, though its operand names fewer: keep every store.
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}
__attribute__((target("amx-tile"))) inline void amx_release() { _tile_release(); }

// out[r][c] = sum_k in[r][k] * W[k][c] for kAmxRows rows r of `in` (row_stride values apart,
// all readable) and 64 columns c (out's rows 64 apart), k over 2 * pairs values, pairs a
// multiple of kAmxPairs; with accumulate, out += the same. The panel is pair_tile_product's
// (ld 64). Needs amx_configure() on this thread.
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_product(
    int64_t pairs, const c10::BFloat16* in, int64_t row_stride, const uint32_t* panel,
    float* out, bool accumulate) {
  constexpr int64_t ld = 64, out_bytes = 64 * sizeof(float), panel_bytes = ld * 4;
  const int64_t in_bytes = row_stride * 2;
  if (accumulate) {
    _tile_loadd(0, out, out_bytes);
    _tile_loadd(1, out + 16, out_bytes);
    _tile_loadd(2, out + 32, out_bytes);
    _tile_loadd(3, out + 48, out_bytes);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t p = 0; p < pairs; p += kAmxPairs) {
    const uint32_t* w = panel + p * ld;
    _tile_loadd(4, in + 2 * p, in_bytes);
    _tile_loadd(5, w, panel_bytes);
    _tile_loadd(6, w + 16, panel_bytes);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(7, w + 32, panel_bytes);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(5, w + 48, panel_bytes);
    _tile_dpbf16ps(2, 4, 7);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(0, out, out_bytes);
  _tile_stored(1, out + 16, out_bytes);
  _tile_stored(2, out + 32, out_bytes);
  _tile_stored(3, out + 48, out_bytes);
}

// amx_product for two tiles of kAmxRows rows at once, `first` and `second` (the same
// row_stride), into out and out_second, without accumulate. The 64 columns go in two
// halves of 2 x 2 accumulator tiles, so each panel tile is loaded once for both row tiles:
// half the panel reads from L2 of two amx_product calls, for twice the reads of the rows,
// which stay in L1.
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_product_pair(
    int64_t pairs, const c10::BFloat16* first, const c10::BFloat16* second, int64_t row_stride,
    const uint32_t* panel, float* out, float* out_second) {
  constexpr int64_t ld = 64, out_bytes = 64 * sizeof(float), panel_bytes = ld * 4;
  const int64_t in_bytes = row_stride * 2;
  for (int64_t half = 0; half < 64; half += 32) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t p = 0; p < pairs; p += kAmxPairs) {
      const uint32_t* w = panel + p * ld + half;
      _tile_loadd(4, first + 2 * p, in_bytes);
      _tile_loadd(6, w, panel_bytes);
      _tile_loadd(7, w + 16, panel_bytes);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(5, second + 2 * p, in_bytes);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, out + half, out_bytes);
    _tile_stored(1, out + half + 16, out_bytes);
    _tile_stored(2, out_second + half, out_bytes);
    _tile_stored(3, out_second + half + 16, out_bytes);
  }
}
#endif

}  // namespace cpu
}  // namespace lstm_ext
