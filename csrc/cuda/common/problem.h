// What the forward and the backward kernels share of their host-visible interface: the dtype tag of the
// launcher instantiations and the problem description (shapes, block layout, mask, score scaling) that both
// parameter blocks (fwd/params.h FwdParams, bwd/params.h bwd::Params) start with. Filled by
// fill_problem (cuda/ffi_common.h). Plain C++: included by the host-compiled FFI handlers and by the .cu files.
#pragma once

#include <cstdint>

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
  int causal;              // bottom-right aligned causal mask
  int use_cap;             // softcap > 0
  float s_mul;    // raw q.k -> exponent argument: scale * log2(e) (no cap), or scale / softcap * 2 log2(e) (cap:
                  // tanh is evaluated as 1 - 2 / (1 + 2^(2 log2(e) x)))
  float cap_mul;  // softcap * log2(e) (soft cap only)
};

}  // namespace cuda
}  // namespace bsattn
