// Host-side launch of the narrow-column dk / dv kernel's form with a producer warpgroup (dkdv_narrow_kernel.cuh,
// Sm90DkdvNarrowWsTile). Included by its own instantiation files only, so that the default form's translation unit
// (and SASS) stays as it was.
#pragma once

#include <cuda_runtime.h>

#include "cuda/bwd/column_split.cuh"
#include "cuda/bwd/params.h"
#include "cuda/bwd_sm90/config.cuh"
#include "cuda/bwd_sm90/dkdv_narrow_kernel.cuh"
#include "cuda/common/launch.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

template <typename T, class Cfg>
cudaError_t launch_dkdv_narrow_ws_tile(const Params& p, cudaStream_t stream) {
  // long columns split where the workspace holds the split's area (bwd/column_split.cuh)
  return with_column_split<Cfg, T>(p, pair_split_offset(p, Cfg::D), stream, [&](const Params& ps) {
    return launch_column_tiles<bsattn_bwd_sm90_dkdv_narrow_kernel<T, Cfg>, Cfg>(ps, stream, Cfg::NT_ALL, Cfg::SMEM);
  });
}

template <int kDType, int kD>
cudaError_t launch_dkdv_sm90_ws(const Params& p, cudaStream_t stream) {
  using T = typename DTypeOf<kDType>::type;
  if constexpr (kD == 256) {  // 16- or 32-key chunks of any block column (bwd/common.cuh column_work)
    if (p.C > 16) return launch_dkdv_narrow_ws_tile<T, Sm90DkdvNarrowWsTile256Wide>(p, stream);
    return launch_dkdv_narrow_ws_tile<T, Sm90DkdvNarrowWsTile256>(p, stream);
  } else {
    if (p.C > Sm90DkdvNarrowWsTile::BK) return cudaErrorNotSupported;
    return launch_dkdv_narrow_ws_tile<T, Sm90DkdvNarrowWsTile>(p, stream);
  }
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn

#define BSATTN_INSTANTIATE_DKDV_SM90_WS(DTYPE, D)                                                \
  template cudaError_t bsattn::cuda::bwd::launch_dkdv_sm90_ws<bsattn::cuda::bwd::DTYPE, D>(     \
      const bsattn::cuda::bwd::Params&, cudaStream_t);
