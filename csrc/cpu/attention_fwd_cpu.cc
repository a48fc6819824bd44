// Forward block-sparse attention on the CPU.
//
// Work item = (b, hk, block row r, chunk of its query rows); the item's P packed rows (all g
// query heads of KV head hk, see tiles_cpu.h) share every K/V block load. The scores are kept
// transposed, one key per row and one packed query row per column: per listed block column,
// S^T = K Q^T (Q pre-multiplied by `scale`, Q^T built once per item), optional soft cap, an online
// softmax whose per-query statistics are plain vectors across the columns, then O += P V.
// No per-block transposes and no horizontal reductions. Items of a few packed rows (ScoreLanes::kKeys,
// attention_cpu.h) keep S = Q K^T untransposed instead, computed as dot products, with one horizontal
// reduction per score and per row statistic.
// Items write disjoint rows of o / lse, so any schedule gives the same bits.
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

struct FwdScratch {
  RowChunking chunking;
  int64_t Dp, Pp, Cp;
  AlignedFloats q, qt, k, v, st, o;  // [P][Dp] (kKeys), [D][Pp], [C][Dp], [C][Dp], the scores, [P][Dp]
  AlignedFloats m, l, alpha;         // per packed row: running max, running sum, last rescale
  std::vector<int32_t> lim;          // per packed row: keys j < lim are visible

  explicit FwdScratch(const Problem& p)
      : chunking(row_chunking(p)), Dp(pad16(p.D)), Pp(pad16(chunking.rows * p.group())), Cp(pad16(block_keys(p))) {
    const int64_t kc = block_keys(p);
    q = AlignedFloats(Pp * Dp);
    qt = AlignedFloats(p.D * Pp);
    k = AlignedFloats(kc * Dp);
    v = AlignedFloats(kc * Dp);
    st = AlignedFloats(Cp * Pp);  // [C][Pp] (kRows) or [P][Cp] (kKeys)
    o = AlignedFloats(Pp * Dp);
    m = AlignedFloats(Pp);
    l = AlignedFloats(Pp);
    alpha = AlignedFloats(Pp);
    lim.resize(Pp);
  }
};

// Folds one block (cn keys from j0) into the running statistics. st [cn][Pp] holds the raw scores
// on entry and exp(s - m_new) on exit (0 where masked: key j0 + jj >= lim of the column).
// alpha receives exp(m_old - m_new), the factor the output rows must be rescaled by.
template <class I>
BSATTN_AI void softmax_block(float* st, int64_t cn, int64_t Pp, int32_t j0, const int32_t* lim,
                             float cap, float* m, float* l, float* alpha) {
  using V = Simd<I>;
  using F = typename V::F;
  constexpr int W = I::W;
  const F neg_inf = V::splat(kNegInf);
  const float inv_cap = cap > 0.f ? 1.f / cap : 0.f;
  for (int64_t c = 0; c < Pp; c += W) {
    const ColumnMask<I> mask(lim + c, j0, cn);
    float* col = st + c;
    F mx = neg_inf;
    for (int64_t jj = 0; jj < mask.hi; ++jj) {
      F x = V::load(col + jj * Pp);
      if (cap > 0.f) {
        x = cap * V::tanh(x * inv_cap);
        V::store(col + jj * Pp, x);
      }
      mx = V::max(mx, mask.apply(x, jj));
    }
    const F m_old = V::load(m + c);
    const F m_new = V::max(m_old, mx);
    const F m_use = m_new == neg_inf ? F{} : m_new;  // a column with nothing visible yet
    F sum = F{};
    for (int64_t jj = 0; jj < mask.hi; ++jj) {
      const F e = V::exp(mask.apply(V::load(col + jj * Pp), jj) - m_use);
      V::store(col + jj * Pp, e);
      sum += e;
    }
    for (int64_t jj = mask.hi; jj < cn; ++jj) V::store(col + jj * Pp, F{});
    const F a = V::exp(m_old - m_use);
    V::store(l + c, V::load(l + c) * a + sum);
    V::store(m + c, m_new);
    V::store(alpha + c, a);
  }
}

// softmax_block for a tile with the keys across the lanes: s [P][ld], row pr's statistics at m, l, alpha [pr].
template <class I>
BSATTN_AI void softmax_keys(float* s, int64_t P, int64_t ld, int64_t cn, int32_t j0, const int32_t* lim,
                            float cap, float* m, float* l, float* alpha) {
  using V = Simd<I>;
  using F = typename V::F;
  constexpr int W = I::W;
  const F neg_inf = V::splat(kNegInf);
  const float inv_cap = cap > 0.f ? 1.f / cap : 0.f;
  for (int64_t pr = 0; pr < P; ++pr) {
    float* row = s + pr * ld;
    const int64_t hi = visible_keys(lim[pr], j0, cn);
    F mx = neg_inf;
    for (int64_t jj = 0; jj < hi; jj += W) {
      F x = V::load(row + jj);
      if (cap > 0.f) {
        x = cap * V::tanh(x * inv_cap);
        V::store(row + jj, x);
      }
      mx = V::max(mx, V::first_lanes(x, hi - jj, neg_inf));
    }
    const float m_old = m[pr], m_blk = V::hmax(mx);
    const float m_new = m_old > m_blk ? m_old : m_blk;
    const float m_use = m_new == kNegInf ? 0.f : m_new;  // a row with nothing visible yet
    F sum = F{};
    int64_t jj = 0;
    for (; jj < hi; jj += W) {
      const F e = V::exp(V::first_lanes(V::load(row + jj), hi - jj, neg_inf) - m_use);
      V::store(row + jj, e);
      sum += e;
    }
    for (; jj < cn; jj += W) V::store(row + jj, F{});
    const float a = V::exp(V::splat(m_old - m_use))[0];
    l[pr] = l[pr] * a + V::hsum(sum);
    m[pr] = m_new;
    alpha[pr] = a;
  }
}

template <class I, ScoreLanes kLanes>
BSATTN_AI void fwd_item(const FwdArgs& a, FwdScratch& sc, int64_t item) {
  using V = Simd<I>;
  constexpr int W = I::W;
  const Problem& p = a.p;
  const RowItem it = row_item(p, sc.chunking, item);
  if (it.i1 <= it.i0) return;
  const int64_t g = p.group(), D = p.D, Dp = sc.Dp, Pp = sc.Pp;
  float *st = sc.st.data(), *o = sc.o.data(), *m = sc.m.data(), *l = sc.l.data();

  constexpr bool kKeys = kLanes == ScoreLanes::kKeys;
  const TileStrides ts = tile_strides(kLanes, Pp, sc.Cp);
  // kRows: o doubles as the row buffer for building Q^T, then becomes the accumulator.
  const ChunkRows rows = ChunkRows::run(it.i0, it.i1);
  const int64_t P = kKeys ? load_packed_rows(a.dtype, a.q, p, it.b, it.hk, rows, p.scale, sc.q.data(), Dp)
                          : load_packed_both(a.dtype, a.q, p, it.b, it.hk, rows, p.scale, o, Dp, sc.qt.data(), Pp);
  std::memset(o, 0, P * Dp * sizeof(float));
  for (int64_t pr = 0; pr < Pp; ++pr) {
    m[pr] = kNegInf;
    l[pr] = 0.f;
  }
  const SeqKeys sk = seq_keys(a, it.b);  // (kv_lens: the keys past it are never read)
  packed_key_limits(p, rows, Pp, sc.lim.data(), sk);

  int64_t j0, cn;
  for (RowBlocks blocks(p, a.layout, it, sk); blocks.next(&j0, &cn);) {
    const KvRows k = kv_rows(a.dtype, a.k, p, it.b, it.hk, j0, cn, sc.k.data(), Dp);
    const KvRows v = kv_rows(a.dtype, a.v, p, it.b, it.hk, j0, cn, sc.v.data(), Dp);
    if constexpr (kKeys) {
      dots<I>(P, cn, Dp, sc.q.data(), Dp, k.data, k.ld, st, sc.Cp);  // S = Q K^T
      softmax_keys<I>(st, P, sc.Cp, cn, static_cast<int32_t>(j0), sc.lim.data(), p.softcap, m, l,
                      sc.alpha.data());
    } else {
      gemm<I>(cn, Pp, D, k.data, k.ld, 1, sc.qt.data(), Pp, st, Pp, false);  // S^T = K Q^T
      softmax_block<I>(st, cn, Pp, static_cast<int32_t>(j0), sc.lim.data(), p.softcap, m, l,
                       sc.alpha.data());
    }
    for (int64_t pr = 0; pr < P; ++pr) {
      const float alpha = sc.alpha.data()[pr];
      if (alpha == 1.f) continue;
      float* orow = o + pr * Dp;
      for (int64_t d = 0; d < Dp; d += W) V::store(orow + d, V::load(orow + d) * alpha);
    }
    gemm<I>(P, Dp, cn, st, ts.row, ts.key, v.data, v.ld, o, Dp, true);  // O += P V
  }

  for (int64_t pr = 0; pr < P; ++pr) {
    const int64_t i = it.i0 + pr / g, h = it.hk * g + pr % g;
    float* orow = o + pr * Dp;
    float inv = 1.f, lse = kNegInf;
    if (l[pr] > 0.f) {
      inv = 1.f / l[pr];
      lse = m[pr] + std::log(l[pr]);
    } else if (l[pr] == 0.f) {
      std::memset(orow, 0, Dp * sizeof(float));  // empty row: 0, whatever V held
    } else {
      inv = lse = l[pr];  // NaN: a NaN (or inf - inf) score the row takes part in; NaN out, as the reference
    }
    store_f32(a.dtype, orow, D, inv, a.o, row_offset(it.b, i, h, p.M, p.Hq, D));
    a.lse[(it.b * p.M + i) * p.Hq + h] = lse;
  }
}

using FwdItemFn = void (*)(const FwdArgs&, FwdScratch&, int64_t);

#define BSATTN_FWD_FNS(TARGET, SUFFIX, ISA)                                                        \
  TARGET void fwd_rows_##SUFFIX(const FwdArgs& a, FwdScratch& sc, int64_t item) {                  \
    fwd_item<ISA, ScoreLanes::kRows>(a, sc, item);                                                 \
  }                                                                                                \
  TARGET void fwd_keys_##SUFFIX(const FwdArgs& a, FwdScratch& sc, int64_t item) {                  \
    fwd_item<ISA, ScoreLanes::kKeys>(a, sc, item);                                                 \
  }

BSATTN_FWD_FNS(, generic, IsaGeneric)
#if BSATTN_X86
BSATTN_FWD_FNS(BSATTN_TARGET_AVX2, avx2, IsaAvx2)
BSATTN_FWD_FNS(BSATTN_TARGET_AVX512, avx512, IsaAvx512)
#endif
#undef BSATTN_FWD_FNS

// The item function for this CPU's instruction set and the call's score lanes.
FwdItemFn fwd_item_fn(const Problem& p, const RowChunking& chunking) {
  const IsaKind isa = detect_isa();
  const bool keys = score_lanes(p, chunking, vector_width(isa)) == ScoreLanes::kKeys;
  switch (isa) {
#if BSATTN_X86
    case IsaKind::kAvx512:
      return keys ? fwd_keys_avx512 : fwd_rows_avx512;
    case IsaKind::kAvx2:
      return keys ? fwd_keys_avx2 : fwd_rows_avx2;
#endif
    default:
      return keys ? fwd_keys_generic : fwd_rows_generic;
  }
}

}  // namespace

void attention_fwd_cpu(const FwdArgs& a) {
  const Problem& p = a.p;
  const RowChunking chunking = row_chunking(p);
  const int64_t num_items = p.B * p.Hk * p.MB * chunking.per_block;
  if (num_items <= 0) return;  // nothing to write: some dimension of o is 0
  const double flops = 4.0 * estimated_pairs(p, a.layout) * static_cast<double>(p.D);
  const int num_threads = choose_num_threads(num_items, flops);
  const FwdItemFn item_fn = fwd_item_fn(p, chunking);
  std::vector<std::unique_ptr<FwdScratch>> scratch(num_threads);
  parallel_for(num_items, num_threads, [&](int tid, int64_t item) {
    if (!scratch[tid]) scratch[tid] = std::make_unique<FwdScratch>(p);
    item_fn(a, *scratch[tid], item);
  });
}

}  // namespace bsattn::cpu
