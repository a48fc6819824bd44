// The CPU block-sparse attention kernels (csrc/README.md has the contract). The FFI handlers in
// ffi_cpu.cc validate the buffers, fill these structs and call the entry points below.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "common/bsattn_common.h"
#include "cpu/dtype_cpu.h"

namespace bsattn::cpu {

// The BSR layout of one call: indptr [LB, LH, MB + 1], indices [LB, LH, nnz].
struct Layout {
  const int32_t* indptr;
  const int32_t* indices;

  const int32_t* indptr_of(const Problem& p, int64_t layout) const {
    return indptr + layout * (p.MB + 1);
  }
  const int32_t* indices_of(const Problem& p, int64_t layout) const {
    return indices + layout * p.nnz;
  }
};

// What both kernels read: shapes and attributes, q / k / v ([B, M, Hq, D], [B, N, Hk, D] x 2, all
// of element type `dtype`) and the layout.
struct AttnInputs {
  Problem p;
  DType dtype;
  const void *q, *k, *v;
  Layout layout;
  // Per-sequence operands: [B], or null.
  const int32_t* kv_lens = nullptr;   // keys that take part per batch element, or null: N
  const int32_t* q_offset = nullptr;  // causal: key position of query row 0 per batch element, or null: N - M
};

struct FwdArgs : AttnInputs {
  void* o;     // [B, M, Hq, D]
  float* lse;  // [B, M, Hq]
};

// Batch element b's keys: how many take part (kv_lens, clipped) and the causal shift (q_offset, clipped; both
// common/bsattn_common.h).
struct SeqKeys {
  int64_t nkeys, shift;
};
inline SeqKeys seq_keys(const AttnInputs& a, int64_t b) {
  return {clipped_key_count(a.kv_lens, b, a.p.N), causal_shift(a.q_offset, b, a.p.M, a.p.N)};
}

struct BwdArgs : AttnInputs {
  const void* d_o;           // [B, M, Hq, D]
  const float *lse, *delta;  // [B, M, Hq]
  void *dq, *dk, *dv;        // like q, k, v
};

// Both may throw (std::bad_alloc); the FFI handlers turn that into an error.
void attention_fwd_cpu(const FwdArgs& args);
void attention_bwd_cpu(const BwdArgs& args);

// ---- helpers shared by the forward and the backward ---------------------------------------------

// Query rows of a block row are processed in chunks of `rows` rows x all g heads of a KV head
// (the "packed rows", at most about kMaxPacked of them), so that score tiles stay in cache.
constexpr int64_t kMaxPacked = 128;

struct RowChunking {
  int64_t rows;       // query rows per chunk
  int64_t per_block;  // chunks per block row
};
// The most keys one block column holds: C, or N where a block is wider than the sequence (scratch sized by C
// alone would grow with any block size).
inline int64_t block_keys(const Problem& p) { return p.C < p.N ? p.C : p.N; }

inline RowChunking row_chunking(const Problem& p) {
  // a block row holds at most M rows: chunks counted from R alone would be mostly empty work items where R > M
  const int64_t height = p.R < p.M ? p.R : (p.M > 0 ? p.M : 1);
  int64_t rows = kMaxPacked / (p.group() > 0 ? p.group() : 1);
  rows = rows < 1 ? 1 : (rows > height ? height : rows);
  return {rows, (height + rows - 1) / rows};
}

// The backward's dk / dv pass gathers the query rows that list a block column across block rows, up to about
// kGatherPacked packed rows a chunk, or a block row's chunk where that is more: with chunks of one block row,
// R x g = 1 made every chunk one query row, a rank-1 update of the block's dk / dv each. 64 of 32 / 64 / 128 tried
// on a 2-core AVX-512 machine (BENCHMARKS.md, session 57): 32 gained less at R = 1, 128 no more, and 128 widened
// the chunks of cells that had 64 packed rows (0.92-0.94x there in one run of two). rows: query rows a chunk (at
// most M); per_block: 1.
constexpr int64_t kGatherPacked = 64;
inline RowChunking gathered_chunking(const Problem& p) {
  int64_t rows = kGatherPacked / (p.group() > 0 ? p.group() : 1);
  const int64_t own = row_chunking(p).rows;
  rows = rows < own ? own : rows;  // (own >= 1)
  rows = p.M > 0 && rows > p.M ? p.M : rows;
  return {rows, 1};
}

// How an item's score tiles lie in the vector lanes. kRows: [key][packed row], a vector across the packed rows (the
// tile of a GEMM). kKeys: [packed row][key], a vector across the keys, for items of a few packed rows (decode
// steps, R = 1 without GQA), where kRows' vectors would be mostly padding; its products with K and V are dot
// products (simd_cpu.h `dots`). kKeys where the packed rows fill at most half a vector and number at most
// kKeysMaxRows (M = N = 2048, D = 64, BENCHMARKS.md: AVX2 forward + backward 2.6x at R x g = 1, 1.7x at 4, at 8
// the forward 0.9-1.0x on a noisy machine; AVX-512 at 4 the forward 1.36x, at 8 0.86x (8 x 16) and 1.02x (2 x 64,
// g = 4), at 16 0.54-0.56x). `vector_width` is the floats per vector of the instruction set that runs;
// BSATTN_CPU_LANES=rows|keys forces one (for testing both on the same shapes).
constexpr int64_t kKeysMaxRows = 4;
enum class ScoreLanes { kRows, kKeys };
inline ScoreLanes score_lanes(const Problem& p, const RowChunking& ch, int vector_width) {
  static const int forced = [] {
    const char* env = std::getenv("BSATTN_CPU_LANES");
    if (env && std::strcmp(env, "rows") == 0) return 1;
    if (env && std::strcmp(env, "keys") == 0) return 2;
    return 0;
  }();
  if (forced) return forced == 2 ? ScoreLanes::kKeys : ScoreLanes::kRows;
  const int64_t packed = ch.rows * p.group();
  return 2 * packed <= vector_width && packed <= kKeysMaxRows ? ScoreLanes::kKeys : ScoreLanes::kRows;
}

// Where score-tile element (packed row pr, key jj) lies: pr * row + jj * key.
struct TileStrides {
  int64_t row, key;
};
inline TileStrides tile_strides(ScoreLanes lanes, int64_t Pp, int64_t Cp) {
  return lanes == ScoreLanes::kKeys ? TileStrides{Cp, 1} : TileStrides{1, Pp};
}

// One chunk of query rows [i0, i1) of block row r of (b, hk), from a flat item index.
struct RowItem {
  int64_t b, hk, r, i0, i1;
};
inline RowItem row_item(const Problem& p, const RowChunking& ch, int64_t item) {
  RowItem it;
  const int64_t c = item % ch.per_block;
  item /= ch.per_block;
  it.r = item % p.MB;
  item /= p.MB;
  it.hk = item % p.Hk;
  it.b = item / p.Hk;
  it.i0 = it.r * p.R + c * ch.rows;
  int64_t end = it.r * p.R + p.R;
  end = end < p.M ? end : p.M;
  it.i1 = it.i0 + ch.rows < end ? it.i0 + ch.rows : end;  // may be <= i0: empty chunk
  return it;
}

// Number of (query row, key) elements the layout lists, summed over all b and query heads
// (causal masking ignored): a cost estimate for choosing the thread count.
double estimated_pairs(const Problem& p, const Layout& layout);

// The layout transposed (CSC): for layout l and block column c, the block rows that list c are
// rows[start[l * (NB + 1) + c] .. start[l * (NB + 1) + c + 1]), ascending, a row repeated as
// often as it lists c. Only the entries that the clamp / skip rules keep appear.
struct Columns {
  std::vector<int64_t> start;
  std::vector<int64_t> rows;
};
Columns transpose_layout(const Problem& p, const Layout& layout);

// The exclusive upper bound on key index j for query row i of a batch element: j < sk.nkeys, and with causal
// j <= i + sk.shift. May be <= 0 (the row sees nothing).
inline int64_t key_limit(const Problem& p, int64_t i, const SeqKeys& sk) {
  if (!p.causal) return sk.nkeys;
  const int64_t lim = i + sk.shift + 1;
  return lim < sk.nkeys ? lim : sk.nkeys;
}

// The blocks of a row item that can contribute, in layout order: valid block columns of its block
// row (clamp / skip rules) that at least one row of the chunk sees (causal, keys below sk.nkeys), each cut at nkeys
// (the keys past it never read). Usage:
//   int64_t j0, cn;  // first key and key count of the block
//   for (RowBlocks blocks(p, layout, item, seq_keys(a, item.b)); blocks.next(&j0, &cn);) { ... }
class RowBlocks {
 public:
  RowBlocks(const Problem& p, const Layout& layout, const RowItem& it, const SeqKeys& sk)
      : p_(p), nkeys_(sk.nkeys), lim_max_(key_limit(p, it.i1 - 1, sk)) {  // key_limit grows with i
    const int64_t l = p.layout_id(it.b, it.hk);
    indices_ = layout.indices_of(p, l);
    const RowRange range = row_range(layout.indptr_of(p, l), it.r, p.nnz);
    idx_ = range.start;
    end_ = range.end;
  }
  bool next(int64_t* j0, int64_t* cn) {
    while (idx_ < end_) {
      const int32_t col = indices_[idx_++];
      if (!valid_block(col, p_.NB)) continue;
      *j0 = col * p_.C;
      if (*j0 >= lim_max_) continue;  // causal or past nkeys: no row of the chunk sees the block
      *cn = p_.C < nkeys_ - *j0 ? p_.C : nkeys_ - *j0;
      return true;
    }
    return false;
  }

 private:
  const Problem& p_;
  int64_t nkeys_, lim_max_;
  const int32_t* indices_;
  int64_t idx_, end_;
};

// A 64-byte aligned, zero-initialised float buffer (the scratch of one thread).
class AlignedFloats {
 public:
  AlignedFloats() = default;
  explicit AlignedFloats(int64_t n) : raw_(static_cast<size_t>(n + 16), 0.f) {
    const auto addr = reinterpret_cast<uintptr_t>(raw_.data());
    data_ = raw_.data() + ((64 - addr % 64) % 64) / sizeof(float);
  }
  float* data() { return data_; }

 private:
  std::vector<float> raw_;
  float* data_ = nullptr;
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

}  // namespace bsattn::cpu
