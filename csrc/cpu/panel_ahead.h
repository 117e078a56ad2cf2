// A panel's lines asked into L2 ahead of the products that read them.
#pragma once

#include <cstdint>

namespace lstm_ext {
namespace cpu {

// Whole lines of a panel that later products read, asked into L2 while a tile product runs: a
// thread's panels can outgrow its L2, and the first tile to read one would otherwise wait on
// L3 at every step (the hardware prefetchers do not follow a jump to another panel).
struct PanelAhead {
  const char* begin = nullptr;
  int64_t lines = 0;
};
// Steps of fewer rows do not ask ahead: each of their tiles is one pass over a whole panel, and
// asking for the next one besides slowed them (by 12-26 % on a Zen 5); with more rows the later
// tiles of a block find its panel in L2, and only the first one's wait on L3 is left to hide.
constexpr int64_t kPanelAheadFromRows = 16;

// Tile `tile` of `count`'s share of the `bytes` at `region`.
inline PanelAhead panel_ahead(const void* region, int64_t bytes, int64_t tile, int64_t count) {
  const int64_t lines = bytes / 64;
  const int64_t l0 = lines * tile / count, l1 = lines * (tile + 1) / count;
  return {static_cast<const char*>(region) + l0 * 64, l1 - l0};
}

}  // namespace cpu
}  // namespace lstm_ext
