// Host-side launch of the Hopper backward (bwd_sm90/kernel.cuh): zero dq_accum, one CTA per 64 or 128 keys of a
// block column, then dq = scale * dq_accum. Included by the sm_90a instantiation files only; bwd/dispatch.cu decides
// when it runs.
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

// Whether block columns of C keys take the two-warpgroup tile (128 keys): D = 128 and C >= 128, unless C's last
// 128-key tile would be at most half full (C mod 128 in 1 .. 64: the one-warpgroup tile pads less there), or
// BSATTN_BWD_SM90_TILE=narrow is in the environment (A / B comparisons; read once).
inline bool use_wide_bwd_tile(int C) {
  static const bool narrow = env_equals("BSATTN_BWD_SM90_TILE", "narrow");
  return C >= 128 && (C % 128 == 0 || C % 128 > 64) && !narrow;
}

template <typename T, class Cfg>
cudaError_t launch_bwd_sm90_tile(const Params& p, cudaStream_t stream) {
  return launch_column_tiles<bsattn_bwd_sm90_kernel<T, Cfg>, Cfg>(p, stream, Cfg::NT, Cfg::SMEM);
}

template <int kDType, int kD>
cudaError_t launch_bwd_sm90(const Params& p, cudaStream_t stream) {
  using T = typename DTypeOf<kDType>::type;
  const int64_t nq = static_cast<int64_t>(p.B) * p.M * p.Hq * kD;  // dq elements
  cudaError_t err = cudaMemsetAsync(p.dq_accum, 0, static_cast<size_t>(nq) * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  if constexpr (kD == 128) {
    if (use_wide_bwd_tile(p.C)) err = launch_bwd_sm90_tile<T, Sm90BwdWideTile>(p, stream);
    else err = launch_bwd_sm90_tile<T, Sm90BwdTile<kD>>(p, stream);
  } else {
    err = launch_bwd_sm90_tile<T, Sm90BwdTile<kD>>(p, stream);
  }
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
