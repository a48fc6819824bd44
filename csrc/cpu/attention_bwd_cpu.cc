// Backward block-sparse attention on the CPU, in two race-free passes:
//
//  1. dq: work item = (b, hk, block row r, chunk of its query rows), exactly the forward's
//     decomposition. Per listed block: S = Q K^T, P = exp(s - lse), dP = dO V^T,
//     dS = P (dP - delta) (times the soft-cap derivative), dQ += dS K.
//  2. dk / dv: work item = (b, hk, block column c), walking the block rows that list c (the
//     layout transposed on the host, transpose_layout) and gathering their query rows that see the
//     block into chunks of up to about kGatherPacked packed rows (gathered_chunking). Per chunk (all g
//     query heads): the same S, P, dP, dS, then dV += P^T dO and dK += dS^T Q.
//
// As in the forward, score-shaped tiles are kept transposed ([key][packed query row]): they are
// computed as K Q^T and V dO^T from Q^T / dO^T built once per row chunk, the per-row lse / delta
// are vectors across columns, and every product reads its operands without a transpose.
// Items of a few packed rows (ScoreLanes::kKeys, attention_cpu.h) keep the tiles untransposed
// ([packed row][key]) instead: S = Q K^T and dP = dO V^T as dot products.
// Every item owns its output rows and sums in a fixed order: deterministic for any thread count.
// Q is pre-multiplied by `scale`, which gives x = scale q.k directly and dk = scale sum dS q;
// dq is multiplied by `scale` when it is written.
#include <cmath>
#include <memory>
#include <vector>

#include "cpu/attention_cpu.h"
#include "cpu/parallel_for.h"
#include "cpu/score_mask_cpu.h"
#include "cpu/simd_cpu.h"
#include "cpu/tiles_cpu.h"

namespace bsattn::cpu {
namespace {

struct BwdScratch {
  RowChunking chunking;  // row_chunking (pass 1) or gathered_chunking (pass 2)
  int64_t Dp, Pp, Cp;
  AlignedFloats q, qt, d_o, dot;  // packed rows: q (scaled) and do, as [P][Dp] and (kRows) [D][Pp]
  AlignedFloats k, v;             // [C][Dp]
  AlignedFloats st, dpt, probt;   // scores, dP -> dS, probabilities: [C][Pp] (kRows) or [P][Cp] (kKeys)
  AlignedFloats acc0, acc1;       // dq [P][Dp] in pass 1; dk, dv [C][Dp] in pass 2
  AlignedFloats lse, delta;       // [Pp]
  std::vector<int32_t> lim;       // [Pp]
  std::vector<int64_t> gathered;  // pass 2: the query rows of the chunk being gathered

  BwdScratch(const Problem& p, const RowChunking& chunking_)
      : chunking(chunking_), Dp(pad16(p.D)), Pp(pad16(chunking.rows * p.group())), Cp(pad16(block_keys(p))) {
    const int64_t kc = block_keys(p);
    const int64_t rows = Pp > kc ? Pp : kc;
    q = AlignedFloats(Pp * Dp);
    qt = AlignedFloats(p.D * Pp);
    d_o = AlignedFloats(Pp * Dp);
    dot = AlignedFloats(p.D * Pp);
    k = AlignedFloats(kc * Dp);
    v = AlignedFloats(kc * Dp);
    st = AlignedFloats(Cp * Pp);
    dpt = AlignedFloats(Cp * Pp);
    probt = AlignedFloats(Cp * Pp);
    acc0 = AlignedFloats(rows * Dp);
    acc1 = AlignedFloats(rows * Dp);
    lse = AlignedFloats(Pp);
    delta = AlignedFloats(Pp);
    lim.resize(Pp);
    gathered.resize(chunking.rows);
  }

  // K and V rows of block column j0 (cn keys) of (b, hk): in k / v, or read where they lie (kv_rows).
  struct Kv {
    KvRows k, v;
  };
  Kv load_kv(const BwdArgs& a, int64_t b, int64_t hk, int64_t j0, int64_t cn) {
    return {kv_rows(a.dtype, a.k, a.p, b, hk, j0, cn, k.data(), Dp),
            kv_rows(a.dtype, a.v, a.p, b, hk, j0, cn, v.data(), Dp)};
  }

  // q, do (rows and transposed), lse, delta and key limits of the chunk's query rows of (b, hk);
  // returns the packed count P. A row whose lse is -inf saw nothing in the forward: its limit is
  // set to 0 so that it contributes nothing, and its lse and delta to 0 so that no -inf - -inf or
  // 0 * inf can turn that nothing into NaN.
  template <ScoreLanes kLanes>
  int64_t load_rows(const BwdArgs& a, int64_t b, int64_t hk, const ChunkRows& rows) {
    const Problem& p = a.p;
    int64_t P;
    if constexpr (kLanes == ScoreLanes::kKeys) {  // no transposes: the dot products read the rows
      load_packed_rows(a.dtype, a.q, p, b, hk, rows, p.scale, q.data(), Dp);
      P = load_packed_rows(a.dtype, a.d_o, p, b, hk, rows, 1.f, d_o.data(), Dp);
    } else {
      load_packed_both(a.dtype, a.q, p, b, hk, rows, p.scale, q.data(), Dp, qt.data(), Pp);
      P = load_packed_both(a.dtype, a.d_o, p, b, hk, rows, 1.f, d_o.data(), Dp, dot.data(), Pp);
    }
    load_packed_stats(a.lse, p, b, hk, rows, lse.data());
    load_packed_stats(a.delta, p, b, hk, rows, delta.data());
    packed_key_limits(p, rows, Pp, lim.data(), seq_keys(a, b));
    float *l = lse.data(), *d = delta.data();
    for (int64_t pr = 0; pr < Pp; ++pr) {
      if (pr >= P) l[pr] = d[pr] = 0.f;
      if (l[pr] == kNegInf) {
        l[pr] = d[pr] = 0.f;
        lim[pr] = 0;
      }
    }
    return P;
  }
};

// One block (cn keys from j0) of the loaded rows: on entry st holds x = scale q.k and dpt holds
// do.v; on exit dpt holds dx (the gradient w.r.t. x) and, when probt is given, probt holds p.
// Masked entries get 0.
template <class I>
BSATTN_AI void grad_block(const float* st, float* dpt, float* probt, int64_t cn, int64_t Pp,
                          int32_t j0, const int32_t* lim, const float* lse, const float* delta,
                          float cap) {
  using V = Simd<I>;
  using F = typename V::F;
  constexpr int W = I::W;
  const float inv_cap = cap > 0.f ? 1.f / cap : 0.f;
  for (int64_t c = 0; c < Pp; c += W) {
    const ColumnMask<I> mask(lim + c, j0, cn);
    const F lse_v = V::load(lse + c), delta_v = V::load(delta + c);
    for (int64_t jj = 0; jj < mask.hi; ++jj) {
      const int64_t at = jj * Pp + c;
      F x = V::load(st + at), t = F{};
      if (cap > 0.f) {
        t = V::tanh(x * inv_cap);
        x = cap * t;
      }
      const F pv = V::exp(mask.apply(x, jj) - lse_v);
      F ds = pv * (V::load(dpt + at) - delta_v);
      if (cap > 0.f) ds *= 1.f - t * t;
      V::store(dpt + at, ds);
      if (probt) V::store(probt + at, pv);
    }
    for (int64_t jj = mask.hi; jj < cn; ++jj) {
      V::store(dpt + jj * Pp + c, F{});
      if (probt) V::store(probt + jj * Pp + c, F{});
    }
  }
}

// grad_block for tiles with the keys across the lanes: st, dpt, probt [P][ld].
template <class I>
BSATTN_AI void grad_keys(const float* st, float* dpt, float* probt, int64_t P, int64_t ld, int64_t cn,
                         int32_t j0, const int32_t* lim, const float* lse, const float* delta, float cap) {
  using V = Simd<I>;
  using F = typename V::F;
  constexpr int W = I::W;
  const float inv_cap = cap > 0.f ? 1.f / cap : 0.f;
  for (int64_t pr = 0; pr < P; ++pr) {
    const int64_t hi = visible_keys(lim[pr], j0, cn);
    const F lse_v = V::splat(lse[pr]), delta_v = V::splat(delta[pr]);
    int64_t jj = 0;
    for (; jj < hi; jj += W) {
      const int64_t at = pr * ld + jj;
      F x = V::load(st + at), t = F{};
      if (cap > 0.f) {
        t = V::tanh(x * inv_cap);
        x = cap * t;
      }
      const F pv = V::first_lanes(V::exp(x - lse_v), hi - jj, F{});
      F ds = pv * (V::load(dpt + at) - delta_v);
      if (cap > 0.f) ds *= 1.f - t * t;
      V::store(dpt + at, V::first_lanes(ds, hi - jj, F{}));  // (0 x a stale inf past hi is NaN)
      if (probt) V::store(probt + at, pv);
    }
    for (; jj < cn; jj += W) {
      V::store(dpt + pr * ld + jj, F{});
      if (probt) V::store(probt + pr * ld + jj, F{});
    }
  }
}

// The scores' gradient dS (in sc.dpt, plus the probabilities in sc.probt when with_prob) of the P
// loaded rows against the block at key j0 (cn keys) in kv, laid out as kLanes says.
template <class I, ScoreLanes kLanes>
BSATTN_AI void score_grads(const BwdArgs& a, BwdScratch& sc, const BwdScratch::Kv& kv, int64_t P, int64_t j0,
                           int64_t cn, bool with_prob) {
  const int64_t D = a.p.D, Dp = sc.Dp, Pp = sc.Pp;
  float *st = sc.st.data(), *dpt = sc.dpt.data(), *probt = with_prob ? sc.probt.data() : nullptr;
  if constexpr (kLanes == ScoreLanes::kKeys) {
    dots<I>(P, cn, Dp, sc.q.data(), Dp, kv.k.data, kv.k.ld, st, sc.Cp);     // S = Q K^T
    dots<I>(P, cn, Dp, sc.d_o.data(), Dp, kv.v.data, kv.v.ld, dpt, sc.Cp);  // dP = dO V^T
    grad_keys<I>(st, dpt, probt, P, sc.Cp, cn, static_cast<int32_t>(j0), sc.lim.data(), sc.lse.data(),
                 sc.delta.data(), a.p.softcap);
  } else {
    gemm<I>(cn, Pp, D, kv.k.data, kv.k.ld, 1, sc.qt.data(), Pp, st, Pp, false);    // S^T = K Q^T
    gemm<I>(cn, Pp, D, kv.v.data, kv.v.ld, 1, sc.dot.data(), Pp, dpt, Pp, false);  // dP^T = V dO^T
    grad_block<I>(st, dpt, probt, cn, Pp, static_cast<int32_t>(j0), sc.lim.data(), sc.lse.data(),
                  sc.delta.data(), a.p.softcap);
  }
}

// Pass 1: dq of one chunk of query rows.
template <class I, ScoreLanes kLanes>
BSATTN_AI void dq_item(const BwdArgs& a, BwdScratch& sc, int64_t item) {
  const Problem& p = a.p;
  const RowItem it = row_item(p, sc.chunking, item);
  if (it.i1 <= it.i0) return;
  const int64_t Dp = sc.Dp;
  const TileStrides ts = tile_strides(kLanes, sc.Pp, sc.Cp);
  const ChunkRows rows = ChunkRows::run(it.i0, it.i1);
  const int64_t P = sc.load_rows<kLanes>(a, it.b, it.hk, rows);
  float* dq = sc.acc0.data();
  std::memset(dq, 0, P * Dp * sizeof(float));
  int64_t j0, cn;
  for (RowBlocks blocks(p, a.layout, it, seq_keys(a, it.b)); blocks.next(&j0, &cn);) {
    const BwdScratch::Kv kv = sc.load_kv(a, it.b, it.hk, j0, cn);
    score_grads<I, kLanes>(a, sc, kv, P, j0, cn, false);
    gemm<I>(P, Dp, cn, sc.dpt.data(), ts.row, ts.key, kv.k.data, kv.k.ld, dq, Dp, true);  // dQ += dS K
  }
  store_packed_rows(a.dtype, dq, Dp, p, it.b, it.hk, rows, p.scale, a.dq);
}

// Pass 2's products for the n query rows gathered in sc.gathered: dV += P^T dO and dK += dS^T Q for block column j0's
// `live` keys, whose K / V are read at the first chunk (into *kv, empty until then). (A function, not a lambda in
// dkdv_item: a lambda would not inherit the item function's target attribute, and the vector code inlined into it
// would be emulated: 20x slower.)
template <class I, ScoreLanes kLanes>
BSATTN_AI void dkdv_chunk(const BwdArgs& a, BwdScratch& sc, int64_t b, int64_t hk, int64_t j0, int64_t live, int64_t n,
                          BwdScratch::Kv* kv, float* dk, float* dv) {
  const int64_t Dp = sc.Dp;
  const TileStrides ts = tile_strides(kLanes, sc.Pp, sc.Cp);
  if (!kv->k.data) *kv = sc.load_kv(a, b, hk, j0, live);
  const int64_t P = sc.load_rows<kLanes>(a, b, hk, ChunkRows{0, sc.gathered.data(), n});
  score_grads<I, kLanes>(a, sc, *kv, P, j0, live, true);
  gemm<I>(live, Dp, P, sc.probt.data(), ts.key, ts.row, sc.d_o.data(), Dp, dv, Dp, true);  // dV += P^T dO
  gemm<I>(live, Dp, P, sc.dpt.data(), ts.key, ts.row, sc.q.data(), Dp, dk, Dp, true);      // dK += dS^T Q
}

// Pass 2: dk and dv of one block column of (b, hk).
template <class I, ScoreLanes kLanes>
BSATTN_AI void dkdv_item(const BwdArgs& a, const Columns& cols, BwdScratch& sc, int64_t item) {
  const Problem& p = a.p;
  const int64_t c = item % p.NB, hk = (item / p.NB) % p.Hk, b = item / (p.NB * p.Hk);
  const int64_t j0 = c * p.C, cn = p.C < p.N - j0 ? p.C : p.N - j0;
  const SeqKeys sk = seq_keys(a, b);
  // the block's keys that take part (kv_lens): only those are read; the rest of its dk, dv rows stay 0 (when none
  // does, key_limit below skips every row)
  const int64_t live = sk.nkeys - j0 < cn ? sk.nkeys - j0 : cn;
  const int64_t Dp = sc.Dp;
  float *dk = sc.acc0.data(), *dv = sc.acc1.data();
  std::memset(dk, 0, cn * Dp * sizeof(float));
  std::memset(dv, 0, cn * Dp * sizeof(float));

  const int64_t* start = cols.start.data() + p.layout_id(b, hk) * (p.NB + 1) + c;
  BwdScratch::Kv kv{};  // read when a row first sees the block
  int64_t n = 0;  // rows gathered in sc.gathered
  for (int64_t e = start[0]; e < start[1]; ++e) {  // (a row listed twice is gathered twice, as it counts twice)
    const int64_t r = cols.rows[e];
    const int64_t row_end = r * p.R + p.R < p.M ? r * p.R + p.R : p.M;
    for (int64_t i = r * p.R; i < row_end; ++i) {
      if (j0 >= key_limit(p, i, sk)) continue;  // causal or kv_lens: the row sees none of the block
      sc.gathered[n++] = i;
      if (n == sc.chunking.rows) {
        dkdv_chunk<I, kLanes>(a, sc, b, hk, j0, live, n, &kv, dk, dv);
        n = 0;
      }
    }
  }
  if (n > 0) dkdv_chunk<I, kLanes>(a, sc, b, hk, j0, live, n, &kv, dk, dv);
  store_kv_rows(a.dtype, dk, Dp, p, b, hk, j0, cn, a.dk);
  store_kv_rows(a.dtype, dv, Dp, p, b, hk, j0, cn, a.dv);
}

struct BwdFns {
  void (*dq)(const BwdArgs&, BwdScratch&, int64_t);
  void (*dkdv)(const BwdArgs&, const Columns&, BwdScratch&, int64_t);
};

#define BSATTN_BWD_FNS(TARGET, SUFFIX, ISA, LANES)                                             \
  TARGET void dq_item_##SUFFIX(const BwdArgs& a, BwdScratch& sc, int64_t item) {               \
    dq_item<ISA, LANES>(a, sc, item);                                                          \
  }                                                                                            \
  TARGET void dkdv_item_##SUFFIX(const BwdArgs& a, const Columns& cols, BwdScratch& sc,        \
                                 int64_t item) {                                               \
    dkdv_item<ISA, LANES>(a, cols, sc, item);                                                  \
  }

BSATTN_BWD_FNS(, rows_generic, IsaGeneric, ScoreLanes::kRows)
BSATTN_BWD_FNS(, keys_generic, IsaGeneric, ScoreLanes::kKeys)
#if BSATTN_X86
BSATTN_BWD_FNS(BSATTN_TARGET_AVX2, rows_avx2, IsaAvx2, ScoreLanes::kRows)
BSATTN_BWD_FNS(BSATTN_TARGET_AVX2, keys_avx2, IsaAvx2, ScoreLanes::kKeys)
BSATTN_BWD_FNS(BSATTN_TARGET_AVX512, rows_avx512, IsaAvx512, ScoreLanes::kRows)
BSATTN_BWD_FNS(BSATTN_TARGET_AVX512, keys_avx512, IsaAvx512, ScoreLanes::kKeys)
#endif
#undef BSATTN_BWD_FNS

// The item functions for this CPU's instruction set: pass 1's for its score lanes, pass 2's for its own (its chunks
// gather rows across block rows, so they may be wider).
BwdFns bwd_fns(ScoreLanes dq_lanes, ScoreLanes dkdv_lanes) {
  BwdFns rows, keys;
  switch (detect_isa()) {
#if BSATTN_X86
    case IsaKind::kAvx512:
      rows = {dq_item_rows_avx512, dkdv_item_rows_avx512};
      keys = {dq_item_keys_avx512, dkdv_item_keys_avx512};
      break;
    case IsaKind::kAvx2:
      rows = {dq_item_rows_avx2, dkdv_item_rows_avx2};
      keys = {dq_item_keys_avx2, dkdv_item_keys_avx2};
      break;
#endif
    default:
      rows = {dq_item_rows_generic, dkdv_item_rows_generic};
      keys = {dq_item_keys_generic, dkdv_item_keys_generic};
  }
  return {(dq_lanes == ScoreLanes::kKeys ? keys : rows).dq, (dkdv_lanes == ScoreLanes::kKeys ? keys : rows).dkdv};
}

}  // namespace

void attention_bwd_cpu(const BwdArgs& a) {
  const Problem& p = a.p;
  const RowChunking chunking = row_chunking(p), gathered = gathered_chunking(p);
  const int width = vector_width(detect_isa());
  const BwdFns fns = bwd_fns(score_lanes(p, chunking, width), score_lanes(p, gathered, width));
  const int64_t dq_items = p.B * p.Hk * p.MB * chunking.per_block;
  const int64_t dkdv_items = p.B * p.Hk * p.NB;
  if (dq_items <= 0 && dkdv_items <= 0) return;
  const double flops = 10.0 * estimated_pairs(p, a.layout) * static_cast<double>(p.D);
  const Columns cols = transpose_layout(p, a.layout);

  const int num_threads = choose_num_threads(dq_items > dkdv_items ? dq_items : dkdv_items, flops);
  std::vector<std::unique_ptr<BwdScratch>> scratch(num_threads);
  parallel_for(dq_items, num_threads, [&](int tid, int64_t item) {
    if (!scratch[tid]) scratch[tid] = std::make_unique<BwdScratch>(p, chunking);
    fns.dq(a, *scratch[tid], item);
  });
  for (auto& s : scratch) s.reset();  // pass 2's tiles are as wide as its chunks
  parallel_for(dkdv_items, num_threads, [&](int tid, int64_t item) {
    if (!scratch[tid]) scratch[tid] = std::make_unique<BwdScratch>(p, gathered);
    fns.dkdv(a, cols, *scratch[tid], item);
  });
}

}  // namespace bsattn::cpu
