// Host-visible interface of the CUDA backward kernels (dq; dk and dv): the parameter block the FFI handler
// (ffi_bwd.cc) fills and the launcher entry points, one per (dtype, head dim) instantiation
// (instantiations/). Plain C++: included by the host-compiled handler and by the .cu files.
//
// Everything of the backward lives in namespace bsattn::cuda::bwd, so that no name can clash with the
// forward's (one module, one definition per name).
#pragma once

#include <cstdint>
#include <cstdlib>

#include <cuda_runtime.h>

#include "cuda/common/problem.h"
#include "cuda/fwd/params.h"

namespace bsattn {
namespace cuda {
namespace bwd {

using cuda::DType;  // the dtype tags are the forward's (common/problem.h)
using cuda::kBF16;
using cuda::kF16;

// The words after dq_accum's B * M * Hq * D floats: the persistent Hopper kernel's work counter (jax_bsattn/lowering.py
// and check_bwd.py size the workspace with the same number).
constexpr int kDqSchedWords = 16;

// Everything both kernels need: the shared problem description (common/problem.h: shapes, layout, mask,
// scaling; the handler checks the sizes its int arithmetic holds: ffi_common.h check_int32_limits) and the
// backward's tensors.
struct Params : ProblemParams {
  const void* q;       // [B, M, Hq, D]
  const void* k;       // [B, N, Hk, D]
  const void* v;       // [B, N, Hk, D]
  const void* dout;    // [B, M, Hq, D]
  const float* lse;    // [B, M, Hq]
  const float* delta;  // [B, M, Hq]  rowsum(do * o) - dlse
  const int32_t* indptr;      // [LB, LH, MB + 1]
  const int32_t* indices;     // [LB, LH, nnz]
  const int32_t* col_indptr;  // [LB, LH, NB + 1]
  const int32_t* col_rows;    // [LB, LH, nnz]
  const int32_t* col_order;   // [LB, LH, NB]: the block columns, longest first (the column kernels' CTA order)
  void* dq;  // [B, M, Hq, D]
  void* dk;  // [B, N, Hk, D]
  void* dv;  // [B, N, Hk, D]
  float* dq_accum;  // [B, M, Hq, D] f32 workspace of the Hopper backward (atomic dq), + kDqSchedWords words after it
                    // (work counters, zeroed with it); null: not available
  float scale;    // dq = scale * sum dx k, dk = scale * sum dx q
  int nsplit;     // dq: row tiles per block row (set by the launcher)
  int nkc;        // dk / dv: key tiles per block column (set by the launcher)
  int pack;       // dk / dv, packed small blocks: block columns per CTA (set by the launcher)
  int head_chunks;  // dk / dv and the Hopper backward: the chunks of heads run one after the other (set by the
                    // launcher; bwd/common.cuh column_tile)
  int64_t dq_accum_words;  // floats in the dq workspace (0: none); the sweep's tables follow the dq part
  // The sweep form of the Hopper backward (bwd_sm90/launch.cuh launch_bwd_sm90_sweep sets them; else null / 0): 128
  // contiguous keys a work item, every block row walked, p masked by the layout's bit per (block row, column).
  const unsigned long long* sweep_bits;  // [LB * LH][MB][sweep_nbw]: bit c % 64 of word c / 64 set: column c listed
  const int* sweep_dup;   // != 0: a block is listed twice in a row (the sweep defers to the packed kernel)
  // (every work item's row list, 0 .. MB - 1, is passed as col_rows with nnz = 0)
  int sweep_nbw, sweep_c;  // bit words per block row; the layout's C (p.C holds the sweep's 128-key columns)
  // Long block columns split over several work items (bwd/column_split.cuh; the one-pass Hopper kernels, where
  // the workspace holds split_workspace_words; else null / 0). split_items [LB * LH][split_slots][4]: per slot (in CTA
  // order) the block column, its first and end entry of col_rows, and its partial slot (-1: the whole column, dk / dv
  // written directly); split_heads [LB * LH][split_parts][4]: per partial slot its column, its column's first partial
  // slot and their count; split_sums [B * Hk][split_parts][2][C][D] f32: the pieces' dk (unscaled), dv partial sums.
  const int32_t* split_items;
  const int32_t* split_heads;
  float* split_sums;
  int split_slots, split_parts;
};

// dq [B, M, Hq, D] (every element written). Returns cudaGetLastError() after the launch.
template <int kDType, int kD>
cudaError_t launch_dq(const Params& p, cudaStream_t stream);
// dk, dv [B, N, Hk, D] (every element written; zeros where no query sees a key).
template <int kDType, int kD>
cudaError_t launch_dkdv(const Params& p, cudaStream_t stream);
// Hopper (sm_90a, head dims 64 and 128; built when the CUDA archs include 90): dq, dk and dv in one pass, dq through
// p.dq_accum (zeroed, accumulated with atomic adds, then converted into p.dq). Defined only with BSATTN_WITH_SM90.
template <int kDType, int kD>
cudaError_t launch_bwd_sm90(const Params& p, cudaStream_t stream);
// A three-way switch in the environment, read by the caller once: 0 when the variable starts with '0', 2 with 'a'
// ("all"), else (or unset) 1, the default rule.
inline int env_switch(const char* name) {
  const char* e = std::getenv(name);
  return e == nullptr ? 1 : e[0] == '0' ? 0 : e[0] == 'a' ? 2 : 1;
}
// Where the packed small-block form of the Hopper one-pass backward runs (bwd_sm90/pack_kernel.cuh: 64 / C block
// columns in one 64-key tile), C <= 16: where it measured faster than the deterministic pair (H200, 2026-11-30,
// density 1/4): R * g <= 4 (one to four packed rows per block row: 1.26-2.51x at C 1 .. 16), C <= 2 with
// R * g < 256 (1.12-1.32x; from 256 packed rows the pair's compact dk / dv kernel is faster), or C = 3, 4 with
// R * g <= 8 (1.11-1.12x at 8 x 4). Elsewhere (C 4 .. 16 with R * g >= 16, C 8 .. 16 with R * g >= 8, C <= 2 with
// R * g >= 256) the pair was 5-51 % faster (bwd/README.md, "Hopper packed small blocks"). BSATTN_BWD_SM90_PACK=0 /
// all in the environment:
// never / for every C <= 16 (A / B timing, where the caller gave the workspace; read once).
inline bool sm90_pack_rule(const Params& p) {  // (the rule alone, without the variable)
  const int64_t rg = static_cast<int64_t>(p.R) * p.g;
  return p.C <= 16 && (rg <= 4 || (p.C <= 2 && rg < 256) || (p.C <= 4 && rg <= 8));
}
inline bool sm90_pack_applies(const Params& p) {
  static const int mode = env_switch("BSATTN_BWD_SM90_PACK");
  if (p.C > 16 || mode == 0) return false;
  return mode == 2 || sm90_pack_rule(p);
}
// The sweep form (bwd_sm90/kernel_ws.cuh with SWEEP): D = 128, C a power of two <= 16, and either within the packed
// form's rule with the layout's capacity at least C / 64 of the block grid, or outside it with C <= 4 and a capacity
// of at least 1 / 4 (where the pair runs otherwise). It walks every block row for each 128 contiguous keys (a dense
// backward's work, about 8.1-8.4 ms at M = N = 8192, Hq = 32 whatever R, C, g and density), where the packed form's
// cost grows with the density and with 1 / C, and the pair's with the density. H200, 2026-11-30, backward alone ms:
// packed / sweep at density 1/4: 4:1:C for C = 1, 2, 4, 8, 16: 14.89 / 8.33, 14.67 / 8.30, 13.87 / 8.21, 12.12 / 8.20,
// 9.39 / 8.14; 4:16:1 11.47 / 8.33, 4:32:1 11.36 / 8.17; density 1/8: 4:1:8 8.66 / 8.71 and 4:1:16 5.76 / 8.24
// (packed), C <= 4 sweep (4:1:4 11.61 / 8.30); density 1/16: 4:1:4 8.26 / 8.30, 4:1:2 10.97 / 8.21; density 1/32:
// 4:1:1 10.69 / 8.21. Pair / sweep at density 1/4: 4:64:1 10.42 / 8.24, 4:128:1 9.79 / 8.12, 4:4:4 11.05 / 8.12,
// 4:16:4 9.79 / 8.05; at C = 8, 16 with R * g >= 16 the pair took 5.5-8.0 (twelfth session), and its cost falls
// with the density (below about 1/5 it would win at C <= 4 too: unmeasured, hence 1/4). bwd/README.md, "Hopper
// sweep". The bit map stays no larger than the layout's indices (density >= 1/32). BSATTN_BWD_SWEEP=0 / all in the
// environment: never / wherever D = 128 and C is such a power of two, whatever the density and R * g (read once).
// jax_bsattn/lowering.py gives the workspace on the same rule.
inline bool sm90_sweep_applies(const Params& p, int D) {
  static const int mode = env_switch("BSATTN_BWD_SWEEP");
  if (mode == 0 || D != 128 || p.C > 16 || (p.C & (p.C - 1)) != 0 || p.MB <= 0 || p.NB <= 0) return false;
  const bool packed = sm90_pack_rule(p);
  if (mode == 1 && !packed && p.C > 4) return false;
  // the bit map no larger than the layout's own indices (4 nnz bytes a layout), whatever the mode
  if (static_cast<int64_t>(p.MB) * ((p.NB + 63) / 64) * 8 > 4 * p.nnz) return false;
  const int64_t grid = static_cast<int64_t>(p.MB) * p.NB;
  return mode == 2 || (packed ? 64 * p.nnz >= p.C * grid : 4 * p.nnz >= grid);
}
// The one-pass Hopper backward's rule beside the device, head dim (D) and workspace (bwd/dispatch.cu;
// jax_bsattn/lowering.py gives the workspace on the same rule): C > 16 (64- and 128-key tiles of one block column),
// the packed form above, or the sweep.
inline bool bwd_sm90_applies(const Params& p, int D) {
  return p.C > 16 || sm90_pack_applies(p) || sm90_sweep_applies(p, D);
}
// Floats of the dq workspace the sweep's tables take after its dq part (nq + kDqSchedWords): the dup flag (and
// padding to 8 bytes), the bit map, the row list.
inline int64_t sweep_workspace_words(const Params& p) {
  const int64_t nbw = (static_cast<int64_t>(p.NB) + 63) / 64;
  return 8 + 2 * static_cast<int64_t>(p.LB) * p.LH * p.MB * nbw + p.MB;
}
// The column split's partial slots per layout (bwd/column_split.cuh): a quarter of the block columns (so that the
// partial sums take at most k's size in bytes), none below 2. jax_bsattn/lowering.py has the same rule.
inline int split_parts_per_layout(const Params& p) { return p.NB / 4 >= 2 ? p.NB / 4 : 0; }
// Floats of the dq workspace the column split takes after its dq part (nq + kDqSchedWords): the item and partial-slot
// tables (int32), the partial sums. 0: no split.
inline int64_t split_workspace_words(const Params& p, int D) {
  const int64_t E = split_parts_per_layout(p), L = static_cast<int64_t>(p.LB) * p.LH;
  if (E == 0) return 0;
  return 4 * L * (p.NB + E) + 4 * L * E + static_cast<int64_t>(p.B) * p.Hk * E * 2 * p.C * D;
}
// Whether the workspace is the one-pass kernels' (q's size + kDqSchedWords floats at least; the handler accepts
// nothing in between but the split-only workspace below).
inline bool has_dq_workspace(const Params& p, int D) {
  return p.dq_accum != nullptr &&
         p.dq_accum_words >= static_cast<int64_t>(p.B) * p.M * p.Hq * D + kDqSchedWords;
}
// The pair's dq row split (bwd_sm90/dq_split.cuh: the Hopper dq kernel, R * g > 16): the forward's row-split area
// (fwd/params.h fwd_split_workspace_words, many block rows only), 0 where it would not split.
inline int64_t dq_split_words(const Params& p, int D) {
  return static_cast<int64_t>(p.R) * p.g > 16 ? fwd_split_workspace_words(p, D, false) : 0;
}
// The pair's workspace holds nothing but these areas, each given or not (jax_bsattn/lowering.py _dq_workspace_words):
// the column split's (cs floats, first) and the dq split's (ds), so exactly cs, ds or cs + ds floats, all shorter than
// the one-pass kernels' workspace. Where each starts (-1: absent); where cs = ds a workspace of that size goes to the
// column split.
inline bool dkdv_sm90_applies(const Params& p, int D);  // (below)
struct PairAreas {
  int64_t col = -1, dq = -1;
};
inline PairAreas pair_areas(const Params& p, int D) {
  // (cs only where the pair's dk / dv kernel may split: the mma.sync column kernel at C > 16, D <= 128, or the narrow
  // wgmma one, as lowering.py _pair_splits; elsewhere an area of ds floats must not read as a column split's)
  const bool col = (p.C > 16 && D <= 128) || dkdv_sm90_applies(p, D);
  const int64_t cs = col ? split_workspace_words(p, D) : 0, ds = dq_split_words(p, D), n = p.dq_accum_words;
  PairAreas a;
  if (p.dq_accum == nullptr || n <= 0 || has_dq_workspace(p, D)) return a;
  if (cs > 0 && (n == cs || n == cs + ds)) a.col = 0;
  if (ds > 0 && n == cs + ds) a.dq = cs;
  else if (ds > 0 && n == ds && n != cs) a.dq = 0;
  return a;
}
inline bool is_pair_workspace(const Params& p, int D) {
  const PairAreas a = pair_areas(p, D);
  return a.col >= 0 || a.dq >= 0;
}
// Where the deterministic pair's column split (bwd/dkdv_kernel.cuh where C > 16 and D <= 128;
// bwd_sm90/dkdv_narrow_kernel.cuh; jax_bsattn/lowering.py _pair_splits) has its area; -1: none.
inline int64_t pair_split_offset(const Params& p, int D) { return pair_areas(p, D).col; }
// Where the dq split's area starts in the pair's workspace; -1: none.
inline int64_t dq_split_offset(const Params& p, int D) { return pair_areas(p, D).dq; }
// Hopper (sm_90a, head dims 64, 128 and 256; with BSATTN_WITH_SM90): dq alone (every element written), on wgmma, for
// R * g > 16. Deterministic, like launch_dq.
template <int kDType, int kD>
cudaError_t launch_dq_sm90(const Params& p, cudaStream_t stream);
// Its rule beside the device and head dim (bwd/dispatch.cu): tiles of 64 packed rows, where R * g > 16 (at most 16: the
// mma.sync kernel's 16-row tile pads less).
inline bool dq_sm90_applies(const Params& p) { return static_cast<int64_t>(p.R) * p.g > 16; }
// Hopper (sm_90a, head dims 128 and 256; with BSATTN_WITH_SM90): dk, dv alone (every element written) on wgmma for
// narrow block columns (D = 256: 16- or 32-key chunks of any block column), bwd_sm90/dkdv_narrow_kernel.cuh.
// Deterministic, like launch_dkdv.
template <int kDType, int kD>
cudaError_t launch_dkdv_sm90(const Params& p, cudaStream_t stream);
// Its form with a producer warpgroup (Sm90DkdvNarrowWsTile; the default, BSATTN_BWD_DKDV=narrow runs the form without),
// in translation units of its own.
template <int kDType, int kD>
cudaError_t launch_dkdv_sm90_ws(const Params& p, cudaStream_t stream);
// Its rule beside the device (bwd/dispatch.cu): D = 128 and 8 < C <= 16, where launch_dkdv runs the mma.sync 16-key
// column tile (C <= 8 has the packed and compact kernels); 2-4 % faster than that tile (H200, 2026-11-30).
// D = 256: every C > 8, in place of the mma.sync column kernel's two passes (forward + backward 2.0-2.1x with the
// wgmma dq kernel, H200, 2026-12-01).
inline bool dkdv_sm90_applies(const Params& p, int D) {
  return (D == 128 && p.C > 8 && p.C <= 16) || (D == 256 && p.C > 8);
}
// Hopper (sm_90a, D = 64 or 128; with BSATTN_WITH_SM90): the row-oriented backward (bwd_sm90/rows_kernel.cuh): dq, dk
// and dv in one pass over each block row's listed keys, dk / dv added as 64-bit fixed point into p.dq_accum (at least
// rows_workspace_words(p, D) floats), so all three are bitwise repeatable.
template <int kDType, int kD>
cudaError_t launch_bwd_rows_sm90(const Params& p, cudaStream_t stream);
inline int64_t rows_workspace_words(const Params& p, int D) {
  const int64_t keys = static_cast<int64_t>(p.B) * p.N * p.Hk;
  // dk, dv sums (int64), the maxima, a flag byte per key row each: whole 16-byte words, which the launcher's one memset
  // needs to stay on its fast path (session 21: an odd tail cost about 2 % of forward + backward)
  return 4 * keys * D + 8 + 4 * ((2 * keys + 15) / 16);
}
// Its rule beside the device and the workspace (bwd/dispatch.cu; jax_bsattn/lowering.py sizes the workspace on the same
// rule): D = 64 or 128, C <= 16 (where the column kernels re-gather rows for every 16 keys or sweep) and R * g >= 128
// (its 128-row tile full), or R * g >= 64 with C <= 8 at D = 128, C <= 4 at D = 64: half-empty tiles, still faster
// than the sweep or the pair there (H200, session 20, backward alone with a form about 0.3 ms slower than this one: 6.9
// against 7.8 ms at 4:16:1 .. 4:16:4, 6.9 against 6.8 at 4:16:8, density 1/4; 3.6 against 7.7, 5.9, 3.7 at 1/8).
// BSATTN_BWD_ROWS=0: never (A / B; read once by the caller). H200, 2026-11-30: backward alone 3.06-3.10 ms at 4:64:1
// ... 8:128:16 against 4.02-7.74 (the narrow pair, the sweep), 3.40 at 1:128:1 against 7.99; 6.39 at 4:16:1 (R g = 64,
// half-empty tiles) and slower than the narrow pair at 4:16:16 (6.40 against 4.03). D = 64 (session 22, H200,
// 2026-12-01, against BSATTN_BWD_ROWS=0): 2.40-2.41 ms against 2.74-8.55 at 4:64:1, 4:64:16, 4:128:4, 4:128:16, 2.58
// against 6.31 at 1:128:1; at R g = 64 4.62-4.78 against 6.16-7.23 for C = 1, 2, 4, but 4.63-4.68 against 4.20-4.21
// for C = 8 (the pair, no sweep at D = 64), hence C <= 4 there.
inline bool rows_sm90_rule(const Params& p, int D) {
  const int64_t rg = static_cast<int64_t>(p.R) * p.g;
  return (D == 64 || D == 128) && p.C <= 16 && (rg >= 128 || (rg >= 64 && p.C <= (D == 128 ? 8 : 4)));
}
// Whether launch_bwd runs the row-oriented backward for this call (bwd/dispatch.cu): the only backward that does not
// read the column view, which the caller may then leave empty.
bool runs_rows_sm90(const Params& p, int D, bool run_dq, bool run_dkdv);
// The backward of one call (bwd/dispatch.cu): the Hopper kernel where it applies, else dk / dv (run_dkdv) and dq
// (run_dq).
template <int kDType, int kD>
cudaError_t launch_bwd(const Params& p, cudaStream_t stream, bool run_dq, bool run_dkdv);

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
