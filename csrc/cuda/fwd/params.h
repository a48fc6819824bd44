// Host-visible interface of the CUDA forward kernel: the parameter block the FFI handler fills and
// the launcher entry points, one per (dtype, head dim) instantiation (see instantiations/).
// Plain C++: included by the host-compiled FFI handler and by the .cu files.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace bsattn {
namespace cuda {

enum FwdDType : int { kBF16 = 0, kF16 = 1 };

// Everything the forward kernel needs, canonicalised by the FFI handler (ffi_fwd.cc).
// Sizes that index within one sequence or one head group are int (the handler checks that they fit);
// tensor offsets are formed in 64 bits inside the kernel.
struct FwdParams {
  const void* q;  // [B, M, Hq, D]
  const void* k;  // [B, N, Hk, D]
  const void* v;  // [B, N, Hk, D]
  const int32_t* indptr;   // [LB, LH, MB + 1]
  const int32_t* indices;  // [LB, LH, nnz]
  void* o;                 // [B, M, Hq, D]
  float* lse;              // [B, M, Hq]
  int B, M, N, Hq, Hk, g;  // g = Hq / Hk
  int R, C, MB, NB;        // block size; block rows / columns
  int LB, LH;              // layout dims (1 = broadcast)
  int64_t nnz;             // entries per layout in `indices`
  int causal;              // bottom-right aligned causal mask
  int use_cap;             // softcap > 0
  float s_mul;             // score multiplier: scale * log2(e) without soft cap, scale / softcap with
  float cap_mul;           // softcap * log2(e) (soft cap only)
  int nsplit;              // 128-row tiles per block row (set by the launcher)
};

// Launches the forward kernel on `stream` (picking the tile for R * g); returns cudaGetLastError().
template <int kDType, int kD>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace bsattn
