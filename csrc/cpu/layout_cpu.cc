// Host-side passes over the (possibly garbage) BSR layout, with the same clamp / skip rules as
// the kernels (row_range, valid_block).
#include "cpu/attention_cpu.h"

namespace bsattn::cpu {

double estimated_pairs(const Problem& p, const Layout& layout) {
  const int64_t num_layouts = p.LB * p.LH;
  const double users = static_cast<double>(p.B / p.LB) * static_cast<double>(p.Hk / p.LH);
  double blocks = 0.0;
  for (int64_t l = 0; l < num_layouts; ++l) {
    const int32_t* indptr = layout.indptr_of(p, l);
    const int32_t* indices = layout.indices_of(p, l);
    for (int64_t r = 0; r < p.MB; ++r) {
      const RowRange range = row_range(indptr, r, p.nnz);
      for (int64_t idx = range.start; idx < range.end; ++idx)
        blocks += valid_block(indices[idx], p.NB) ? 1.0 : 0.0;
    }
  }
  return blocks * users * static_cast<double>(p.R * p.group() * p.C);
}

Columns transpose_layout(const Problem& p, const Layout& layout) {
  const int64_t num_layouts = p.LB * p.LH, stride = p.NB + 1;
  Columns cols;
  cols.start.assign(num_layouts * stride, 0);
  // Count column c's entries in start[c + 1], then prefix-sum into offsets across all layouts.
  for (int64_t l = 0; l < num_layouts; ++l) {
    const int32_t* indptr = layout.indptr_of(p, l);
    const int32_t* indices = layout.indices_of(p, l);
    int64_t* start = cols.start.data() + l * stride;
    for (int64_t r = 0; r < p.MB; ++r) {
      const RowRange range = row_range(indptr, r, p.nnz);
      for (int64_t idx = range.start; idx < range.end; ++idx)
        if (valid_block(indices[idx], p.NB)) ++start[indices[idx] + 1];
    }
  }
  int64_t total = 0;
  for (int64_t l = 0; l < num_layouts; ++l) {
    int64_t* start = cols.start.data() + l * stride;
    start[0] = total;
    for (int64_t c = 1; c < stride; ++c) start[c] += start[c - 1];
    total = start[stride - 1];
  }
  cols.rows.resize(total);
  std::vector<int64_t> fill;
  for (int64_t l = 0; l < num_layouts; ++l) {
    const int32_t* indptr = layout.indptr_of(p, l);
    const int32_t* indices = layout.indices_of(p, l);
    const int64_t* start = cols.start.data() + l * stride;
    fill.assign(start, start + p.NB);
    for (int64_t r = 0; r < p.MB; ++r) {
      const RowRange range = row_range(indptr, r, p.nnz);
      for (int64_t idx = range.start; idx < range.end; ++idx)
        if (valid_block(indices[idx], p.NB)) cols.rows[fill[indices[idx]]++] = r;
    }
  }
  return cols;
}

}  // namespace bsattn::cpu
