// The plan of a list split: the long lists of one CSR layout (block columns of the backward's column view, block rows
// of the forward's row view) cut into pieces of consecutive entries, each a work item of its own, so that no CTA walks
// much more than the average per CTA slot. Used by the backward's column split (bwd/column_split.cuh) and the
// forward's row split (fwd_sm90/row_split.cuh); one CTA per layout runs split_plan.
//
// The cut: the average work per CTA slot, u = ceil(entries x work_mul / slots), at least min_len entries; a list
// longer than `over` cuts goes into ceil(len / cut) pieces of near-equal length. If that needs more partial slots
// than there are (E), the cut doubles (up to 2^7 u); past that nothing is split.
//
// The tables (int4 each): items[NS] in CTA order, (list, first entry, end entry, partial slot or -1), the pieces of
// the split lists first (their lists in walk order: they start early, so none is left for the tail), then the other
// lists in walk order, then empty slots (-1, 0, 0, -1); heads[E], per partial slot (list, its list's first partial
// slot, the list's piece count, 0), unused ones (-1, 0, 0, 0).
#pragma once

#include <climits>
#include <cstdint>

namespace bsattn {
namespace cuda {

constexpr int kSplitPlanThreads = 256;
constexpr int kSplitCuts = 8;  // cut candidates: u, 2 u, .., 2^7 u

// Block-wide exclusive scan of 64-bit values (kSplitPlanThreads threads); *total: the sum. sScan: 8 words + 1.
__device__ __forceinline__ unsigned long long split_block_scan(unsigned long long x, unsigned long long* sScan,
                                                               unsigned long long* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned long long inc = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += y;
  }
  if (lane == 31) sScan[warp] = inc;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long run = 0;
    for (int w = 0; w < kSplitPlanThreads / 32; ++w) {
      const unsigned long long t = sScan[w];
      sScan[w] = run;
      run += t;
    }
    sScan[kSplitPlanThreads / 32] = run;
  }
  __syncthreads();
  const unsigned long long ex = sScan[warp] + inc - x;
  *total = sScan[kSplitPlanThreads / 32];
  __syncthreads();  // (sScan reused by the next call)
  return ex;
}

// A list of the walk: its id, first entry and length (entries clamped into the layout; len 0 for an id out of range).
struct SplitList {
  int id;
  int64_t start;
  int len;
};

// Writes the NS items and E partial slots of one layout (all kSplitPlanThreads threads of the CTA). n lists in walk
// order, list_at(i) -> SplitList (called several times per list); n <= NS - E. work_mul: the work of an entry in CTA
// units (heads in flight x tiles per list); slots: CTAs in flight; min_len: the shortest cut; over >= 1: a list is cut
// where longer than `over` cuts.
template <class ListAt>
__device__ void split_plan(int n, ListAt list_at, int4* items, int NS, int4* heads, int E, int64_t work_mul,
                           int64_t slots, int min_len, int over) {
  __shared__ unsigned long long sScan[kSplitPlanThreads / 32 + 1];
  __shared__ unsigned long long sCount[kSplitCuts];
  __shared__ int sCut, sPieces;
  const int tid = threadIdx.x;
  if (tid < kSplitCuts) sCount[tid] = 0;
  __syncthreads();

  // the layout's entries (every list once: the order is a permutation; a garbage one only misjudges the cut)
  unsigned long long mine = 0;
  for (int i = tid; i < n; i += kSplitPlanThreads) mine += static_cast<unsigned long long>(list_at(i).len);
  unsigned long long entries;
  (void)split_block_scan(mine, sScan, &entries);
  // (saturated: a garbage layout may claim up to n x nnz entries)
  const int64_t lim = INT_MAX;
  const int64_t ent = entries > static_cast<unsigned long long>(lim) ? lim : static_cast<int64_t>(entries);
  const int64_t wm = work_mul < 1 ? 1 : (work_mul > lim ? lim : work_mul), sl = slots < 1 ? 1 : slots;
  const int64_t avg = (ent * wm + sl - 1) / sl;  // < 2^62
  const int64_t base = avg > min_len ? (avg < lim ? avg : lim) : (min_len > 1 ? min_len : 1);
  over = over < 1 ? 1 : over;

  // the partial slots each candidate cut needs
  for (int i = tid; i < n; i += kSplitPlanThreads) {
    const int64_t len = list_at(i).len;
#pragma unroll
    for (int k = 0; k < kSplitCuts; ++k) {
      const int64_t cut = base << k;
      if (len > cut * over) atomicAdd(&sCount[k], static_cast<unsigned long long>((len + cut - 1) / cut));
    }
  }
  __syncthreads();
  if (tid == 0) {
    int cut = INT_MAX, pieces = 0;
    for (int k = kSplitCuts - 1; k >= 0; --k)  // (base < 2^31: base << k stays positive)
      if (sCount[k] <= static_cast<unsigned long long>(E) && (base << k) < INT_MAX) {
        cut = static_cast<int>(base << k);
        pieces = static_cast<int>(sCount[k]);
      }
    sCut = cut;
    sPieces = pieces;
  }
  __syncthreads();
  const int cut = sCut, S = sPieces;  // S: the split lists' pieces, slots [0, S)

  // the split lists' pieces in slots [0, S) (partial slot = slot), the other lists from S on, both in walk order
  unsigned long long slot_base = 0;  // (split pieces << 32) | whole lists, before this chunk
  for (int i0 = 0; i0 < n; i0 += kSplitPlanThreads) {
    const int i = i0 + tid;
    SplitList l{-1, 0, 0};
    int pieces = 0;
    if (i < n) {
      l = list_at(i);
      pieces = l.len > static_cast<int64_t>(cut) * over ? static_cast<int>((static_cast<int64_t>(l.len) + cut - 1) / cut) : 1;
    }
    const bool split = pieces > 1;
    const unsigned long long x = split ? static_cast<unsigned long long>(pieces) << 32 : (i < n ? 1ull : 0ull);
    unsigned long long chunk;
    const unsigned long long ex = slot_base + split_block_scan(x, sScan, &chunk);
    slot_base += chunk;
    const int q0 = static_cast<int>(ex >> 32), w0 = static_cast<int>(ex & 0xffffffffu);
    if (split) {
      for (int j = 0; j < pieces && q0 + j < S && q0 + j < E; ++j) {  // (always: the pieces fit E)
        const int64_t a = l.start + static_cast<int64_t>(j) * l.len / pieces;
        const int64_t b = l.start + static_cast<int64_t>(j + 1) * l.len / pieces;
        items[q0 + j] = make_int4(l.id, static_cast<int>(a), static_cast<int>(b), q0 + j);
        heads[q0 + j] = make_int4(l.id, q0, pieces, 0);
      }
    } else if (i < n && S + w0 < NS) {
      items[S + w0] = make_int4(l.id, static_cast<int>(l.start), static_cast<int>(l.start + l.len), -1);
    }
  }
  const int used = S + static_cast<int>(slot_base & 0xffffffffu);
  for (int s = used + tid; s < NS; s += kSplitPlanThreads) items[s] = make_int4(-1, 0, 0, -1);
  for (int q = S + tid; q < E; q += kSplitPlanThreads) heads[q] = make_int4(-1, 0, 0, 0);
}

}  // namespace cuda
}  // namespace bsattn
