// The backward for Hopper (sm_90a): dq, dk and dv in one column-oriented pass on warpgroup MMA (wgmma), dq
// accumulated in a float32 buffer with atomic adds (bwd_sm90/launch.cuh zeroes it before and converts it after).
//
// (Two warpgroups: D = 128 and C >= 128 run kernel_ws.cuh, this tile plus a producer warpgroup, by default; this
// kernel's two-warpgroup instantiation stays as the A / B baseline, BSATTN_BWD_SM90_TILE=wide.)
//
// One CTA = BK = 64 keys per warpgroup (one or two) of one block column c of one (batch, KV head), as the dk / dv
// kernel (bwd/dkdv_kernel.cuh): K and V are loaded once, then the column's block rows are walked as a virtual
// sequence of packed query rows (R * g per block row: the g heads of the group are summed inside the kernel),
// gathered in tiles of BQ = 64 rows (q, do, lse, delta; bwd/common.cuh ColumnQueryGather). Per tile:
//   s^T = K q^T, dp^T = V do^T        (wgmma ss, m64 = the keys, n64 = the rows; both operands K-major)
//   p^T, ds^T                          (bwd/common.cuh dkv_probs_ds: soft cap, causal mask, dead rows)
//   dv += p^T do, dk += ds^T q         (wgmma rs: p^T, ds^T from registers; do, q read MN-major, no transpose)
//   dS -> shared memory, row-major     (stmatrix .trans of the ds^T registers)
//   dq_tile = dS K                     (wgmma ss_bt, m64 = the rows; K read MN-major) -> red.add to dq_accum
//                                      (two warpgroups: each its half of dq's columns, over both warpgroups' keys,
//                                      staged in shared memory and added by the bulk copy engine)
// Five matrix products per tile (the deterministic kernels need seven: they compute s and p twice). The gather of
// tile t + S - 1 is issued under the first two, and dq is queued behind dk, dv (one wait per tile for all three).
// CTAs run the longest block columns first, a few heads at a time (bwd/common.cuh column_tile).
// dk and dv stay deterministic (each element summed in registers in a fixed order and written once); dq is not
// (the order of the float adds into dq_accum varies): `deterministic=True` selects the two-kernel backward.
//
// Padding key rows (past C or N) are zero in K and V and their p, ds are zeroed (p = exp(-lse) could overflow): they
// add nothing to dq, and their dk / dv are never written. Keys past the batch element's length (kv_lens) are padding
// too, but their rows are written: 0 (bwd/common.cuh live_keys, zero_dkdv_past). A missing query row (past its block
// row's R, past M, or a garbage block row) is zero with lse = -inf (p = 0) and global row -1: no red.add for it.
#pragma once

#include <climits>
#include <cstdint>

#include "cuda/bwd/common.cuh"
#include "cuda/bwd/dkdv_kernel.cuh"
#include "cuda/bwd/params.h"
#include "cuda/bwd/column_split.cuh"
#include "cuda/bwd_sm90/config.cuh"
#include "cuda/bwd_sm90/tile.cuh"
#include "cuda/common/gather.cuh"
#include "cuda/common/wgmma.cuh"
#include "cuda/fwd/mma.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::NT, Cfg::MINB) bsattn_bwd_sm90_kernel(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = Cfg::D, BK = Cfg::BK, BQ = Cfg::BQ, S = Cfg::STAGES, DQN = Cfg::DQN;
  constexpr int NQ8 = BQ / 8, DT = D / 8, DQT = DQN / 8;
  using Map = typename Cfg::QMap;
  extern __shared__ __align__(1024) uint8_t smem_raw[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = Cfg::WG > 1 ? warp >> 2 : 0, wl = Cfg::WG > 1 ? warp & 3 : warp;  // warpgroup; warp in it

  // ---- which tile: key tile kc of the slot-th longest block column of (b, hk) (bwd/common.cuh column_work) -
  ColumnWork cw_;
  if (!column_work<D, BK, BQ>(p, cw_, blockIdx.x)) return;  // (uniform)
  const int hk = cw_.hk, k0 = cw_.k0, nkeys = cw_.nkeys, nlive = live_keys(p, cw_.b, k0, nkeys), kend = k0 + nlive;
  const int64_t lid = cw_.lid, cs = cw_.cs;
  const int len = cw_.len, ntiles = cw_.ntiles;
  const int64_t kvoff = cw_.kvoff, kv_rstride = cw_.kv_rstride, qboff = cw_.qboff;

  // ---- shared memory (tile.cuh Sm90Smem) --------------------------------------------------------------
  const Sm90Smem<Cfg, 1> sm(smem_raw);
  uint8_t* smem = sm.base;

  // ---- prologue: K, V; the first S - 1 query tiles ----------------------------------------------------
  {
    const T* kg = static_cast<const T*>(p.k) + kvoff + k0 * kv_rstride;
    const T* vg = static_cast<const T*>(p.v) + kvoff + k0 * kv_rstride;
    load_row_pair_tile<D, Cfg::NT, BK, typename Cfg::KLayout>(sm.sK, sm.sV, kg, vg, nlive, kv_rstride, tid);
  }
  ColumnQueryGather<D, BQ, Map, typename Cfg::QLayout, T> qgat;
  qgat.init(p, p.col_rows + lid * p.nnz + cs, len, cw_.b, hk, k0 + nkeys - 1, qboff, warp, lane);
  auto issue = [&](int stage) -> uint32_t {
    return qgat.issue(p, sm.sQ + stage * Cfg::Q_STAGE, sm.sD + stage * Cfg::Q_STAGE, sm.sLse, sm.sDl, sm.sLim,
                      sm.sRid, stage, warp, lane);
  };
  uint32_t pending = issue_prologue<S>(issue, ntiles);

  // ---- per-thread state ----------------------------------------------------------------------------------
  int key[2];  // keys of the thread's two accumulator rows of s^T, dk, dv
  fragment_row_keys(k0 + warp * 16, lane, key);
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
  float* const dq_rows = p.dq_accum + qboff * D + wg * DQN;  // row 0 of dq_accum, this warpgroup's columns
  float* const dq_acc = dq_rows + 2 * (lane & 3);

  const Sm90TileOps<T, Cfg> ops(sm.sK, sm.sV, sm.sQ, sm.sD, sm.sDS, wg, warp, lane);  // descriptors, dS stores

  // ---- main loop -----------------------------------------------------------------------------------------
  for (int t = 0; t < ntiles; ++t) {
    const int stage = t % S;
    // (the barrier also means: every warp is done with dS)
    const bool need_mask = tile_landed<S - 2>(pending, fence_async_shared);

    // s^T = K q^T, dp^T = V do^T (one commit group each); the next tile's gather is issued while they run
    ops.scores(sf, dpf, stage, [&] {
      if (t + S - 1 < ntiles) pending |= issue((t + S - 1) % S) << (S - 2);
      cp_async_commit();
    });

    // p^T, ds^T as b16 A fragments; dv += p^T do, dk += ds^T q; dS to shared memory while they run
    uint32_t pa[BQ / 16][4], da[BQ / 16][4];
    sm90_probs_ds<T, BQ>(s, dp, sm.fLse, sm.fDl, sm.sLim, stage * BQ + (lane & 3) * 2, need_mask, key, kend,
                         nlive < BK, s_mul, cap_mul, use_cap, pa, da);
    ops.dv_dk(dvf, dkf, pa, da, stage);
    ops.store_ds(sm.sDS, 0, da);
    fence_async_shared();
    __syncthreads();  // dS complete, every warpgroup's keys (dk, dv may still be running)

    // dq of the tile's rows (this warpgroup's DQN columns) = dS K (queued behind dk, dv), added to dq_accum
    ops.dq(dqf, 0);
    wgmma_wait<0>();
    fence_regs(dkf);
    fence_regs(dvf);
    fence_regs(dqf);
    if constexpr (Cfg::BULK_DQ) {
      // through the bulk copy engine: the atomic traffic leaves the load / store unit
      sm90_dq_rows_reduce<Cfg>(dq, sm.sDQ + warp * 16 * Cfg::DQ_PITCH, sm.sRid + stage * BQ + wl * 16, dq_rows,
                               lane);
    } else {
      sm90_dq_rows_red<Cfg>(dq, sm.sRid + stage * BQ + wl * 16, dq_acc, lane);
    }
  }
  if constexpr (Cfg::BULK_DQ) {
    if (lane < 16) bulk_wait<0>();  // the staging rows stay valid until read (and the adds are done) before exit
  }
  zero_dkdv_past(adk, adv, key, kend, nlive < nkeys);

  // ---- epilogue: dk * scale, dv (bwd/dkdv_kernel.cuh; K and V staged row-major per warp); a piece of a split
  // column: its f32 partial sums (column_split.cuh) -----------------------------------------------------
  ColumnWork ew;  // (read again here rather than kept live through the loop: 255 registers)
  (void)column_work<D, BK, BQ>(p, ew, blockIdx.x);
  if (ew.part >= 0) {
    store_split_partial<D>(p, ew, warp * 16, lane, adk, adv);
    return;
  }
  const int64_t out = ew.kvoff + ew.k0 * ew.kv_rstride;
  dkdv_store<T, Cfg>(smem, sm.sK, sm.sV, static_cast<T*>(p.dk) + out, static_cast<T*>(p.dv) + out, ew.kv_rstride,
                     ew.nkeys, warp * 16, 0, warp * 16 < ew.nkeys, p.scale, adk, adv);
#endif
}

// dq = scale * dq_accum in T, 8 elements per thread (n: a multiple of 8).
template <typename T>
__global__ void __launch_bounds__(256) bsattn_bwd_dq_convert_kernel(const float* __restrict__ acc, T* __restrict__ dq,
                                                                    int64_t n8, float scale) {
  for (int64_t i = blockIdx.x * int64_t{256} + threadIdx.x; i < n8; i += int64_t{gridDim.x} * 256) {
    const float4 x = reinterpret_cast<const float4*>(acc)[2 * i];
    const float4 y = reinterpret_cast<const float4*>(acc)[2 * i + 1];
    uint4 v;
    v.x = Mma<T>::pack(x.x * scale, x.y * scale);
    v.y = Mma<T>::pack(x.z * scale, x.w * scale);
    v.z = Mma<T>::pack(y.x * scale, y.y * scale);
    v.w = Mma<T>::pack(y.z * scale, y.w * scale);
    reinterpret_cast<uint4*>(dq)[i] = v;
  }
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
