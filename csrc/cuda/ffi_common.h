// Host-side pieces shared by the CUDA FFI handlers (fwd/ffi_fwd.cc, bwd/ffi_bwd.cc): error plumbing, shape
// printing and comparison, the checks of the block layout and the filling of the shared problem description
// (common/problem.h). Host-compiled only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime.h>

#include "cuda/common/problem.h"
#include "xla/ffi/api/ffi.h"

namespace bsattn {
namespace cuda {
namespace ffi_common {

inline std::string dims_str(xla::ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

inline bool same_dims(xla::ffi::Span<const int64_t> a, xla::ffi::Span<const int64_t> b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// InvalidArgument "<handler>: <msg>".
inline xla::ffi::Error invalid(const char* handler, const std::string& msg) {
  return xla::ffi::Error::InvalidArgument(std::string(handler) + ": " + msg);
}

// Success, or Internal "<handler>: kernel launch failed: <name>: <description>".
inline xla::ffi::Error launch_result(const char* handler, cudaError_t err) {
  if (err != cudaSuccess)
    return xla::ffi::Error::Internal(std::string(handler) + ": kernel launch failed: " + cudaGetErrorName(err) +
                                     ": " + cudaGetErrorString(err));
  return xla::ffi::Error::Success();
}

// Empty when the head dim has an instantiation, else the message.
inline std::string check_head_dim(int64_t D) {
  if (D != 64 && D != 128 && D != 256)
    return "head dim " + std::to_string(D) + " is not supported; supported head dims: 64, 128, 256";
  return std::string();
}

// The block layout's sizes, from the shapes (check_layout).
struct Layout {
  int64_t MB, NB;  // block rows / columns
  int64_t LB, LH;  // layout dims (1 = broadcast)
  int64_t nnz;     // entries per layout in `indices`
};

// Checks the block sizes and the row view of the layout (indptr [LB, LH, MB + 1], indices [LB, LH, nnz], both
// rank 3) against q / k's B, M, N, Hk; fills `out`. Empty when all hold, else the message.
inline std::string check_layout(xla::ffi::Span<const int64_t> pd, xla::ffi::Span<const int64_t> id, int64_t B,
                                int64_t M, int64_t N, int64_t Hk, int64_t block_r, int64_t block_c, Layout& out) {
  if (block_r < 1 || block_c < 1) return "block_r and block_c must be >= 1";
  out.MB = (M + block_r - 1) / block_r;
  out.NB = (N + block_c - 1) / block_c;
  out.LB = pd[0];
  out.LH = pd[1];
  if ((out.LB != 1 && out.LB != B) || (out.LH != 1 && out.LH != Hk) || pd[2] != out.MB + 1)
    return "indptr " + dims_str(pd) + " must be [1 or B, 1 or Hk, ceil(M / R) + 1]";
  if (id[0] != out.LB || id[1] != out.LH) return "indices " + dims_str(id) + " must be [LB, LH, nnz] like indptr";
  out.nnz = id[2];
  return std::string();
}

// Fills the problem description both parameter blocks start with (the handler has checked that every size
// fits in int). Scores are scaled for exp2: s_mul = scale * log2(e) without soft cap; with one, the kernels
// evaluate tanh as 1 - 2 / (1 + 2^(2 log2(e) x)), so s_mul = scale / softcap * 2 log2(e), cap_mul = softcap *
// log2(e).
inline void fill_problem(ProblemParams& p, int64_t B, int64_t M, int64_t N, int64_t Hq, int64_t Hk, int64_t block_r,
                         int64_t block_c, const Layout& l, bool causal, float scale, float softcap) {
  p.B = static_cast<int>(B);
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.Hq = static_cast<int>(Hq);
  p.Hk = static_cast<int>(Hk);
  p.g = static_cast<int>(Hq / Hk);
  p.R = static_cast<int>(block_r);
  p.C = static_cast<int>(block_c);
  p.MB = static_cast<int>(l.MB);
  p.NB = static_cast<int>(l.NB);
  p.LB = static_cast<int>(l.LB);
  p.LH = static_cast<int>(l.LH);
  p.nnz = l.nnz;
  p.causal = causal ? 1 : 0;
  constexpr float kLog2e = 1.4426950408889634f;
  if (softcap > 0.f) {
    p.use_cap = 1;
    p.s_mul = scale / softcap * 2.f * kLog2e;
    p.cap_mul = softcap * kLog2e;
  } else {
    p.use_cap = 0;
    p.s_mul = scale * kLog2e;
    p.cap_mul = 0.f;
  }
}

}  // namespace ffi_common
}  // namespace cuda
}  // namespace bsattn
