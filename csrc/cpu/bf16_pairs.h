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
#include <vector>

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
// Columns per half of an AMX panel (see amx_product).
constexpr int64_t kHalfColumns = 32;

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

// The kAmxRows rows an AMX product multiplies, `n` of them (the rest zeros), laid out as its
// tiles read them: for each kAmxPairs pairs of k, the rows' 2 * kAmxPairs values one after
// another, so that each tile load reads 1 KB in a row. Read in place, rows H values apart
// (4H in the backward: 4 KB at H 512, one L1 set for all 16) put a tile's lines in a few L1
// sets. On the Intel Xeon (family 6 model 167), one thread's step of products (16 blocks,
// 32 rows) took 44 us at H 512 read in place, 38 from this copy, 25 with amx_product's
// panel halves too (H 256: 20, 17, 13; H 1024: 128, 91, 73). `out` holds
// kAmxRows * 2 * pairs values.
inline void amx_pack_rows(int n, const c10::BFloat16* const* rows, int64_t pairs,
                          c10::BFloat16* out) {
  constexpr int64_t kChunk = 2 * kAmxPairs;  // values of a row in one tile
  for (int64_t q = 0; q < pairs / kAmxPairs; ++q) {
    c10::BFloat16* tile = out + q * kAmxRows * kChunk;
    for (int r = 0; r < n; ++r) {
      std::memcpy(tile + r * kChunk, rows[r] + q * kChunk, kChunk * sizeof(c10::BFloat16));
    }
    std::memset(static_cast<void*>(tile + n * kChunk), 0,
                (kAmxRows - n) * kChunk * sizeof(c10::BFloat16));
  }
}

// Room for amx_pack_rows' tiles of rows `pairs` pairs long, each tile 64-byte aligned (a
// row's 64 bytes in one cache line).
class AmxPackedRows {
 public:
  void resize(int64_t tiles, int64_t pairs) {
    tile_values_ = kAmxRows * 2 * pairs;
    buffer_.resize(tiles * tile_values_ + 32);
    const auto at = reinterpret_cast<uintptr_t>(buffer_.data());
    start_ = buffer_.data() + (64 - at % 64) % 64 / sizeof(c10::BFloat16);
  }
  c10::BFloat16* tile(int64_t t) { return start_ + t * tile_values_; }

 private:
  std::vector<c10::BFloat16> buffer_;
  c10::BFloat16* start_ = nullptr;
  int64_t tile_values_ = 0;
};

// out[r][c] = sum_k in[r][k] * W[k][c] for the kAmxRows rows r packed by amx_pack_rows and 64
// columns c (out's rows 64 apart), k over 2 * pairs values, pairs a multiple of kAmxPairs;
// with accumulate, out += the same. The panel is pair_tile_product's pairs in two halves:
// columns 0-31 as `pairs` rows of 32 (128 bytes), then columns 32-63 the same, so that the
// product of a half reads its panel straight through, not half of each 256-byte row (see
// amx_pack_rows for what that cost). Needs amx_configure() on this thread.
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_product(
    int64_t pairs, const c10::BFloat16* packed, const uint32_t* panel, float* out,
    bool accumulate) {
  constexpr int64_t out_bytes = 64 * sizeof(float), panel_bytes = kHalfColumns * 4;
  constexpr int64_t in_bytes = 2 * kAmxPairs * sizeof(c10::BFloat16);
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
    const uint32_t* w = panel + p * kHalfColumns;
    const uint32_t* w_half = w + pairs * kHalfColumns;
    _tile_loadd(4, packed + kAmxRows * 2 * p, in_bytes);
    _tile_loadd(5, w, panel_bytes);
    _tile_loadd(6, w + 16, panel_bytes);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(7, w_half, panel_bytes);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(5, w_half + 16, panel_bytes);
    _tile_dpbf16ps(2, 4, 7);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(0, out, out_bytes);
  _tile_stored(1, out + 16, out_bytes);
  _tile_stored(2, out + 32, out_bytes);
  _tile_stored(3, out + 48, out_bytes);
}

// amx_product for two tiles of packed rows at once, `first` and `second`, into out and
// out_second, without accumulate. The 64 columns go in two halves of 2 x 2 accumulator
// tiles, so each panel tile is loaded once for both row tiles: half the panel reads from L2
// of two amx_product calls, for twice the reads of the rows, which stay in L1. The panel is
// amx_product's.
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_product_pair(
    int64_t pairs, const c10::BFloat16* first, const c10::BFloat16* second,
    const uint32_t* panel, float* out, float* out_second) {
  constexpr int64_t out_bytes = 64 * sizeof(float), panel_bytes = kHalfColumns * 4;
  constexpr int64_t in_bytes = 2 * kAmxPairs * sizeof(c10::BFloat16);
  for (int64_t half = 0; half < 64; half += kHalfColumns) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const uint32_t* half_panel = panel + (half / kHalfColumns) * pairs * kHalfColumns;
    for (int64_t p = 0; p < pairs; p += kAmxPairs) {
      const uint32_t* w = half_panel + p * kHalfColumns;
      _tile_loadd(4, first + kAmxRows * 2 * p, in_bytes);
      _tile_loadd(6, w, panel_bytes);
      _tile_loadd(7, w + 16, panel_bytes);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(5, second + kAmxRows * 2 * p, in_bytes);
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
