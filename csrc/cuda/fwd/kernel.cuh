// The block-sparse attention forward kernel (FlashAttention-2 style, mma.sync m16n8k16).
//
// One CTA = one tile of TM packed rows of one block row (see common/row_tiles.cuh, config.cuh):
//   1. load the packed Q tile (g query heads sharing a KV head are rows of one tile);
//   2. walk the block row's gathered key sequence in KV tiles of BN rows, STAGES deep with cp.async
//      (gather_kv.cuh); per tile, each warp computes S = Q K^T for its rows and key slice, masks it only
//      when the tile needs it (a CTA-wide flag: some key row invalid, or cut by the causal limit),
//      applies the online softmax (softmax.cuh) and accumulates O += P V with P kept in registers
//      (the m16n8 accumulator layout is the A-operand layout of the next mma once packed to b16x2);
//   3. normalise, merge the key-split warps if any, and store o and lse (epilogue.cuh).
#pragma once

#include <climits>
#include <cstdint>

#include "common/bsattn_common.h"
#include "cuda/common/row_tiles.cuh"
#include "cuda/fwd/config.cuh"
#include "cuda/fwd/epilogue.cuh"
#include "cuda/fwd/gather_kv.cuh"
#include "cuda/fwd/mma.cuh"
#include "cuda/fwd/params.h"
#include "cuda/fwd/softmax.cuh"

// Development only (csrc/cuda/dev/timeline_fwd.cu defines it): per-warp timestamps of the kernel's phases.
#ifndef BSATTN_FWD_TIMELINE_MARK
#define BSATTN_FWD_TIMELINE_MARK(k)
#endif

namespace bsattn {
namespace cuda {

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::NT, Cfg::MINB) bsattn_fwd_kernel(const __grid_constant__ FwdParams p) {
  constexpr int D = Cfg::D, MI = Cfg::MI, WN = Cfg::WN, BN = Cfg::BN, S = Cfg::STAGES;
  constexpr int TM = Cfg::TM, NK = Cfg::NK, NT8 = Cfg::NT8, DT = D / 8;
  constexpr bool QREG = Cfg::QREG;
  extern __shared__ __align__(128) uint8_t smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  BSATTN_FWD_TIMELINE_MARK(0);
  const int wm = warp / WN, wn = warp % WN;

  // ---- which tile, which rows ----------------------------------------------------------------
  const WorkTile w = decode_work(blockIdx.x, p);
  const int row0 = w.split * TM;                        // packed index of the tile's first row
  const int rows_in_block = min(p.R, p.M - w.br * p.R);  // query rows of this block row
  const int rows_valid = rows_in_block * p.g - row0;    // tile rows [0, rows_valid) are real
  if (rows_valid <= 0) return;                          // (uniform) a split past the last query row
  const int qmin = w.br * p.R + row0 / p.g;             // smallest query row of the tile

  const int64_t lid = p.layout_index(w.b, w.hk);
  const RowRange rr = row_range(p.indptr + lid * (p.MB + 1), w.br, p.nnz);
  const int len = static_cast<int>(rr.end - rr.start);
  const int64_t ntiles64 = (static_cast<int64_t>(len) * p.C + BN - 1) / BN;
  const int ntiles = ntiles64 > INT_MAX ? INT_MAX : static_cast<int>(ntiles64);

  const int64_t q_rstride = static_cast<int64_t>(p.Hq) * D;
  const int64_t qoff = (static_cast<int64_t>(w.b) * p.M + static_cast<int64_t>(w.br) * p.R) * q_rstride +
                       static_cast<int64_t>(w.hk) * p.g * D;
  const int64_t kvoff = (static_cast<int64_t>(w.b) * p.N * p.Hk + w.hk) * D;

  // ---- shared memory --------------------------------------------------------------------------
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sK = sQ + Cfg::Q_BYTES;
  const uint32_t sV = sK + S * Cfg::KV_STAGE_BYTES;
  int* sKidx = reinterpret_cast<int*>(smem + Cfg::Q_BYTES + Cfg::KV_BYTES);
  float* sM = reinterpret_cast<float*>(smem + Cfg::Q_BYTES + Cfg::KV_BYTES + Cfg::KIDX_BYTES);
  float* sL = sM + WN * TM;
  int* sLim = reinterpret_cast<int*>(sL + WN * TM);  // per tile row: causal limit i + shift (else INT_MAX - 1)

  GatherShared* gs = reinterpret_cast<GatherShared*>(sLim + TM);  // (16-byte aligned: TM, WN are even)
  int2* sOwn = reinterpret_cast<int2*>(gs + 1);                   // gather walk state per owner row [BN]
  int2* sRow = sOwn + BN;  // per tile row: (query row in the block row, head in the group), r = -1 for padding

  // ---- prologue: Q tile, CTA constants, then the first S - 1 KV tiles ---------------------------
  // Ordered for latency (nothing runs beside it in this CTA): the Q copies go out first, the owner lanes
  // load their first block indices (after the indptr load above) before the barrier, not after it.
  {
    const uint32_t dst[1] = {sQ};
    const T* const src[1] = {static_cast<const T*>(p.q) + qoff};
    load_packed_tile<D, TM, Cfg::NT, 1>(dst, src, row0, rows_valid, p.g, q_rstride, tid);
  }
  BSATTN_FWD_TIMELINE_MARK(1);
  const int shift = p.causal_shift(w.b);
  for (int row = tid; row < TM; row += Cfg::NT) {
    const int P = row0 + row, r = P / p.g;
    sRow[row] = make_int2(row < rows_valid ? r : -1, P - r * p.g);
    sLim[row] = p.causal ? w.br * p.R + r + shift : INT_MAX - 1;
  }
  const int32_t* idx = p.indices + lid * p.nnz + rr.start;
  KvGather<T, Cfg> kv;
  kv.init(p, idx, len, sOwn, warp, lane);
  if (tid == 0) {
    gs->kvoff = kvoff;
    gs->idx = idx;
    gs->len = len;
    gs->qC = static_cast<int16_t>(BN / p.C);
    gs->rC = static_cast<int16_t>(BN - gs->qC * p.C);
    gs->qlim_min = p.causal ? qmin + shift : INT_MAX;
    gs->nkeys = p.key_count(w.b);
  }
  __syncthreads();
  BSATTN_FWD_TIMELINE_MARK(2);

  uint32_t pending = 0;  // bit i: this thread saw a row needing the mask in the i-th tile not yet consumed
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < ntiles) pending |= kv.issue(p, *gs, sK, sV, sKidx, s, warp, lane) << s;
    cp_async_commit();
  }
  BSATTN_FWD_TIMELINE_MARK(3);

  // ---- per-warp state -------------------------------------------------------------------------
  const int wrow0 = wm * MI * 16;                 // warp's first row in the tile
  const bool warp_active = wrow0 < rows_valid;    // (uniform per warp) skip strips of pure padding
  float o[MI][DT][4];
  float m[MI][2], l[MI][2];
  float lsum[MI][4];  // MMA_SUM: row sums as an m16n8 accumulator (every column holds the row's sum)
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int d = 0; d < DT; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mi][d][e] = 0.f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      m[mi][h] = -INFINITY;
      l[mi][h] = 0.f;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) lsum[mi][e] = 0.f;
  }

  // Per-lane ldmatrix address parts (fragment layouts in mma.cuh: lanes 8i..8i+7 address matrix i). All
  // rows used by a lane are = lane (mod 8), so the swizzle term is a per-lane constant XORed into the
  // chunk index.
  constexpr int RS = D * 2;  // row stride (bytes)
  const int sw = lane & 7;
  const uint32_t q_lane = sQ + (wrow0 + (lane & 7) + ((lane >> 3) & 1) * 8) * RS;
  const int q_x = (lane >> 4) ^ sw;
  const uint32_t k_lane = (wn * NK + (lane & 7) + (lane >> 4) * 8) * RS;
  const int k_x = ((lane >> 3) & 1) ^ sw;
  const uint32_t v_lane = (wn * NK + (lane & 7) + ((lane >> 3) & 1) * 8) * RS;
  const int v_x = (lane >> 4) ^ sw;

  uint32_t qf[QREG ? MI : 1][QREG ? D / 16 : 1][4];
  if constexpr (QREG) {
    cp_async_wait<S - 2>();
    __syncthreads();
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ldsm_x4(qf[mi][kk], q_lane + mi * 16 * RS + (((2 * kk) ^ q_x) << 4));
  }

  // ---- main loop ------------------------------------------------------------------------------
  for (int t = 0; t < ntiles; ++t) {
    const int stage = t % S;
    const bool need_mask = tile_landed<S - 2>(pending);
    if (t == 0) BSATTN_FWD_TIMELINE_MARK(4);
    if (t + S - 1 < ntiles) pending |= kv.issue(p, *gs, sK, sV, sKidx, (t + S - 1) % S, warp, lane) << (S - 2);
    cp_async_commit();

    if (warp_active) {
      // The warp's key slice of the tile, in chunks of NKC keys.
#pragma unroll 1
      for (int ch = 0; ch < NK / Cfg::NKC; ++ch) {
        const uint32_t sKs = sK + stage * Cfg::KV_STAGE_BYTES + k_lane + ch * Cfg::NKC * RS;
        const uint32_t sVs = sV + stage * Cfg::KV_STAGE_BYTES + v_lane + ch * Cfg::NKC * RS;

        // S = Q K^T over the warp's rows and the chunk's keys
        float s[MI][NT8][4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int n = 0; n < NT8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mi][n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t a[MI][4];
          if constexpr (QREG) {
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
              for (int e = 0; e < 4; ++e) a[mi][e] = qf[mi][kk][e];
          } else {
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
              ldsm_x4(a[mi], q_lane + mi * 16 * RS + (((2 * kk) ^ q_x) << 4));
          }
#pragma unroll
          for (int nb = 0; nb < NT8 / 2; ++nb) {
            uint32_t b[4];
            ldsm_x4(b, sKs + nb * 16 * RS + (((2 * kk) ^ k_x) << 4));
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
              Mma<T>::run(s[mi][2 * nb], a[mi], b[0], b[1]);
              Mma<T>::run(s[mi][2 * nb + 1], a[mi], b[2], b[3]);
            }
          }
        }

        const float mul = prepare_scores<MI, NT8>(s, p);
        if (need_mask)
          mask_scores<MI, NT8>(s, sKidx + stage * BN + wn * NK + ch * Cfg::NKC, sLim + wrow0, lane);
        online_softmax<MI, NT8, DT, Cfg::MMA_SUM>(s, mul, m, l, o, lsum);

        // O += P V, P from the score registers
#pragma unroll
        for (int kk = 0; kk < Cfg::NKC / 16; ++kk) {
          uint32_t pa[MI][4];
#pragma unroll
          for (int mi = 0; mi < MI; ++mi) {
            acc_to_a<T>(s[mi], kk, pa[mi]);
            if constexpr (Cfg::MMA_SUM) Mma<T>::run(lsum[mi], pa[mi], Mma<T>::kOnes, Mma<T>::kOnes);
          }
#pragma unroll
          for (int nd = 0; nd < D / 16; ++nd) {
            uint32_t b[4];
            ldsm_x4_trans(b, sVs + kk * 16 * RS + (((2 * nd) ^ v_x) << 4));
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
              Mma<T>::run(o[mi][2 * nd], pa[mi], b[0], b[1]);
              Mma<T>::run(o[mi][2 * nd + 1], pa[mi], b[2], b[3]);
            }
          }
        }
      }
    }
  }

  // ---- epilogue -------------------------------------------------------------------------------
  BSATTN_FWD_TIMELINE_MARK(5);
  if constexpr (Cfg::MMA_SUM) {
    // The epilogues sum l over the 4 lanes of a row; lsum is already the whole row's sum in every lane
    // (x 0.25 is exact).
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      l[mi][0] = 0.25f * lsum[mi][0];
      l[mi][1] = 0.25f * lsum[mi][2];
    }
  }
  OutRows out;
  out.og = static_cast<T*>(p.o) + qoff;
  out.lseg = p.lse + (static_cast<int64_t>(w.b) * p.M + static_cast<int64_t>(w.br) * p.R) * p.Hq +
             static_cast<int64_t>(w.hk) * p.g;
  out.o_rstride = q_rstride;
  out.Hq = p.Hq;
  out.sRow = sRow;
  if constexpr (WN == 1) {
    // Warps write their output rows over their own Q rows. The barrier orders that after every
    // thread's Q copies (other warps load a warp's Q rows; with no KV tile there was no barrier yet).
    cp_async_wait<0>();
    __syncthreads();
    BSATTN_FWD_TIMELINE_MARK(6);
    if (warp_active) store_rows_single<T, Cfg>(o, m, l, sQ + wrow0 * RS, out, wrow0, lane);
  } else {
    BSATTN_FWD_TIMELINE_MARK(6);
    merge_and_store<T, Cfg>(o, m, l, sM, sL, reinterpret_cast<float*>(smem), out, wm, wn, tid, lane);
  }
  BSATTN_FWD_TIMELINE_MARK(7);
}

}  // namespace cuda
}  // namespace bsattn
