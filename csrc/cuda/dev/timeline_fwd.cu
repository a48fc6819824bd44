// Per-CTA timeline of the forward kernel (development tool, no JAX): where the time of one launch goes.
// Lane 0 of every warp records %globaltimer at the marks of kernel.cuh (BSATTN_FWD_TIMELINE_MARK): 0 start,
// 1 Q copies issued, 2 prologue barrier passed, 3 first KV tiles issued, 4 first KV tile landed, 5 main loop
// done, 6 epilogue barrier passed, 7 output stored. Prints the launch time (CUDA events, median) and the mean
// phase lengths per warp.
//
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -DBSATTN_WITH_SM90 -Icsrc \
//     csrc/cuda/dev/timeline_fwd.cu -o timeline_fwd
//   ./timeline_fwd 4:128:128:0.25 4:64:64:1.0:0.5 ...   (g:R:C:density[:jitter of the row lengths]; M = N = 8192, Hq = 32, D = 128 (HARNESS_D=64: 64), bf16)
// FWD_KERNEL=mma times the mma.sync kernel (default: what launch_fwd picks); CMP=1 also runs both kernels on the
// same inputs and prints their largest differences (o, lse).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <cstring>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/dev/harness.h"

constexpr int kMarks = 8, kMaxWarps = 8, kMaxCtas = 1 << 15;
__device__ unsigned long long g_tl[kMaxCtas][kMaxWarps][kMarks];  // per CTA and warp: %globaltimer at each mark

#ifdef TIMELINE_OFF  // (-DTIMELINE_OFF: the same harness timing the kernel without marks)
#define BSATTN_FWD_TIMELINE_MARK(k)
#else
#define BSATTN_FWD_TIMELINE_MARK(k)                                                        \
  do {                                                                                     \
    if ((threadIdx.x & 31) == 0 && (threadIdx.x >> 5) < kMaxWarps && blockIdx.x < kMaxCtas) { \
      unsigned long long t_;                                                               \
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));                               \
      g_tl[blockIdx.x][threadIdx.x >> 5][k] = t_;                                          \
    }                                                                                      \
  } while (0)
#endif

#include "cuda/fwd/launch.cuh"
#ifdef BSATTN_WITH_SM90
#include "cuda/fwd_sm90/launch.cuh"
#include "cuda/fwd_sm90/launch_ws.cuh"  // (launch_fwd_sm90 calls it for the 128-row tile at D = 128)
#endif

namespace {


double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <int D>
void run(int g, int R, int C, double density, double jitter, std::mt19937& rng) {
  const int B = 1, M = 8192, N = 8192, Hq = 32, Hk = Hq / g;
  const int MB = (M + R - 1) / R, NB = (N + C - 1) / C;
  const int per_row = std::max(1, static_cast<int>(std::lround(density * NB)));
  std::vector<int32_t> indptr(MB + 1), indices;
  std::vector<int32_t> cols(NB);
  for (int j = 0; j < NB; ++j) cols[j] = j;
  // jitter j: row i holds per_row * (1 + j * u_i) blocks, u_i uniform in [-1, 1], paired so that the total
  // stays MB * per_row (desynchronises the CTAs without changing the work)
  std::vector<int> count(MB, per_row);
  for (int i = 0; i + 1 < MB; i += 2) {
    const int d = static_cast<int>(std::lround(jitter * per_row * std::uniform_real_distribution<double>(-1, 1)(rng)));
    const int dd = std::max(-per_row + 1, std::min(std::min(d, NB - per_row), per_row - 1));
    count[i] += dd, count[i + 1] -= dd;
  }
  std::shuffle(count.begin(), count.end(), rng);
  for (int i = 0; i < MB; ++i) {
    indptr[i] = static_cast<int32_t>(indices.size());
    std::shuffle(cols.begin(), cols.end(), rng);
    std::vector<int32_t> row(cols.begin(), cols.begin() + count[i]);
    std::sort(row.begin(), row.end());
    indices.insert(indices.end(), row.begin(), row.end());
  }
  indptr[MB] = static_cast<int32_t>(indices.size());
  const int64_t nnz = static_cast<int64_t>(indices.size());

  std::normal_distribution<float> nd(0.f, 1.f);
  auto rnd = [&](size_t n) {
    std::vector<__nv_bfloat16> h(n);
    for (auto& x : h) x = __float2bfloat16(nd(rng));
    return h;
  };
  const size_t nq = static_cast<size_t>(B) * M * Hq * D, nk = static_cast<size_t>(B) * N * Hk * D;
  auto* q = to_device(rnd(nq));
  auto* k = to_device(rnd(nk));
  auto* v = to_device(rnd(nk));
  auto* d_indptr = to_device(indptr);
  auto* d_indices = to_device(indices);
  __nv_bfloat16* o;
  float* lse;
  CK(cudaMalloc(&o, nq * 2));
  CK(cudaMalloc(&lse, static_cast<size_t>(B) * M * Hq * 4));

  bsattn::cuda::FwdParams fp{};
  bsattn::cuda::fill_problem(fp, B, M, N, Hq, Hk, R, C, bsattn::cuda::Layout{MB, NB, 1, 1, nnz}, false,
                             1.f / std::sqrt(static_cast<float>(D)), 0.f);
  fp.q = q, fp.k = k, fp.v = v, fp.indptr = d_indptr, fp.indices = d_indices, fp.o = o, fp.lse = lse;
  const char* fam = std::getenv("FWD_KERNEL");
  const bool mma_only = fam && std::strcmp(fam, "mma") == 0;
  auto launch_mma = [&] { CK((bsattn::cuda::launch_fwd_mma<bsattn::cuda::kBF16, D>(fp, 0))); };
  auto launch = [&] {
    if (mma_only)
      launch_mma();
    else
      CK((bsattn::cuda::launch_fwd<bsattn::cuda::kBF16, D>(fp, 0)));
  };

  // time: median over 20 launches (each alone between events), after warm-up
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) launch();
  std::vector<double> ms;
  for (int i = 0; i < 20; ++i) {
    CK(cudaEventRecord(e0));
    launch();
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float t;
    CK(cudaEventElapsedTime(&t, e0, e1));
    ms.push_back(t);
  }
  const double t_ms = median(ms);
  const double flops = 4.0 * nnz * R * C * D * Hq;

  // one launch's o and lse, copied back (o poisoned first: an unwritten element shows)
  const size_t nl = static_cast<size_t>(B) * M * Hq;
  auto fetch = [&](auto&& launch_fn, std::vector<__nv_bfloat16>& oh, std::vector<float>& lh) {
    oh.resize(nq);
    lh.resize(nl);
    CK(cudaMemset(o, 0xff, nq * 2));
    launch_fn();
    CK(cudaMemcpy(oh.data(), o, nq * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(lh.data(), lse, nl * 4, cudaMemcpyDeviceToHost));
  };
  std::vector<__nv_bfloat16> o1, o2;
  std::vector<float> l1, l2;

  // BSATTN_FWD_TUNE variants (-DBSATTN_FWD_TUNING builds): compare o and lse with variant REF_TUNE (bitwise)
  if (const char* ref = std::getenv("REF_TUNE")) {
    fetch(launch, o1, l1);
    const char* cur = std::getenv("BSATTN_FWD_TUNE");
    const std::string keep = cur ? cur : "";
    setenv("BSATTN_FWD_TUNE", ref, 1);
    fetch(launch, o2, l2);
    setenv("BSATTN_FWD_TUNE", keep.c_str(), 1);
    size_t od = 0, ld = 0;
    for (size_t i = 0; i < nq; ++i) od += std::memcmp(&o1[i], &o2[i], 2) != 0;
    for (size_t i = 0; i < nl; ++i) ld += std::memcmp(&l1[i], &l2[i], 4) != 0;
    std::printf("  vs variant %s: %zu of %zu o values differ, %zu of %zu lse\n", ref, od, nq, ld, nl);
  }

  // CMP=1: the picked kernel against the mma.sync kernel (two correct kernels differ by bf16 roundings of o)
  if (std::getenv("CMP")) {
    fetch(launch, o1, l1);
    fetch(launch_mma, o2, l2);
    double od = 0, osum = 0, omax = 0, ld = 0;
    size_t bad = 0;
    for (size_t i = 0; i < nq; ++i) {
      const double a = __bfloat162float(o1[i]), b = __bfloat162float(o2[i]);
      const double d = std::fabs(a - b);
      if (!(d <= 1e30)) ++bad;
      else od = std::max(od, d), osum += d;
      omax = std::max(omax, std::fabs(b));
    }
    for (size_t i = 0; i < nl; ++i) {
      const double d = std::fabs(static_cast<double>(l1[i]) - l2[i]);
      if (!(d <= 1e30) && !(std::isinf(l1[i]) && l1[i] == l2[i])) ++bad;
      else if (d <= 1e30) ld = std::max(ld, d);
    }
    std::printf("  vs mma.sync kernel: o max |diff| %.3g (mean %.3g, max |o| %.3g), lse max |diff| %.3g, %zu non-finite "
                "mismatches\n", od, osum / nq, omax, ld, bad);
  }

  // timeline of one more launch
  const size_t nslot = static_cast<size_t>(kMaxCtas) * kMaxWarps * kMarks;
  std::vector<unsigned long long> tl(nslot, 0);
  CK(cudaMemcpyToSymbol(g_tl, tl.data(), nslot * 8));
  launch();
  CK(cudaDeviceSynchronize());
  CK(cudaMemcpyFromSymbol(tl.data(), g_tl, nslot * 8));
  const int packed = R * g, tm = bsattn::cuda::packed_tile_rows(packed);
  const int nsplit = (packed + tm - 1) / tm;
  const int grid = std::min(B * Hk * MB * nsplit, kMaxCtas);
  // phase k = mark k - mark k-1, summed over every warp; the loop-end spread is per CTA (marks 5 of its warps)
  unsigned long long t_min = ~0ull, t_max = 0;
  double ph[kMarks] = {0}, loop_end_spread = 0;
  int warps = 0, ctas = 0;
  for (int b = 0; b < grid; ++b) {
    const auto* r = &tl[static_cast<size_t>(b) * kMaxWarps * kMarks];
    if (r[0] == 0 || r[kMarks - 1] == 0) continue;
    unsigned long long end_lo = ~0ull, end_hi = 0, last = 0;
    for (int w = 0; w < kMaxWarps && r[w * kMarks]; ++w, ++warps) {
      const auto* x = r + w * kMarks;
      for (int k = 1; k < kMarks; ++k) ph[k] += (x[k] - x[k - 1]) * 1e-3;
      end_lo = std::min(end_lo, x[5]), end_hi = std::max(end_hi, x[5]), last = std::max(last, x[kMarks - 1]);
    }
    loop_end_spread += (end_hi - end_lo) * 1e-3;
    t_min = std::min(t_min, r[0]);
    t_max = std::max(t_max, last);
    ++ctas;
  }
  const double span = (t_max - t_min) * 1e-3;
  std::printf("D%d g%d R%d C%d dens %.3f jitter %.2f: nnz %lld, %d CTAs of %d rows, %.3f ms, %.1f TFLOP/s | span %.1f us | per warp "
              "(us): Q issue %.2f, barrier %.2f, KV issue %.2f, first tile wait %.2f, loop %.2f, epilogue barrier %.2f, "
              "store %.2f | "
              "loop-end spread over a CTA's warps %.2f us\n",
              D, g, R, C, density, jitter, static_cast<long long>(nnz), grid, tm, t_ms, flops / t_ms * 1e-9, span, ph[1] / warps,
              ph[2] / warps, ph[3] / warps, ph[4] / warps, ph[5] / warps, ph[6] / warps, ph[7] / warps,
              loop_end_spread / std::max(1, ctas));
  std::fflush(stdout);
  for (void* ptr : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(d_indptr),
                    static_cast<void*>(d_indices), static_cast<void*>(o), static_cast<void*>(lse)})
    CK(cudaFree(ptr));
}

}  // namespace

int main(int argc, char** argv) {
  std::mt19937 rng(11);
  const int head_dim = std::getenv("HARNESS_D") ? std::atoi(std::getenv("HARNESS_D")) : 128;  // 64 or 128
  for (int i = 1; i < argc; ++i) {
    int g, R, C;
    double dens, jitter = 0;
    if (std::sscanf(argv[i], "%d:%d:%d:%lf:%lf", &g, &R, &C, &dens, &jitter) < 4) {
      std::fprintf(stderr, "bad cell %s (want g:R:C:density[:jitter])\n", argv[i]);
      return 2;
    }
    if (head_dim == 64)
      run<64>(g, R, C, dens, jitter, rng);
    else
      run<128>(g, R, C, dens, jitter, rng);
  }
  return 0;
}
