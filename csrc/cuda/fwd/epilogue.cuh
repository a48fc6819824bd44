// Epilogues of the forward kernel: normalise o by the row sum, write o (16-byte coalesced stores, through
// shared memory) and lse = ln 2 * (m + log2 l). Rows with no element taking part (l = 0) get o = 0 and
// lse = -inf. Packed row P of the block row is query row r = P / g, head j = P % g; rows at or past
// `rows_valid` are padding and never stored.
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
  int g;
  int row0;          // packed index of the tile's first row
  int rows_valid;    // tile rows [0, rows_valid) are real
};

__device__ __forceinline__ float finish_lse(float m, float l) {
  return l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
}

// WN == 1: each warp owns whole rows. It writes its normalised rows into its own rows of the (now
// unused) Q tile and copies them out; no CTA barrier needed.
template <typename T, class Cfg>
__device__ __forceinline__ void store_rows_single(float (&o)[Cfg::MI][Cfg::D / 8][4], const float (&m)[Cfg::MI][2],
                                                  float (&l)[Cfg::MI][2], uint32_t sQ, const OutRows& out,
                                                  int wrow0, int lane) {
  constexpr int D = Cfg::D, MI = Cfg::MI, CPR = Cfg::CPR;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float lv = l[mi][h];
      lv += __shfl_xor_sync(0xffffffffu, lv, 1);
      lv += __shfl_xor_sync(0xffffffffu, lv, 2);
      l[mi][h] = lv;
      const int row = wrow0 + mi * 16 + (lane >> 2) + 8 * h;
      if ((lane & 3) == 0 && row < out.rows_valid) {
        const int P = out.row0 + row;
        const int r = P / out.g, j = P - r * out.g;
        out.lseg[static_cast<int64_t>(r) * out.Hq + j] = finish_lse(m[mi][h], lv);
      }
      const float inv = lv > 0.f ? 1.f / lv : 0.f;
#pragma unroll
      for (int d = 0; d < D / 8; ++d)
        st_shared32(sQ + swz_off<D>(row, d) + (lane & 3) * 4,
                    Mma<T>::pack(o[mi][d][2 * h] * inv, o[mi][d][2 * h + 1] * inv));
    }
  __syncwarp();
  T* og = static_cast<T*>(out.og);
#pragma unroll
  for (int i = lane; i < MI * 16 * CPR; i += 32) {
    const int row = wrow0 + i / CPR, c = i % CPR;
    if (row < out.rows_valid) {
      const int P = out.row0 + row;
      const int r = P / out.g, j = P - r * out.g;
      const uint4 val = ld_shared16(sQ + swz_off<D>(row, c));
      *reinterpret_cast<uint4*>(og + r * out.o_rstride + j * D + c * 8) = val;
    }
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
      float lv = l[mi][h];
      lv += __shfl_xor_sync(0xffffffffu, lv, 1);
      lv += __shfl_xor_sync(0xffffffffu, lv, 2);
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
    if (row < out.rows_valid) {
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
      const float inv = L > 0.f ? 1.f / L : 0.f;
      uint4 val;
      val.x = Mma<T>::pack(acc[0] * inv, acc[1] * inv);
      val.y = Mma<T>::pack(acc[2] * inv, acc[3] * inv);
      val.z = Mma<T>::pack(acc[4] * inv, acc[5] * inv);
      val.w = Mma<T>::pack(acc[6] * inv, acc[7] * inv);
      const int P = out.row0 + row;
      const int r = P / out.g, j = P - r * out.g;
      *reinterpret_cast<uint4*>(og + r * out.o_rstride + j * D + c * 8) = val;
      if (c == 0) {
        float mx = sM[row];
#pragma unroll
        for (int w = 1; w < WN; ++w) mx = fmaxf(mx, sM[w * TM + row]);
        out.lseg[static_cast<int64_t>(r) * out.Hq + j] = finish_lse(mx, L);
      }
    }
  }
}

}  // namespace cuda
}  // namespace bsattn
