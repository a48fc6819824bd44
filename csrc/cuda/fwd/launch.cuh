// Host-side launch of the forward kernel: tile choice from R * g, grid from shapes only, the dynamic
// shared-memory opt-in once per (instantiation, device). Included by the instantiation files only.
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/common/launch.cuh"
#include "cuda/common/row_tiles.cuh"
#include "cuda/fwd/config.cuh"
#include "cuda/fwd/kernel.cuh"
#include "cuda/fwd/params.h"

namespace bsattn {
namespace cuda {

// BSATTN_FWD_KERNEL=mma: the mma.sync kernel everywhere (A / B comparisons, a fallback); read once.
inline bool env_forces_mma_fwd() {
  static const bool forced = env_equals("BSATTN_FWD_KERNEL", "mma");
  return forced;
}

template <typename T, class Cfg>
cudaError_t launch_tile(const FwdParams& p, cudaStream_t stream) {
  return launch_row_tiles<bsattn_fwd_kernel<T, Cfg>, Cfg>(p, stream);
}

#ifdef BSATTN_FWD_TUNING
// Development only (CMake -DBSATTN_FWD_TUNING=ON): BSATTN_FWD_TUNE="abc" picks variant a / b / c of the
// 128 / 64 / 16-row tiles of bf16, D = 128, so that one device session can time several configurations.
inline int tune_digit(int i) {
  const char* e = std::getenv("BSATTN_FWD_TUNE");
  return (e && static_cast<int>(std::strlen(e)) > i) ? e[i] - '0' : 0;
}
template <typename T>
cudaError_t launch_tuning(const FwdParams& p, cudaStream_t stream, int tm) {
  const int v = tune_digit(tm == 128 ? 0 : tm == 64 ? 1 : 2);
  if (tm == 128) {
    if (v == 1) return launch_tile<T, FwdCfg<128, 4, 1, 2, 64, 2, false, 2, 32>>(p, stream);  // 32-key chunks
    if (v == 2) return launch_tile<T, FwdCfg<128, 4, 1, 2, 64, 2, false, 2, 64>>(p, stream);  // FADD row sums
    if (v == 3) return launch_tile<T, FwdCfg<128, 8, 1, 1, 64, 3, true, 1, 64, false, true>>(p, stream);
    return launch_tile<T, FwdTile<128, 128>>(p, stream);
  }
  if (tm == 64) {
    if (v == 1) return launch_tile<T, FwdCfg<128, 4, 1, 1, 64, 3, true, 2>>(p, stream);
    if (v == 2) return launch_tile<T, FwdCfg<128, 4, 1, 1, 64, 2, true, 2, 64, false, true>>(p, stream);
    return launch_tile<T, FwdTile<128, 64>>(p, stream);
  }
  if (v == 1) return launch_tile<T, FwdCfg<128, 1, 4, 1, 64, 2, true, 3, 16, false, true>>(p, stream);
  return launch_tile<T, FwdTile<128, 16>>(p, stream);
}
#endif

// The mma.sync kernel (sm_80 and up), every tile size.
template <int kDType, int kD>
cudaError_t launch_fwd_mma(const FwdParams& p, cudaStream_t stream) {
  using T = typename DTypeOf<kDType>::type;
#ifdef BSATTN_FWD_TUNING
  if constexpr (kD == 128 && kDType == kBF16)
    return launch_tuning<T>(p, stream, packed_tile_rows(static_cast<int64_t>(p.R) * p.g));
#endif
  switch (packed_tile_rows(static_cast<int64_t>(p.R) * p.g)) {
    case 16:
      return launch_tile<T, FwdTile<kD, 16>>(p, stream);
    case 64:
      return launch_tile<T, FwdTile<kD, 64>>(p, stream);
    default:
      return launch_tile<T, FwdTile<kD, 128>>(p, stream);
  }
}

// Few block rows split over CTAs (a decode step: fwd/params.h fwd_split_parts_few_rows), where the lowering gave the
// row split's area for them: the wgmma gather kernel then runs whatever R * g (a 64-row tile of R * g <= 16 real rows:
// a decode step is bound by reading K / V, and the 16-row mma.sync tile cannot split), so a sequence's few rows spread
// over the GPU instead of one CTA per (batch, KV head).
inline bool fwd_splits_few_rows(const FwdParams& p, int D) {
  return p.ws != nullptr && fwd_split_parts_few_rows(p, D) > 0 && p.ws_words == fwd_split_workspace_words(p, D, true);
}

// On a compute capability 9.0 device when the module has the sm_90a kernels: tiles of 64 and 128 packed rows run the
// wgmma gather kernel (fwd_sm90/kernel.cuh; kernel_ws.cuh for 128 rows at D = 128; 64-row tiles only at D = 256), and
// so do few block rows split over CTAs (fwd_splits_few_rows); R * g <= 16 the sweep kernel where it applies
// (fwd_sm90/sweep_kernel.cuh, D = 64 and 128); everything else, or BSATTN_FWD_KERNEL=mma in the environment, the
// mma.sync one.
template <int kDType, int kD>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
#ifdef BSATTN_WITH_SM90
  const int tm = packed_tile_rows(static_cast<int64_t>(p.R) * p.g);
  if (device_runs_sm90a() && !env_forces_mma_fwd()) {
    if (tm >= 64) return launch_fwd_sm90<kDType, kD>(p, stream, tm);
    if (fwd_splits_few_rows(p, kD)) return launch_fwd_sm90<kDType, kD>(p, stream, 64);
    if constexpr (kD == 64 || kD == 128) {
      const cudaError_t err = launch_fwd_sm90_sweep<kDType, kD>(p, stream);
      if (err != cudaErrorNotSupported) return err;
    }
  }
#endif
  return launch_fwd_mma<kDType, kD>(p, stream);
}

}  // namespace cuda
}  // namespace bsattn

// Explicit instantiation of one (dtype, head dim); each lives in its own .cu so nvcc runs in parallel.
#define BSATTN_INSTANTIATE_FWD(DTYPE, D) \
  template cudaError_t bsattn::cuda::launch_fwd<bsattn::cuda::DTYPE, D>(const bsattn::cuda::FwdParams&, cudaStream_t);
