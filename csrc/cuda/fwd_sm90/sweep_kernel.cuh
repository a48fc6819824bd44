// The Hopper forward for few packed rows per block row (R * g <= 16): a sweep over contiguous keys, masked per
// element, instead of a gather per block row.
//
// Where R * g is small, the gather kernels compute a 16-row tile per block row with a quarter of its rows real
// (R * g = 4) and pull every listed key through L2 for those few rows: memory-bound, ~35 useful TFLOP/s. Here one
// CTA takes BRT = 64 / (R * g) consecutive block rows (64 packed rows: one wgmma warpgroup) and builds, in shared
// memory, one bit per (block row, key) from their lists. It then walks the key tiles of 64 contiguous keys in
// which any of its block rows lists a key (at density 1 / 4 and R = C = 1 nearly all of them), loads them by
// cp.async like the gather, and computes S = Q K^T, the online softmax and O += P V with wgmma as the gather
// kernel does (kernel.cuh), a score kept where its row's block row lists its key (and the causal mask allows it).
//
// A block listed twice in a block row counts twice. The bit map cannot say so, and a duplicate is found while
// the map is built (a bit already set): then the CTA computes its block rows one after another instead, each
// with the forward's gather (fwd/gather_kv.cuh) over its list and the other block rows' rows masked out. That is
// slower (each 64-row tile has R * g real rows), exact, and keeps every result independent of scheduling.
//
// Unlike the gathers, the sweep reads keys no block row of the CTA lists (and its siblings' keys): their p is 0,
// but a non-finite value in v there (0 * inf, 0 * NaN) makes the row's output NaN. The gathers have that exposure
// only at the causally masked keys of listed blocks. Zero-filling the keys no block row lists would narrow it (not
// done).
//
// Measured (H200, 2026-11-30, M = N = 8192, Hq = 32, D = 128, bf16, density 1/4, forward alone, ms, the gathers
// (BSATTN_FWD_SWEEP=0) -> this kernel, one call; benchmarks/results/h200_s13_call3_validate.log):
//   g = 1, R = 1: C = 1 29.91 -> 13.10, C = 16 .. 128 29.74-30.02 -> 7.02-7.23
//   g = 4, R = 1: C = 1  7.32 ->  3.84, C = 16 .. 128  7.28-7.32  -> 3.08-3.09
//   g = 8, R = 1: C = 1  3.71 ->  3.30, C = 16 .. 128  3.69-3.70  -> 2.67-2.93
// It loses at R * g = 16 (4:4:1 1.91 -> 3.00, 1:16:1 1.93 -> 2.99) and at R * g = 8 with density 1/8 (8:1:1
// 1.98 -> 3.07), and still wins at R * g = 4 with density 1/8 (3.92 -> 3.40): fwd_sweep_block_rows (launch.cuh) has
// the rule. At C = 1 building the bit map costs about 0.8 ms of the 3.84 (32 K shared-memory atomics a tile), and
// g = 1 (64 block rows a tile: a 64 KB bit map, one CTA per SM, four times g = 4's key traffic) stays at 7 ms.
// Hence the table pass (fifteenth session): where the caller's workspace holds them (maps no larger than the
// layout's indices: C <= 8 at density 1/4), the maps are built once per call and layout, in global memory
// (bsattn_fwd_sweep_table_kernel), and each CTA loads its rows' words; otherwise each CTA builds its own. Measured
// (H200, sixteenth session, forward alone through the API, ms, BSATTN_FWD_SWEEP_TABLE=0 -> table;
// benchmarks/results/h200_s16_call1_fwd_table.log): 4:1:1 3.851 -> 2.920, 1:1:1 13.069 -> 4.914, 8:1:1 3.305 ->
// 2.891, 4:1:4 3.225 -> 2.836, 4:1:8 3.125 -> 2.827, 4:2:1 3.297 -> 2.840; 4:1:16 (no table: maps larger than the
// layout) 3.077 / 3.089.
// Dropped: building with one entry per thread per step (5.10 ms at 4:1:1); combining the atomics of a warp's lanes
// that hit one word (__match_any_sync, then __reduce_or_sync / __reduce_add_sync over each lane's group: the results
// stayed exact but tiles went to the duplicate path, up to 18x slower at C >= 16); the overlapped schedule
// (config.cuh).
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>

#include "common/bsattn_common.h"
#include "cuda/common/wgmma.cuh"
#include "cuda/fwd/epilogue.cuh"
#include "cuda/fwd/gather_kv.cuh"
#include "cuda/fwd/mma.cuh"
#include "cuda/fwd/params.h"
#include "cuda/fwd/softmax.cuh"
#include "cuda/fwd_sm90/config.cuh"
#include "cuda/fwd_sm90/shared.cuh"

namespace bsattn {
namespace cuda {

// Words of the key bit map per block row, and the shared memory the sweep kernel needs beyond Cfg::SMEM: per tile
// row the offset of its block row's words, a few flags, the list of key tiles, the bit map.
struct SweepShape {
  int words;     // ceil(N / 32)
  int ktiles;    // ceil(N / BN)
  int extra;     // bytes beyond Cfg::SMEM
};
template <class Cfg>
inline SweepShape sweep_shape(const FwdParams& p, int brt) {
  SweepShape s;
  s.words = (p.N + 31) / 32;
  s.ktiles = (p.N + Cfg::BN - 1) / Cfg::BN;
  const int64_t bytes = int64_t{Cfg::TM} * 4 + 64 + int64_t{s.ktiles} * 4 + int64_t{brt} * s.words * 4;
  s.extra = bytes > INT_MAX / 2 ? INT_MAX / 2 : static_cast<int>(bytes);
  return s;
}

// Sets bits [lo, hi) of a row of the bit map; returns whether any was already set (the same block listed again:
// distinct blocks cover disjoint keys).
__device__ __forceinline__ bool set_key_bits(uint32_t* row, int lo, int hi) {
  bool dup = false;
  for (int w = lo >> 5; w <= (hi - 1) >> 5; ++w) {
    const int a = max(lo - w * 32, 0), b = min(hi - w * 32, 32);
    const uint32_t bits = (b - a == 32 ? 0xffffffffu : ((1u << (b - a)) - 1u)) << a;
    dup |= (atomicOr(row + w, bits) & bits) != 0u;
  }
  return dup;
}

// The table pass (where the caller gave the workspace, fwd/params.h fwd_sweep_table_words): each layout's bit map
// built once per call in global memory, one warp per (layout, block row), from a zeroed table, with a duplicate flag
// per block row (a bit already set; one writer, the warp's lane 0). The sweep's CTAs then load their rows' words
// instead of building them: one build per layout rather than per (batch, KV head) and tile, off the CTAs' path.
// (T: the forward's dtype, unused; a template so that each instantiation file may hold it)
template <typename T>
__global__ void __launch_bounds__(256) bsattn_fwd_sweep_table_kernel(const __grid_constant__ FwdParams p,
                                                                    uint32_t* table, int words) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const int64_t layouts = static_cast<int64_t>(p.LB) * p.LH;
  if (item >= layouts * p.MB) return;
  const int64_t lid = item / p.MB;
  const int r = static_cast<int>(item - lid * p.MB);
  const RowRange rr = row_range(p.indptr + lid * (p.MB + 1), r, p.nnz);
  const int32_t* indices = p.indices + lid * p.nnz;
  uint32_t* row = table + item * words;
  bool dup = false;
  for (int64_t e = rr.start + lane; e < rr.end; e += 32) {
    const int c = __ldg(indices + e);
    if (valid_block(c, p.NB)) dup |= set_key_bits(row, c * p.C, min(c * p.C + p.C, p.N));
  }
  dup = __any_sync(0xffffffffu, dup);
  // (the flags at fwd_sweep_rows(p) * words, fwd/params.h, written out: through that helper this kernel's SASS changed)
  if (lane == 0) table[layouts * p.MB * words + item] = dup ? 1u : 0u;
}

// kLens: p.kv_lens is set (per-sequence key lengths: keys past them loaded as zeros and masked like causally hidden
// ones). A template argument, so that without lengths the kernel is the code timed before them (with them in every
// call it ran 1.2-1.7 % slower at 4:1:1 and 4:1:16, H200, session 42).
template <typename T, class Cfg, bool kLens>
__global__ void __launch_bounds__(Cfg::NT, Cfg::MINB) bsattn_fwd_sm90_sweep_kernel(const __grid_constant__ FwdParams p,
                                                                                   const SweepShape sh) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = Cfg::D, BN = Cfg::BN, TM = Cfg::TM, KST = Cfg::KST, VST = Cfg::VST, PF = Cfg::PF;
  constexpr int NT = Cfg::NT, NT8 = BN / 8, DT = D / 8;
  static_assert(TM == 64 && NT == 128 && BN == 64, "one warpgroup of 64 rows, key tiles of 64 (two bit words)");
  static_assert(!Cfg::OVERLAP && KST == VST, "the products of a tile back to back");
  using QLayout = AtomSwizzle<D, TM>;
  using KvLayout = AtomSwizzle<D, BN>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // ---- which block rows: heads outermost, then tiles of BRT block rows, the last first (causal-heavy) --------
  const int BRT = p.sweep_brt;
  const int ntm = (p.MB + BRT - 1) / BRT;
  const int head = blockIdx.x / ntm;
  const int br0 = (ntm - 1 - (blockIdx.x - head * ntm)) * BRT;
  const int b = head / p.Hk, hk = head - b * p.Hk;
  const int nbr = min(BRT, p.MB - br0);
  const int m0 = br0 * p.R;
  const int qrows = min(nbr * p.R, p.M - m0);
  const int rows_valid = qrows * p.g;
  const int64_t q_rstride = static_cast<int64_t>(p.Hq) * D;
  const int64_t qoff = (static_cast<int64_t>(b) * p.M + m0) * q_rstride + static_cast<int64_t>(hk) * p.g * D;
  const int64_t kvoff = (static_cast<int64_t>(b) * p.N * p.Hk + hk) * D;
  const int64_t lid = p.layout_index(b, hk);
  const int32_t* indptr = p.indptr + lid * (p.MB + 1);
  const int32_t* indices = p.indices + lid * p.nnz;

  // ---- shared memory ----------------------------------------------------------------------------------------
  // (kernel.cuh's carve-up, then the sweep's tables)
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t pad = ((raw + 1023u) & ~1023u) - raw;
  uint8_t* smem = smem_raw + pad;
  const uint32_t sQ = raw + pad;
  const uint32_t sK = sQ + Cfg::Q_BYTES;
  const uint32_t sV = sK + KST * Cfg::KV_STAGE_BYTES;
  int* sKidx = reinterpret_cast<int*>(smem + Cfg::Q_BYTES + Cfg::KV_BYTES);
  int* sLim = sKidx + KST * BN;
  GatherShared* gs = reinterpret_cast<GatherShared*>(sLim + TM);
  int2* sOwn = reinterpret_cast<int2*>(gs + 1);
  int2* sRow = sOwn + BN;
  int* sBmOff = reinterpret_cast<int*>(sRow + TM);  // per tile row: its block row's first word in sBm
  int* sFlag = sBmOff + TM;                         // [1]: key tiles listed; [2..5]: per-warp counts
  int* sTiles = sFlag + 16;                         // the key tiles to compute, in order
  uint32_t* sBm = reinterpret_cast<uint32_t*>(sTiles + sh.ktiles);

  // ---- Q tile; per-row tables; the bit map ------------------------------------------------------------------
  {
    const uint32_t dst[1] = {sQ};
    const T* const src[1] = {static_cast<const T*>(p.q) + qoff};
    load_packed_tile<D, TM, NT, 1, QLayout>(dst, src, 0, rows_valid, p.g, q_rstride, tid);
  }
  cp_async_commit();
  const int causal_shift = p.causal_shift(b);
  // kLens: the keys past the batch element's are loaded as zeros and masked like causally hidden ones (every row's
  // limit at most its last key)
  const int nkeys = kLens ? p.key_count(b) : p.N, last_key = nkeys - 1;
  for (int row = tid; row < TM; row += NT) {
    const int r = row / p.g;
    const bool real = row < rows_valid;
    sRow[row] = make_int2(real ? r : -1, row - r * p.g);
    sBmOff[row] = (real ? r / p.R : 0) * sh.words;
    const int lim = p.causal ? m0 + r + causal_shift : INT_MAX - 1;
    sLim[row] = kLens ? min(lim, last_key) : lim;
  }
  bool dup = false;
  if (p.sweep_table != nullptr) {  // (uniform) the rows' maps and duplicate flags from the table pass
    const uint32_t* src = p.sweep_table + (lid * p.MB + br0) * sh.words;
    for (int i = tid; i < nbr * sh.words; i += NT) sBm[i] = __ldg(src + i);
    const uint32_t* flags = p.sweep_table + fwd_sweep_rows(p) * sh.words + lid * p.MB + br0;
    for (int i = tid; i < nbr; i += NT) dup |= __ldg(flags + i) != 0u;
  } else {
    for (int i = tid; i < nbr * sh.words; i += NT) sBm[i] = 0u;
    // (start, end) per block row, in the idle K stage
    int64_t* sRange = reinterpret_cast<int64_t*>(smem + Cfg::Q_BYTES);
    for (int i = tid; i < nbr; i += NT) {
      const RowRange rr = row_range(indptr, br0 + i, p.nnz);
      sRange[2 * i] = rr.start;
      sRange[2 * i + 1] = rr.end;
    }
    __syncthreads();
    // The block rows' entries in batches of kBatch per thread, the next batch's loads in flight while this one's bits
    // are set (at R = C = 1 a tile's 16 block rows list ~32 K entries: one latency per batch, not per entry).
    {
      constexpr int kBatch = 16;
      int i = 0;
      int64_t e0 = nbr > 0 ? sRange[0] : 0;
      auto settle = [&] {  // (uniform) to the next block row with entries left
        while (i < nbr && e0 >= sRange[2 * i + 1])
          if (++i < nbr) e0 = sRange[2 * i];
      };
      auto load = [&](int (&c)[kBatch]) {
        const int64_t end = i < nbr ? sRange[2 * i + 1] : 0;
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
          const int64_t e = e0 + tid + j * NT;
          c[j] = e < end ? __ldg(indices + e) : -1;
        }
      };
      settle();
      int c[kBatch];
      load(c);
      while (i < nbr) {
        uint32_t* row = sBm + i * sh.words;
        e0 += kBatch * NT;
        settle();
        int cn[kBatch];
        load(cn);
#pragma unroll
        for (int j = 0; j < kBatch; ++j)
          if (valid_block(c[j], p.NB)) dup |= set_key_bits(row, c[j] * p.C, min(c[j] * p.C + p.C, p.N));
#pragma unroll
        for (int j = 0; j < kBatch; ++j) c[j] = cn[j];
      }
    }
  }
  dup = __syncthreads_or(static_cast<int>(dup)) != 0;

  // ---- the key tiles any block row lists (below the causal limit of the tile's last row), compacted in order -
  if (!dup) {
    const int kmax_rows = p.causal ? m0 + qrows - 1 + causal_shift : p.N - 1;
    const int kmax = kLens ? min(kmax_rows, last_key) : kmax_rows;
    const int nk = kmax < 0 ? 0 : min(sh.ktiles, kmax / BN + 1);
    int base = 0;
    for (int j0 = 0; j0 < nk; j0 += NT) {
      const int j = j0 + tid;
      uint32_t any = 0u;
      if (j < nk)
        for (int i = 0; i < nbr; ++i)
          any |= sBm[i * sh.words + 2 * j] | (2 * j + 1 < sh.words ? sBm[i * sh.words + 2 * j + 1] : 0u);
      const uint32_t bal = __ballot_sync(0xffffffffu, any != 0u);
      if (lane == 0) sFlag[2 + warp] = __popc(bal);
      __syncthreads();
      int off = base;
      for (int w = 0; w < warp; ++w) off += sFlag[2 + w];
      if (any) sTiles[off + __popc(bal & ((1u << lane) - 1u))] = j;
      for (int w = warp; w < NT / 32; ++w) off += sFlag[2 + w];
      base = off;  // (the same in every thread)
      __syncthreads();
    }
    if (tid == 0) sFlag[1] = base;
  }
  __syncthreads();

  // ---- per-thread state ---------------------------------------------------------------------------------------
  float o[1][DT][4];
  float m[1][2] = {{-INFINITY, -INFINITY}}, l[1][2] = {{0.f, 0.f}};
  float lsum[1][4];  // (unused: row sums by FADD)
#pragma unroll
  for (int d = 0; d < DT; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[0][d][e] = 0.f;
  float(&of)[D / 2] = reinterpret_cast<float(&)[D / 2]>(o);
  float s[1][NT8][4];
  float(&sf)[BN / 2] = reinterpret_cast<float(&)[BN / 2]>(s);
  uint32_t pa[BN / 16][4];
  const uint64_t q_desc = sw128_desc(sQ, 16, 1024);
  const uint64_t k_desc = sw128_desc(sK, 16, 1024);
  const uint64_t v_desc = sw128_desc(sV, BN * 128, 1024);
  constexpr uint64_t kStageDesc = Cfg::KV_STAGE_BYTES >> 4;
  float alpha[1][2];
  auto pack_p = [&] {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) acc_to_a<T>(s[0], kk, pa[kk]);
  };
  const int row_a = warp * 16 + (lane >> 2);  // this thread's two rows: row_a, row_a + 8

  // The pipelined loop over `ntiles` KV tiles: issue(i, kstage, vstage) copies tile i (not committed);
  // mask(t, kstage) masks the scores of tile t. The two products of a tile back to back (kernel.cuh's schedule without
  // the overlap, which measured slower here: config.cuh).
  auto run_tiles = [&](int ntiles, auto&& issue, auto&& mask) {
    auto issue_at = [&](int i) {
      issue(i, i % KST, i % VST);
      return 0u;
    };
    issue_prologue<PF + 1>(issue_at, ntiles);
    auto next_tile = [&](int t) {
      cp_async_wait<PF - 1>();
      fence_async_shared();
      __syncthreads();
      if (t + PF < ntiles) issue_at(t + PF);
      cp_async_commit();
    };
    auto probs = [&](int t, int kstage) {
      const float mul = prepare_scores<1, NT8>(s, p);
      mask(t, kstage);
      return softmax_probs<1, NT8, false>(s, mul, m, l, alpha);
    };
    for (int t = 0; t < ntiles; ++t) {
      next_tile(t);
      const int kstage = t % KST;
      sm90_qk_now<T, BN, D, TM>(sf, q_desc, k_desc + kstage * kStageDesc);
      if (probs(t, kstage)) rescale_acc<1, DT, false>(o, lsum, alpha);
      pack_p();
      sm90_pv_now<T, D, BN / 16>(of, pa, v_desc + (t % VST) * kStageDesc);
    }
    cp_async_wait<0>();
    __syncthreads();  // every stage consumed before the next run_tiles (or the epilogue) reuses them
  };

  const T* kg = static_cast<const T*>(p.k) + kvoff;
  const T* vg = static_cast<const T*>(p.v) + kvoff;
  const int64_t kv_rstride = static_cast<int64_t>(p.Hk) * D;
  using Gather = KvGather<T, Cfg, KvLayout>;
  if (!dup) {
    // ---- the sweep: contiguous key tiles, a score kept where its block row's bit is set ------------------------
    const int lim_a = sLim[row_a], lim_b = sLim[row_a + 8];
    const uint32_t* bm_a = sBm + sBmOff[row_a];
    const uint32_t* bm_b = sBm + sBmOff[row_a + 8];
    const int qlim_min = kLens ? min(p.causal ? m0 + causal_shift : INT_MAX, last_key)
                               : (p.causal ? m0 + causal_shift : INT_MAX);
    const int own_row = Gather::owner_row(warp, lane);
    auto issue = [&](int i, int kstage, int vstage) {
      const int key = sTiles[i] * BN + own_row;
      copy_row_pair_tile<D, Cfg::PASSES, Cfg::RPP, Cfg::RPW, Cfg::KV_L1, KvLayout>(
          sK + kstage * Cfg::KV_STAGE_BYTES, sV + vstage * Cfg::KV_STAGE_BYTES, kg, vg,
          lane < Cfg::OWN && key < (kLens ? nkeys : p.N) ? key : INT_MAX, kv_rstride, warp, lane, [](int kp) { return kp != INT_MAX; });
    };
    auto mask = [&](int t, int) {
      const int j = sTiles[t];
      const int sh2 = 2 * (lane & 3);
      const uint32_t a0 = bm_a[2 * j] >> sh2, b0 = bm_b[2 * j] >> sh2;
      const uint32_t a1 = 2 * j + 1 < sh.words ? bm_a[2 * j + 1] >> sh2 : 0u;
      const uint32_t b1 = 2 * j + 1 < sh.words ? bm_b[2 * j + 1] >> sh2 : 0u;
#pragma unroll
      for (int n = 0; n < NT8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int bit = (n % 4) * 8 + e;
          if (!(((n < 4 ? a0 : a1) >> bit) & 1u)) s[0][n][e] = -INFINITY;
          if (!(((n < 4 ? b0 : b1) >> bit) & 1u)) s[0][n][2 + e] = -INFINITY;
        }
      if (j * BN + BN - 1 > qlim_min) {
        const int k0 = j * BN + sh2;
#pragma unroll
        for (int n = 0; n < NT8; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (k0 + n * 8 + e > lim_a) s[0][n][e] = -INFINITY;
            if (k0 + n * 8 + e > lim_b) s[0][n][2 + e] = -INFINITY;
          }
      }
    };
    run_tiles(sFlag[1], issue, mask);
  } else {
    // ---- a duplicate: block row by block row, each through the gather over its list, the other rows masked --
    const int lim_a = sLim[row_a], lim_b = sLim[row_a + 8];
    const int br_a = row_a < rows_valid ? (row_a / p.g) / p.R : -1;
    const int br_b = row_a + 8 < rows_valid ? ((row_a + 8) / p.g) / p.R : -1;
    for (int i = 0; i < nbr; ++i) {
      const RowRange rr = row_range(indptr, br0 + i, p.nnz);
      const int len = static_cast<int>(rr.end - rr.start);
      const int64_t nt64 = (static_cast<int64_t>(len) * p.C + BN - 1) / BN;
      const int ntiles = nt64 > INT_MAX ? INT_MAX : static_cast<int>(nt64);
      Gather kv;
      kv.init(p, indices + rr.start, len, sOwn, warp, lane);
      if (tid == 0) {  // (tile_setup.cuh fill_gather_shared's fields; through it this kernel's code changed throughout)
        gs->kvoff = kvoff;
        gs->idx = indices + rr.start;
        gs->len = len;
        gs->qC = static_cast<int16_t>(BN / p.C);
        gs->rC = static_cast<int16_t>(BN - gs->qC * p.C);
        gs->qlim_min = INT_MIN;  // (the mask runs on every tile)
        gs->nkeys = nkeys;
      }
      __syncthreads();
      auto issue = [&](int, int kstage, int vstage) { kv.issue(p, *gs, sK, sV, sKidx, kstage, vstage, warp, lane); };
      const int lim[1][2] = {{br_a == i ? lim_a : -1, br_b == i ? lim_b : -1}};  // -1: every key masked
      auto mask = [&](int, int kstage) { mask_scores_by_limit<1, NT8>(s, sKidx + kstage * BN, lim, lane); };
      run_tiles(ntiles, issue, mask);
    }
  }

  // ---- epilogue: each warp stages its 16 rows in the (now idle) Q tile ----------------------------------------
  OutRows out;
  out.og = static_cast<T*>(p.o) + qoff;
  out.lseg = p.lse + (static_cast<int64_t>(b) * p.M + m0) * p.Hq + static_cast<int64_t>(hk) * p.g;
  out.o_rstride = q_rstride;
  out.Hq = p.Hq;
  out.sRow = sRow;
  store_rows_single<T, Cfg>(o, m, l, sQ + warp * 16 * D * 2, out, warp * 16, lane);
#endif
}

}  // namespace cuda
}  // namespace bsattn
