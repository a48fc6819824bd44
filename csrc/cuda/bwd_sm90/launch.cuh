// Host-side launch of the Hopper backward (bwd_sm90/kernel.cuh): zero dq_accum, one CTA per 64 keys of a block
// column, then dq = scale * dq_accum. Included by the sm_90a instantiation files only; bwd/dispatch.cu decides when
// it runs.
#pragma once

#include <atomic>
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/bwd/params.h"
#include "cuda/bwd_sm90/config.cuh"
#include "cuda/bwd_sm90/kernel.cuh"
#include "cuda/common/launch.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

template <int kDType, int kD>
cudaError_t launch_bwd_sm90(const Params& p0, cudaStream_t stream) {
  using T = typename DTypeOf<kDType>::type;
  using Cfg = Sm90BwdTile<kD>;
  Params p = p0;
  const int64_t nq = static_cast<int64_t>(p.B) * p.M * p.Hq * kD;  // dq elements
  cudaError_t err = cudaMemsetAsync(p.dq_accum, 0, static_cast<size_t>(nq) * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  p.nkc = static_cast<int>((static_cast<int64_t>(p.C) + Cfg::BK - 1) / Cfg::BK);
  const int64_t grid = static_cast<int64_t>(p.B) * p.Hk * p.NB * p.nkc;
  static std::atomic<uint64_t> smem_done{0};  // one per (T, D)
  err = launch_kernel(bsattn_bwd_sm90_kernel<T, Cfg>, grid, Cfg::NT, Cfg::SMEM, Cfg::MINB, smem_done, p, stream);
  if (err != cudaSuccess || nq == 0) return err;
  const int64_t n8 = nq / 8;
  constexpr int64_t kMaxBlocks = 132 * 16;  // a few waves of an H100 / H200; the kernel strides over the rest
  const int64_t blocks = (n8 + 255) / 256 < kMaxBlocks ? (n8 + 255) / 256 : kMaxBlocks;
  bsattn_bwd_dq_convert_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      p.dq_accum, static_cast<T*>(p.dq), n8, p.scale);
  return cudaGetLastError();
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn

#define BSATTN_INSTANTIATE_BWD_SM90(DTYPE, D)                                                    \
  template cudaError_t bsattn::cuda::bwd::launch_bwd_sm90<bsattn::cuda::bwd::DTYPE, D>(          \
      const bsattn::cuda::bwd::Params&, cudaStream_t);
