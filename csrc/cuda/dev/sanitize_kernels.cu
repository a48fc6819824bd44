// Standalone compute-sanitizer harness for the CUDA kernels: the forward, dq and dk / dv launchers called
// directly (no JAX, no XLA: compute-sanitizer crashes inside JAX processes after the first case), on small
// problems with valid layouts and with garbage ones (random int32 in indptr, indices, col_indptr, col_rows),
// bf16, head dims 64, 128 and 256, every tile family (16 / 64 / 128 rows, packed small blocks, split rows). Built with
// BSATTN_WITH_SM90 (and the sm_90a instantiations), it also runs the Hopper backward (one- and two-warpgroup tiles)
// where C > 16 (its launcher called directly, under the conditions bwd/dispatch.cu checks: D <= 128, C > 16).
// Only memory safety and races are checked here; correctness is check_fwd.py / check_bwd.py / tests.
//
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -arch=sm_90 -Icsrc csrc/cuda/dev/sanitize_kernels.cu \
//     csrc/cuda/fwd/instantiations/fwd_bf16_d{64,128,256}.cu \
//     csrc/cuda/bwd/instantiations/{dq,dkdv}_bf16_d{64,128,256}.cu \
//     -o /tmp/sanitize_kernels
//   compute-sanitizer --tool memcheck /tmp/sanitize_kernels      (then --tool racecheck)
// Hopper (benchmarks/gpu_check.sh KERNEL_SANITIZE=1 builds this): -gencode arch=compute_90a,code=sm_90a
//   -DBSATTN_WITH_SM90, plus csrc/cuda/fwd_sm90/instantiations/{fwd_sm90,sweep}_bf16_d{64,128}.cu,
//   fwd_sm90_bf16_d256.cu and fwd_ws_bf16_d128.cu, csrc/cuda/bwd_sm90/instantiations/{bwd,dq}_sm90_bf16_d{64,128}.cu,
//   dq_sm90_bf16_d256.cu, dkdv_sm90_bf16_d{128,256}.cu and dkdv_ws_sm90_bf16_d128.cu and rows_sm90_bf16_d{64,128}.cu
//   (the harness calls launch_dq_sm90, launch_dkdv_sm90 and, where its rule holds, launch_bwd_rows_sm90; BSATTN_FWD_WS
//   and BSATTN_BWD_DKDV pick the forms).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <type_traits>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/bwd/params.h"
#include "cuda/dev/harness.h"
#include "cuda/fwd/params.h"

namespace {

using bsattn::cuda::FwdParams;
using bsattn::cuda::ProblemParams;
namespace bwd = bsattn::cuda::bwd;

struct Case {
  int B, M, N, Hq, Hk, D, R, C;
  bool causal;
  float softcap;
  bool per_head;  // layout [B, Hk, ...] instead of broadcast [1, 1, ...]
  bool garbage;   // random int32 layout arrays
};

std::vector<__nv_bfloat16> random_bf16(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<__nv_bfloat16> h(n);
  for (auto& x : h) x = __float2bfloat16(nd(rng));
  return h;
}

// f(std::integral_constant<int, D>) for the case's head dim D (64, 128 or 256).
template <class F>
cudaError_t with_head_dim(int D, F&& f) {
  if (D == 64) return f(std::integral_constant<int, 64>{});
  if (D == 256) return f(std::integral_constant<int, 256>{});
  return f(std::integral_constant<int, 128>{});
}

void run_case(const Case& c, std::mt19937& rng) {
  const int MB = (c.M + c.R - 1) / c.R, NB = (c.N + c.C - 1) / c.C;
  const int LB = c.per_head ? c.B : 1, LH = c.per_head ? c.Hk : 1, L = LB * LH;
  // layouts: each block row lists a random subset (about half) of the block columns, sorted
  std::vector<int32_t> indptr, indices, col_indptr, col_rows, col_order;
  std::vector<std::vector<int32_t>> rows(static_cast<size_t>(L) * MB);
  size_t nnz = 0;
  for (auto& r : rows) {
    for (int j = 0; j < NB; ++j)
      if (rng() % 2) r.push_back(j);
    nnz = std::max(nnz, r.size() * MB);  // >= every layout's total: the rest of each list is padding (-1)
  }
  nnz = std::max<size_t>(nnz, 1);
  indptr.assign(static_cast<size_t>(L) * (MB + 1), 0);
  indices.assign(static_cast<size_t>(L) * nnz, -1);  // padding entries are -1
  col_indptr.assign(static_cast<size_t>(L) * (NB + 1), 0);
  col_rows.assign(static_cast<size_t>(L) * nnz, -1);
  col_order.assign(static_cast<size_t>(L) * NB, 0);  // the Hopper backward's CTA order: longest columns first
  for (int l = 0; l < L; ++l) {
    int pos = 0;
    std::vector<std::vector<int32_t>> cols(NB);
    for (int i = 0; i < MB; ++i) {
      indptr[l * (MB + 1) + i] = pos;
      for (int j : rows[l * MB + i]) {
        indices[l * nnz + pos++] = j;
        cols[j].push_back(i);
      }
    }
    indptr[l * (MB + 1) + MB] = pos;
    int cp = 0;
    for (int j = 0; j < NB; ++j) {
      col_indptr[l * (NB + 1) + j] = cp;
      for (int i : cols[j]) col_rows[l * nnz + cp++] = i;
    }
    col_indptr[l * (NB + 1) + NB] = cp;
    int32_t* order = col_order.data() + static_cast<size_t>(l) * NB;
    for (int j = 0; j < NB; ++j) order[j] = j;
    std::stable_sort(order, order + NB, [&](int32_t x, int32_t y) { return cols[x].size() > cols[y].size(); });
  }
  if (c.garbage) {
    std::uniform_int_distribution<int32_t> any(-1000, 1000);
    for (auto* a : {&indptr, &indices, &col_indptr, &col_rows, &col_order})
      for (auto& x : *a) x = (rng() % 4 == 0) ? static_cast<int32_t>(rng()) : any(rng);
  }

  const size_t nq = static_cast<size_t>(c.B) * c.M * c.Hq * c.D, nk = static_cast<size_t>(c.B) * c.N * c.Hk * c.D;
  const size_t nl = static_cast<size_t>(c.B) * c.M * c.Hq;
  auto* q = to_device(random_bf16(nq, rng));
  auto* k = to_device(random_bf16(nk, rng));
  auto* v = to_device(random_bf16(nk, rng));
  auto* dout = to_device(random_bf16(nq, rng));
  auto* d_indptr = to_device(indptr);
  auto* d_indices = to_device(indices);
  auto* d_col_indptr = to_device(col_indptr);
  auto* d_col_rows = to_device(col_rows);
  auto* d_col_order = to_device(col_order);
  std::vector<float> delta_h(nl);
  for (auto& x : delta_h) x = 0.01f * static_cast<float>(rng() % 100);
  auto* delta = to_device(delta_h);
  __nv_bfloat16 *o, *dq, *dk, *dv;
  float* lse;
  CK(cudaMalloc(&o, nq * 2));
  CK(cudaMalloc(&dq, nq * 2));
  CK(cudaMalloc(&dk, nk * 2));
  CK(cudaMalloc(&dv, nk * 2));
  CK(cudaMalloc(&lse, nl * 4));

  ProblemParams pp{};
  const float scale = 1.f / std::sqrt(static_cast<float>(c.D));
  bsattn::cuda::fill_problem(pp, c.B, c.M, c.N, c.Hq, c.Hk, c.R, c.C,
                             bsattn::cuda::Layout{MB, NB, LB, LH, static_cast<int64_t>(nnz)}, c.causal, scale,
                             c.softcap);

  FwdParams fp{};
  static_cast<ProblemParams&>(fp) = pp;
  fp.q = q, fp.k = k, fp.v = v, fp.indptr = d_indptr, fp.indices = d_indices, fp.o = o, fp.lse = lse;
  // the forward's workspace: the sweep's bit maps built by the table pass where the sweep runs and they fit
  // (BSATTN_FWD_SWEEP_TABLE=0: each CTA builds its own, as with an empty workspace), else the row split's area
  uint32_t* fwd_ws = nullptr;
  fp.ws_words = bsattn::cuda::fwd_workspace_words(pp, c.D);
  if (fp.ws_words > 0) CK(cudaMalloc(&fwd_ws, fp.ws_words * 4));
  fp.ws = fwd_ws;
  bwd::Params bp{};
  static_cast<ProblemParams&>(bp) = pp;
  bp.q = q, bp.k = k, bp.v = v, bp.dout = dout, bp.lse = lse, bp.delta = delta;
  bp.indptr = d_indptr, bp.indices = d_indices, bp.col_indptr = d_col_indptr, bp.col_rows = d_col_rows;
  bp.col_order = d_col_order;
  bp.dq = dq, bp.dk = dk, bp.dv = dv, bp.scale = scale;

  using bsattn::cuda::kBF16;
  cudaError_t e1, e2, e3;
  with_head_dim(c.D, [&](auto d) {
    constexpr int D = decltype(d)::value;
    e1 = bsattn::cuda::launch_fwd<kBF16, D>(fp, 0);  // (on Hopper the wgmma forward where R * g > 16)
    e2 = bwd::launch_dq<kBF16, D>(bp, 0);
    e3 = bwd::launch_dkdv<kBF16, D>(bp, 0);
#ifdef BSATTN_WITH_SM90
    // the Hopper narrow-column dk / dv where it applies (after the mma.sync one, over the same outputs)
    if constexpr (D != 64)
      if (e3 == cudaSuccess && bwd::dkdv_sm90_applies(bp, D)) e3 = bwd::launch_dkdv_sm90<kBF16, D>(bp, 0);
#endif
    return cudaSuccess;
  });
  cudaError_t e4 = cudaSuccess;  // the Hopper backward (dq through the f32 workspace)
  const char* hopper = "not run";
#ifdef BSATTN_WITH_SM90
  float* dq_accum = nullptr;
  // (+ the sweep form's tables: launch_bwd_sm90 takes the sweep where BSATTN_BWD_SWEEP and its rule say so)
  const int64_t acc_words = nq + bsattn::cuda::bwd::kDqSchedWords + bwd::sweep_workspace_words(bp);
  CK(cudaMalloc(&dq_accum, acc_words * 4));
  bp.dq_accum = dq_accum;
  bp.dq_accum_words = acc_words;
  const bool one_pass = c.D <= 128 && bwd::bwd_sm90_applies(bp, c.D);  // (the one-pass kernels: D = 64, 128)
  if (one_pass) {
    e4 = c.D == 64 ? bwd::launch_bwd_sm90<kBF16, 64>(bp, 0) : bwd::launch_bwd_sm90<kBF16, 128>(bp, 0);
    const bool wide = c.D == 128 && c.C >= 128 && (c.C % 128 == 0 || c.C % 128 > 64);  // bwd_sm90/launch.cuh
    hopper = bwd::sm90_sweep_applies(bp, c.D) ? "Hopper, sweep (or packed columns after a duplicate)"
             : c.C <= 16                     ? "Hopper, packed columns"
             : wide                          ? "Hopper, two warpgroups"
                                             : "Hopper, one warpgroup";
  }
  if (e4 == cudaSuccess && bwd::dq_sm90_applies(bp)) {  // the Hopper dq kernel
    e4 = with_head_dim(c.D, [&](auto d) { return bwd::launch_dq_sm90<kBF16, decltype(d)::value>(bp, 0); });
    hopper = one_pass ? "Hopper, then Hopper dq" : "Hopper dq";
  }
  float* rows_ws = nullptr;  // the row-oriented backward where its rule holds (its own workspace, over the same outputs)
  if (e4 == cudaSuccess && bwd::rows_sm90_rule(bp, c.D)) {
    const int64_t rw = bwd::rows_workspace_words(bp, c.D);
    CK(cudaMalloc(&rows_ws, rw * 4));
    bwd::Params rp = bp;
    rp.dq_accum = rows_ws;
    rp.dq_accum_words = rw;
    e4 = c.D == 64 ? bwd::launch_bwd_rows_sm90<kBF16, 64>(rp, 0) : bwd::launch_bwd_rows_sm90<kBF16, 128>(rp, 0);
    hopper = "Hopper dq, then the row-oriented backward";
  }
#endif
  const cudaError_t es = cudaDeviceSynchronize();
  std::printf("case B=%d M=%d N=%d Hq=%d Hk=%d D=%d R=%d C=%d causal=%d cap=%g per_head=%d garbage=%d nnz=%zu: "
              "fwd %s, dq %s, dkdv %s, %s %s, sync %s\n",
              c.B, c.M, c.N, c.Hq, c.Hk, c.D, c.R, c.C, c.causal, c.softcap, c.per_head, c.garbage, nnz,
              cudaGetErrorString(e1), cudaGetErrorString(e2), cudaGetErrorString(e3), hopper, cudaGetErrorString(e4),
              cudaGetErrorString(es));
#ifdef BSATTN_WITH_SM90
  CK(cudaFree(dq_accum));
  if (rows_ws != nullptr) CK(cudaFree(rows_ws));
#endif
  std::fflush(stdout);
  for (void* ptr : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(dout),
                    static_cast<void*>(d_indptr), static_cast<void*>(d_indices), static_cast<void*>(d_col_indptr),
                    static_cast<void*>(d_col_rows), static_cast<void*>(d_col_order), static_cast<void*>(delta),
                    static_cast<void*>(o), static_cast<void*>(dq), static_cast<void*>(dk), static_cast<void*>(dv),
                    static_cast<void*>(lse), static_cast<void*>(fwd_ws)})
    CK(cudaFree(ptr));
  if (e1 != cudaSuccess || e2 != cudaSuccess || e3 != cudaSuccess || e4 != cudaSuccess || es != cudaSuccess)
    std::exit(1);
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  const Case cases[] = {
      // B  M    N    Hq Hk  D   R    C   causal cap  per_head garbage
      {2, 200, 300, 8, 2, 128, 16, 16, true, 0.f, false, false},   // 64-row tile, dk/dv BK=16
      {1, 100, 77, 8, 2, 128, 3, 5, false, 30.f, true, false},     // 16-row tile, packed dk/dv, soft cap
      {1, 130, 260, 4, 4, 128, 64, 64, false, 0.f, false, true},   // garbage, 64-row / 64-key tiles
      {1, 256, 256, 8, 1, 128, 128, 128, true, 0.f, false, false}, // R * g = 1024: split rows, 128-row tile
      {1, 50, 60, 4, 1, 64, 1, 1, false, 0.f, false, false},       // D = 64, C = 1 packed
      {2, 50, 60, 4, 1, 64, 1, 1, true, 0.f, true, true},          // D = 64 garbage, per-head
      {1, 96, 100, 4, 2, 128, 16, 4, false, 0.f, false, true},     // packed, garbage
      {1, 70, 90, 2, 1, 128, 32, 24, true, 0.f, false, true},      // non-multiples, garbage
      {1, 130, 200, 8, 2, 64, 32, 16, true, 0.f, false, true},     // D = 64, 128-row tile, garbage
      {1, 90, 100, 4, 4, 64, 64, 8, false, 0.f, true, true},       // D = 64, 64-row tile, per-head garbage
      {1, 90, 100, 8, 2, 64, 16, 4, true, 0.f, true, true},        // D = 64, R * g = 64, C = 4: half-empty row tiles
      {1, 150, 530, 8, 2, 128, 32, 200, true, 0.f, false, true},   // C = 200: the Hopper two-warpgroup tile, garbage
      {2, 100, 300, 8, 2, 128, 16, 128, false, 20.f, true, false}, // C = 128, per-head, soft cap: two warpgroups
      {1, 120, 300, 4, 1, 64, 64, 100, true, 0.f, false, false},   // D = 64, C = 100: one warpgroup, partial tile
      {1, 300, 200, 8, 2, 128, 64, 1, true, 0.f, false, true},     // compact (R * g = 256), garbage; row-oriented
      {2, 130, 150, 8, 2, 128, 128, 2, false, 10.f, true, false},  // compact, C = 2, R * g = 512, per-head, cap
      {1, 100, 250, 8, 2, 128, 64, 12, false, 0.f, true, true},   // C = 12: the 16-key column kernel, per-head garbage
      {2, 90, 333, 4, 1, 128, 16, 16, true, 30.f, false, true},   // C = 16: the narrow-column kernels, causal, cap, garbage
      {1, 500, 520, 2, 1, 128, 1, 3, true, 0.f, false, false},    // C = 3: Hopper packed columns (21 a CTA), R = 1, 2 windows
      {2, 100, 150, 4, 1, 128, 2, 1, false, 15.f, true, true},    // C = 1, per-head garbage, soft cap: packed columns
      {2, 120, 200, 8, 2, 128, 16, 4, true, 0.f, true, true},    // R * g = 64, C = 4: row-oriented, half-empty tiles
      {1, 100, 150, 8, 2, 256, 16, 1, true, 0.f, false, false},  // D = 256, C = 1: packed columns, two passes
      {2, 70, 90, 4, 2, 256, 3, 3, false, 20.f, true, true},     // D = 256, C = 3: packed, per-head garbage, cap
      {1, 130, 200, 8, 2, 256, 64, 2, true, 10.f, true, true},   // D = 256, R * g = 256: wgmma forward, garbage, cap
      {1, 150, 170, 8, 2, 256, 16, 40, true, 0.f, false, true},  // D = 256, C = 40: Hopper dq, narrow 16-key chunks, garbage
      {2, 100, 120, 4, 1, 256, 32, 12, false, 15.f, true, false}, // D = 256, C = 12: narrow dk / dv, per-head, cap
  };
  for (const Case& c : cases) run_case(c, rng);
  std::printf("all cases ran\n");
  return 0;
}
