// Epilogues of the forward kernel: normalise o by the row sum, write o (16-byte coalesced stores, through
// shared memory) and lse = ln 2 * (m + log2 l). Rows with no element taking part (l = 0) get o = 0 and
// lse = -inf. Tile row `row` is query row r, head j of the block row with (r, j) = sRow[row] (r = -1: padding,
// never stored), a table the kernel fills once so that no epilogue path divides by g.
#pragma once

#include <cmath>

#include "cuda/fwd/gather_kv.cuh"
#include "cuda/fwd/mma.cuh"

namespace bsattn {
namespace cuda {

constexpr float kLn2 = 0.69314718055994530942f;

struct OutRows {
  void* og;          // o of (b, first row of the block row, first head of the group)
  float* lseg;       // lse of the same
  int64_t o_rstride; // Hq * D (elements)
  int Hq;
  const int2* sRow;  // per tile row: (query row in the block row, head in the group); r = -1 for padding
};

// Sum over the 4 lanes holding one row of an m16n8 accumulator (lanes 4r .. 4r + 3).
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// A row's softmax sum l is > 0, 0 for a row that saw nothing (o = 0, lse = -inf), or NaN where a NaN score took
// part (a NaN in q or a listed key; the max skips it, the sum does not): NaN then, o and lse, as the reference.
// by_row_sum gives live() (evaluated only then), empty, or the NaN.
template <class Live>
__device__ __forceinline__ float by_row_sum(float l, Live live, float empty) {
  return l > 0.f ? live() : (l == 0.f ? empty : l);
}

__device__ __forceinline__ float finish_lse(float m, float l) {
  return by_row_sum(l, [&] { return (m + log2f(l)) * kLn2; }, -INFINITY);
}

// 1 / l to normalise a row's o: 0 for an empty row, NaN for a NaN sum.
__device__ __forceinline__ float row_inv(float l) {
  return by_row_sum(l, [&] { return fast_rcp(l); }, 0.f);
}

// One output value o x inv of a row: an empty row (l = 0) is 0 by a select, not 0 x inv, which is NaN where its
// accumulator took 0 x inf (v holding inf at a key the row lists but cannot see).
__device__ __forceinline__ float row_out(float o, float inv, bool empty) { return empty ? 0.f : o * inv; }

// WN == 1: each warp owns whole rows [wrow0, wrow0 + 16 MI) of the tile. It writes them normalised into its
// own staging rows (sOw: 16 MI swizzled rows of free shared memory; rows = wrow0 mod 8) and copies them out;
// no CTA barrier needed.
template <typename T, class Cfg>
__device__ __forceinline__ void store_rows_single(float (&o)[Cfg::MI][Cfg::D / 8][4], const float (&m)[Cfg::MI][2],
                                                  const float (&l)[Cfg::MI][2], uint32_t sOw, const OutRows& out,
                                                  int wrow0, int lane) {
  constexpr int D = Cfg::D, MI = Cfg::MI, CPR = Cfg::CPR, ITERS = MI * 16 * CPR / 32;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float lv = quad_sum(l[mi][h]);
      const int wrow = mi * 16 + (lane >> 2) + 8 * h;  // row within the warp's strip
      const int2 rj = out.sRow[wrow0 + wrow];
      if ((lane & 3) == 0 && rj.x >= 0) out.lseg[static_cast<int64_t>(rj.x) * out.Hq + rj.y] = finish_lse(m[mi][h], lv);
      const float inv = row_inv(lv);  // l >= 1 when > 0 (the max term is 1)
      const bool empty = lv == 0.f;
#pragma unroll
      for (int d = 0; d < D / 8; ++d)
        st_shared32(sOw + swz_off<D>(wrow, d) + (lane & 3) * 4,
                    Mma<T>::pack(row_out(o[mi][d][2 * h], inv, empty), row_out(o[mi][d][2 * h + 1], inv, empty)));
    }
  __syncwarp();
  // all shared-memory reads first, then the (predicated) global stores: one latency, not one per row
  T* og = static_cast<T*>(out.og);
  uint4 val[ITERS];
  int2 rj[ITERS];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int i = lane + 32 * it, wrow = i / CPR;
    rj[it] = out.sRow[wrow0 + wrow];
    val[it] = ld_shared16(sOw + swz_off<D>(wrow, i % CPR));
  }
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int c = (lane + 32 * it) % CPR;
    if (rj[it].x >= 0) st_global16(og + rj[it].x * out.o_rstride + rj[it].y * D + c * 8, val[it]);
  }
}

// WN > 1: the WN warps of a row strip saw disjoint key slices. Merge their (m, l, o) through shared
// memory: sM / sL [WN][TM] floats, sO [WN][TM][OSTRIDE] floats (over the Q tile and K/V stages, free
// by then).
// Must be called by all threads of the CTA (two barriers).
template <typename T, class Cfg>
__device__ __forceinline__ void merge_and_store(float (&o)[Cfg::MI][Cfg::D / 8][4], const float (&m)[Cfg::MI][2],
                                                const float (&l)[Cfg::MI][2], float* sM, float* sL, float* sO,
                                                const OutRows& out, int wm, int wn, int tid, int lane) {
  constexpr int D = Cfg::D, MI = Cfg::MI, CPR = Cfg::CPR, TM = Cfg::TM, WN = Cfg::WN, NT = Cfg::NT;
  constexpr int OST = Cfg::OSTRIDE;
  float lq[MI][2];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float lv = quad_sum(l[mi][h]);
      lq[mi][h] = lv;
      const int row = wm * MI * 16 + mi * 16 + (lane >> 2) + 8 * h;
      if ((lane & 3) == 0) sM[wn * TM + row] = m[mi][h];
    }
  cp_async_wait<0>();
  __syncthreads();  // all warps are done with Q and the K/V stages, and sM is complete
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = wm * MI * 16 + mi * 16 + (lane >> 2) + 8 * h;
      float mx = sM[row];
#pragma unroll
      for (int w = 1; w < WN; ++w) mx = fmaxf(mx, sM[w * TM + row]);
      const float f = m[mi][h] == -INFINITY ? 0.f : fast_exp2(m[mi][h] - mx);
      if ((lane & 3) == 0) sL[wn * TM + row] = lq[mi][h] * f;
      float* dst = sO + (wn * TM + row) * OST + (lane & 3) * 2;
#pragma unroll
      for (int d = 0; d < D / 8; ++d)
        *reinterpret_cast<float2*>(dst + d * 8) = make_float2(o[mi][d][2 * h] * f, o[mi][d][2 * h + 1] * f);
    }
  __syncthreads();
  T* og = static_cast<T*>(out.og);
#pragma unroll
  for (int i = tid; i < TM * CPR; i += NT) {
    const int row = i / CPR, c = i % CPR;
    const int2 rj = out.sRow[row];
    if (rj.x >= 0) {
      float L = 0.f, acc[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = 0.f;
#pragma unroll
      for (int w = 0; w < WN; ++w) {
        L += sL[w * TM + row];
        const float4* src = reinterpret_cast<const float4*>(sO + (w * TM + row) * OST + c * 8);
        const float4 a = src[0], b = src[1];
        acc[0] += a.x, acc[1] += a.y, acc[2] += a.z, acc[3] += a.w;
        acc[4] += b.x, acc[5] += b.y, acc[6] += b.z, acc[7] += b.w;
      }
      const float inv = row_inv(L);
      const bool empty = L == 0.f;
      uint4 val;
      val.x = Mma<T>::pack(row_out(acc[0], inv, empty), row_out(acc[1], inv, empty));
      val.y = Mma<T>::pack(row_out(acc[2], inv, empty), row_out(acc[3], inv, empty));
      val.z = Mma<T>::pack(row_out(acc[4], inv, empty), row_out(acc[5], inv, empty));
      val.w = Mma<T>::pack(row_out(acc[6], inv, empty), row_out(acc[7], inv, empty));
      st_global16(og + rj.x * out.o_rstride + rj.y * D + c * 8, val);
      if (c == 0) {
        float mx = sM[row];
#pragma unroll
        for (int w = 1; w < WN; ++w) mx = fmaxf(mx, sM[w * TM + row]);
        out.lseg[static_cast<int64_t>(rj.x) * out.Hq + rj.y] = finish_lse(mx, L);
      }
    }
  }
}

}  // namespace cuda
}  // namespace bsattn
