// The per-tile steps of the Hopper backward that both of its kernels run (kernel.cuh, kernel_ws.cuh): the five
// wgmma products of a tile of BQ packed rows against a warpgroup's 64 keys, the p / ds step between them, and the
// row-by-row dq reduction through shared memory. The kernels differ in how stages are handed over and in how dq
// leaves; these pieces are the same.
#pragma once

#include <cstdint>

#include "cuda/bwd/common.cuh"
#include "cuda/bwd_sm90/config.cuh"
#include "cuda/common/wgmma.cuh"
#include "cuda/fwd/mma.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

// The shared-memory carve-up of both kernels, 1024-byte aligned: K, V, S stages of q and do, DS_BUFS dS buffers,
// the dq staging (per warp 16 rows x DQ_PITCH bytes, or kernel_ws's boxes), then each stage's row statistics:
// [S][BQ] raw lse, raw delta (f32), causal limit, global row or -1 (int).
template <class Cfg, int DS_BUFS>
struct Sm90Smem {
  uint8_t* base;  // the aligned start (generic pointer)
  uint32_t sK, sV, sQ, sD, sDS, sDQ, sLse, sDl;
  const float* fLse;
  const float* fDl;
  int* sLim;
  int* sRid;
  static constexpr int ROWS_OFF = Cfg::TILE_BYTES + (DS_BUFS - 1) * Cfg::DS_BYTES;  // the row statistics

  __device__ __forceinline__ explicit Sm90Smem(uint8_t* raw_ptr) {
    constexpr int S = Cfg::STAGES, BQ = Cfg::BQ;
    base = align_smem_1024(raw_ptr, sK);
    sV = sK + Cfg::K_BYTES;
    sQ = sV + Cfg::K_BYTES;
    sD = sQ + S * Cfg::Q_STAGE;
    sDS = sD + S * Cfg::Q_STAGE;
    sDQ = sDS + DS_BUFS * Cfg::DS_BYTES;
    sLse = sDQ + Cfg::DQ_BYTES;
    sDl = sLse + S * BQ * 4;
    fLse = reinterpret_cast<const float*>(base + ROWS_OFF);
    fDl = fLse + S * BQ;
    sLim = reinterpret_cast<int*>(base + ROWS_OFF + 2 * S * BQ * 4);
    sRid = sLim + S * BQ;
  }
};

// The shared-memory operand descriptors of a warpgroup (stage 0; + stage * Q_STAGE / 16 for a later stage) and a
// lane's stmatrix position in dS. K-major operands step 32 bytes per k16 within a 128-byte column block and
// ROWS * 128 bytes per block; MN-major ones step 16 rows (2048 bytes) per k16. Warpgroup wg's keys start at row
// 64 wg of K and V; its dq columns are K's column block wg (two warpgroups).
template <typename T, class Cfg>
struct Sm90TileOps {
  static constexpr int D = Cfg::D, BK = Cfg::BK, BQ = Cfg::BQ, DQN = Cfg::DQN;
  static constexpr uint64_t kStage = Cfg::Q_STAGE >> 4;
  uint64_t k_desc, v_desc, q_desc, d_desc, q_mn, d_mn, k_mn, ds_desc;
  int st_row, st_chunk;  // dS stores: lane 8 m + i of warp w writes row 8 (2 kk + m / 2) + i, keys 16 w + 8 (m % 2) ..

  // kw: the warp's index among the MMA warps (keys 16 kw ..)
  __device__ __forceinline__ Sm90TileOps(uint32_t sK, uint32_t sV, uint32_t sQ, uint32_t sD, uint32_t sDS, int wg,
                                         int kw, int lane) {
    const uint32_t wrow = wg * 64 * 128;
    k_desc = sw128_desc(sK + wrow, 16, 1024);
    v_desc = sw128_desc(sV + wrow, 16, 1024);
    q_desc = sw128_desc(sQ, 16, 1024);
    d_desc = sw128_desc(sD, 16, 1024);
    q_mn = sw128_desc(sQ, BQ * 128, 1024);
    d_mn = sw128_desc(sD, BQ * 128, 1024);
    k_mn = sw128_desc(sK + wg * BK * 128, BK * 128, 1024);
    ds_desc = sw128_desc(sDS, 16, 1024);
    st_row = ((lane >> 4) << 3) + (lane & 7);
    st_chunk = 2 * kw + ((lane >> 3) & 1);
  }

  // acc = keys x rows of the stage: s^T = K q^T (a = k_desc, b = q_desc) or dp^T = V do^T (v_desc, d_desc); one
  // commit group
  __device__ __forceinline__ void keys_x_rows(float (&acc)[BQ / 2], uint64_t a_desc, uint64_t b_desc,
                                              int stage) const {
    wgmma_ss_kmajor<T, BQ, D, BK, BQ>(acc, a_desc, b_desc + stage * kStage);
    wgmma_commit();
  }

  // s^T = K q^T and dp^T = V do^T of the stage; `between()` runs while they do (the kernels' gather issue), then
  // both are waited for and fenced
  template <class Between>
  __device__ __forceinline__ void scores(float (&sf)[BQ / 2], float (&dpf)[BQ / 2], int stage,
                                         Between&& between) const {
    wgmma_fence();
    keys_x_rows(sf, k_desc, q_desc, stage);
    keys_x_rows(dpf, v_desc, d_desc, stage);
    between();
    wgmma_wait<0>();
    fence_regs(sf);
    fence_regs(dpf);
  }

  // dv += p^T do, dk += ds^T q (A from registers; do, q read MN-major); one commit group
  __device__ __forceinline__ void dv_dk(float (&dvf)[D / 2], float (&dkf)[D / 2], const uint32_t (&pa)[BQ / 16][4],
                                        const uint32_t (&da)[BQ / 16][4], int stage) const {
    wgmma_fence();
    wgmma_rs_mn<T, D, BQ / 16>(dvf, pa, d_mn + stage * kStage);
    wgmma_rs_mn<T, D, BQ / 16>(dkf, da, q_mn + stage * kStage);
    wgmma_commit();
  }

  // dS (rows x keys, row-major) into the buffer at sDS + dsb: the A fragment of k16 step kk is the four 8 x 8 blocks
  // (keys 8 h, rows 8 (2 kk + m)) in stmatrix order
  __device__ __forceinline__ void store_ds(uint32_t sDS, uint32_t dsb, const uint32_t (&da)[BQ / 16][4]) const {
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) stsm_x4_trans(sDS + dsb + Cfg::SLayout::off(16 * kk + st_row, st_chunk), da[kk]);
  }

  // dq of the tile's rows (this warpgroup's DQN columns) = dS K, from the dS buffer at byte offset dsb; one commit
  // group
  __device__ __forceinline__ void dq(float (&dqf)[DQN / 2], uint32_t dsb) const {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk)
      WgmmaOp<T, DQN>::ss_bt(dqf, ds_desc + ((dsb + (kk >> 2) * BQ * 128 + (kk & 3) * 32) >> 4),
                             k_mn + kk * (2048 >> 4), kk > 0 ? 1 : 0);
    wgmma_commit();
  }
};

// p^T and ds^T of the tile from s^T, dp^T (dkv_probs_ds), keys at or past kend (padding, or past kv_lens) zeroed when
// the tile is part-filled (zero_keys_past: their p = exp(-lse) may overflow, and their ds reaches dq), as b16 A
// fragments (k16 steps along the rows). MUL = kMulPerKey or kMulEntryBit (the packed kernel): p weighed by the (row, column) multiplicity, sW / sEnt / mul as
// dkv_probs_ds takes them.
template <typename T, int BQ, int MUL = kMulNone>
__device__ __forceinline__ void sm90_probs_ds(float (&s)[BQ / 8][4], float (&dp)[BQ / 8][4], const float* fLse,
                                              const float* fDl, const int* sLim, int rb, bool need_mask,
                                              const int (&key)[2], int kend, bool part, float s_mul, float cap_mul,
                                              bool use_cap, uint32_t (&pa)[BQ / 16][4], uint32_t (&da)[BQ / 16][4],
                                              const unsigned long long* sW = nullptr, const int* sEnt = nullptr,
                                              const int (*mul)[2] = nullptr) {
  constexpr int NQ8 = BQ / 8;
  if constexpr (MUL == kMulNone)
    dkv_probs_ds<NQ8, true, kMulNone>(s, dp, fLse, fDl, sLim, nullptr, rb, need_mask, key, key, s_mul, cap_mul,
                                      use_cap);
  else
    dkv_probs_ds<NQ8, true, MUL>(s, dp, fLse, fDl, sLim, sW, rb, need_mask, key, *mul, s_mul, cap_mul, use_cap, sEnt);
  zero_keys_past<NQ8, true>(s, dp, key, kend, part);
#pragma unroll
  for (int kk = 0; kk < BQ / 16; ++kk) {
    acc_to_a<T>(s, kk, pa[kk]);
    acc_to_a<T>(dp, kk, da[kk]);
  }
}

// dq of the warp's 16 rows (rid: their global rows, -1: none) added to dq_accum with red.global.add.v2.f32 (dq_acc:
// row 0 of dq_accum at the lane's first column).
template <class Cfg>
__device__ __forceinline__ void sm90_dq_rows_red(const float (&dq)[Cfg::DQN / 8][4], const int* rid, float* dq_acc,
                                                 int lane) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = rid[(lane >> 2) + 8 * h];
    if (r >= 0) {
      float* dst = dq_acc + static_cast<int64_t>(r) * Cfg::D;
#pragma unroll
      for (int j = 0; j < Cfg::DQN / 8; ++j) red_add_f32x2(dst + 8 * j, dq[j][2 * h], dq[j][2 * h + 1]);
    }
  }
}

// dq, row by row: the warp's 16 rows to its staging rows at sq (once the bulk reads of the previous tile's are done),
// then lane i < 16 adds row i (global row rid[i], -1: none) to dq_rows through the bulk copy engine.
template <class Cfg>
__device__ __forceinline__ void sm90_dq_rows_reduce(const float (&dq)[Cfg::DQN / 8][4], uint32_t sq, const int* rid,
                                                    float* dq_rows, int lane) {
  constexpr int DQT = Cfg::DQN / 8;
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
    const int r = rid[lane];
    if (r >= 0) bulk_reduce_add_f32(dq_rows + static_cast<int64_t>(r) * Cfg::D, sq + lane * Cfg::DQ_PITCH, Cfg::DQN * 4);
    bulk_commit();
  }
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
