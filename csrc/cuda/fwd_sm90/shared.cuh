// What the Hopper forward kernels (the gather, kernel.cuh and kernel_ws.cuh, and the sweep, sweep_kernel.cuh) share:
// the two products of a KV tile run to completion (nothing else of the warpgroup's in flight), S = Q K^T and O += P V.
// (Their shared memory starts with the same carve-up, written out in each: routed through one struct, the timed
// kernels' SASS changed throughout; tried again in the seventeenth session for all three, with the same result.)
#pragma once

#include <cstdint>

#include "cuda/common/wgmma.cuh"

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

}  // namespace cuda
}  // namespace bsattn
