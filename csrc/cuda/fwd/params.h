// Host-visible interface of the CUDA forward kernel: the parameter block the FFI handler fills and
// the launcher entry points, one per (dtype, head dim) instantiation (see instantiations/).
// Plain C++: included by the host-compiled FFI handler and by the .cu files.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/common/problem.h"

namespace bsattn {
namespace cuda {

// Everything the forward kernel needs, canonicalised by the FFI handler (ffi_fwd.cc): the shared problem
// description (common/problem.h: shapes, layout, mask, scaling) and the forward's tensors.
struct FwdParams : ProblemParams {
  const void* q;  // [B, M, Hq, D]
  const void* k;  // [B, N, Hk, D]
  const void* v;  // [B, N, Hk, D]
  const int32_t* indptr;   // [LB, LH, MB + 1]
  const int32_t* indices;  // [LB, LH, nnz]
  void* o;                 // [B, M, Hq, D]
  float* lse;              // [B, M, Hq]
  int nsplit;              // 128-row tiles per block row (set by the launcher)
  int sweep_brt;           // the sweep kernel (fwd_sm90/sweep_kernel.cuh): block rows per CTA (set by the launcher)
  uint32_t* ws;            // the caller's workspace (fwd_workspace_words; empty: null)
  int64_t ws_words;        // its size in 32-bit words
  const uint32_t* sweep_table;  // the sweep's bit maps built there for this call, or null: each CTA builds its own
  // Long block rows split over several CTAs (fwd_sm90/row_split.cuh; the Hopper gather kernels, where the workspace
  // holds fwd_split_workspace_words; else null / 0). split_items [LB * LH][split_slots][4]: per CTA slot (block row,
  // first entry, end entry, partial slot or -1: o written directly); split_heads [LB * LH][split_parts][4]: per partial
  // slot its block row, the row's first partial slot and their count; split_sums [B * Hk][split_parts] planes of
  // fwd_split_plane_floats f32: each piece's o [R * g][D] (normalised over its keys), then its lse [R * g].
  const int32_t* split_items;
  const int32_t* split_heads;
  float* split_sums;
  int split_slots, split_parts;
  // Few block rows (MB < kSplitFewRowsMB, the forward's): no plan kernel and no tables; every CTA computes the cut
  // from indptr itself (fwd_sm90/row_split.cuh few_rows_split): cut = max(split_min_len, ceil(entries / split_cut_div)).
  int split_few, split_min_len, split_cut_div;
  // The forward's combine: pieces of a row whose partials it stages in shared memory at once (set by the launcher).
  int split_stage;
};

// The rows of the sweep's table (below): one per layout and block row; row r's bit map at r * words, its flag at
// rows * words + r.
__host__ __device__ inline int64_t fwd_sweep_rows(const ProblemParams& p) {
  return static_cast<int64_t>(p.LB) * p.LH * p.MB;
}
// 32-bit words of the sweep's bit maps built once per call (fwd_sm90/sweep_kernel.cuh): per layout and block row, a
// bit per key (ceil(N / 32) words), then per layout and block row a duplicate flag. 0 where they would be larger than
// the layout's indices (the caller then gives no workspace and each CTA builds its rows' maps itself, as it always did
// before: at C >= 16 that costs little). jax_bsattn/lowering.py sizes the workspace on the same rule.
inline int64_t fwd_sweep_table_words(const ProblemParams& p) {
  const int64_t words = (static_cast<int64_t>(p.N) + 31) / 32;
  if (p.MB <= 0 || p.N <= 0 || int64_t{p.MB} * words > p.nnz) return 0;
  return fwd_sweep_rows(p) * (words + 1);
}

// The row split's partial slots per layout (fwd_sm90/row_split.cuh). Many block rows (R * g > 16, at least 16 block
// rows: the gather kernels' tiles): an eighth of them. Few block rows (MB < 16: decode, a short prompt; any R * g),
// where the grid alone may not fill the GPU: fwd_split_parts_few_rows, and only where the caller asks for it (the
// forward; the Hopper dq kernel's split, bwd_sm90/dq_split.cuh, keeps the many-row rule). 0: no split.
constexpr int kSplitFewRowsMB = 16;         // fewer block rows than this take the few-row rule
constexpr int64_t kSplitFewPlanes = 512;    // partial slots over all (batch, KV head): two waves of 2 CTAs / SM
constexpr int kSplitFewMaxPerLayout = 128;  // and at most these per layout
// f32 of one partial slot: its o, R * g x D, then its lse, R * g padded to a multiple of 4, so that every slot starts
// 16-byte aligned (the combine reads o as float4, the pieces store it as float2; with R * g x (D + 1), odd slots were
// misaligned wherever R * g is not a multiple of 4).
__host__ __device__ inline int64_t fwd_split_plane_floats(int64_t rg, int D) { return rg * D + (rg + 3) / 4 * 4; }
// Few block rows: up to kSplitFewPlanes partial slots over the B x Hk heads (at least 2 each, at most
// kSplitFewMaxPerLayout), their planes together no larger than twice q in f32 or 2^24 floats (64 MiB), whichever is
// more: a decode step's q is tiny, a short prompt's with R in the thousands is not.
inline int fwd_split_parts_few_rows(const ProblemParams& p, int D) {
  const int64_t heads = static_cast<int64_t>(p.B) * p.Hk;
  if (p.MB <= 0 || p.MB >= kSplitFewRowsMB || heads <= 0 || p.R <= 0 || p.g <= 0) return 0;
  int64_t E = kSplitFewPlanes / heads;
  if (E > kSplitFewMaxPerLayout) E = kSplitFewMaxPerLayout;
  const int64_t plane = fwd_split_plane_floats(static_cast<int64_t>(p.R) * p.g, D);
  const int64_t q_floats = static_cast<int64_t>(p.B) * p.M * p.Hq * D;
  const int64_t cap = 2 * q_floats > (int64_t{1} << 24) ? 2 * q_floats : (int64_t{1} << 24);
  if (E > cap / plane / heads) E = cap / plane / heads;  // (divided in turn: no overflow whatever R * g)
  return E >= 2 ? static_cast<int>(E) : 0;
}
inline int fwd_split_parts_per_layout(const ProblemParams& p, int D, bool few_rows) {
  if (static_cast<int64_t>(p.R) * p.g > 16 && p.MB / 8 >= 2) return p.MB / 8;
  return few_rows ? fwd_split_parts_few_rows(p, D) : 0;
}
// 32-bit words of the row split's area: the item and partial-slot tables (int32), the pieces' o and lse (f32): with
// many block rows an eighth of their planes per (batch, KV head), so about q's size / 8 in floats. 0: no split.
inline int64_t fwd_split_workspace_words(const ProblemParams& p, int D, bool few_rows) {
  const int64_t E = fwd_split_parts_per_layout(p, D, few_rows), L = static_cast<int64_t>(p.LB) * p.LH;
  if (E == 0) return 0;
  return 4 * L * (p.MB + E) + 4 * L * E +
         static_cast<int64_t>(p.B) * p.Hk * E * fwd_split_plane_floats(static_cast<int64_t>(p.R) * p.g, D);
}
// The forward's workspace (the FFI handler accepts it empty or of exactly this size; jax_bsattn/lowering.py
// _fwd_workspace_words sizes it): the row split's area where there are few block rows (then the gather kernels run
// whatever R * g: fwd/launch.cuh), else the sweep's bit maps where R * g <= 16, else the row split's area.
inline int64_t fwd_workspace_words(const ProblemParams& p, int D) {
  if (fwd_split_parts_few_rows(p, D) > 0) return fwd_split_workspace_words(p, D, true);
  return static_cast<int64_t>(p.R) * p.g <= 16 ? fwd_sweep_table_words(p) : fwd_split_workspace_words(p, D, true);
}

// Launches the forward kernel on `stream` (picking the kernel and tile for the device and R * g); returns
// cudaGetLastError().
template <int kDType, int kD>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream);

// Built for sm_90a only (fwd_sm90/instantiations, when the build's archs include 90): the wgmma kernel for
// tiles of `tile_rows` = 64 or 128 packed rows, D = 64 or 128, and for D = 256 in 64-row tiles whatever
// `tile_rows`. launch_fwd calls it on compute capability 9.0.
template <int kDType, int kD>
cudaError_t launch_fwd_sm90(const FwdParams& p, cudaStream_t stream, int tile_rows);

// Built for sm_90a only, like launch_fwd_sm90: its 128-row tile at D = 128 with a producer warpgroup
// (fwd_sm90/kernel_ws.cuh), in translation units of its own.
template <int kDType>
cudaError_t launch_fwd_sm90_ws(const FwdParams& p, cudaStream_t stream);

// Built for sm_90a only, like launch_fwd_sm90: the sweep kernel for R * g <= 16 (fwd_sm90/sweep_kernel.cuh), D = 64
// or 128. Returns cudaErrorNotSupported, launching nothing, where it does not apply (fwd_sweep_block_rows); launch_fwd
// then runs a gather kernel.
template <int kDType, int kD>
cudaError_t launch_fwd_sm90_sweep(const FwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace bsattn
