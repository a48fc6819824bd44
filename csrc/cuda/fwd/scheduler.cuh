// Work decomposition of the forward kernel: which (batch, KV head, block row, 128-row split) a CTA
// computes. The grid depends on shapes and attributes only (never on the layout's contents).
//
// Order: splits of one block row are adjacent (they gather the same KV rows: L2 reuse), block rows of
// one (batch, KV head) come next, heads last, so the CTAs resident at any time share a few heads' K/V
// in L2. Within a head, block rows run last-to-first: the heavy rows of causal-like layouts (row i
// holding i + 1 blocks, or the causal mask cutting the early rows) start first and the light ones fill
// the tail (longest-processing-time-first for the typical shapes).
#pragma once

#include "cuda/fwd/params.h"

namespace bsattn {
namespace cuda {

struct WorkTile {
  int b, hk, br, split;
};

__device__ __forceinline__ WorkTile decode_work(int bid, const FwdParams& p) {
  WorkTile w;
  w.split = bid % p.nsplit;
  const int t = bid / p.nsplit;
  const int rb = t % p.MB;
  const int head = t / p.MB;
  w.b = head / p.Hk;
  w.hk = head - w.b * p.Hk;
  w.br = p.MB - 1 - rb;
  return w;
}

// Rows per CTA tile for R * g packed rows: the smallest of 16, 64, 128 that holds them; above 128
// the block row is split over several 128-row tiles.
inline int fwd_tile_rows(int64_t packed_rows) {
  return packed_rows <= 16 ? 16 : packed_rows <= 64 ? 64 : 128;
}

}  // namespace cuda
}  // namespace bsattn
