// Host-side launch of the row-oriented Hopper backward (rows_kernel.cuh; a prototype, BSATTN_BWD_ROWS=1): zero the
// fixed-point dk / dv workspace (p.dq_accum, 4 B * N * Hk * D floats' room), one CTA per 128 packed rows (a block
// row's tiles as one cluster where they can be), then convert.
// Included by its own instantiation files only (the other kernels' translation units stay as they were).
#pragma once

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/bwd/params.h"
#include "cuda/bwd_sm90/rows_kernel.cuh"
#include "cuda/common/launch.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

// `grid` CTAs in clusters of `cl` (consecutive CTAs: a block row's tiles).
template <auto Kernel, class Cfg>
cudaError_t launch_rows_clusters(const Sm90RowsParams& d, int64_t grid, int cl, cudaStream_t stream) {
  static std::atomic<uint64_t> smem_done{0};  // one per kernel
  cudaError_t err = opt_in_smem(Kernel, Cfg::SMEM, 1, smem_done);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t lc = {};
  lc.gridDim = dim3(static_cast<unsigned>(grid));
  lc.blockDim = dim3(Cfg::NT);
  lc.dynamicSmemBytes = Cfg::SMEM;
  lc.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(cl);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  lc.attrs = attr;
  lc.numAttrs = 1;
  return cudaLaunchKernelEx(&lc, Kernel, d);
}

template <int kDType>
cudaError_t launch_bwd_rows_sm90(const Params& p, cudaStream_t stream) {
  using T = typename DTypeOf<kDType>::type;
  using Cfg = Sm90RowsTile;
  const int64_t nk = static_cast<int64_t>(p.B) * p.N * p.Hk * Cfg::D;
  if (p.dq_accum == nullptr || p.dq_accum_words < 4 * nk) return cudaErrorInvalidValue;
  long long* acc = reinterpret_cast<long long*>(p.dq_accum);
  cudaError_t err = cudaMemsetAsync(acc, 0, static_cast<size_t>(2 * nk) * sizeof(long long), stream);
  if (err != cudaSuccess) return err;
  Sm90RowsParams d{};
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
  d.acc_dk = acc;
  d.acc_dv = acc + nk;
  d.fx_dv = 4294967296.f;  // 2^32
  d.fx_dk = p.scale * 4294967296.f;
  const int64_t grid = row_tile_grid<Cfg::TM>(d);  // (sets d.nsplit)
  // the tiles of a block row as one cluster where there are 2, 4 or 8 and every one holds rows (M a multiple of R);
  // BSATTN_BWD_ROWS_CLUSTER=0: never (A / B; read once)
  static const bool no_cluster = env_equals("BSATTN_BWD_ROWS_CLUSTER", "0");
  const int cl = !no_cluster && p.M % p.R == 0 && (d.nsplit == 2 || d.nsplit == 4 || d.nsplit == 8) ? d.nsplit : 1;
  if (grid > INT_MAX) return cudaErrorInvalidConfiguration;
  if (grid > 0) {
    switch (cl) {
      case 2: err = launch_rows_clusters<bsattn_bwd_rows_sm90_kernel<T, Cfg, 2>, Cfg>(d, grid, 2, stream); break;
      case 4: err = launch_rows_clusters<bsattn_bwd_rows_sm90_kernel<T, Cfg, 4>, Cfg>(d, grid, 4, stream); break;
      case 8: err = launch_rows_clusters<bsattn_bwd_rows_sm90_kernel<T, Cfg, 8>, Cfg>(d, grid, 8, stream); break;
      default: err = launch_rows_clusters<bsattn_bwd_rows_sm90_kernel<T, Cfg, 1>, Cfg>(d, grid, 1, stream);
    }
    if (err != cudaSuccess) return err;
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((2 * nk / 8 + 255) / 256, 132 * 8));
  if (nk > 0)
    bsattn_bwd_rows_finalize_kernel<T><<<blocks, 256, 0, stream>>>(acc, static_cast<T*>(p.dk), static_cast<T*>(p.dv), nk);
  return cudaGetLastError();
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn

#define BSATTN_INSTANTIATE_BWD_ROWS_SM90(DTYPE)                                                  \
  template cudaError_t bsattn::cuda::bwd::launch_bwd_rows_sm90<bsattn::cuda::bwd::DTYPE>(        \
      const bsattn::cuda::bwd::Params&, cudaStream_t);
