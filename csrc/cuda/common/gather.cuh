// Device helpers shared by the forward's KV gathers (fwd/gather_kv.cuh, used by fwd_sm90/ too) and the backward
// kernels' row gathers (bwd/dq_kernel.cuh: K / V; bwd/dkdv_kernel.cuh: Q / dO): the swizzled shared-memory tile
// layouts, the packed query-row tile load (the forward's Q, dq's q and do), the copy of one tile of gathered row
// pairs and the pipeline prologue (the backward kernels and fwd_sm90; routing the mma.sync forward's through it
// cost its D = 256 tile 6 registers on sm_80). Force-inlined: the generated code is that of the open-coded
// loops (ptxas register counts unchanged).
#pragma once

#include <cstdint>

#include "cuda/fwd/mma.cuh"

namespace bsattn {
namespace cuda {

// Byte offset of (row, chunk) in a swizzled tile of D-wide b16 rows.
template <int D>
__device__ __forceinline__ uint32_t swz_off(int row, int chunk) {
  return static_cast<uint32_t>(row * (D * 2) + ((chunk ^ (row & 7)) << 4));
}

// Shared-memory tile layouts, as (row, 16-byte chunk) -> byte offset; both XOR the chunk's low 3 bits with
// row & 7, so that 8 rows x one chunk column are conflict-free, and row + 8 k sits k * 8 * kRowBytes further on.
// RowSwizzle: rows of D values one after another (the mma.sync kernels, read by ldmatrix).
template <int D>
struct RowSwizzle {
  static constexpr uint32_t kRowBytes = D * 2;
  static __device__ __forceinline__ uint32_t off(int row, int chunk) { return swz_off<D>(row, chunk); }
};
// AtomSwizzle: the wgmma "K-major, 128-byte swizzle" canonical layout of a ROWS x D tile: D / 64 column blocks
// of ROWS rows x 128 bytes, each a stack of 1024-byte atoms (8 rows) whose chunk c sits at c ^ (row & 7) (the
// hardware's swizzle of address bits 4-6 by bits 7-9: the tile must be 1024-byte aligned). For D = 64 it is
// RowSwizzle.
template <int D, int ROWS>
struct AtomSwizzle {
  static constexpr uint32_t kRowBytes = 128;
  static __device__ __forceinline__ uint32_t off(int row, int chunk) {
    return static_cast<uint32_t>((chunk >> 3) * (ROWS * 128) + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
  }
};

// One tile of gathered row pairs (the same rows of two tensors: K and V, or Q and dO) -> the swizzled stage
// buffers sA, sB (PAIR = false: ga alone into sA). Thread layout: lane copies 16-byte chunk lane % CPR (CPR = D / 8)
// of tile rows ps * RPP + warp * RPW + lane / CPR, pass ps < PASSES. `grow` is the calling lane's global row when it is
// the owner lane ps * RPW + lane / CPR of such a row (broadcast by shuffle); a row whose index fails
// `valid` is zero-filled, the others are copied by cp.async (.ca when L1) from row * rstride of ga / gb.
template <int D, int PASSES, int RPP, int RPW, bool L1, class Layout = RowSwizzle<D>, bool PAIR = true, typename T,
          class Valid>
__device__ __forceinline__ void copy_row_pair_tile(uint32_t sA, uint32_t sB, const T* ga, const T* gb, int grow,
                                                   int64_t rstride, int warp, int lane, Valid valid) {
  constexpr int CPR = D / 8;
  const int sub = lane / CPR, c = lane % CPR;
  // Straight-line passes: an invalid row is a zero-byte (zero-filling) copy from row 0, not a branch; when a
  // pass spans a multiple of 8 rows the swizzle term is the same in every pass (immediate offsets).
  const uint32_t so0 = Layout::off(warp * RPW + sub, c);
  const uint32_t rs32 = static_cast<uint32_t>(rstride);  // Hk * D or Hq * D: < 2^31
#pragma unroll
  for (int ps = 0; ps < PASSES; ++ps) {
    const int gr = __shfl_sync(0xffffffffu, grow, ps * RPW + sub);
    const int row = ps * RPP + warp * RPW + sub;
    const uint32_t so = (RPP % 8 == 0) ? so0 + ps * RPP * Layout::kRowBytes : Layout::off(row, c);
    const bool ok = valid(gr);
    // rows are >= 0 when valid: one 32 x 32 -> 64-bit unsigned multiply-add
    const uint64_t go = static_cast<uint64_t>(static_cast<uint32_t>(ok ? gr : 0)) * rs32 + c * 8;
    cp_async16_zfill<L1>(sA + so, ga + go, ok ? 16 : 0);
    if constexpr (PAIR) cp_async16_zfill<L1>(sB + so, gb + go, ok ? 16 : 0);
  }
}

// A tile of TM packed rows of a block row (the g query heads sharing a KV head: packed row P = row0 + row is
// query row r = P / g, head j = P % g; at r * rstride + j * D of each source) -> NTENS swizzled shared-memory
// tiles. Rows at or past rows_valid (padding of R * g, or past M) are zero-filled. Straight-line: thread tid
// copies chunk tid % CPR of rows tid / CPR + k * (NT / CPR); (r, j) advance by additions, not a division per
// chunk (this runs once per CTA, with nothing to hide its latency behind).
template <int D, int TM, int NT, int NTENS, class Layout = RowSwizzle<D>, typename T>
__device__ __forceinline__ void load_packed_tile(const uint32_t (&dst)[NTENS], const T* const (&src)[NTENS], int row0,
                                                 int rows_valid, int g, int64_t rstride, int tid) {
  constexpr int CPR = D / 8, RSTEP = NT / CPR, ITERS = TM * CPR / NT;
  static_assert(NT % CPR == 0 && (TM * CPR) % NT == 0, "packed tile load layout");
  const int c = tid % CPR;
  int row = tid / CPR;
  const int P = row0 + row;
  int r = P / g, j = P - r * g;
  const int dr = RSTEP / g, dj = RSTEP - dr * g;
  int64_t off = r * rstride + j * D + c * 8;
  const int64_t doff = dr * rstride + dj * D, wrap = rstride - static_cast<int64_t>(g) * D;
#pragma unroll
  for (int it = 0; it < ITERS; ++it, row += RSTEP) {
    const bool ok = row < rows_valid;
#pragma unroll
    for (int k = 0; k < NTENS; ++k)
      cp_async16_zfill<false>(dst[k] + Layout::off(row, c), src[k] + (ok ? off : 0), ok ? 16 : 0);
    off += doff;
    j += dj;
    if (j >= g) {
      j -= g;
      off += wrap;
    }
  }
}

// Pipeline prologue of the cp.async gathers: issues the first S - 1 tiles (those below ntiles) into stages
// 0 .. S - 2, one commit group each (empty past ntiles). `issue(stage)` returns 1 when the thread saw a row
// that needs the mask; the result holds that flag of tile s in bit s.
template <int S, class Issue>
__device__ __forceinline__ uint32_t issue_prologue(Issue&& issue, int ntiles) {
  uint32_t pending = 0;
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < ntiles) pending |= issue(s) << s;
    cp_async_commit();
  }
  return pending;
}

// The consumer side of those bits, at the top of tile t's step: wait until this thread has at most WAIT copy groups
// in flight (tile t's have landed), make its copies visible (`visible`: the Hopper kernels pass fence_async_shared so
// that wgmma sees them), then one barrier, which also means every thread is done with the stage the next issue
// overwrites. Returns whether some thread saw a row needing the mask in tile t, and drops that bit.
template <int WAIT, class Visible>
__device__ __forceinline__ bool tile_landed(uint32_t& pending, Visible&& visible) {
  cp_async_wait<WAIT>();
  visible();
  const bool need_mask = __syncthreads_or(static_cast<int>(pending & 1u)) != 0;
  pending >>= 1;
  return need_mask;
}
template <int WAIT>
__device__ __forceinline__ bool tile_landed(uint32_t& pending) {
  return tile_landed<WAIT>(pending, [] {});
}

}  // namespace cuda
}  // namespace bsattn
