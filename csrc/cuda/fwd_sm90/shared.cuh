// What the Hopper forward kernels (the gather, kernel.cuh and kernel_ws.cuh, and the sweep, sweep_kernel.cuh) share:
// the two products of a KV tile run to completion (nothing else of the warpgroup's in flight), S = Q K^T and O += P V.
// (Their shared memory starts with the same carve-up, written out in each: routed through one struct, the timed
// kernels' SASS changed throughout; tried again in the seventeenth session for all three, with the same result.)
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/common/wgmma.cuh"
#include "cuda/fwd/mma.cuh"
#include "cuda/fwd/params.h"
#include "cuda/fwd/softmax.cuh"

namespace bsattn {
namespace cuda {

// S (m64 x BN, the warpgroup's rows) = Q K^T: Q and K from shared memory (K-major descriptors), k16 steps along D.
template <typename T, int BN, int D, int TM>
__device__ __forceinline__ void sm90_qk_now(float (&sf)[BN / 2], uint64_t q_desc, uint64_t k_desc) {
  wgmma_fence();
  wgmma_ss_kmajor<T, BN, D, TM, BN>(sf, q_desc, k_desc);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(sf);
}

// O (m64 x D) += P V: P from registers (KSTEPS k16 steps along the keys), V MN-major from shared memory.
template <typename T, int D, int KSTEPS>
__device__ __forceinline__ void sm90_pv_now(float (&of)[D / 2], uint32_t (&pa)[KSTEPS][4], uint64_t v_desc) {
  wgmma_fence();
  fence_regs(of);
  wgmma_rs_mn<T, D, KSTEPS>(of, pa, v_desc);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(of);
}

// One warpgroup's 64 rows in the gather kernels (kernel.cuh, kernel_ws.cuh): O, the online softmax's row state, the
// scores of the current KV tile and its P packed as the A operand of P V; the descriptors of the warpgroup's Q rows
// and of K / V stage 0 (+ stage * KV_STAGE_BYTES / 16).
template <typename T, class Cfg>
struct Sm90FwdRows {
  static constexpr int D = Cfg::D, BN = Cfg::BN, TM = Cfg::TM, NT8 = BN / 8, DT = D / 8;
  static constexpr uint64_t kStageDesc = Cfg::KV_STAGE_BYTES >> 4;
  float o[1][DT][4];
  float m[1][2] = {{-INFINITY, -INFINITY}}, l[1][2] = {{0.f, 0.f}};
  float lsum[1][4];  // (unused: row sums by FADD)
  float s[1][NT8][4];
  uint32_t pa[BN / 16][4];  // P of a tile as the A operand of P V (k16 steps along the keys)
  float alpha[1][2];        // o's rescale factor of the last softmax step
  uint64_t q_desc, k_desc, v_desc;

  __device__ __forceinline__ Sm90FwdRows(uint32_t sQ, uint32_t sK, uint32_t sV, int wg) {
#pragma unroll
    for (int d = 0; d < DT; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[0][d][e] = 0.f;
    q_desc = sw128_desc(sQ + wg * 64 * 128, 16, 1024);
    k_desc = sw128_desc(sK, 16, 1024);
    v_desc = sw128_desc(sV, BN * 128, 1024);
  }
  __device__ __forceinline__ float (&of())[D / 2] { return reinterpret_cast<float(&)[D / 2]>(o); }
  __device__ __forceinline__ float (&sf())[BN / 2] { return reinterpret_cast<float(&)[BN / 2]>(s); }

  // S = Q K^T (issued, not committed): k16 steps along D; step kk is 32 bytes into column block kk / 4
  __device__ __forceinline__ void issue_qk(int kstage) {
    wgmma_ss_kmajor<T, BN, D, TM, BN>(sf(), q_desc, k_desc + kstage * kStageDesc);
  }
  // O += P V (issued, not committed): k16 steps along the keys; step kk is 16 key rows (2048 bytes) further on
  __device__ __forceinline__ void issue_pv(int vstage) {
    wgmma_rs_mn<T, D, BN / 16>(of(), pa, v_desc + vstage * kStageDesc);
  }
  // The same, run to completion (nothing else of this warpgroup's in flight)
  __device__ __forceinline__ void qk_now(int kstage) {
    sm90_qk_now<T, BN, D, TM>(sf(), q_desc, k_desc + kstage * kStageDesc);
  }
  __device__ __forceinline__ void pv_now(int vstage) { sm90_pv_now<T, D, BN / 16>(of(), pa, v_desc + vstage * kStageDesc); }
  // scores -> probabilities in s (kidx: the K stage's key indices, slim: the warp's rows' causal limits, read only
  // with need_mask); returns whether any row's max grew (then O needs alpha)
  __device__ __forceinline__ bool probs(const FwdParams& p, bool need_mask, const int* kidx, const int* slim, int lane) {
    const float mul = prepare_scores<1, NT8>(s, p);
    if (need_mask) mask_scores<1, NT8>(s, kidx, slim, lane);
    return softmax_probs<1, NT8, false>(s, mul, m, l, alpha);
  }
  __device__ __forceinline__ void rescale() { rescale_acc<1, DT, false>(o, lsum, alpha); }
  __device__ __forceinline__ void pack_p() {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) acc_to_a<T>(s[0], kk, pa[kk]);
  }
  // One step of the overlapped schedule: S of tile t (K stage kstage) and P V of tile t - 1 (V stage vstage) issued
  // together, the softmax of t while P V runs, then `scores_done` (S and the mask are done with the K stage), O
  // rescaled once P V has landed (`pv_done` before: the V stage is free), P of t packed. No branch around a wgmma.
  template <class ScoresDone, class PvDone>
  __device__ __forceinline__ void overlapped_step(const FwdParams& p, bool need_mask, int kstage, int vstage,
                                                  const int* kidx, const int* slim, int lane, ScoresDone&& scores_done,
                                                  PvDone&& pv_done) {
    wgmma_fence();
    issue_qk(kstage);
    wgmma_commit();
    issue_pv(vstage);
    wgmma_commit();
    wgmma_wait<1>();
    fence_regs(sf());
    const bool grew = probs(p, need_mask, kidx, slim, lane);
    scores_done();
    wgmma_wait<0>();
    fence_regs(of());
    pv_done();
    if (grew) rescale();
    pack_p();
  }
};

}  // namespace cuda
}  // namespace bsattn
