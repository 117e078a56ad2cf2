// The fused CPU recurrence: the whole time loop of one layer-direction in one parallel region,
// forward and backward (with a projection: projected_recurrence.cpp, from the pieces here).
//
// Threads split the hidden units, and each thread owns all four gates of its units, so the cell
// update runs right after the thread's own gate products, with no separate elementwise pass
// and one barrier per step. Weights are read in a panel layout prepared once per call by the
// thread that uses them (so each thread's slice stays in its own cache across steps):
//
//   forward:  per block of V units, a (H, 4V) panel: row k holds W_hh[g*H + j, k] for the
//             block's units j, gate by gate, so that a tile of rows of h times the panel
//             gives the block's four gate pre-activations (V = lanes of one vector);
//   backward: per block of 4V units, a (4H, 4V) panel: row kk holds W_hh[kk, j], so that a tile
//             of gate-gradient rows times the panel gives the block's dh.
//
// The micro-kernel multiplies up to R rows by a panel with R x 4 vector accumulators kept in
// registers (one broadcast and four fused multiply-adds per row and k). Two other forms: a
// batch of one row (or up to four over a short sequence) skips the forward panels and reads
// W_hh's rows in place by dot products (dot.h), since packing would cost as much as the steps,
// as does a single step of up to 64 rows (under AVX-512 by broadcasts into columns of them);
// bf16 under avx512_bf16 packs k in pairs and multiplies with the bf16 dot-product instruction
// (bf16_pairs.h); it also packs W_ih so, and each tile multiplies its rows of x and then of h
// into the same accumulators (the input projection fused: no separate GEMM, and no (N, 4H)
// pre-activations in memory; training writes only the activations its backward reads). fp32
// and fp64 panels do the same where both weights are small enough (run_forward).
// Everything here is a template inlined into the per-instruction-set wrappers of
// recurrence.cpp (see isa.h).
//
// Sequences follow lstm_common.h's LayerShape: step t owns rows [offset[t], offset[t] + size[t])
// and sizes never grow with t. The h entering a step is read in the math type from a
// double-buffered copy of the previous step's h (rounded to the storage type first, so that
// bf16/fp16 follow the same values as their stored outputs), or from h0 for a sequence's first
// step.
#pragma once

#include "../lstm_layer.h"
#include "bf16_pairs.h"
#include "cell_math.h"
#include "convert.h"
#include "dot.h"
#include "isa.h"
#include "panel_ahead.h"
#include "vec.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <omp.h>
#include <optional>
#include <type_traits>
#include <vector>

namespace lstm_ext {
namespace cpu {

// Lanes per vector and rows per micro-kernel tile for each instruction set and math type: R
// rows need 4R accumulators plus the four panel vectors in registers (32 zmm with AVX-512, 16
// ymm/xmm otherwise; with AVX2 some panel vectors are read from L1 as operands).
template <Isa isa, typename acc_t>
struct Tiling {
  static constexpr int kVectorBytes = isa >= Isa::avx512 ? 64 : isa == Isa::avx2 ? 32 : 16;
  static constexpr int V = kVectorBytes / static_cast<int>(sizeof(acc_t));
  static constexpr int R = isa >= Isa::avx512 ? 6 : 3;
};

// Lanes of one vector of acc_t for an instruction set known only at run time.
template <typename acc_t>
int64_t lanes(Isa isa) {
  switch (isa) {
    case Isa::amx:
    case Isa::avx512_bf16:
    case Isa::avx512: return Tiling<Isa::avx512, acc_t>::V;
    case Isa::avx2: return Tiling<Isa::avx2, acc_t>::V;
    default: return Tiling<Isa::baseline, acc_t>::V;
  }
}

// Units per forward block and per backward block.
template <Isa isa, typename acc_t>
constexpr int64_t forward_block() {
  return Tiling<isa, acc_t>::V;
}
template <Isa isa, typename acc_t>
constexpr int64_t backward_block() {
  return 4 * Tiling<isa, acc_t>::V;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows split into the fewest tiles of at most R rows, all of nearly equal size (32 rows in
// tiles of 6 would leave a 2-row tile running at a third of the speed of the others).
struct Tiles {
  int64_t rows, count;
  Tiles(int64_t rows_, int64_t R) : rows(rows_), count((rows_ + R - 1) / R) {}
  int64_t begin(int64_t i) const { return rows * i / count; }
};

// The first of the kAmxRows rows an AMX product makes for the tile of a step's `rows` rows
// that starts at `begin`: where the step has that many rows, early enough to stay inside them
// (rows before the tile's own made again, and not used); with fewer, row 0, the rest of the
// tile zeros.
inline int64_t amx_first_row(int64_t begin, int64_t rows) {
  return std::max<int64_t>(0, std::min(begin, rows - kAmxRows));
}

// A step's rows (row(r) for r < rows) packed by amx_pack_rows, tile by tile of
// Tiles(rows, kAmxRows), each from its amx_first_row.
template <typename Row>
void amx_pack_tiles(int64_t rows, int64_t pairs, Row row, AmxPackedRows& packed) {
  const Tiles tiles(rows, kAmxRows);
  const int n = static_cast<int>(std::min<int64_t>(rows, kAmxRows));
  for (int64_t tile = 0; tile < tiles.count; ++tile) {
    const int64_t first = amx_first_row(tiles.begin(tile), rows);
    const c10::BFloat16* tile_rows[kAmxRows];
    for (int i = 0; i < n; ++i) tile_rows[i] = row(first + i);
    amx_pack_rows(n, tile_rows, pairs, packed.tile(tile));
  }
}

// The blocks [begin, end) a thread owns of `blocks`.
struct Share {
  int64_t begin, end;
  int64_t count() const { return end - begin; }
  // The i-th block step `step` visits: forward and back in turn. Where a thread's share of the
  // weights outgrows its L2 (one row at H 512 reads 2 MB a step on each of two threads), each
  // step then starts on the blocks the step before ended on, still in L2; visited in the same
  // order every step, none of them are (one row at H 512-1024 ran 12-25 % faster on an Emerald
  // Rapids, four rows 3-9 %). The order changes no sum.
  int64_t visit(int64_t i, int64_t step) const { return step & 1 ? end - 1 - i : begin + i; }
  // The block visited after the i-th, or -1 after the last (the next step starts on it again).
  int64_t visit_after(int64_t i, int64_t step) const {
    return i + 1 < count() ? visit(i + 1, step) : -1;
  }
};
inline Share share_of(int64_t blocks, int thread, int threads) {
  return {blocks * thread / threads, blocks * (thread + 1) / threads};
}

// Whether a thread's panels of `bytes` outgrow half its L2 (the step's other data passes through
// it too), where asking for the next panel ahead pays; below that it costs a few percent
// (recurrence.cpp).
bool panels_outgrow_l2(int64_t bytes);

// out[r][c] = sum_k in[r][k] * panel[k * ld + c] for r < N rows and c < NV * V columns (out's
// rows 4V apart, as the panel's widest); with accumulate, out += the same;
// `next`'s lines are asked for along the way.
template <typename acc_t, int V, int N, int NV = 4>
inline void tile_product(int64_t K, const acc_t* const* in, const acc_t* panel, int64_t ld,
                         acc_t* out, bool accumulate = false, const void* const* ahead = nullptr,
                         int n_ahead = 0, PanelAhead next = {}) {
  static_assert(NV >= 1 && NV <= 4);
  using vec = typename Vec<acc_t, V>::type;
  vec acc[N][NV];
  for (int r = 0; r < N; ++r) {
    for (int g = 0; g < NV; ++g) {
      acc[r][g] = accumulate ? reinterpret_cast<const vec*>(out)[r * 4 + g] : vec{};
    }
  }
  const acc_t* rows[N];
  for (int r = 0; r < N; ++r) rows[r] = in[r];
  const auto multiply = [&](int64_t k) {
    const vec* w = reinterpret_cast<const vec*>(panel + k * ld);
    vec wk[NV];
#pragma GCC unroll 4
    for (int g = 0; g < NV; ++g) wk[g] = w[g];
#pragma GCC unroll 8
    for (int r = 0; r < N; ++r) {
      const acc_t x = rows[r][k];
#pragma GCC unroll 4
      for (int g = 0; g < NV; ++g) acc[r][g] += wk[g] * x;
    }
  };
  // The next panel's lines are asked for in shares, once per group of k (a test at every k
  // costs the product more); lines to be written ahead, one every few groups over the first
  // three quarters of the sum: asked all at once they fill the line-fill buffers the panel's
  // own reads need.
  constexpr int64_t kGroup = LinesAhead::kGroup;
  LinesAhead lines(next, K);
  const int64_t writes_every =
      n_ahead > 0 ? std::max<int64_t>(1, 3 * K / (4 * n_ahead * kGroup)) : 1;
  int p = 0;
  int64_t k = 0;
  for (int64_t group = 0; k + kGroup <= K; k += kGroup, ++group) {
    if (p < n_ahead && group % writes_every == 0) __builtin_prefetch(ahead[p++], 1);
    lines.group();
#pragma GCC unroll 4
    for (int64_t j = 0; j < kGroup; ++j) multiply(k + j);
  }
  for (; p < n_ahead; ++p) __builtin_prefetch(ahead[p], 1);
  for (; k < K; ++k) multiply(k);
  lines.rest();
  vec* o = reinterpret_cast<vec*>(out);
  for (int r = 0; r < N; ++r) {
    for (int g = 0; g < NV; ++g) o[r * 4 + g] = acc[r][g];
  }
}

// tile_product for n <= R rows, n known only at run time.
template <typename acc_t, int V, int R, int NV = 4>
inline void tile_product_n(int n, int64_t K, const acc_t* const* in, const acc_t* panel,
                           int64_t ld, acc_t* out, bool accumulate = false,
                           const void* const* ahead = nullptr, int n_ahead = 0,
                           PanelAhead next = {}) {
  if constexpr (R > 1) {
    if (n < R) {
      return tile_product_n<acc_t, V, R - 1, NV>(n, K, in, panel, ld, out, accumulate, ahead,
                                                 n_ahead, next);
    }
  }
  tile_product<acc_t, V, R, NV>(K, in, panel, ld, out, accumulate, ahead, n_ahead, next);
}

// fn(std::integral_constant<int, vectors>()) for vectors in [1, 4] known only at run time.
template <typename Fn>
inline void with_vectors(int vectors, Fn fn) {
  switch (vectors) {
    case 1: return fn(std::integral_constant<int, 1>());
    case 2: return fn(std::integral_constant<int, 2>());
    case 3: return fn(std::integral_constant<int, 3>());
    default: return fn(std::integral_constant<int, 4>());
  }
}

#if LSTM_EXT_X86_VARIANTS
// One aligned 64-byte line stored around the caches (AVX-512 variants only).
template <typename vec>
__attribute__((target("arch=x86-64-v4"))) inline void stream_line(vec* to, vec value) {
  static_assert(sizeof(vec) == 64, "one cache line");
  _mm512_stream_si512(reinterpret_cast<__m512i*>(to), (__m512i)value);
}
#else
template <typename vec>
inline void stream_line(vec* to, vec value) {
  *to = value;
}
#endif

// Streamed stores are weakly ordered: a thread fences its own before others may read them.
inline void stream_fence() {
#if defined(__x86_64__)
  __builtin_ia32_sfence();
#endif
}

// The V vectors of a square as rows of `out`, ld apart; kStream writes around the caches (the
// rows then must be whole aligned lines).
template <typename T, int V, bool kStream = false>
inline void store_square(const typename Vec<T, V>::type* square, T* out, int64_t ld) {
  using vec = typename Vec<T, V>::type;
  for (int k = 0; k < V; ++k) {
    vec* to = reinterpret_cast<vec*>(out + k * ld);
    if constexpr (kStream) {
      stream_line(to, square[k]);
    } else {
      *to = square[k];
    }
  }
}

// Values [0, 16) of two rows of two-byte values as pairs, each a 4-byte value with the first
// row's in its low half (bf16_pair's order).
inline Vec<uint32_t, 16>::type pairs_of_rows(const void* first, const void* second) {
  using half_vec = uint16_t __attribute__((vector_size(32), aligned(2), may_alias));
  using vec = Vec<uint32_t, 16>::type;
  const half_vec low = *static_cast<const half_vec*>(first);
  const half_vec high = *static_cast<const half_vec*>(second);
  return __builtin_convertvector(low, vec) | (__builtin_convertvector(high, vec) << 16);
}

// Panel rows [k0, k0 + V) (ld apart) of the V columns starting at `panel`, from values
// [k0, k0 + V) of V rows of a weight (row_stride apart, k contiguous): one V x V square
// transposed in registers. T is any 4- or 8-byte type; only its bits move. kStream as in
// store_square.
template <typename T, int V, bool kStream = false>
inline void pack_square(const T* rows, int64_t row_stride, int64_t k0, T* panel, int64_t ld) {
  using vec = typename Vec<T, V>::type;
  vec square[V];
  for (int v = 0; v < V; ++v) square[v] = *reinterpret_cast<const vec*>(rows + v * row_stride + k0);
  transpose_square<T, V>(square);
  store_square<T, V, kStream>(square, panel + k0 * ld, ld);
}

// Writes block jb of the forward panels (see the top of this file) for a hidden size H from a
// weight of 4H rows and K columns, value(row, k) (W_hh[row, k] in the math type; or any element
// type T, as pack_pair_block's pairs); units past H get zeros. Given `rows` (the weight itself
// in T, rows row_stride apart, k contiguous), a block of whole units is
// copied V x V squares at a time (pack_square) and only a last partial square through value().
// Otherwise in chunks of kPackChunk values of k: each of the block's rows of W_hh is read 64
// bytes at a time, and the panel rows being written stay in L1 until they are whole. With
// halves, gates 0-1 and gates 2-3 go in two panels of K rows of 2V, one after the other (the
// layout of amx_product's panels).
template <typename T, int V, typename Value>
inline void pack_forward_block(T* panel, int64_t H, int64_t K, int64_t jb, Value value,
                               const T* rows = nullptr, int64_t row_stride = 0,
                               bool halves = false) {
  constexpr int64_t kPackChunk = 16;
  const int64_t ld = halves ? 2 * V : 4 * V;
  const auto gate_panel = [&](int g) {
    return halves ? panel + (g / 2) * K * 2 * V + (g % 2) * V : panel + g * V;
  };
  const int64_t squares_end = rows != nullptr && (jb + 1) * V <= H ? K / V * V : 0;
  for (int g = 0; g < 4; ++g) {
    for (int64_t k0 = 0; k0 < squares_end; k0 += V) {
      pack_square<T, V>(rows + (g * H + jb * V) * row_stride, row_stride, k0, gate_panel(g),
                        ld);
    }
  }
  for (int64_t k0 = squares_end; k0 < K; k0 += kPackChunk) {
    const int64_t kn = std::min(kPackChunk, K - k0);
    for (int g = 0; g < 4; ++g) {
      for (int v = 0; v < V; ++v) {
        const int64_t j = jb * V + v;
        T* column = gate_panel(g) + k0 * ld + v;
        for (int64_t k = 0; k < kn; ++k) {
          column[k * ld] = j < H ? value(g * H + j, k0 + k) : T(0);
        }
      }
    }
  }
}

// W_hh read in place (only where it is already in the math type).
template <typename acc_t, typename scalar_t>
inline const acc_t* in_place_weight(const scalar_t* w) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return w;
  } else {
    return nullptr;
  }
}

// b_ih + b_hh of one gate column, as the kernel adds them.
template <typename acc_t, typename scalar_t>
inline acc_t fused_bias(const SequenceForward<scalar_t>& a, int64_t column) {
  return (a.b_ih ? cast<acc_t>(a.b_ih[column]) : acc_t(0)) +
         (a.b_hh ? cast<acc_t>(a.b_hh[column]) : acc_t(0));
}

// The cell update of one row's n units (their gates V apart in z, as forward_cells takes
// them): c saved first where c_saved is given, and with zoneout's d (or null) c mixed as
// c = d c_prev + (1 - d) c~.
template <typename acc_t, int V, typename Count>
inline void zoned_forward_cells(Count n, acc_t* z, acc_t* c, acc_t* h, acc_t* c_saved,
                                const acc_t* d) {
  if (c_saved) std::memcpy(c_saved, c, n * sizeof(acc_t));
  alignas(64) acc_t c_before[V];
  if (d) std::memcpy(c_before, c, n * sizeof(acc_t));
  forward_cells<acc_t>(n, V, z, c, h);
  for (int64_t v = 0; d && v < n; ++v) c[v] = d[v] * c_before[v] + (acc_t(1) - d[v]) * c[v];
}

// Its gradient (gates U apart): with zoneout's d (or null), d of dc goes to the previous c
// directly and 1 - d through the cell update.
template <typename acc_t, int64_t U, typename Count>
inline void zoned_backward_cells(Count n, const acc_t* z, const acc_t* cell_prev,
                                 const acc_t* dh, acc_t* dc, acc_t* dz, const acc_t* d) {
  alignas(64) acc_t dc_total[U];
  for (int64_t u = 0; d && u < n; ++u) {
    dc_total[u] = dc[u];
    dc[u] *= acc_t(1) - d[u];
  }
  backward_cells<acc_t>(n, U, z, cell_prev, dh, dc, dz);
  for (int64_t u = 0; d && u < n; ++u) dc[u] += d[u] * dc_total[u];
}

// Batches of at most this many rows skip the forward panels (see dot.h).
constexpr int kDirectRows = 4;
// A single step (an LSTMCell call, a decode step) of at most this many rows skips the panels
// too (in dot-product tiles of kDirectRows, or under AVX-512 in dot.h's Columns), and its
// backward reads W_hh's rows in place as its panels: packing cost as much as the step. On the
// Intel Xeon (family 6 model 167), LSTMCell step loops by dot products ran 1.1-2x faster at H
// 256-1024, B 8-32; at B 64 the two forms measured even, at B 256 the panels were 1.2-1.3x
// faster. By columns, at H 256 B 40-64, inference went from 0.87-0.88x nn.LSTMCell's speed
// (panels) to 1.11-1.28x, training from 0.98-1.00x to 1.08-1.09x; int8 decode steps (2 x 512,
// B 48-64) by dot products took 1.8-2.4 ms against 3.8-4.7 ms with dequantized panels.
constexpr int kSingleStepDirectRows = 64;

// Whether a call is such a step, whose forward and backward read the weights in place.
inline bool single_step_in_place(int64_t batch, int64_t steps) {
  return steps == 1 && batch <= kSingleStepDirectRows;
}

// The four gate rows of unit j (H rows apart) of an int8 weight times n <= kDirectRows
// activation rows rounded to int16 (dot.h), each sum times both scales: out[g * n + i].
template <int V, bool kVnni>
inline void int8_dot_rows(int n, int64_t K, const int8_t* w, const float* scale, int64_t j,
                          int64_t stride, int64_t H, const int16_t* const* q,
                          const float* q_scale, float* out) {
  int8_int16_dot_rows<V, kDirectRows, kVnni>(n, K, w + j * stride, H * stride, q, q_scale, out);
  for (int g = 0; g < 4; ++g) {
    for (int i = 0; i < n; ++i) out[g * n + i] *= scale[g * H + j];
  }
}

// A step's activation rows for int8 weights, rounded to int16 with a scale per row.
struct Int16Rows {
  std::vector<int16_t> values;
  std::vector<float> scale;
  int64_t width = 0;
  void resize(int64_t rows, int64_t width_) {
    width = width_;
    values.resize(rows * width);
    scale.resize(rows);
  }
  void set(int64_t r, const float* x) { scale[r] = quantize_int16(width, x, row(r)); }
  int16_t* row(int64_t r) { return values.data() + r * width; }
};

// Writes block jb of the bf16 pair panels of a weight of 4H rows and K columns (K even; strides
// in elements): pack_forward_block over pairs of k, panel row p holding (W[row, 2p],
// W[row, 2p + 1]) for each column, with the rows read in place as rows of pairs where they are;
// with halves, in amx_product's layout.
template <int V>
inline void pack_pair_block(uint32_t* panel, const c10::BFloat16* w, int64_t stride0,
                            int64_t stride1, int64_t H, int64_t K, int64_t jb,
                            bool halves = false) {
  const bool pair_rows = stride1 == 1 && stride0 % 2 == 0 &&
                         reinterpret_cast<uintptr_t>(w) % sizeof(uint32_t) == 0;
  pack_forward_block<uint32_t, V>(
      panel, H, K / 2, jb,
      [&](int64_t row, int64_t p) {
        const c10::BFloat16* pair = w + row * stride0 + 2 * p * stride1;
        return bf16_pair(pair[0], pair[stride1]);
      },
      pair_rows ? reinterpret_cast<const uint32_t*>(w) : nullptr, stride0 / 2, halves);
}

// Where no Columns are compiled in.
struct NoColumns {};

// kColumns compiles in dot.h's Columns for single steps of more than kDirectRows rows (a
// separate instance: the panel loop of the other lost 13-20 % at T 25, B 32-64 with them).
template <Isa isa, typename scalar_t, bool kColumns = false>
void forward_thread(const SequenceForward<scalar_t>& a, int thread, int threads) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Tiling<isa, acc_t>::V;
  constexpr int R = Tiling<isa, acc_t>::R;
  const int64_t H = a.hidden, B = a.batch;
  const int64_t blocks = ceil_div(H, V);
  const Share mine = share_of(blocks, thread, threads);

  // Without a panel the weights are read in place by dot products (small batches).
  const bool direct = a.panel == nullptr;
  // x times W_ih made here too (run_forward says where), with the gates, if any, out only.
  const bool project_input = a.input != nullptr;

  // bf16 under avx512_bf16 multiplies bf16 pairs (bf16_pairs.h): panels of pairs of k, and
  // the bf16 h itself (the previous step's output rows, or h0) as the rows. An odd H, whose
  // last pair would run past a row, takes the fp32 panels.
  constexpr bool kPairKernel = isa >= Isa::avx512_bf16 && std::is_same_v<scalar_t, c10::BFloat16>;
  // A recurrent-dropout mask takes the fp32 panels too: the pair kernel reads h where it is
  // stored, unmasked.
  const bool pairs = kPairKernel && !direct && H % 2 == 0 && a.recurrent_mask == nullptr;
  // Under amx the same panels are multiplied on AMX tiles, kAmxRows rows at a time, where H is
  // whole steps of the tile product (otherwise by the dot-product instruction).
  constexpr bool kAmxKernel = isa == Isa::amx && kPairKernel;
  const bool amx = kAmxKernel && pairs && !project_input && H % (2 * kAmxPairs) == 0;
  static_assert(!kAmxKernel || 4 * V == 2 * kHalfColumns, "a block is one AMX product's columns");
  constexpr int RT = std::max({R, kDirectRows, kAmxKernel ? kAmxRows : 0});  // rows per tile
  const int64_t tile_rows = direct ? kDirectRows : amx ? kAmxRows : R;
  uint32_t* const pair_panels = reinterpret_cast<uint32_t*>(a.panel);
  // With the input projection fused, W_ih's pair panels follow the fp32-sized room of W_hh's
  // (run_forward sizes the workspace for both).
  const bool fused_input = pairs && project_input;
  uint32_t* const input_panels =
      fused_input ? reinterpret_cast<uint32_t*>(a.panel + blocks * H * 4 * V) : nullptr;
  const int64_t input_pairs = a.input_size / 2;
  const int64_t pair_panel_bytes = (H / 2) * 4 * V * int64_t{sizeof(uint32_t)};
  const int64_t input_panel_bytes =
      fused_input ? input_pairs * 4 * V * int64_t{sizeof(uint32_t)} : 0;
  const bool fetch_pairs =
      pairs && !amx && panels_outgrow_l2(mine.count() * (pair_panel_bytes + input_panel_bytes));
  // In the math type's panels, W_ih's panels likewise follow W_hh's.
  const bool panel_input =
      std::is_same_v<scalar_t, acc_t> && project_input && !direct && !pairs;
  acc_t* const input_panel = panel_input ? a.panel + blocks * H * 4 * V : nullptr;
  const int64_t input_panel_floats = a.input_size * 4 * V;
  if constexpr (kPairKernel) {
    for (int64_t jb = mine.begin; jb < mine.end && pairs; ++jb) {
      pack_pair_block<V>(pair_panels + jb * (H / 2) * 4 * V, a.w_hh, a.w_stride0, a.w_stride1,
                         H, H, jb, /*halves=*/amx);
      if (fused_input) {
        pack_pair_block<V>(input_panels + jb * input_pairs * 4 * V, a.w_ih, a.w_ih_stride, 1,
                           H, a.input_size, jb);
      }
    }
  }

  // This thread's panels and its columns of h0 in the math type.
  for (int64_t jb = mine.begin; jb < mine.end && !direct && !pairs; ++jb) {
    pack_forward_block<acc_t, V>(
        a.panel + jb * H * 4 * V, H, H, jb,
        [&](int64_t row, int64_t k) {
          const int64_t at = row * a.w_stride0 + k * a.w_stride1;
          // int8 rows are dequantized into the panel.
          return a.w_hh_int8 != nullptr ? a.w_hh_int8[at] * a.w_hh_scale[row]
                                        : cast<acc_t>(a.w_hh[at]);
        },
        a.w_hh_int8 == nullptr && a.w_stride1 == 1 ? in_place_weight<acc_t>(a.w_hh) : nullptr,
        a.w_stride0);
  }
  for (int64_t jb = mine.begin; jb < mine.end && panel_input; ++jb) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      pack_forward_block<acc_t, V>(
          input_panel + jb * input_panel_floats, H, a.input_size, jb,
          [&](int64_t row, int64_t k) { return a.w_ih[row * a.w_ih_stride + k]; }, a.w_ih,
          a.w_ih_stride);
    }
  }
  const int64_t panel_bytes = H * 4 * V * static_cast<int64_t>(sizeof(acc_t));
  const int64_t panel_input_bytes =
      panel_input ? input_panel_floats * static_cast<int64_t>(sizeof(acc_t)) : 0;
  const bool fetch_panels =
      !direct && !pairs && panels_outgrow_l2(mine.count() * (panel_bytes + panel_input_bytes));
  const int64_t unit_begin = std::min(H, mine.begin * V), unit_end = std::min(H, mine.end * V);
  // h as W_hh multiplies it: times the recurrent-dropout mask, rounded to the storage type
  // (the step loop of lstm_layer.h multiplies the same values).
  const auto recurrent_input = [&](int64_t r, int64_t j, acc_t h) {
    return a.recurrent_mask ? cast<acc_t>(cast<scalar_t>(h * a.recurrent_mask[r * H + j])) : h;
  };
  acc_t* h0 = a.h_work;
  for (int64_t r = 0; r < B; ++r) {
    for (int64_t j = unit_begin; j < unit_end; ++j) {
      h0[r * H + j] = recurrent_input(r, j, cast<acc_t>(a.hidden_state[r * H + j]));
    }
  }
  // b_ih + b_hh of this thread's columns, where the gates lack them (or the input projection
  // is made here, and no gates come in).
  const bool add_biases = project_input || a.b_ih || a.b_hh;
  std::vector<acc_t> biases(add_biases ? 4 * H : 0);
  for (int64_t g = 0; g < 4 && add_biases; ++g) {
    for (int64_t j = unit_begin; j < unit_end; ++j) {
      biases[g * H + j] = fused_bias<acc_t>(a, g * H + j);
    }
  }
#pragma omp barrier

  const int64_t G = 4 * H;
  // AMX tiles read each step's rows of h from this thread's packed copy (amx_pack_rows).
  AmxPackedRows amx_packed;
  if constexpr (kAmxKernel) {
    if (amx) {
      amx_packed.resize(ceil_div(B, kAmxRows), H / 2);
      amx_configure();
    }
  }
  // int8 weights read in place multiply each step's h rows (and, with the input projection
  // fused, its x rows) rounded to int16; each thread rounds all of them for itself.
  const bool int8 = direct && a.w_hh_int8 != nullptr;
  Int16Rows h_int16, x_int16;
  if (int8) {
    h_int16.resize(B, H);
    if (project_input) x_int16.resize(B, a.input_size);
  }
  // A step of more rows than a dot-product tile takes (an LSTMCell call) reads the weights in
  // place by broadcasts instead (dot.h's Columns), where 32 vector registers hold its tiles.
  static_assert(!kColumns || (isa >= Isa::avx512 && std::is_same_v<scalar_t, acc_t>));
  std::conditional_t<kColumns, Columns<acc_t, V>, NoColumns> columns;
  // Under amx, two tiles' products are made at once where a tile has a next one
  // (amx_product_pair): the second's wait here for their turn.
  std::vector<acc_t> second_products(amx ? kAmxRows * 4 * V : 0);
  // A training call's saved gates (written here only, when the input projection is made here
  // too) are stored around the caches in whole aligned lines: no read for ownership of lines
  // that are wholly overwritten, and the backward is the next to read them.
  constexpr bool kStreamGates =
      isa >= Isa::avx512 && std::is_same_v<scalar_t, float> && V % 16 == 0;
  const bool stream_gates = kStreamGates && a.save_gates && project_input && !direct &&
                            reinterpret_cast<uintptr_t>(a.gates) % 64 == 0 && H % 16 == 0;
  int64_t processed = 0, prev_rows = 0, prev_offset = 0;
  for (int64_t k = 0; k < a.steps; ++k) {
    const int64_t t = a.reverse ? a.steps - 1 - k : k;
    const int64_t rows = a.step_size[t], offset = a.step_offset[t];
    if (rows == 0) continue;
    const acc_t* h_prev = a.h_work + (1 + ((processed + 1) & 1)) * B * H;
    acc_t* h_next = a.h_work + (1 + (processed & 1)) * B * H;
    // Under amx, each tile's rows of h packed for its product.
    if constexpr (kAmxKernel) {
      if (amx) {
        amx_pack_tiles(
            rows, H / 2,
            [&](int64_t r) {
              return r < prev_rows ? a.output + (prev_offset + r) * H : a.hidden_state + r * H;
            },
            amx_packed);
      }
    }
    if constexpr (std::is_same_v<scalar_t, float>) {
      for (int64_t r = 0; int8 && r < rows; ++r) {
        h_int16.set(r, (r < prev_rows ? h_prev : h0) + r * H);
        if (project_input) x_int16.set(r, a.input + (offset + r) * a.input_stride);
      }
    }
    const bool by_columns = kColumns && direct && !int8 && rows > kDirectRows &&
                            Columns<acc_t, V>::fits(rows);
    if (by_columns) {
      if constexpr (kColumns) {
        std::vector<const acc_t*> in_rows(rows);
        for (int64_t r = 0; r < rows; ++r) in_rows[r] = (r < prev_rows ? h_prev : h0) + r * H;
        columns.set_rows(0, rows, H, in_rows.data());
        for (int64_t r = 0; r < rows && project_input; ++r) {
          in_rows[r] = a.input + (offset + r) * a.input_stride;
        }
        if (project_input) columns.set_rows(1, rows, a.input_size, in_rows.data());
      }
    }
    for (int64_t nth = 0; nth < mine.count(); ++nth) {
      const int64_t jb = mine.visit(nth, processed);
      const int64_t after = mine.visit_after(nth, processed);
      const acc_t* panel = direct ? nullptr : a.panel + jb * H * 4 * V;
      const int64_t j0 = jb * V, n_units = std::min<int64_t>(V, H - j0);
      const Tiles tiles(rows, tile_rows);
      for (int64_t tile = 0; tile < tiles.count; ++tile) {
        const int64_t r0 = tiles.begin(tile);
        const int n = static_cast<int>(tiles.begin(tile + 1) - r0);
        const acc_t* in[RT] = {};
        for (int i = 0; i < n; ++i) {
          const int64_t r = r0 + i;
          in[i] = (r < prev_rows ? h_prev : h0) + r * H;
        }
        // The tile's pre-activations, written by the input projection long before, come from
        // memory, and its rows of the outputs, saved states and saved activations are lines
        // no step has touched: asked for now (for ownership), they arrive while the products
        // run and the gate math's stores do not wait on reads.
        const void* ahead[RT * 8];
        int n_ahead = 0;
        for (int i = 0; i < n; ++i) {
          const int64_t row = offset + r0 + i, at = row * H + j0;
          for (int g = 0; g < 4 && a.gates && !stream_gates; ++g) {
            ahead[n_ahead++] = a.gates + row * G + j0 + g * H;
          }
          ahead[n_ahead++] = a.output + at;
          if (a.cell_prev_saved) ahead[n_ahead++] = a.cell_prev_saved + at;
          if (a.hidden_prev_saved) ahead[n_ahead++] = a.hidden_prev_saved + at;
          if (a.cells) ahead[n_ahead++] = a.cells + at;
        }
        // The panel product asks for them as it goes; the other forms at once.
        const bool spread = !direct && !amx && !pairs;
        for (int p = 0; p < n_ahead && !spread; ++p) __builtin_prefetch(ahead[p], 1);
        alignas(64) acc_t products[RT * 4 * V];
        int64_t shift = 0;  // the tile's first row in products
        if (direct) {
          // Unit j's four gate rows of W_hh are H rows apart.
          const acc_t* w = in_place_weight<acc_t>(a.w_hh);
          // The input projection, fused (a decode step, or any int8 one): W_ih's rows are read
          // the same way.
          const acc_t* w_ih = project_input ? in_place_weight<acc_t>(a.w_ih) : nullptr;
          const acc_t* x[RT] = {};
          for (int i = 0; i < n && project_input; ++i) {
            x[i] = in_place_weight<acc_t>(a.input) + (offset + r0 + i) * a.input_stride;
          }
          // int8 weights (fp32 only): the same dot products on int8 rows, times their scales.
          const int16_t* h_rows[kDirectRows] = {};
          const int16_t* x_rows[kDirectRows] = {};
          for (int i = 0; i < n && int8; ++i) {
            h_rows[i] = h_int16.row(r0 + i);
            if (project_input) x_rows[i] = x_int16.row(r0 + i);
          }
          if (by_columns) {
            if constexpr (kColumns) {
              if (tile == 0) {  // the block's products for every row at once
                if (w_ih) {
                  columns.product(1, a.input_size, n_units, w_ih + j0 * a.w_ih_stride,
                                  a.w_ih_stride, H * a.w_ih_stride, false);
                }
                columns.product(0, H, n_units, w + j0 * a.w_stride0, a.w_stride0,
                                H * a.w_stride0, w_ih != nullptr);
              }
              for (int i = 0; i < n; ++i) {
                for (int g = 0; g < 4; ++g) {
                  for (int64_t v = 0; v < n_units; ++v) {
                    products[i * 4 * V + g * V + v] = columns.value(r0 + i, g, v);
                  }
                }
              }
            }
          }
          for (int64_t v = 0; v < n_units && !by_columns; ++v) {
            acc_t dots[4 * kDirectRows], input_dots[4 * kDirectRows] = {};
            if constexpr (std::is_same_v<scalar_t, float>) {
              if (int8) {
                constexpr bool kVnni = isa >= Isa::avx512_bf16;
                int8_dot_rows<V, kVnni>(n, H, a.w_hh_int8, a.w_hh_scale, j0 + v,
                                        a.w_stride0, H, h_rows, h_int16.scale.data() + r0,
                                        dots);
                if (project_input) {
                  int8_dot_rows<V, kVnni>(n, a.input_size, a.w_ih_int8, a.w_ih_scale, j0 + v,
                                          a.w_ih_stride, H, x_rows,
                                          x_int16.scale.data() + r0, input_dots);
                }
              }
            }
            if (!int8) {
              dot_rows_n<acc_t, V, kDirectRows>(n, H, w + (j0 + v) * a.w_stride0,
                                                H * a.w_stride0, in, dots);
            }
            if (w_ih && !int8) {
              dot_rows_n<acc_t, V, kDirectRows>(n, a.input_size, w_ih + (j0 + v) * a.w_ih_stride,
                                                H * a.w_ih_stride, x, input_dots);
            }
            for (int i = 0; i < n; ++i) {
              for (int g = 0; g < 4; ++g) {
                products[i * 4 * V + g * V + v] = dots[g * n + i] + input_dots[g * n + i];
              }
            }
          }
        } else if (amx) {
          if constexpr (kAmxKernel) {
            shift = r0 - amx_first_row(r0, rows);
            const uint32_t* panel = pair_panels + jb * (H / 2) * 4 * V;
            if (tile % 2 == 1) {  // made with the tile before; copied, so the gate math
                                  // below reads one array for every form
              std::memcpy(products, second_products.data(), kAmxRows * 4 * V * sizeof(acc_t));
            } else if (tile + 1 < tiles.count) {
              amx_product_pair(H / 2, amx_packed.tile(tile), amx_packed.tile(tile + 1), panel,
                               products, second_products.data());
            } else {
              amx_product(H / 2, amx_packed.tile(tile), panel, products, false);
            }
          }
        } else if (pairs) {
          if constexpr (kPairKernel) {
            const scalar_t* in_pairs[R] = {};
            for (int i = 0; i < n; ++i) {
              const int64_t r = r0 + i;
              in_pairs[i] = r < prev_rows ? a.output + (prev_offset + r) * H
                                          : a.hidden_state + r * H;
            }
            // The thread's next panels, a share per tile.
            const bool ask = fetch_pairs && rows >= kPanelAheadFromRows && after >= 0;
            if (fused_input) {  // x W_ih^T first, then h W_hh^T added to it
              const scalar_t* x_pairs[R] = {};
              for (int i = 0; i < n; ++i) x_pairs[i] = a.input + (offset + r0 + i) * a.input_stride;
              pair_tile_product_n<R>(
                  n, input_pairs, x_pairs, input_panels + jb * input_pairs * 4 * V, 4 * V,
                  products, false,
                  ask ? panel_ahead(input_panels + after * input_pairs * 4 * V,
                                    input_panel_bytes, tile, tiles.count)
                      : PanelAhead{});
            }
            pair_tile_product_n<R>(
                n, H / 2, in_pairs, pair_panels + jb * (H / 2) * 4 * V, 4 * V, products,
                fused_input,
                ask ? panel_ahead(pair_panels + after * (H / 2) * 4 * V, pair_panel_bytes,
                                  tile, tiles.count)
                    : PanelAhead{});
          }
        } else {
          // The thread's next panel, a share per tile.
          const PanelAhead next =
              fetch_panels && rows >= kPanelAheadFromRows && after >= 0
                  ? panel_ahead(a.panel + after * H * 4 * V, panel_bytes, tile,
                                tiles.count)
                  : PanelAhead{};
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            if (panel_input) {  // x W_ih^T first, then h W_hh^T added to it
              const acc_t* x_rows[RT] = {};
              for (int i = 0; i < n; ++i) {
                x_rows[i] = a.input + (offset + r0 + i) * a.input_stride;
              }
              tile_product_n<acc_t, V, R>(n, a.input_size, x_rows,
                                          input_panel + jb * input_panel_floats, 4 * V,
                                          products, false);
            }
          }
          tile_product_n<acc_t, V, R>(n, H, in, panel, 4 * V, products, panel_input, ahead,
                                      spread ? n_ahead : 0, next);
        }
        // One row's gate math; a whole block's count of units is a constant, so that its loops
        // compile to straight vector code (with a count known only at run time GCC leaves
        // scalar tails and stores that stall the vector reads after them).
        const auto row_cells = [&](int i, auto n_units) {
          const int64_t r = r0 + i, row = offset + r;
          const acc_t* p = products + (shift + i) * 4 * V;
          scalar_t* gate_row = a.gates ? a.gates + row * G : nullptr;
          alignas(64) acc_t z[4 * V];
          alignas(64) acc_t h[V];
          for (int g = 0; g < 4; ++g) {
            if (!project_input) {
              convert_n(gate_row + g * H + j0, z + g * V, n_units);
              if (add_biases) add_n(biases.data() + g * H + j0, z + g * V, n_units);
            } else {
              convert_n(biases.data() + g * H + j0, z + g * V, n_units);
            }
            add_n(p + g * V, z + g * V, n_units);
          }
          acc_t* c = a.cell + r * H + j0;
          zoned_forward_cells<acc_t, V>(
              n_units, z, c, h, a.cell_prev_saved ? a.cell_prev_saved + row * H + j0 : nullptr,
              a.zoneout_cell ? a.zoneout_cell + row * a.zoneout_cell_stride + j0 : nullptr);
          // Zoneout keeps part of the previous h too: the h that entered the step (stored,
          // unmasked).
          if (a.zoneout_hidden) {
            const acc_t* d = a.zoneout_hidden + row * a.zoneout_hidden_stride + j0;
            const scalar_t* h_before = r < prev_rows ? a.output + (prev_offset + r) * H + j0
                                                     : a.hidden_state + r * H + j0;
            for (int64_t v = 0; v < n_units; ++v) {
              h[v] = d[v] * cast<acc_t>(h_before[v]) + (acc_t(1) - d[v]) * h[v];
            }
          }
          if (a.cells) convert_n(c, a.cells + row * H + j0, n_units);
          if (a.save_gates) {
            bool streamed = false;
            if constexpr (kStreamGates) {
              if (stream_gates && n_units == V) {
                using line = typename Vec<acc_t, 16>::type;
                for (int g = 0; g < 4; ++g) {
                  for (int64_t v = 0; v < V; v += 16) {
                    stream_line(reinterpret_cast<line*>(gate_row + g * H + j0 + v),
                                *reinterpret_cast<const line*>(z + g * V + v));
                  }
                }
                streamed = true;
              }
            }
            for (int g = 0; g < 4 && !streamed; ++g) {
              convert_n(z + g * V, gate_row + g * H + j0, n_units);
            }
          }
          // h stored, and read back rounded for the next step's product.
          scalar_t* y = a.output + row * H + j0;
          convert_n(h, y, n_units);
          convert_n(y, h_next + r * H + j0, n_units);
          if (a.recurrent_mask) {
            for (int64_t v = 0; v < n_units; ++v) {
              h_next[r * H + j0 + v] = recurrent_input(r, j0 + v, h_next[r * H + j0 + v]);
            }
          }
          if (a.hidden_prev_saved) {
            convert_n(in[i] + j0, a.hidden_prev_saved + row * H + j0, n_units);
          }
        };
        for (int i = 0; i < n; ++i) {
          if (n_units != V) {
            row_cells(i, n_units);
          } else {
            row_cells(i, std::integral_constant<int64_t, V>());
          }
        }
      }
    }
    prev_rows = rows;
    prev_offset = offset;
    ++processed;
#pragma omp barrier
  }
  if (stream_gates) stream_fence();  // before the backward may read the gates
  if constexpr (kAmxKernel) {
    if (amx) amx_release();
  }

  // h_n: each sequence's h after its last step. Forward, the sequences of step t that step
  // t + 1 lacks end at t; reversed, every sequence ends at t = 0.
  for (int64_t t = a.reverse ? 0 : a.steps - 1; t >= 0; --t) {
    const int64_t first = a.reverse || t + 1 == a.steps ? 0 : a.step_size[t + 1];
    for (int64_t r = first; r < a.step_size[t]; ++r) {
      const scalar_t* y = a.output + (a.step_offset[t] + r) * H;
      for (int64_t j = unit_begin; j < unit_end; ++j) a.hidden_state[r * H + j] = y[j];
    }
    if (a.reverse) break;
  }
}

// Rows [0, rows) of a backward block's columns (n_units of each gate) from row-major gate
// gradients (`rows` G apart, gate g's columns H further on) into their transposed copy, row i
// of unit u of gate g at out[g * gate_stride + u * unit_stride + i]: whole lines of rows
// transposed in registers (pack_square for fp32 and fp64; bf16 and fp16 as pairs of rows,
// below), the rest one value at a time. Only the weight-gradient products read the copy, after
// the whole backward, and it outgrows the caches, so under AVX-512 whole aligned lines of it
// are streamed around them: no read for ownership of lines that are wholly overwritten, and no
// eviction of the panels the steps reuse.
template <Isa isa, typename scalar_t, int64_t U>
inline void transpose_columns(const scalar_t* rows_in, int64_t G, int64_t H, int64_t n_units,
                              int64_t rows, scalar_t* out, int64_t gate_stride,
                              int64_t unit_stride) {
  int64_t r0 = 0;
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    constexpr int kLine = 64 / sizeof(scalar_t);
    static_assert(U % kLine == 0, "a block is whole lines");
    const bool stream = isa >= Isa::avx512 && reinterpret_cast<uintptr_t>(out) % 64 == 0 &&
                        gate_stride % kLine == 0 && unit_stride % kLine == 0;
    for (; n_units == U && r0 + kLine <= rows; r0 += kLine) {
      for (int g = 0; g < 4; ++g) {
        for (int64_t u = 0; u < U; u += kLine) {
          if (stream) {
            pack_square<scalar_t, kLine, isa >= Isa::avx512>(
                rows_in + r0 * G + g * H, G, u, out + g * gate_stride + r0, unit_stride);
          } else {
            pack_square<scalar_t, kLine>(rows_in + r0 * G + g * H, G, u,
                                         out + g * gate_stride + r0, unit_stride);
          }
        }
      }
    }
  } else if constexpr (sizeof(scalar_t) == 2) {
    // Two-byte values move in pairs of rows: rows 2a and 2a + 1 of a column make one 4-byte
    // value, and a square of 16 such pairs (32 rows) by 16 columns transposes as 4-byte values
    // into one line of each column's output row. One value at a time this was a third of the
    // bf16 backward recurrence's time (H 512, B 32 on a Zen 5).
    constexpr int kPairs = 16, kLine = 2 * kPairs;
    static_assert(U % kPairs == 0, "a block is whole squares");
    using vec = typename Vec<uint32_t, kPairs>::type;
    const bool fits = reinterpret_cast<uintptr_t>(out) % 4 == 0 && gate_stride % 2 == 0 &&
                      unit_stride % 2 == 0;
    const bool stream = isa >= Isa::avx512 && reinterpret_cast<uintptr_t>(out) % 64 == 0 &&
                        gate_stride % kLine == 0 && unit_stride % kLine == 0;
    for (; fits && n_units == U && r0 + kLine <= rows; r0 += kLine) {
      for (int g = 0; g < 4; ++g) {
        for (int64_t u = 0; u < U; u += kPairs) {
          vec square[kPairs];
          for (int p = 0; p < kPairs; ++p) {
            const scalar_t* even = rows_in + (r0 + 2 * p) * G + g * H + u;
            square[p] = pairs_of_rows(even, even + G);
          }
          transpose_square<uint32_t, kPairs>(square);
          // Row c of the square to unit u + c's output row, from row r0.
          uint32_t* to = reinterpret_cast<uint32_t*>(out + g * gate_stride + u * unit_stride + r0);
          if (stream) {
            store_square<uint32_t, kPairs, isa >= Isa::avx512>(square, to, unit_stride / 2);
          } else {
            store_square<uint32_t, kPairs>(square, to, unit_stride / 2);
          }
        }
      }
    }
  }
  for (int g = 0; g < 4; ++g) {
    for (int64_t u = 0; u < n_units; ++u) {
      for (int64_t i = r0; i < rows; ++i) {
        out[g * gate_stride + u * unit_stride + i] = rows_in[i * G + g * H + u];
      }
    }
  }
}

// Rows of the backward's 4H-long sums per chunk: a chunk of a block's panel is 128 KB.
template <typename acc_t, int64_t U>
constexpr int64_t kBackwardChunk = (128 << 10) / (U * static_cast<int64_t>(sizeof(acc_t)));

// Writes, for each of a thread's blocks `mine` of U columns of a matrix M of K rows and N
// columns (M[kk, j] = w[kk * stride0 + j * stride1]), its (K, U) panel: row kk holds the block's
// columns of M's row kk; columns past N get zeros. The backward panels (see the top of this
// file) are M = W_hh, K = 4H, N = H. Every block is packed, even where W_hh's rows could serve as
// the panel in place: read in place, a block's rows are H apart, which for the usual power-of-two
// H puts them in a few cache sets (and a page apart), so that a chunk of the panel does not stay
// in L2 across the tiles and the prefetchers cannot follow it. Row kk of every panel of the
// thread comes from one run of M's row kk, so a row-major M is read in order. A single step
// reads the rows in place all the same (run_backward): there packing is a pass over W_hh as
// long as the one product it would serve.
template <int64_t U, typename scalar_t, typename acc_t>
inline void pack_column_panels(acc_t* panels, const scalar_t* w, int64_t stride0,
                               int64_t stride1, int64_t K, int64_t N, Share mine) {
  for (int64_t kk = 0; kk < K; ++kk) {
    const scalar_t* w_row = w + kk * stride0;
    for (int64_t jb = mine.begin; jb < mine.end; ++jb) {
      acc_t* out = panels + (jb * K + kk) * U;
      const int64_t n_units = std::min<int64_t>(U, N - jb * U);
      if (stride1 == 1) {
        convert_n(w_row + jb * U, out, n_units);
      } else {
        for (int64_t u = 0; u < n_units; ++u) out[u] = cast<acc_t>(w_row[(jb * U + u) * stride1]);
      }
      std::fill(out + n_units, out + U, acc_t(0));
    }
  }
}

// The order of a backward block's product of `rows` rows of gate gradients (each 4H = G long)
// by its panel: tile(k0, kn, r0, n, next) multiplies rows [r0, r0 + n) over k in [k0, k0 + kn),
// in chunks of the 4H-long sum, so that a chunk of the panel and of the rows' gradients stay in
// L2 across all the tiles (each tile accumulates from its second chunk on); `next` is the
// tile's share of the chunk after (the first of `next_panel` after the last), or nothing
// without a next_panel.
template <typename acc_t, int64_t U, typename Tile>
inline void for_backward_tiles(int64_t rows, int64_t G, int64_t R, const acc_t* panel,
                               const acc_t* next_panel, Tile tile) {
  constexpr int64_t kChunk = kBackwardChunk<acc_t, U>;
  const Tiles tiles(rows, R);
  for (int64_t k0 = 0; k0 < G; k0 += kChunk) {
    const int64_t kn = std::min<int64_t>(kChunk, G - k0);
    const int64_t after = k0 + kn < G ? k0 + kn : 0;
    const acc_t* next_chunk = after > 0 ? panel + after * U : next_panel;
    const int64_t next_bytes =
        std::min<int64_t>(kChunk, G - after) * U * static_cast<int64_t>(sizeof(acc_t));
    for (int64_t t = 0; t < tiles.count; ++t) {
      const int64_t r0 = tiles.begin(t);
      tile(k0, kn, r0, static_cast<int>(tiles.begin(t + 1) - r0),
           next_panel ? panel_ahead(next_chunk, next_bytes, t, tiles.count) : PanelAhead{});
    }
  }
}

template <Isa isa, typename scalar_t>
void backward_thread(const SequenceBackward<scalar_t>& a, int thread, int threads) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Tiling<isa, acc_t>::V;
  constexpr int R = Tiling<isa, acc_t>::R;
  constexpr int64_t U = 4 * V;  // units per block
  const int64_t H = a.hidden, B = a.batch, G = 4 * H;
  const int64_t blocks = ceil_div(H, U);
  const Share mine = share_of(blocks, thread, threads);

  // bf16 under avx512_bf16 multiplies bf16 pairs (bf16_pairs.h): panels of pairs of rows of
  // W_hh, and the previous step's bf16 gate gradients themselves as the rows.
  constexpr bool kPairKernel = isa >= Isa::avx512_bf16 && std::is_same_v<scalar_t, c10::BFloat16>;
  const bool pairs = kPairKernel;
  // Under amx the same panels are multiplied on AMX tiles, where 4H is whole steps of the tile
  // product.
  constexpr bool kAmxKernel = isa == Isa::amx && kPairKernel;
  const bool amx = kAmxKernel && G % (2 * kAmxPairs) == 0;
  static_assert(!kAmxKernel || U == 2 * kHalfColumns, "a block is one AMX product's columns");
  uint32_t* const pair_panels = reinterpret_cast<uint32_t*>(a.panel);
  if constexpr (kPairKernel) {
    for (int64_t jb = mine.begin; jb < mine.end && pairs; ++jb) {
      uint32_t* panel = pair_panels + jb * (G / 2) * U;
      // Whole runs of 16 units of W_hh's contiguous rows as vectors, the rest one at a time.
      const int64_t runs_end =
          a.w_stride1 == 1 ? std::min<int64_t>(U, H - jb * U) / 16 * 16 : 0;
      // Panel row p's unit u: under amx in amx_product's two halves.
      const auto at = [&](int64_t p, int64_t u) {
        return amx ? (u / kHalfColumns) * (G / 2) * kHalfColumns + p * kHalfColumns +
                         u % kHalfColumns
                   : p * U + u;
      };
      for (int64_t p = 0; p < G / 2; ++p) {
        const scalar_t* w0 = a.w_hh + 2 * p * a.w_stride0;
        const scalar_t* w1 = w0 + a.w_stride0;
        using vec = Vec<uint32_t, 16>::type;
        for (int64_t u = 0; u < runs_end; u += 16) {
          const int64_t j = jb * U + u;
          *reinterpret_cast<vec*>(panel + at(p, u)) = pairs_of_rows(w0 + j, w1 + j);
        }
        for (int64_t u = runs_end; u < U; ++u) {
          const int64_t j = jb * U + u;
          panel[at(p, u)] = j < H ? bf16_pair(w0[j * a.w_stride1], w1[j * a.w_stride1]) : 0;
        }
      }
    }
  }
  // Without a panel (a single step: run_backward) W_hh's rows serve as the panels in place.
  const bool in_place = !pairs && a.panel == nullptr;
  acc_t* const panels = a.panel;
  if (!pairs && !in_place) {
    pack_column_panels<U>(panels, a.w_hh, a.w_stride0, a.w_stride1, G, H, mine);
  }
  const int64_t panel_ld = in_place ? a.w_stride0 : U;
  const bool fetch_panels = !pairs && !in_place &&
                            panels_outgrow_l2(mine.count() * G * U * int64_t{sizeof(acc_t)});
  // The bias gradient of this thread's blocks, summed as the gate gradients are made.
  std::vector<acc_t> bias_sums(a.grad_bias ? mine.count() * 4 * U : 0);
#pragma omp barrier
  // AMX tiles read the gate gradients from this thread's packed copy (amx_pack_rows).
  AmxPackedRows amx_packed;
  if constexpr (kAmxKernel) {
    if (amx) {
      amx_packed.resize(ceil_div(B, kAmxRows), G / 2);
      amx_configure();
    }
  }

  // Step k (in backward order) first finishes the product of the previous step's gate
  // gradients with W_hh, dh carried into this step; rows of the previous step that this step
  // does not have are sequences whose first step that was, and get their grad of h0. One more
  // pass after the last step does the same for the rows of the last one.
  int64_t processed = 0, prev_rows = 0, prev_offset = 0;
  // Gradients stored in the math type are the next product's rows as they are; stored in bf16,
  // the product reads them back rounded from a math-type copy (or as bf16 pairs).
  constexpr bool kStoredInMathType = std::is_same_v<scalar_t, acc_t>;
  for (int64_t k = 0; k <= a.steps; ++k) {
    int64_t rows = 0, offset = 0;
    if (k < a.steps) {
      const int64_t t = a.reverse ? k : a.steps - 1 - k;
      rows = a.step_size[t];
      offset = a.step_offset[t];
      if (rows == 0) continue;
    }
    const acc_t* grad_prev;
    acc_t* grad_next = nullptr;
    if constexpr (kStoredInMathType) {
      grad_prev = a.grad_gates + prev_offset * G;
    } else {
      grad_prev = a.grad_work + ((processed + 1) & 1) * B * G;
      grad_next = a.grad_work + (processed & 1) * B * G;
    }
    const int64_t span = std::max(rows, prev_rows);
    // Under amx the whole 4H-long sum per tile (the tiles keep it), of the previous step's
    // rows packed for it (amx_pack_tiles): the last tile, where it starts early, writes rows
    // before its own again with the same values.
    const Tiles amx_tiles(amx ? prev_rows : 0, kAmxRows);
    const auto first_row = [&](int64_t t) { return amx_first_row(amx_tiles.begin(t), prev_rows); };
    if constexpr (kAmxKernel) {
      if (amx) {
        amx_pack_tiles(
            prev_rows, G / 2,
            [&](int64_t r) { return a.grad_gates + (prev_offset + r) * G; }, amx_packed);
      }
    }
    for (int64_t nth = 0; nth < mine.count(); ++nth) {
      const int64_t jb = mine.visit(nth, processed);
      const int64_t after = mine.visit_after(nth, processed);
      const int64_t u0 = jb * U, n_units = std::min<int64_t>(U, H - u0);
      const acc_t* panel = in_place ? in_place_weight<acc_t>(a.w_hh) + u0 : panels + jb * G * U;
      // dh carried into this step, for rows [0, prev_rows).
      acc_t* carried = a.carry_work + thread * B * U;
      if constexpr (kAmxKernel) {
        for (int64_t tile = 0; tile < amx_tiles.count; ++tile) {
          const uint32_t* panel = pair_panels + jb * (G / 2) * U;
          if (prev_rows < kAmxRows) {
            alignas(64) float products[kAmxRows * U];
            amx_product(G / 2, amx_packed.tile(tile), panel, products, false);
            std::memcpy(carried, products, prev_rows * U * sizeof(float));
            continue;
          }
          const int64_t first = first_row(tile);
          if (tile + 1 < amx_tiles.count) {  // this tile and the next at once
            amx_product_pair(G / 2, amx_packed.tile(tile), amx_packed.tile(tile + 1), panel,
                             carried + first * U, carried + first_row(tile + 1) * U);
            ++tile;
            continue;
          }
          amx_product(G / 2, amx_packed.tile(tile), panel, carried + first * U, false);
        }
      }
      const acc_t* next_panel = fetch_panels && prev_rows >= kPanelAheadFromRows && after >= 0
                                    ? panels + after * G * U
                                    : nullptr;
      for_backward_tiles<acc_t, U>(amx ? 0 : prev_rows, G, R, panel, next_panel,
                                   [&](int64_t k0, int64_t kn, int64_t r0, int n,
                                       PanelAhead next) {
        if constexpr (kPairKernel) {
          if (pairs) {
            const scalar_t* in[R] = {};
            for (int i = 0; i < n; ++i) in[i] = a.grad_gates + (prev_offset + r0 + i) * G + k0;
            pair_tile_product_n<R>(n, kn / 2, in, pair_panels + jb * (G / 2) * U + k0 / 2 * U,
                                   U, carried + r0 * U, /*accumulate=*/k0 > 0);
            return;
          }
        }
        const acc_t* in[R] = {};
        for (int i = 0; i < n; ++i) in[i] = grad_prev + (r0 + i) * G + k0;
        // Only the vectors the block's units fill: the last block's may be fewer than four,
        // so the last thread (the larger share of an uneven count) is not a whole block behind.
        with_vectors(static_cast<int>(ceil_div(n_units, V)), [&](auto nv) {
          tile_product_n<acc_t, V, R, decltype(nv)::value>(n, kn, in, panel + k0 * panel_ld,
                                                           panel_ld,
                                                           carried + r0 * U,
                                                           /*accumulate=*/k0 > 0, nullptr, 0,
                                                           next);
        });
      });
      const Tiles tiles(span, R);
      for (int64_t tile = 0; tile < tiles.count; ++tile) {
        const int64_t r0 = tiles.begin(tile);
        const int n = static_cast<int>(tiles.begin(tile + 1) - r0);
        alignas(64) acc_t tile_grads[R * 4 * U];
        // What the cell gradients of the next tile read (saved gates, c, the output's
        // gradient) comes from memory: ask for it while this one is computed.
        const int64_t next = tiles.begin(tile + 1);
        const int64_t next_end = tiles.begin(std::min(tile + 2, tiles.count));
        for (int64_t r = next; r < std::min(next_end, rows); ++r) {
          const int64_t row = offset + r;
          for (int g = 0; g < 4; ++g) {
            for (int64_t u = 0; u < n_units; u += 64 / sizeof(scalar_t)) {
              __builtin_prefetch(a.gates + row * G + g * H + u0 + u);
            }
          }
          for (int64_t u = 0; u < n_units; u += 64 / sizeof(acc_t)) {
            __builtin_prefetch(a.cell_prev + row * H + u0 + u);
          }
          if (a.grad_output) {
            for (int64_t u = 0; u < n_units; u += 64 / sizeof(scalar_t)) {
              __builtin_prefetch(a.grad_output + row * a.grad_output_stride + u0 + u);
            }
          }
        }
        // One row's cell gradients, with a whole block's count of units a constant (as the
        // forward's row_cells).
        const auto row_cells = [&](int i, auto n_units) {
          const int64_t r = r0 + i;
          const acc_t* p = carried + r * U;
          scalar_t* grad_h = a.grad_hidden + r * H + u0;
          // The carried dh reached h through the recurrent-dropout mask, if any.
          const acc_t* mask = a.recurrent_mask ? a.recurrent_mask + r * H + u0 : nullptr;
          // With zoneout of h, d dh of the step after reaches h directly too.
          acc_t* carry = a.zoneout_carry ? a.zoneout_carry + r * H + u0 : nullptr;
          // The dh carried back through the product, for rows the previous step had (the
          // optional operands tested outside the loops: see with_optional).
          alignas(64) acc_t through[U];
          if (r < prev_rows) {
            with_optional(mask, [&](auto masked) {
              with_optional(carry, [&](auto zoneout) {
                for (int64_t u = 0; u < n_units; ++u) {
                  through[u] = (masked ? p[u] * mask[u] : p[u]) +
                               (zoneout ? carry[u] : acc_t(0));
                }
              });
            });
          }
          if (r >= rows) {  // this sequence's first step is behind us: p is its grad of h0
            for (int64_t u = 0; u < n_units; ++u) grad_h[u] = cast<scalar_t>(through[u]);
            return;
          }
          const int64_t row = offset + r;
          const scalar_t* from_output =
              a.grad_output ? a.grad_output + row * a.grad_output_stride + u0 : nullptr;
          alignas(64) acc_t dh[U];
          with_optional(from_output, [&](auto has_output) {
            for (int64_t u = 0; u < n_units; ++u) {
              const acc_t from_next = r < prev_rows ? through[u] : cast<acc_t>(grad_h[u]);
              dh[u] = (has_output ? cast<acc_t>(from_output[u]) : acc_t(0)) + from_next;
            }
          });
          // Zoneout: of dh, d goes straight to the previous step's h and 1 - d into this
          // step's cell; of dc, d to the previous c, and 1 - d through the cell update.
          if (carry) {
            const acc_t* d = a.zoneout_hidden + row * a.zoneout_hidden_stride + u0;
            for (int64_t u = 0; u < n_units; ++u) {
              carry[u] = d[u] * dh[u];
              dh[u] *= acc_t(1) - d[u];
            }
          }
          acc_t* dc = a.grad_cell + r * H + u0;
          if (a.grad_cells) {  // the gradient of this step's c as an output
            for (int64_t u = 0; u < n_units; ++u) {
              dc[u] += cast<acc_t>(a.grad_cells[row * H + u0 + u]);
            }
          }
          alignas(64) acc_t z[4 * U];
          acc_t* dz = tile_grads + i * 4 * U;
          const scalar_t* gate_row = a.gates + row * G;
          for (int g = 0; g < 4; ++g) convert_n(gate_row + g * H + u0, z + g * U, n_units);
          zoned_backward_cells<acc_t, U>(
              n_units, z, a.cell_prev + row * H + u0, dh, dc, dz,
              a.zoneout_cell ? a.zoneout_cell + row * a.zoneout_cell_stride + u0 : nullptr);
          if (a.grad_bias) {
            acc_t* sums = bias_sums.data() + (jb - mine.begin) * 4 * U;
            for (int g = 0; g < 4; ++g) add_n(dz + g * U, sums + g * U, n_units);
          }
          // Stored in the storage type; in bf16 or fp16 also read back rounded into the
          // math-type copy that the next step's product reads (the pair kernel reads them
          // stored).
          scalar_t* grad_row = a.grad_gates + row * G;
          for (int g = 0; g < 4; ++g) {
            convert_n(dz + g * U, grad_row + g * H + u0, n_units);
            if constexpr (!kStoredInMathType) {
              if (!pairs) {
                convert_n(grad_row + g * H + u0, grad_next + r * G + g * H + u0, n_units);
              }
            }
          }
        };
        for (int i = 0; i < n; ++i) {
          if (n_units != U) {
            row_cells(i, n_units);
          } else {
            row_cells(i, std::integral_constant<int64_t, U>());
          }
        }
      }
      // The same gradients transposed: each (gate, unit) row of the (4H, N) copy gets this
      // step's rows in one run.
      if (a.grad_gates_t && rows > 0) {
        transpose_columns<isa, scalar_t, U>(a.grad_gates + offset * G + u0, G, H, n_units,
                                            rows, a.grad_gates_t + u0 * a.rows + offset,
                                            H * a.rows, a.rows);
      }
    }
    prev_rows = rows;
    prev_offset = offset;
    ++processed;
    stream_fence();  // transpose_columns' stores, before the other threads read them
#pragma omp barrier
  }
  if constexpr (kAmxKernel) {
    if (amx) amx_release();
  }
  for (int64_t jb = mine.begin; jb < mine.end && a.grad_bias; ++jb) {
    const int64_t u0 = jb * U, n_units = std::min<int64_t>(U, H - u0);
    for (int g = 0; g < 4; ++g) {
      std::memcpy(a.grad_bias + g * H + u0, bias_sums.data() + ((jb - mine.begin) * 4 + g) * U,
                  n_units * sizeof(acc_t));
    }
  }
}

// Threads for `blocks` blocks of work: torch's setting, at most one per block, and one inside
// an enclosing parallel region.
inline int threads_for(int64_t blocks) {
  if (at::in_parallel_region()) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks)));
}

// fn(a, thread, threads) on `threads` threads of one OpenMP parallel region.
template <typename Args, typename Fn>
void run_parallel(const Args& a, Fn fn, int threads) {
  if (threads == 1) {
    fn(a, 0, 1);
    return;
  }
#pragma omp parallel num_threads(threads)
  fn(a, omp_get_thread_num(), omp_get_num_threads());
}

// The steps from which packing panels repays itself at up to kDirectRows rows: from about 50
// (measured on a Zen 5 at B 4), fewer where the panels would carry W_ih too (panels_take_input:
// no separate input projection) and those weights are small, or in inference.
constexpr int64_t kPackingPaysFromSteps = 50;
int64_t packing_pays_from(int64_t batch, bool panels_take_input, bool small_weights,
                          bool training);

// Whether a forward of this batch and length reads W_hh in place (the direct
// form: small batches, where its rows are contiguous and in the math type) instead of packing
// panels; pays_from: packing_pays_from's steps; panels_streamed: a thread's panels would come
// from L3 at every step; one_row_packs: a single row packs panels too once the sequence repays
// it (otherwise one row is always direct).
bool direct_form(int64_t batch, int64_t steps, int64_t pays_from = kPackingPaysFromSteps,
                 bool panels_streamed = false, bool one_row_packs = false);

// The whole recurrence, in a parallel region of torch's thread count (recurrence.cpp); the
// workspace fields of the arguments are filled there. run_forward declines (false) a step
// whose input projection it was left (gates null) where W_hh is not read in place; both
// decline a projection in bf16 or fp16.
template <typename scalar_t>
bool run_forward(SequenceForward<scalar_t> a);
template <typename scalar_t>
bool run_backward(SequenceBackward<scalar_t> a);

// The same with a projection, fp32 and fp64 (projected_recurrence.cpp), as run_forward and
// run_backward call them.
template <typename scalar_t>
void run_projected_forward(SequenceForward<scalar_t> a);
template <typename scalar_t>
void run_projected_backward(SequenceBackward<scalar_t> a);

// False when LSTM_EXT_CPU_RECURRENCE=0, which sends the CPU through the step-by-step path
// (per-step GEMM plus elementwise pass) instead, for comparison.
bool recurrence_enabled();

}  // namespace cpu
}  // namespace lstm_ext
