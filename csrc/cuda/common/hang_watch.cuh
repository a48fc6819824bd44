// A debugging aid for a persistent warp-specialised kernel that never finishes (compiled in only with
// -DBSATTN_HANG_WATCH, e.g. CUDAFLAGS=-DBSATTN_HANG_WATCH at build time; never in a release build).
//
// Each warp's lane 0 writes where it is (a site number and two values) into its slot of a table in mapped host
// memory before each wait or barrier (HANG_MARK). A host thread started with the first launch reads the table every
// second; when it has not changed for 5 s while some warp has not reached its exit mark, it prints the table to
// stderr: the deadlock's snapshot, named barriers included (a warp stuck in bar.sync shows the mark before it). The
// kernel must not run inside a CUDA graph (XLA_FLAGS=--xla_gpu_enable_command_buffer= ): the table is allocated at
// the first launch.
#pragma once

#ifdef BSATTN_HANG_WATCH

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <thread>

#include <cuda_runtime.h>

namespace bsattn {
namespace cuda {

constexpr int kHangSlots = 160 * 16;  // CTAs x warps a CTA (grid <= the SMs, warps <= 16)
constexpr int kHangExit = 99;         // the site of a warp's exit mark

struct HangSlot {
  int site, a, b, seen;  // seen: 1 once the warp has marked
};

// The table (device pointer to mapped host memory) and its host watcher; null if the allocation failed.
inline HangSlot* hang_table() {
  static HangSlot* dev = [] {
    HangSlot* host = nullptr;
    if (cudaHostAlloc(reinterpret_cast<void**>(&host), sizeof(HangSlot) * kHangSlots, cudaHostAllocMapped) !=
        cudaSuccess) {
      (void)cudaGetLastError();
      return static_cast<HangSlot*>(nullptr);
    }
    std::memset(host, 0, sizeof(HangSlot) * kHangSlots);
    HangSlot* d = nullptr;
    if (cudaHostGetDevicePointer(reinterpret_cast<void**>(&d), host, 0) != cudaSuccess) {
      (void)cudaGetLastError();
      return static_cast<HangSlot*>(nullptr);
    }
    std::thread([host] {
      static HangSlot prev[kHangSlots];
      int still = 0;
      for (;;) {
        std::this_thread::sleep_for(std::chrono::seconds(1));
        volatile HangSlot* t = host;
        bool same = true, busy = false;
        for (int i = 0; i < kHangSlots; ++i) {
          const HangSlot s{t[i].site, t[i].a, t[i].b, t[i].seen};
          same &= std::memcmp(&s, &prev[i], sizeof s) == 0;
          busy |= s.site != 0 && s.site != kHangExit;
          prev[i] = s;
        }
        still = same && busy ? still + 1 : 0;
        if (still == 5) {
          std::fprintf(stderr, "HANG WATCH: no progress for 5 s; cta warp site a b\n");
          for (int i = 0; i < kHangSlots; ++i)
            if (prev[i].seen > 0)
              std::fprintf(stderr, "HANG %d %d %d %d %d\n", i / 16, i % 16, prev[i].site, prev[i].a, prev[i].b);
          std::fflush(stderr);
        }
      }
    }).detach();
    return d;
  }();
  return dev;
}

// Lane 0 of the calling warp records (site, a, b) in its slot: posted stores to host memory, no fence and no read
// back (a first version that counted marks and fenced each one slowed the backward 10-fold, and then it never hung).
__device__ __forceinline__ void hang_mark(HangSlot* t, int site, int a, int b) {
  if (t == nullptr || (threadIdx.x & 31) != 0) return;
  volatile int* v = reinterpret_cast<volatile int*>(t + (blockIdx.x % 160) * 16 + (threadIdx.x >> 5));
  v[0] = site;
  v[1] = a;
  v[2] = b;
  v[3] = 1;
}

}  // namespace cuda
}  // namespace bsattn

#define HANG_MARK(site, a, b) ::bsattn::cuda::hang_mark(hang_tab, (site), (a), (b))
#define HANG_PARAM , ::bsattn::cuda::HangSlot* hang_tab
#define HANG_ARG , ::bsattn::cuda::hang_table()

#else

#define HANG_MARK(site, a, b) ((void)0)
#define HANG_PARAM
#define HANG_ARG

#endif
