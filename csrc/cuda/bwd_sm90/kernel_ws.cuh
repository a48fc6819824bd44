// The Hopper backward's two-warpgroup tile (D = 128, block columns of at least 128 keys; bwd_sm90/launch.cuh), with
// a third, producer warpgroup that does the q / do gather, in a persistent CTA: the kernel that runs there by default.
//
// The math per tile is kernel.cuh's (s^T, dp^T; p^T, ds^T; dv, dk; dS -> shared memory; dq = dS K), on 128 keys: two
// MMA warpgroups of 64 keys each, and after the dS barrier warpgroup w computes dq's columns 64 w .. 64 w + 63 over
// all 128 keys. What differs:
// - Warps 0-3 only gather (ColumnQueryGather, 128 threads, registers given back with setmaxnreg), STAGES tiles ahead,
//   and hand each tile over through an mbarrier; warps 4-11 (232 registers) only compute. In kernel.cuh the MMA warps
//   issued the gather themselves and met it at a CTA barrier every tile (26 % of their stall samples on the H200).
// - The consumers meet only at the dS barrier (a named barrier among them), so dS is double-buffered: a warpgroup may
//   store tile t + 1's half while the other still reads tile t's in its dq product.
// - dq (DQ_MAP, where R * g is a multiple of 64 and g divides 64) goes to dq_accum by two tensor-map reductions per
//   warpgroup and tile, from a swizzled staging box; otherwise by one bulk reduction per row, as kernel.cuh.
// - Persistent: one CTA per SM takes work items (a key tile of a block column of one (b, hk); bwd/common.cuh
//   column_work, in the chunked longest-first order) one after the other. The first is blockIdx.x, the next ones come
//   from an atomic counter (`sched`, the word after dq_accum's elements, zeroed with them), claimed once the previous
//   item's last tile is issued, so the order stays close to the greedy one of hardware dispatch. Between two items
//   the producer gathers the next item's first tile while the consumers finish the previous one, and loads the next
//   K / V while they write the previous dk / dv (staged in the dq staging area). At g = 1 (15.5 waves of short items
//   at 128 x 128) this was 0.1-0.8 % faster than one CTA per item, 1-3 % at g = 4 (H200, 2026-11-30).
//
// Per stage s: full[s] (128 producer arrivals: each producer thread, after its copies of the tile have landed and
// been fenced to the async proxy, and after its plain stores of the rows' statistics) and empty[s] (256 arrivals: each
// consumer thread after its last read of the stage: s / dp / dk / dv products waited, the rows' statistics and
// global rows read). Tiles are numbered across items (`done`): tile u uses stage u % S, phase u / S, dS buffer u % 2.
// Per item n: the producer issues the item's first tile (stages permitting), then waits for item_empty (256
// arrivals: each consumer thread once its products of item n - 1 are done, K, V no longer read), posts the item
// index in shared memory, arrives on item_full (count 1, parity n & 1), loads K / V and gathers the rest. Every
// producer thread waits every item_empty phase in order, and they meet (named barrier 4) before the leader posts the
// next item, so the barrier is never two phases ahead of a wait. An index >= items ends the loop of both roles.
//
// HANG_MARK sites (common/hang_watch.cuh; a debug build only), the values after each: producer 1 item read (n, item),
// 2 stage wait (u, stage), 3 item_empty wait (n, tiles or -1); consumer 10 item_full wait (n, done), 11 item's work
// (item, tiles or -1), 16 item without tiles (item, done), 12 full wait (u, t), 13 dS barrier (u, t), 14 dq box
// barrier (u, t), 15 dk / dv store (item, done); 99 exit.
//
// Measured and dropped (csrc/cuda/bwd/README.md): s of tile t + 1 issued under tile t's dq reduction (ptxas
// serialises the wgmmas for want of registers: 17 % slower); K, V loaded by the consumers while the producer starts
// the gather (1 % slower).
#pragma once

#include <climits>
#include <cstdint>

#include <cuda.h>

#include "cuda/bwd/common.cuh"
#include "cuda/bwd/dkdv_kernel.cuh"
#include "cuda/bwd/params.h"
#include "cuda/bwd/column_split.cuh"
#include "cuda/bwd_sm90/config.cuh"
#include "cuda/bwd_sm90/tile.cuh"
#include "cuda/common/gather.cuh"
#include "cuda/common/hang_watch.cuh"
#include "cuda/common/wgmma.cuh"
#include "cuda/fwd/mma.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

// The consumers' configuration is the two-warpgroup tile's (Cfg::NT = 256 consumer threads), with 2 stages and a
// second dS buffer; + one producer warpgroup and the item slot.
struct Sm90BwdWsTile : Sm90BwdCfg<128, 2, 1, 2> {
  static constexpr int NT_ALL = NT + 128;
  // setmaxnreg moves registers within the CTA's launch allocation (384 x 168 = 64512): the consumers' increase must
  // be covered by what the producer gives back, or it blocks forever. The producer's item loop needs more than 24
  // registers (24: 32 bytes of spills; 32: 24, per item, outside the tile loop); the consumers fit in 232 (no spills,
  // no wgmma serialisation).
  static constexpr int LAUNCH_REGS = 168, PRODUCER_REGS = 32, CONSUMER_REGS = 232;
  using PMap = TileMap<D, 128, BQ>;                               // the producer's gather layout
  static constexpr int TILE_WS = TILE_BYTES + DS_BYTES;           // + the second dS buffer
  static constexpr int BAR_OFF = TILE_WS + ROW_BYTES;             // full[S], empty[S] (8 bytes each), flags[S][4]
  static constexpr int ITEM_OFF = BAR_OFF + 2 * STAGES * 8 + STAGES * 4 * 4;  // item_full, item_empty, 2 indices
  static constexpr int SMEM_WS = 1024 + ITEM_OFF + 2 * 8 + 8;
  static_assert(SMEM_WS <= 227 * 1024, "shared memory per CTA");
  static_assert(ROW_BYTES % 8 == 0 && ITEM_OFF % 8 == 0, "mbarrier alignment");
  static_assert(128 * PRODUCER_REGS + NT * CONSUMER_REGS <= NT_ALL * LAUNCH_REGS, "register reallocation");
  static_assert(LAUNCH_REGS == 65536 / NT_ALL / 8 * 8, "launch registers per thread");
  static constexpr int DQ_BOX_BYTES = BQ * 32 * 4;  // a tensor-map box: BQ rows x 32 columns of f32
  static_assert(WG * 2 * DQ_BOX_BYTES <= DQ_BYTES && DQN == 64, "dq staging boxes: two per warpgroup");
};

// The sweep form (SWEEP): + per staged row its block row's two bit words of the item's columns, and the (constant)
// entry of each staged row in them (dkv_probs_ds kMulEntryBit reads sW[sEnt[row]]).
struct Sm90BwdSweepTile : Sm90BwdWsTile {
  static constexpr int WORD_OFF = (ITEM_OFF + 2 * 8 + 8 + 15) / 16 * 16;
  static constexpr int ENT_OFF = WORD_OFF + STAGES * BQ * 16;
  static constexpr int SMEM_SWEEP = 1024 + ENT_OFF + STAGES * BQ * 4;
  static_assert(SMEM_SWEEP <= 227 * 1024, "shared memory per CTA");
};

// dk * scale and dv of consumer warp cw's 16 keys (krow0 = 16 cw ..), between items: staged through the warp's 4 KB
// of the dq staging area (K and V are being reloaded), one tensor after the other, once the previous tile's dq
// reduction has read that area (DQ_MAP: the warpgroup's boxes, read by its leader's tensor reduction; else the warp's
// staging rows, read by its lanes' bulk reductions). The next tile writes the area only after the warpgroup's (warp's)
// barrier before its dq staging, which every warp reaches after this.
template <typename T, class Cfg, bool DQ_MAP>
__device__ __forceinline__ void ws_dkdv_store(uint32_t sDQ, T* dkg, T* dvg, int64_t rstride, int nkeys, int cw,
                                              int lane, float scale, const float (&adk)[Cfg::D / 8][4],
                                              const float (&adv)[Cfg::D / 8][4]) {
  constexpr int D = Cfg::D;
  // each warp's 16 rows of D b16: DQ_MAP, inside its own warpgroup's two boxes (the other warpgroup's leader may be
  // reducing from its own); else inside the warp's own staging rows
  static_assert(4 * 16 * D * 2 <= 2 * Cfg::DQ_BOX_BYTES, "dk / dv staging within the warpgroup's boxes");
  static_assert(16 * D * 2 <= 16 * Cfg::DQ_PITCH && (Cfg::NT / 32) * 16 * Cfg::DQ_PITCH <= Cfg::DQ_BYTES,
                "dk / dv staging within the warp's dq rows");
  uint32_t stage;
  if constexpr (DQ_MAP) {
    if ((cw & 3) == 0 && lane == 0) bulk_wait_read<0>();
    named_bar_sync(2 + (cw >> 2), 128);
    stage = sDQ + cw * 16 * D * 2;  // inside the warpgroup's two boxes
  } else {
    if (lane < 16) bulk_wait_read<0>();
    __syncwarp();
    stage = sDQ + cw * 16 * Cfg::DQ_PITCH;  // the warp's staging rows
  }
  store_warp_rows<T, D>(stage, dkg, rstride, nkeys, cw * 16, lane, scale, adk);
  store_warp_rows<T, D>(stage, dvg, rstride, nkeys, cw * 16, lane, 1.f, adv);
}

// DQ_MAP (g dividing BQ, and R * g a multiple of BQ: every tile is BQ / g query rows x the g heads of one block row;
// or, SWEEP, R * g dividing BQ: a tile is BQ / (R * g) consecutive block rows, its box at the first one's first row):
// dq goes to dq_accum by two tensor-map reductions per warpgroup and tile (dq_map: dq_accum as [B, M, Hq, D] f32,
// boxes of 32 columns x g heads x BQ / g rows, 128-byte swizzle; rows past M are clipped by the hardware), from a
// per-warpgroup staging box, instead of one bulk reduction per row (16 per warp, which the compiler issues one lane
// at a time: UBLKRED takes uniform operands). 5-6 % faster at 128 x 128 on the H200 (1.870 against 1.979 ms, g = 4).
//
// SWEEP (Cfg = Sm90BwdSweepTile, p as launch_bwd_sm90_sweep sets it): the items are 128 contiguous keys (p.C = 128),
// every block row is walked (p.col_rows: 0 .. MB - 1), and p is masked by the layout's bit per (block row, column), the
// producer staging each row's two words of the item's columns; a CTA does nothing when the layout has a duplicate
// block (*p.sweep_dup: the packed kernel then runs instead).
template <typename T, class Cfg, bool DQ_MAP, bool SWEEP = false>
__global__ void __launch_bounds__(Cfg::NT_ALL, 1)
    bsattn_bwd_sm90_ws_kernel(const __grid_constant__ Params p, const __grid_constant__ CUtensorMap dq_map,
                               unsigned* sched, int items HANG_PARAM) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = Cfg::D, BK = Cfg::BK, BQ = Cfg::BQ, S = Cfg::STAGES, DQN = Cfg::DQN;
  constexpr int NQ8 = BQ / 8, DQT = DQN / 8;
  extern __shared__ __align__(1024) uint8_t smem_raw[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if constexpr (SWEEP) {
    if (*reinterpret_cast<const volatile int*>(p.sweep_dup) != 0) return;  // (uniform)
  }

  // ---- shared memory (tile.cuh Sm90Smem: two dS buffers; then the mbarriers, flags and the item slot) ------
  const Sm90Smem<Cfg, 2> sm(smem_raw);
  uint8_t* smem = sm.base;
  const uint32_t bar_full = sm.sK + Cfg::BAR_OFF, bar_empty = bar_full + S * 8;
  int* sFlag = reinterpret_cast<int*>(smem + Cfg::BAR_OFF + 2 * S * 8);  // [S][4]: a producer warp saw a masked row
  const uint32_t item_full = sm.sK + Cfg::ITEM_OFF, item_empty = item_full + 8;
  volatile int* sItem = reinterpret_cast<volatile int*>(smem + Cfg::ITEM_OFF + 16);  // item n, for the consumers
  volatile int* sNext = sItem + 1;                                                     // for the producers

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      mbar_init(bar_full + 8 * s, 128);
      mbar_init(bar_empty + 8 * s, Cfg::NT);
    }
    mbar_init(item_full, 1);
    mbar_init(item_empty, Cfg::NT);
  }
  unsigned long long* sWord = nullptr;  // SWEEP: [S * BQ][2]
  int* sEnt = nullptr;                  // SWEEP: [S * BQ], 2 * row
  if constexpr (SWEEP) {
    sWord = reinterpret_cast<unsigned long long*>(smem + Cfg::WORD_OFF);
    sEnt = reinterpret_cast<int*>(smem + Cfg::ENT_OFF);
    for (int i = tid; i < S * BQ; i += Cfg::NT_ALL) sEnt[i] = 2 * i;
  }
  __syncthreads();  // the mbarriers initialised

  if (warp < 4) {
    // ---- producer warpgroup: per item, its first tile, then (once item n - 1 is done) its slot, K and V, and
    // the rest of the gather, S tiles ahead. With S = 2 the first tile overlaps only item n - 1's last tile; the
    // consumers' dk / dv stores cover the K / V load.
    setmaxnreg_dec<Cfg::PRODUCER_REGS>();
    int done = 0;                                // tiles gathered so far, over all items
    int next = static_cast<int>(blockIdx.x);     // the leader's: item n's index (claimed during item n - 1)
    for (int n = 0;; ++n) {
      if (tid == 0) *sNext = next;
      named_bar_sync(4, 128);  // the producers read item n's index after the leader wrote it
      const int item = *sNext;
      named_bar_sync(4, 128);  // ... before the leader writes the next one
      HANG_MARK(1, n, item);
      ColumnWork w;
      const bool work = item < items && column_work<D, BK, BQ, SWEEP>(p, w, item) && w.ntiles > 0;
      ColumnQueryGather<D, BQ, typename Cfg::PMap, typename Cfg::QLayout, T> qgat;
      // SWEEP: the item's block-row words start at its first key's column / 64
      const unsigned long long* bits =
          SWEEP && work ? p.sweep_bits + w.lid * p.MB * static_cast<int64_t>(p.sweep_nbw) : nullptr;
      const int wb = SWEEP && work ? (w.k0 / p.sweep_c) >> 6 : 0;
      auto issue = [&](int u) {  // the gather of tile u (a stage the consumers are done with)
        const int s = u % S;
        HANG_MARK(2, u, s);
        if (u >= S) mbar_wait(bar_empty + 8 * s, ((u / S) - 1) & 1);
        const uint32_t f = qgat.template issue<SWEEP>(p, sm.sQ + s * Cfg::Q_STAGE, sm.sD + s * Cfg::Q_STAGE, sm.sLse,
                                                      sm.sDl, sm.sLim, sm.sRid, s, warp, lane, bits, p.sweep_nbw, wb,
                                                      sWord);
        const unsigned any = __ballot_sync(0xffffffffu, f != 0);
        if (lane == 0) sFlag[s * 4 + warp] = any != 0;
        cp_async_commit();
      };
      if (work) {  // the first tile, while the consumers may still be on item n - 1
        qgat.init(p, p.col_rows + w.lid * p.nnz + w.cs, w.len, w.b, w.hk, w.k0 + w.nkeys - 1, w.qboff, warp, lane);
        issue(done);
      }
      // item n - 1 done (its K, V no longer read, its slot read): post item n, once every producer thread has seen
      // that phase complete (the barrier). The leader alone gates the next phase, and the consumers finish an item
      // with no tile (a key tile past kv_lens) at once: without the barrier a lagging producer warp could find
      // item_empty two phases on, where its parity names the current phase, and wait forever (session 45's hang).
      HANG_MARK(3, n, work ? w.ntiles : -1);
      if (n >= 1) {
        mbar_wait(item_empty, (n - 1) & 1);
        named_bar_sync(4, 128);
      }
      if (tid == 0) {
        *sItem = item;
        mbar_arrive(item_full);
      }
      if (item >= items) {
        HANG_MARK(99, n, done);
        return;
      }
      auto claim_next = [&] {  // item n + 1, once item n's last tile is issued (so that the counter stays greedy)
        if (tid == 0) next = static_cast<int>(gridDim.x + atomicAdd(sched, 1u));
      };
      if (!work) {  // (the consumers skip it alike)
        claim_next();
        continue;
      }
      {  // K, V of the item, handed over with the first tile (the wait below covers both groups)
        const T* kg = static_cast<const T*>(p.k) + w.kvoff + w.k0 * w.kv_rstride;
        const T* vg = static_cast<const T*>(p.v) + w.kvoff + w.k0 * w.kv_rstride;
        load_row_pair_tile<D, 128, BK, typename Cfg::KLayout>(sm.sK, sm.sV, kg, vg, live_keys(p, w.b, w.k0, w.nkeys),
                                                              w.kv_rstride, tid);
        cp_async_commit();
      }
      for (int t = 1; t < w.ntiles; ++t) {
        const int u = done + t;
        cp_async_wait<0>();  // tile u - 1 (and K, V): fence to the async proxy, hand it over
        fence_async_shared();
        mbar_arrive(bar_full + 8 * ((u - 1) % S));
        issue(u);
      }
      claim_next();  // (its latency under the last copies)
      cp_async_wait<0>();
      fence_async_shared();
      mbar_arrive(bar_full + 8 * ((done + w.ntiles - 1) % S));
      done += w.ntiles;
    }
  }

  // ---- consumer warpgroups ------------------------------------------------------------------------------------
  setmaxnreg_inc<Cfg::CONSUMER_REGS>();
  const int cw = warp - 4;               // consumer warp 0..7: keys 16 cw ..
  const int wg = cw >> 2, wl = cw & 3;   // warpgroup; warp in it (rows 16 wl .. of dq)
  const float s_mul = p.s_mul, cap_mul = p.cap_mul;
  const bool use_cap = p.use_cap != 0;

  const Sm90TileOps<T, Cfg> ops(sm.sK, sm.sV, sm.sQ, sm.sD, sm.sDS, wg, cw, lane);  // descriptors, dS store position
  const uint32_t sq = sm.sDQ + cw * 16 * Cfg::DQ_PITCH;  // this warp's dq staging rows

  int done = 0;  // tiles consumed so far, over all items
  for (int n = 0;; ++n) {
    HANG_MARK(10, n, done);
    mbar_wait(item_full, n & 1);
    const int item = *sItem;
    if (item >= items) break;
    ColumnWork w;
    const bool live = column_work<D, BK, BQ, SWEEP>(p, w, item);
    HANG_MARK(11, item, live ? w.ntiles : -1);
    if (!live || w.ntiles == 0) {
      mbar_arrive(item_empty);  // no K / V read; the slot is read
      HANG_MARK(16, item, done);
      if (live) {               // a column no row lists: dk = dv = 0
        float z[D / 8][4];
#pragma unroll
        for (int d = 0; d < D / 8; ++d)
#pragma unroll
          for (int e = 0; e < 4; ++e) z[d][e] = 0.f;
        if (w.part >= 0)
          store_split_partial<D>(p, w, cw * 16, lane, z, z);
        else
          ws_dkdv_store<T, Cfg, DQ_MAP>(sm.sDQ, static_cast<T*>(p.dk) + w.kvoff + w.k0 * w.kv_rstride,
                                      static_cast<T*>(p.dv) + w.kvoff + w.k0 * w.kv_rstride, w.kv_rstride, w.nkeys,
                                      cw, lane, 1.f, z, z);
      }
      continue;
    }
    const int b = w.b, hk = w.hk, k0 = w.k0, kend = k0 + live_keys(p, b, k0, w.nkeys), RG = w.RG;
    const int64_t lid = w.lid, cs = w.cs;
    int key[2];
    fragment_row_keys(k0 + cw * 16, lane, key);
    float adk[D / 8][4], adv[D / 8][4];
    dkv_init<Cfg>(adk, adv);
    float(&dkf)[D / 2] = reinterpret_cast<float(&)[D / 2]>(adk);
    float(&dvf)[D / 2] = reinterpret_cast<float(&)[D / 2]>(adv);
    float s[NQ8][4], dp[NQ8][4], dq[DQT][4];
    float(&sf)[BQ / 2] = reinterpret_cast<float(&)[BQ / 2]>(s);
    float(&dpf)[BQ / 2] = reinterpret_cast<float(&)[BQ / 2]>(dp);
    float(&dqf)[DQN / 2] = reinterpret_cast<float(&)[DQN / 2]>(dq);
    float* const dq_rows = p.dq_accum + w.qboff * D + wg * DQN;
    // SWEEP: this thread's keys' columns (bits of one of the two staged words: both keys lie in one 16-key group)
    int mulbit[2] = {0, 0}, wsel = 0;
    if constexpr (SWEEP) {
      const int wb = (k0 / p.sweep_c) >> 6;
#pragma unroll
      for (int h = 0; h < 2; ++h) mulbit[h] = (key[h] / p.sweep_c) & 63;
      wsel = min(max(((key[0] / p.sweep_c) >> 6) - wb, 0), 1);
    }

    for (int t = 0; t < w.ntiles; ++t) {
      const int u = done + t, stage = u % S;
      const uint32_t dsb = (u & 1) * Cfg::DS_BYTES;  // this tile's dS buffer
      HANG_MARK(12, u, t);
      mbar_wait(bar_full + 8 * stage, (u / S) & 1);
      const bool need_mask =
          (sFlag[stage * 4] | sFlag[stage * 4 + 1] | sFlag[stage * 4 + 2] | sFlag[stage * 4 + 3]) != 0;

      ops.scores(sf, dpf, stage, [] {});

      uint32_t pa[BQ / 16][4], da[BQ / 16][4];
      if constexpr (SWEEP)
        sm90_probs_ds<T, BQ, kMulEntryBit>(s, dp, sm.fLse, sm.fDl, sm.sLim, stage * BQ + (lane & 3) * 2, true, key,
                                           kend, kend < k0 + BK, s_mul, cap_mul, use_cap, pa, da, sWord + wsel, sEnt,
                                           &mulbit);
      else
        sm90_probs_ds<T, BQ>(s, dp, sm.fLse, sm.fDl, sm.sLim, stage * BQ + (lane & 3) * 2, need_mask, key, kend,
                             kend < k0 + BK, s_mul, cap_mul, use_cap, pa, da);
      ops.dv_dk(dvf, dkf, pa, da, stage);
      ops.store_ds(sm.sDS, dsb, da);
      fence_async_shared();
      HANG_MARK(13, u, t);
      named_bar_sync(1, Cfg::NT);  // both halves of dS stored (dk, dv may still be running)

      ops.dq(dqf, dsb);
      wgmma_wait<0>();
      fence_regs(dkf);
      fence_regs(dvf);
      fence_regs(dqf);
      // the item's last products are done: K and V may be reloaded (the producer also waits for the stage)
      if (t == w.ntiles - 1) mbar_arrive(item_empty);

      if constexpr (DQ_MAP) {
        mbar_arrive(bar_empty + 8 * stage);  // this thread is done with the stage (the epilogue reads none of it)
        const bool leader = wl == 0 && lane == 0;
        const uint32_t box = sm.sDQ + wg * 2 * Cfg::DQ_BOX_BYTES;
        if (leader) bulk_wait_read<0>();  // the previous tile's boxes have been read
        HANG_MARK(14, u, t);
        named_bar_sync(2 + wg, 128);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = wl * 16 + (lane >> 2) + 8 * h;
#pragma unroll
          for (int j = 0; j < DQT; ++j) {
            const int uu = (2 * (j & 3) + ((lane >> 1) & 1)) ^ (r & 7);
            st_shared_f32x2(box + (j >> 2) * Cfg::DQ_BOX_BYTES + r * 128 + uu * 16 + (lane & 1) * 8, dq[j][2 * h],
                            dq[j][2 * h + 1]);
          }
        }
        fence_async_shared();
        named_bar_sync(2 + wg, 128);
        if (leader) {
          const int64_t first = static_cast<int64_t>(t) * BQ;
          const int e = static_cast<int>(first / RG), off = static_cast<int>(first - static_cast<int64_t>(e) * RG);
          const int br = __ldg(p.col_rows + lid * p.nnz + cs + e);
          if (br >= 0 && br < p.MB) {
            const int qrow = br * p.R + off / p.g, head0 = hk * p.g;
            bulk_tensor_reduce_add_4d(&dq_map, box, wg * DQN, head0, qrow, b);
            bulk_tensor_reduce_add_4d(&dq_map, box + Cfg::DQ_BOX_BYTES, wg * DQN + 32, head0, qrow, b);
          }
          bulk_commit();
        }
      } else {
        sm90_dq_rows_reduce<Cfg>(dq, sq, sm.sRid + stage * BQ + wl * 16, dq_rows, lane);  // one per row
        mbar_arrive(bar_empty + 8 * stage);  // this thread is done with the stage
      }
    }
    done += w.ntiles;
    zero_dkdv_past(adk, adv, key, kend, kend < k0 + w.nkeys);

    // ---- the item's dk * scale, dv (through the dq staging area: K, V are being reloaded); a piece of a split
    // column: its f32 partial sums (column_split.cuh) --------------------------------------------------------
    if (w.part >= 0) {
      store_split_partial<D>(p, w, cw * 16, lane, adk, adv);
      continue;
    }
    HANG_MARK(15, item, done);
    ws_dkdv_store<T, Cfg, DQ_MAP>(sm.sDQ, static_cast<T*>(p.dk) + w.kvoff + k0 * w.kv_rstride,
                                  static_cast<T*>(p.dv) + w.kvoff + k0 * w.kv_rstride, w.kv_rstride, w.nkeys, cw, lane,
                                  p.scale, adk, adv);
  }
  if (DQ_MAP ? (wl == 0 && lane == 0) : lane < 16) bulk_wait<0>();
  HANG_MARK(99, 0, done);
#endif
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
