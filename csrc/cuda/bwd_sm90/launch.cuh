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
#include "cuda/bwd_sm90/dq_kernel.cuh"
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
// rows is BQ / g whole query rows of one block row (R * g a multiple of BQ, g dividing BQ) and the driver encodes it.
template <class Cfg>
bool dq_tensor_map(const Params& p, CUtensorMap* map) {
  const int64_t RG = static_cast<int64_t>(p.R) * p.g;
  if (p.g < 1 || Cfg::BQ % p.g != 0 || RG % Cfg::BQ != 0 || p.dq_accum == nullptr) return false;
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

// The persistent warp-specialised kernel: one CTA per SM (or, with BSATTN_BWD_SM90_PERSIST=0, one per work item, for
// A / B comparisons; read once), the items handed out by the counter after dq_accum.
template <typename T, bool DQ_MAP>
cudaError_t launch_bwd_sm90_ws(const Params& p0, const CUtensorMap& map, cudaStream_t stream) {
  using Cfg = Sm90BwdWsTile;
  static const bool one_item_per_cta = env_equals("BSATTN_BWD_SM90_PERSIST", "0");
  Params p = p0;
  const int64_t items = column_tiles_setup<Cfg>(p);  // the work items: column_tiles' tiles
  if (items == 0) return cudaSuccess;
  const int sms = device_sm_count() > 0 ? device_sm_count() : 132;
  const int64_t grid = items < sms || one_item_per_cta ? items : sms;
  if (items > INT_MAX - grid) return cudaErrorInvalidConfiguration;  // (the kernel's item indices stay ints)
  // the work counter: the first word after dq_accum's elements, zeroed with them by the caller
  unsigned* sched = reinterpret_cast<unsigned*>(p.dq_accum + static_cast<int64_t>(p.B) * p.M * p.Hq * Cfg::D);
  static std::atomic<uint64_t> smem_done{0};
  return launch_kernel(bsattn_bwd_sm90_ws_kernel<T, Cfg, DQ_MAP>, grid, Cfg::NT_ALL, Cfg::SMEM_WS, 1, smem_done,
                       p, stream, map, sched, static_cast<int>(items));
}

template <typename T, class Cfg>
cudaError_t launch_bwd_sm90_tile(const Params& p, cudaStream_t stream) {
  return launch_column_tiles<bsattn_bwd_sm90_kernel<T, Cfg>, Cfg>(p, stream, Cfg::NT, Cfg::SMEM);
}

// Small blocks (C <= 16): 64 / C block columns per 64-key CTA (pack_kernel.cuh).
template <typename T, int kD>
cudaError_t launch_bwd_sm90_pack(const Params& p, cudaStream_t stream) {
  using Cfg = Sm90BwdPackTile<kD>;
  return launch_column_groups<bsattn_bwd_sm90_pack_kernel<T, Cfg>>(p, stream, Cfg::BK, Cfg::NT, Cfg::PACK_SMEM,
                                                                    Cfg::MINB);
}

template <int kDType, int kD>
cudaError_t launch_bwd_sm90(const Params& p, cudaStream_t stream) {
  using T = typename DTypeOf<kDType>::type;
  const int64_t nq = static_cast<int64_t>(p.B) * p.M * p.Hq * kD;  // dq elements
  cudaError_t err = cudaMemsetAsync(p.dq_accum, 0, static_cast<size_t>(nq + kDqSchedWords) * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  if (p.C <= 16) {
    err = launch_bwd_sm90_pack<T, kD>(p, stream);
  } else if constexpr (kD == 128) {
    // the two-warpgroup tile with a producer warpgroup; BSATTN_BWD_SM90_TILE=wide: without it (A / B comparisons)
    static const bool plain_wide = env_equals("BSATTN_BWD_SM90_TILE", "wide");
    // BSATTN_BWD_SM90_DQ=rows: dq row by row even where the tensor map applies (A / B comparisons)
    static const bool row_dq = env_equals("BSATTN_BWD_SM90_DQ", "rows");
    using Ws = Sm90BwdWsTile;
    // (else the plain two-warpgroup kernel runs; read once)
    static const bool plan = register_plan_holds<Ws>(bsattn_bwd_sm90_ws_kernel<T, Ws, true>) &&
                             register_plan_holds<Ws>(bsattn_bwd_sm90_ws_kernel<T, Ws, false>);
    if (use_wide_bwd_tile(p.C) && !plain_wide && plan) {
      CUtensorMap map{};
      if (!row_dq && dq_tensor_map<Ws>(p, &map))
        err = launch_bwd_sm90_ws<T, true>(p, map, stream);
      else
        err = launch_bwd_sm90_ws<T, false>(p, map, stream);
    } else if (use_wide_bwd_tile(p.C)) {
      err = launch_bwd_sm90_tile<T, Sm90BwdWideTile>(p, stream);
    } else {
      err = launch_bwd_sm90_tile<T, Sm90BwdTile<kD>>(p, stream);
    }
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

// dq alone (bwd_sm90/dq_kernel.cuh) in tiles of 64 packed rows: common/row_tiles.cuh's grid over the forward's
// parameter block plus dq's tensors.
template <int kDType, int kD>
cudaError_t launch_dq_sm90(const Params& p, cudaStream_t stream) {
  using T = typename DTypeOf<kDType>::type;
  Sm90DqParams d{};
  static_cast<ProblemParams&>(d) = p;
  d.q = p.q;
  d.k = p.k;
  d.v = p.v;
  d.indptr = p.indptr;
  d.indices = p.indices;
  d.dout = p.dout;
  d.lse_rows = p.lse;
  d.delta = p.delta;
  d.dq = p.dq;
  d.scale = p.scale;
  using Cfg = Sm90DqTile<kD>;
  return launch_row_tiles<bsattn_bwd_dq_sm90_kernel<T, Cfg>, Cfg>(d, stream);
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn

#define BSATTN_INSTANTIATE_BWD_SM90(DTYPE, D)                                                    \
  template cudaError_t bsattn::cuda::bwd::launch_bwd_sm90<bsattn::cuda::bwd::DTYPE, D>(          \
      const bsattn::cuda::bwd::Params&, cudaStream_t);
#define BSATTN_INSTANTIATE_DQ_SM90(DTYPE, D)                                                    \
  template cudaError_t bsattn::cuda::bwd::launch_dq_sm90<bsattn::cuda::bwd::DTYPE, D>(          \
      const bsattn::cuda::bwd::Params&, cudaStream_t);
