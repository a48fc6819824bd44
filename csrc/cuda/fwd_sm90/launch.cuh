// Host-side launch of the Hopper forward kernel (tiles of 64 and 128 packed rows). Included by the sm_90a
// instantiation files only; fwd/launch.cuh decides when it runs.
#pragma once

#include <climits>
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/common/launch.cuh"
#include "cuda/fwd/launch.cuh"
#include "cuda/fwd/params.h"
#include "cuda/fwd_sm90/config.cuh"
#include "cuda/fwd_sm90/kernel.cuh"
#include "cuda/fwd_sm90/sweep_kernel.cuh"

namespace bsattn {
namespace cuda {

template <typename T, class Cfg>
cudaError_t launch_tile_sm90(const FwdParams& p, cudaStream_t stream) {
  return launch_fwd_row_tiles<bsattn_fwd_sm90_kernel<T, Cfg>, Cfg, T>(p, stream);  // (with the row split)
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
  if constexpr (kDType == kBF16 && kD != 256) return launch_tuning_sm90<T, kD>(p, stream, tile_rows);
#endif
  if constexpr (kD == 256) {
    return launch_tile_sm90<T, Sm90FwdTile<kD, 64>>(p, stream);  // 64-row tiles whatever tile_rows (config.cuh)
  } else {
    if (tile_rows == 64) return launch_tile_sm90<T, Sm90FwdTile<kD, 64>>(p, stream);
    if constexpr (kD == 128) {
      // the 128-row tile with a producer warpgroup (kernel_ws.cuh, its own instantiation files): 9.5-11.4 % faster at
      // R * g >= 128 (H200, 2026-11-30, same-call pairs); BSATTN_FWD_WS=0: this file's two-warpgroup tile (A / B).
      // Read once.
      static const bool ws = !env_equals("BSATTN_FWD_WS", "0");
      if (ws) return launch_fwd_sm90_ws<kDType>(p, stream);
    }
    return launch_tile_sm90<T, Sm90FwdTile<kD, 128>>(p, stream);
  }
}

// Block rows per CTA of the sweep kernel, or 0 where it does not apply: R * g <= 16 (four block rows or more per
// 64-row tile), a density (the layout's capacity over the block grid) of at least R * g / 32, and the bit map within
// the device's shared memory. The sweep costs about what a dense forward does whatever the density (at C <= 16 nearly
// every 64-key tile holds a listed key of some block row); the gathers cost in proportion to the density and to
// 1 / (R * g) (their 16-row tile, a few real rows, L2 traffic per listed key): H200, M = N = 8192, density 1/4,
// 7.45 ms at R * g = 4, 3.76 at 8, 1.91 at 16 against about 2.9 for the sweep (sweep_kernel.cuh has the figures).
// Also at least 1 / 16 (at R * g = 1 the sweep's 7-13 ms against the gathers' 30 at density 1/4 and 9.6 against
// 15.6 at 1/8 put the break-even near 1/15), and two CTAs per SM where R * g > 2 (at R * g = 4 a sweep of one CTA per
// SM measured slower than the gathers; at R * g = 1 it still won 2.3-4.2x). BSATTN_FWD_SWEEP=0: never; =all:
// wherever it fits (A / B runs). Read once.
template <class Cfg>
int fwd_sweep_block_rows(const FwdParams& p) {
  static const bool never = env_equals("BSATTN_FWD_SWEEP", "0"), always = env_equals("BSATTN_FWD_SWEEP", "all");
  static std::atomic<int> smem_per_sm[64];
  const int64_t rg = static_cast<int64_t>(p.R) * p.g;
  if (never || rg > 16 || p.MB <= 0 || p.NB <= 0) return 0;
  const double density = static_cast<double>(p.nnz) / (static_cast<double>(p.MB) * p.NB);
  if (!always && (density * 32 < static_cast<double>(rg) || density * 16 < 1.0)) return 0;
  const int brt = static_cast<int>(64 / rg);
  const int64_t smem = int64_t{Cfg::SMEM} + sweep_shape<Cfg>(p, brt).extra;
  if (smem > device_smem_optin()) return 0;
  if (!always) {
    const int per_sm = cached_device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, smem_per_sm);
    if (rg > 2 && per_sm > 0 && 2 * (smem + 1024) > per_sm) return 0;
  }
  return brt;
}

template <typename T, class Cfg>
cudaError_t launch_sweep_sm90(const FwdParams& p0, cudaStream_t stream) {
  FwdParams p = p0;
  p.sweep_brt = fwd_sweep_block_rows<Cfg>(p);
  if (p.sweep_brt == 0) return cudaErrorNotSupported;
  const SweepShape sh = sweep_shape<Cfg>(p, p.sweep_brt);
  const int64_t grid = static_cast<int64_t>(p.B) * p.Hk * ((p.MB + p.sweep_brt - 1) / p.sweep_brt);
  // the bit map's size varies by call: opt in to the device's maximum first (launch_kernel's opt-in, sharing
  // smem_done, then finds it done and does not lower it to this call's size)
  static std::atomic<uint64_t> smem_done_of[2] = {{0}, {0}};  // one per kernel
  const bool lens = p.kv_lens != nullptr;  // (per-sequence key lengths: the kernel that reads them)
  const auto kernel = lens ? bsattn_fwd_sm90_sweep_kernel<T, Cfg, true> : bsattn_fwd_sm90_sweep_kernel<T, Cfg, false>;
  std::atomic<uint64_t>& smem_done = smem_done_of[lens ? 1 : 0];
  if (grid > 0) {
    const cudaError_t err = opt_in_smem(kernel, device_smem_optin(), 1, smem_done);
    if (err != cudaSuccess) return err;
  }
  // the bit maps built once per call (the table pass) where the caller's workspace holds them;
  // BSATTN_FWD_SWEEP_TABLE=0: each CTA builds its rows' maps (A / B)
  static const bool own_maps = env_equals("BSATTN_FWD_SWEEP_TABLE", "0");
  const int64_t table_words = fwd_sweep_table_words(p);
  const int64_t rows = fwd_sweep_rows(p);  // a warp each in the table pass
  if (!own_maps && grid > 0 && table_words > 0 && p.ws != nullptr && p.ws_words >= table_words &&
      (rows + 7) / 8 <= INT_MAX) {
    cudaError_t err = cudaMemsetAsync(p.ws, 0, static_cast<size_t>(rows * sh.words) * 4, stream);  // the maps
    if (err != cudaSuccess) return err;
    const unsigned blocks = static_cast<unsigned>((rows + 7) / 8);
    bsattn_fwd_sweep_table_kernel<T><<<blocks, 256, 0, stream>>>(p, p.ws, sh.words);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    p.sweep_table = p.ws;
  }
  return launch_kernel(kernel, grid, Cfg::NT, Cfg::SMEM + sh.extra, 1, smem_done, p, stream, sh);
}

template <int kDType, int kD>
cudaError_t launch_fwd_sm90_sweep(const FwdParams& p, cudaStream_t stream) {
  return launch_sweep_sm90<typename DTypeOf<kDType>::type, Sm90SweepTile<kD>>(p, stream);
}

}  // namespace cuda
}  // namespace bsattn

#define BSATTN_INSTANTIATE_FWD_SM90_SWEEP(DTYPE, D)                                                                \
  template cudaError_t bsattn::cuda::launch_fwd_sm90_sweep<bsattn::cuda::DTYPE, D>(const bsattn::cuda::FwdParams&, \
                                                                                     cudaStream_t);

#define BSATTN_INSTANTIATE_FWD_SM90(DTYPE, D)                                                                  \
  template cudaError_t bsattn::cuda::launch_fwd_sm90<bsattn::cuda::DTYPE, D>(const bsattn::cuda::FwdParams&, \
                                                                               cudaStream_t, int);
