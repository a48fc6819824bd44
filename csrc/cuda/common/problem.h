// What the forward and the backward kernels share of their host-visible interface: the dtype tag of the
// launcher instantiations and the problem description (shapes, block layout, mask, score scaling) that both
// parameter blocks (fwd/params.h FwdParams, bwd/params.h bwd::Params) start with. Filled by
// fill_problem below. Plain C++: included by the host-compiled FFI handlers and by the .cu files.
#pragma once

#include <cstdint>

#include "common/bsattn_common.h"

namespace bsattn {
namespace cuda {

enum DType : int { kBF16 = 0, kF16 = 1 };

// Sizes that index within one sequence or one head group are int (the handlers check that they fit);
// tensor offsets are formed in 64 bits inside the kernels.
struct ProblemParams {
  int B, M, N, Hq, Hk, g;  // g = Hq / Hk
  int R, C, MB, NB;        // block size; block rows / columns
  int LB, LH;              // layout dims (1 = broadcast)
  int64_t nnz;             // entries per layout in `indices` (and the backward's `col_rows`)
  int causal;              // causal mask: key j seen by query row i of batch element b where j <= i + causal_shift(b)
  int use_cap;             // softcap > 0
  float s_mul;    // raw q.k -> exponent argument: scale * log2(e) (no cap), or scale / softcap * 2 log2(e) (cap:
                  // tanh is evaluated as 1 - 2 / (1 + 2^(2 log2(e) x)))
  float cap_mul;  // softcap * log2(e) (soft cap only)

  const int32_t* kv_lens;   // [B] keys that take part per batch element (clipped to [0, N] where read), or null: N
  const int32_t* q_offset;  // [B] causal: the key position of each batch element's query row 0, or null: N - M

  // The layout of batch b, KV head hk, in layouts (common/bsattn_common.h Problem::layout_id).
  BSATTN_HD int64_t layout_index(int b, int hk) const {
    return static_cast<int64_t>(LB > 1 ? b : 0) * LH + (LH > 1 ? hk : 0);
  }
  // Batch element b's keys that take part: kv_lens[b] clipped to [0, N], or N (common/bsattn_common.h). Keys at or
  // past it are never read, and their dk / dv are 0. (As causal_shift: read after pdl_wait in a dependent launch.)
  BSATTN_HD int key_count(int b) const { return ::bsattn::clipped_key_count<int>(kv_lens, b, N); }
  // Batch element b's causal shift: q_offset[b] clipped to [-M, N - 1], or N - M (common/bsattn_common.h). Read it
  // after pdl_wait in a dependent launch (an input of the call).
  BSATTN_HD int causal_shift(int b) const { return ::bsattn::causal_shift<int>(q_offset, b, M, N); }
};

// The block layout's sizes, from the shapes (ffi_common::check_layout).
struct Layout {
  int64_t MB, NB;  // block rows / columns
  int64_t LB, LH;  // layout dims (1 = broadcast)
  int64_t nnz;     // entries per layout in `indices`
};

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

}  // namespace cuda
}  // namespace bsattn
