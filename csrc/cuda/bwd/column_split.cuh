// The column split of the column kernels (the one-pass Hopper backward, kernel.cuh and kernel_ws.cuh; the deterministic
// pair's dk / dv kernels: bwd/dkdv_kernel.cuh where C > 16, bwd_sm90/dkdv_narrow_kernel.cuh): a block column listed by
// many more block rows than the others (a global column of a Longformer / BigBird layout, an attention sink) is cut
// into pieces of consecutive entries, each a work item of its own, so that no CTA walks much more than the average per
// CTA slot.
// Without it such a column bounds the whole kernel: at 8:64:64 with two global columns (128 block rows against about
// 16), one CTA walks 128 block rows while the others average 33.
//
// Three steps, in the order of the launch (bwd_sm90/launch.cuh, bwd/launch.cuh):
// 1. bsattn_bwd_split_plan_kernel, one CTA per layout: the plan of common/list_split.cuh over the block columns in
//    col_order's order (longest first): the cut, the item table (p.split_items, the CTA order: the split columns'
//    pieces first, then the other columns) and the partial-slot table.
// 2. The column kernel: an item with a partial slot writes its dk (unscaled) and dv sums as f32 into p.split_sums
//    (store_split_partial; store_split_partial_t from the narrow wgmma kernel's transposed accumulators) instead of
//    dk / dv; the other items are unchanged.
// 3. bsattn_bwd_split_finish_kernel: per split column, the partial sums added in piece order, dk * scale and dv
//    rounded once and written.
// dk and dv stay deterministic: each piece sums its rows in a fixed order, the pieces are added in a fixed order, and
// the cut depends on the layout and the launch shape only.
//
// The cut (list_split.cuh): the average work per CTA slot, with heads in flight x key tiles per column as an entry's
// work, at least 8 tiles of rows; the partial slots: split_parts_per_layout, a quarter of the block columns.
#pragma once

#include <climits>
#include <cstdint>

#include "cuda/bwd/common.cuh"
#include "cuda/bwd/params.h"
#include "cuda/common/launch.cuh"
#include "cuda/common/list_split.cuh"
#include "cuda/fwd/mma.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

// The entries of block column c of layout lid (col_indptr, clamped as column_entries); 0 for a column out of range.
__device__ __forceinline__ int split_column_len(const Params& p, int64_t lid, int c, int64_t& cs) {
  cs = 0;
  if (c < 0 || c >= p.NB) return 0;
  int64_t ce;
  column_entries(p, lid, c, cs, ce);
  return static_cast<int>(ce - cs);
}

// One CTA per layout (a template like the kernels that use it: one weak symbol per instantiation): the plan
// (common/list_split.cuh) over the block columns in col_order's order. work_mul: heads in flight x key tiles per
// column; slots: CTAs in flight; min_len: entries of at least 8 row tiles.
template <typename T, int D>
__global__ void __launch_bounds__(kSplitPlanThreads) bsattn_bwd_split_plan_kernel(const __grid_constant__ Params p,
                                                                                  int64_t work_mul, int64_t slots,
                                                                                  int min_len) {
  const int64_t lid = blockIdx.x;
  const int32_t* order = p.col_order + lid * p.NB;
  auto column_at = [&](int i) {
    SplitList l;
    l.id = __ldg(order + i);
    l.len = split_column_len(p, lid, l.id, l.start);
    return l;
  };
  int4* items = reinterpret_cast<int4*>(const_cast<int32_t*>(p.split_items)) + lid * p.split_slots;
  int4* heads = reinterpret_cast<int4*>(const_cast<int32_t*>(p.split_heads)) + lid * p.split_parts;
  split_plan(p.NB, column_at, items, p.split_slots, heads, p.split_parts, work_mul, slots, min_len, 1);
}

// Where a piece's partial sums go: its slot's dk plane, then its dv plane ([C][D] f32 each), from the item's first key
// within its column on.
struct SplitPartial {
  float* dk;
  float* dv;
};
__device__ __forceinline__ SplitPartial split_partial(const Params& p, const ColumnWork& w, int D) {
  const int64_t head = static_cast<int64_t>(w.b) * p.Hk + w.hk;
  const int64_t plane = static_cast<int64_t>(p.C) * D;
  float* const dk = p.split_sums + ((head * p.split_parts + w.part) * 2) * plane +
                    static_cast<int64_t>(w.k0 - w.c * p.C) * D;
  return {dk, dk + plane};
}

// The f32 partial sums of a piece (its partial slot `part`): the warp's 16 key rows krow0 .. of the item's key tile
// (keys k0 - c C + krow0 .. of the column), rows < nkeys; accumulators as the kernels hold them (element 2 h + e of
// acc[d]: key row lane / 4 + 8 h, column 8 d + 2 (lane % 4) + e). dk unscaled (the finish kernel scales the sum).
template <int D>
__device__ __forceinline__ void store_split_partial(const Params& p, const ColumnWork& w, int krow0, int lane,
                                                    const float (&adk)[D / 8][4], const float (&adv)[D / 8][4]) {
  const SplitPartial sp = split_partial(p, w, D);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = krow0 + (lane >> 2) + 8 * h;
    if (r >= w.nkeys) continue;
    const int64_t off = static_cast<int64_t>(r) * D + 2 * (lane & 3);
#pragma unroll
    for (int d = 0; d < D / 8; ++d) {
      *reinterpret_cast<float2*>(sp.dk + off + 8 * d) = make_float2(adk[d][2 * h], adk[d][2 * h + 1]);
      *reinterpret_cast<float2*>(sp.dv + off + 8 * d) = make_float2(adv[d][2 * h], adv[d][2 * h + 1]);
    }
  }
}

// The same from accumulators held transposed (bwd_sm90/dkdv_narrow_kernel.cuh: dk^T, dv^T with D as wgmma M in m64
// blocks hh; element 4 j + 2 h + e of acc[hh]: D index 64 hh + 16 warp + lane / 4 + 8 h, key 8 j + 2 (lane % 4) + e of
// the item's BK keys), keys < nkeys. A warp's store covers 8 consecutive D of 4 keys: four whole 32-byte sectors.
template <int D, int BK>
__device__ __forceinline__ void store_split_partial_t(const Params& p, const ColumnWork& w, int warp, int lane,
                                                      const float (&adk)[D / 64][BK / 2],
                                                      const float (&adv)[D / 64][BK / 2]) {
  const SplitPartial sp = split_partial(p, w, D);
#pragma unroll
  for (int j = 0; j < BK / 8; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int key = 8 * j + 2 * (lane & 3) + e;
      if (key >= w.nkeys) continue;
#pragma unroll
      for (int hh = 0; hh < D / 64; ++hh)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int off = key * D + 64 * hh + 16 * warp + (lane >> 2) + 8 * h;
          sp.dk[off] = adk[hh][4 * j + 2 * h + e];
          sp.dv[off] = adv[hh][4 * j + 2 * h + e];
        }
    }
}

// One CTA per (batch, KV head, partial slot): where the slot is its column's first, the column's partial sums added
// in piece order; dk * scale and dv rounded to T and written (keys of the column below N).
template <typename T, int D>
__global__ void __launch_bounds__(256) bsattn_bwd_split_finish_kernel(const __grid_constant__ Params p) {
  const int E = p.split_parts;
  const int64_t head = blockIdx.x / E;
  const int q = static_cast<int>(blockIdx.x - head * E);
  const int b = static_cast<int>(head / p.Hk), hk = static_cast<int>(head - static_cast<int64_t>(b) * p.Hk);
  const int64_t lid = layout_index(p, b, hk);
  const int4 h = reinterpret_cast<const int4*>(p.split_heads)[lid * E + q];
  const int c = h.x, first = h.y, count = h.z;
  if (c < 0 || c >= p.NB || first != q || count < 1 || count > E - first) return;  // (uniform)
  const int64_t k0 = static_cast<int64_t>(c) * p.C;
  const int nk = static_cast<int>(p.N - k0 < p.C ? p.N - k0 : p.C);
  const int64_t plane = static_cast<int64_t>(p.C) * D;
  const float* const sums = p.split_sums + ((head * E + first) * 2) * plane;
  const int64_t rstride = static_cast<int64_t>(p.Hk) * D;
  const int64_t kvoff = (static_cast<int64_t>(b) * p.N * p.Hk + hk) * D + k0 * rstride;
  for (int64_t i = threadIdx.x; i < 2 * static_cast<int64_t>(nk) * (D / 4); i += 256) {
    const int t = static_cast<int>(i / (static_cast<int64_t>(nk) * (D / 4)));  // 0: dk, 1: dv
    const int64_t e = (i - t * static_cast<int64_t>(nk) * (D / 4)) * 4;    // element within the plane
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int j = 0; j < count; ++j) {  // piece order: fixed, so the sums repeat bitwise
      const float4 x = *reinterpret_cast<const float4*>(sums + (2 * j + t) * plane + e);
      s.x += x.x;
      s.y += x.y;
      s.z += x.z;
      s.w += x.w;
    }
    const float mul = t == 0 ? p.scale : 1.f;
    const int64_t key = e / D, d = e - key * D;
    uint2 v;
    v.x = Mma<T>::pack(s.x * mul, s.y * mul);
    v.y = Mma<T>::pack(s.z * mul, s.w * mul);
    T* const out = static_cast<T*>(t == 0 ? p.dk : p.dv) + kvoff + key * rstride + d;
    *reinterpret_cast<uint2*>(out) = v;
  }
}

// Sets up the split on p (the column kernel's copy) where the dq workspace holds its area from float `offset` on (the
// one-pass kernels: after nq + kDqSchedWords; the deterministic pair: 0, pair_split_offset), and launches the plan.
// Cfg: the column kernel's tile (BK keys, BQ rows, MINB CTAs per SM). Returns false (p untouched) where no split runs.
template <class Cfg, typename T>
bool split_setup(Params& p, int64_t offset, cudaStream_t stream, cudaError_t& err) {
  err = cudaSuccess;
  const int64_t words = split_workspace_words(p, Cfg::D);
  const int64_t L = static_cast<int64_t>(p.LB) * p.LH;
  if (words == 0 || offset < 0 || p.dq_accum == nullptr || p.dq_accum_words < offset + words || L <= 0 ||
      L > INT_MAX || p.NB <= 0 ||
      p.nnz > INT_MAX)  // (the item table holds entries as int32)
    return false;
  const int E = split_parts_per_layout(p);
  // the grid's chunks of heads and key tiles per column as the kernel's launch sets them (column_tiles_setup)
  Params t = p;
  (void)column_tiles_setup<Cfg>(t);
  const int64_t heads = static_cast<int64_t>(p.B) * p.Hk;
  if (heads * (p.NB + E) * t.nkc > INT_MAX) return false;  // (the grid with the split's slots)
  int32_t* const tabs = reinterpret_cast<int32_t*>(p.dq_accum + offset);
  p.split_slots = p.NB + E;
  p.split_parts = E;
  p.split_items = tabs;
  p.split_heads = tabs + 4 * L * p.split_slots;
  p.split_sums = reinterpret_cast<float*>(tabs + 4 * L * p.split_slots + 4 * L * E);
  // the average work per CTA slot: heads in flight x key tiles per column
  const int64_t chunks = t.head_chunks > 0 ? t.head_chunks : 1;
  const int64_t work_mul = (heads + chunks - 1) / chunks * t.nkc;
  const int sms = device_sm_count() > 0 ? device_sm_count() : 132;
  const int64_t rg = static_cast<int64_t>(p.R) * p.g;
  const int min_len = static_cast<int>(rg > 0 ? (8 * Cfg::BQ + rg - 1) / rg : 1);
  bsattn_bwd_split_plan_kernel<T, Cfg::D><<<static_cast<unsigned>(L), kSplitPlanThreads, 0, stream>>>(
      p, work_mul, static_cast<int64_t>(sms) * Cfg::MINB, min_len);
  err = cudaGetLastError();
  return true;
}

template <typename T, int D>
cudaError_t split_finish(const Params& p, cudaStream_t stream) {
  const int64_t blocks = static_cast<int64_t>(p.B) * p.Hk * p.split_parts;
  if (blocks <= 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  bsattn_bwd_split_finish_kernel<T, D><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

// A column-kernel launch (launch(p) with p its parameter block) with the column split where the workspace holds its
// area at `offset` (split_setup): the plan before, the split columns' dk / dv after. Cfg: the tile that runs.
template <class Cfg, typename T, class Launch>
cudaError_t with_column_split(const Params& p0, int64_t offset, cudaStream_t stream, Launch&& launch) {
  Params p = p0;
  cudaError_t err = cudaSuccess;
  const bool split = split_setup<Cfg, T>(p, offset, stream, err);
  if (err != cudaSuccess) return err;
  err = launch(p);
  if (err != cudaSuccess || !split) return err;
  return split_finish<T, Cfg::D>(p, stream);
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
