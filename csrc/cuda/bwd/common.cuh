// Device building blocks shared by the two backward kernels: the shared-memory swizzle, the thread layout of
// a gathered tile, the "owner lane" walk along a virtual row sequence, and the scalar part of the backward
// (p and ds from the recomputed scores).
//
// Shared-memory tiles hold rows of D b16 values as 16-byte chunks, chunk c of row r at position c ^ (r & 7):
// cp.async writes and the ldmatrix reads of 8 rows x one chunk column are then free of bank conflicts.
#pragma once

#include <climits>
#include <cstdint>

#include "cuda/bwd/params.h"
#include "cuda/common/gather.cuh"
#include "cuda/fwd/mma.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

constexpr float kLog2e = 1.4426950408889634f;

// 4 bytes global -> shared (cp.async needs .ca for sizes under 16).
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void st_shared_f32(uint32_t dst, float v) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(dst), "f"(v) : "memory");
}

// The softmax statistics of one staged query row (lse, delta of row `rid` of lseg / dlg) -> shared slot srow
// of sLse / sDl; a missing row (rid < 0) gets lse = -inf (probability 0) and delta = 0.
__device__ __forceinline__ void stage_row_stats(uint32_t sLse, uint32_t sDl, int srow, const float* lseg,
                                                const float* dlg, int rid) {
  if (rid >= 0) {
    cp_async4(sLse + srow * 4, lseg + rid);
    cp_async4(sDl + srow * 4, dlg + rid);
  } else {
    st_shared_f32(sLse + srow * 4, -INFINITY);
    st_shared_f32(sDl + srow * 4, 0.f);
  }
}

// A contiguous tile of ROWS rows of two tensors (K and V: row r at r * rstride of ga / gb) -> the swizzled
// buffers sA / sB (Layout: common/gather.cuh), copied by NT threads (chunk i % CPR of row i / CPR); rows at or past `valid` are zeroed.
template <int D, int NT, int ROWS, class Layout = RowSwizzle<D>, typename T>
__device__ __forceinline__ void load_row_pair_tile(uint32_t sA, uint32_t sB, const T* ga, const T* gb, int valid,
                                                   int64_t rstride, int tid) {
  constexpr int CPR = D / 8;
#pragma unroll
  for (int i = tid; i < ROWS * CPR; i += NT) {
    const int row = i / CPR, ch = i % CPR;
    const uint32_t so = Layout::off(row, ch);
    if (row < valid) {
      const int64_t go = row * rstride + ch * 8;
      cp_async16(sA + so, ga + go);
      cp_async16(sB + so, gb + go);
    } else {
      st_shared_zero16(sA + so);
      st_shared_zero16(sB + so);
    }
  }
}

// The merge of row-split warps' f32 partials: 8 consecutive columns summed over NW warps in warp order
// (deterministic; warp w's partials at src + w * wstride), times mul, packed to 8 T.
template <typename T, int NW>
__device__ __forceinline__ uint4 sum_partials8(const float* src, int wstride, float mul) {
  float a8[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) a8[e] = 0.f;
#pragma unroll
  for (int w = 0; w < NW; ++w) {
    const float4* s4 = reinterpret_cast<const float4*>(src + w * wstride);
    const float4 x = s4[0], y = s4[1];
    a8[0] += x.x, a8[1] += x.y, a8[2] += x.z, a8[3] += x.w;
    a8[4] += y.x, a8[5] += y.y, a8[6] += y.z, a8[7] += y.w;
  }
  uint4 val;
  val.x = Mma<T>::pack(a8[0] * mul, a8[1] * mul);
  val.y = Mma<T>::pack(a8[2] * mul, a8[3] * mul);
  val.z = Mma<T>::pack(a8[4] * mul, a8[5] * mul);
  val.w = Mma<T>::pack(a8[6] * mul, a8[7] * mul);
  return val;
}

// Thread layout of a tile of ROWS gathered rows copied by NT threads: thread (warp, lane) copies 16-byte
// chunk lane % CPR of rows ps * RPP + warp * RPW + lane / CPR (pass ps). The global row of each tile row is
// resolved once, by the "owner" lane ps * RPW + lane / CPR of the warp that copies it, and broadcast with a
// shuffle: lane o < OWN owns tile row owner_row(warp, o).
template <int D, int NT, int ROWS>
struct TileMap {
  static constexpr int CPR = D / 8;
  static constexpr int RPP = NT / CPR;
  static constexpr int PASSES = ROWS / RPP;
  static constexpr int RPW = 32 / CPR;
  static constexpr int OWN = PASSES * RPW;
  static_assert(CPR <= 32 && NT % CPR == 0 && ROWS % RPP == 0 && PASSES >= 1, "gather layout");
  static_assert(OWN <= 32, "one owner lane per row");
  static __device__ __forceinline__ int owner_row(int warp, int lane) {
    return (lane / RPW) * RPP + warp * RPW + lane % RPW;
  }
};

// An owner lane's position in a virtual row sequence: the entries of a list (block indices of a row, or
// block rows of a column) one after another, each standing for E consecutive rows. Virtual position t is
// list entry t / E, row t % E of it. Each tile advances by ROWS positions = q whole entries + r rows.
// Four registers; the next entry is prefetched one tile ahead so that no load latency sits in front of the
// copies.
struct SeqWalk {
  const int32_t* ip;  // list entry of the owned row in the next tile
  int rem;            // entries left from ip to the end of the list
  int off;            // row within the entry
  int nxt;            // *ip (valid when rem > 0)

  __device__ __forceinline__ void init(const int32_t* list, int len, int trow, int E, bool owner) {
    const int ent = trow / E;
    off = trow - ent * E;
    ip = list + ent;
    rem = len - ent;
    nxt = (owner && rem > 0) ? __ldg(ip) : 0;
  }
  __device__ __forceinline__ bool live(bool owner) const { return owner && rem > 0; }
  __device__ __forceinline__ void advance(int q, int r, int E, bool owner) {
    ip += q;
    rem -= q;
    off += r;
    if (off >= E) {
      off -= E;
      ++ip;
      --rem;
    }
    nxt = (owner && rem > 0) ? __ldg(ip) : 0;
  }
};

// The layout of (batch b, KV head hk): per-batch / per-head layouts, or the one shared along a broadcast dimension.
__device__ __forceinline__ int64_t layout_index(const Params& p, int b, int hk) { return p.layout_index(b, hk); }

// Which tile a CTA of the column-oriented kernels (dk / dv, the Hopper backward) holds: key tile kc of the slot-th
// longest block column (col_order) of (batch b, KV head hk). The B * Hk heads are cut into p.head_chunks chunks of
// balanced sizes, run one after the other (so that the CTAs running at one time share the q, do and dq rows of a few
// heads, which stay in L2); inside a chunk, slot-major (the chunk's longest columns first, over all its heads, so
// that its last wave holds the shortest). Head-major order, with each head's longest columns first, left a tail of
// long columns after the other heads' short ones (a sawtooth): 16 % of the ideal time at g = 4, 128 x 128.
struct ColumnTile {
  int kc, slot, b, hk;
  int64_t lid;  // the tile's layout: (b, hk) for per-batch / per-head layouts
};

__device__ __forceinline__ ColumnTile column_tile(const Params& p, int bid) {
  const int H = p.B * p.Hk, n = p.head_chunks > 0 && p.head_chunks <= H ? p.head_chunks : 1;
  const int w = (p.split_items != nullptr ? p.split_slots : p.NB) * p.nkc;  // CTAs per head
  const int q = H / n, r = H % n;  // the first r chunks hold q + 1 heads, the others q
  const int big = r * (q + 1) * w;  // CTAs of the first r chunks
  int chunk, h0, hh;
  if (bid < big) {
    chunk = bid / ((q + 1) * w);
    h0 = chunk * (q + 1);
    hh = q + 1;
  } else {
    chunk = (bid - big) / (q * w);
    h0 = r * (q + 1) + chunk * q;
    hh = q;
  }
  const int within = bid - h0 * w;
  ColumnTile t;
  t.kc = within % p.nkc;
  const int rest = within / p.nkc;
  t.slot = rest / hh;
  const int head = h0 + rest % hh;
  t.b = head / p.Hk;
  t.hk = head - t.b * p.Hk;
  t.lid = layout_index(p, t.b, t.hk);
  return t;
}

// At most this many of a column's entries are taken into one window of the small-block kernels' merged walks (a
// valid layout has one per block row, times its multiplicity): their sums over a CTA's columns then stay far from
// int overflow whatever a hand-made column view holds. Entries past it (only a block listed more than 2^24 times)
// are skipped.
constexpr int kMaxWindowEntries = 1 << 24;

// The small-block kernels' next window of W block rows (whole warp): the first W-aligned one after win0 that holds the
// smallest next block row of the CTA's columns (nx: this lane's candidate, INT_MAX if none). INT_MAX when there is
// none before MB: done (entries may be left, at block rows >= MB or in an unsorted hand-made column view).
__device__ __forceinline__ int next_window(int nx, int win0, int W, int MB) {
  nx = __reduce_min_sync(0xffffffffu, nx);
  const int w0 = nx >= MB ? INT_MAX : max(win0 + W, (nx / W) * W);
  return w0 >= MB ? INT_MAX : w0;
}

// The first index in [lo, hi) of an increasing list whose entry is >= value (hi if none): binary search.
__device__ __forceinline__ int first_at_least(const int32_t* list, int lo, int hi, int value) {
  while (lo < hi) {
    const int mid = lo + ((hi - lo) >> 1);
    if (__ldg(list + mid) < value)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// The small-block kernels' window list (bwd/dkdv_kernel.cuh pack kernel, bwd_sm90/pack_kernel.cuh): the W words
// of a window's block rows (nonzero: some column lists the row) compacted in place, in block-row order, with each
// kept row's offset in the window in lbr; returns how many were kept. Whole CTA of NT threads (NWARPS warps, W a
// multiple of NT); sScan: NWARPS ints of shared scratch. Ends with a barrier.
template <int W, int NT, int NWARPS>
__device__ __forceinline__ int compact_listed_rows(unsigned long long* words, uint16_t* lbr, int* sScan, int tid,
                                                   int lane, int warp) {
  int len = 0;
  for (int base = 0; base < W; base += NT) {
    const int i = base + tid;
    const unsigned long long v = words[i];
    const unsigned bal = __ballot_sync(0xffffffffu, v != 0ull);
    if (lane == 0) sScan[warp] = __popc(bal);
    __syncthreads();
    int woff = 0, tot = 0;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) {
      const int cw = sScan[w];
      woff += w < warp ? cw : 0;
      tot += cw;
    }
    if (v != 0ull) {
      const int at = len + woff + __popc(bal & ((1u << lane) - 1u));  // <= i: never an unread entry
      words[at] = v;
      lbr[at] = static_cast<uint16_t>(i);
    }
    len += tot;
    __syncthreads();
  }
  return len;
}

// Packed row `off` of block row `br` (query row r = off / g of the block row, head hq0 + off % g) -> rid, its row of q
// in units of D within the batch (q_row * Hq + head), and lim, its causal limit qi + shift (shift: the batch element's
// p.causal_shift; set only when causal). False, both left alone, when the query row is past M.
__device__ __forceinline__ bool packed_query_row(const Params& p, int br, int off, int hq0, int shift, int& rid,
                                                 int& lim) {
  const int r = off / p.g;
  const int qi = br * p.R + r;
  if (qi >= p.M) return false;
  rid = qi * p.Hq + hq0 + (off - r * p.g);
  if (p.causal) lim = qi + shift;
  return true;
}

// An owner lane's place in a window list walked as packed query rows (the small-block kernels): packed row off of
// entry ent, E rows per entry; each tile of BQ rows moves on qE = BQ / E entries and rE = BQ % E rows.
struct WindowRowCursor {
  int ent, off;
  __device__ __forceinline__ void init(int trow, int E) {
    ent = trow / E;
    off = trow - ent * E;
  }
  // Its row's rid and causal limit (packed_query_row); false for a row past the list's len entries or past M.
  __device__ __forceinline__ bool query_row(const Params& p, int len, int win0, const uint16_t* lbr, int hq0, int shift,
                                            int& rid, int& lim) const {
    return ent < len && packed_query_row(p, win0 + lbr[ent], off, hq0, shift, rid, lim);
  }
  __device__ __forceinline__ void advance(int qE, int rE, int E) {
    ent += qE;
    off += rE;
    if (off >= E) {
      off -= E;
      ++ent;
    }
  }
};

// The keys of a tile k0 .. k0 + nkeys - 1 of batch element b that take part: those below its key count (kv_lens),
// nkeys without them; <= 0 for a tile wholly past it. The kernels load only these (K, V rows past them are zeros),
// mask the rest like padding keys (p = ds = 0) and still write the tile's nkeys rows of dk, dv: zeros past nlive.
__device__ __forceinline__ int live_keys(const Params& p, int b, int k0, int nkeys) {
  return p.kv_lens == nullptr ? nkeys : min(nkeys, p.key_count(b) - k0);
}

// Which keys a CTA of the small-block kernels (packed, compact) holds: P = p.pack consecutive block columns c0 .. c0 +
// Pv - 1 of (batch b, KV head hk), groups head-major; their keys k0 .. k0 + nkeys - 1 (nkeys >= 1: c0 < NB), of which
// k0 .. k0 + nlive - 1 take part (live_keys), and the tensor offsets.
struct ColumnGroup {
  int b, hk, c0, Pv, k0, nkeys, nlive;
  int64_t lid;                       // the group's layout: (b, hk) for per-batch / per-head layouts
  int64_t kvoff, kv_rstride, qboff;  // (b, key 0, hk) in k / v, their row stride; (b, row 0, head 0) in rows
};

template <int D>
__device__ __forceinline__ ColumnGroup column_group(const Params& p, int bid) {
  const int ng = (p.NB + p.pack - 1) / p.pack;
  const int cg = bid % ng, head = bid / ng;
  ColumnGroup w;
  w.b = head / p.Hk;
  w.hk = head - w.b * p.Hk;
  w.c0 = cg * p.pack;
  w.Pv = min(p.pack, p.NB - w.c0);
  w.k0 = w.c0 * p.C;
  w.nkeys = min(w.Pv * p.C, p.N - w.k0);
  w.nlive = live_keys(p, w.b, w.k0, w.nkeys);
  w.lid = layout_index(p, w.b, w.hk);
  w.kvoff = (static_cast<int64_t>(w.b) * p.N * p.Hk + w.hk) * D;
  w.kv_rstride = static_cast<int64_t>(p.Hk) * D;
  w.qboff = static_cast<int64_t>(w.b) * p.M * p.Hq;
  return w;
}

// The entries [cs, ce) of col_rows (layout lid) that list the block rows of block column c, clamped to [0, nnz] and
// non-decreasing whatever col_indptr holds (memory safety for traced layouts).
__device__ __forceinline__ void column_entries(const Params& p, int64_t lid, int c, int64_t& cs, int64_t& ce) {
  const int32_t* ci = p.col_indptr + lid * (p.NB + 1);
  cs = __ldg(ci + c);
  ce = __ldg(ci + c + 1);
  cs = cs < 0 ? 0 : (cs > p.nnz ? p.nnz : cs);
  ce = ce < cs ? cs : (ce > p.nnz ? p.nnz : ce);
}

// Everything a column kernel's CTA needs to know about its tile `item` (column_tile, then the block column, its keys,
// its row list and the tile count over BQ-row tiles, the tensor offsets). False: nothing to do (uniform; the caller
// returns): a slot past the order's permutation or a key tile past the end of a short last column.
struct ColumnWork {
  int kc, b, hk, c;
  int part;  // the column split's partial slot of this piece (-1: the whole column; bwd/column_split.cuh)
  int64_t lid;
  int k0, nkeys;   // the tile's first key and its number of keys (of which live_keys take part: len = 0 if none)
  int64_t cs, ce;  // the column's entries of col_rows
  int RG, len, ntiles;  // packed rows per block row (0 when Hq = 0), block rows, BQ-row tiles
  int64_t kvoff, kv_rstride, qboff;  // (b, key 0, hk) in k / v, their row stride; (b, row 0, head 0) in rows
};

// SWEEP (the sweep form of the Hopper backward, p.C = BK): column c is keys c BK .., in order, and its row list is
// every block row (p.col_rows = 0 .. MB - 1, with p.nnz = 0 so that every layout shares it), from the first whose
// last query row's causal limit reaches k0 (causal: the rows above see none of the keys).
template <int D, int BK, int BQ, bool SWEEP = false>
__device__ __forceinline__ bool column_work(const Params& p, ColumnWork& w, int item) {
  const ColumnTile ct = column_tile(p, item);
  w.kc = ct.kc;
  w.b = ct.b;
  w.hk = ct.hk;
  w.lid = ct.lid;
  w.part = -1;
  const int32_t* piece = nullptr;  // the column split's item (a piece of a block column's entries)
  if (!SWEEP && p.split_items != nullptr) {
    piece = p.split_items + (w.lid * p.split_slots + ct.slot) * 4;
    w.c = __ldg(piece);
  } else {
    w.c = SWEEP ? ct.slot : __ldg(p.col_order + w.lid * p.NB + ct.slot);
  }
  if (w.c < 0 || w.c >= p.NB) return false;  // (the order is a permutation of the block columns)
  w.k0 = w.c * p.C + w.kc * BK;
  w.nkeys = min(min(BK, p.C - w.kc * BK), p.N - w.k0);
  if (w.nkeys <= 0) return false;
  if constexpr (SWEEP) {
    w.cs = 0;
    if (p.causal) {  // query row qi sees key k0 when qi >= k0 - shift: block rows from (k0 - shift - (R - 1)) / R
      const int64_t first = static_cast<int64_t>(w.k0) - p.causal_shift(w.b) - (p.R - 1);
      w.cs = first <= 0 ? 0 : (first / p.R > p.MB ? p.MB : first / p.R);
    }
    w.ce = p.MB;
  } else if (piece != nullptr) {
    w.cs = min(max(static_cast<int64_t>(__ldg(piece + 1)), int64_t{0}), p.nnz);
    w.ce = min(max(static_cast<int64_t>(__ldg(piece + 2)), w.cs), p.nnz);
    const int part = __ldg(piece + 3);
    w.part = part >= 0 && part < p.split_parts ? part : -1;
  } else {
    column_entries(p, w.lid, w.c, w.cs, w.ce);
  }
  w.RG = p.R * p.g;
  // (a tile wholly past the batch element's key count walks no rows: dk = dv = 0)
  w.len = w.RG > 0 && live_keys(p, w.b, w.k0, w.nkeys) > 0 ? static_cast<int>(w.ce - w.cs) : 0;
  const int E = w.RG > 0 ? w.RG : 1;
  const int64_t nt64 = (static_cast<int64_t>(w.len) * E + BQ - 1) / BQ;
  w.ntiles = nt64 > INT_MAX ? INT_MAX : static_cast<int>(nt64);
  w.kvoff = (static_cast<int64_t>(w.b) * p.N * p.Hk + w.hk) * D;
  w.kv_rstride = static_cast<int64_t>(p.Hk) * D;
  w.qboff = static_cast<int64_t>(w.b) * p.M * p.Hq;
  return true;
}

// The query side of a column-oriented kernel (dk / dv, and the Hopper backward): the column's block rows
// (col_rows[cs:ce]) walked as a virtual sequence of packed query rows, E = R * g per block row (query row r, head
// j of the KV head's group), gathered tile by tile: q and do (copy_row_pair_tile, Map = the tile's TileMap,
// Layout its shared-memory layout), raw lse and delta, the row's causal limit, and (with a non-null sRid) its
// global row q_row * Hq + head, -1 for a missing row. The owner lanes hold the walk (SeqWalk).
template <int D, int BQ, class Map, class Layout, typename T>
struct ColumnQueryGather {
  SeqWalk qw;
  const T* qg;
  const T* dg;
  const float* lseg;
  const float* dlg;
  int hq0, E, qE, rE, klast, trow_own, shift;
  bool owner;

  // len: block rows of the column (list at `rows`), klast: the tile's last key (a row whose causal limit is below
  // it needs the mask), qboff: (b, row 0, head 0) in units of rows of D.
  __device__ __forceinline__ void init(const Params& p, const int32_t* rows, int len, int b, int hk, int klast_,
                                       int64_t qboff, int warp, int lane) {
    shift = p.causal_shift(b);
    const int RG = p.R * p.g;
    E = RG > 0 ? RG : 1;
    qE = BQ / E;
    rE = BQ - qE * E;
    owner = lane < Map::OWN;
    trow_own = Map::owner_row(warp, lane);
    klast = klast_;
    qw.init(rows, len, trow_own, E, owner);
    qg = static_cast<const T*>(p.q) + qboff * D;
    dg = static_cast<const T*>(p.dout) + qboff * D;
    lseg = p.lse + qboff;
    dlg = p.delta + qboff;
    hq0 = hk * p.g;
  }

  // Issues the copies of the next tile into `stage` (sQs / sDs: that stage's q / do buffers); returns 1 when this
  // thread saw a row that needs the causal mask. WORDS (the sweep): also stages words wb, wb + 1 of the row's block
  // row in the bit map (bits: the layout's, nbw words a block row) at sWord[2 srow], 0 for a missing row.
  template <bool WORDS = false>
  __device__ __forceinline__ uint32_t issue(const Params& p, uint32_t sQs, uint32_t sDs, uint32_t sLse,
                                            uint32_t sDl, int* sLim, int* sRid, int stage, int warp, int lane,
                                            const unsigned long long* bits = nullptr, int nbw = 0, int wb = 0,
                                            unsigned long long* sWord = nullptr) {
    int rid = -1;  // row of q in units of D within batch b: qi * Hq + h
    uint32_t flag = 0;
    if (owner) {
      int lim = INT_MAX;
      int brow = -1;
      if (qw.live(owner)) {
        brow = qw.nxt;
        if (brow >= 0 && brow < p.MB) packed_query_row(p, brow, qw.off, hq0, shift, rid, lim);
      }
      const int srow = stage * BQ + trow_own;
      stage_row_stats(sLse, sDl, srow, lseg, dlg, rid);
      sLim[srow] = lim;
      if (sRid != nullptr) sRid[srow] = rid;
      flag = (rid >= 0 && lim < klast) ? 1u : 0u;
      if constexpr (WORDS) {
        unsigned long long w0 = 0ull, w1 = 0ull;
        if (rid >= 0) {
          const unsigned long long* src = bits + static_cast<int64_t>(brow) * nbw + wb;
          w0 = __ldg(src);
          if (wb + 1 < nbw) w1 = __ldg(src + 1);
        }
        sWord[2 * srow] = w0;
        sWord[2 * srow + 1] = w1;
      }
    }
    qw.advance(qE, rE, E, owner);
    copy_row_pair_tile<D, Map::PASSES, Map::RPP, Map::RPW, false, Layout>(sQs, sDs, qg, dg, rid, D, warp, lane,
                                                                          [](int rp) { return rp >= 0; });
    return flag;
  }
};

// Per-row statistics as the kernels use them: lse2 = log2(e) * lse, +inf for a row that must contribute
// nothing (lse = -inf, or padding): then p = exp2(s2 - lse2) = 0 exactly, and delta is forced to 0 so that
// ds = p * (dp - delta) stays 0 whatever delta holds. A NaN lse (a NaN score took part in the forward) is not
// dead: its p, hence its gradients, are NaN, as the reference's.
__device__ __forceinline__ void row_stats(float lse, float delta, float& lse2, float& dl) {
  const bool dead = lse == -INFINITY;
  lse2 = dead ? INFINITY : lse * kLog2e;
  dl = dead ? 0.f : delta;
}

// p and the factor ds / (p * (dp - delta)) of one score. raw = q . k (f32); no cap: p = exp2(raw * s_mul -
// lse2); cap: t = tanh(scale * raw / cap), p = exp2(cap_mul * t - lse2), factor 1 - t^2 (the soft cap's chain
// rule). The caller multiplies.
__device__ __forceinline__ float prob_nocap(float raw, float s_mul, float lse2) {
  return fast_exp2(fmaf(raw, s_mul, -lse2));
}
__device__ __forceinline__ float prob_cap(float raw, float s_mul, float cap_mul, float lse2, float& fac) {
  const float t = tanh_from_2log2e_x(raw * s_mul);
  fac = fmaf(-t, t, 1.f);
  return fast_exp2(fmaf(t, cap_mul, -lse2));
}

// p and ds (in place of dp) of the row-oriented dq kernels' accumulators (bwd/dq_kernel.cuh, bwd_sm90/dq_kernel.cuh):
// s[n][e] is the score of the thread's row h = e >> 1 (fragment row lane / 4 + 8 h: lse2[h], dl[h], causal limit
// lim[h]) and key kidx[8 n + (e & 1)] (kidx: the thread's first key column of the chunk, (lane % 4) * 2 in). need_mask:
// p = 0 for keys above the row's limit (causal, and the padding keys' INT_MAX). KEEP_P: p replaces s (the row-oriented
// backward, bwd_sm90/rows_kernel.cuh, needs p^T for dv).
template <int NT8, bool KEEP_P = false>
__device__ __forceinline__ void dq_probs_ds(float (&s)[NT8][4], float (&dp)[NT8][4], const int* kidx,
                                            bool need_mask, const float (&lse2)[2], const float (&dl)[2],
                                            const int (&lim)[2], float s_mul, float cap_mul, bool use_cap) {
#pragma unroll
  for (int n = 0; n < NT8; ++n) {
    int2 kk2 = make_int2(0, 0);
    if (need_mask) kk2 = *reinterpret_cast<const int2*>(kidx + n * 8);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e >> 1;
      float pv, fac = 1.f;
      if (use_cap)
        pv = prob_cap(s[n][e], s_mul, cap_mul, lse2[h], fac);
      else
        pv = prob_nocap(s[n][e], s_mul, lse2[h]);
      if (need_mask && ((e & 1) ? kk2.y : kk2.x) > lim[h]) pv = 0.f;
      float ds = pv * (dp[n][e] - dl[h]);
      if (use_cap) ds *= fac;
      dp[n][e] = ds;
      if (KEEP_P) s[n][e] = pv;
    }
  }
}

// dq = scale * acc of one warp's 16 rows (wrow0 ..; acc in the m16n8 accumulator layout, acc[d]: columns 8 d ..):
// staged as b16 in the warp's own rows of a RowSwizzle tile at sStage (no longer read by anyone), then written out
// 16 bytes a lane, all shared-memory reads before the (predicated) global stores; rows whose sRow entry is -1
// (padding) are skipped. sRow: (query row in the block row, head) per tile row; dqg: dq of the tile's first row.
template <typename T, int D>
__device__ __forceinline__ void store_dq_rows(const float (&acc)[D / 8][4], float scale, uint32_t sStage, int wrow0,
                                              const int2* sRow, T* dqg, int64_t q_rstride, int lane) {
  constexpr int CPR = D / 8;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = wrow0 + (lane >> 2) + 8 * h;
#pragma unroll
    for (int d = 0; d < D / 8; ++d)
      st_shared32(sStage + swz_off<D>(row, d) + (lane & 3) * 4,
                  Mma<T>::pack(acc[d][2 * h] * scale, acc[d][2 * h + 1] * scale));
  }
  __syncwarp();
  constexpr int ITERS = 16 * CPR / 32;
  uint4 val[ITERS];
  int2 rj[ITERS];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int i = lane + 32 * it, row = wrow0 + i / CPR;
    rj[it] = sRow[row];
    val[it] = ld_shared16(sStage + swz_off<D>(row, i % CPR));
  }
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int c = (lane + 32 * it) % CPR;
    if (rj[it].x >= 0) st_global16(dqg + rj[it].x * q_rstride + rj[it].y * D + c * 8, val[it]);
  }
}

// The keys of a thread's two accumulator rows (h = 0, 1: fragment rows lane / 4 and lane / 4 + 8) of a 16-row mma /
// wgmma fragment whose rows are keys k0 ..
__device__ __forceinline__ void fragment_row_keys(int k0, int lane, int (&key)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) key[h] = k0 + (lane >> 2) + 8 * h;
}

// How dkv_probs_ds weighs p by the (row, column) multiplicity when need_mask: not at all (every listed block once),
// by the 4-bit count at shift mul[h] of the row's count word in sW (the packed small-block kernel), by mul[h]
// itself, the multiplicity of the thread's key row h (the compact small-block kernel), or by bit mul[h] of word
// sW[sEnt[row]], the row's entry in a window list (the Hopper packed kernel, bwd_sm90/pack_kernel.cuh: one pass per
// occurrence, so 0 or 1).
enum DkvMul { kMulNone = 0, kMulCountWord = 1, kMulPerKey = 2, kMulEntryBit = 3 };

// p^T (in place of s) and ds^T (in place of dp) of the column-oriented kernels' score accumulators (dk / dv:
// bwd/dkdv_kernel.cuh, bwd/dkdv_compact_kernel.cuh, and the Hopper backward bwd_sm90/): s[n][e] is the score of key
// key[e >> 1] (the thread's two accumulator rows) and staged query row rb + 8 n + (e & 1), whose raw lse / delta are
// at that index of fLse / fDl. need_mask: multiply p by the (row, column) multiplicity (MUL, above) and zero it above
// the row's causal limit (sLim). DO_DK: also ds^T.
template <int NQ8, bool DO_DK, int MUL>
__device__ __forceinline__ void dkv_probs_ds(float (&s)[NQ8][4], float (&dp)[DO_DK ? NQ8 : 1][4], const float* fLse,
                                             const float* fDl, const int* sLim, const unsigned long long* sW, int rb,
                                             bool need_mask, const int (&key)[2], const int (&mul)[2], float s_mul,
                                             float cap_mul, bool use_cap, const int* sEnt = nullptr) {
#pragma unroll
  for (int n = 0; n < NQ8; ++n) {
    const float2 l2 = *reinterpret_cast<const float2*>(fLse + rb + n * 8);
    float lse2[2], dl[2];
    if constexpr (DO_DK) {
      const float2 d2 = *reinterpret_cast<const float2*>(fDl + rb + n * 8);
      row_stats(l2.x, d2.x, lse2[0], dl[0]);
      row_stats(l2.y, d2.y, lse2[1], dl[1]);
    } else {
      row_stats(l2.x, 0.f, lse2[0], dl[0]);
      row_stats(l2.y, 0.f, lse2[1], dl[1]);
    }
    int2 lim = make_int2(INT_MAX, INT_MAX);
    ulonglong2 w2 = make_ulonglong2(0ull, 0ull);
    if (need_mask) {
      lim = *reinterpret_cast<const int2*>(sLim + rb + n * 8);
      if constexpr (MUL == kMulCountWord) w2 = *reinterpret_cast<const ulonglong2*>(sW + rb + n * 8);
      if constexpr (MUL == kMulEntryBit) {
        const int2 en = *reinterpret_cast<const int2*>(sEnt + rb + n * 8);
        w2 = make_ulonglong2(sW[en.x], sW[en.y]);
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e >> 1, cc = e & 1;
      float pv, fac = 1.f;
      if (use_cap)
        pv = prob_cap(s[n][e], s_mul, cap_mul, lse2[cc], fac);
      else
        pv = prob_nocap(s[n][e], s_mul, lse2[cc]);
      if (need_mask) {
        if constexpr (MUL != kMulNone) {
          // a multiplicity of 0 selects 0, not 0 * p: an unlisted key's p can overflow to inf (its score is not in
          // the row's log-sum-exp), and inf * 0 is NaN
          const unsigned fmask = MUL == kMulEntryBit ? 1u : 15u;
          const int m = MUL == kMulPerKey ? mul[h] : static_cast<int>(((cc ? w2.y : w2.x) >> mul[h]) & fmask);
          pv = m != 0 ? pv * static_cast<float>(m) : 0.f;
        }
        if (key[h] > (cc ? lim.y : lim.x)) pv = 0.f;
      }
      s[n][e] = pv;
      if constexpr (DO_DK) {
        float ds = pv * (dp[n][e] - dl[cc]);
        if (use_cap) ds *= fac;
        dp[n][e] = ds;
      }
    }
  }
}

// An accumulator whose rows are the thread's two keys (element [n][e] of key key[e >> 1]: s^T, dp^T, dk, dv) zeroed
// at the keys at or past kend, by selects.
template <int N>
__device__ __forceinline__ void zero_rows_past(float (&acc)[N][4], const int (&key)[2], int kend) {
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (key[e >> 1] >= kend) acc[n][e] = 0.f;
}

// p^T and ds^T (as dkv_probs_ds leaves them) of the thread's key rows at or past kend zeroed: selects, not products
// (such a key's p = exp(-lse) may overflow). Keys past N (padding of a part-filled tile) or past the batch element's
// key count (kv_lens: their dk, dv rows are written, and must be 0). part (uniform): the tile has such keys.
template <int NQ8, bool DO_DK>
__device__ __forceinline__ void zero_keys_past(float (&s)[NQ8][4], float (&dp)[DO_DK ? NQ8 : 1][4],
                                               const int (&key)[2], int kend, bool part) {
  if (!part) return;
  zero_rows_past(s, key, kend);
  if constexpr (DO_DK) zero_rows_past(dp, key, kend);
}

// dk, dv of the thread's key rows past the batch element's key count (kv_lens) set to 0 before they are stored: their
// p and ds are 0, but 0 x an inf in q or do (a row that lists the block) would leave NaN there. cut (uniform): the
// tile holds such keys (live_keys < its keys).
template <int NK, int NV>
__device__ __forceinline__ void zero_dkdv_past(float (&adk)[NK][4], float (&adv)[NV][4], const int (&key)[2], int kend,
                                               bool cut) {
  if (!cut) return;
  zero_rows_past(adk, key, kend);
  zero_rows_past(adv, key, kend);
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
