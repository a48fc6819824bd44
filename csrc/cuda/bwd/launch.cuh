// Host-side launch of the backward kernels: tile configurations, their choice from R * g (dq) and C (dk / dv),
// grids from shapes only, the dynamic shared-memory opt-in once per (kernel, device). Included by the
// instantiation files only.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <cuda_runtime.h>

#include "cuda/bwd/dkdv_compact_kernel.cuh"
#include "cuda/bwd/dkdv_kernel.cuh"
#include "cuda/bwd/dq_kernel.cuh"
#include "cuda/bwd/params.h"
#include "cuda/common/launch.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

// ---- tile configurations --------------------------------------------------------------------------------
// dq, by packed rows per CTA (TM = 16 * WM): the smallest of 16, 64, 128 holding R * g (above: several tiles
// per block row; 128-row tiles only at D = 64, see launch_dq). TM = 16 splits every KV tile over 4 warps along
// the keys.
template <int D, int TM>
struct DqTile;
//                                           D  WM WN  BN  ST NKC  QREG  MINB
template <> struct DqTile<64, 16> : DqCfg<64, 1, 4, 64, 3, 16, true, 4> {};
template <> struct DqTile<64, 64> : DqCfg<64, 4, 1, 64, 3, 32, true, 3> {};
template <> struct DqTile<64, 128> : DqCfg<64, 8, 1, 64, 2, 16, true, 2> {};
template <> struct DqTile<128, 16> : DqCfg<128, 1, 4, 64, 2, 16, true, 2> {};
template <> struct DqTile<128, 64> : DqCfg<128, 4, 1, 64, 2, 32, true, 2> {};
template <> struct DqTile<256, 16> : DqCfg<256, 1, 4, 64, 2, 16, false, 1> {};
template <> struct DqTile<256, 64> : DqCfg<256, 4, 1, 32, 2, 16, false, 1> {};

// dk / dv, by key rows per CTA (BK = 16 * WK): the smallest of 16, 64, 128 holding C (above: several tiles
// per block column; 128-key tiles only at D = 64, see launch_dkdv). BK = 16 splits every query tile over 4 warps
// along the rows; it also serves the packed small blocks (C <= 8, several block columns per tile).
template <int D, int BK, int MODE>
struct DkvTile;
//                                                 D  WK WQ  BQ ST  QC  KREG MODE MINB
template <int M> struct DkvTile<64, 16, M> : DkvCfg<64, 1, 4, 64, 3, 16, true, M, 2> {};
template <int M> struct DkvTile<64, 64, M> : DkvCfg<64, 4, 1, 64, 3, 32, true, M, 3> {};
template <int M> struct DkvTile<64, 128, M> : DkvCfg<64, 8, 1, 64, 2, 16, false, M, 2> {};
template <int M> struct DkvTile<128, 16, M> : DkvCfg<128, 1, 4, 64, 2, 16, false, M, 2> {};
template <int M> struct DkvTile<128, 64, M> : DkvCfg<128, 4, 1, 64, 2, 32, false, M, 2> {};
template <int M> struct DkvTile<256, 16, M> : DkvCfg<256, 1, 4, 64, 2, 16, false, M, 1> {};
template <int M> struct DkvTile<256, 64, M> : DkvCfg<256, 4, 1, 32, 2, 16, false, M, 1> {};
// The 16-key column tile at D = 128 (8 < C <= 16) takes three stages (106 KB, still two CTAs per SM): 2 % faster than
// DkvTile<128, 16>'s two (H200, 2026-11-30, C = 12 and 16). The packed kernel keeps two: its window lists would leave
// room for one CTA per SM.
struct DkvColumn16Tile : DkvCfg<128, 1, 4, 64, 3, 16, false, 0, 2> {};

inline int dkv_tile_keys(int64_t C) { return C <= 16 ? 16 : C <= 64 ? 64 : 128; }

template <typename T, class Cfg>
cudaError_t launch_dq_tile(const Params& p, cudaStream_t stream) {
  return launch_row_tiles<bsattn_bwd_dq_kernel<T, Cfg>, Cfg>(p, stream);
}

template <typename T, class Cfg>
cudaError_t launch_dkdv_tile(const Params& p, cudaStream_t stream) {
  return launch_column_tiles<bsattn_bwd_dkdv_kernel<T, Cfg>, Cfg>(p, stream, Cfg::NT, Cfg::SMEM);
}

// Head dim 256 runs dk / dv in two passes, dv (MODE 1) then dk (MODE 2): one warp cannot hold both 16 x 256
// accumulators. launch(std::integral_constant<int, MODE>) launches one pass.
template <int kD, class Launch>
cudaError_t launch_dkdv_passes(Launch&& launch) {
  if constexpr (kD == 256) {
    const cudaError_t err = launch(std::integral_constant<int, 1>{});
    return err != cudaSuccess ? err : launch(std::integral_constant<int, 2>{});
  } else {
    return launch(std::integral_constant<int, 0>{});
  }
}

// Small blocks (C <= 8): P = 16 / C block columns per 16-key CTA (bsattn_bwd_dkdv_pack_kernel).
template <typename T, int kD>
cudaError_t launch_dkdv_pack(const Params& p, cudaStream_t stream) {
  return launch_dkdv_passes<kD>([&](auto mode) {
    using Cfg = DkvTile<kD, 16, decltype(mode)::value>;
    return launch_column_groups<bsattn_bwd_dkdv_pack_kernel<T, Cfg>>(p, stream, 16, Cfg::NT, Cfg::PACK_SMEM,
                                                                     Cfg::MINB);
  });
}

// Small blocks under tall block rows (C <= 2, R * g >= 256, D = 128) where the device has the shared memory: the
// listed keys compacted, 64 keys per CTA (bsattn_bwd_dkdv_compact_kernel). Elsewhere among C <= 8 it measured no
// faster than the packed kernel, or slower (H200, 2026-11-30: R * g = 64, 1.07x slower; C = 8, 1.26x; C = 4, 4 %
// faster but not checked). It runs one CTA per SM on a quarter as many CTAs as the packed kernel, so on a grid of
// fewer CTAs than SMs the packed kernel may be faster: not measured, and not part of the rule (the tests' small shapes
// would then no longer reach this kernel).
template <typename T, int kD>
cudaError_t launch_dkdv_compact(const Params& p, cudaStream_t stream) {
  using Cfg = DkvCompactCfg<kD>;
  return launch_column_groups<bsattn_bwd_dkdv_compact_kernel<T, Cfg>>(p, stream, Cfg::KR, Cfg::NT, Cfg::SMEM, 1);
}

// Its rule (the device's shared memory checked by the caller).
inline bool dkdv_compact_applies(const Params& p) { return p.C <= 2 && static_cast<int64_t>(p.R) * p.g >= 256; }

#ifdef BSATTN_BWD_DEV
// Development builds only: BSATTN_BWD_TUNE holds letters that switch a choice off, for timing side by side:
// 'n': no column packing; 'c': no compact small-block kernel; 'C': the compact kernel for every C <= 8 (profiling).
inline bool bwd_tune(char c) {
  const char* e = std::getenv("BSATTN_BWD_TUNE");
  return e != nullptr && std::strchr(e, c) != nullptr;
}
#else
inline bool bwd_tune(char) { return false; }
#endif

template <typename T, int kD, int BK>
cudaError_t launch_dkdv_keys(const Params& p, cudaStream_t stream) {
  if constexpr (kD == 128 && BK == 16) {
    return launch_dkdv_tile<T, DkvColumn16Tile>(p, stream);
  } else if constexpr (BK > 16 && kD <= 128) {
    // C > 16: one pass (MODE 0, one warp a key row): long columns split where the workspace holds the split's area
    using Cfg = DkvTile<kD, BK, 0>;
    return with_column_split<Cfg, T>(p, pair_split_offset(p, kD), stream,
                                     [&](const Params& ps) { return launch_dkdv_tile<T, Cfg>(ps, stream); });
  } else {
    return launch_dkdv_passes<kD>(
        [&](auto mode) { return launch_dkdv_tile<T, DkvTile<kD, BK, decltype(mode)::value>>(p, stream); });
  }
}

template <int kDType, int kD>
cudaError_t launch_dq(const Params& p, cudaStream_t stream) {
  using T = typename DTypeOf<kDType>::type;
  switch (packed_tile_rows(static_cast<int64_t>(p.R) * p.g)) {
    case 16:
      return launch_dq_tile<T, DqTile<kD, 16>>(p, stream);
    case 64:
      return launch_dq_tile<T, DqTile<kD, 64>>(p, stream);
    default:
      // D = 256: 128-row tiles would not fit in 163 KB. D = 128: two 4-warp CTAs of 64 rows per 128 rows measured
      // 3% faster than one 8-warp CTA of 128 (H100, R * g >= 128, 2026-11-25).
      if constexpr (kD == 64)
        return launch_dq_tile<T, DqTile<kD, 128>>(p, stream);
      else
        return launch_dq_tile<T, DqTile<kD, 64>>(p, stream);
  }
}

template <int kDType, int kD>
cudaError_t launch_dkdv(const Params& p, cudaStream_t stream) {
  using T = typename DTypeOf<kDType>::type;
  if constexpr (kD == 128) {
    const bool compact = (dkdv_compact_applies(p) && !bwd_tune('c')) || (bwd_tune('C') && p.C <= 8 && p.R * p.g >= 1);
    if (compact && device_smem_optin() >= DkvCompactCfg<kD>::SMEM) return launch_dkdv_compact<T, kD>(p, stream);
  }
  if (p.C <= 8 && !bwd_tune('n')) return launch_dkdv_pack<T, kD>(p, stream);
  switch (dkv_tile_keys(p.C)) {
    case 16:
      return launch_dkdv_keys<T, kD, 16>(p, stream);
    case 64:
      return launch_dkdv_keys<T, kD, 64>(p, stream);
    default:
      // D = 256: 128-key tiles would not fit in 163 KB. D = 128: 64-key tiles (two CTAs per 128 keys, 2 per SM)
      // measured 5% faster than one 8-warp CTA of 128 keys (H100, C = 128, 2026-11-25).
      if constexpr (kD == 64)
        return launch_dkdv_keys<T, kD, 128>(p, stream);
      else
        return launch_dkdv_keys<T, kD, 64>(p, stream);
  }
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn

// Explicit instantiations of one (direction, dtype, head dim); each lives in its own .cu so nvcc runs in
// parallel.
#define BSATTN_INSTANTIATE_BWD_DQ(DTYPE, D)                                                          \
  template cudaError_t bsattn::cuda::bwd::launch_dq<bsattn::cuda::bwd::DTYPE, D>(const bsattn::cuda::bwd::Params&, \
                                                                                cudaStream_t);
#define BSATTN_INSTANTIATE_BWD_DKDV(DTYPE, D)                                                          \
  template cudaError_t bsattn::cuda::bwd::launch_dkdv<bsattn::cuda::bwd::DTYPE, D>(const bsattn::cuda::bwd::Params&, \
                                                                                  cudaStream_t);
