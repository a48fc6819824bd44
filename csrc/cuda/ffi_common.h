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

// A per-sequence operand (kv_lens, q_offset: s32 [B], or empty: none) -> its data or null in `out`. Empty when the
// shape holds, else the message.
inline std::string per_sequence(const char* name, xla::ffi::Buffer<xla::ffi::S32> x, int64_t B, const int32_t** out) {
  const auto d = x.dimensions();
  const bool has = x.element_count() != 0;
  if (d.size() != 1 || (has && d[0] != B))
    return std::string(name) + " " + dims_str(d) + " must be [B] = [" + std::to_string(B) + "] or empty";
  *out = has ? x.typed_data() : nullptr;
  return std::string();
}

// Layout and fill_problem live in common/problem.h (plain C++, also used by csrc/cuda/dev/sanitize_kernels.cu).
using ::bsattn::cuda::Layout;
using ::bsattn::cuda::fill_problem;

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

// The sizes the kernels' 32-bit index arithmetic inside one sequence / head group can hold (tensor offsets are
// 64-bit). Empty when all hold, else a message naming the first that does not; `backward` adds the backward's own
// limits (its column gathers index rows of M * Hq, its column view block rows of MB * R).
inline std::string check_int32_limits(int64_t B, int64_t M, int64_t N, int64_t Hq, int64_t Hk, int64_t D,
                                      int64_t block_r, int64_t block_c, const Layout& l, bool backward) {
  const int64_t lim30 = int64_t{1} << 30, lim31 = (int64_t{1} << 31) - 1;
  struct Limit {
    const char* what;
    int64_t value, bound;  // value must be < bound
  };
  const Limit limits[] = {
      {"M (q's sequence length)", M, lim30},
      {"N (k's sequence length)", N, lim30},
      {"block_r (R)", block_r, lim30},
      {"block_c (C)", block_c, lim30},
      {"Hq * D (q's heads x head dim)", Hq * D, lim30},
      {"R * g (block_r x query heads per KV head)", block_r * (Hq / Hk), lim31 + 1},
      {"B * Hk (batch x KV heads)", B * Hk, lim31 + 1},
      {"nnz (indices' last dim)", l.nnz, lim31 + 1},
      {"ceil(N / C) * C (k's padded sequence length)", l.NB * block_c, lim30},
      {"M * Hq (q's rows x heads)", backward ? M * Hq : 0, lim31 + 1},
      {"ceil(M / R) * R (q's padded sequence length)", backward ? l.MB * block_r : 0, lim30},
  };
  for (const Limit& x : limits)
    if (x.value >= x.bound)
      return std::string(x.what) + " = " + std::to_string(x.value) + " is too large for the CUDA kernels (must be < " +
             std::to_string(x.bound) + ")";
  return std::string();
}

}  // namespace ffi_common
}  // namespace cuda
}  // namespace bsattn
