// The dq kernel of the backward: row-oriented, like the forward.
//
// One CTA = one tile of TM packed rows (p = r * g + j: query row r of the block row, head j of the KV head's
// group) of one block row of one (batch, KV head). It loads the tile's q, do, lse and delta once, then walks
// the block row's gathered key sequence (its listed blocks one after another) in KV tiles of BN rows, STAGES
// deep with cp.async, and per tile and warp (16 rows x a slice of NK keys, in chunks of NKC keys):
//   s = q k^T, dp = do v^T               (mma.sync m16n8k16, f32 accumulators)
//   p = exp2(s * log2e * scale - lse * log2e)   (soft cap: through tanh; causal mask when the tile needs it)
//   ds = p * (dp - delta) [* (1 - tanh^2)]
//   dq += ds k                            (ds packed to b16 straight from the accumulator registers)
// and finally writes dq * scale. No atomics: every dq element is written by exactly one thread, after a fixed
// order of additions, so dq is bitwise deterministic.
//
// Key rows that are invalid (entry past the row's range, block index outside [0, NB), key >= N) are zero in
// shared memory and have index INT_MAX: the tiles that hold one take the mask, which zeroes their p (exp(-lse) of a
// zero row overflows where lse < -88, and inf times their zero k would be NaN). Rows with lse = -inf (or padding)
// get lse2 = +inf: p = 0 exactly.
#pragma once

#include <climits>
#include <cstdint>

#include "common/bsattn_common.h"
#include "cuda/bwd/common.cuh"
#include "cuda/bwd/params.h"
#include "cuda/common/row_tiles.cuh"
#include "cuda/fwd/mma.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

// WM x WN warps: WM along the rows (16 each), WN along the keys of every KV tile (WN > 1: the partial dq of
// the key-split warps are summed through shared memory at the end, in a fixed order).
template <int D_, int WM_, int WN_, int BN_, int STAGES_, int NKC_, bool QREG_, int MINB_>
struct DqCfg {
  static constexpr int D = D_, WM = WM_, WN = WN_, BN = BN_, STAGES = STAGES_, NKC = NKC_, MINB = MINB_;
  static constexpr bool QREG = QREG_;  // q and do fragments in registers for the whole loop
  static constexpr int NWARPS = WM * WN, NT = NWARPS * 32;
  static constexpr int TM = WM * 16;  // packed rows per CTA
  static constexpr int NK = BN / WN;  // keys per warp per KV tile
  static constexpr int NT8 = NKC / 8;
  static constexpr int CPR = D / 8;
  static constexpr int RS = D * 2;  // bytes per smem row
  // shared memory: q, do tiles; K and V stages; key index per staged row; lse2, delta, causal limit and
  // (query row, head) per tile row
  static constexpr int Q_BYTES = TM * RS;
  static constexpr int KV_STAGE = BN * RS;
  static constexpr int KV_BYTES = 2 * STAGES * KV_STAGE;
  static constexpr int KIDX_BYTES = STAGES * BN * 4;
  static constexpr int ROW_BYTES = 3 * TM * 4 + TM * 8;
  static constexpr int SMEM = 2 * Q_BYTES + KV_BYTES + KIDX_BYTES + ROW_BYTES;
  static constexpr int OST = D + 8;  // f32 row stride of the WN > 1 merge buffer
  using KvMap = TileMap<D, NT, BN>;

  static_assert(NKC % 16 == 0 && NK % NKC == 0, "whole k16 steps of keys per warp");
  static_assert(WN == 1 || WN * TM * OST * 4 <= 2 * Q_BYTES + KV_BYTES, "merge buffer");
  static_assert(STAGES >= 2 && STAGES <= 8, "pipeline depth");
  static_assert(SMEM <= 163 * 1024, "shared memory per CTA (A100 limit)");
};

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::NT, Cfg::MINB) bsattn_bwd_dq_kernel(const __grid_constant__ Params p) {
  constexpr int D = Cfg::D, WN = Cfg::WN, BN = Cfg::BN, S = Cfg::STAGES, TM = Cfg::TM, NK = Cfg::NK;
  constexpr int NKC = Cfg::NKC, NT8 = Cfg::NT8, RS = Cfg::RS, CPR = Cfg::CPR, DT = D / 8;
  constexpr bool QREG = Cfg::QREG;
  using Map = typename Cfg::KvMap;
  extern __shared__ __align__(128) uint8_t smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;

  // ---- which tile (common/row_tiles.cuh: block rows last to first, the heavy rows of causal-like layouts first)
  const WorkTile w = decode_work(blockIdx.x, p);
  const int split = w.split, br = w.br, b = w.b, hk = w.hk;
  const int row0 = split * TM;                          // packed index of the tile's first row
  const int rows_in_block = min(p.R, p.M - br * p.R);    // query rows of this block row
  const int rows_valid = rows_in_block * p.g - row0;     // tile rows [0, rows_valid) are real
  if (rows_valid <= 0) return;                            // (uniform)
  const int qmin = br * p.R + row0 / p.g;

  const int64_t lid = layout_index(p, b, hk);
  const RowRange rr = row_range(p.indptr + lid * (p.MB + 1), br, p.nnz);
  const int len = static_cast<int>(rr.end - rr.start);
  const int64_t nt64 = (static_cast<int64_t>(len) * p.C + BN - 1) / BN;
  const int ntiles = nt64 > INT_MAX ? INT_MAX : static_cast<int>(nt64);

  const int64_t q_rstride = static_cast<int64_t>(p.Hq) * D;
  const int64_t qoff = (static_cast<int64_t>(b) * p.M + static_cast<int64_t>(br) * p.R) * q_rstride +
                       static_cast<int64_t>(hk) * p.g * D;
  const int64_t kvoff = (static_cast<int64_t>(b) * p.N * p.Hk + hk) * D;
  const int64_t kv_rstride = static_cast<int64_t>(p.Hk) * D;
  const int64_t soff = (static_cast<int64_t>(b) * p.M + static_cast<int64_t>(br) * p.R) * p.Hq +
                       static_cast<int64_t>(hk) * p.g;  // lse / delta of (b, first row, first head of group)

  // ---- shared memory ---------------------------------------------------------------------------------
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sD = sQ + Cfg::Q_BYTES;
  const uint32_t sK = sD + Cfg::Q_BYTES;
  const uint32_t sV = sK + S * Cfg::KV_STAGE;
  int* sKidx = reinterpret_cast<int*>(smem + 2 * Cfg::Q_BYTES + Cfg::KV_BYTES);
  float* sLse2 = reinterpret_cast<float*>(sKidx + S * BN);
  float* sDl = sLse2 + TM;
  int* sLim = reinterpret_cast<int*>(sDl + TM);
  int2* sRow = reinterpret_cast<int2*>(sLim + TM);  // (query row in the block row, head); r = -1 for padding

  // ---- prologue: q, do tiles; per-row statistics; the first S - 1 KV tiles -----------------------------
  {
    const uint32_t dst[2] = {sQ, sD};
    const T* const src[2] = {static_cast<const T*>(p.q) + qoff, static_cast<const T*>(p.dout) + qoff};
    load_packed_tile<D, TM, Cfg::NT, 2>(dst, src, row0, rows_valid, p.g, q_rstride, tid);
  }
  const int shift = p.causal_shift(b), nkeys = p.key_count(b);  // keys past nkeys (kv_lens) are never read
  for (int row = tid; row < TM; row += Cfg::NT) {
    float l2 = INFINITY, dl = 0.f;
    int lim = INT_MAX - 1;  // below the padding keys' index: they are masked like keys past a causal limit
    const int P = row0 + row;
    const int r = P / p.g, j = P - r * p.g;
    if (row < rows_valid) {
      const int64_t si = soff + static_cast<int64_t>(r) * p.Hq + j;
      row_stats(__ldg(p.lse + si), __ldg(p.delta + si), l2, dl);
      if (p.causal) lim = br * p.R + r + shift;
    }
    sRow[row] = make_int2(row < rows_valid ? r : -1, j);
    sLse2[row] = l2;
    sDl[row] = dl;
    sLim[row] = lim;
  }

  // KV gather state (owner lanes)
  const bool owner = lane < Map::OWN;
  const int trow_own = Map::owner_row(warp, lane);
  const int qC = BN / p.C, rC = BN - (BN / p.C) * p.C;
  const int qlim_min = p.causal ? qmin + shift : INT_MAX;  // a key above this needs the mask somewhere
  SeqWalk kw;
  kw.init(p.indices + lid * p.nnz + rr.start, len, trow_own, p.C, owner);
  const T* kg = static_cast<const T*>(p.k) + kvoff;
  const T* vg = static_cast<const T*>(p.v) + kvoff;

  // Issues the copies of the next KV tile into `stage`; returns 1 when this thread saw a key that needs the
  // causal mask, or a padding key (INT_MAX): its zero row gives p = exp(-lse), which overflows where lse < -88, and
  // inf * 0 would reach dq as NaN.
  auto issue = [&](int stage) -> uint32_t {
    int key = INT_MAX;
    if (kw.live(owner)) {
      const int blk = kw.nxt;
      if (blk >= 0 && blk < p.NB) {
        const int kk = blk * p.C + kw.off;
        if (kk < nkeys) key = kk;
      }
    }
    uint32_t flag = 0;
    if (owner) {
      sKidx[stage * BN + trow_own] = key;
      flag = key > qlim_min || key == INT_MAX ? 1u : 0u;
    }
    kw.advance(qC, rC, p.C, owner);
    const uint32_t sKs = sK + stage * Cfg::KV_STAGE, sVs = sV + stage * Cfg::KV_STAGE;
    copy_row_pair_tile<D, Map::PASSES, Map::RPP, Map::RPW, false>(sKs, sVs, kg, vg, key, kv_rstride, warp, lane,
                                                                  [](int kp) { return kp != INT_MAX; });
    return flag;
  };

  uint32_t pending = issue_prologue<S>(issue, ntiles);

  // ---- per-warp state ----------------------------------------------------------------------------------
  const int wrow0 = wm * 16;
  const bool warp_active = wrow0 < rows_valid;
  const int sw = lane & 7;
  const uint32_t q_lane = (wrow0 + (lane & 7) + ((lane >> 3) & 1) * 8) * RS;  // A operand rows (q, do)
  const int q_x = (lane >> 4) ^ sw;
  const uint32_t k_lane = (wn * NK + (lane & 7) + (lane >> 4) * 8) * RS;  // B operand, keys as n (k, v)
  const int k_x = ((lane >> 3) & 1) ^ sw;
  const uint32_t t_lane = (wn * NK + (lane & 7) + ((lane >> 3) & 1) * 8) * RS;  // B operand, keys as k (k^T)
  const int t_x = (lane >> 4) ^ sw;

  float acc[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[d][e] = 0.f;

  __syncthreads();  // row statistics visible (and, below, q / do when held in registers)
  float lse2[2], dl[2];
  int lim[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = wrow0 + (lane >> 2) + 8 * h;
    lse2[h] = sLse2[row];
    dl[h] = sDl[row];
    lim[h] = sLim[row];
  }
  uint32_t qf[QREG ? D / 16 : 1][4], df[QREG ? D / 16 : 1][4];
  if constexpr (QREG) {
    cp_async_wait<S - 2>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      ldsm_x4(qf[kk], sQ + q_lane + (((2 * kk) ^ q_x) << 4));
      ldsm_x4(df[kk], sD + q_lane + (((2 * kk) ^ q_x) << 4));
    }
  }
  const float s_mul = p.s_mul, cap_mul = p.cap_mul;
  const bool use_cap = p.use_cap != 0;

  // ---- main loop ---------------------------------------------------------------------------------------
  for (int t = 0; t < ntiles; ++t) {
    const int stage = t % S;
    const bool need_mask = tile_landed<S - 2>(pending);
    if (t + S - 1 < ntiles) pending |= issue((t + S - 1) % S) << (S - 2);
    cp_async_commit();

    if (warp_active) {
#pragma unroll 1
      for (int ch = 0; ch < NK / NKC; ++ch) {
        const uint32_t kb = stage * Cfg::KV_STAGE + ch * NKC * RS;
        float s[NT8][4], dp[NT8][4];
#pragma unroll
        for (int n = 0; n < NT8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
        // s = q k^T, dp = do v^T over the warp's 16 rows and the chunk's keys
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t aq[4], ad[4];
          if constexpr (QREG) {
#pragma unroll
            for (int e = 0; e < 4; ++e) aq[e] = qf[kk][e], ad[e] = df[kk][e];
          } else {
            ldsm_x4(aq, sQ + q_lane + (((2 * kk) ^ q_x) << 4));
            ldsm_x4(ad, sD + q_lane + (((2 * kk) ^ q_x) << 4));
          }
#pragma unroll
          for (int nb = 0; nb < NT8 / 2; ++nb) {
            uint32_t bk[4], bv[4];
            const uint32_t o = kb + k_lane + nb * 16 * RS + (((2 * kk) ^ k_x) << 4);
            ldsm_x4(bk, sK + o);
            ldsm_x4(bv, sV + o);
            Mma<T>::run(s[2 * nb], aq, bk[0], bk[1]);
            Mma<T>::run(s[2 * nb + 1], aq, bk[2], bk[3]);
            Mma<T>::run(dp[2 * nb], ad, bv[0], bv[1]);
            Mma<T>::run(dp[2 * nb + 1], ad, bv[2], bv[3]);
          }
        }
        // p, ds (in place of dp)
        dq_probs_ds<NT8>(s, dp, sKidx + stage * BN + wn * NK + ch * NKC + (lane & 3) * 2, need_mask, lse2, dl, lim,
                         s_mul, cap_mul, use_cap);
        // dq += ds k
#pragma unroll
        for (int kk = 0; kk < NKC / 16; ++kk) {
          uint32_t a[4];
          acc_to_a<T>(dp, kk, a);
#pragma unroll
          for (int nd = 0; nd < D / 16; ++nd) {
            uint32_t bt[4];
            ldsm_x4_trans(bt, sK + kb + t_lane + kk * 16 * RS + (((2 * nd) ^ t_x) << 4));
            Mma<T>::run(acc[2 * nd], a, bt[0], bt[1]);
            Mma<T>::run(acc[2 * nd + 1], a, bt[2], bt[3]);
          }
        }
      }
    }
  }

  // ---- epilogue: dq * scale ------------------------------------------------------------------------------
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with q / do / K / V (and every copy into them has landed)
  T* dqg = static_cast<T*>(p.dq) + qoff;
  const float scale = p.scale;
  if constexpr (WN == 1) {
    // each warp stages its own 16 rows in its rows of the q tile and copies them out
    if (warp_active) store_dq_rows<T, D>(acc, scale, sQ, wrow0, sRow, dqg, q_rstride, lane);
  } else {
    // key-split warps: f32 partials to shared memory, summed in warp order (deterministic)
    float* sO = reinterpret_cast<float*>(smem);
    constexpr int OST = Cfg::OST;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = wrow0 + (lane >> 2) + 8 * h;
      float* dst = sO + (wn * TM + row) * OST + (lane & 3) * 2;
#pragma unroll
      for (int d = 0; d < DT; ++d) *reinterpret_cast<float2*>(dst + d * 8) = make_float2(acc[d][2 * h], acc[d][2 * h + 1]);
    }
    __syncthreads();
    for (int i = tid; i < TM * CPR; i += Cfg::NT) {
      const int row = i / CPR, c = i % CPR;
      const int2 rj = sRow[row];
      if (rj.x >= 0) {
        const uint4 val = sum_partials8<T, WN>(sO + row * OST + c * 8, TM * OST, scale);
        st_global16(dqg + rj.x * q_rstride + rj.y * D + c * 8, val);
      }
    }
  }
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
