// The set-up of a forward CTA that does not depend on its math (used by the wgmma kernels, fwd_sm90/kernel.cuh and
// kernel_ws.cuh):
// which tile the CTA computes and which of its rows are real, the block row's list of blocks, the q / o / k / v
// offsets, and the per-CTA tables in shared memory (the (query row, head) and causal limit of every tile row, the
// gather's constants). The mma.sync kernel (fwd/kernel.cuh) computes the same inline: routed through these
// helpers its 128-row D = 128 tile went from 4 to 28 bytes of spills (registers allocated differently), so its
// timed code stays as it was.
#pragma once

#include <climits>
#include <cstdint>

#include "common/bsattn_common.h"
#include "cuda/common/pdl.cuh"
#include "cuda/common/row_tiles.cuh"
#include "cuda/fwd/epilogue.cuh"
#include "cuda/fwd/few_rows_plan.cuh"
#include "cuda/fwd/gather_kv.cuh"
#include "cuda/fwd/params.h"

namespace bsattn {
namespace cuda {

struct FwdTileSetup {
  WorkTile w;
  int row0;        // packed index of the tile's first row
  int rows_valid;  // tile rows [0, rows_valid) are real (may exceed the tile: a split block row)
  int qmin;        // smallest query row of the tile
  int len;         // blocks the CTA walks: the block row's, or a piece of them (the row split)
  int ntiles;      // KV tiles of BN keys over them
  int part;        // the row split's partial slot of this piece (-1: the whole block row; fwd_sm90/row_split.cuh)
  int nkeys;       // keys of the batch element that take part (ProblemParams::key_count)
  int shift;       // its causal shift (ProblemParams::causal_shift): query row i sees keys up to i + shift
  int64_t q_rstride, qoff, kvoff;  // Hq * D; q / o of the tile's first (row, head); k / v of (b, hk)
  const int32_t* idx;              // the list of blocks the CTA walks
};

// Fills `t` for CTA blockIdx.x with TM-row tiles and BN-key KV tiles; false when the tile is past the last
// query row or is an empty slot of the row split (uniform: the CTA returns). With the row split (p.split_items) the
// CTA's block row and its entries come from its slot's item (fwd_sm90/row_split.cuh).
template <int D, int TM, int BN>
__device__ __forceinline__ bool fwd_tile_setup(const FwdParams& p, FwdTileSetup& t) {
  WorkTile& w = t.w;
  int slot = 0;
  pdl_wait();  // (launched as a dependent, the row split's: nothing read or written before the previous kernel is done)
  if (p.split_items != nullptr) {
    // CTA = (head, slot, row tile): slots [0, MB) of every head first, then slots [MB, split_slots), so that the
    // empty slots (at the end of each head's table) are the grid's last CTAs
    const int first = p.B * p.Hk * p.MB * p.nsplit, x = blockIdx.x;  // (the launcher checked the grid fits int)
    const bool front = x < first;
    const int bid = front ? x : x - first, per_head = front ? p.MB : p.split_slots - p.MB;
    w.split = bid % p.nsplit;
    const int hs = bid / p.nsplit;  // head x per_head + slot
    const int head = hs / per_head;
    slot = hs - head * per_head + (front ? 0 : p.MB);
    w.b = head / p.Hk;
    w.hk = head - w.b * p.Hk;
  } else {
    w = decode_work(blockIdx.x, p);
  }
  const int64_t lid = p.layout_index(w.b, w.hk);
  int4 item = make_int4(0, 0, 0, -1);
  if (p.split_items != nullptr) {
    // (few block rows: the plan computed here, fwd/few_rows_plan.cuh; else the plan kernel's table)
    item = p.split_few ? few_rows_item(few_rows_split(p, lid), slot)
                       : reinterpret_cast<const int4*>(p.split_items)[lid * p.split_slots + slot];
    if (item.x < 0 || item.x >= p.MB) return false;  // an empty slot
    w.br = item.x;
  }
  t.row0 = w.split * TM;
  const int rows_in_block = min(p.R, p.M - w.br * p.R);
  t.rows_valid = rows_in_block * p.g - t.row0;
  if (t.rows_valid <= 0) return false;
  t.qmin = w.br * p.R + t.row0 / p.g;

  RowRange rr = row_range(p.indptr + lid * (p.MB + 1), w.br, p.nnz);
  t.part = -1;
  if (p.split_items != nullptr) {  // the item's entries (clamped: the plan wrote them from the same clamped range)
    rr.start = min(max(static_cast<int64_t>(item.y), int64_t{0}), p.nnz);
    rr.end = min(max(static_cast<int64_t>(item.z), rr.start), p.nnz);
    t.part = item.w >= 0 && item.w < p.split_parts ? item.w : -1;
  }
  t.len = static_cast<int>(rr.end - rr.start);
  const int64_t ntiles64 = (static_cast<int64_t>(t.len) * p.C + BN - 1) / BN;
  t.ntiles = ntiles64 > INT_MAX ? INT_MAX : static_cast<int>(ntiles64);
  t.idx = p.indices + lid * p.nnz + rr.start;

  t.q_rstride = static_cast<int64_t>(p.Hq) * D;
  t.qoff = (static_cast<int64_t>(w.b) * p.M + static_cast<int64_t>(w.br) * p.R) * t.q_rstride +
           static_cast<int64_t>(w.hk) * p.g * D;
  t.kvoff = (static_cast<int64_t>(w.b) * p.N * p.Hk + w.hk) * D;
  t.nkeys = p.key_count(w.b);
  t.shift = p.causal_shift(w.b);
  pdl_launch_dependents();  // the row split's combine may take its place now (it waits for this grid's end)
  return true;
}

// Per tile row: (query row in the block row, head in the group), r = -1 for padding; the causal limit
// i + shift of its query row i (else INT_MAX - 1). (Keys past kv_lens need no limit: the gather gives them INT_MAX.)
template <int TM, int NT>
__device__ __forceinline__ void fill_row_tables(const FwdParams& p, const FwdTileSetup& t, int2* sRow, int* sLim,
                                                int tid) {
  for (int row = tid; row < TM; row += NT) {
    const int P = t.row0 + row, r = P / p.g;
    sRow[row] = make_int2(row < t.rows_valid ? r : -1, P - r * p.g);
    sLim[row] = p.causal ? t.w.br * p.R + r + t.shift : INT_MAX - 1;
  }
}

// The gather's per-CTA constants (one thread writes them; a barrier must follow).
template <int BN>
__device__ __forceinline__ void fill_gather_shared(const FwdParams& p, const FwdTileSetup& t, GatherShared* gs) {
  gs->kvoff = t.kvoff;
  gs->idx = t.idx;
  gs->len = t.len;
  gs->qC = static_cast<int16_t>(BN / p.C);
  gs->rC = static_cast<int16_t>(BN - gs->qC * p.C);
  gs->qlim_min = p.causal ? t.qmin + t.shift : INT_MAX;
  gs->nkeys = t.nkeys;
}

// Where the epilogue writes the tile's o and lse.
template <typename T>
__device__ __forceinline__ OutRows tile_out_rows(const FwdParams& p, const FwdTileSetup& t, const int2* sRow) {
  OutRows out;
  out.og = static_cast<T*>(p.o) + t.qoff;
  out.lseg = p.lse + (static_cast<int64_t>(t.w.b) * p.M + static_cast<int64_t>(t.w.br) * p.R) * p.Hq +
             static_cast<int64_t>(t.w.hk) * p.g;
  out.o_rstride = t.q_rstride;
  out.Hq = p.Hq;
  out.sRow = sRow;
  return out;
}

}  // namespace cuda
}  // namespace bsattn
