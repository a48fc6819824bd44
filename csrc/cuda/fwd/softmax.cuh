// Score transform, masking and the online softmax of one warp's score tile, in base 2.
//
// Scores arrive as mma accumulators s[MI][NT8][4] (m16n8 layout: element e of n-tile n is row
// lane / 4 + 8 * (e / 2), column 8 n + 2 (lane % 4) + e % 2 of the warp's strip and key slice).
// x = scale * q.k becomes s2 = log2(e) * x, or with a soft cap s2 = log2(e) * cap * tanh(x / cap); the
// row max m and sum l are kept in that base-2 domain (lse = ln 2 * (m + log2 l) at the end).
#pragma once

#include <climits>

#include "cuda/fwd/mma.cuh"
#include "cuda/fwd/params.h"

namespace bsattn {
namespace cuda {

template <int MI, int NT8>
__device__ __forceinline__ void transform_scores(float (&s)[MI][NT8][4], const FwdParams& p) {
  if (p.use_cap) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int n = 0; n < NT8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mi][n][e] = tanh_from_2log2e_x(s[mi][n][e] * p.s_mul) * p.cap_mul;
  } else {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int n = 0; n < NT8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mi][n][e] *= p.s_mul;
  }
}

// Scores stay raw when the multiplier is positive and there is no soft cap: the max commutes with it and the
// softmax folds it into one FFMA per score (exp2(s * mul - m)). Otherwise they are transformed here. Returns the
// multiplier the softmax must apply (p.s_mul or 1).
template <int MI, int NT8>
__device__ __forceinline__ float prepare_scores(float (&s)[MI][NT8][4], const FwdParams& p) {
  float mul = p.s_mul;
  if (p.use_cap || !(mul > 0.f)) {
    transform_scores<MI, NT8>(s, p);
    mul = 1.f;
  }
  return mul;
}

// Masks the scores of key columns whose index (kidx: this warp's key slice of the staged tile,
// INT_MAX when the row is invalid) exceeds the row's limit (lim: the thread's rows (lane / 4, + 8) of each strip;
// causal: i + shift, else INT_MAX - 1; any negative limit masks every key).
template <int MI, int NT8>
__device__ __forceinline__ void mask_scores_by_limit(float (&s)[MI][NT8][4], const int* kidx, const int (&lim)[MI][2],
                                                     int lane) {
#pragma unroll
  for (int n = 0; n < NT8; ++n) {
    const int2 kk = *reinterpret_cast<const int2*>(kidx + n * 8 + (lane & 3) * 2);
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (kk.x > lim[mi][h]) s[mi][n][2 * h] = -INFINITY;
        if (kk.y > lim[mi][h]) s[mi][n][2 * h + 1] = -INFINITY;
      }
  }
}

// The same with the limits of the warp's rows in shared memory (slim).
template <int MI, int NT8>
__device__ __forceinline__ void mask_scores(float (&s)[MI][NT8][4], const int* kidx, const int* slim, int lane) {
  int lim[MI][2];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) lim[mi][h] = slim[mi * 16 + (lane >> 2) + 8 * h];
  mask_scores_by_limit<MI, NT8>(s, kidx, lim, lane);
}

// One online-softmax step, in two parts (online_softmax below runs both): softmax_probs updates the running
// max m and (thread-partial) sum l of the thread's rows, turns s into probabilities exp2(s2 - m) and gives
// the factor alpha by which the output accumulator must be rescaled, returning whether any row of the warp
// has a new max (else alpha = 1 everywhere: the common case once a few tiles are in); rescale_acc applies
// alpha to o[MI][DT][4] (and lsum).
// Rows with nothing seen so far keep m = -inf and use 0 as reference (never -inf - -inf).
// s holds scores in units of 1 / mul (mul > 0: raw q.k with mul = scale * log2(e); or already
// transformed scores with mul = 1).
//
// MMA_SUM: the row sums are not taken here but by the tensor cores (P times a column of ones, in the PV
// loop, into `lsum`, an m16n8 accumulator whose every column is the row sum); this step then only rescales
// lsum with o, and leaves l alone.
template <int MI, int NT8, bool MMA_SUM>
__device__ __forceinline__ bool softmax_probs(float (&s)[MI][NT8][4], float mul, float (&m)[MI][2], float (&l)[MI][2],
                                              float (&alpha)[MI][2]) {
  bool grew = false;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // pairwise trees (not a serial chain): with two warps per scheduler the ALU latency shows
      float t[NT8];
#pragma unroll
      for (int n = 0; n < NT8; ++n) t[n] = fmaxf(s[mi][n][2 * h], s[mi][n][2 * h + 1]);
#pragma unroll
      for (int w = 1; w < NT8; w *= 2)
#pragma unroll
        for (int n = 0; n + w < NT8; n += 2 * w) t[n] = fmaxf(t[n], t[n + w]);
      float mr = t[0];
      mr = fmaxf(mr, __shfl_xor_sync(0xffffffffu, mr, 1));
      mr = fmaxf(mr, __shfl_xor_sync(0xffffffffu, mr, 2));
      const float mx = fmaxf(m[mi][h], mr * mul);
      const float ref = mx == -INFINITY ? 0.f : mx;
      grew |= mx != m[mi][h];
      alpha[mi][h] = fast_exp2(m[mi][h] - ref);
      m[mi][h] = mx;
#pragma unroll
      for (int n = 0; n < NT8; ++n) {
        s[mi][n][2 * h] = fast_exp2(fmaf(s[mi][n][2 * h], mul, -ref));
        s[mi][n][2 * h + 1] = fast_exp2(fmaf(s[mi][n][2 * h + 1], mul, -ref));
        if constexpr (!MMA_SUM) t[n] = s[mi][n][2 * h] + s[mi][n][2 * h + 1];
      }
      if constexpr (!MMA_SUM) {
#pragma unroll
        for (int w = 1; w < NT8; w *= 2)
#pragma unroll
          for (int n = 0; n + w < NT8; n += 2 * w) t[n] += t[n + w];
        l[mi][h] = l[mi][h] * alpha[mi][h] + t[0];
      }
    }
  return __any_sync(0xffffffffu, grew);
}

template <int MI, int DT, bool MMA_SUM>
__device__ __forceinline__ void rescale_acc(float (&o)[MI][DT][4], float (&lsum)[MI][4], const float (&alpha)[MI][2]) {
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      o[mi][d][0] *= alpha[mi][0];
      o[mi][d][1] *= alpha[mi][0];
      o[mi][d][2] *= alpha[mi][1];
      o[mi][d][3] *= alpha[mi][1];
    }
  if constexpr (MMA_SUM) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      lsum[mi][0] *= alpha[mi][0];
      lsum[mi][1] *= alpha[mi][0];
      lsum[mi][2] *= alpha[mi][1];
      lsum[mi][3] *= alpha[mi][1];
    }
  }
}

template <int MI, int NT8, int DT, bool MMA_SUM>
__device__ __forceinline__ void online_softmax(float (&s)[MI][NT8][4], float mul, float (&m)[MI][2],
                                               float (&l)[MI][2], float (&o)[MI][DT][4], float (&lsum)[MI][4]) {
  float alpha[MI][2];
  if (softmax_probs<MI, NT8, MMA_SUM>(s, mul, m, l, alpha)) rescale_acc<MI, DT, MMA_SUM>(o, lsum, alpha);
}

}  // namespace cuda
}  // namespace bsattn
