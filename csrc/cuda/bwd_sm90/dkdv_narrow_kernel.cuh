// dk and dv of the deterministic backward on Hopper (sm_90a) for narrow block columns (8 < C <= 16 at D = 128; every
// C > 8 at D = 256, in chunks of 16 or 32 keys; the mma.sync column tiles of bwd/dkdv_kernel.cuh elsewhere, and with
// BSATTN_BWD_DKDV=mma).
//
// One CTA = one warpgroup = the BK = 16 (or 32) keys of one block column c of one (batch, KV head), as the column kernels
// (bwd/common.cuh column_work): K and V are loaded once, then the column's block rows are walked as a virtual sequence
// of packed query rows (R * g per block row), gathered in tiles of BQ = 64 rows (q, do, lse, delta; bwd/common.cuh
// ColumnQueryGather), STAGES deep. Per tile:
//   s = q K^T, dp = do V^T          (wgmma ss m64nBK: M = the tile's rows, N = the keys; both operands K-major)
//   p, ds                            (soft cap, causal mask, padding keys, dead rows; in registers)
//   p^T, ds^T -> shared memory       (stmatrix .trans: BK keys x 64 rows, the K-major B operand of the next two)
//   dv^T += do^T p, dk^T += q^T ds   (wgmma ss_at m64nBK: M = D in m64 blocks, A = the do / q stage read MN-major)
// Four products per tile; dq is bwd_sm90/dq_kernel.cuh's. wgmma's M is at least 64 while a narrow column has 16 keys:
// the keys are N here, and dv, dk are computed transposed, with D as M. The mma.sync kernel takes the keys as its
// 16-row M instead, on instructions of a quarter of the rate.
//
// Cfg::WS (Sm90DkdvNarrowWsTile, the default; BSATTN_BWD_DKDV=narrow runs the form without): a producer warpgroup
// (warps 4-7) loads K, V and gathers the tiles, handing each stage over through mbarriers (full: copies landed, row
// statistics and mask flags stored; empty: the MMA warpgroup's products and reads of it done), so the MMA warpgroup
// meets no CTA barrier: only its own named barrier before the dv^T, dk^T products. Two CTAs of eight warps per SM.
// 2-3 % faster than the form without (H200, 2026-11-30: the kernel 2.88 against 2.95 ms at 4:64:16).
//
// Deterministic: dv^T and dk^T are summed in registers in the column's row order and written once (staged through
// the q stages); a long column is cut into pieces over several CTAs where the launch gives the column split's area
// (bwd/column_split.cuh: f32 partial sums added in piece order after). Padding keys (past C or N) are zero in K and
// V, and their p is selected to 0 (exp(-lse) may overflow); a missing query row has lse = -inf (p = 0) and delta = 0.
#pragma once

#include <climits>
#include <cstdint>

#include "cuda/bwd/column_split.cuh"
#include "cuda/bwd/common.cuh"
#include "cuda/bwd/params.h"
#include "cuda/bwd_sm90/config.cuh"
#include "cuda/common/gather.cuh"
#include "cuda/common/wgmma.cuh"
#include "cuda/fwd/mma.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

// Four 8 x 8 blocks of a warp's 16 x 16 accumulator slice (element 4 j + 2 h + e of acc: row 8 h + lane / 4 of the
// slice, column 8 j + 2 (lane % 4) + e) -> shared memory transposed: row i of the stored block (j, h) is column 8 j + i
// of the slice, its 8 rows' values (16 bytes) at row_addr(8 j + i, h). Values scaled by mul, packed to T.
template <typename T, class RowAddr>
__device__ __forceinline__ void store_slice_trans(const float (&acc)[8], float mul, int lane, RowAddr&& row_addr) {
  uint32_t r[4];
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const int j = m >> 1, h = m & 1;
    r[m] = Mma<T>::pack(acc[4 * j + 2 * h] * mul, acc[4 * j + 2 * h + 1] * mul);
  }
  const int m = lane >> 3, i = lane & 7;
  stsm_x4_trans(row_addr(8 * (m >> 1) + i, m & 1), r);
}

// Keys 16 q .. 16 q + 15 of an m64nN accumulator (N / 2 floats a thread, 4 per 8-key block): its 8 floats.
template <int N>
__device__ __forceinline__ const float (&slice16(const float (&acc)[N], int q))[8] {
  return *reinterpret_cast<const float(*)[8]>(acc + 8 * q);
}

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::NT_ALL, Cfg::MINB)
    bsattn_bwd_sm90_dkdv_narrow_kernel(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = Cfg::D, BK = Cfg::BK, BQ = Cfg::BQ, S = Cfg::STAGES, H = Cfg::HALVES;
  constexpr int NJ = BK / 8;  // 8-key blocks of an accumulator row
  constexpr int NS = BK / 16;  // 16-key slices (store_slice_trans)
  using Map = typename Cfg::QMap;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // ---- which column: the slot-th longest block column of (b, hk) (bwd/common.cuh column_work) -------------
  ColumnWork cw_;
  if (!column_work<D, BK, BQ>(p, cw_, blockIdx.x)) return;  // (uniform)
  const int hk = cw_.hk, k0 = cw_.k0, nkeys = cw_.nkeys, nlive = live_keys(p, cw_.b, k0, nkeys);
  const int64_t lid = cw_.lid, cs = cw_.cs;
  const int len = cw_.len, ntiles = cw_.ntiles;
  const int64_t kvoff = cw_.kvoff, kv_rstride = cw_.kv_rstride, qboff = cw_.qboff;

  // ---- shared memory: K, V, S stages of q and do, p^T, ds^T; per staged row raw lse, delta, causal limit ---
  uint32_t sK;
  uint8_t* const base = align_smem_1024(smem_raw, sK);
  const uint32_t sV = sK + Cfg::K_BYTES, sQ = sV + Cfg::K_BYTES, sD = sQ + S * Cfg::Q_STAGE;
  const uint32_t sPT = sD + S * Cfg::Q_STAGE, sST = sPT + Cfg::P_BYTES;
  const uint32_t sLse = sK + Cfg::TILE_BYTES, sDl = sLse + S * BQ * 4;
  const float* const fLse = reinterpret_cast<const float*>(base + Cfg::TILE_BYTES);
  const float* const fDl = fLse + S * BQ;
  int* const sLim = reinterpret_cast<int*>(base + Cfg::TILE_BYTES + 2 * S * BQ * 4);

  // ---- prologue: K, V (rows past nlive zeroed); the first S - 1 query tiles ---------------------------------
  // (WS: the producer warpgroup's, handing every stage over through full / empty mbarriers)
  const uint32_t bar_full = sK + Cfg::BAR_OFF, bar_empty = bar_full + S * 8;
  int* const sFlag = reinterpret_cast<int*>(base + Cfg::BAR_OFF + 2 * S * 8);  // [S][4]: a row needs the mask
  uint32_t pending = 0;
  if constexpr (Cfg::WS) {
    if (tid == 0) {
#pragma unroll
      for (int s = 0; s < S; ++s) {
        mbar_init(bar_full + 8 * s, 128);
        mbar_init(bar_empty + 8 * s, Cfg::NT);
      }
    }
    __syncthreads();  // the mbarriers initialised
    if (warp >= Cfg::NWARPS) {
      const int pw = warp - Cfg::NWARPS;
      if (ntiles == 0) return;  // (no copy: the consumers wait for none)
      const T* kg = static_cast<const T*>(p.k) + kvoff + k0 * kv_rstride;
      const T* vg = static_cast<const T*>(p.v) + kvoff + k0 * kv_rstride;
      load_row_pair_tile<D, 128, BK, typename Cfg::KLayout>(sK, sV, kg, vg, nlive, kv_rstride, tid - Cfg::NT);
      ColumnQueryGather<D, BQ, Map, typename Cfg::QLayout, T> qgat;
      qgat.init(p, p.col_rows + lid * p.nnz + cs, len, cw_.b, hk, k0 + nkeys - 1, qboff, pw, lane);
      for (int t = 0; t < ntiles; ++t) {
        const int stage = t % S;
        if (t >= S) mbar_wait(bar_empty + 8 * stage, ((t / S) - 1) & 1);
        const uint32_t f = qgat.issue(p, sQ + stage * Cfg::Q_STAGE, sD + stage * Cfg::Q_STAGE, sLse, sDl, sLim,
                                      nullptr, stage, pw, lane);
        const unsigned any = __ballot_sync(0xffffffffu, f != 0);
        if (lane == 0) sFlag[stage * 4 + pw] = any != 0;
        // tile t (and, with tile 0, K and V) landed: every copy the thread issued before; the plain arrival releases
        // the rows' statistics and the flag (the consumers' wait on the last tile covers every copy)
        cp_async_mbar_arrive(bar_full + 8 * stage);
        mbar_arrive(bar_full + 8 * stage);
      }
      return;
    }
  } else {
    const T* kg = static_cast<const T*>(p.k) + kvoff + k0 * kv_rstride;
    const T* vg = static_cast<const T*>(p.v) + kvoff + k0 * kv_rstride;
    load_row_pair_tile<D, Cfg::NT, BK, typename Cfg::KLayout>(sK, sV, kg, vg, nlive, kv_rstride, tid);
  }
  ColumnQueryGather<D, BQ, Map, typename Cfg::QLayout, T> qgat;
  auto issue = [&](int stage) -> uint32_t {
    return qgat.issue(p, sQ + stage * Cfg::Q_STAGE, sD + stage * Cfg::Q_STAGE, sLse, sDl, sLim, nullptr, stage, warp,
                      lane);
  };
  if constexpr (!Cfg::WS) {
    qgat.init(p, p.col_rows + lid * p.nnz + cs, len, cw_.b, hk, k0 + nkeys - 1, qboff, warp, lane);
    pending = issue_prologue<S>(issue, ntiles);
  }

  // ---- operand descriptors (stage 0; + stage * kStage for a later stage) -----------------------------------
  constexpr uint64_t kStage = Cfg::Q_STAGE >> 4;
  const uint64_t q_desc = sw128_desc(sQ, 16, 1024), d_desc = sw128_desc(sD, 16, 1024);  // A of s, dp: K-major
  const uint64_t k_desc = sw128_desc(sK, 16, 1024), v_desc = sw128_desc(sV, 16, 1024);  // B of s, dp: K-major
  const uint64_t q_mn = sw128_desc(sQ, BQ * 128, 1024), d_mn = sw128_desc(sD, BQ * 128, 1024);  // A of dk^T, dv^T
  const uint64_t pt_desc = sw128_desc(sPT, 16, 1024), st_desc = sw128_desc(sST, 16, 1024);     // B: p^T, ds^T

  // ---- per-thread state: the thread's rows r0, r0 + 8 of the tile; its keys 8 j + 2 (lane % 4) + e ----------
  const int r0 = warp * 16 + (lane >> 2);
  const int kq = 2 * (lane & 3);
  float s[NJ][4], dp[NJ][4];
  float(&sf)[BK / 2] = reinterpret_cast<float(&)[BK / 2]>(s);
  float(&dpf)[BK / 2] = reinterpret_cast<float(&)[BK / 2]>(dp);
  float dvt[H][BK / 2], dkt[H][BK / 2];  // dv^T, dk^T: rows 64 hh + r0 (+ 8) of D, the 16 keys
#pragma unroll
  for (int hh = 0; hh < H; ++hh)
#pragma unroll
    for (int i = 0; i < BK / 2; ++i) dvt[hh][i] = dkt[hh][i] = 0.f;
  const float s_mul = p.s_mul, cap_mul = p.cap_mul;
  const bool use_cap = p.use_cap != 0;
  const bool part = nlive < BK;  // (uniform) padding keys (past N or kv_lens) in the tile

  // ---- main loop -----------------------------------------------------------------------------------------
  for (int t = 0; t < ntiles; ++t) {
    const int stage = t % S;
    // (the barrier also means: every warp is done with p^T, ds^T; WS: each warp is, its products of the last tile
    // waited, and wgmma is warpgroup-wide)
    bool need_mask;
    if constexpr (Cfg::WS) {
      mbar_wait(bar_full + 8 * stage, (t / S) & 1);
      fence_async_shared();  // the producer's landed copies -> wgmma
      const int* f = sFlag + stage * 4;
      need_mask = (f[0] | f[1] | f[2] | f[3]) != 0;
    } else {
      need_mask = tile_landed<S - 2>(pending, fence_async_shared);
    }

    // s = q K^T, dp = do V^T (one commit group each); the next tile's gather is issued while they run
    wgmma_fence();
    wgmma_ss_kmajor<T, BK, D, BQ, BK>(sf, q_desc + stage * kStage, k_desc);
    wgmma_commit();
    wgmma_ss_kmajor<T, BK, D, BQ, BK>(dpf, d_desc + stage * kStage, v_desc);
    wgmma_commit();
    if constexpr (!Cfg::WS) {
      if (t + S - 1 < ntiles) pending |= issue((t + S - 1) % S) << (S - 2);
      cp_async_commit();
    }
    wgmma_wait<0>();
    fence_regs(sf);
    fence_regs(dpf);

    // p, ds of the thread's two rows (bwd/common.cuh row_stats: a dead row has p = 0 and delta = 0)
    float lse2[2], dl[2];
    int lim[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int sr = stage * BQ + r0 + 8 * h;
      row_stats(fLse[sr], fDl[sr], lse2[h], dl[h]);
      lim[h] = need_mask ? sLim[sr] : INT_MAX;
    }
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1, kc = 8 * j + kq + (e & 1);
        float pv, fac = 1.f;
        if (use_cap)
          pv = prob_cap(s[j][e], s_mul, cap_mul, lse2[h], fac);
        else
          pv = prob_nocap(s[j][e], s_mul, lse2[h]);
        // selects, not products: p of a masked or padding key may be inf
        if (need_mask && k0 + kc > lim[h]) pv = 0.f;
        const bool pad = part && kc >= nlive;
        if (pad) pv = 0.f;
        float ds = pv * (dp[j][e] - dl[h]);
        if (use_cap) ds *= fac;
        s[j][e] = pv;
        dp[j][e] = pad ? 0.f : ds;  // (0 even where delta is not finite: the key takes no part)
      }

    // p^T, ds^T -> shared memory (row = key, its 64 tile rows in one 128-byte column block: warp w's rows are
    // chunks 2 w, 2 w + 1)
#pragma unroll
    for (int q = 0; q < NS; ++q) {
      auto p_row = [&](int key, int h) { return sPT + Cfg::PLayout::off(16 * q + key, 2 * warp + h); };
      auto ds_row = [&](int key, int h) { return sST + Cfg::PLayout::off(16 * q + key, 2 * warp + h); };
      store_slice_trans<T>(slice16(sf, q), 1.f, lane, p_row);
      store_slice_trans<T>(slice16(dpf, q), 1.f, lane, ds_row);
    }
    fence_async_shared();
    // every warp's rows of p^T, ds^T stored
    if constexpr (Cfg::WS)
      named_bar_sync(1, Cfg::NT);
    else
      __syncthreads();

    // dv^T += do^T p, dk^T += q^T ds over the tile's 64 rows (4 k16 steps), per m64 half of D; one commit group
    wgmma_fence();
#pragma unroll
    for (int hh = 0; hh < H; ++hh)
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk) {
        const uint64_t a_off = (stage * Cfg::Q_STAGE + hh * BQ * 128 + kk * 2048) >> 4;
        WgmmaOp<T, BK>::ss_at(dvt[hh], d_mn + a_off, pt_desc + ((kk * 32) >> 4), 1);
        WgmmaOp<T, BK>::ss_at(dkt[hh], q_mn + a_off, st_desc + ((kk * 32) >> 4), 1);
      }
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int hh = 0; hh < H; ++hh) {
      fence_regs(dvt[hh]);
      fence_regs(dkt[hh]);
    }
    if constexpr (Cfg::WS) mbar_arrive(bar_empty + 8 * stage);  // every read of the stage done
  }

  if (nlive < nkeys) {  // (uniform) keys past kv_lens: 0, not 0 x an inf in q or do (common.cuh zero_dkdv_past)
#pragma unroll
    for (int hh = 0; hh < H; ++hh)
#pragma unroll
      for (int i = 0; i < BK / 2; ++i)
        if (8 * (i >> 2) + kq + (i & 1) >= nlive) dvt[hh][i] = dkt[hh][i] = 0.f;
  }

  // ---- epilogue: a piece of a split column (bwd/column_split.cuh): its f32 partial sums, straight from the
  // accumulators (no shared memory, so no barrier); else dv, dk * scale, staged [key][D] in stage 0 of q (transposed
  // back), 16 bytes a thread --------------------------------------------------------------------------------------
  if (p.split_items != nullptr) {
    ColumnWork pw;  // (read again rather than kept live through the loop)
    (void)column_work<D, BK, BQ>(p, pw, blockIdx.x);
    if (pw.part >= 0) {  // (uniform)
      store_split_partial_t<D, BK>(p, pw, warp, lane, dkt, dvt);
      return;
    }
  }
  if constexpr (Cfg::WS) {
    named_bar_sync(1, Cfg::NT);  // every product done; every copy landed (the waits on full): stage 0 is free
  } else {
    cp_async_wait<0>();
    __syncthreads();  // every product done, no copy in flight: stage 0 is free
  }
  const uint32_t sOutV = sQ, sOutK = sQ + BK * Cfg::OUT_PITCH;
#pragma unroll
  for (int hh = 0; hh < H; ++hh)
#pragma unroll
    for (int q = 0; q < NS; ++q) {
      // slice row 8 h + lane / 4 of warp w = D index 64 hh + 16 w + ..; its column = key 16 q + ..
      const uint32_t sv = sOutV + 16 * q * Cfg::OUT_PITCH, sk = sOutK + 16 * q * Cfg::OUT_PITCH;
      auto v_row = [&](int key, int h) { return sv + key * Cfg::OUT_PITCH + (64 * hh + 16 * warp + 8 * h) * 2; };
      auto k_row = [&](int key, int h) { return sk + key * Cfg::OUT_PITCH + (64 * hh + 16 * warp + 8 * h) * 2; };
      store_slice_trans<T>(slice16(dvt[hh], q), 1.f, lane, v_row);
      store_slice_trans<T>(slice16(dkt[hh], q), p.scale, lane, k_row);
    }
  if constexpr (Cfg::WS)
    named_bar_sync(1, Cfg::NT);
  else
    __syncthreads();
  T* const dvg = static_cast<T*>(p.dv) + kvoff + k0 * kv_rstride;
  T* const dkg = static_cast<T*>(p.dk) + kvoff + k0 * kv_rstride;
  constexpr int CPR = D / 8;
#pragma unroll
  for (int i = tid; i < BK * CPR; i += Cfg::NT) {
    const int key = i / CPR, c = i % CPR;
    if (key < nkeys) {
      st_global16(dvg + key * kv_rstride + c * 8, ld_shared16(sOutV + key * Cfg::OUT_PITCH + c * 16));
      st_global16(dkg + key * kv_rstride + c * 8, ld_shared16(sOutK + key * Cfg::OUT_PITCH + c * 16));
    }
  }
#endif
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
