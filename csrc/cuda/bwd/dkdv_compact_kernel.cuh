// dk / dv for small blocks under tall block rows (C <= 2, R * g >= 256, head dim 128): the listed keys compacted.
//
// The packed kernel (dkdv_kernel.cuh) gives a 16-key tile P = 16 / C block columns and walks the merge of their row
// lists; at density 1/4 a visited block row lists about a quarter of those keys, so three quarters of every product
// is masked work. Here one CTA owns KR = 64 keys (P = 64 / C block columns) of one (batch, KV head) and keeps their
// dk and dv as float32 in shared memory. It walks the block rows that list any of its columns; for each, the listed
// columns' keys are compacted into groups of up to 16 (G = 16 / C whole columns), and each (block row, group) is a
// work unit: the group's 16 keys against the block row's R * g packed query rows, in tiles of BQ = 64 rows. Keys
// need no gather: every K / V row of the CTA sits in shared memory and ldmatrix takes a row address per lane.
//
// Per tile, 8 warps, one barrier:
//   phase 1, warp w: rows 8 w .. 8 w + 7 of the tile, all 16 keys: s^T = k q^T, dp^T = v do^T (k, v fragments in
//            registers for the unit), p^T and ds^T (bwd/common.cuh dkv_probs_ds), stored as b16 to an exchange tile
//   barrier (also: the next tile's rows have landed, the stage of the tile before is free)
//   phase 2, warp w: dk / dv columns 16 w .. 16 w + 15 of the 16 keys over all 64 rows: dv += p^T do, dk += ds^T q
// At a unit's last tile each thread adds its dk / dv elements to the float32 rows of their keys. Every element of
// dk / dv belongs to one warp (its columns) and, within a unit, to one thread (a key appears once in a unit: a
// column listed twice is one key with multiplicity 2, weighing p), and the units run in block-row order: the sums
// are in a fixed order, so dk and dv are bitwise repeatable. Keys of a group past its listed ones are computed on
// (key row 0's data) but never added.
//
// The unit list is built in shared memory one window of WR = 32 block rows at a time, from the column view: each
// column's entries in the window (a binary search from its cursor), the multiplicity of each (block row, column)
// counted by shared-memory integer atomics (order-independent), a 64-bit mask of listed columns per block row, the
// units in block-row order, and each unit's 16 key slots (computed once there, not by every thread at every unit: at
// R * g = 64 that per-thread setup took 39 % of the stall samples). Shared memory: 217 KB (one CTA per SM; beyond the
// 163 KB of an A100, where the packed kernel runs instead).
//
// Where it runs (bwd/launch.cuh): C <= 2 and R * g >= 256, where it measured faster than the packed kernel. A
// variant that gathered each tile once for all of a block row's groups (adding dk / dv at every tile) was slower
// wherever R * g >= 128: the per-step costs, not the gather, bound this kernel. See bwd/README.md.
#pragma once

#include <climits>
#include <cstdint>

#include "cuda/bwd/common.cuh"
#include "cuda/bwd/params.h"
#include "cuda/fwd/mma.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

template <int D_>
struct DkvCompactCfg {
  static constexpr int D = D_;
  static constexpr int KR = 64;     // key rows per CTA (P * C of them used)
  static constexpr int BQ = 64;     // packed query rows per tile
  static constexpr int STAGES = 3;  // one barrier per tile: tile t + 2 is issued while tile t is being used
  static constexpr int NWARPS = 8, NT = NWARPS * 32;
  static constexpr int WR = 32;        // block rows per window of the unit list
  static constexpr int RS = D * 2;     // bytes per K / V / q / do row
  static constexpr int DW = D / NWARPS;  // dk / dv columns per warp in phase 2
  static constexpr int ACC_PITCH = D + 4;  // floats per dk / dv row in shared memory
  static constexpr int X_ROW = BQ * 2;     // bytes per key row of an exchange tile (p^T or ds^T, b16)
  // shared memory layout (bytes)
  static constexpr int OFF_K = 0;
  static constexpr int OFF_V = OFF_K + KR * RS;
  static constexpr int OFF_Q = OFF_V + KR * RS;
  static constexpr int OFF_DO = OFF_Q + STAGES * BQ * RS;
  static constexpr int OFF_ACC = OFF_DO + STAGES * BQ * RS;   // [2: dk, dv][KR][ACC_PITCH] f32
  static constexpr int OFF_X = OFF_ACC + 2 * KR * ACC_PITCH * 4;  // [2: tile parity][2: p, ds][16][X_ROW]
  static constexpr int OFF_LSE = OFF_X + 4 * 16 * X_ROW;        // [STAGES][BQ] f32 raw lse
  static constexpr int OFF_DL = OFF_LSE + STAGES * BQ * 4;       // [STAGES][BQ] f32 raw delta
  static constexpr int OFF_LIM = OFF_DL + STAGES * BQ * 4;       // [STAGES][BQ] causal limit
  static constexpr int OFF_CNT = OFF_LIM + STAGES * BQ * 4;      // [WR][64] multiplicity of (block row, column)
  static constexpr int OFF_PM = OFF_CNT + WR * 64 * 4;           // [WR] u64: columns listed by the block row
  static constexpr int MAXG = 5;  // groups per block row: ceil(P / G) <= 5 for C <= 8
  static constexpr int OFF_UNIT = OFF_PM + WR * 8;               // [WR * MAXG] u16: block row | group << 8
  static constexpr int OFF_USLOT = OFF_UNIT + WR * MAXG * 2;     // [WR * MAXG][16] s8: each unit's key slots (-1: none)
  static constexpr int OFF_UDUP = OFF_USLOT + WR * MAXG * 16;    // [WR * MAXG] u8: a key listed twice or more
  static constexpr int OFF_MISC = OFF_UDUP + WR * MAXG;          // column cursors, ends, counts, offsets; scalars
  static constexpr int SMEM = OFF_MISC + (4 * 64 + 8) * 4;
  using QMap = TileMap<D, NT, BQ>;
  static_assert(D == 128 && DW == 16, "phase 2 gives each warp 16 columns of dk / dv");
  static_assert(WR <= 32, "unit list: one lane per block row of a window");
  static_assert(OFF_DO % 128 == 0 && OFF_ACC % 16 == 0 && OFF_PM % 8 == 0 && OFF_MISC % 4 == 0, "alignment");
};

// The sum of x over lanes 0 .. lane of the warp (whole warp).
__device__ __forceinline__ int warp_inclusive_sum(int x, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  return x;
}

// Position of the n-th (from 0) set bit of x, which has more than n.
__device__ __forceinline__ int select_bit32(uint32_t x, int n) {
  int pos = 0;
#pragma unroll
  for (int w = 16; w >= 1; w >>= 1) {
    const int c = __popc(x & ((1u << w) - 1u));
    if (n >= c) {
      n -= c;
      x >>= w;
      pos += w;
    }
  }
  return pos;
}
__device__ __forceinline__ int select_bit64(unsigned long long m, int n) {
  const int lo = __popc(static_cast<uint32_t>(m));
  return n < lo ? select_bit32(static_cast<uint32_t>(m), n) : 32 + select_bit32(static_cast<uint32_t>(m >> 32), n - lo);
}

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::NT, 1) bsattn_bwd_dkdv_compact_kernel(const __grid_constant__ Params p) {
  constexpr int D = Cfg::D, BQ = Cfg::BQ, S = Cfg::STAGES, NT = Cfg::NT, WR = Cfg::WR, RS = Cfg::RS, KR = Cfg::KR;
  constexpr int AP = Cfg::ACC_PITCH, XR = Cfg::X_ROW, CPR = D / 8;
  using Map = typename Cfg::QMap;
  extern __shared__ __align__(128) uint8_t smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // ---- which keys: p.pack block columns of (b, hk) (common.cuh column_group) --------------------------------
  const ColumnGroup cgw = column_group<D>(p, blockIdx.x);
  const int hk = cgw.hk, c0 = cgw.c0, Pv = cgw.Pv, k0 = cgw.k0, nkeys = cgw.nkeys, nlive = cgw.nlive;
  const int64_t lid = cgw.lid, kvoff = cgw.kvoff, kv_rstride = cgw.kv_rstride, qboff = cgw.qboff;
  const int C = p.C, G = 16 / C;
  const int E = p.R * p.g;  // packed rows per block row (>= 256: the launcher's condition; >= 1 suffices)
  const int TPU = E / BQ + (E % BQ != 0);  // tiles per unit (no overflow for any E)

  // ---- shared memory ---------------------------------------------------------------------------------------
  const uint32_t s0 = smem_u32(smem);
  const uint32_t sK = s0 + Cfg::OFF_K, sV = s0 + Cfg::OFF_V, sQ = s0 + Cfg::OFF_Q, sDo = s0 + Cfg::OFF_DO;
  const uint32_t sX = s0 + Cfg::OFF_X, sLse = s0 + Cfg::OFF_LSE, sDl = s0 + Cfg::OFF_DL;
  float* accK = reinterpret_cast<float*>(smem + Cfg::OFF_ACC);
  float* accV = accK + KR * AP;
  const float* fLse = reinterpret_cast<const float*>(smem + Cfg::OFF_LSE);
  const float* fDl = reinterpret_cast<const float*>(smem + Cfg::OFF_DL);
  int* sLim = reinterpret_cast<int*>(smem + Cfg::OFF_LIM);
  int* cnt = reinterpret_cast<int*>(smem + Cfg::OFF_CNT);
  unsigned long long* pm = reinterpret_cast<unsigned long long*>(smem + Cfg::OFF_PM);
  uint16_t* units = reinterpret_cast<uint16_t*>(smem + Cfg::OFF_UNIT);
  int8_t* uslot = reinterpret_cast<int8_t*>(smem + Cfg::OFF_USLOT);
  uint8_t* udup = smem + Cfg::OFF_UDUP;
  int* sCur = reinterpret_cast<int*>(smem + Cfg::OFF_MISC);  // [64] next entry of each column's list
  int* sEnd = sCur + 64;                                      // [64] end of each column's list
  int* sCnt = sEnd + 64;                                      // [64] entries of each column in the window
  int* sOff = sCnt + 64;                                      // [64] their exclusive prefix sum
  int* sWin = sOff + 64;                                      // the window's first block row (INT_MAX: done)
  int* sTot = sWin + 1;                                       // entries in the window
  int* sNU = sTot + 1;                                        // units in the window

  // ---- prologue: column ranges, the K / V rows, zero accumulators --------------------------------------------
  for (int l = tid; l < Pv; l += NT) {
    int64_t cs, ce;
    column_entries(p, lid, c0 + l, cs, ce);
    sCur[l] = static_cast<int>(cs);
    sEnd[l] = static_cast<int>(l * C < nlive ? ce : cs);  // (a column past kv_lens: nothing to walk)
  }
  {
    const T* kg = static_cast<const T*>(p.k) + kvoff + k0 * kv_rstride;
    const T* vg = static_cast<const T*>(p.v) + kvoff + k0 * kv_rstride;
    load_row_pair_tile<D, NT, KR>(sK, sV, kg, vg, nlive, kv_rstride, tid);
    cp_async_commit();  // waited for with the first tile
  }
  for (int i = tid; i < 2 * KR * AP; i += NT) accK[i] = 0.f;

  const int32_t* rows = p.col_rows + lid * p.nnz;
  const bool owner = lane < Map::OWN;
  const int trow_own = Map::owner_row(warp, lane);
  const int klast = k0 + nkeys - 1;
  const T* qg = static_cast<const T*>(p.q) + qboff * D;
  const T* dg = static_cast<const T*>(p.dout) + qboff * D;
  const float* lseg = p.lse + qboff;
  const float* dlg = p.delta + qboff;
  const int hq0 = hk * p.g, shift = p.causal_shift(cgw.b);
  const float s_mul = p.s_mul, cap_mul = p.cap_mul;
  const bool use_cap = p.use_cap != 0;

  // per-lane ldmatrix rows: A operands (16 keys: row (lane & 7) + 8 ((lane >> 3) & 1), chunk + (lane >> 4)); phase 1
  // B (query rows 8 warp + (lane & 7), chunk + (lane >> 3)); phase 2 B transposed (rows (lane & 7) + 8 ((lane >> 3)
  // & 1), chunk + (lane >> 4)). Every row base is a multiple of 8, so the swizzle term is lane & 7.
  const int sw = lane & 7;
  const int ka = (lane & 7) + ((lane >> 3) & 1) * 8;
  const uint32_t b1_lane = (warp * 8 + sw) * RS;
  const uint32_t t_lane = ka * RS;

  int win0 = -WR;
  while (true) {
    // ---- next window: the first WR-aligned one at or after the smallest next block row ---------------------------
    __syncthreads();  // cursors up to date; the previous window's tiles are done with its tables
    if (warp == 0) {
      int nx = INT_MAX;
      for (int l = lane; l < Pv; l += 32)
        if (sCur[l] < sEnd[l]) nx = min(nx, max(__ldg(rows + sCur[l]), 0));
      const int w0 = next_window(nx, win0, WR, p.MB);
      int run = 0;  // inclusive prefix of the counts of columns up to this lane's
      for (int base = 0; base < 64; base += 32) {
        const int l = base + lane;
        int n = 0;
        if (l < Pv && w0 != INT_MAX) {
          // entries of the window: the lists are increasing, so they are a prefix of what is left (binary search)
          const int cur = sCur[l];
          n = min(first_at_least(rows, cur, sEnd[l], w0 + WR) - cur, kMaxWindowEntries);
        }
        const int x = warp_inclusive_sum(n, lane);
        sCnt[l] = n;
        sOff[l] = run + x - n;
        run += __shfl_sync(0xffffffffu, x, 31);
      }
      if (lane == 0) {
        *sWin = w0;
        *sTot = run;
      }
    }
    for (int i = tid; i < WR * 64; i += NT) cnt[i] = 0;
    __syncthreads();
    win0 = *sWin;
    if (win0 == INT_MAX) break;  // (uniform)
    const int wend = min(win0 + WR, p.MB);

    // ---- multiplicities: every entry of the window adds 1 to its (block row, column) count (integer adds: the
    // counts do not depend on their order, even in an unsorted hand-made column view)
    {
      const int tot = *sTot;  // <= 64 * kMaxWindowEntries
      for (int i = tid; i < tot; i += NT) {
        int lo = 0, hi = Pv - 1;  // the column l: the last with sOff[l] <= i
        while (lo < hi) {
          const int mid = (lo + hi + 1) >> 1;
          if (sOff[mid] <= i)
            lo = mid;
          else
            hi = mid - 1;
        }
        const int br = __ldg(rows + sCur[lo] + (i - sOff[lo]));
        if (br >= win0 && br < wend) atomicAdd(cnt + (br - win0) * 64 + lo, 1);
      }
    }
    __syncthreads();
    // ---- presence masks, one warp per block row; then the unit list (warp 0, one lane per block row) ---------
    for (int i = warp; i < WR; i += Cfg::NWARPS) {
      const uint32_t lo = __ballot_sync(0xffffffffu, cnt[i * 64 + lane] != 0);
      const uint32_t hi = __ballot_sync(0xffffffffu, cnt[i * 64 + 32 + lane] != 0);
      if (lane == 0) pm[i] = (static_cast<unsigned long long>(hi) << 32) | lo;
    }
    __syncthreads();
    if (warp == 0) {
      const int ncols = lane < WR ? __popcll(pm[lane]) : 0;
      const int ngr = (ncols + G - 1) / G;
      const int x = warp_inclusive_sum(ngr, lane);
      for (int j = 0; j < ngr; ++j) units[x - ngr + j] = static_cast<uint16_t>(lane | (j << 8));
      if (lane == 31) *sNU = x;
    }
    __syncthreads();
    const int nunits = *sNU;
    const int ntiles = nunits * TPU;
    // ---- each unit's 16 keys, once: compacted key kr -> the (grp * G + kr / C)-th listed column of the block row,
    // key kr % C of it -> its slot among the CTA's keys (-1: none); whether one of them is listed more than once
    for (int base = warp * 32; base < nunits * 16; base += NT) {
      const int i = base + lane, u = i >> 4, kr = i & 15;
      bool twice = false;
      if (u < nunits) {  // (whole half-warps)
        const int ent = units[u];
        const int bl = ent & 0xff, grp = ent >> 8;
        const unsigned long long m = pm[bl];
        const int ci = kr / C, e = kr - ci * C, n = grp * G + ci;
        int sl = -1;
        if (ci < G && n < __popcll(m)) {
          const int col = select_bit64(m, n);
          sl = col * C + e < nlive ? col * C + e : -1;  // (past N or kv_lens: no key)
          twice = sl >= 0 && cnt[bl * 64 + col] != 1;
        }
        uslot[i] = static_cast<int8_t>(sl);
      }
      const unsigned bal = __ballot_sync(0xffffffffu, twice);
      if (u < nunits && kr == 0) udup[u] = ((bal >> (lane & 16)) & 0xffffu) != 0u;
    }
    __syncthreads();

    // ---- the window's tiles: unit u = t / TPU, its packed rows (t % TPU) * BQ .. ---------------------------
    auto issue = [&](int t, int stage) -> uint32_t {
      int rid = -1;
      uint32_t flag = 0;
      if (owner) {
        int lim = INT_MAX;
        const int u = t / TPU;
        const int r0 = (t - u * TPU) * BQ;  // <= E - 1
        if (trow_own < E - r0) packed_query_row(p, win0 + (units[u] & 0xff), r0 + trow_own, hq0, shift, rid, lim);
        const int srow = stage * BQ + trow_own;
        stage_row_stats(sLse, sDl, srow, lseg, dlg, rid);
        sLim[srow] = lim;
        flag = (rid >= 0 && lim < klast) ? 1u : 0u;
      }
      copy_row_pair_tile<D, Map::PASSES, Map::RPP, Map::RPW, false>(sQ + stage * BQ * RS, sDo + stage * BQ * RS, qg,
                                                                    dg, rid, D, warp, lane,
                                                                    [](int rp) { return rp >= 0; });
      return flag;
    };

    uint32_t f_next;  // this thread's flag (a row needs the causal mask) of tile t + 1
    bool mask_t;      // some row of tile t needs it
    {
      const uint32_t f0 = ntiles > 0 ? issue(0, 0) : 0u;
      cp_async_commit();
      f_next = ntiles > 1 ? issue(1, 1) : 0u;
      cp_async_commit();
      cp_async_wait<1>();  // tile 0 (and, in the first window, the K / V rows)
      mask_t = __syncthreads_or(static_cast<int>(f0)) != 0;
    }

    // per-unit state: the thread's two key rows (slot among the CTA's keys, -1: none; multiplicity; key), the
    // warp's k / v fragments of the unit's 16 keys, dk / dv of the warp's 16 columns
    int slot[2] = {-1, -1}, mul[2] = {0, 0}, key[2] = {INT_MAX, INT_MAX};
    bool dup = false;
    uint32_t kf[D / 16][4], vf[D / 16][4];
    float adk[2][4], adv[2][4];
    for (int t = 0; t < ntiles; ++t) {
      const int stage = t % S, u = t / TPU, rt = t - u * TPU;
      if (rt == 0) {
        const int8_t* us = uslot + u * 16;
        dup = udup[u] != 0;
        const int bl = units[u] & 0xff;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          slot[h] = us[(lane >> 2) + 8 * h];
          mul[h] = slot[h] < 0 ? 0 : dup ? cnt[bl * 64 + slot[h] / C] : 1;
          key[h] = slot[h] >= 0 ? k0 + slot[h] : INT_MAX;
        }
        int sa = us[ka];
        sa = sa < 0 ? 0 : sa;  // a key row that is not added: any row's data
        const uint32_t a_row = sa * RS;
        const int a_x = (lane >> 4) ^ (sa & 7);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          ldsm_x4(kf[kk], sK + a_row + (((2 * kk) ^ a_x) << 4));
          ldsm_x4(vf[kk], sV + a_row + (((2 * kk) ^ a_x) << 4));
        }
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) adk[n][e] = adv[n][e] = 0.f;
      }

      // ---- phase 1: s^T, dp^T of the 16 keys x the warp's 8 rows (two accumulators each: shorter mma chains)
      const uint32_t xp = sX + (t & 1) * 2 * 16 * XR, xd = xp + 16 * XR;
      {
        float s2[2][4], dp2[2][4];
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int e = 0; e < 4; ++e) s2[a][e] = dp2[a][e] = 0.f;
        const uint32_t qrow = sQ + stage * BQ * RS + b1_lane, drow = sDo + stage * BQ * RS + b1_lane;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk += 2) {
          const uint32_t o = ((2 * kk + (lane >> 3)) ^ sw) << 4;
          uint32_t bq[4], bd[4];
          ldsm_x4(bq, qrow + o);
          ldsm_x4(bd, drow + o);
          Mma<T>::run(s2[0], kf[kk], bq[0], bq[1]);
          Mma<T>::run(dp2[0], vf[kk], bd[0], bd[1]);
          Mma<T>::run(s2[1], kf[kk + 1], bq[2], bq[3]);
          Mma<T>::run(dp2[1], vf[kk + 1], bd[2], bd[3]);
        }
        float s[1][4], dp[1][4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[0][e] = s2[0][e] + s2[1][e];
          dp[0][e] = dp2[0][e] + dp2[1][e];
        }
        const int rb = stage * BQ + warp * 8 + (lane & 3) * 2;
        dkv_probs_ds<1, true, kMulPerKey>(s, dp, fLse, fDl, sLim, nullptr, rb, mask_t || dup, key, mul, s_mul,
                                          cap_mul, use_cap);
        // p^T, ds^T -> the exchange tiles (16 key rows x 64 query rows, b16; the warp's rows are chunk `warp`)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int kr = (lane >> 2) + 8 * h;
          const uint32_t o = kr * XR + ((warp ^ (kr & 7)) << 4) + (lane & 3) * 4;
          st_shared32(xp + o, Mma<T>::pack(s[0][2 * h], s[0][2 * h + 1]));
          st_shared32(xd + o, Mma<T>::pack(dp[0][2 * h], dp[0][2 * h + 1]));
        }
      }

      // ---- the tile's one barrier: p^T / ds^T visible; tile t + 1 landed (this thread's copies: wait; everyone's:
      // the barrier); every warp done with tile t - 1, whose stage takes tile t + 2
      cp_async_wait<0>();
      const bool mask_next = __syncthreads_or(static_cast<int>(f_next)) != 0;
      const uint32_t f2 = t + 2 < ntiles ? issue(t + 2, (t + 2) % S) : 0u;
      cp_async_commit();

      // ---- phase 2: dv += p^T do, dk += ds^T q over the tile's 64 rows, the warp's 16 columns
      {
        const uint32_t qcol = sQ + stage * BQ * RS + t_lane, dcol = sDo + stage * BQ * RS + t_lane;
        const uint32_t bx = ((2 * warp + (lane >> 4)) ^ sw) << 4;
#pragma unroll
        for (int j = 0; j < BQ / 16; ++j) {
          const uint32_t xo = ka * XR + (((2 * j + (lane >> 4)) ^ sw) << 4);
          uint32_t ap[4], as[4], bt[4], bq[4];
          ldsm_x4(ap, xp + xo);
          ldsm_x4(as, xd + xo);
          ldsm_x4_trans(bt, dcol + j * 16 * RS + bx);
          ldsm_x4_trans(bq, qcol + j * 16 * RS + bx);
          Mma<T>::run(adv[0], ap, bt[0], bt[1]);
          Mma<T>::run(adv[1], ap, bt[2], bt[3]);
          Mma<T>::run(adk[0], as, bq[0], bq[1]);
          Mma<T>::run(adk[1], as, bq[2], bq[3]);
        }
      }

      // ---- the unit's last tile: add dk / dv to the rows of its keys (this warp's columns; one thread per element)
      if (rt == TPU - 1) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (slot[h] < 0) continue;
          float* rk = accK + slot[h] * AP + warp * Cfg::DW + (lane & 3) * 2;
          float* rv = accV + slot[h] * AP + warp * Cfg::DW + (lane & 3) * 2;
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            float2 xk = *reinterpret_cast<float2*>(rk + 8 * n), xv = *reinterpret_cast<float2*>(rv + 8 * n);
            xk.x += adk[n][2 * h];
            xk.y += adk[n][2 * h + 1];
            xv.x += adv[n][2 * h];
            xv.y += adv[n][2 * h + 1];
            *reinterpret_cast<float2*>(rk + 8 * n) = xk;
            *reinterpret_cast<float2*>(rv + 8 * n) = xv;
          }
        }
      }
      mask_t = mask_next;
      f_next = f2;
    }
    for (int l = tid; l < Pv; l += NT) sCur[l] += sCnt[l];  // (read again after the barrier at the top)
  }

  // ---- epilogue: dk * scale, dv of the CTA's keys (zero where no query row sees a key) ------------------------
  cp_async_wait<0>();
  __syncthreads();  // (the window loop ends on a barrier too)
  T* dkg = static_cast<T*>(p.dk) + kvoff + k0 * kv_rstride;
  T* dvg = static_cast<T*>(p.dv) + kvoff + k0 * kv_rstride;
  for (int i = tid; i < nkeys * CPR; i += NT) {
    const int row = i / CPR, ch = i % CPR;
    st_global16(dkg + row * kv_rstride + ch * 8, sum_partials8<T, 1>(accK + row * AP + ch * 8, 0, p.scale));
    st_global16(dvg + row * kv_rstride + ch * 8, sum_partials8<T, 1>(accV + row * AP + ch * 8, 0, 1.f));
  }
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
