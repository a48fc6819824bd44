// The row split's plan where there are few block rows (a decode step, a short prompt: MB < kSplitFewRowsMB), computed
// by every warp of every CTA that needs it from the layout's indptr alone: no plan kernel before the forward and no
// tables in between (fwd_sm90/row_split.cuh has the plan kernel the many-row split keeps). A decode step is a few
// microseconds of work, and the plan kernel was one more launch on its critical path (H200 under ncu, M = 1 against
// 2048 keys: plan 8 us, forward 10.7, combine 11.5).
//
// The rule: lane i of a warp holds block row MB - 1 - i (the kernels' order, last to first) and its entries len_i; the
// cut is max(split_min_len, ceil(sum of len / split_cut_div)) entries (split_cut_div <= split_parts, set by the
// launcher: the pieces a layout gets so that the heads in flight fill the CTA slots once), and a row takes
// floor(len_i / cut) pieces of near-equal length where that is at least 2, else it stays whole. The pieces then number
// at most sum(len) / cut <= split_parts (the partial slots), the items at most split_parts + MB (the CTA slots).
// Slots in CTA order: the split rows' pieces first (partial slot = slot), then the whole rows, then empty slots.
// Garbage indptr is clamped as everywhere (row_range); the plan only depends on it, so every CTA computes the same one.
#pragma once

#include <climits>
#include <cstdint>

#include "common/bsattn_common.h"
#include "cuda/fwd/params.h"

namespace bsattn {
namespace cuda {

// This lane's block row in the few-row plan of layout lid, with the scans over the warp's lanes.
struct FewRowsSplit {
  int br;          // MB - 1 - lane, or -1 (lanes past the block rows)
  int len;         // its entries
  int64_t start;   // its first entry
  int pieces;      // >= 2: cut into that many; 1: whole; 0: not a row
  int first;       // a cut row's first partial slot (= its first CTA slot)
  int whole;       // a whole row's rank among the whole rows
  int S;           // the cut rows' pieces, all lanes
};

// All 32 lanes of the warp (shuffles); p.MB < 32.
__device__ __forceinline__ FewRowsSplit few_rows_split(const FwdParams& p, int64_t lid) {
  const int lane = threadIdx.x & 31;
  FewRowsSplit s;
  s.br = lane < p.MB ? p.MB - 1 - lane : -1;
  s.start = 0;
  s.len = 0;
  if (s.br >= 0) {
    const RowRange rr = row_range(p.indptr + lid * (p.MB + 1), s.br, p.nnz);
    s.start = rr.start;
    s.len = static_cast<int>(rr.end - rr.start);
  }
  long long total = s.len;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
  const long long div = p.split_cut_div > 0 ? p.split_cut_div : 1;
  long long cut = (total + div - 1) / div;
  cut = cut > p.split_min_len ? cut : p.split_min_len;
  cut = cut < 1 ? 1 : (cut > INT_MAX ? INT_MAX : cut);
  s.pieces = s.br < 0 ? 0 : max(1, static_cast<int>(static_cast<unsigned>(s.len) / static_cast<unsigned>(cut)));
  const int cut_pieces = s.pieces >= 2 ? s.pieces : 0, is_whole = s.pieces == 1 ? 1 : 0;
  int a = cut_pieces, w = is_whole;  // inclusive scans over the lanes
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int ya = __shfl_up_sync(0xffffffffu, a, o), yw = __shfl_up_sync(0xffffffffu, w, o);
    if (lane >= o) {
      a += ya;
      w += yw;
    }
  }
  s.first = a - cut_pieces;
  s.whole = w - is_whole;
  s.S = __shfl_sync(0xffffffffu, a, 31);
  return s;
}

// The item of CTA slot `slot`, as the plan kernel's table holds it: (block row, first entry, end entry, partial slot
// or -1); (-1, 0, 0, -1) for an empty slot. All 32 lanes of the warp, with the same slot.
__device__ __forceinline__ int4 few_rows_item(const FewRowsSplit& s, int slot) {
  const bool mine = s.pieces >= 2 ? slot >= s.first && slot < s.first + s.pieces : s.pieces == 1 && slot == s.S + s.whole;
  const unsigned m = __ballot_sync(0xffffffffu, mine);
  if (m == 0) return make_int4(-1, 0, 0, -1);
  const int src = __ffs(m) - 1;
  const int br = __shfl_sync(0xffffffffu, s.br, src), len = __shfl_sync(0xffffffffu, s.len, src);
  const int pieces = __shfl_sync(0xffffffffu, s.pieces, src), first = __shfl_sync(0xffffffffu, s.first, src);
  const int64_t start = __shfl_sync(0xffffffffu, static_cast<long long>(s.start), src);
  if (pieces < 2) return make_int4(br, static_cast<int>(start), static_cast<int>(start + len), -1);
  const int j = slot - first;
  const int64_t a = start + static_cast<int64_t>(j) * len / pieces, b = start + static_cast<int64_t>(j + 1) * len / pieces;
  return make_int4(br, static_cast<int>(a), static_cast<int>(b), slot);
}

}  // namespace cuda
}  // namespace bsattn
