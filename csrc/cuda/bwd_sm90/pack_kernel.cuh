// The Hopper one-pass backward for small blocks (C <= 16, where bwd/params.h bwd_sm90_applies takes it): dq, dk and
// dv in one column-oriented pass on wgmma, dq added to the float32 workspace, as kernel.cuh, but one CTA holds
// P = 64 / C consecutive block columns c0 .. c0 + P - 1 (their 64 keys are contiguous) of one (batch, KV head) and
// walks the merge of their row lists.
//
// Why: a block column of C <= 16 keys would fill a quarter (C = 16) to a sixty-fourth (C = 1) of the 64-key wgmma
// tile. Packed, a gathered tile of 64 query rows serves all P columns at once, and only the (row, key) pairs whose
// column the row does not list are wasted: at density 1/4 that is three quarters of the products, but on wgmma, five
// products a tile instead of the pair's seven on mma.sync, and no per-key gather.
//
// The merge is built window by window of W block rows. One thread per column walks the column's entries of the
// window (its list is increasing, so they are a prefix of what is left), eight loads at a time, and sets the column's
// bit in the word of each listed block row (shared-memory atomicOr: order-independent); the block rows with any bit
// set are then compacted in order. The window's rows are walked as packed query rows (R * g per block row) in tiles
// of 64; each staged row carries its window entry, and p^T of a key whose column's bit is clear is 0
// (dkv_probs_ds kMulEntryBit). A block listed twice in a row (a duplicate index counts twice) takes a second pass over
// the window, pass k holding the k-th occurrences, so any multiplicity comes out exact.
//
// dk and dv stay deterministic (registers, fixed order, written once); dq is added with float atomics (not
// bitwise repeatable), so `deterministic=True` selects the pair, as for kernel.cuh.
#pragma once

#include <climits>
#include <cstdint>

#include "cuda/bwd/common.cuh"
#include "cuda/bwd/dkdv_kernel.cuh"
#include "cuda/bwd/params.h"
#include "cuda/bwd_sm90/config.cuh"
#include "cuda/bwd_sm90/tile.cuh"
#include "cuda/common/gather.cuh"
#include "cuda/common/wgmma.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

// GATED: launched behind the sweep form (launch.cuh launch_bwd_sm90_sweep), it runs only where the layout has a
// duplicate block (*p.sweep_dup != 0).
template <typename T, class Cfg, bool GATED = false>
__global__ void __launch_bounds__(Cfg::NT, Cfg::MINB) bsattn_bwd_sm90_pack_kernel(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = Cfg::D, BK = Cfg::BK, BQ = Cfg::BQ, S = Cfg::STAGES, W = Cfg::W, NT = Cfg::NT;
  constexpr int NQ8 = BQ / 8, DT = D / 8, DQN = Cfg::DQN, DQT = DQN / 8, MAXC = Cfg::MAX_COLS;
  using Map = typename Cfg::QMap;
  static_assert(NT == 128 && W % NT == 0 && W <= 65536, "window layout");
  extern __shared__ __align__(1024) uint8_t smem_raw[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if constexpr (GATED) {
    if (*reinterpret_cast<const volatile int*>(p.sweep_dup) == 0) return;  // (uniform)
  }

  // ---- which columns (bwd/common.cuh column_group; p.pack = 64 / C) --------------------------------------
  const ColumnGroup grp = column_group<D>(p, blockIdx.x);
  const int hk = grp.hk, c0 = grp.c0, Pv = grp.Pv, k0 = grp.k0, nkeys = grp.nkeys, nlive = grp.nlive;
  const int kend = k0 + nlive;  // (keys past kv_lens: masked, their columns' lists left empty)
  const int64_t lid = grp.lid, kvoff = grp.kvoff, kv_rstride = grp.kv_rstride, qboff = grp.qboff;
  const int RG = p.R * p.g, C = p.C;
  const int E = RG > 0 ? RG : 1;

  // ---- shared memory: the tile's (tile.cuh Sm90Smem), then the window's (config.cuh Sm90BwdPackTile) ------
  const Sm90Smem<Cfg, 1> sm(smem_raw);
  uint8_t* const xb = sm.base + Cfg::EXTRA_OFF;
  int* const sEnt = reinterpret_cast<int*>(xb);  // [S][BQ] window entry of each staged row (W: none)
  unsigned long long* const bits = reinterpret_cast<unsigned long long*>(xb + Cfg::ENT_BYTES);  // [W + 1]
  uint16_t* const lbr = reinterpret_cast<uint16_t*>(bits + W + 1);  // [W] merged list: block row - win0
  int* const sCur = reinterpret_cast<int*>(lbr + W);  // [MAXC] first entry of each column's list in the window
  int* const sEnd = sCur + MAXC;                       // [MAXC] end of each column's list
  int* const sAdv = sEnd + MAXC;                       // [MAXC] entries of each column in the window
  int* const sNext = sAdv + MAXC;                      // [MAXC] its first block row past the window (INT_MAX: none)
  int* const sScan = sNext + MAXC;                     // [4] compaction scan
  int* const sWin = sScan + 4;                         // the window's first block row (INT_MAX: done)
  int* const sMore = sWin + 1;                         // the window needs another pass (a duplicate)

  // ---- prologue: column ranges, K, V ------------------------------------------------------------------
  for (int l = tid; l < Pv; l += NT) {
    int64_t cs, ce;
    column_entries(p, lid, c0 + l, cs, ce);
    if (RG == 0 || l * C >= nlive) ce = cs;  // Hq = 0, or a column past the key count (kv_lens): nothing to walk
    sCur[l] = static_cast<int>(cs);
    sEnd[l] = static_cast<int>(ce);
    sNext[l] = ce > cs ? max(__ldg(p.col_rows + lid * p.nnz + cs), 0) : INT_MAX;
  }
  if (tid == 0) bits[W] = 0ull;  // entry W: a missing row, no column listed
  {
    const T* kg = static_cast<const T*>(p.k) + kvoff + k0 * kv_rstride;
    const T* vg = static_cast<const T*>(p.v) + kvoff + k0 * kv_rstride;
    load_row_pair_tile<D, NT, BK, typename Cfg::KLayout>(sm.sK, sm.sV, kg, vg, nlive, kv_rstride, tid);
    cp_async_commit();  // its own group: older than every tile's, so the first tile's wait covers it
  }

  const bool owner = lane < Map::OWN;
  const int trow_own = Map::owner_row(warp, lane);
  const int qE = BQ / E, rE = BQ - (BQ / E) * E;
  const bool one_entry = E % BQ == 0;  // R * g a multiple of 64: a tile never spans two block rows
  const T* qg = static_cast<const T*>(p.q) + qboff * D;
  const T* dg = static_cast<const T*>(p.dout) + qboff * D;
  const float* lseg = p.lse + qboff;
  const float* dlg = p.delta + qboff;
  const int hq0 = hk * p.g, shift = p.causal_shift(grp.b);
  const int32_t* rows = p.col_rows + lid * p.nnz;

  // ---- per-thread state ----------------------------------------------------------------------------------
  int key[2], col[2];  // keys of the thread's two accumulator rows; their columns (CTA-local: bit in a row's word)
  fragment_row_keys(k0 + warp * 16, lane, key);
#pragma unroll
  for (int h = 0; h < 2; ++h) col[h] = min((key[h] - k0) / C, 63);  // (a padding key's is clear or masked anyway)
  float adk[DT][4], adv[DT][4];
  dkv_init<Cfg>(adk, adv);
  float(&dkf)[D / 2] = reinterpret_cast<float(&)[D / 2]>(adk);
  float(&dvf)[D / 2] = reinterpret_cast<float(&)[D / 2]>(adv);
  float s[NQ8][4], dp[NQ8][4], dq[DQT][4];
  float(&sf)[BQ / 2] = reinterpret_cast<float(&)[BQ / 2]>(s);
  float(&dpf)[BQ / 2] = reinterpret_cast<float(&)[BQ / 2]>(dp);
  float(&dqf)[DQN / 2] = reinterpret_cast<float(&)[DQN / 2]>(dq);
  const float s_mul = p.s_mul, cap_mul = p.cap_mul;
  const bool use_cap = p.use_cap != 0;
  float* const dq_acc = p.dq_accum + qboff * D + 2 * (lane & 3);

  const Sm90TileOps<T, Cfg> ops(sm.sK, sm.sV, sm.sQ, sm.sD, sm.sDS, 0, warp, lane);

  int win0 = -W;
  while (true) {
    // ---- next window: the first W-aligned one at or after the smallest next block row, past the last one ----
    __syncthreads();  // column cursors up to date; the previous window's tiles are done with its list
    if (warp == 0) {
      int nx = INT_MAX;
      if (lane < Pv) nx = sNext[lane];
      if (lane + 32 < Pv) nx = min(nx, sNext[lane + 32]);
      const int w0 = next_window(nx, win0, W, p.MB);
      if (lane == 0) *sWin = w0;
    }
    __syncthreads();
    win0 = *sWin;
    if (win0 == INT_MAX) break;  // (uniform)

    for (int pass = 0;; ++pass) {
      for (int i = tid; i < W; i += NT) bits[i] = 0ull;
      if (tid == 0) *sMore = 0;
      __syncthreads();
      // ---- mark: thread l walks column l's entries below wend, 8 loads at a time; its occ-th occurrence of a block
      // row (occ = pass) sets bit l of the row's word ------------------------------------------------------------
      if (tid < Pv) {
        const int wend = min(win0 + W, p.MB);
        const int l = tid, cur = sCur[l];
        const int lim = min(sEnd[l], cur + min(sEnd[l] - cur, kMaxWindowEntries));
        int a = cur, prev = INT_MIN, occ = 0, stop = INT_MAX;
        bool more = false, done = false;
        while (!done) {
          int v[8];
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = a + i < lim ? __ldg(rows + a + i) : INT_MAX;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            if (done) continue;
            if (v[i] >= wend) {  // the first entry past the window (INT_MAX: the list's end)
              done = true;
              stop = v[i];
              continue;
            }
            occ = v[i] == prev ? occ + 1 : 0;
            prev = v[i];
            ++a;
            if (v[i] < win0) continue;  // (an unsorted hand-made list: skipped)
            more |= occ > pass;
            if (occ == pass) atomicOr(bits + (v[i] - win0), 1ull << l);
          }
          if (a >= lim) done = true;
        }
        if (pass == 0) {
          sAdv[l] = a - cur;
          sNext[l] = a < sEnd[l] ? max(stop == INT_MAX ? __ldg(rows + a) : stop, 0) : INT_MAX;
        }
        if (more) *sMore = 1;
      }
      __syncthreads();
      // ---- compact the window's listed block rows, in order, in place
      const int len = compact_listed_rows<W, NT, 4>(bits, lbr, sScan, tid, lane, warp);

      // ---- the window's tiles: its merged rows as a virtual sequence of packed query rows -------------------
      const int ntiles = static_cast<int>((static_cast<int64_t>(len) * E + BQ - 1) / BQ);
      WindowRowCursor cur_row;
      cur_row.init(trow_own, E);
      auto issue = [&](int stage) -> uint32_t {
        int rid = -1;  // row of q in units of D within batch b: qi * Hq + h
        if (owner) {
          int lim = INT_MAX, e = W;
          if (cur_row.query_row(p, len, win0, lbr, hq0, shift, rid, lim)) e = cur_row.ent;
          const int srow = stage * BQ + trow_own;
          stage_row_stats(sm.sLse, sm.sDl, srow, lseg, dlg, rid);
          sm.sLim[srow] = lim;
          sm.sRid[srow] = rid;
          sEnt[srow] = e;
        }
        cur_row.advance(qE, rE, E);
        copy_row_pair_tile<D, Map::PASSES, Map::RPP, Map::RPW, false, typename Cfg::QLayout>(
            sm.sQ + stage * Cfg::Q_STAGE, sm.sD + stage * Cfg::Q_STAGE, qg, dg, rid, D, warp, lane,
            [](int rp) { return rp >= 0; });
        return 0u;
      };
      (void)issue_prologue<S>(issue, ntiles);

      for (int t = 0; t < ntiles; ++t) {
        const int stage = t % S;
        cp_async_wait<S - 2>();
        fence_async_shared();  // landed copies -> visible to wgmma after the barrier
        __syncthreads();       // also: every warp is done with the stage the next issue overwrites, and with dS

        ops.scores(sf, dpf, stage, [&] {
          if (t + S - 1 < ntiles) issue((t + S - 1) % S);
          cp_async_commit();
        });

        // p^T, ds^T weighed by the (row, column) multiplicity; dv += p^T do, dk += ds^T q; dS to shared memory
        uint32_t pa[BQ / 16][4], da[BQ / 16][4];
        const int rb = stage * BQ + (lane & 3) * 2;
        if (one_entry) {  // (uniform) every row of the tile is of one block row: one multiplicity per key
          const unsigned long long w = bits[sEnt[stage * BQ]];  // row 0: valid if any row is
          int mul[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) mul[h] = static_cast<int>((w >> col[h]) & 1u);
          sm90_probs_ds<T, BQ, kMulPerKey>(s, dp, sm.fLse, sm.fDl, sm.sLim, rb, true, key, kend, nlive < BK, s_mul,
                                           cap_mul, use_cap, pa, da, nullptr, nullptr, &mul);
        } else {
          sm90_probs_ds<T, BQ, kMulEntryBit>(s, dp, sm.fLse, sm.fDl, sm.sLim, rb, true, key, kend, nlive < BK, s_mul,
                                             cap_mul, use_cap, pa, da, bits, sEnt, &col);
        }
        ops.dv_dk(dvf, dkf, pa, da, stage);
        ops.store_ds(sm.sDS, 0, da);
        fence_async_shared();
        __syncthreads();  // dS complete (dk, dv may still be running)

        // dq of the tile's rows = dS K (queued behind dk, dv), added to dq_accum
        ops.dq(dqf, 0);
        wgmma_wait<0>();
        fence_regs(dkf);
        fence_regs(dvf);
        fence_regs(dqf);
        sm90_dq_rows_red<Cfg>(dq, sm.sRid + stage * BQ + warp * 16, dq_acc, lane);
      }
      if (*sMore == 0) break;  // (uniform: set before the compaction's barriers, cleared after the next one)
      __syncthreads();     // this pass's tiles are done with the list before the next pass rebuilds it
    }
    if (tid < Pv) sCur[tid] += sAdv[tid];  // (Pv <= 64 < NT)
  }

  // ---- epilogue: dk * scale, dv (bwd/dkdv_kernel.cuh; waits for every copy, K and V staged row-major per warp) --
  zero_dkdv_past(adk, adv, key, kend, nlive < nkeys);
  dkdv_store<T, Cfg>(sm.base, sm.sK, sm.sV, static_cast<T*>(p.dk) + kvoff + k0 * kv_rstride,
                     static_cast<T*>(p.dv) + kvoff + k0 * kv_rstride, kv_rstride, nkeys, warp * 16, 0,
                     warp * 16 < nkeys, p.scale, adk, adv);
#endif
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
