// The row-oriented Hopper backward (sm_90a, D = 128; a prototype behind BSATTN_BWD_ROWS=1): dq, dk and dv from one
// pass over each block row's listed keys, as the forward walks them. Why: at C <= 16 the column kernels re-gather a
// block column's query rows for every C keys (the narrow dk / dv kernel) or do a dense sweep's work (C <= 4), while
// a row tile gathers each listed key once and every product it computes is useful. The price is dk / dv: each row
// tile adds its part into every key it lists. Float atomics would make dk / dv depend on the order of arrival;
// integer adds do not, so the parts are added as 64-bit fixed point (x * 2^32, rounded to nearest) into a workspace
// the launcher zeroes and then converts: dk, dv stay bitwise repeatable. Measured cost of that scatter at the grid's
// C = 1 shapes: about 3.4 TB/s of reductions (csrc/cuda/dev/scatter_bench.cu, staged rows 2.2x faster than the
// accumulator layout's scattered 64-byte pieces).
//
// One CTA = 128 packed rows of one block row (two warpgroups of 64, as the dq kernel with NWG = 2), the block row's
// gathered keys in KV tiles of BN = 64. Per tile:
//   S = Q K^T, dP = dO V^T             (each warpgroup its rows; wgmma, both operands from shared memory)
//   p, dS = p (dP - delta)             (bwd/common.cuh dq_probs_ds, p kept)
//   dQ += dS K                         (wgmma, dS from registers; dq stays in registers to the end: no atomics)
//   p^T, dS^T -> shared memory         (stmatrix .trans, while dQ runs; a padded row of TM b16 per key)
//   warpgroup 0: dV_t = p^T dO, warpgroup 1: dK_t = dS^T Q   (M = the 64 keys, K = the 128 rows; A by ldmatrix)
//   each warp stages its 16 keys' half rows (f32) and adds them, rounded, into the workspace (lane-consecutive
//   64-bit reductions, 256 bytes an instruction); padding keys (index >= N) are skipped.
// Where a block row has several 128-row tiles (R g = 256, 512, 1024) they run as one cluster and each key's parts
// are first summed across it through distributed shared memory (in rank order, so still repeatable): one
// workspace addition per (block row, key) instead of one per tile, the scatter's bytes halved or better.
#pragma once

#include <climits>
#include <cstdint>

#include "cuda/bwd/common.cuh"
#include "cuda/bwd_sm90/config.cuh"
#include "cuda/bwd_sm90/dq_kernel.cuh"
#include "cuda/common/wgmma.cuh"
#include "cuda/fwd/gather_kv.cuh"
#include "cuda/fwd/params.h"
#include "cuda/fwd/tile_setup.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

// The dq kernel's parameters and the fixed-point workspace.
struct Sm90RowsParams : Sm90DqParams {
  long long* acc_dk;  // [B, N, Hk, D] sum of round(part * fx_dk) (zeroed by the launcher)
  long long* acc_dv;  // [B, N, Hk, D] sum of round(part * fx_dv)
  float fx_dk;        // scale * 2^32 (dk = scale * sum dS^T q)
  float fx_dv;        // 2^32
};

// Waits until every thread of every CTA in the cluster has arrived (release / acquire: shared-memory writes before
// it are visible to the other CTAs' reads after it).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// The f32 at shared address `addr` of the cluster's CTA `rank` (the same offset in its shared memory).
__device__ __forceinline__ float ld_cluster_f32(uint32_t addr, int rank) {
  uint32_t ra;
  float v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(ra) : "r"(addr), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(ra) : "memory");
  return v;
}

// Two warpgroups of 64 rows (the dq kernel's shape with NWG = 2) plus p^T and dS^T (BN keys x TM rows, b16, rows
// padded by 16 bytes: the transposed stores and the ldmatrix reads of 8 keys hit distinct banks) and a staging area
// per warpgroup (BN keys x D / 2 f32, padded alike).
template <int D_, int BN_, int ST_>
struct Sm90RowsCfg : Sm90DqCfg<D_, 2, BN_, ST_, 1> {
  using Base = Sm90DqCfg<D_, 2, BN_, ST_, 1>;
  static constexpr int PT_PITCH = Base::TM * 2 + 16;
  static constexpr int PT_BYTES = BN_ * PT_PITCH;
  static constexpr int STG_PITCH = D_ / 2 * 4 + 16;
  static constexpr int STG_BYTES = BN_ * STG_PITCH;
  static constexpr int SMEM = Base::SMEM + 128 + 2 * PT_BYTES + 2 * STG_BYTES;
  static_assert(D_ == 128 && BN_ == 64, "the prototype's shape: D = 128, 64-key tiles");
  static_assert(SMEM <= 227 * 1024, "shared memory per CTA");
};
struct Sm90RowsTile : Sm90RowsCfg<128, 64, 2> {};

// CL: CTAs per cluster, 1 or the block row's tile count (2, 4 or 8; the launcher's rule: every tile holds rows).
template <typename T, class Cfg, int CL>
__global__ void __launch_bounds__(Cfg::NT, 1) bsattn_bwd_rows_sm90_kernel(const __grid_constant__ Sm90RowsParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = Cfg::D, BN = Cfg::BN, TM = Cfg::TM, ST = Cfg::ST, PF = Cfg::PF;
  constexpr int NT8 = BN / 8, DT = D / 8;
  using QLayout = AtomSwizzle<D, TM>;
  using KvLayout = AtomSwizzle<D, BN>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2, wq = warp & 3;

  FwdTileSetup ts;
  if (!fwd_tile_setup<D, TM, BN>(p, ts)) return;  // (uniform) a split past the last query row

  // ---- shared memory: the dq kernel's carve-up, then p^T, dS^T and the staging areas ---------------------
  uint32_t sQ;
  uint8_t* smem = align_smem_1024(smem_raw, sQ);
  const uint32_t sDo = sQ + Cfg::Q_BYTES;
  const uint32_t sK = sDo + Cfg::Q_BYTES;
  const uint32_t sV = sK + ST * Cfg::KV_STAGE_BYTES;
  int* sKidx = reinterpret_cast<int*>(smem + 2 * Cfg::Q_BYTES + Cfg::KV_BYTES);
  int* sLim = sKidx + ST * BN;
  GatherShared* gs = reinterpret_cast<GatherShared*>(sLim + TM);
  int2* sOwn = reinterpret_cast<int2*>(gs + 1);
  int2* sRow = sOwn + BN;
  float* sLse2 = reinterpret_cast<float*>(sRow + TM);
  float* sDl = sLse2 + TM;
  const uint32_t sPt = (smem_u32(sDl + TM) + 127u) & ~127u;  // p^T [BN][PT_PITCH]
  const uint32_t sDst = sPt + Cfg::PT_BYTES;                  // dS^T
  const uint32_t sStg = sDst + Cfg::PT_BYTES + wg * Cfg::STG_BYTES;
  const float* stg = reinterpret_cast<const float*>(smem + (sStg - sQ));

  // ---- prologue (the dq kernel's) ---------------------------------------------------------------------------
  {
    const uint32_t dst[2] = {sQ, sDo};
    const T* const src[2] = {static_cast<const T*>(p.q) + ts.qoff, static_cast<const T*>(p.dout) + ts.qoff};
    load_packed_tile<D, TM, Cfg::NT, 2, QLayout>(dst, src, ts.row0, ts.rows_valid, p.g, ts.q_rstride, tid);
  }
  fill_row_tables<TM, Cfg::NT>(p, ts, sRow, sLim, tid);
  {
    const WorkTile& w = ts.w;
    const int64_t soff = (static_cast<int64_t>(w.b) * p.M + static_cast<int64_t>(w.br) * p.R) * p.Hq +
                         static_cast<int64_t>(w.hk) * p.g;
    for (int row = tid; row < TM; row += Cfg::NT) {
      float l2 = INFINITY, dl = 0.f;  // padding rows: p = 0 exactly, so their p^T / dS^T columns are zero
      if (row < ts.rows_valid) {
        const int P = ts.row0 + row, r = P / p.g;
        const int64_t si = soff + static_cast<int64_t>(r) * p.Hq + (P - r * p.g);
        row_stats(__ldg(p.lse_rows + si), __ldg(p.delta + si), l2, dl);
      }
      sLse2[row] = l2;
      sDl[row] = dl;
    }
  }
  KvGather<T, Cfg, KvLayout> kv;
  kv.init(p, ts.idx, ts.len, sOwn, warp, lane);
  if (tid == 0) fill_gather_shared<BN>(p, ts, gs);
  __syncthreads();
  auto issue = [&](int i) { return kv.issue(p, *gs, sK, sV, sKidx, i % ST, warp, lane); };
  uint32_t pending = issue_prologue<PF + 1>(issue, ts.ntiles);

  // ---- per-warpgroup state (no warpgroup skips a tile: both meet the CTA barrier of every tile) -------------
  float acc[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[d][e] = 0.f;
  float(&accf)[D / 2] = reinterpret_cast<float(&)[D / 2]>(acc);
  float s[NT8][4], dp[NT8][4];
  float(&sf)[BN / 2] = reinterpret_cast<float(&)[BN / 2]>(s);
  float(&dpf)[BN / 2] = reinterpret_cast<float(&)[BN / 2]>(dp);
  uint32_t da[BN / 16][4];

  float lse2[2], dl[2];
  int lim[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp * 16 + (lane >> 2) + 8 * h;
    lse2[h] = sLse2[row];
    dl[h] = sDl[row];
    lim[h] = sLim[row];
  }
  const float s_mul = p.s_mul, cap_mul = p.cap_mul;
  const bool use_cap = p.use_cap != 0;

  const uint64_t q_desc = sw128_desc(sQ + wg * 64 * 128, 16, 1024);
  const uint64_t do_desc = sw128_desc(sDo + wg * 64 * 128, 16, 1024);
  const uint64_t k_desc = sw128_desc(sK, 16, 1024);
  const uint64_t v_desc = sw128_desc(sV, 16, 1024);
  const uint64_t kt_desc = sw128_desc(sK, BN * 128, 1024);
  constexpr uint64_t kStageDesc = Cfg::KV_STAGE_BYTES >> 4;
  // the B of the key-side products, MN-major over all TM rows: dO for warpgroup 0 (dV), Q for warpgroup 1 (dK)
  const uint64_t rows_desc = sw128_desc(wg == 0 ? sDo : sQ, TM * 128, 1024);
  // this lane's stmatrix row (key 8 (m >> 1) + i of a 16-key step, tile rows 8 (m & 1) + the warp's 16)
  const uint32_t st_off = (8 * ((lane >> 3) >> 1) + (lane & 7)) * Cfg::PT_PITCH + (warp * 16 + 8 * ((lane >> 3) & 1)) * 2;
  // this lane's ldmatrix row (key 16 wq + 8 ((lane >> 3) & 1) + (lane & 7), rows 8 (lane >> 4) of a 16-row step)
  const uint32_t ld_src = (wg == 0 ? sPt : sDst) +
                          (16 * wq + 8 * ((lane >> 3) & 1) + (lane & 7)) * Cfg::PT_PITCH + 16 * (lane >> 4);
  const float fx = wg == 0 ? p.fx_dv : p.fx_dk;
  long long* const accg = (wg == 0 ? p.acc_dv : p.acc_dk) + ts.kvoff;
  const int64_t key_stride = static_cast<int64_t>(p.Hk) * D;

  // ---- main loop ------------------------------------------------------------------------------------------
  for (int t = 0; t < ts.ntiles; ++t) {
    const bool need_mask = tile_landed<PF - 1>(pending, fence_async_shared);
    if (t + PF < ts.ntiles) pending |= issue(t + PF) << (PF - 1);
    cp_async_commit();

    const int stage = t % ST;
    wgmma_fence();
    wgmma_ss_kmajor<T, BN, D, TM, BN>(sf, q_desc, k_desc + stage * kStageDesc);    // S = Q K^T
    wgmma_ss_kmajor<T, BN, D, TM, BN>(dpf, do_desc, v_desc + stage * kStageDesc);  // dP = dO V^T
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(sf);
    fence_regs(dpf);
    dq_probs_ds<NT8, true>(s, dp, sKidx + stage * BN + (lane & 3) * 2, need_mask, lse2, dl, lim, s_mul, cap_mul,
                           use_cap);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) acc_to_a<T>(dp, kk, da[kk]);
    wgmma_fence();
    fence_regs(accf);
    wgmma_rs_mn<T, D, BN / 16>(accf, da, kt_desc + stage * kStageDesc);  // dQ += dS K
    wgmma_commit();
    // p^T and dS^T of this warp's 16 rows while dQ runs (16 keys a store)
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[4];
      acc_to_a<T>(s, kk, pa);
      stsm_x4_trans(sPt + st_off + kk * 16 * Cfg::PT_PITCH, pa);
      stsm_x4_trans(sDst + st_off + kk * 16 * Cfg::PT_PITCH, da[kk]);
    }
    wgmma_wait<0>();
    fence_regs(accf);
    __syncthreads();  // p^T, dS^T whole

    // dV_t (warpgroup 0) or dK_t (warpgroup 1): 64 keys x D over the TM rows
    float tacc[DT][4];
    float(&taccf)[D / 2] = reinterpret_cast<float(&)[D / 2]>(tacc);
    {
      uint32_t ta[TM / 16][4];
#pragma unroll
      for (int kk = 0; kk < TM / 16; ++kk) ldsm_x4(ta[kk], ld_src + kk * 32);
      wgmma_fence();
      WgmmaOp<T, D>::rs(taccf, ta[0], rows_desc, 0);
#pragma unroll
      for (int kk = 1; kk < TM / 16; ++kk) WgmmaOp<T, D>::rs(taccf, ta[kk], rows_desc + kk * (2048 >> 4), 1);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(taccf);
    }
    // add into the workspace, half a row (D / 2 columns) at a time: each warp stages its 16 keys (f32); then, with
    // clusters, CTA r adds keys [r kpc, (r + 1) kpc) of the tile summed over the cluster's CTAs in rank order (the
    // same float additions every run), else each warp adds its own 16 keys
    constexpr int KPC = BN / CL, KPW = KPC / 4;  // keys a CTA, a warp adds
    const int key0 = ts.w.split % CL * KPC + wq * KPW;
    const int* kidx = sKidx + stage * BN;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int d = 0; d < DT / 2; ++d) {
        const int col = 8 * d + 2 * (lane & 3);
        const int key = 16 * wq + (lane >> 2);
        st_shared_f32x2(sStg + key * Cfg::STG_PITCH + col * 4, tacc[half * DT / 2 + d][0], tacc[half * DT / 2 + d][1]);
        st_shared_f32x2(sStg + (key + 8) * Cfg::STG_PITCH + col * 4, tacc[half * DT / 2 + d][2],
                        tacc[half * DT / 2 + d][3]);
      }
      if (CL > 1)
        cluster_sync();
      else
        __syncwarp();
      // the warp's KPW keys x 2 columns a lane: every part loaded first (remote loads in flight together), then
      // summed in rank order
      float v[KPW][2];
#pragma unroll
      for (int r = 0; r < KPW; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t a = sStg + (key0 + r) * Cfg::STG_PITCH + (lane + 32 * h) * 4;
          if constexpr (CL > 1) {
            float part[CL];
#pragma unroll
            for (int q = 0; q < CL; ++q) part[q] = ld_cluster_f32(a, q);
            v[r][h] = part[0];
#pragma unroll
            for (int q = 1; q < CL; ++q) v[r][h] += part[q];
          } else {
            v[r][h] = stg[(a - sStg) / 4];
          }
        }
#pragma unroll
      for (int r = 0; r < KPW; ++r) {
        const int j = kidx[key0 + r];
        if (j < 0 || j >= p.N) continue;  // (uniform per warp) padding keys
        long long* dst = accg + j * key_stride + half * (D / 2) + lane;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const long long iv = __float2ll_rn(v[r][h] * fx);
          asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;\n" ::"l"(dst + 32 * h), "l"(iv) : "memory");
        }
      }
      if (CL > 1)
        cluster_sync();  // every CTA done reading the staging rows before they are written again
      else
        __syncwarp();
    }
  }

  // ---- epilogue: dq * scale, each warp its 16 rows, staged in the q tile -----------------------------------
  cp_async_wait<0>();
  __syncthreads();
  store_dq_rows<T, D>(acc, p.scale, sQ, warp * 16, sRow, static_cast<T*>(p.dq) + ts.qoff, ts.q_rstride, lane);
#endif
}

// dk and dv = the fixed-point sums times 2^-32, in the inputs' dtype: acc holds dk's nk sums then dv's; 8 elements a
// thread (nk a multiple of 8).
template <typename T>
__global__ void bsattn_bwd_rows_finalize_kernel(const long long* __restrict__ acc, T* __restrict__ dk,
                                                T* __restrict__ dv, int64_t nk) {
  const int64_t n8 = 2 * nk / 8, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n8; i += stride) {
    const longlong2* src = reinterpret_cast<const longlong2*>(acc) + 4 * i;
    alignas(16) T out[8];
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const longlong2 a = __ldcs(src + h);
      out[2 * h] = static_cast<T>(static_cast<float>(static_cast<double>(a.x) * 0x1p-32));
      out[2 * h + 1] = static_cast<T>(static_cast<float>(static_cast<double>(a.y) * 0x1p-32));
    }
    const int64_t e = 8 * i;
    T* dst = e < nk ? dk + e : dv + (e - nk);
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(out);
  }
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
