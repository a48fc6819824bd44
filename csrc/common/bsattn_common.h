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
  // Causal: key j may be seen by query i when j <= i + causal_offset (bottom-right aligned).
  BSATTN_HD int64_t causal_offset() const { return N - M; }
};

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
