// Host-side launch of the Hopper backward (bwd_sm90/kernel.cuh): zero dq_accum, one CTA per 64 or 128 keys of a
// block column, then dq = scale * dq_accum. Included by the sm_90a instantiation files only; bwd/dispatch.cu decides
// when it runs.
#pragma once

#include <atomic>
#include <cstdint>

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include "cuda/bwd/params.h"
#include "cuda/bwd_sm90/config.cuh"
#include "cuda/bwd_sm90/dkdv_narrow_kernel.cuh"
#include "cuda/bwd_sm90/dq_kernel.cuh"
#include "cuda/bwd_sm90/dq_split.cuh"
#include "cuda/bwd_sm90/kernel.cuh"
#include "cuda/bwd_sm90/kernel_ws.cuh"
#include "cuda/bwd_sm90/pack_kernel.cuh"
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

// The driver's cuTensorMapEncodeTiled, through the runtime (no link against libcuda); null if unavailable.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &q);
#endif
    if (err != cudaSuccess || q != cudaDriverEntryPointSuccess) f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// dq_accum [B, M, Hq, D] f32 as a tensor map for bsattn_bwd_sm90_ws_kernel<..., true>: boxes of 32 columns x g heads
// x BQ / g query rows x 1, 128-byte swizzle. False (and the per-row reduction runs) unless every tile of BQ packed
// rows is BQ / g consecutive whole query rows (g dividing BQ) and the driver encodes it: R * g a multiple of BQ (a
// tile within one block row), or, with consecutive_rows (the sweep: its row list is every block row in order), R * g
// dividing BQ with g > 1 (a tile of BQ / (R * g) consecutive block rows).
template <class Cfg>
bool dq_tensor_map(const Params& p, CUtensorMap* map, bool consecutive_rows = false) {
  const int64_t RG = static_cast<int64_t>(p.R) * p.g;
  if (p.g < 1 || RG < 1 || Cfg::BQ % p.g != 0 || p.dq_accum == nullptr) return false;
  // (consecutive block rows of one head, g = 1: 64 rows of 128 bytes a box; R = g = 1 measured 4 % slower than row by
  // row, H200, 2026-11-30, where g = 4 gained 4-6 %)
  if (RG % Cfg::BQ != 0 && !(consecutive_rows && Cfg::BQ % RG == 0 && p.g > 1)) return false;
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(Cfg::D), static_cast<cuuint64_t>(p.Hq),
                              static_cast<cuuint64_t>(p.M), static_cast<cuuint64_t>(p.B)};
  const cuuint64_t strides[3] = {dims[0] * 4, dims[0] * dims[1] * 4, dims[0] * dims[1] * dims[2] * 4};  // bytes
  const cuuint32_t box[4] = {32, static_cast<cuuint32_t>(p.g), static_cast<cuuint32_t>(Cfg::BQ / p.g), 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, p.dq_accum, dims, strides, box, unit,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Whether the producer kernel's register plan holds in the binary: setmaxnreg only moves registers within the CTA's
// launch allocation, so the consumers' setmaxnreg.inc would wait forever if ptxas had given the kernel fewer than
// Cfg::LAUNCH_REGS a thread (the static_assert checks the constant, this the build).
template <class Cfg, typename Kernel>
bool register_plan_holds(Kernel kernel) {
  cudaFuncAttributes a{};
  if (cudaFuncGetAttributes(&a, kernel) != cudaSuccess) {
    (void)cudaGetLastError();  // not left for the launch's error check to find
    return false;
  }
  return a.numRegs * Cfg::NT_ALL >= 128 * Cfg::PRODUCER_REGS + Cfg::NT * Cfg::CONSUMER_REGS;
}

// A persistent warp-specialised kernel (kernel_ws.cuh; Cfg its tile, p as it takes it): one CTA per SM (or, with
// BSATTN_BWD_SM90_PERSIST=0, one per work item, for A / B comparisons; read once), the items handed out by the
// counter after dq_accum's elements (zeroed with them by the caller).
template <auto Kernel, class Cfg>
cudaError_t launch_ws_persistent(const Params& p0, int smem, const CUtensorMap& map, cudaStream_t stream) {
  static const bool one_item_per_cta = env_equals("BSATTN_BWD_SM90_PERSIST", "0");
  Params p = p0;
  const int64_t items = column_tiles_setup<Cfg>(p);  // the work items: column_tiles' tiles
  if (items == 0) return cudaSuccess;
  const int sms = device_sm_count() > 0 ? device_sm_count() : 132;
  const int64_t grid = items < sms || one_item_per_cta ? items : sms;
  if (items > INT_MAX - grid) return cudaErrorInvalidConfiguration;  // (the kernel's item indices stay ints)
  unsigned* sched = reinterpret_cast<unsigned*>(p.dq_accum + static_cast<int64_t>(p.B) * p.M * p.Hq * Cfg::D);
  static std::atomic<uint64_t> smem_done{0};  // one per kernel
  return launch_kernel(Kernel, grid, Cfg::NT_ALL, smem, 1, smem_done, p, stream, map, sched,
                       static_cast<int>(items) HANG_ARG);
}

template <typename T, bool DQ_MAP>
cudaError_t launch_bwd_sm90_ws(const Params& p, const CUtensorMap& map, cudaStream_t stream) {
  using Cfg = Sm90BwdWsTile;
  return launch_ws_persistent<bsattn_bwd_sm90_ws_kernel<T, Cfg, DQ_MAP>, Cfg>(p, Cfg::SMEM_WS, map, stream);
}

template <typename T, class Cfg>
cudaError_t launch_bwd_sm90_tile(const Params& p, cudaStream_t stream) {
  return launch_column_tiles<bsattn_bwd_sm90_kernel<T, Cfg>, Cfg>(p, stream, Cfg::NT, Cfg::SMEM);
}

// Small blocks (C <= 16): 64 / C block columns per 64-key CTA (pack_kernel.cuh); GATED: behind the sweep form.
template <typename T, int kD, bool GATED = false>
cudaError_t launch_bwd_sm90_pack(const Params& p, cudaStream_t stream) {
  using Cfg = Sm90BwdPackTile<kD>;
  return launch_column_groups<bsattn_bwd_sm90_pack_kernel<T, Cfg, GATED>>(p, stream, Cfg::BK, Cfg::NT,
                                                                           Cfg::PACK_SMEM, Cfg::MINB);
}

// The sweep form's tables (one warp per (layout, block row)): bit c % 64 of word c / 64 of the block row's words for
// each listed column c in [0, NB) (atomicOr: order-free); *dup = 1 where a bit was already set (a block listed twice:
// the bit map cannot count it); rows[br] = br. bits and dup zeroed by the caller.
template <typename T>  // (T: one instance per instantiation file, no duplicate symbol)
__global__ void bsattn_bwd_sweep_tables_kernel(const __grid_constant__ Params p, unsigned long long* bits, int* dup,
                                               int32_t* rows) {
  const int64_t gw = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (gw >= static_cast<int64_t>(p.LB) * p.LH * p.MB) return;  // (uniform per warp)
  const int64_t lid = gw / p.MB;
  const int br = static_cast<int>(gw - lid * p.MB);
  if (lid == 0 && lane == 0) rows[br] = br;
  const RowRange rr = row_range(p.indptr + lid * (p.MB + 1), br, p.nnz);
  const int32_t* idx = p.indices + lid * p.nnz;
  unsigned long long* row = bits + gw * p.sweep_nbw;
  bool d = false;
  for (int64_t e = rr.start + lane; e < rr.end; e += 32) {
    const int c = __ldg(idx + e);
    if (!valid_block(c, p.NB)) continue;
    const unsigned long long bit = 1ull << (c & 63);
    d |= (atomicOr(row + (c >> 6), bit) & bit) != 0ull;
  }
  if (__any_sync(0xffffffffu, d) && lane == 0) *dup = 1;
}

// The sweep form (sm90_sweep_applies, the workspace holding its tables): the tables, then the warp-specialised kernel
// over 128-key items with every block row (SWEEP), then the packed kernel, which runs only if the layout has a
// duplicate block (both read *dup: one of them does the work). dq_accum (all of it) zeroed by the caller.
template <typename T>
cudaError_t launch_bwd_sm90_sweep(const Params& p0, cudaStream_t stream) {
  using Cfg = Sm90BwdSweepTile;
  const int64_t nq = static_cast<int64_t>(p0.B) * p0.M * p0.Hq * Cfg::D;
  float* const tab = p0.dq_accum + nq + kDqSchedWords;
  int* const dup = reinterpret_cast<int*>(tab);
  const int nbw = (p0.NB + 63) / 64;
  unsigned long long* const bits = reinterpret_cast<unsigned long long*>(tab + 8);
  int32_t* const rows = reinterpret_cast<int32_t*>(tab + 8 + 2 * static_cast<int64_t>(p0.LB) * p0.LH * p0.MB * nbw);
  Params p = p0;
  p.sweep_nbw = nbw;
  p.sweep_c = p0.C;
  const int64_t warps = static_cast<int64_t>(p.LB) * p.LH * p.MB;
  const int64_t blocks = (warps + 7) / 8;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  if (blocks > 0)
    bsattn_bwd_sweep_tables_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p, bits, dup, rows);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // the warp-specialised kernel over 128-key items: columns of 128 keys, every block row (nnz = 0: one shared list)
  Params s = p;
  s.C = Cfg::BK;
  s.NB = (p.N + Cfg::BK - 1) / Cfg::BK;
  s.col_rows = rows;
  s.nnz = 0;
  s.sweep_bits = bits;
  s.sweep_dup = dup;
  // dq by tensor map where a tile is consecutive whole query rows (R * g dividing 64 or a multiple of it; the
  // kernel's box coordinate: the tile's first block row, rows[cs + e] = cs + e); BSATTN_BWD_SM90_DQ=rows: row by row
  static const bool row_dq = env_equals("BSATTN_BWD_SM90_DQ", "rows");
  static const bool map_plan = register_plan_holds<Cfg>(bsattn_bwd_sm90_ws_kernel<T, Cfg, true, true>);
  CUtensorMap map{};
  if (!row_dq && map_plan && dq_tensor_map<Cfg>(s, &map, true))
    err = launch_ws_persistent<bsattn_bwd_sm90_ws_kernel<T, Cfg, true, true>, Cfg>(s, Cfg::SMEM_SWEEP, map, stream);
  else
    err = launch_ws_persistent<bsattn_bwd_sm90_ws_kernel<T, Cfg, false, true>, Cfg>(s, Cfg::SMEM_SWEEP, map, stream);
  if (err != cudaSuccess) return err;
  Params k = p;  // the packed kernel, for a layout with a duplicate block
  k.sweep_dup = dup;
  return launch_bwd_sm90_pack<T, 128, true>(k, stream);
}

template <int kDType, int kD>
cudaError_t launch_bwd_sm90(const Params& p, cudaStream_t stream) {
  using T = typename DTypeOf<kDType>::type;
  const int64_t nq = static_cast<int64_t>(p.B) * p.M * p.Hq * kD;  // dq elements
  // the sweep form where it applies and the caller's workspace holds its tables (lowering.py, the same rule)
  const int64_t sweep_words = sweep_workspace_words(p);
  bool sweep = false;
  if constexpr (kD == 128) {
    if (sm90_sweep_applies(p, kD) && p.dq_accum_words >= nq + kDqSchedWords + sweep_words) {
      using Sw = Sm90BwdSweepTile;  // (its attributes read only where it may run: no module load otherwise)
      static const bool sweep_plan = register_plan_holds<Sw>(bsattn_bwd_sm90_ws_kernel<T, Sw, false, true>);
      sweep = sweep_plan;
    }
  }
  const int64_t zero_words = nq + kDqSchedWords + (sweep ? sweep_words : 0);
  cudaError_t err = cudaMemsetAsync(p.dq_accum, 0, static_cast<size_t>(zero_words) * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  const int64_t area = nq + kDqSchedWords;  // where the column split's area starts (C > 16)
  if (sweep) {
    if constexpr (kD == 128) err = launch_bwd_sm90_sweep<T>(p, stream);  // (sweep is false otherwise)
  } else if (p.C <= 16) {
    err = launch_bwd_sm90_pack<T, kD>(p, stream);
  } else if constexpr (kD == 128) {
    // the two-warpgroup tile with a producer warpgroup; BSATTN_BWD_SM90_TILE=wide: without it
    static const bool plain_wide = env_equals("BSATTN_BWD_SM90_TILE", "wide");
    // BSATTN_BWD_SM90_DQ=rows: dq row by row even where the tensor map applies (A / B comparisons)
    static const bool row_dq = env_equals("BSATTN_BWD_SM90_DQ", "rows");
    using Ws = Sm90BwdWsTile;
    // (else the plain two-warpgroup kernel runs; read once)
    static const bool plan = register_plan_holds<Ws>(bsattn_bwd_sm90_ws_kernel<T, Ws, true>) &&
                             register_plan_holds<Ws>(bsattn_bwd_sm90_ws_kernel<T, Ws, false>);
    if (use_wide_bwd_tile(p.C) && !plain_wide && plan) {
      CUtensorMap map{};
      const bool use_map = !row_dq && dq_tensor_map<Ws>(p, &map);
      err = with_column_split<Ws, T>(p, area, stream, [&](const Params& ps) {
        return use_map ? launch_bwd_sm90_ws<T, true>(ps, map, stream) : launch_bwd_sm90_ws<T, false>(ps, map, stream);
      });
    } else if (use_wide_bwd_tile(p.C)) {
      err = with_column_split<Sm90BwdWideTile, T>(
          p, area, stream, [&](const Params& ps) { return launch_bwd_sm90_tile<T, Sm90BwdWideTile>(ps, stream); });
    } else {
      err = with_column_split<Sm90BwdTile<kD>, T>(
          p, area, stream, [&](const Params& ps) { return launch_bwd_sm90_tile<T, Sm90BwdTile<kD>>(ps, stream); });
    }
  } else {
    err = with_column_split<Sm90BwdTile<kD>, T>(
        p, area, stream, [&](const Params& ps) { return launch_bwd_sm90_tile<T, Sm90BwdTile<kD>>(ps, stream); });
  }
  if (err != cudaSuccess || nq == 0) return err;
  const int64_t n8 = nq / 8;
  constexpr int64_t kMaxBlocks = 132 * 16;  // a few waves of an H100 / H200; the kernel strides over the rest
  const int64_t blocks = (n8 + 255) / 256 < kMaxBlocks ? (n8 + 255) / 256 : kMaxBlocks;
  bsattn_bwd_dq_convert_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      p.dq_accum, static_cast<T*>(p.dq), n8, p.scale);
  return cudaGetLastError();
}

// dq alone (bwd_sm90/dq_kernel.cuh) in tiles of 64 packed rows: common/row_tiles.cuh's grid over the forward's
// parameter block plus dq's tensors.
template <int kDType, int kD>
cudaError_t launch_dq_sm90(const Params& p, cudaStream_t stream) {
  using T = typename DTypeOf<kDType>::type;
  using Cfg = Sm90DqTile<kD>;
  return launch_dq_split_tiles<T, Cfg>(p, stream);  // (long block rows split: dq_split.cuh)
}

// dk, dv alone for narrow block columns (bwd_sm90/dkdv_narrow_kernel.cuh): one CTA per 16-key block column (D = 256:
// per 16- or 32-key chunk of any block column, launch_dkdv_ws.cuh); long columns in pieces where the workspace is the
// column split's (pair_split_offset).
template <int kDType, int kD>
cudaError_t launch_dkdv_sm90(const Params& p, cudaStream_t stream) {
  using T = typename DTypeOf<kDType>::type;
  if constexpr (kD == 128) {
    using Cfg = Sm90DkdvNarrowTile;
    if (p.C > Cfg::BK) return cudaErrorNotSupported;  // (dkdv_sm90_applies keeps C <= 16)
    // The form with a producer warpgroup, 2-3 % faster (H200, 2026-11-30); BSATTN_BWD_DKDV=narrow: the form without
    // (A / B). Read once.
    static const bool no_ws = env_equals("BSATTN_BWD_DKDV", "narrow");
    if (!no_ws) return launch_dkdv_sm90_ws<kDType, kD>(p, stream);
    // long columns split where the workspace holds the split's area (bwd/column_split.cuh)
    return with_column_split<Cfg, T>(p, pair_split_offset(p, kD), stream, [&](const Params& ps) {
      return launch_column_tiles<bsattn_bwd_sm90_dkdv_narrow_kernel<T, Cfg>, Cfg>(ps, stream, Cfg::NT, Cfg::SMEM);
    });
  } else if constexpr (kD == 256) {
    return launch_dkdv_sm90_ws<kDType, kD>(p, stream);  // (the producer form only)
  } else {
    return cudaErrorNotSupported;
  }
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn

#define BSATTN_INSTANTIATE_BWD_SM90(DTYPE, D)                                                    \
  template cudaError_t bsattn::cuda::bwd::launch_bwd_sm90<bsattn::cuda::bwd::DTYPE, D>(          \
      const bsattn::cuda::bwd::Params&, cudaStream_t);
#define BSATTN_INSTANTIATE_DKDV_SM90(DTYPE, D)                                                  \
  template cudaError_t bsattn::cuda::bwd::launch_dkdv_sm90<bsattn::cuda::bwd::DTYPE, D>(        \
      const bsattn::cuda::bwd::Params&, cudaStream_t);
#define BSATTN_INSTANTIATE_DQ_SM90(DTYPE, D)                                                    \
  template cudaError_t bsattn::cuda::bwd::launch_dq_sm90<bsattn::cuda::bwd::DTYPE, D>(          \
      const bsattn::cuda::bwd::Params&, cudaStream_t);
