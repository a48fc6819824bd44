// The dk / dv kernel of the backward: column-oriented.
//
// One CTA = one tile of BK key rows of one block column c (keys c * C + kc * BK ..., at most C of them, < N) of
// one (batch, KV head). K and V of the tile are loaded once. The CTA then walks the column's block rows
// (col_rows[col_indptr[c] : col_indptr[c + 1]], the column view) as a virtual sequence of packed query rows:
// each block row stands for its R * g packed rows (query row r, head j of the group: the g query heads'
// contributions to the KV head are summed inside the kernel). Tiles of BQ such rows (q, do, lse, delta) are
// gathered with cp.async, STAGES deep, and per tile each warp (16 keys x a slice of BQ / WQ rows, in chunks
// of QC rows) computes
//   s^T = k q^T, dp^T = v do^T            (mma.sync m16n8k16, f32 accumulators)
//   p^T = exp2(s^T * log2e * scale - lse * log2e) (soft cap: through tanh; causal mask when needed)
//   dv += p^T do                           (p^T packed to b16 straight from the accumulator registers)
//   ds^T = p^T (dp^T - delta) [* (1 - tanh^2)];  dk += ds^T q
// and finally writes dk * scale and dv. No atomics: every element is written by one thread after a fixed
// order of additions (the WQ row-split warps are summed through shared memory in warp order): dk and dv are
// bitwise deterministic.
//
// MODE 0 computes both; MODE 1 only dv, MODE 2 only dk (head dim 256: the two accumulators of a warp would
// need 256 registers, so the launcher runs the two passes one after the other).
//
// Padding key rows (past C or N) are zero and never written; padding query rows are zero with lse2 = +inf
// (p = 0), as are rows with lse = -inf.
//
// Small blocks (C <= 8; head dim 256 in the two passes above): bsattn_bwd_dkdv_pack_kernel packs P = 16 / C
// consecutive block columns into one 16-key tile (their keys are contiguous) and walks the merge of their row
// lists: block row br is visited once for all the columns that list it, with a per-(row, column) multiplicity
// (4-bit counters, so a block listed up to 15 times in a row counts exactly; 0 masks the column). The merge is
// built in shared memory, window by window of W block rows: the columns' entries of the window are counted with
// shared-memory atomics (integer adds: the counts do not depend on their order), then compacted in block-row
// order. With one column per tile a key tile of C < 16 keys would waste 16 / C of every mma; packed, only the
// rows that list none of the columns are wasted work.
#pragma once

#include <climits>
#include <cstdint>

#include "common/bsattn_common.h"
#include "cuda/bwd/column_split.cuh"
#include "cuda/bwd/common.cuh"
#include "cuda/bwd/params.h"
#include "cuda/fwd/mma.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

// WK x WQ warps: WK along the keys (16 each), WQ along the query rows of every tile.
template <int D_, int WK_, int WQ_, int BQ_, int STAGES_, int QC_, bool KREG_, int MODE_, int MINB_>
struct DkvCfg {
  static constexpr int D = D_, WK = WK_, WQ = WQ_, BQ = BQ_, STAGES = STAGES_, QC = QC_, MODE = MODE_;
  static constexpr int MINB = MINB_;
  static constexpr bool KREG = KREG_;  // k and v fragments in registers for the whole loop
  static constexpr int NWARPS = WK * WQ, NT = NWARPS * 32;
  static constexpr int BK = WK * 16;    // key rows per CTA
  static constexpr int BQW = BQ / WQ;   // query rows per warp per tile
  static constexpr int NQ8 = QC / 8;
  static constexpr int CPR = D / 8;
  static constexpr int RS = D * 2;
  // shared memory: K, V tiles; q and do stages; lse, delta (raw, f32) and causal limit per staged row
  static constexpr int K_BYTES = BK * RS;
  static constexpr int Q_STAGE = BQ * RS;
  static constexpr int Q_BYTES = 2 * STAGES * Q_STAGE;
  static constexpr int ROW_BYTES = 3 * STAGES * BQ * 4;
  static constexpr int SMEM = 2 * K_BYTES + Q_BYTES + ROW_BYTES;
  static constexpr int OST = D + 8;  // f32 row stride of the WQ > 1 merge buffer
  using QMap = TileMap<D, NT, BQ>;
  // accumulator / fragment array extents (1 where unused)
  static constexpr int DKN = MODE != 1 ? D / 8 : 1, DVN = MODE != 2 ? D / 8 : 1;
  static constexpr int KFN = KREG ? D / 16 : 1, VFN = KREG && MODE != 1 ? D / 16 : 1;
  // packed small-block variant: window of block rows merged at a time; extra shared memory: count word per staged
  // row, the window's count words (compacted in place into the merged list) and block rows, column cursors. Head dim
  // 256 takes half the window, so that its 146 KB of tiles and the lists stay within an A100's 163 KB.
  static constexpr int PACK_W = D == 256 ? 1024 : 2048;
  static constexpr int PACK_SMEM = SMEM + STAGES * BQ * 8 + PACK_W * 8 + PACK_W * 2 + 512;

  static_assert(QC % 16 == 0 && BQW % QC == 0, "whole k16 steps of query rows per warp");
  static_assert(WQ == 1 || WQ * BK * OST * 4 <= 2 * K_BYTES + Q_BYTES, "merge buffer");
  static_assert(STAGES >= 2 && STAGES <= 8, "pipeline depth");
  static_assert(MODE >= 0 && MODE <= 2, "mode");
  static_assert(SMEM <= 163 * 1024 && PACK_SMEM <= 163 * 1024, "shared memory per CTA (A100 limit)");
};

// Per-lane parts of the ldmatrix addresses of a warp (fragment layouts in cuda/fwd/mma.cuh; all rows a lane
// addresses are = lane (mod 8), so the swizzle term is a per-lane constant XORed into the chunk index).
struct DkvLanes {
  uint32_t a_lane;  // A operand rows (k, v): the warp's 16 keys
  int a_x;
  uint32_t n_lane;  // B operand, staged rows as n (q, do)
  int n_x;
  uint32_t t_lane;  // B operand, staged rows as k (q^T, do^T)
  int t_x;
};

template <class Cfg>
__device__ __forceinline__ DkvLanes dkv_lanes(int krow0, int wq, int lane) {
  constexpr int RS = Cfg::RS;
  const int sw = lane & 7;
  DkvLanes L;
  L.a_lane = (krow0 + (lane & 7) + ((lane >> 3) & 1) * 8) * RS;
  L.a_x = (lane >> 4) ^ sw;
  L.n_lane = (wq * Cfg::BQW + (lane & 7) + (lane >> 4) * 8) * RS;
  L.n_x = ((lane >> 3) & 1) ^ sw;
  L.t_lane = (wq * Cfg::BQW + (lane & 7) + ((lane >> 3) & 1) * 8) * RS;
  L.t_x = (lane >> 4) ^ sw;
  return L;
}

template <class Cfg>
__device__ __forceinline__ void dkv_init(float (&adk)[Cfg::DKN][4], float (&adv)[Cfg::DVN][4]) {
#pragma unroll
  for (int d = 0; d < Cfg::DKN; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) adk[d][e] = 0.f;
#pragma unroll
  for (int d = 0; d < Cfg::DVN; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) adv[d][e] = 0.f;
}

// k (and v) A fragments of the warp's 16 keys, for the whole loop (KREG).
template <class Cfg>
__device__ __forceinline__ void dkv_load_frags(uint32_t (&kf)[Cfg::KFN][4], uint32_t (&vf)[Cfg::VFN][4], uint32_t sK,
                                               uint32_t sV, const DkvLanes& L) {
#pragma unroll
  for (int kk = 0; kk < Cfg::D / 16; ++kk) {
    ldsm_x4(kf[kk], sK + L.a_lane + (((2 * kk) ^ L.a_x) << 4));
    if constexpr (Cfg::MODE != 1) ldsm_x4(vf[kk], sV + L.a_lane + (((2 * kk) ^ L.a_x) << 4));
  }
}

// One staged query tile for one warp: its 16 keys x its BQW rows, in chunks of QC rows. need_mask: the tile has a
// row whose causal limit cuts the CTA's keys, or (PACK) a row that does not list every packed column exactly once;
// then p is multiplied by the (row, column) multiplicity (PACK: 4-bit count of the key's column in the row's count
// word, shift sh[h] for accumulator row h) and zeroed above the causal limit.
template <typename T, class Cfg, bool PACK>
__device__ __forceinline__ void dkdv_tile(uint32_t sK, uint32_t sV, uint32_t sQ, uint32_t sD, const float* fLse,
                                          const float* fDl, const int* sLim, const unsigned long long* sW, int stage,
                                          int wq, bool need_mask, const DkvLanes& L, const int (&key)[2],
                                          const int (&sh)[2], int kend, bool part, float s_mul, float cap_mul,
                                          bool use_cap, float (&adk)[Cfg::DKN][4], float (&adv)[Cfg::DVN][4],
                                          const uint32_t (&kf)[Cfg::KFN][4], const uint32_t (&vf)[Cfg::VFN][4]) {
  constexpr int D = Cfg::D, BQ = Cfg::BQ, BQW = Cfg::BQW, QC = Cfg::QC, NQ8 = Cfg::NQ8, RS = Cfg::RS;
  constexpr bool KREG = Cfg::KREG, DO_DV = Cfg::MODE != 2, DO_DK = Cfg::MODE != 1;
  const int lane = threadIdx.x & 31;
#pragma unroll 1
  for (int qc = 0; qc < BQW / QC; ++qc) {
    const uint32_t qb = stage * Cfg::Q_STAGE + qc * QC * RS;
    float s[NQ8][4], dp[DO_DK ? NQ8 : 1][4];
#pragma unroll
    for (int n = 0; n < NQ8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
    if constexpr (DO_DK) {
#pragma unroll
      for (int n = 0; n < NQ8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[n][e] = 0.f;
    }
    // s^T = k q^T, dp^T = v do^T over the warp's 16 keys and the chunk's rows
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[4], av[4];
      if constexpr (KREG) {
#pragma unroll
        for (int e = 0; e < 4; ++e) ak[e] = kf[kk][e];
        if constexpr (DO_DK) {
#pragma unroll
          for (int e = 0; e < 4; ++e) av[e] = vf[kk][e];
        }
      } else {
        ldsm_x4(ak, sK + L.a_lane + (((2 * kk) ^ L.a_x) << 4));
        if constexpr (DO_DK) ldsm_x4(av, sV + L.a_lane + (((2 * kk) ^ L.a_x) << 4));
      }
#pragma unroll
      for (int nb = 0; nb < NQ8 / 2; ++nb) {
        const uint32_t o = qb + L.n_lane + nb * 16 * RS + (((2 * kk) ^ L.n_x) << 4);
        uint32_t bq[4];
        ldsm_x4(bq, sQ + o);
        Mma<T>::run(s[2 * nb], ak, bq[0], bq[1]);
        Mma<T>::run(s[2 * nb + 1], ak, bq[2], bq[3]);
        if constexpr (DO_DK) {
          uint32_t bd[4];
          ldsm_x4(bd, sD + o);
          Mma<T>::run(dp[2 * nb], av, bd[0], bd[1]);
          Mma<T>::run(dp[2 * nb + 1], av, bd[2], bd[3]);
        }
      }
    }
    // p^T (in place of s), ds^T (in place of dp)
    const int rb = stage * BQ + wq * BQW + qc * QC + (lane & 3) * 2;  // staged row of column e & 1 of n = 0
    dkv_probs_ds<NQ8, DO_DK, PACK ? kMulCountWord : kMulNone>(s, dp, fLse, fDl, sLim, sW, rb, need_mask, key, sh, s_mul,
                                                              cap_mul, use_cap);
    zero_keys_past<NQ8, DO_DK>(s, dp, key, kend, part);
    // dv += p^T do, dk += ds^T q
#pragma unroll
    for (int kk = 0; kk < QC / 16; ++kk) {
      uint32_t ap[4], as[4];
      if constexpr (DO_DV) {
        acc_to_a<T>(s, kk, ap);
      }
      if constexpr (DO_DK) {
        acc_to_a<T>(dp, kk, as);
      }
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        const uint32_t o = qb + L.t_lane + kk * 16 * RS + (((2 * nd) ^ L.t_x) << 4);
        if constexpr (DO_DV) {
          uint32_t bt[4];
          ldsm_x4_trans(bt, sD + o);
          Mma<T>::run(adv[2 * nd], ap, bt[0], bt[1]);
          Mma<T>::run(adv[2 * nd + 1], ap, bt[2], bt[3]);
        }
        if constexpr (DO_DK) {
          uint32_t bt[4];
          ldsm_x4_trans(bt, sQ + o);
          Mma<T>::run(adk[2 * nd], as, bt[0], bt[1]);
          Mma<T>::run(adk[2 * nd + 1], as, bt[2], bt[3]);
        }
      }
    }
  }
}

// One tensor's 16 key rows of a warp (its mma / wgmma accumulator fragment: row lane / 4 (+ 8), columns
// 8 d + 2 (lane % 4) (+ 1)) times mul, to global rows krow0 .. krow0 + 15 of g below nkeys: staged in 16 swizzled rows
// of D b16 at `stage` (16 x D x 2 bytes, conflict-free), then written 16 bytes a lane, each row's D * 2 bytes
// contiguous (not 4-byte scattered stores: half-sector writes and a full load / store queue). The stage is free again
// when it returns.
template <typename T, int D, int N>
__device__ __forceinline__ void store_warp_rows(uint32_t stage, T* g, int64_t rstride, int nkeys, int krow0,
                                                int lane, float mul, const float (&acc)[N][4]) {
  static_assert(N == D / 8, "a full row of accumulators");
  constexpr int CPR = D / 8;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int d = 0; d < CPR; ++d)
      st_shared32(stage + swz_off<D>((lane >> 2) + 8 * h, d) + (lane & 3) * 4,
                  Mma<T>::pack(acc[d][2 * h] * mul, acc[d][2 * h + 1] * mul));
  }
  __syncwarp();
#pragma unroll
  for (int i = lane; i < 16 * CPR; i += 32) {
    const int r = i / CPR, ch = i % CPR;
    if (krow0 + r < nkeys) st_global16(g + (krow0 + r) * rstride + ch * 8, ld_shared16(stage + swz_off<D>(r, ch)));
  }
  __syncwarp();
}

// Writes dk * scale and dv of the CTA's key rows [0, nkeys) (all threads; after the main loop). SYNC = false: the
// caller has already synchronised the warps that read K / V (WQ == 1 only: the row-split merge needs all threads).
template <typename T, class Cfg, bool SYNC = true>
__device__ __forceinline__ void dkdv_store(uint8_t* smem, uint32_t sK, uint32_t sV, T* dkg, T* dvg,
                                           int64_t kv_rstride, int nkeys, int krow0, int wq, bool warp_active,
                                           float scale, const float (&adk)[Cfg::DKN][4],
                                           const float (&adv)[Cfg::DVN][4]) {
  constexpr int D = Cfg::D, WQ = Cfg::WQ, BK = Cfg::BK, CPR = Cfg::CPR, DT = D / 8;
  constexpr bool DO_DV = Cfg::MODE != 2, DO_DK = Cfg::MODE != 1;
  static_assert(SYNC || WQ == 1, "the row-split merge synchronises every thread");
  const int tid = threadIdx.x, lane = tid & 31;
  if constexpr (SYNC) {
    cp_async_wait<0>();
    __syncthreads();  // every warp is done with K / V / q / do (and every copy into them has landed)
  }
  if constexpr (WQ == 1) {
    // each warp stages its own 16 key rows in its rows of the K (dk) and V (dv) tiles and copies them out
    if (warp_active) {
      if constexpr (DO_DK) store_warp_rows<T, D>(sK + krow0 * D * 2, dkg, kv_rstride, nkeys, krow0, lane, scale, adk);
      if constexpr (DO_DV) store_warp_rows<T, D>(sV + krow0 * D * 2, dvg, kv_rstride, nkeys, krow0, lane, 1.f, adv);
    }
  } else {
    // row-split warps: f32 partials to shared memory, summed in warp order (deterministic); dk then dv
    float* sO = reinterpret_cast<float*>(smem);
    constexpr int OST = Cfg::OST;
#pragma unroll
    for (int pass = 0; pass < 2; ++pass) {
      if (pass == 0 && !DO_DK) continue;
      if (pass == 1 && !DO_DV) continue;
      if (pass == 1 && DO_DK) __syncthreads();  // the dk pass is done reading the buffer
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = krow0 + (lane >> 2) + 8 * h;
        float* dst = sO + (wq * BK + row) * OST + (lane & 3) * 2;
#pragma unroll
        for (int d = 0; d < DT; ++d) {
          float2 v2 = make_float2(0.f, 0.f);
          if (pass == 0) {
            if constexpr (DO_DK) v2 = make_float2(adk[d][2 * h], adk[d][2 * h + 1]);
          } else {
            if constexpr (DO_DV) v2 = make_float2(adv[d][2 * h], adv[d][2 * h + 1]);
          }
          *reinterpret_cast<float2*>(dst + d * 8) = v2;
        }
      }
      __syncthreads();
      const float mul = pass == 0 ? scale : 1.f;
      T* outg = pass == 0 ? dkg : dvg;
      for (int i = tid; i < BK * CPR; i += Cfg::NT) {
        const int row = i / CPR, ch = i % CPR;
        if (row < nkeys) {
          const uint4 val = sum_partials8<T, WQ>(sO + row * OST + ch * 8, BK * OST, mul);
          st_global16(outg + row * kv_rstride + ch * 8, val);
        }
      }
    }
  }
}

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::NT, Cfg::MINB) bsattn_bwd_dkdv_kernel(const __grid_constant__ Params p) {
  constexpr int D = Cfg::D, WQ = Cfg::WQ, BQ = Cfg::BQ, S = Cfg::STAGES, BK = Cfg::BK;
  constexpr bool KREG = Cfg::KREG;
  using Map = typename Cfg::QMap;
  extern __shared__ __align__(128) uint8_t smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wk = warp / WQ, wq = warp % WQ;

  // ---- which tile (common.cuh column_work: longest columns first) -----------------------------------------
  ColumnWork cw_;
  if (!column_work<D, BK, BQ>(p, cw_, blockIdx.x)) return;  // (uniform)
  const int hk = cw_.hk, k0 = cw_.k0, nkeys = cw_.nkeys, nlive = live_keys(p, cw_.b, k0, nkeys);
  const int64_t lid = cw_.lid, cs = cw_.cs;
  const int len = cw_.len, ntiles = cw_.ntiles;
  const int64_t kvoff = cw_.kvoff, kv_rstride = cw_.kv_rstride, qboff = cw_.qboff;

  // ---- shared memory ---------------------------------------------------------------------------------
  const uint32_t sK = smem_u32(smem);
  const uint32_t sV = sK + Cfg::K_BYTES;
  const uint32_t sQ = sV + Cfg::K_BYTES;
  const uint32_t sD = sQ + S * Cfg::Q_STAGE;
  const uint32_t sLse = sQ + Cfg::Q_BYTES;  // [S][BQ] f32 (raw lse)
  const uint32_t sDl = sLse + S * BQ * 4;   // [S][BQ] f32 (raw delta)
  const float* fLse = reinterpret_cast<const float*>(smem + 2 * Cfg::K_BYTES + Cfg::Q_BYTES);
  const float* fDl = fLse + S * BQ;
  int* sLim = reinterpret_cast<int*>(smem + 2 * Cfg::K_BYTES + Cfg::Q_BYTES + 2 * S * BQ * 4);

  // ---- prologue: K, V tile; the first S - 1 query tiles --------------------------------------------------
  {
    const T* kg = static_cast<const T*>(p.k) + kvoff + k0 * kv_rstride;
    const T* vg = static_cast<const T*>(p.v) + kvoff + k0 * kv_rstride;
    load_row_pair_tile<D, Cfg::NT, BK>(sK, sV, kg, vg, nlive, kv_rstride, tid);
  }

  // query gather state (owner lanes)
  ColumnQueryGather<D, BQ, Map, RowSwizzle<D>, T> qgat;
  qgat.init(p, p.col_rows + lid * p.nnz + cs, len, cw_.b, hk, k0 + nkeys - 1, qboff, warp, lane);
  auto issue = [&](int stage) -> uint32_t {
    return qgat.issue(p, sQ + stage * Cfg::Q_STAGE, sD + stage * Cfg::Q_STAGE, sLse, sDl, sLim, nullptr, stage, warp,
                      lane);
  };

  uint32_t pending = issue_prologue<S>(issue, ntiles);

  // ---- per-warp state ----------------------------------------------------------------------------------
  const int krow0 = wk * 16;
  const bool warp_active = krow0 < nkeys;
  const DkvLanes lanes = dkv_lanes<Cfg>(krow0, wq, lane);
  int key[2];  // keys of the thread's two accumulator rows
  fragment_row_keys(k0 + krow0, lane, key);

  float adk[Cfg::DKN][4], adv[Cfg::DVN][4];
  uint32_t kf[Cfg::KFN][4], vf[Cfg::VFN][4];
  dkv_init<Cfg>(adk, adv);
  if constexpr (KREG) {
    cp_async_wait<S - 2>();
    __syncthreads();
    dkv_load_frags<Cfg>(kf, vf, sK, sV, lanes);
  }
  const float s_mul = p.s_mul, cap_mul = p.cap_mul;
  const bool use_cap = p.use_cap != 0;

  // ---- main loop ---------------------------------------------------------------------------------------
  for (int t = 0; t < ntiles; ++t) {
    const int stage = t % S;
    const bool need_mask = tile_landed<S - 2>(pending);
    if (t + S - 1 < ntiles) pending |= issue((t + S - 1) % S) << (S - 2);
    cp_async_commit();

    if (warp_active)
      dkdv_tile<T, Cfg, false>(sK, sV, sQ, sD, fLse, fDl, sLim, nullptr, stage, wq, need_mask, lanes, key, key,
                               k0 + nlive, nlive < nkeys, s_mul, cap_mul, use_cap, adk, adv, kf, vf);
  }

  // ---- epilogue: dk * scale, dv; a piece of a split column: its f32 partial sums (column_split.cuh) -------
  zero_dkdv_past(adk, adv, key, k0 + nlive, nlive < nkeys);
  if constexpr (WQ == 1 && Cfg::MODE == 0) {
    if (p.split_items != nullptr) {
      ColumnWork pw;  // (read again rather than kept live through the loop)
      (void)column_work<D, BK, BQ>(p, pw, blockIdx.x);
      if (pw.part >= 0) {
        store_split_partial<D>(p, pw, krow0, lane, adk, adv);
        return;
      }
    }
  }
  dkdv_store<T, Cfg>(smem, sK, sV, static_cast<T*>(p.dk) + kvoff + k0 * kv_rstride,
                     static_cast<T*>(p.dv) + kvoff + k0 * kv_rstride, kv_rstride, nkeys, krow0, wq, warp_active,
                     p.scale, adk, adv);
}

// Packed small blocks (C <= 8): one CTA = P = p.pack consecutive block columns c0 .. c0 + P - 1 (their keys
// k0 = c0 * C .. are one contiguous tile of at most 16 rows) of one (batch, KV head); the merge of the columns' row
// lists is walked window by window (see the top of this file). Cfg: a 16-key configuration (WK = 1).
template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::NT, Cfg::MINB) bsattn_bwd_dkdv_pack_kernel(const __grid_constant__ Params p) {
  constexpr int D = Cfg::D, WQ = Cfg::WQ, BQ = Cfg::BQ, S = Cfg::STAGES, BK = Cfg::BK;
  constexpr int W = Cfg::PACK_W, NT = Cfg::NT, NWARPS = Cfg::NWARPS;
  constexpr bool KREG = Cfg::KREG;
  using Map = typename Cfg::QMap;
  static_assert(Cfg::WK == 1 && BK == 16, "packed tiles hold 16 keys");
  static_assert(W % NT == 0 && W <= 65536 && NWARPS <= 32, "window layout");
  extern __shared__ __align__(128) uint8_t smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wq = warp % WQ;

  // ---- which tile (common.cuh column_group) ----------------------------------------------------------------
  const ColumnGroup grp = column_group<D>(p, blockIdx.x);
  const int hk = grp.hk, c0 = grp.c0, Pv = grp.Pv, k0 = grp.k0, nkeys = grp.nkeys, nlive = grp.nlive;
  const int64_t lid = grp.lid, kvoff = grp.kvoff, kv_rstride = grp.kv_rstride, qboff = grp.qboff;
  const int RG = p.R * p.g;
  const int E = RG > 0 ? RG : 1;

  // ---- shared memory ---------------------------------------------------------------------------------
  const uint32_t sK = smem_u32(smem);
  const uint32_t sV = sK + Cfg::K_BYTES;
  const uint32_t sQ = sV + Cfg::K_BYTES;
  const uint32_t sD = sQ + S * Cfg::Q_STAGE;
  const uint32_t sLse = sQ + Cfg::Q_BYTES;
  const uint32_t sDl = sLse + S * BQ * 4;
  const float* fLse = reinterpret_cast<const float*>(smem + 2 * Cfg::K_BYTES + Cfg::Q_BYTES);
  const float* fDl = fLse + S * BQ;
  int* sLim = reinterpret_cast<int*>(smem + 2 * Cfg::K_BYTES + Cfg::Q_BYTES + 2 * S * BQ * 4);
  unsigned long long* sW = reinterpret_cast<unsigned long long*>(smem + Cfg::SMEM);  // [S][BQ] count words
  unsigned long long* cnt = sW + S * BQ;  // [W] counts of the window's block rows -> merged list (in place)
  uint16_t* lbr = reinterpret_cast<uint16_t*>(cnt + W);  // [W] merged list: block row - win0
  int* sCur = reinterpret_cast<int*>(lbr + W);  // [16] next entry of each column's list
  int* sEnd = sCur + 16;                         // [16] end of each column's list
  int* sCnt = sEnd + 16;                         // [16] entries of each column in the window
  int* sScan = sCnt + 16;                        // [NWARPS] compaction scan
  int* sWin = sScan + 32;                        // the window's first block row (INT_MAX: done)
  int* sMore = sWin + 1;                         // the window needs another multiplicity pass

  // ---- prologue: column ranges, K, V tile ------------------------------------------------------------
  if (tid < Pv) {
    int64_t cs, ce;
    column_entries(p, lid, c0 + tid, cs, ce);
    sCur[tid] = static_cast<int>(cs);
    sEnd[tid] = static_cast<int>(RG > 0 && tid * p.C < nlive ? ce : cs);  // Hq = 0, or past kv_lens: nothing
  }
  {
    const T* kg = static_cast<const T*>(p.k) + kvoff + k0 * kv_rstride;
    const T* vg = static_cast<const T*>(p.v) + kvoff + k0 * kv_rstride;
    load_row_pair_tile<D, NT, BK>(sK, sV, kg, vg, nlive, kv_rstride, tid);
    cp_async_commit();  // its own group: waited for by the first tile's wait (or the KREG wait below)
  }

  const bool owner = lane < Map::OWN;
  const int trow_own = Map::owner_row(warp, lane);
  const int qE = BQ / E, rE = BQ - (BQ / E) * E;
  const int klast = k0 + nkeys - 1;
  unsigned long long fullw = 0;  // every column of the group listed once
  for (int l = 0; l < Pv; ++l) fullw |= 1ull << (4 * l);
  const T* qg = static_cast<const T*>(p.q) + qboff * D;
  const T* dg = static_cast<const T*>(p.dout) + qboff * D;
  const float* lseg = p.lse + qboff;
  const float* dlg = p.delta + qboff;
  const int hq0 = hk * p.g, shift = p.causal_shift(grp.b);
  const int32_t* rows = p.col_rows + lid * p.nnz;

  // ---- per-warp state ----------------------------------------------------------------------------------
  const DkvLanes lanes = dkv_lanes<Cfg>(0, wq, lane);
  int key[2], sh[2];  // keys of the thread's two accumulator rows; shift of their column's count
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int kr = (lane >> 2) + 8 * h;
    key[h] = k0 + kr;
    sh[h] = 4 * min(kr / p.C, 15);
  }
  float adk[Cfg::DKN][4], adv[Cfg::DVN][4];
  uint32_t kf[Cfg::KFN][4], vf[Cfg::VFN][4];
  dkv_init<Cfg>(adk, adv);
  if constexpr (KREG) {
    cp_async_wait<0>();
    __syncthreads();
    dkv_load_frags<Cfg>(kf, vf, sK, sV, lanes);
  }
  const float s_mul = p.s_mul, cap_mul = p.cap_mul;
  const bool use_cap = p.use_cap != 0;

  int win0 = -W;
  while (true) {
    // ---- next window: the first W-aligned window at or after the smallest next block row, past the last one
    __syncthreads();  // column cursors up to date; the previous window's tiles are done with the list
    if (warp == 0) {
      int cur = 0, end = 0, nx = INT_MAX;
      if (lane < Pv) {
        cur = sCur[lane];
        end = sEnd[lane];
        if (cur < end) nx = max(__ldg(rows + cur), 0);
      }
      const int w0 = next_window(nx, win0, W, p.MB);
      if (lane < Pv) {
        // entries of the window: the lists are increasing, so they are a prefix of what is left (binary search)
        const int lo = w0 != INT_MAX ? first_at_least(rows, cur, end, w0 + W) : cur;
        sCnt[lane] = min(lo - cur, kMaxWindowEntries);
      }
      if (lane == 0) *sWin = w0;
    }
    __syncthreads();
    win0 = *sWin;
    if (win0 == INT_MAX) break;  // (uniform)
    const int wend = min(win0 + W, p.MB);

    // A block row listed more than 15 times by one column (possible in unchecked traced layouts) would overflow
    // its 4-bit count: the window then takes several passes, pass k counting occurrences 15k .. 15k + 14 of each
    // (row, column) (a column's occurrences of a row are consecutive in its increasing list). One pass otherwise.
    for (int pass = 0;; ++pass) {
      for (int i = tid; i < W; i += NT) cnt[i] = 0ull;
      if (tid == 0) *sMore = 0;
      __syncthreads();
      // ---- count: one 4-bit field per column in each block row's word (integer adds: order-independent)
      {
        const int lo15 = 15 * pass;
        int tot = 0;
        for (int l = 0; l < Pv; ++l) tot += sCnt[l];
        bool more = false;
        for (int i = tid; i < tot; i += NT) {
          int l = 0, j = i;
          while (j >= sCnt[l]) j -= sCnt[l++];
          const int cur = sCur[l], a = cur + j;
          const int br = __ldg(rows + a);
          int occ = 0;  // earlier occurrences of br in the column's run
          if (a > cur && __ldg(rows + a - 1) == br) occ = a - first_at_least(rows, cur, a, br);
          more |= occ >= lo15 + 15;
          if (occ >= lo15 && occ < lo15 + 15 && br >= win0 && br < wend)
            atomicAdd(cnt + (br - win0), 1ull << (4 * l));
        }
        if (more) *sMore = 1;
      }
      __syncthreads();
      const bool again = *sMore != 0;
      // ---- compact the window's listed block rows, in order, in place
      const int len = compact_listed_rows<W, NT, NWARPS>(cnt, lbr, sScan, tid, lane, warp);

      // ---- the window's tiles: its merged rows as a virtual sequence of packed query rows
      const int64_t nt64 = (static_cast<int64_t>(len) * E + BQ - 1) / BQ;
      const int ntiles = static_cast<int>(nt64);  // len <= W
      WindowRowCursor cur_row;
      cur_row.init(trow_own, E);
      auto issue = [&](int stage) -> uint32_t {
        int rid = -1;
        uint32_t flag = 0;
        if (owner) {
          int lim = INT_MAX;
          unsigned long long w = 0ull;
          if (cur_row.query_row(p, len, win0, lbr, hq0, shift, rid, lim)) w = cnt[cur_row.ent];
          const int srow = stage * BQ + trow_own;
          stage_row_stats(sLse, sDl, srow, lseg, dlg, rid);
          sLim[srow] = lim;
          sW[srow] = w;
          flag = (rid >= 0 && (w != fullw || lim < klast)) ? 1u : 0u;
        }
        cur_row.advance(qE, rE, E);
        const uint32_t sQs = sQ + stage * Cfg::Q_STAGE, sDs = sD + stage * Cfg::Q_STAGE;
        copy_row_pair_tile<D, Map::PASSES, Map::RPP, Map::RPW, false>(sQs, sDs, qg, dg, rid, D, warp, lane,
                                                                      [](int rp) { return rp >= 0; });
        return flag;
      };

      uint32_t pending = issue_prologue<S>(issue, ntiles);
      for (int t = 0; t < ntiles; ++t) {
        const int stage = t % S;
        const bool need_mask = tile_landed<S - 2>(pending);
        if (t + S - 1 < ntiles) pending |= issue((t + S - 1) % S) << (S - 2);
        cp_async_commit();
        dkdv_tile<T, Cfg, true>(sK, sV, sQ, sD, fLse, fDl, sLim, sW, stage, wq, need_mask, lanes, key, sh, k0 + nlive,
                                nlive < nkeys, s_mul, cap_mul, use_cap, adk, adv, kf, vf);
      }
      if (!again) break;  // (uniform)
      __syncthreads();     // this pass's tiles are done with the list before the next pass rebuilds it
    }
    if (tid < Pv) sCur[tid] += sCnt[tid];
  }

  // ---- epilogue ------------------------------------------------------------------------------------------
  zero_dkdv_past(adk, adv, key, k0 + nlive, nlive < nkeys);
  dkdv_store<T, Cfg>(smem, sK, sV, static_cast<T*>(p.dk) + kvoff + k0 * kv_rstride,
                     static_cast<T*>(p.dv) + kvoff + k0 * kv_rstride, kv_rstride, nkeys, 0, wq, true, p.scale, adk,
                     adv);
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
