// Masking of a score tile: each packed row sees the keys j < lim[row] (causal limit and N). ColumnMask: a
// transposed tile ([key][packed query row], see attention_fwd_cpu.cc), W packed rows at a time; visible_keys: a
// tile with the keys across the lanes (ScoreLanes::kKeys).
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/attention_cpu.h"
#include "cpu/simd_cpu.h"

namespace bsattn::cpu {

// The keys [j0, j0 + cn) of one block against the W packed rows lim[0, W): keys [0, lo) of the
// block are visible to all of them, [lo, hi) to some, [hi, cn) to none (0 <= lo <= hi <= cn).
template <class I>
struct ColumnMask {
  using F = typename Simd<I>::F;
  typename Simd<I>::Iv visible;  // per row: keys jj < visible are unmasked
  int64_t lo, hi;

  BSATTN_AI ColumnMask(const int32_t* lim, int32_t j0, int64_t cn) {
    std::memcpy(&visible, lim, sizeof visible);
    visible -= j0;
    int64_t mn = lim[0], mx = lim[0];
    for (int i = 1; i < I::W; ++i) {
      mn = lim[i] < mn ? lim[i] : mn;
      mx = lim[i] > mx ? lim[i] : mx;
    }
    mn -= j0;
    mx -= j0;
    lo = mn < 0 ? 0 : (mn > cn ? cn : mn);
    hi = mx < lo ? lo : (mx > cn ? cn : mx);
  }

  // x where key jj is visible, -inf elsewhere (the callers exponentiate: exp(-inf) = 0). Masking
  // the exponent's input rather than its result keeps GCC 12's AVX-512 code vectorised.
  BSATTN_AI F apply(F x, int64_t jj) const {
    if (jj < lo) return x;
    return visible > static_cast<int32_t>(jj) ? x : Simd<I>::splat(kNegInf);
  }
};

// A score tile with the keys across the lanes ([packed row][key]): the keys [0, visible_keys) of the block
// at j0 (cn keys) that a packed row with limit `lim` sees.
inline int64_t visible_keys(int32_t lim, int32_t j0, int64_t cn) {
  const int64_t n = static_cast<int64_t>(lim) - j0;
  return n < 0 ? 0 : (n > cn ? cn : n);
}

}  // namespace bsattn::cpu
