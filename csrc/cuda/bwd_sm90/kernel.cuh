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
// add nothing to dq, and their dk / dv are never written. A missing query row (past its block row's R, past M, or a garbage block row) is zero with
// lse = -inf (p = 0) and global row -1: no red.add for it.
#pragma once

#include <climits>
#include <cstdint>

#include "cuda/bwd/common.cuh"
#include "cuda/bwd/dkdv_kernel.cuh"
#include "cuda/bwd/params.h"
#include "cuda/bwd_sm90/config.cuh"
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
  if (!column_work<D, BK, BQ>(p, cw_)) return;  // (uniform)
  const int hk = cw_.hk, k0 = cw_.k0, nkeys = cw_.nkeys, kend = k0 + nkeys;
  const int64_t lid = cw_.lid, cs = cw_.cs;
  const int len = cw_.len, ntiles = cw_.ntiles;
  const int64_t kvoff = cw_.kvoff, kv_rstride = cw_.kv_rstride, qboff = cw_.qboff;

  // ---- shared memory (1024-byte aligned tiles) ---------------------------------------------------------
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t pad = ((raw + 1023u) & ~1023u) - raw;
  uint8_t* smem = smem_raw + pad;
  const uint32_t sK = raw + pad;
  const uint32_t sV = sK + Cfg::K_BYTES;
  const uint32_t sQ = sV + Cfg::K_BYTES;
  const uint32_t sD = sQ + S * Cfg::Q_STAGE;
  const uint32_t sDS = sD + S * Cfg::Q_STAGE;
  const uint32_t sDQ = sDS + Cfg::DS_BYTES;   // BULK_DQ: per warp 16 rows x DQ_PITCH bytes
  const uint32_t sLse = sDQ + Cfg::DQ_BYTES;  // [S][BQ] f32 raw lse
  const uint32_t sDl = sLse + S * BQ * 4;     // [S][BQ] f32 raw delta
  const float* fLse = reinterpret_cast<const float*>(smem + Cfg::TILE_BYTES);
  const float* fDl = fLse + S * BQ;
  int* sLim = reinterpret_cast<int*>(smem + Cfg::TILE_BYTES + 2 * S * BQ * 4);  // [S][BQ] causal limit
  int* sRid = sLim + S * BQ;                                                    // [S][BQ] global row or -1

  // ---- prologue: K, V; the first S - 1 query tiles ----------------------------------------------------
  {
    const T* kg = static_cast<const T*>(p.k) + kvoff + k0 * kv_rstride;
    const T* vg = static_cast<const T*>(p.v) + kvoff + k0 * kv_rstride;
    load_row_pair_tile<D, Cfg::NT, BK, typename Cfg::KLayout>(sK, sV, kg, vg, nkeys, kv_rstride, tid);
  }
  ColumnQueryGather<D, BQ, Map, typename Cfg::QLayout, T> qgat;
  qgat.init(p, p.col_rows + lid * p.nnz + cs, len, hk, k0 + nkeys - 1, qboff, warp, lane);
  auto issue = [&](int stage) -> uint32_t {
    return qgat.issue(p, sQ + stage * Cfg::Q_STAGE, sD + stage * Cfg::Q_STAGE, sLse, sDl, sLim, sRid, stage, warp,
                      lane);
  };
  uint32_t pending = issue_prologue<S>(issue, ntiles);

  // ---- per-thread state ----------------------------------------------------------------------------------
  int key[2];  // keys of the thread's two accumulator rows of s^T, dk, dv
#pragma unroll
  for (int h = 0; h < 2; ++h) key[h] = k0 + warp * 16 + (lane >> 2) + 8 * h;
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

  // descriptors (stage 0; + stage * Q_STAGE / 16 for a later stage). K-major operands step 32 bytes per k16 within
  // a 128-byte column block and ROWS * 128 bytes per block; MN-major ones step 16 rows (2048 bytes) per k16. This
  // warpgroup's keys start at row 64 wg of K and V; its dq columns are K's column block wg (two warpgroups).
  const uint32_t wrow = wg * 64 * 128;
  const uint64_t k_desc = sw128_desc(sK + wrow, 16, 1024), v_desc = sw128_desc(sV + wrow, 16, 1024);
  const uint64_t q_desc = sw128_desc(sQ, 16, 1024), d_desc = sw128_desc(sD, 16, 1024);
  const uint64_t q_mn = sw128_desc(sQ, BQ * 128, 1024), d_mn = sw128_desc(sD, BQ * 128, 1024);
  const uint64_t k_mn = sw128_desc(sK + wg * BK * 128, BK * 128, 1024);
  const uint64_t ds_desc = sw128_desc(sDS, 16, 1024);
  constexpr uint64_t kStage = Cfg::Q_STAGE >> 4;
  // dS stores: lane 8 m + i of warp w writes row 8 (2 kk + m / 2) + i, keys 16 w + 8 (m % 2) .. of dS
  const int st_row = ((lane >> 4) << 3) + (lane & 7), st_chunk = 2 * warp + ((lane >> 3) & 1);

  // ---- main loop -----------------------------------------------------------------------------------------
  for (int t = 0; t < ntiles; ++t) {
    const int stage = t % S;
    cp_async_wait<S - 2>();
    fence_async_shared();  // landed copies -> visible to wgmma after the barrier
    // the barrier also means: every warp is done with the stage the next issue overwrites, and with dS
    const bool need_mask = __syncthreads_or(static_cast<int>(pending & 1u)) != 0;
    pending >>= 1;

    // s^T = K q^T, dp^T = V do^T (one commit group each); the next tile's gather is issued while they run
    auto keys_x_rows = [&](float(&acc)[BQ / 2], uint64_t a_desc, uint64_t b_desc) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint64_t ko = ((kk >> 2) * BK * 128 + (kk & 3) * 32) >> 4;
        const uint64_t qo = stage * kStage + (((kk >> 2) * BQ * 128 + (kk & 3) * 32) >> 4);
        WgmmaOp<T, BQ>::ss(acc, a_desc + ko, b_desc + qo, kk > 0 ? 1 : 0);
      }
      wgmma_commit();
    };
    wgmma_fence();
    keys_x_rows(sf, k_desc, q_desc);
    keys_x_rows(dpf, v_desc, d_desc);
    if (t + S - 1 < ntiles) pending |= issue((t + S - 1) % S) << (S - 2);
    cp_async_commit();
    wgmma_wait<0>();
    fence_regs(sf);
    fence_regs(dpf);

    // p^T, ds^T; as b16 A fragments (k16 steps along the rows)
    const int rb = stage * BQ + (lane & 3) * 2;
    dkv_probs_ds<NQ8, true, false>(s, dp, fLse, fDl, sLim, nullptr, rb, need_mask, key, key, s_mul, cap_mul,
                                   use_cap);
    if (nkeys < BK) {  // (uniform) padding keys: their p = exp(-lse) may overflow, and their ds reaches dq
#pragma unroll
      for (int n = 0; n < NQ8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (key[e >> 1] >= kend) s[n][e] = dp[n][e] = 0.f;
    }
    uint32_t pa[BQ / 16][4], da[BQ / 16][4];
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      acc_to_a<T>(s, kk, pa[kk]);
      acc_to_a<T>(dp, kk, da[kk]);
    }
    // dv += p^T do, dk += ds^T q
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) WgmmaOp<T, D>::rs(dvf, pa[kk], d_mn + stage * kStage + kk * (2048 >> 4), 1);
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) WgmmaOp<T, D>::rs(dkf, da[kk], q_mn + stage * kStage + kk * (2048 >> 4), 1);
    wgmma_commit();
    // dS (rows x keys) to shared memory while they run: the A fragment of k16 step kk is the four 8 x 8 blocks
    // (keys 8 h, rows 8 (2 kk + m)) in stmatrix order
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk)
      stsm_x4_trans(sDS + Cfg::SLayout::off(16 * kk + st_row, st_chunk), da[kk]);
    fence_async_shared();
    __syncthreads();  // dS complete, every warpgroup's keys (dk, dv may still be running)

    // dq of the tile's rows (this warpgroup's DQN columns) = dS K (queued behind dk, dv), added to dq_accum
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk)
      WgmmaOp<T, DQN>::ss_bt(dqf, ds_desc + (((kk >> 2) * BQ * 128 + (kk & 3) * 32) >> 4), k_mn + kk * (2048 >> 4),
                             kk > 0 ? 1 : 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(dkf);
    fence_regs(dvf);
    fence_regs(dqf);
    if constexpr (Cfg::BULK_DQ) {
      // the warp's 16 rows to its staging rows (once the bulk reads of the previous tile's are done), then lane i < 16
      // adds row i to dq_accum through the bulk copy engine: the atomic traffic leaves the load / store unit
      const uint32_t sq = sDQ + warp * 16 * Cfg::DQ_PITCH;
      if (lane < 16) bulk_wait_read<0>();
      __syncwarp();
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t so = sq + ((lane >> 2) + 8 * h) * Cfg::DQ_PITCH + (lane & 3) * 8;
#pragma unroll
        for (int j = 0; j < DQT; ++j) st_shared_f32x2(so + 32 * j, dq[j][2 * h], dq[j][2 * h + 1]);
      }
      fence_async_shared();
      __syncwarp();
      if (lane < 16) {
        const int rid = sRid[stage * BQ + wl * 16 + lane];
        if (rid >= 0) bulk_reduce_add_f32(dq_rows + static_cast<int64_t>(rid) * D, sq + lane * Cfg::DQ_PITCH, DQN * 4);
        bulk_commit();
      }
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rid = sRid[stage * BQ + wl * 16 + (lane >> 2) + 8 * h];
        if (rid >= 0) {
          float* dst = dq_acc + static_cast<int64_t>(rid) * D;
#pragma unroll
          for (int j = 0; j < DQT; ++j) red_add_f32x2(dst + 8 * j, dq[j][2 * h], dq[j][2 * h + 1]);
        }
      }
    }
  }
  if constexpr (Cfg::BULK_DQ) {
    if (lane < 16) bulk_wait<0>();  // the staging rows stay valid until read (and the adds are done) before exit
  }

  // ---- epilogue: dk * scale, dv (bwd/dkdv_kernel.cuh; K and V staged row-major per warp) ---------------
  dkdv_store<T, Cfg>(smem, sK, sV, static_cast<T*>(p.dk) + kvoff + k0 * kv_rstride,
                     static_cast<T*>(p.dv) + kvoff + k0 * kv_rstride, kv_rstride, nkeys, warp * 16, 0,
                     warp * 16 < nkeys, p.scale, adk, adv);
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
