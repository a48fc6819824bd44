// Host-visible interface of the CUDA forward kernel: the parameter block the FFI handler fills and
// the launcher entry points, one per (dtype, head dim) instantiation (see instantiations/).
// Plain C++: included by the host-compiled FFI handler and by the .cu files.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/common/problem.h"

namespace bsattn {
namespace cuda {

// Everything the forward kernel needs, canonicalised by the FFI handler (ffi_fwd.cc): the shared problem
// description (common/problem.h: shapes, layout, mask, scaling) and the forward's tensors.
struct FwdParams : ProblemParams {
  const void* q;  // [B, M, Hq, D]
  const void* k;  // [B, N, Hk, D]
  const void* v;  // [B, N, Hk, D]
  const int32_t* indptr;   // [LB, LH, MB + 1]
  const int32_t* indices;  // [LB, LH, nnz]
  void* o;                 // [B, M, Hq, D]
  float* lse;              // [B, M, Hq]
  int nsplit;              // 128-row tiles per block row (set by the launcher)
};

// Launches the forward kernel on `stream` (picking the tile for R * g); returns cudaGetLastError().
template <int kDType, int kD>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace bsattn
