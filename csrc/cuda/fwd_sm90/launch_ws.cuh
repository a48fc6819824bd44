// Host-side launch of the Hopper forward's warp-specialised 128-row tile (fwd_sm90/kernel_ws.cuh). Included by its
// own instantiation files only: in the translation unit of kernel.cuh's tiles it changed their SASS.
#pragma once

#include <cuda_runtime.h>

#include "cuda/common/launch.cuh"
#include "cuda/fwd/params.h"
#include "cuda/fwd_sm90/config.cuh"
#include "cuda/fwd_sm90/kernel_ws.cuh"

namespace bsattn {
namespace cuda {

template <int kDType>
cudaError_t launch_fwd_sm90_ws(const FwdParams& p, cudaStream_t stream) {
  using T = typename DTypeOf<kDType>::type;
  return launch_fwd_row_tiles<bsattn_fwd_sm90_ws_kernel<T, Sm90FwdWsTile>, Sm90FwdWsTile, T>(p, stream);
}

}  // namespace cuda
}  // namespace bsattn

#define BSATTN_INSTANTIATE_FWD_SM90_WS(DTYPE) \
  template cudaError_t bsattn::cuda::launch_fwd_sm90_ws<bsattn::cuda::DTYPE>(const bsattn::cuda::FwdParams&, cudaStream_t);
