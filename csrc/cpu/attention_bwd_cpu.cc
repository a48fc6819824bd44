// Backward block-sparse attention on the CPU, in two race-free passes:
//
//  1. dq: work item = (b, hk, block row r, chunk of its query rows), exactly the forward's
//     decomposition. Per listed block: S = Q K^T, P = exp(s - lse), dP = dO V^T,
//     dS = P (dP - delta) (times the soft-cap derivative), dQ += dS K.
//  2. dk / dv: work item = (b, hk, block column c), walking the block rows that list c (the
//     layout transposed on the host, transpose_layout). Per such row (all g query heads):
//     the same S, P, dP, dS, then dV += P^T dO and dK += dS^T Q.
//
// As in the forward, score-shaped tiles are kept transposed ([key][packed query row]): they are
// computed as K Q^T and V dO^T from Q^T / dO^T built once per row chunk, the per-row lse / delta
// are vectors across columns, and every product reads its operands without a transpose.
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
  RowChunking chunking;
  int64_t Dp, Pp;
  AlignedFloats q, qt, d_o, dot;  // packed rows: q (scaled) and do, as [P][Dp] and [D][Pp]
  AlignedFloats k, v;             // [C][Dp]
  AlignedFloats st, dpt, probt;   // [C][Pp]: scores, dP -> dS, probabilities
  AlignedFloats acc0, acc1;       // dq [P][Dp] in pass 1; dk, dv [C][Dp] in pass 2
  AlignedFloats lse, delta;       // [Pp]
  std::vector<int32_t> lim;       // [Pp]

  explicit BwdScratch(const Problem& p)
      : chunking(row_chunking(p)), Dp(pad16(p.D)), Pp(pad16(chunking.rows * p.group())) {
    const int64_t kc = block_keys(p);
    const int64_t rows = Pp > kc ? Pp : kc;
    q = AlignedFloats(Pp * Dp);
    qt = AlignedFloats(p.D * Pp);
    d_o = AlignedFloats(Pp * Dp);
    dot = AlignedFloats(p.D * Pp);
    k = AlignedFloats(kc * Dp);
    v = AlignedFloats(kc * Dp);
    st = AlignedFloats(kc * Pp);
    dpt = AlignedFloats(kc * Pp);
    probt = AlignedFloats(kc * Pp);
    acc0 = AlignedFloats(rows * Dp);
    acc1 = AlignedFloats(rows * Dp);
    lse = AlignedFloats(Pp);
    delta = AlignedFloats(Pp);
    lim.resize(Pp);
  }

  // K and V rows of block column j0 (cn keys) of (b, hk).
  void load_kv(const BwdArgs& a, int64_t b, int64_t hk, int64_t j0, int64_t cn) {
    load_kv_rows(a.dtype, a.k, a.p, b, hk, j0, cn, k.data(), Dp);
    load_kv_rows(a.dtype, a.v, a.p, b, hk, j0, cn, v.data(), Dp);
  }

  // q, do (rows and transposed), lse, delta and key limits of query rows [i0, i1) of (b, hk);
  // returns the packed count P. A row whose lse is -inf saw nothing in the forward: its limit is
  // set to 0 so that it contributes nothing, and its lse and delta to 0 so that no -inf - -inf or
  // 0 * inf can turn that nothing into NaN.
  int64_t load_rows(const BwdArgs& a, int64_t b, int64_t hk, int64_t i0, int64_t i1) {
    const Problem& p = a.p;
    load_packed_both(a.dtype, a.q, p, b, hk, i0, i1, p.scale, q.data(), Dp, qt.data(), Pp);
    const int64_t P =
        load_packed_both(a.dtype, a.d_o, p, b, hk, i0, i1, 1.f, d_o.data(), Dp, dot.data(), Pp);
    load_packed_stats(a.lse, p, b, hk, i0, i1, lse.data());
    load_packed_stats(a.delta, p, b, hk, i0, i1, delta.data());
    packed_key_limits(p, i0, i1, Pp, lim.data(), seq_keys(a, b));
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

// S^T and dS^T (in sc.dpt, plus P^T in sc.probt when with_prob) of the loaded rows against the
// block at key j0 (cn keys) in sc.k / sc.v.
template <class I>
BSATTN_AI void score_grads(const BwdArgs& a, BwdScratch& sc, int64_t j0, int64_t cn,
                           bool with_prob) {
  const int64_t D = a.p.D, Dp = sc.Dp, Pp = sc.Pp;
  float *st = sc.st.data(), *dpt = sc.dpt.data();
  gemm<I>(cn, Pp, D, sc.k.data(), Dp, 1, sc.qt.data(), Pp, st, Pp, false);    // S^T = K Q^T
  gemm<I>(cn, Pp, D, sc.v.data(), Dp, 1, sc.dot.data(), Pp, dpt, Pp, false);  // dP^T = V dO^T
  grad_block<I>(st, dpt, with_prob ? sc.probt.data() : nullptr, cn, Pp, static_cast<int32_t>(j0),
                sc.lim.data(), sc.lse.data(), sc.delta.data(), a.p.softcap);
}

// Pass 1: dq of one chunk of query rows.
template <class I>
BSATTN_AI void dq_item(const BwdArgs& a, BwdScratch& sc, int64_t item) {
  const Problem& p = a.p;
  const RowItem it = row_item(p, sc.chunking, item);
  if (it.i1 <= it.i0) return;
  const int64_t Dp = sc.Dp, Pp = sc.Pp;
  const int64_t P = sc.load_rows(a, it.b, it.hk, it.i0, it.i1);
  float* dq = sc.acc0.data();
  std::memset(dq, 0, P * Dp * sizeof(float));
  int64_t j0, cn;
  for (RowBlocks blocks(p, a.layout, it, seq_keys(a, it.b)); blocks.next(&j0, &cn);) {
    sc.load_kv(a, it.b, it.hk, j0, cn);
    score_grads<I>(a, sc, j0, cn, false);
    gemm<I>(P, Dp, cn, sc.dpt.data(), 1, Pp, sc.k.data(), Dp, dq, Dp, true);  // dQ += dS K
  }
  store_packed_rows(a.dtype, dq, Dp, p, it.b, it.hk, it.i0, it.i1, p.scale, a.dq);
}

// Pass 2: dk and dv of one block column of (b, hk).
template <class I>
BSATTN_AI void dkdv_item(const BwdArgs& a, const Columns& cols, BwdScratch& sc, int64_t item) {
  const Problem& p = a.p;
  const int64_t c = item % p.NB, hk = (item / p.NB) % p.Hk, b = item / (p.NB * p.Hk);
  const int64_t j0 = c * p.C, cn = p.C < p.N - j0 ? p.C : p.N - j0;
  const SeqKeys sk = seq_keys(a, b);
  // the block's keys that take part (kv_lens): only those are read; the rest of its dk, dv rows stay 0 (when none
  // does, key_limit below skips every row)
  const int64_t live = sk.nkeys - j0 < cn ? sk.nkeys - j0 : cn;
  const int64_t Dp = sc.Dp, Pp = sc.Pp;
  float *dk = sc.acc0.data(), *dv = sc.acc1.data();
  std::memset(dk, 0, cn * Dp * sizeof(float));
  std::memset(dv, 0, cn * Dp * sizeof(float));

  const int64_t* start = cols.start.data() + p.layout_id(b, hk) * (p.NB + 1) + c;
  bool loaded = false;
  for (int64_t e = start[0]; e < start[1]; ++e) {
    const int64_t r = cols.rows[e];
    const int64_t row_end = r * p.R + p.R < p.M ? r * p.R + p.R : p.M;
    for (int64_t i0 = r * p.R; i0 < row_end; i0 += sc.chunking.rows) {
      const int64_t i1 = i0 + sc.chunking.rows < row_end ? i0 + sc.chunking.rows : row_end;
      if (j0 >= key_limit(p, i1 - 1, sk)) continue;  // causal: no row of this chunk sees the block
      if (!loaded) {
        sc.load_kv(a, b, hk, j0, live);
        loaded = true;
      }
      const int64_t P = sc.load_rows(a, b, hk, i0, i1);
      score_grads<I>(a, sc, j0, live, true);
      gemm<I>(live, Dp, P, sc.probt.data(), Pp, 1, sc.d_o.data(), Dp, dv, Dp, true);  // dV += P^T dO
      gemm<I>(live, Dp, P, sc.dpt.data(), Pp, 1, sc.q.data(), Dp, dk, Dp, true);      // dK += dS^T Q
    }
  }
  store_kv_rows(a.dtype, dk, Dp, p, b, hk, j0, cn, a.dk);
  store_kv_rows(a.dtype, dv, Dp, p, b, hk, j0, cn, a.dv);
}

struct BwdFns {
  void (*dq)(const BwdArgs&, BwdScratch&, int64_t);
  void (*dkdv)(const BwdArgs&, const Columns&, BwdScratch&, int64_t);
};

#define BSATTN_BWD_FNS(TARGET, SUFFIX, ISA)                                                    \
  TARGET void dq_item_##SUFFIX(const BwdArgs& a, BwdScratch& sc, int64_t item) {               \
    dq_item<ISA>(a, sc, item);                                                                 \
  }                                                                                            \
  TARGET void dkdv_item_##SUFFIX(const BwdArgs& a, const Columns& cols, BwdScratch& sc,        \
                                 int64_t item) {                                               \
    dkdv_item<ISA>(a, cols, sc, item);                                                         \
  }

BSATTN_BWD_FNS(, generic, IsaGeneric)
#if BSATTN_X86
BSATTN_BWD_FNS(BSATTN_TARGET_AVX2, avx2, IsaAvx2)
BSATTN_BWD_FNS(BSATTN_TARGET_AVX512, avx512, IsaAvx512)
#endif
#undef BSATTN_BWD_FNS

BwdFns bwd_fns() {
  switch (detect_isa()) {
#if BSATTN_X86
    case IsaKind::kAvx512:
      return {dq_item_avx512, dkdv_item_avx512};
    case IsaKind::kAvx2:
      return {dq_item_avx2, dkdv_item_avx2};
#endif
    default:
      return {dq_item_generic, dkdv_item_generic};
  }
}

}  // namespace

void attention_bwd_cpu(const BwdArgs& a) {
  const Problem& p = a.p;
  const BwdFns fns = bwd_fns();
  const RowChunking chunking = row_chunking(p);
  const int64_t dq_items = p.B * p.Hk * p.MB * chunking.per_block;
  const int64_t dkdv_items = p.B * p.Hk * p.NB;
  if (dq_items <= 0 && dkdv_items <= 0) return;
  const double flops = 10.0 * estimated_pairs(p, a.layout) * static_cast<double>(p.D);
  const Columns cols = transpose_layout(p, a.layout);

  const int num_threads = choose_num_threads(dq_items > dkdv_items ? dq_items : dkdv_items, flops);
  std::vector<std::unique_ptr<BwdScratch>> scratch(num_threads);
  parallel_for(dq_items, num_threads, [&](int tid, int64_t item) {
    if (!scratch[tid]) scratch[tid] = std::make_unique<BwdScratch>(p);
    fns.dq(a, *scratch[tid], item);
  });
  parallel_for(dkdv_items, num_threads, [&](int tid, int64_t item) {
    if (!scratch[tid]) scratch[tid] = std::make_unique<BwdScratch>(p);
    fns.dkdv(a, cols, *scratch[tid], item);
  });
}

}  // namespace bsattn::cpu
