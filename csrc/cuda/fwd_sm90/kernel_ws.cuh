// The Hopper forward's 128-row tile with a producer warpgroup (D = 128; fwd_sm90/launch.cuh picks it): the math of
// kernel.cuh's overlapped schedule on 128-key tiles, with the gather taken off the MMA warps.
//
// One CTA = one tile of TM = 128 packed rows, 12 warps:
// - warps 8-11 only gather (KvGather with the 128-thread layout, registers given back with setmaxnreg): per KV tile,
//   the owner lanes' key walk, K into K stage t % KST (with its key indices and mask flags), then V into V stage
//   t % VST; each handed over through an mbarrier that completes once the copies have landed (cp_async_mbar_arrive)
//   and every producer thread has arrived (releasing its key indices and flags). A stage is reused once the
//   consumers have arrived on its empty barrier.
// - warps 0-7 are the two MMA warpgroups of kernel.cuh (rows 64 wg ..): per tile t, S(t) = Q K^T and O += P V(t - 1)
//   issued together, the softmax of t while P V(t - 1) runs; a K stage is released after S(t) and the mask (its key
//   indices) are done with, a V stage after P V. They never meet at a CTA barrier in the loop: in kernel.cuh every
//   thread issued the gather and met the others at one per tile.
// The warpgroups' epilogue is kernel.cuh's, after a barrier among the 256 consumer threads (each warp stages its rows
// in the Q tile, which the other warpgroup may still be reading).
//
// Phases: tile t's K stage is t % KST, its phase (t / KST) & 1 (V alike); the empty barriers count the consumer
// threads of the warpgroups holding real rows (a warpgroup of pure padding skips the loop and never arrives).
//
// Measured (H200, 2026-11-30, forward alone through the API, M = N = 8192, Hq = 32, density 1/4): 456-471 useful
// TFLOP/s at R * g >= 128 (0.586-0.604 ms) against 416-427 (0.644-0.661) for kernel.cuh's tile (two CTAs of two
// warpgroups per SM, 64-key tiles, every thread gathering), whatever C (1, 16, 64, 128). Tried and dropped: the two
// warpgroups taking turns at issuing their products (FlashAttention-3's pingpong, by named barriers): within 1 %.
// Also dropped (session 25, branch wip/fwd-persistent): a persistent form, one CTA per SM taking items from a counter,
// the producer loading each item's Q and gathering its first KV tile under the item before: correct and 8-12 % slower
// (4:128:128 0.639 against 0.590 ms in its final form), 7-10 % with one item per CTA; not explained
// (csrc/cuda/dev/NOTES.md, session 25).
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/common/wgmma.cuh"
#include "cuda/fwd/epilogue.cuh"
#include "cuda/fwd/gather_kv.cuh"
#include "cuda/fwd/mma.cuh"
#include "cuda/fwd/params.h"
#include "cuda/fwd/softmax.cuh"
#include "cuda/fwd/tile_setup.cuh"
#include "cuda/fwd_sm90/config.cuh"
#include "cuda/fwd_sm90/row_split.cuh"
#include "cuda/fwd_sm90/shared.cuh"

namespace bsattn {
namespace cuda {

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::NT, 1) bsattn_fwd_sm90_ws_kernel(const __grid_constant__ FwdParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = Cfg::D, BN = Cfg::BN, TM = Cfg::TM, KST = Cfg::KST, VST = Cfg::VST, NTC = Cfg::NTC;
  using QLayout = AtomSwizzle<D, TM>;
  using KvLayout = AtomSwizzle<D, BN>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;

  // ---- which tile, which rows ----------------------------------------------------------------
  FwdTileSetup ts;
  if (!fwd_tile_setup<D, TM, BN>(p, ts)) return;  // (uniform) a split past the last query row
  const int ntiles = ts.ntiles, rows_valid = ts.rows_valid;

  // ---- shared memory: Q, K stages, V stages (1024-byte aligned), tables, mbarriers, mask flags --------------
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
  const uint32_t bar0 = sQ + Cfg::Q_BYTES + Cfg::KV_BYTES + Cfg::TAB_BYTES;
  const uint32_t full_k = bar0, empty_k = full_k + KST * 8, full_v = empty_k + KST * 8, empty_v = full_v + VST * 8;
  int* sFlag = reinterpret_cast<int*>(smem + Cfg::Q_BYTES + Cfg::KV_BYTES + Cfg::TAB_BYTES + Cfg::BAR_BYTES);

  // ---- prologue: barriers, the Q tile and row tables (consumers), the walk state (producer) -----------------
  const int nact = rows_valid > 64 ? 2 : 1;  // warpgroups with real rows (rows_valid > 0 here)
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < KST; ++s) {
      mbar_init(full_k + 8 * s, 128);
      mbar_init(empty_k + 8 * s, 128 * nact);
    }
#pragma unroll
    for (int s = 0; s < VST; ++s) {
      mbar_init(full_v + 8 * s, 128);
      mbar_init(empty_v + 8 * s, 128 * nact);
    }
    fill_gather_shared<BN>(p, ts, gs);
  }
  KvGather<T, Cfg, KvLayout> kv;
  if (tid < NTC) {
    const uint32_t dst[1] = {sQ};
    const T* const src[1] = {static_cast<const T*>(p.q) + ts.qoff};
    load_packed_tile<D, TM, NTC, 1, QLayout>(dst, src, ts.row0, rows_valid, p.g, ts.q_rstride, tid);
    cp_async_commit();
    fill_row_tables<TM, NTC>(p, ts, sRow, sLim, tid);
    cp_async_wait<0>();
    fence_async_shared();  // the Q tile -> visible to wgmma after the barrier
  } else {
    kv.init(p, ts.idx, ts.len, sOwn, warp - 8, lane);
  }
  __syncthreads();  // barriers initialised, Q landed, tables and the gather's constants written

  if (warp >= 8) {
    // ---- producer warpgroup ------------------------------------------------------------------------------
    setmaxnreg_dec<Cfg::PRODUCER_REGS>();
    const int pw = warp - 8;
    const T* const kg = static_cast<const T*>(p.k) + gs->kvoff;
    const T* const vg = static_cast<const T*>(p.v) + gs->kvoff;
    for (int t = 0; t < ntiles; ++t) {
      const int ks = t % KST, vs = t % VST;
      if (t >= KST) mbar_wait(empty_k + 8 * ks, ((t / KST) - 1) & 1);
      int key;
      const uint32_t flag = kv.next_keys(p, *gs, sKidx, ks, pw, lane, key);
      const unsigned any = __ballot_sync(0xffffffffu, flag != 0);
      if (lane == 0) sFlag[ks * 4 + pw] = any != 0;
      kv.copy_rows(p, sK + ks * Cfg::KV_STAGE_BYTES, kg, key, pw, lane);
      cp_async_mbar_arrive(full_k + 8 * ks);
      mbar_arrive(full_k + 8 * ks);
      if (t >= VST) mbar_wait(empty_v + 8 * vs, ((t / VST) - 1) & 1);
      kv.copy_rows(p, sV + vs * Cfg::KV_STAGE_BYTES, vg, key, pw, lane);
      cp_async_mbar_arrive(full_v + 8 * vs);
      mbar_arrive(full_v + 8 * vs);
    }
    // (copies may still be in flight: the consumers' wait on the last V tile covers every earlier copy of each thread)
    return;
  }

  // ---- consumer warpgroups ------------------------------------------------------------------------------------
  setmaxnreg_inc<Cfg::CONSUMER_REGS>();
  const bool wg_active = wg * 64 < rows_valid;  // (uniform per warpgroup) skip 64 rows of pure padding
  Sm90FwdRows<T, Cfg> rows(sQ, sK, sV, wg);
  const int* const slim = sLim + warp * 16;
  // tile t's K landed (and its key indices, flags written): returns whether some row of it needs the mask
  auto wait_k = [&](int t) {
    const int ks = t % KST;
    mbar_wait(full_k + 8 * ks, (t / KST) & 1);
    fence_async_shared();
    const int* f = sFlag + ks * 4;
    return (f[0] | f[1] | f[2] | f[3]) != 0;
  };
  auto wait_v = [&](int t) {
    mbar_wait(full_v + 8 * (t % VST), (t / VST) & 1);
    fence_async_shared();
  };

  if (wg_active && ntiles > 0) {
    // Tile 0 alone, then per tile t: S(t) and P V(t - 1) issued together, the softmax of t while P V(t - 1) runs,
    // O rescaled once it has landed (Sm90FwdRows::overlapped_step).
    {
      const bool nm = wait_k(0);
      rows.qk_now(0);
      rows.probs(p, nm, sKidx, slim, lane);  // (o = 0: nothing to rescale)
      mbar_arrive(empty_k);
      rows.pack_p();
    }
    for (int t = 1; t < ntiles; ++t) {
      const int ks = t % KST, vs = (t - 1) % VST;
      const bool nm = wait_k(t);
      wait_v(t - 1);
      rows.overlapped_step(p, nm, ks, vs, sKidx + ks * BN, slim, lane, [&] { mbar_arrive(empty_k + 8 * ks); },
                           [&] { mbar_arrive(empty_v + 8 * vs); });
    }
    wait_v(ntiles - 1);
    rows.pv_now((ntiles - 1) % VST);  // the last tile's P V (no arrival: nothing waits for that stage any more)
  }

  // ---- epilogue -------------------------------------------------------------------------------
  const OutRows out = tile_out_rows<T>(p, ts, sRow);
  named_bar_sync(1, NTC);  // both warpgroups done reading Q: each warp stages its 16 rows there
  if (wg_active) {
    if (ts.part >= 0)  // (uniform) a piece of a split block row: f32 partials (row_split.cuh)
      store_rows_partial<Cfg>(rows.o, rows.m, rows.l, p, ts, warp * 16, lane);
    else
      store_rows_single<T, Cfg>(rows.o, rows.m, rows.l, sQ + warp * 16 * D * 2, out, warp * 16, lane);
  }
#endif
}

}  // namespace cuda
}  // namespace bsattn
