// Tiles of packed query rows, shared by the forward and the dq kernels (both give each CTA TM packed rows (query
// row, head) of one block row and walk that row's key sequence): the tile size for R * g packed rows, the grid,
// and which (batch, KV head, block row, split) a CTA computes. The grid depends on shapes and attributes only
// (never on the layout's contents).
//
// Order: splits of one block row are adjacent (they gather the same KV rows: L2 reuse), block rows of
// one (batch, KV head) come next, heads last, so the CTAs resident at any time share a few heads' K/V
// in L2. Within a head, block rows run last-to-first: the heavy rows of causal-like layouts (row i
// holding i + 1 blocks, or the causal mask cutting the early rows) start first and the light ones fill
// the tail (longest-processing-time-first for the typical shapes).
#pragma once

#include <cstdint>

namespace bsattn {
namespace cuda {

struct WorkTile {
  int b, hk, br, split;
};

// P: a parameter block with the shared problem description and `nsplit` (FwdParams, bwd::Params).
template <class P>
__device__ __forceinline__ WorkTile decode_work(int bid, const P& p) {
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
inline int packed_tile_rows(int64_t packed_rows) {
  return packed_rows <= 16 ? 16 : packed_rows <= 64 ? 64 : 128;
}

// Sets p.nsplit (TM-row tiles per block row) and returns the grid: one CTA per tile.
template <int TM, class P>
int64_t row_tile_grid(P& p) {
  const int64_t packed = static_cast<int64_t>(p.R) * p.g;
  p.nsplit = static_cast<int>((packed + TM - 1) / TM);
  return static_cast<int64_t>(p.B) * p.Hk * p.MB * p.nsplit;
}

}  // namespace cuda
}  // namespace bsattn
