// The Hopper (sm_90a) dq kernel: the row-oriented dq of bwd/dq_kernel.cuh on warpgroup MMA. It runs wherever dq comes
// from its own pass (the deterministic pair: C <= 16, D = 256, or deterministic=True) on an H100 / H200 with R * g > 16
// (bwd/dispatch.cu).
//
// One CTA = one tile of TM = 64 NWG packed rows (config.cuh Sm90DqTile: NWG = 1) of one block row (the forward's tile
// set-up, fwd/tile_setup.cuh); warpgroup wg owns rows [64 wg, 64 wg + 64). It loads the q and do tiles once (the wgmma
// layout) with each row's lse and delta, then walks the block row's gathered key sequence in KV tiles of BN keys (the
// forward's gather, fwd/gather_kv.cuh), PF tiles ahead. Per tile:
//   S = Q K^T, dP = dO V^T     (wgmma, both operands from shared memory)
//   p, dS = p (dP - delta)     (bwd/common.cuh dq_probs_ds, masked only in tiles that need it)
//   dQ += dS K                 (wgmma, dS from registers as the A operand, K read MN-major)
// and finally writes dq = scale * dQ, every element once after a fixed order of additions: bitwise repeatable, like
// the mma.sync kernel. Long block rows may come in pieces (the forward's row split, dq_split.cuh): a piece writes its
// dQ as f32 partial sums instead, added in piece order after. Padding key rows (index INT_MAX) are zero and flag their tile for the mask, as there.
#pragma once

#include <cstdint>

#include "cuda/bwd/common.cuh"
#include "cuda/bwd_sm90/config.cuh"
#include "cuda/common/wgmma.cuh"
#include "cuda/fwd/gather_kv.cuh"
#include "cuda/fwd/params.h"
#include "cuda/fwd/tile_setup.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

// The forward's parameter block (shapes, layout, q, k, v; its o / lse unused) and what dq adds. Filled by the
// launcher (launch.cuh launch_dq_sm90) from bwd::Params.
struct Sm90DqParams : FwdParams {
  const void* dout;        // [B, M, Hq, D]
  const float* lse_rows;   // [B, M, Hq] the forward's log-sum-exp
  const float* delta;      // [B, M, Hq] rowsum(do * o) - dlse
  void* dq;                // [B, M, Hq, D]
  float scale;
};

// The block from the backward's parameters (launch.cuh launch_dq_sm90, launch_rows.cuh).
inline Sm90DqParams dq_sm90_params(const Params& p) {
  Sm90DqParams d{};
  static_cast<ProblemParams&>(d) = p;
  d.q = p.q;
  d.k = p.k;
  d.v = p.v;
  d.indptr = p.indptr;
  d.indices = p.indices;
  d.dout = p.dout;
  d.lse_rows = p.lse;
  d.delta = p.delta;
  d.dq = p.dq;
  d.scale = p.scale;
  return d;
}

// The dq tile's shared memory (config.cuh Sm90DqCfg::SMEM; the row kernel's first part): q and do tiles, K / V stages
// (1024-byte aligned for the swizzle), the key index of each staged row, the tile's tables, lse2 and delta per row.
struct Sm90DqSmem {
  uint8_t* base;  // the aligned base (sQ's generic address)
  uint32_t sQ, sDo, sK, sV;
  int* sKidx;
  int* sLim;
  GatherShared* gs;
  int2* sOwn;
  int2* sRow;
  float* sLse2;
  float* sDl;
};
template <class Cfg>
__device__ __forceinline__ Sm90DqSmem sm90_dq_smem(uint8_t* smem_raw) {
  Sm90DqSmem m;
  m.base = align_smem_1024(smem_raw, m.sQ);
  m.sDo = m.sQ + Cfg::Q_BYTES;
  m.sK = m.sDo + Cfg::Q_BYTES;
  m.sV = m.sK + Cfg::ST * Cfg::KV_STAGE_BYTES;
  m.sKidx = reinterpret_cast<int*>(m.base + 2 * Cfg::Q_BYTES + Cfg::KV_BYTES);
  m.sLim = m.sKidx + Cfg::ST * Cfg::BN;
  m.gs = reinterpret_cast<GatherShared*>(m.sLim + Cfg::TM);
  m.sOwn = reinterpret_cast<int2*>(m.gs + 1);
  m.sRow = m.sOwn + Cfg::BN;
  m.sLse2 = reinterpret_cast<float*>(m.sRow + Cfg::TM);
  m.sDl = m.sLse2 + Cfg::TM;
  return m;
}

// The prologue: the q and do tiles (the wgmma layout), the per-row tables, each row's lse2 and delta (padding rows:
// lse2 = inf, so p = 0 exactly, and their p^T / dS^T columns are zero), the KV walk's state; ends with a CTA barrier.
template <typename T, class Cfg, class QLayout, class Kv>
__device__ __forceinline__ void sm90_dq_prologue(const Sm90DqParams& p, const FwdTileSetup& ts, const Sm90DqSmem& m,
                                                 Kv& kv, int tid, int warp, int lane) {
  constexpr int D = Cfg::D, TM = Cfg::TM;
  {
    const uint32_t dst[2] = {m.sQ, m.sDo};
    const T* const src[2] = {static_cast<const T*>(p.q) + ts.qoff, static_cast<const T*>(p.dout) + ts.qoff};
    load_packed_tile<D, TM, Cfg::NT, 2, QLayout>(dst, src, ts.row0, ts.rows_valid, p.g, ts.q_rstride, tid);
  }
  fill_row_tables<TM, Cfg::NT>(p, ts, m.sRow, m.sLim, tid);
  {
    const WorkTile& w = ts.w;
    const int64_t soff = (static_cast<int64_t>(w.b) * p.M + static_cast<int64_t>(w.br) * p.R) * p.Hq +
                         static_cast<int64_t>(w.hk) * p.g;  // lse / delta of (b, first row, first head of group)
    for (int row = tid; row < TM; row += Cfg::NT) {
      float l2 = INFINITY, dl = 0.f;
      if (row < ts.rows_valid) {
        const int P = ts.row0 + row, r = P / p.g;
        const int64_t si = soff + static_cast<int64_t>(r) * p.Hq + (P - r * p.g);
        row_stats(__ldg(p.lse_rows + si), __ldg(p.delta + si), l2, dl);
      }
      m.sLse2[row] = l2;
      m.sDl[row] = dl;
    }
  }
  kv.init(p, ts.idx, ts.len, m.sOwn, warp, lane);
  if (tid == 0) fill_gather_shared<Cfg::BN>(p, ts, m.gs);
  __syncthreads();
}

// This lane's two rows (warp * 16 + lane / 4, + 8): lse2, delta and the causal limit, from the prologue's tables.
template <class Cfg>
__device__ __forceinline__ void sm90_dq_lane_rows(const Sm90DqSmem& m, int warp, int lane, float (&lse2)[2],
                                                  float (&dl)[2], int (&lim)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp * 16 + (lane >> 2) + 8 * h;
    lse2[h] = m.sLse2[row];
    dl[h] = m.sDl[row];
    lim[h] = m.sLim[row];
  }
}

// A piece of a split block row (bwd_sm90/dq_split.cuh): the warp's 16 rows wrow0 .. of its dQ, unscaled (acc as
// store_dq_rows takes it), as f32 in the piece's partial plane ([R g][D], fwd/params.h fwd_split_plane_floats); rows
// past rows_valid are padding.
template <int D>
__device__ __forceinline__ void store_dq_partial(const float (&acc)[D / 8][4], const FwdParams& p,
                                                 const FwdTileSetup& ts, int wrow0, int lane) {
  const int64_t head = static_cast<int64_t>(ts.w.b) * p.Hk + ts.w.hk, rg = static_cast<int64_t>(p.R) * p.g;
  float* const plane = p.split_sums + (head * p.split_parts + ts.part) * fwd_split_plane_floats(rg, D);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = wrow0 + (lane >> 2) + 8 * h;
    if (row >= ts.rows_valid) continue;
    float* const dst = plane + static_cast<int64_t>(ts.row0 + row) * D + 2 * (lane & 3);
#pragma unroll
    for (int d = 0; d < D / 8; ++d)
      *reinterpret_cast<float2*>(dst + 8 * d) = make_float2(acc[d][2 * h], acc[d][2 * h + 1]);
  }
}

// S = Q K^T and dP = dO V^T of the KV tile in `stage` (both operands from shared memory), issued as one group.
template <typename T, class Cfg>
__device__ __forceinline__ void sm90_issue_s_dp(float (&sf)[Cfg::BN / 2], float (&dpf)[Cfg::BN / 2], uint64_t q_desc,
                                                uint64_t do_desc, uint64_t k_desc, uint64_t v_desc, int stage) {
  constexpr int BN = Cfg::BN, D = Cfg::D, TM = Cfg::TM;
  constexpr uint64_t kStageDesc = Cfg::KV_STAGE_BYTES >> 4;
  wgmma_fence();
  wgmma_ss_kmajor<T, BN, D, TM, BN>(sf, q_desc, k_desc + stage * kStageDesc);    // S = Q K^T
  wgmma_ss_kmajor<T, BN, D, TM, BN>(dpf, do_desc, v_desc + stage * kStageDesc);  // dP = dO V^T
  wgmma_commit();
}

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::NT, Cfg::MINB) bsattn_bwd_dq_sm90_kernel(const __grid_constant__ Sm90DqParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = Cfg::D, BN = Cfg::BN, TM = Cfg::TM, ST = Cfg::ST, PF = Cfg::PF;
  constexpr int NT8 = BN / 8, DT = D / 8;
  using QLayout = AtomSwizzle<D, TM>;
  using KvLayout = AtomSwizzle<D, BN>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;

  // ---- which tile (rows [0, ts.rows_valid) of it are real), which keys ----------------------------------
  FwdTileSetup ts;
  if (!fwd_tile_setup<D, TM, BN>(p, ts)) return;  // (uniform) a split past the last query row

  // ---- shared memory, then the prologue: q and do tiles, per-row tables and statistics, the KV walk ------------
  const Sm90DqSmem m = sm90_dq_smem<Cfg>(smem_raw);
  KvGather<T, Cfg, KvLayout> kv;
  sm90_dq_prologue<T, Cfg, QLayout>(p, ts, m, kv, tid, warp, lane);

  // tile i goes to stage i % ST; bit i of `pending`: this thread saw a key needing the mask in the i-th tile not yet
  // consumed (causal, or a padding key)
  auto issue = [&](int i) { return kv.issue(p, *m.gs, m.sK, m.sV, m.sKidx, i % ST, warp, lane); };
  uint32_t pending = issue_prologue<PF + 1>(issue, ts.ntiles);

  // ---- per-warpgroup state --------------------------------------------------------------------------------
  const bool wg_active = wg * 64 < ts.rows_valid;  // (uniform per warpgroup) skip 64 rows of pure padding
  float acc[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[d][e] = 0.f;
  float(&accf)[D / 2] = reinterpret_cast<float(&)[D / 2]>(acc);
  float s[NT8][4], dp[NT8][4];
  float(&sf)[BN / 2] = reinterpret_cast<float(&)[BN / 2]>(s);
  float(&dpf)[BN / 2] = reinterpret_cast<float(&)[BN / 2]>(dp);
  uint32_t da[BN / 16][4];  // dS as the A operand of dQ += dS K (k16 steps along the keys)

  float lse2[2], dl[2];
  int lim[2];
  sm90_dq_lane_rows<Cfg>(m, warp, lane, lse2, dl, lim);
  const float s_mul = p.s_mul, cap_mul = p.cap_mul;
  const bool use_cap = p.use_cap != 0;

  // descriptors: q / do rows of this warpgroup (K-major A); K and V of stage 0 as the K-major B of S and dP; K of
  // stage 0 as the MN-major B of dQ (+ stage * KV_STAGE_BYTES / 16 for the others)
  const uint64_t q_desc = sw128_desc(m.sQ + wg * 64 * 128, 16, 1024);
  const uint64_t do_desc = sw128_desc(m.sDo + wg * 64 * 128, 16, 1024);
  const uint64_t k_desc = sw128_desc(m.sK, 16, 1024);
  const uint64_t v_desc = sw128_desc(m.sV, 16, 1024);
  const uint64_t kt_desc = sw128_desc(m.sK, BN * 128, 1024);
  constexpr uint64_t kStageDesc = Cfg::KV_STAGE_BYTES >> 4;

  // ---- main loop ------------------------------------------------------------------------------------------
  for (int t = 0; t < ts.ntiles; ++t) {
    // wait for tile t, one barrier (every warpgroup is also done with the stage the next issue overwrites), issue
    // tile t + PF
    const bool need_mask = tile_landed<PF - 1>(pending, fence_async_shared);
    if (t + PF < ts.ntiles) pending |= issue(t + PF) << (PF - 1);
    cp_async_commit();
    if (!wg_active) continue;

    const int stage = t % ST;
    sm90_issue_s_dp<T, Cfg>(sf, dpf, q_desc, do_desc, k_desc, v_desc, stage);
    wgmma_wait<0>();
    fence_regs(sf);
    fence_regs(dpf);
    dq_probs_ds<NT8>(s, dp, m.sKidx + stage * BN + (lane & 3) * 2, need_mask, lse2, dl, lim, s_mul, cap_mul, use_cap);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) acc_to_a<T>(dp, kk, da[kk]);
    // dQ += dS K (k16 steps along the keys)
    wgmma_fence();
    fence_regs(accf);
    wgmma_rs_mn<T, D, BN / 16>(accf, da, kt_desc + stage * kStageDesc);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(accf);
  }

  // ---- epilogue: dq * scale, each warp its 16 rows, staged in the q tile -----------------------------------
  cp_async_wait<0>();
  __syncthreads();  // every warpgroup is done with q / do / K / V (and every copy into them has landed)
  if (wg_active) {
    if (ts.part >= 0)  // (uniform) a piece of a split block row: its partial sums, added after (dq_split.cuh)
      store_dq_partial<D>(acc, p, ts, warp * 16, lane);
    else
      store_dq_rows<T, D>(acc, p.scale, m.sQ, warp * 16, m.sRow, static_cast<T*>(p.dq) + ts.qoff, ts.q_rstride, lane);
  }
#endif
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
