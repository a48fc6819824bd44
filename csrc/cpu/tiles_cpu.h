// Moving tiles between the FFI buffers (any dtype, [B, L, H, D] layout) and the f32 scratch of
// one thread (row pitch padded with pad16). Shared by the forward and the backward kernels.
//
// "Packed rows": the query rows of a chunk (ChunkRows) of batch b for all g query heads of KV head hk, packed as
// row t * g + (h - hk * g) for the chunk's t-th query row. In [B, M, Hq, D] those g heads are adjacent in memory.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/bsattn_common.h"
#include "cpu/attention_cpu.h"
#include "cpu/dtype_cpu.h"

namespace bsattn::cpu {

// Offset (in elements) of row (b, i, h) of a [B, L, H, D] tensor.
inline int64_t row_offset(int64_t b, int64_t i, int64_t h, int64_t L, int64_t H, int64_t D) {
  return ((b * L + i) * H + h) * D;
}

// The query rows of a chunk: its t-th is first + t (a run [i0, i1) of one block row) or list[t] (rows gathered
// across block rows: the backward's dk / dv pass).
struct ChunkRows {
  int64_t first;
  const int64_t* list;  // or null: a run
  int64_t n;
  static ChunkRows run(int64_t i0, int64_t i1) { return {i0, nullptr, i1 - i0}; }
  int64_t operator[](int64_t t) const { return list ? list[t] : first + t; }
};

// dst[packed row][0, D) = mul * src rows; dst pitch Dp. Returns the packed count P.
inline int64_t load_packed_rows(DType t, const void* src, const Problem& p, int64_t b, int64_t hk,
                                const ChunkRows& rows, float mul, float* dst, int64_t Dp) {
  const int64_t g = p.group();
  for (int64_t r = 0; r < rows.n; ++r)
    for (int64_t hg = 0; hg < g; ++hg)
      load_f32(t, src, row_offset(b, rows[r], hk * g + hg, p.M, p.Hq, p.D), p.D, mul, dst + (r * g + hg) * Dp);
  return rows.n * g;
}

// The inverse of load_packed_rows.
inline void store_packed_rows(DType t, const float* src, int64_t Dp, const Problem& p, int64_t b,
                              int64_t hk, const ChunkRows& rows, float mul, void* dst) {
  const int64_t g = p.group();
  for (int64_t r = 0; r < rows.n; ++r)
    for (int64_t hg = 0; hg < g; ++hg)
      store_f32(t, src + (r * g + hg) * Dp, p.D, mul, dst, row_offset(b, rows[r], hk * g + hg, p.M, p.Hq, p.D));
}

// Per-row statistics ([B, M, Hq] f32: lse, delta) of the packed rows.
inline void load_packed_stats(const float* src, const Problem& p, int64_t b, int64_t hk, const ChunkRows& rows,
                              float* dst) {
  const int64_t g = p.group();
  for (int64_t r = 0; r < rows.n; ++r)
    std::memcpy(dst + r * g, src + (b * p.M + rows[r]) * p.Hq + hk * g, g * sizeof(float));
}

// Key rows j0 <= j < j0 + cn of (b, hk) of a [B, N, Hk, D] tensor into dst [cn][Dp].
inline void load_kv_rows(DType t, const void* src, const Problem& p, int64_t b, int64_t hk,
                         int64_t j0, int64_t cn, float* dst, int64_t Dp) {
  for (int64_t jj = 0; jj < cn; ++jj)
    load_f32(t, src, row_offset(b, j0 + jj, hk, p.N, p.Hk, p.D), p.D, 1.f, dst + jj * Dp);
}

// Key rows j0 <= j < j0 + cn of (b, hk) of a [B, N, Hk, D] tensor as f32 rows `ld` floats apart, for products that
// read D columns: the tensor's own rows where it is float32 and D fills whole scratch rows (D == Dp, so nothing reads
// past a head), else a converted copy in dst [cn][Dp]. The copy was the cost of few-row items (R x g = 1: every key row
// copied once per query row that lists it).
struct KvRows {
  const float* data;
  int64_t ld;
};
inline KvRows kv_rows(DType t, const void* src, const Problem& p, int64_t b, int64_t hk, int64_t j0, int64_t cn,
                      float* dst, int64_t Dp) {
  if (t == DType::kF32 && p.D == Dp)
    return {static_cast<const float*>(src) + row_offset(b, j0, hk, p.N, p.Hk, p.D), p.Hk * p.D};
  load_kv_rows(t, src, p, b, hk, j0, cn, dst, Dp);
  return {dst, Dp};
}

inline void store_kv_rows(DType t, const float* src, int64_t Dp, const Problem& p, int64_t b,
                          int64_t hk, int64_t j0, int64_t cn, void* dst) {
  for (int64_t jj = 0; jj < cn; ++jj)
    store_f32(t, src + jj * Dp, p.D, 1.f, dst, row_offset(b, j0 + jj, hk, p.N, p.Hk, p.D));
}

// dst [D][ld] = rows^T for the n rows of `rows` [n][Dp]; columns [n, ld) are zeroed.
inline void transpose_rows(const float* rows, int64_t n, int64_t D, int64_t Dp, float* dst,
                           int64_t ld) {
  for (int64_t d = 0; d < D; ++d) {
    float* out = dst + d * ld;
    for (int64_t i = 0; i < n; ++i) out[i] = rows[i * Dp + d];
    for (int64_t i = n; i < ld; ++i) out[i] = 0.f;
  }
}

// Packed rows loaded as in load_packed_rows into `rows` [P][Dp], and their transpose into
// `cols` [D][Pp] (columns [P, Pp) zero). Returns P.
inline int64_t load_packed_both(DType t, const void* src, const Problem& p, int64_t b, int64_t hk,
                                const ChunkRows& chunk, float mul, float* rows, int64_t Dp, float* cols, int64_t Pp) {
  const int64_t P = load_packed_rows(t, src, p, b, hk, chunk, mul, rows, Dp);
  transpose_rows(rows, P, p.D, Dp, cols, Pp);
  return P;
}

// lim[pr] = key_limit of packed row pr of the batch element (sk), clamped to [0, sk.nkeys]; padding lanes [P, Pp) get 0
// (they see nothing).
inline void packed_key_limits(const Problem& p, const ChunkRows& rows, int64_t Pp, int32_t* lim, const SeqKeys& sk) {
  const int64_t g = p.group(), P = rows.n * g;
  for (int64_t pr = 0; pr < Pp; ++pr) {
    int64_t l = 0;
    if (pr < P) {
      l = key_limit(p, rows[pr / g], sk);
      l = l < 0 ? 0 : l;
    }
    lim[pr] = static_cast<int32_t>(l);
  }
}

}  // namespace bsattn::cpu
