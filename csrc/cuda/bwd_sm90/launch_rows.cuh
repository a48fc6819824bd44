// Host-side launch of the row-oriented Hopper backward (rows_kernel.cuh): zero the fixed-point dk / dv workspace
// (p.dq_accum: 4 B N Hk D floats, 8 words, 2 B N Hk bytes), the maxima that set its scales, one CTA per 128 packed
// rows, then convert (one kernel for dk and dv).
// Included by its own instantiation files only (the other kernels' translation units stay as they were).
#pragma once

#include <algorithm>
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/bwd/params.h"
#include "cuda/bwd_sm90/rows_kernel.cuh"
#include "cuda/common/launch.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

template <int kDType, int kD>
cudaError_t launch_bwd_rows_sm90(const Params& p, cudaStream_t stream) {
  using T = typename DTypeOf<kDType>::type;
  using Cfg = Sm90RowsTile<kD>;
  const int64_t nk = static_cast<int64_t>(p.B) * p.N * p.Hk * Cfg::D;
  const int64_t nq = static_cast<int64_t>(p.B) * p.M * p.Hq * Cfg::D;
  if (p.dq_accum == nullptr || p.dq_accum_words < rows_workspace_words(p, Cfg::D)) return cudaErrorInvalidValue;
  // the workspace: dk's and dv's 64-bit sums, the four maxima (8 words), then a byte per key row for dk and for dv
  long long* acc = reinterpret_cast<long long*>(p.dq_accum);
  unsigned* amax = reinterpret_cast<unsigned*>(p.dq_accum + 4 * nk);
  unsigned char* bad_dk = reinterpret_cast<unsigned char*>(p.dq_accum + 4 * nk + 8);
  unsigned char* bad_dv = bad_dk + nk / Cfg::D;
  cudaError_t err =
      cudaMemsetAsync(acc, 0, static_cast<size_t>(rows_workspace_words(p, Cfg::D)) * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  const unsigned sms = static_cast<unsigned>(std::max(1, device_sm_count()));
  bsattn_bwd_rows_amax_kernel<T><<<4 * sms, 256, 0, stream>>>(static_cast<const T*>(p.q), nq,
                                                               static_cast<const T*>(p.v), nk,
                                                               static_cast<const T*>(p.dout), p.delta, nq / Cfg::D,
                                                               p.kv_lens, p.N, int64_t{p.Hk} * Cfg::D / 8, amax);
  Sm90RowsParams d{};
  static_cast<Sm90DqParams&>(d) = dq_sm90_params(p);
  d.acc_dk = acc;
  d.acc_dv = acc + nk;
  d.amax = amax;
  d.bad_dk = bad_dk;
  d.bad_dv = bad_dv;
  d.zero = 0;
  err = launch_row_tiles<bsattn_bwd_rows_sm90_kernel<T, Cfg>, Cfg>(d, stream);
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((2 * nk / 8 + 255) / 256, 8 * sms));
  if (nk > 0)
    bsattn_bwd_rows_finalize_kernel<T, kD><<<blocks, 256, 0, stream>>>(acc, amax, bad_dk, static_cast<T*>(p.dk),
                                                                       static_cast<T*>(p.dv), nk, p.M, p.g, p.scale);
  return cudaGetLastError();
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn

#define BSATTN_INSTANTIATE_BWD_ROWS_SM90(DTYPE, D)                                               \
  template cudaError_t bsattn::cuda::bwd::launch_bwd_rows_sm90<bsattn::cuda::bwd::DTYPE, D>(     \
      const bsattn::cuda::bwd::Params&, cudaStream_t);
