// The row split of the Hopper forward's gather kernels (kernel.cuh, kernel_ws.cuh): a block row that lists many more
// blocks than the others (a global row of a BigBird layout, a query that sees everything) is cut into pieces of
// consecutive entries, each a work item of its own, so that no CTA walks much more than the average per CTA slot.
// Without it such a row bounds the whole kernel: at 4:16:16 with two global rows (512 blocks against about 14), one CTA
// walks 512 blocks while the others average 24 (H200: 82 useful TFLOP/s against 343 for a uniform layout).
//
// Three steps, in the order of the launch (launch_fwd_row_tiles below):
// 1. bsattn_fwd_split_plan_kernel, one CTA per layout: the plan of common/list_split.cuh over the block rows in the
//    kernels' order (last to first): the cut, the item table (CTA order: the split rows' pieces first) and the
//    partial-slot table.
// 2. The gather kernel: a CTA takes its slot's item (fwd/tile_setup.cuh); a piece stores its rows' o, normalised over
//    its keys, and lse as f32 in p.split_sums (store_rows_partial) instead of o and lse.
// 3. bsattn_fwd_split_combine_kernel: per split row, lse = log sum exp of the pieces' lse and o = sum of exp(lse_i -
//    lse) o_i, in piece order, o rounded once.
// The forward stays deterministic: the cut depends on the layout and the launch shape only, the pieces are combined in
// a fixed order. The workspace (fwd/params.h fwd_split_workspace_words) comes from the lowering; without it (empty:
// BSATTN_FWD_SPLIT=0, or not an H100 / H200) nothing is split.
#pragma once

#include <atomic>
#include <climits>
#include <cmath>
#include <algorithm>
#include <cstdint>

#include <cuda_runtime.h>

#include "common/bsattn_common.h"
#include "cuda/common/launch.cuh"
#include "cuda/common/list_split.cuh"
#include "cuda/common/row_tiles.cuh"
#include "cuda/fwd/epilogue.cuh"
#include "cuda/fwd/few_rows_plan.cuh"
#include "cuda/fwd/mma.cuh"
#include "cuda/fwd/params.h"
#include "cuda/fwd/tile_setup.cuh"

namespace bsattn {
namespace cuda {

// One CTA per layout (a template like the kernels that use it: one weak symbol per instantiation). work_mul: heads in
// flight x row tiles per block row; slots: CTAs in flight; min_len: entries of at least 8 KV tiles. Only rows longer
// than two cuts are split: a row just above the cut gains nothing its place in the order (longest first for causal
// layouts) does not already give, and costs the partial stores and the combine (4:64:64 block-causal, rows of 127-128
// blocks against a cut of 125: 0.93x when cut in two).
template <typename T, int D>
__global__ void __launch_bounds__(kSplitPlanThreads) bsattn_fwd_split_plan_kernel(const __grid_constant__ FwdParams p,
                                                                                  int64_t work_mul, int64_t slots,
                                                                                  int min_len) {
  const int64_t lid = blockIdx.x;
  const int32_t* indptr = p.indptr + lid * (p.MB + 1);
  auto row_at = [&](int i) {  // the kernels' order: block rows last to first (common/row_tiles.cuh)
    const RowRange rr = row_range(indptr, p.MB - 1 - i, p.nnz);
    return SplitList{p.MB - 1 - i, rr.start, static_cast<int>(rr.end - rr.start)};
  };
  int4* items = reinterpret_cast<int4*>(const_cast<int32_t*>(p.split_items)) + lid * p.split_slots;
  int4* heads = reinterpret_cast<int4*>(const_cast<int32_t*>(p.split_heads)) + lid * p.split_parts;
  split_plan(p.MB, row_at, items, p.split_slots, heads, p.split_parts, work_mul, slots, min_len, 2);
}

// A piece's rows (the warp's 16 MI rows wrow0 .. of the tile; accumulators as store_rows_single takes them): o
// normalised by the piece's row sum and lse, as f32 in the piece's partial slot; rows past rows_valid are padding.
template <class Cfg>
__device__ __forceinline__ void store_rows_partial(const float (&o)[Cfg::MI][Cfg::D / 8][4],
                                                   const float (&m)[Cfg::MI][2], const float (&l)[Cfg::MI][2],
                                                   const FwdParams& p, const FwdTileSetup& ts, int wrow0, int lane) {
  constexpr int D = Cfg::D;
  const int64_t head = static_cast<int64_t>(ts.w.b) * p.Hk + ts.w.hk, rg = static_cast<int64_t>(p.R) * p.g;
  float* const base = p.split_sums + (head * p.split_parts + ts.part) * fwd_split_plane_floats(rg, D);
  float* const lse = base + rg * D;
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float lv = quad_sum(l[mi][h]);  // (all lanes: shuffles)
      const int row = wrow0 + mi * 16 + (lane >> 2) + 8 * h;
      if (row >= ts.rows_valid) continue;
      const int64_t P = ts.row0 + row;  // packed row within the block row
      if ((lane & 3) == 0) lse[P] = finish_lse(m[mi][h], lv);
      const float inv = row_inv(lv);
      const bool empty = lv == 0.f;
      float* const dst = base + P * D + 2 * (lane & 3);
#pragma unroll
      for (int d = 0; d < D / 8; ++d)
        *reinterpret_cast<float2*>(dst + 8 * d) = make_float2(row_out(o[mi][d][2 * h], inv, empty),
                                                                   row_out(o[mi][d][2 * h + 1], inv, empty));
    }
}

// Packed rows per combine CTA (a 2-D grid: the rows of one split block row over several CTAs; with one CTA per row
// the combine was latency-bound, about 60 us at 8:64:64): the dq split's. The forward's takes one float4 of a row per
// thread (fwd_combine_rows): a decode step's 4-64 rows then spread over 1-8 CTAs per KV head.
constexpr int kCombineRows = 32;
constexpr int fwd_combine_rows(int D) { return 256 / (D / 4); }
// The forward's combine stages the pieces of a row in shared memory, up to this many at once: every piece the few-row
// plan gives a row (at most split_cut_div, 33 on 132 SMs with 8 heads), so a decode step's combine waits for one round
// trip to L2. Bytes per piece: the chunk's float4 (one per thread) and its lse.
constexpr int kCombineStageMax = 36;
constexpr int fwd_combine_stage_bytes(int D) { return 256 * 16 + fwd_combine_rows(D) * 4; }

// The split block row of a finishing CTA (one per (batch, KV head, partial slot)): false unless the slot is its row's
// first (uniform: the CTA returns). Its pieces' planes from `sums` on, `plane` floats apart, in piece order.
struct SplitRowPieces {
  int hk, count;
  int64_t rg, plane, rows, row0;  // packed rows per block row; floats a plane; the row's packed rows below M; (b, row)
  const float* sums;
  // (query row, head) of packed row P: its index in o, lse or dq rows
  __device__ __forceinline__ int64_t at(const FwdParams& p, int64_t P) const {
    const int64_t r = P / p.g, j = P - r * p.g;
    return (row0 + r) * p.Hq + static_cast<int64_t>(hk) * p.g + j;
  }
};
__device__ __forceinline__ bool split_row_pieces(const FwdParams& p, int D, SplitRowPieces& r) {
  const int E = p.split_parts;
  const int64_t head = blockIdx.x / E;
  const int q = static_cast<int>(blockIdx.x - head * E);
  const int b = static_cast<int>(head / p.Hk);
  r.hk = static_cast<int>(head - static_cast<int64_t>(b) * p.Hk);
  const int4 h = reinterpret_cast<const int4*>(p.split_heads)[p.layout_index(b, r.hk) * E + q];
  const int br = h.x, first = h.y;
  r.count = h.z;
  if (br < 0 || br >= p.MB || first != q || r.count < 1 || r.count > E - first) return false;
  r.rg = static_cast<int64_t>(p.R) * p.g;
  r.plane = fwd_split_plane_floats(r.rg, D);
  r.rows = static_cast<int64_t>(min(p.R, p.M - br * p.R)) * p.g;
  r.sums = p.split_sums + (head * E + first) * r.plane;
  r.row0 = static_cast<int64_t>(b) * p.M + static_cast<int64_t>(br) * p.R;
  return true;
}

// The few-row plan's counterpart of split_row_pieces (fwd/few_rows_plan.cuh): CTA blockIdx.x = (batch, KV head, lane
// i of the plan, block row MB - 1 - i); false unless that row was cut (uniform: the CTA returns). All threads.
__device__ __forceinline__ bool few_rows_pieces(const FwdParams& p, int D, SplitRowPieces& r) {
  const int64_t head = blockIdx.x / p.MB;
  const int i = static_cast<int>(blockIdx.x - head * p.MB);
  const int b = static_cast<int>(head / p.Hk);
  r.hk = static_cast<int>(head - static_cast<int64_t>(b) * p.Hk);
  const FewRowsSplit s = few_rows_split(p, p.layout_index(b, r.hk));
  const int br = p.MB - 1 - i, first = __shfl_sync(0xffffffffu, s.first, i);
  r.count = __shfl_sync(0xffffffffu, s.pieces, i);
  if (r.count < 2 || r.count > p.split_parts - first) return false;  // (never past E: the plan's bound)
  r.rg = static_cast<int64_t>(p.R) * p.g;
  r.plane = fwd_split_plane_floats(r.rg, D);
  r.rows = static_cast<int64_t>(min(p.R, p.M - br * p.R)) * p.g;
  r.sums = p.split_sums + (head * p.split_parts + first) * r.plane;
  r.row0 = static_cast<int64_t>(b) * p.M + static_cast<int64_t>(br) * p.R;
  return true;
}

// One CTA per (batch, KV head, partial slot), or with few block rows per (batch, KV head, block row), and chunk of
// fwd_combine_rows(D) packed rows (blockIdx.y, strided by gridDim.y): where the slot is its row's first (the row was
// cut), the row's pieces combined in piece order into o (rounded to T) and lse for the chunk's packed rows below M.
// Dynamic shared memory: p.split_stage x fwd_combine_stage_bytes(D).
template <typename T, int D>
__global__ void __launch_bounds__(256) bsattn_fwd_split_combine_kernel(const __grid_constant__ FwdParams p) {
  constexpr int Q4 = D / 4, kRows = fwd_combine_rows(D);  // float4 of a row; packed rows of a chunk
  static_assert(kRows * Q4 == 256 && kRows % 4 == 0, "a chunk: one float4 per thread, its lse whole float4");
  // launched as a dependent of the forward (common/pdl.cuh): the few-row plan reads indptr alone (an input, which the
  // forward's CTAs waited for before they let this grid start), the table of many rows is the plan kernel's output
  SplitRowPieces sr;
  if (!p.split_few) pdl_wait();
  if (!(p.split_few ? few_rows_pieces(p, D, sr) : split_row_pieces(p, D, sr))) return;  // (uniform)
  if (p.split_few) pdl_wait();  // the pieces' partials: the forward's
  pdl_launch_dependents();
  extern __shared__ float4 staged[];  // [stage][256]: the pieces' float4 of the chunk; then [stage][kRows] their lse
  const int stage = p.split_stage, t = threadIdx.x;
  float* const staged_lse = reinterpret_cast<float*>(staged + stage * 256);
  const int count = sr.count;
  const int64_t rg = sr.rg, plane = sr.plane, rows = sr.rows;
  const float* const sums = sr.sums;
  for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * kRows; c0 < rows; c0 += static_cast<int64_t>(gridDim.y) * kRows) {
    const int64_t P = c0 + t / Q4, d = (t % Q4) * 4;
    const bool mine = P < rows;
    // One walk over the pieces with a running maximum, in piece order (fixed), over batches of `stage` pieces whose
    // copies are all in flight at once: cp.async into shared memory, as loads into registers were serialised by the
    // compiler behind the previous piece's arithmetic (16 L2 round trips one after another: 7 us of an M = 1 step)
    float mx = -INFINITY, L = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    bool nan = false;  // a piece's lse is NaN (a NaN score took part there): the row is NaN (fmaxf skips it)
    for (int j0 = 0; j0 < count; j0 += stage) {
      const int n = min(stage, count - j0);
      if (mine)
        for (int u = 0; u < n; ++u) cp_async16(smem_u32(staged + u * 256 + t), sums + (j0 + u) * plane + P * D + d);
      for (int e = t; e < n * (kRows / 4); e += 256) {  // lse: a chunk's kRows as float4 (in the plane's padding to 4)
        const int u = e / (kRows / 4);
        const int64_t r = c0 + 4 * (e % (kRows / 4));
        const bool ok = r < rows;
        const float* const src = sums + (j0 + u) * plane + rg * D + (ok ? r : 0);
        cp_async16_zfill<false>(smem_u32(staged_lse + u * kRows + (r - c0)), src, ok ? 16 : 0);
      }
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      if (mine)
        for (int u = 0; u < n; ++u) {
          const float lj = staged_lse[u * kRows + t / Q4];
          const float4 x = staged[u * 256 + t];
          nan |= lj != lj;
          const float m = fmaxf(mx, lj);
          // a piece that saw nothing (lse -inf) adds nothing (selected, not multiplied: its partial may hold 0 x inf);
          // the sums so far rescale to the new maximum (1 while nothing was seen)
          const bool live = lj != -INFINITY;
          const float wj = expf(live ? lj - m : -INFINITY), sc = expf(m == -INFINITY ? 0.f : mx - m);
          L = L * sc + wj;
          acc.x = acc.x * sc + (live ? wj * x.x : 0.f);
          acc.y = acc.y * sc + (live ? wj * x.y : 0.f);
          acc.z = acc.z * sc + (live ? wj * x.z : 0.f);
          acc.w = acc.w * sc + (live ? wj * x.w : 0.f);
          mx = m;
        }
      __syncthreads();  // (the next batch's copies overwrite the stage)
    }
    if (!mine) continue;
    if (nan) L = NAN;
    const float inv = by_row_sum(L, [&] { return 1.f / L; }, 0.f);  // (L >= 1: the largest piece weighs 1)
    const int64_t at = sr.at(p, P);
    uint2 v;
    v.x = Mma<T>::pack(acc.x * inv, acc.y * inv);
    v.y = Mma<T>::pack(acc.z * inv, acc.w * inv);
    *reinterpret_cast<uint2*>(static_cast<T*>(p.o) + at * D + d) = v;
    if (d == 0) p.lse[at] = by_row_sum(L, [&] { return mx + logf(L); }, -INFINITY);
  }
}

// The few-row split's shortest piece in keys per packed row of the tile (row_split_setup).
constexpr int64_t kFewKeysPerRow = 4;

// The row split's set-up on p (the gather kernel's copy, p.nsplit set): where the workspace holds exactly
// fwd_split_workspace_words for D and the grid with the split's slots fits, the tables' places and the plan's launch.
// few_rows: the forward's, which also splits where there are few block rows (fwd/params.h fwd_split_parts_few_rows).
// Returns false (p untouched) where nothing is split. (BSATTN_FWD_SPLIT=0 acts through the lowering alone, which then
// gives no workspace: read at trace time, so one process can time both.)
template <class Cfg, typename T>
bool row_split_setup(FwdParams& p, bool few_rows, cudaStream_t stream, cudaError_t& err) {
  err = cudaSuccess;
  const int64_t words = fwd_split_workspace_words(p, Cfg::D, few_rows);
  const int64_t L = static_cast<int64_t>(p.LB) * p.LH, heads = static_cast<int64_t>(p.B) * p.Hk;
  if (words == 0 || p.ws == nullptr || p.ws_words != words || L <= 0 || L > INT_MAX || p.MB <= 0 ||
      p.nnz > INT_MAX || p.nsplit <= 0)
    return false;
  const int E = fwd_split_parts_per_layout(p, Cfg::D, few_rows);
  if (heads * (p.MB + E) * p.nsplit > INT_MAX) return false;  // (the grid with the split's slots)
  int32_t* const tabs = reinterpret_cast<int32_t*>(p.ws);
  p.split_slots = p.MB + E;
  p.split_parts = E;
  p.split_items = tabs;
  p.split_heads = tabs + 4 * L * p.split_slots;
  p.split_sums = reinterpret_cast<float*>(tabs + 4 * L * p.split_slots + 4 * L * E);
  // an entry's work: the row tiles of its block row x the heads in flight (at least one wave of CTAs)
  const int sms = device_sm_count() > 0 ? device_sm_count() : 132;
  const int64_t slots = static_cast<int64_t>(sms) * Cfg::MINB, per_head = static_cast<int64_t>(p.MB) * p.nsplit;
  int64_t in_flight = (slots + per_head - 1) / per_head;
  in_flight = in_flight < 1 ? 1 : (in_flight > heads ? heads : in_flight);
  // the shortest piece, in entries
  const auto entries_of = [&](int64_t keys) {
    return static_cast<int>(std::min<int64_t>((keys + p.C - 1) / p.C, INT_MAX));
  };
  if (few_rows && p.MB < kSplitFewRowsMB) {
    // few block rows: every CTA plans for itself (fwd/few_rows_plan.cuh), a layout's pieces as many as fill the CTA
    // slots once with the heads in flight (the plan kernel's average work per slot), at most E
    const int64_t div = slots / (in_flight * p.nsplit);
    p.split_few = 1;
    p.split_cut_div = static_cast<int>(div < 1 ? 1 : (div > E ? E : div));
    // a piece: 2 KV tiles (a decode step's 1-64 rows against 2K-8K keys: leaving SMs idle costs more than a piece's
    // partial store), and at least kFewKeysPerRow keys per packed row of the CTA's tile, so that its partial (those
    // rows x D in f32, stored, then read by the combine) moves at most half the bytes of its keys' K and V (bf16).
    // H200, M = 16 (64 rows) against 4096 keys, device time a call: 20.3 us with 2 tiles a piece (32 pieces), 18.8
    // with 4, 21.4 with 8.
    static const int64_t keys_per_row = env_int("BSATTN_FWD_SPLIT_KEYS_PER_ROW", kFewKeysPerRow);  // (A / B switch)
    const int64_t rg = static_cast<int64_t>(p.R) * p.g, tile_rows = rg < Cfg::TM ? rg : Cfg::TM;
    p.split_min_len = entries_of(std::max<int64_t>(2 * Cfg::BN, keys_per_row * tile_rows));
    // the grid's slots: a layout's pieces are at most split_cut_div (few_rows_plan.cuh), its whole rows MB; the
    // E - split_cut_div more were empty CTAs (392 of 520 at M = 1, Hk = 8), scheduled before the last heads' pieces
    p.split_slots = p.MB + p.split_cut_div;
    p.split_stage = std::min(p.split_cut_div, kCombineStageMax);  // (a row's pieces: at most split_cut_div)
    return true;
  }
  p.split_stage = std::min(E, 16);  // (a row's pieces: at most E, most rows' a few; the combine's CTAs a few per SM)
  bsattn_fwd_split_plan_kernel<T, Cfg::D><<<static_cast<unsigned>(L), kSplitPlanThreads, 0, stream>>>(
      p, in_flight * p.nsplit, slots, entries_of(8 * Cfg::BN));  // (many block rows: pieces of at least 8 KV tiles)
  err = cudaGetLastError();
  return true;
}

// One CTA per tile of Cfg::TM packed rows (launch_row_tiles' grid), or, with the row split, per (batch, KV head, item
// slot, row tile): the plan before, Finish (one CTA per (batch, KV head, partial slot) and chunk of CombineRows rows:
// the pieces' partials summed into the output) after. P: the kernel's parameter block, a FwdParams (the forward's, or
// the Hopper dq kernel's, bwd_sm90/dq_split.cuh); FewRows: split where there are few block rows too (the forward's).
template <auto Kernel, auto Finish, class Cfg, typename T, bool FewRows, int CombineRows, class P>
cudaError_t launch_split_row_tiles(const P& p0, cudaStream_t stream) {
  P p = p0;
  int64_t grid = row_tile_grid<Cfg::TM>(p);
  cudaError_t err = cudaSuccess;
  const bool split = row_split_setup<Cfg, T>(p, FewRows, stream, err);
  if (err != cudaSuccess) return err;
  if (split) grid = static_cast<int64_t>(p.B) * p.Hk * p.split_slots * p.nsplit;
  static std::atomic<uint64_t> smem_done{0};  // one per kernel
  // the forward's (FewRows) kernel and combine are dependent launches (common/pdl.cuh): the combine's launch and plan
  // overlap the forward's tail, the forward's set-up the previous kernel's
  err = launch_kernel<FewRows>(Kernel, grid, Cfg::NT, Cfg::SMEM, Cfg::MINB, smem_done, p, stream);
  if (err != cudaSuccess || !split) return err;
  // (few block rows: one CTA per (batch, KV head, block row); else per partial slot)
  const int64_t blocks = static_cast<int64_t>(p.B) * p.Hk * (p.split_few ? p.MB : p.split_parts);
  if (blocks <= 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  const int64_t chunks = (static_cast<int64_t>(p.R) * p.g + CombineRows - 1) / CombineRows;
  const dim3 cgrid(static_cast<unsigned>(blocks), static_cast<unsigned>(chunks < 65535 ? chunks : 65535));
  if (FewRows) {  // the forward's combine: its pieces staged in shared memory (p.split_stage of them)
    static std::atomic<uint64_t> combine_smem_done{0};
    err = opt_in_smem(Finish, kCombineStageMax * fwd_combine_stage_bytes(Cfg::D), 1, combine_smem_done);
    if (err != cudaSuccess) return err;
    return launch_dependent(Finish, cgrid, dim3(256), p.split_stage * fwd_combine_stage_bytes(Cfg::D), stream, p);
  }
  Finish<<<cgrid, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

// The forward's: the pieces' o and lse combined (bsattn_fwd_split_combine_kernel).
template <auto Kernel, class Cfg, typename T>
cudaError_t launch_fwd_row_tiles(const FwdParams& p, cudaStream_t stream) {
  return launch_split_row_tiles<Kernel, bsattn_fwd_split_combine_kernel<T, Cfg::D>, Cfg, T, /*FewRows=*/true,
                                fwd_combine_rows(Cfg::D)>(p, stream);
}

}  // namespace cuda
}  // namespace bsattn
