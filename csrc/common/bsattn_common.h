// Definitions shared by every jax_bsattn kernel (CPU and CUDA): the problem shape, the way a
// (possibly traced, possibly garbage) BSR layout is read safely, and the score transform.
// See csrc/README.md for the contract these implement.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define BSATTN_HD __host__ __device__ __forceinline__
#else
#define BSATTN_HD inline
#endif

namespace bsattn {

// Shapes and attributes of one call, canonicalised by the Python side:
// q [B, M, Hq, D], k/v [B, N, Hk, D], indptr [LB, LH, MB+1], indices [LB, LH, nnz].
struct Problem {
  int64_t B = 0, M = 0, N = 0, Hq = 0, Hk = 0, D = 0;
  int64_t R = 1, C = 1;       // block size
  int64_t MB = 0, NB = 0;     // block rows, block columns
  int64_t LB = 1, LH = 1;     // layout batch / head dims (1 = broadcast)
  int64_t nnz = 0;            // entries per layout in `indices`
  float scale = 1.f;
  float softcap = 0.f;        // 0: no soft cap
  bool causal = false;

  BSATTN_HD int64_t group() const { return Hq / Hk; }
  // Offset of the layout used by batch b and KV head hk, in units of layouts.
  BSATTN_HD int64_t layout_id(int64_t b, int64_t hk) const {
    return (LB > 1 ? b : 0) * LH + (LH > 1 ? hk : 0);
  }
};

// Per-sequence operands (csrc/README.md), read the same way by every kernel. Both take the caller's integer type.
// The keys of batch element b that take part: kv_lens[b] clipped to [0, N] (per-sequence key lengths), else N.
template <typename I>
BSATTN_HD I clipped_key_count(const int32_t* kv_lens, int64_t b, I N) {
  if (kv_lens == nullptr) return N;
  const I n = static_cast<I>(kv_lens[b]);
  return n < 0 ? I{0} : (n > N ? N : n);
}
// Causal: key j may be seen by query row i of batch element b when j <= i + shift, with shift = q_offset[b] (the key
// position of query row 0) clipped to [-M, N - 1] (beyond it every row sees all keys, or none), else N - M
// (bottom-right aligned). Then i + shift stays in [-M, M + N - 2]: inside int32 for M, N <= 2^30.
template <typename I>
BSATTN_HD I causal_shift(const int32_t* q_offset, int64_t b, I M, I N) {
  if (q_offset == nullptr) return N - M;
  const I s = static_cast<I>(q_offset[b]);
  return s < -M ? -M : (s > N - 1 ? N - 1 : s);
}

// The half-open range [start, end) of `indices` that block row `r` of one layout lists, clamped so
// that any indptr (traced, unchecked) stays inside [0, nnz] and never runs backwards.
struct RowRange {
  int64_t start, end;
};
BSATTN_HD RowRange row_range(const int32_t* indptr_row0, int64_t r, int64_t nnz) {
  int64_t s = indptr_row0[r], e = indptr_row0[r + 1];
  s = s < 0 ? 0 : (s > nnz ? nnz : s);
  e = e < s ? s : (e > nnz ? nnz : e);
  return {s, e};
}

// A block column index is used only when it lies in [0, NB); anything else is skipped.
BSATTN_HD bool valid_block(int32_t col, int64_t NB) { return col >= 0 && col < NB; }

}  // namespace bsattn
