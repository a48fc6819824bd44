// Host-visible interface of the CUDA backward kernels (dq; dk and dv): the parameter block the FFI handler
// (ffi_bwd.cc) fills and the launcher entry points, one per (dtype, head dim) instantiation
// (instantiations/). Plain C++: included by the host-compiled handler and by the .cu files.
//
// Everything of the backward lives in namespace bsattn::cuda::bwd, so that no name can clash with the
// forward's (one module, one definition per name).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/common/problem.h"

namespace bsattn {
namespace cuda {
namespace bwd {

using cuda::DType;  // the dtype tags are the forward's (common/problem.h)
using cuda::kBF16;
using cuda::kF16;

// Everything both kernels need: the shared problem description (common/problem.h: shapes, layout, mask,
// scaling; the handler also checks that M * Hq and N * Hk fit in int) and the backward's tensors.
struct Params : ProblemParams {
  const void* q;       // [B, M, Hq, D]
  const void* k;       // [B, N, Hk, D]
  const void* v;       // [B, N, Hk, D]
  const void* dout;    // [B, M, Hq, D]
  const float* lse;    // [B, M, Hq]
  const float* delta;  // [B, M, Hq]  rowsum(do * o) - dlse
  const int32_t* indptr;      // [LB, LH, MB + 1]
  const int32_t* indices;     // [LB, LH, nnz]
  const int32_t* col_indptr;  // [LB, LH, NB + 1]
  const int32_t* col_rows;    // [LB, LH, nnz]
  void* dq;  // [B, M, Hq, D]
  void* dk;  // [B, N, Hk, D]
  void* dv;  // [B, N, Hk, D]
  float scale;    // dq = scale * sum dx k, dk = scale * sum dx q
  int nsplit;     // dq: row tiles per block row (set by the launcher)
  int nkc;        // dk / dv: key tiles per block column (set by the launcher)
  int pack;       // dk / dv, packed small blocks: block columns per CTA (set by the launcher)
};

// dq [B, M, Hq, D] (every element written). Returns cudaGetLastError() after the launch.
template <int kDType, int kD>
cudaError_t launch_dq(const Params& p, cudaStream_t stream);
// dk, dv [B, N, Hk, D] (every element written; zeros where no query sees a key).
template <int kDType, int kD>
cudaError_t launch_dkdv(const Params& p, cudaStream_t stream);

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
