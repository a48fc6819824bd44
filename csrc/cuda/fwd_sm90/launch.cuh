// Host-side launch of the Hopper forward kernel (tiles of 64 and 128 packed rows). Included by the sm_90a
// instantiation files only; fwd/launch.cuh decides when it runs.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/common/launch.cuh"
#include "cuda/fwd/launch.cuh"
#include "cuda/fwd/params.h"
#include "cuda/fwd_sm90/config.cuh"
#include "cuda/fwd_sm90/kernel.cuh"

namespace bsattn {
namespace cuda {

template <typename T, class Cfg>
cudaError_t launch_tile_sm90(const FwdParams& p, cudaStream_t stream) {
  return launch_row_tiles<bsattn_fwd_sm90_kernel<T, Cfg>, Cfg>(p, stream);
}

#ifdef BSATTN_FWD_TUNING
// Development only (CMake -DBSATTN_FWD_TUNING=ON): digits 4 / 5 of BSATTN_FWD_TUNE pick variant a / b of the
// 128 / 64-row tiles of bf16 (fwd/launch.cuh has digits 1-3).
template <typename T, int D>
cudaError_t launch_tuning_sm90(const FwdParams& p, cudaStream_t stream, int tm) {
  const int v = tune_digit(tm == 128 ? 3 : 4);
  if constexpr (D == 128) {
    if (tm == 128) {
      if (v == 1) return launch_tile_sm90<T, Sm90FwdCfg<128, 2, 128, 2, 2, 1, false>>(p, stream);
      return launch_tile_sm90<T, Sm90FwdTile<128, 128>>(p, stream);
    }
    if (v == 1) return launch_tile_sm90<T, Sm90FwdCfg<128, 1, 64, 2, 3, 2, true>>(p, stream);
    if (v == 2) return launch_tile_sm90<T, Sm90FwdCfg<128, 1, 32, 2, 2, 4, false>>(p, stream);
    if (v == 3) return launch_tile_sm90<T, Sm90FwdCfg<128, 1, 32, 3, 3, 4, false>>(p, stream);
    return launch_tile_sm90<T, Sm90FwdTile<128, 64>>(p, stream);
  } else {
    if (tm == 128) {
      if (v == 1) return launch_tile_sm90<T, Sm90FwdCfg<64, 2, 128, 2, 2, 1, false>>(p, stream);
      if (v == 2) return launch_tile_sm90<T, Sm90FwdCfg<64, 2, 128, 2, 2, 2, false>>(p, stream);
      if (v == 3) return launch_tile_sm90<T, Sm90FwdCfg<64, 2, 64, 3, 3, 2, false>>(p, stream);
      return launch_tile_sm90<T, Sm90FwdTile<64, 128>>(p, stream);
    }
    if (v == 1) return launch_tile_sm90<T, Sm90FwdCfg<64, 1, 128, 2, 2, 2, false>>(p, stream);
    if (v == 2) return launch_tile_sm90<T, Sm90FwdCfg<64, 1, 64, 2, 2, 4, false>>(p, stream);
    if (v == 3) return launch_tile_sm90<T, Sm90FwdCfg<64, 1, 128, 2, 2, 3, false>>(p, stream);
    return launch_tile_sm90<T, Sm90FwdTile<64, 64>>(p, stream);
  }
}
#endif

template <int kDType, int kD>
cudaError_t launch_fwd_sm90(const FwdParams& p, cudaStream_t stream, int tile_rows) {
  using T = typename DTypeOf<kDType>::type;
#ifdef BSATTN_FWD_TUNING
  if constexpr (kDType == kBF16) return launch_tuning_sm90<T, kD>(p, stream, tile_rows);
#endif
  if (tile_rows == 64) return launch_tile_sm90<T, Sm90FwdTile<kD, 64>>(p, stream);
  return launch_tile_sm90<T, Sm90FwdTile<kD, 128>>(p, stream);
}

}  // namespace cuda
}  // namespace bsattn

#define BSATTN_INSTANTIATE_FWD_SM90(DTYPE, D)                                                                  \
  template cudaError_t bsattn::cuda::launch_fwd_sm90<bsattn::cuda::DTYPE, D>(const bsattn::cuda::FwdParams&, \
                                                                               cudaStream_t, int);
