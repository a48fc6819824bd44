// The forward kernel's KV gather: KV tiles gathered from the block row's virtual key sequence. (Its packed Q
// tile is loaded by common/gather.cuh load_packed_tile, shared with the dq kernel.)
//
// Shared-memory tiles are rows of D b16 values stored as 16-byte chunks with chunk c of row r at
// position c ^ (r & 7) (XOR swizzle inside each 128-byte group): cp.async writes and the ldmatrix reads
// of 8 rows x one chunk column are then free of bank conflicts. (A 16-byte pad per row instead makes
// every fragment address base + constant and saves ~16 registers, but measured 4-40% slower here.)
//
// Virtual key sequence of a block row: its listed blocks one after another; virtual position t is list
// entry t / C, key row blk * C + t % C. A KV tile holds BN consecutive virtual positions. A key row is
// invalid when the entry is past the row's range, the block index is outside [0, NB), or the key is
// past the batch element's keys (N, or its kv_lens: ProblemParams::key_count): such rows are zero-filled in shared
// memory (never read from k / v) and get key index INT_MAX (masked by the kernel).
#pragma once

#include <climits>
#include <cstdint>

#include "cuda/common/gather.cuh"
#include "cuda/fwd/mma.cuh"
#include "cuda/fwd/params.h"

namespace bsattn {
namespace cuda {

// Gathers the KV tiles of one block row. Thread layout per tile: thread tid copies chunk tid % CPR of
// rows pass * RPP + tid / CPR. The key index of each row is resolved once, by an "owner" lane of the
// warp that copies it (lane o owns the row the warp copies in pass o / RPW, sub-row o % RPW), and
// broadcast with a shuffle. Owner lanes walk the virtual sequence incrementally (entry, offset) and
// prefetch the next tile's block index one tile ahead, so no index load latency sits in front of the
// copies.
// Per-CTA constants of the gather, kept in shared memory rather than in registers (the main loop of
// the 128-row tiles needs every register for the accumulators).
struct GatherShared {
  int64_t kvoff;       // K / V of (b, hk): key row j at p.k / p.v + kvoff + j * Hk * D
  const int32_t* idx;  // the block row's list of block indices
  int len;             // its length
  int16_t qC, rC;      // BN = qC * C + rC (both at most BN)
  int qlim_min;        // causal: keys above this need the mask for some row of the tile (else INT_MAX)
  int nkeys;           // keys [0, nkeys) of the batch element take part (ProblemParams::key_count)
};
static_assert(sizeof(GatherShared) <= 32, "the kernels keep it in CTA_BYTES = 32 (fwd/config.cuh FwdTileShape)");

// Layout: the stage buffers' tile layout (common/gather.cuh; the mma.sync kernel's RowSwizzle by default).
template <typename T, class Cfg, class Layout = RowSwizzle<Cfg::D>>
struct KvGather {
  static constexpr int D = Cfg::D, BN = Cfg::BN, CPR = Cfg::CPR, RPP = Cfg::RPP, RPW = Cfg::RPW;

  // Owner-lane walk state: (list entry, offset in block) of its row in the next tile, in shared memory
  // (sOwn[owner row]); only the prefetched block index of that entry lives in a register.
  int2* own;       // this lane's slot
  int blk_next;    // idx[entry] prefetched (or -1)

  static __device__ __forceinline__ int owner_row(int warp, int lane) {
    return (lane / RPW) * RPP + warp * RPW + (lane % RPW);
  }

  // idx / len: the block row's list (as in GatherShared, which need not be written yet).
  __device__ __forceinline__ void init(const FwdParams& p, const int32_t* idx, int len, int2* sOwn, int warp,
                                       int lane) {
    const int trow = owner_row(warp, lane);
    const int ent = trow / p.C;
    own = sOwn + (lane < Cfg::OWN ? trow : 0);
    if (lane < Cfg::OWN) *own = make_int2(ent, trow - ent * p.C);
    blk_next = (lane < Cfg::OWN && ent < len) ? __ldg(idx + ent) : -1;
  }

  // Issues the cp.async copies of the next KV tile into `stage` (not committed) and records its key
  // indices; returns 1 when this thread saw a row of the tile that needs the mask.
  __device__ __forceinline__ uint32_t issue(const FwdParams& p, const GatherShared& gs, uint32_t sK, uint32_t sV,
                                            int* sKidx, int stage, int warp, int lane) {
    return issue(p, gs, sK, sV, sKidx, stage, stage, warp, lane);
  }
  // The same with K (and its key indices) into K stage `kstage`, V into V stage `vstage` (pipelines that keep
  // V tiles longer than K tiles).
  __device__ __forceinline__ uint32_t issue(const FwdParams& p, const GatherShared& gs, uint32_t sK, uint32_t sV,
                                            int* sKidx, int kstage, int vstage, int warp, int lane) {
    int key;
    const uint32_t flag = next_keys(p, gs, sKidx, kstage, warp, lane, key);
    const int64_t kvoff = gs.kvoff;
    const T* kg = static_cast<const T*>(p.k) + kvoff;
    const T* vg = static_cast<const T*>(p.v) + kvoff;
    const int64_t rstride = static_cast<int64_t>(p.Hk) * D;
    const uint32_t sKs = sK + kstage * Cfg::KV_STAGE_BYTES, sVs = sV + vstage * Cfg::KV_STAGE_BYTES;
    copy_row_pair_tile<D, Cfg::PASSES, RPP, RPW, Cfg::KV_L1, Layout>(sKs, sVs, kg, vg, key, rstride, warp, lane,
                                                                     [](int kp) { return kp != INT_MAX; });
    return flag;
  }

  // The owner lanes' step of the walk: the key rows of the next KV tile, recorded for K stage `kstage` (sKidx) and
  // in `key` (this lane's row when it is an owner lane, else INT_MAX; the copies shuffle them). Returns 1 when this
  // thread saw a row of the tile that needs the mask.
  __device__ __forceinline__ uint32_t next_keys(const FwdParams& p, const GatherShared& gs, int* sKidx, int kstage,
                                                int warp, int lane, int& key) {
    const bool owner = lane < Cfg::OWN;
    key = INT_MAX;
    uint32_t flag = 0;
    if (owner) {
      int2 st = *own;  // (entry, offset) of this tile
      if (st.x < gs.len) {
        const int blk = blk_next;
        if (blk >= 0 && blk < p.NB) {
          const int kk = blk * p.C + st.y;
          if (kk < gs.nkeys) key = kk;
        }
      }
      sKidx[kstage * BN + owner_row(warp, lane)] = key;
      flag = (key == INT_MAX || key > gs.qlim_min) ? 1u : 0u;
      // advance to the next tile: BN virtual positions = qC whole blocks + rC keys
      st.x += gs.qC;
      st.y += gs.rC;
      if (st.y >= p.C) {
        st.y -= p.C;
        ++st.x;
      }
      *own = st;
      blk_next = st.x < gs.len ? __ldg(gs.idx + st.x) : -1;
    }
    return flag;
  }

  // The cp.async copies (not committed) of the tile's rows (keys from next_keys) of one tensor: g (K or V of the
  // (b, hk)) into the stage buffer s.
  __device__ __forceinline__ void copy_rows(const FwdParams& p, uint32_t s, const T* g, int key, int warp, int lane) {
    const int64_t rstride = static_cast<int64_t>(p.Hk) * D;
    copy_row_pair_tile<D, Cfg::PASSES, RPP, RPW, Cfg::KV_L1, Layout, false>(s, 0u, g, g, key, rstride, warp, lane,
                                                                            [](int kp) { return kp != INT_MAX; });
  }
};

}  // namespace cuda
}  // namespace bsattn
