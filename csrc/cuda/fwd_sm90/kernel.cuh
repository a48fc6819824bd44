// The block-sparse attention forward kernel for Hopper (sm_90a): warpgroup MMA (wgmma), same work split,
// gather, softmax and epilogue as the mma.sync kernel (fwd/kernel.cuh), which it replaces on an H100 / H200 for
// tiles of 64 and 128 packed rows (D = 64, 128; 64 at D = 256). At D = 128 the 128-row tile runs kernel_ws.cuh
// instead (the same math with a producer warpgroup doing the gather), unless BSATTN_FWD_WS=0.
//
// One CTA = one tile of TM = 64 NWG packed rows of one block row; warpgroup wg owns rows [64 wg, 64 wg + 64):
//   1. load the packed Q tile; 2. walk the block row's gathered key sequence in KV tiles of BN rows, PF tiles
//      ahead (cp.async: fwd/gather_kv.cuh into the wgmma layout); per tile, S = Q K^T (wgmma, both from shared
//      memory), masked only when the tile needs it, the online softmax (fwd/softmax.cuh: the m64nN accumulator
//      of a warp is the m16n8 layout of its 16 rows), O += P V (wgmma, P from registers as the A operand);
//      with OVERLAP, the P V of tile t - 1 runs on the tensor cores during the softmax of tile t (config.cuh);
//   3. normalise and store o and lse (fwd/epilogue.cuh), each warp its 16 rows; a piece of a block row cut by the
//      row split (row_split.cuh: the CTA's item, its entries) stores them as f32 partials, combined after.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/fwd/epilogue.cuh"
#include "cuda/fwd/gather_kv.cuh"
#include "cuda/fwd/mma.cuh"
#include "cuda/fwd/params.h"
#include "cuda/fwd/softmax.cuh"
#include "cuda/fwd/tile_setup.cuh"
#include "cuda/fwd_sm90/config.cuh"
#include "cuda/fwd_sm90/row_split.cuh"
#include "cuda/fwd_sm90/shared.cuh"
#include "cuda/common/wgmma.cuh"

#ifndef BSATTN_FWD_TIMELINE_MARK
#define BSATTN_FWD_TIMELINE_MARK(k)
#endif

namespace bsattn {
namespace cuda {

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::NT, Cfg::MINB) bsattn_fwd_sm90_kernel(const __grid_constant__ FwdParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = Cfg::D, BN = Cfg::BN, TM = Cfg::TM, KST = Cfg::KST, VST = Cfg::VST, PF = Cfg::PF;
  using QLayout = AtomSwizzle<D, TM>;
  using KvLayout = AtomSwizzle<D, BN>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
  BSATTN_FWD_TIMELINE_MARK(0);

  // ---- which tile, which rows ----------------------------------------------------------------
  FwdTileSetup ts;
  if (!fwd_tile_setup<D, TM, BN>(p, ts)) return;  // (uniform) a split past the last query row
  const int ntiles = ts.ntiles, rows_valid = ts.rows_valid;

  // ---- shared memory (tiles 1024-byte aligned for the swizzle) ---------------------------------
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t pad = ((raw + 1023u) & ~1023u) - raw;
  uint8_t* smem = smem_raw + pad;
  const uint32_t sQ = raw + pad;
  const uint32_t sK = sQ + Cfg::Q_BYTES;
  const uint32_t sV = sK + KST * Cfg::KV_STAGE_BYTES;
  int* sKidx = reinterpret_cast<int*>(smem + Cfg::Q_BYTES + Cfg::KV_BYTES);
  int* sLim = sKidx + KST * BN;
  GatherShared* gs = reinterpret_cast<GatherShared*>(sLim + TM);
  int2* sOwn = reinterpret_cast<int2*>(gs + 1);
  int2* sRow = sOwn + BN;

  // ---- prologue: Q tile, CTA constants, then the first PF KV tiles -------------------------------
  {
    const uint32_t dst[1] = {sQ};
    const T* const src[1] = {static_cast<const T*>(p.q) + ts.qoff};
    load_packed_tile<D, TM, Cfg::NT, 1, QLayout>(dst, src, ts.row0, rows_valid, p.g, ts.q_rstride, tid);
  }
  BSATTN_FWD_TIMELINE_MARK(1);
  fill_row_tables<TM, Cfg::NT>(p, ts, sRow, sLim, tid);
  KvGather<T, Cfg, KvLayout> kv;
  kv.init(p, ts.idx, ts.len, sOwn, warp, lane);
  if (tid == 0) fill_gather_shared<BN>(p, ts, gs);
  __syncthreads();
  BSATTN_FWD_TIMELINE_MARK(2);

  // tile i goes to K stage i % KST, V stage i % VST; bit i of `pending`: this thread saw a row needing the mask
  // in the i-th tile not yet consumed
  auto issue = [&](int i) { return kv.issue(p, *gs, sK, sV, sKidx, i % KST, i % VST, warp, lane); };
  uint32_t pending = issue_prologue<PF + 1>(issue, ntiles);
  BSATTN_FWD_TIMELINE_MARK(3);

  // ---- per-warpgroup state ------------------------------------------------------------------------
  const bool wg_active = wg * 64 < rows_valid;  // (uniform per warpgroup) skip 64 rows of pure padding
  Sm90FwdRows<T, Cfg> rows(sQ, sK, sV, wg);
  const int* const slim = sLim + warp * 16;

  // ---- main loop ------------------------------------------------------------------------------
  // Per tile: wait for it to land, one barrier (which also means every warpgroup is done with the stages the
  // next issue overwrites), issue tile t + PF; returns whether some row of tile t needs the mask.
  auto next_tile = [&](int t) {
    const bool need_mask = tile_landed<PF - 1>(pending, fence_async_shared);
    if (t == 0) BSATTN_FWD_TIMELINE_MARK(4);
    if (t + PF < ntiles) pending |= issue(t + PF) << (PF - 1);
    cp_async_commit();
    return need_mask;
  };
  if constexpr (Cfg::OVERLAP) {
    // Tile 0 alone, then per tile t: S(t) and P V(t - 1) issued together, the softmax of t while P V(t - 1)
    // runs, O rescaled once it has landed. No branch around a wgmma inside the loop (ptxas would serialize
    // them).
    if (ntiles > 0) {
      const bool need_mask = next_tile(0);
      if (wg_active) {
        rows.qk_now(0);
        rows.probs(p, need_mask, sKidx, slim, lane);  // (o = 0: nothing to rescale)
        rows.pack_p();
      }
      for (int t = 1; t < ntiles; ++t) {
        const bool nm = next_tile(t);
        if (!wg_active) continue;
        const int kstage = t % KST;
        rows.overlapped_step(p, nm, kstage, (t - 1) % VST, sKidx + kstage * BN, slim, lane, [] {}, [] {});
      }
      if (wg_active) rows.pv_now((ntiles - 1) % VST);  // the last tile's P V
    }
  } else {
    for (int t = 0; t < ntiles; ++t) {
      const bool need_mask = next_tile(t);
      if (!wg_active) continue;
      const int kstage = t % KST;
      rows.qk_now(kstage);
      if (rows.probs(p, need_mask, sKidx + kstage * BN, slim, lane)) rows.rescale();
      rows.pack_p();
      rows.pv_now(t % VST);
    }
  }

  // ---- epilogue -------------------------------------------------------------------------------
  BSATTN_FWD_TIMELINE_MARK(5);
  const OutRows out = tile_out_rows<T>(p, ts, sRow);
  // Each warp stages its 16 rows in the Q tile (rows 16 warp .. of the row-major view): after the barrier no
  // warpgroup reads Q any more.
  cp_async_wait<0>();
  __syncthreads();
  BSATTN_FWD_TIMELINE_MARK(6);
  if (wg_active) {
    if (ts.part >= 0)  // (uniform) a piece of a split block row: f32 partials (row_split.cuh)
      store_rows_partial<Cfg>(rows.o, rows.m, rows.l, p, ts, warp * 16, lane);
    else
      store_rows_single<T, Cfg>(rows.o, rows.m, rows.l, sQ + warp * 16 * D * 2, out, warp * 16, lane);
  }
  BSATTN_FWD_TIMELINE_MARK(7);
#endif
}

}  // namespace cuda
}  // namespace bsattn
