// A panel's lines asked into L2 ahead of the products that read them.
#pragma once

#include <algorithm>
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

// Asks for a panel's lines in even shares, one share per group of kGroup k of a sum over `K`
// (a test at every k costs the product more), the rest at the end.
class LinesAhead {
 public:
  static constexpr int64_t kGroup = 4;
  LinesAhead(PanelAhead next, int64_t K)
      : next_(next), per_group_((next.lines + groups(K) - 1) / groups(K)) {}
  void group() {
    for (const int64_t end = std::min(line_ + per_group_, next_.lines); line_ < end; ++line_) {
      fetch(line_);
    }
  }
  void rest() {
    for (; line_ < next_.lines; ++line_) fetch(line_);
  }

 private:
  static int64_t groups(int64_t K) { return std::max<int64_t>(1, K / kGroup); }
  void fetch(int64_t line) const { __builtin_prefetch(next_.begin + 64 * line, 0, 2); }
  PanelAhead next_;
  int64_t per_group_;
  int64_t line_ = 0;
};

}  // namespace cpu
}  // namespace lstm_ext
