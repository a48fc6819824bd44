// Host-visible interface of the CUDA backward kernels (dq; dk and dv): the parameter block the FFI handler
// (ffi_bwd.cc) fills and the launcher entry points, one per (dtype, head dim) instantiation
// (instantiations/). Plain C++: included by the host-compiled handler and by the .cu files.
//
// Everything of the backward lives in namespace bsattn::cuda::bwd, so that no name can clash with the
// forward's (one module, one definition per name).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace bsattn {
namespace cuda {
namespace bwd {

enum DType : int { kBF16 = 0, kF16 = 1 };

// Everything both kernels need. Sizes within one sequence / head group are int (the handler checks that
// they fit, including M * Hq and N * Hk); tensor offsets are formed in 64 bits inside the kernels.
struct Params {
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
  int B, M, N, Hq, Hk, g;  // g = Hq / Hk
  int R, C, MB, NB;        // block size; block rows / columns
  int LB, LH;              // layout dims (1 = broadcast)
  int64_t nnz;             // entries per layout in `indices` / `col_rows`
  int causal;              // bottom-right aligned causal mask
  int use_cap;             // softcap > 0
  float s_mul;    // raw q.k -> exponent argument: scale * log2(e) (no cap), or scale / softcap * 2 log2(e) (cap:
                  // the argument of tanh_from_2log2e_x)
  float cap_mul;  // softcap * log2(e) (soft cap only): s2 = cap_mul * tanh
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
