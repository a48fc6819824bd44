// What a row-oriented backward for C = 1 would pay to scatter its dk / dv (a dev measurement, not part of the
// package). At C = 1 the key-major kernels do a dense sweep's work (csrc/cuda/bwd/README.md, "C <= 16: why the pair
// still runs"); a kernel that walks a block row's listed keys, as the forward does, would instead have to add a D-wide
// dk and dv row into every listed key of every block row. Float atomics would break the bitwise-repeatable dk / dv;
// integer atomics on a fixed-point accumulator are order-free and so repeatable. This times that scatter at the
// grid's C = 1 shapes (M = N = 8192, Hk = 8, D = 128, density 1/4, R = 16 / 64 / 128), with the forward's K / V row
// gather of the same lists beside it for scale:
//   u64   red.global.add.u64, two int64 accumulators [Hk, N, D] (268 MB: past the L2)
//   f32   red.global.add.f32, two float accumulators (not repeatable; for scale)
//   v4f32 red.global.add.v4.f32 (sm_90; not repeatable; for scale)
//   gather 256-byte bf16 K and V rows read per listed key (what the forward's producer reads)
//   u64frag as u64, but from a wgmma accumulator's layout (a warp's 16 keys: a lane holds keys lane / 4 and
//          lane / 4 + 8, columns 8 i + 2 (lane % 4) + {0, 1}): 64 bytes of a row an instruction, no staging
//   bulk  as u64, but each warp stages its key's two int64 rows in shared memory and one lane adds each 1 KB row
//          with cp.reduce.async.bulk .add.u64 (the TMA unit), kSlots rows in flight per warp
// One CTA of 256 threads per (block row, KV head); each warp takes every eighth listed key and covers its whole row
// (the scalar forms lane-consecutive: 128 or 256 contiguous bytes an instruction; v4f32 16 bytes a lane, 512 an
// instruction). Times are medians of 7 runs by CUDA events.
//
//   nvcc -std=c++17 -O3 -arch=sm_90 csrc/cuda/dev/scatter_bench.cu -o /tmp/scatter_bench && /tmp/scatter_bench
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include <cuda_runtime.h>

#define CK(x)                                                                                 \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));           \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

constexpr int kD = 128, kHk = 8, kN = 8192, kThreads = 256;
enum Mode { kU64, kF32, kV4F32, kGather, kU64Frag, kBulkU64 };
constexpr int kSlots = 4;  // kBulkU64: staged rows in flight per warp (2 KB each: the dk and dv rows)

// keys: [MB, per_row] listed keys of each block row (the same list for every KV head, as one layout for all).
template <int MODE>
__global__ void scatter(const int* keys, int per_row, void* acc_k, void* acc_v, const uint4* kv, unsigned* sink) {
  const int br = blockIdx.x, h = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int* list = keys + (size_t)br * per_row;
  unsigned x = 0;
  if constexpr (MODE == kBulkU64) {
    extern __shared__ __align__(128) long long slot_mem[];
    long long* mine = slot_mem + warp * kSlots * 2 * kD;
    int it = 0;
    for (int i = warp; i < per_row; i += kThreads / 32, ++it) {
      const int j = list[i];
      long long* sl = mine + (it % kSlots) * 2 * kD;
      if (it >= kSlots) {
        if (lane == 0) asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kSlots - 1) : "memory");
        __syncwarp();
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const long long a = (long long)(lane + 32 * e + br) << 20;
        sl[lane + 32 * e] = a;
        sl[kD + lane + 32 * e] = a + 1;
      }
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      __syncwarp();
      if (lane == 0) {
        const size_t row = ((size_t)h * kN + j) * kD;
        const uint32_t src = (uint32_t)__cvta_generic_to_shared(sl);
        asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.u64 [%0], [%1], %2;" ::"l"(
                         (long long*)acc_k + row),
                     "r"(src), "r"(kD * 8) : "memory");
        asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.u64 [%0], [%1], %2;" ::"l"(
                         (long long*)acc_v + row),
                     "r"(src + kD * 8), "r"(kD * 8) : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      }
    }
    if (lane == 0) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
  } else if constexpr (MODE == kU64Frag) {
    for (int i0 = warp * 16; i0 < per_row; i0 += kThreads / 2) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int j = list[i0 + lane / 4 + 8 * half];
        long long* pk = (long long*)acc_k + ((size_t)h * kN + j) * kD + 2 * (lane % 4);
        long long* pv = (long long*)acc_v + ((size_t)h * kN + j) * kD + 2 * (lane % 4);
#pragma unroll
        for (int c = 0; c < kD / 8; ++c)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const long long a = (long long)(c + e + br) << 20;
            asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;" ::"l"(pk + 8 * c + e), "l"(a) : "memory");
            asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;" ::"l"(pv + 8 * c + e), "l"(a + 1) : "memory");
          }
      }
    }
  } else {
    for (int i = warp; i < per_row; i += kThreads / 32) {
      const int j = list[i];
      const size_t row = ((size_t)h * kN + j) * kD;  // element offset of (h, j, 0)
      if (MODE == kU64) {
        // Lane-consecutive elements: each instruction covers 256 contiguous bytes (no vector form for integers).
        long long* pk = (long long*)acc_k + row + lane;
        long long* pv = (long long*)acc_v + row + lane;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const long long a = (long long)(lane + 32 * e + br) << 20;
          asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;" ::"l"(pk + 32 * e), "l"(a) : "memory");
          asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;" ::"l"(pv + 32 * e), "l"(a + 1) : "memory");
        }
      } else if (MODE == kF32) {
        float* pk = (float*)acc_k + row + lane;
        float* pv = (float*)acc_v + row + lane;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          asm volatile("red.relaxed.gpu.global.add.f32 [%0], %1;" ::"l"(pk + 32 * e), "f"(1.0f + e) : "memory");
          asm volatile("red.relaxed.gpu.global.add.f32 [%0], %1;" ::"l"(pv + 32 * e), "f"(2.0f + e) : "memory");
        }
      } else if (MODE == kV4F32) {
        float* pk = (float*)acc_k + row + lane * 4;
        float* pv = (float*)acc_v + row + lane * 4;
        asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(pk), "f"(1.f), "f"(2.f),
                     "f"(3.f), "f"(4.f) : "memory");
        asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(pv), "f"(1.f), "f"(2.f),
                     "f"(3.f), "f"(4.f) : "memory");
      } else {
        // bf16 K and V rows: 256 bytes each, 16 bytes a lane (lanes 0-15 K, 16-31 V).
        const size_t kv_row = ((size_t)h * kN + j) * 2 * 16;  // uint4 offset of (h, j): K row then V row
        const uint4 w = kv[kv_row + lane];
        x ^= w.x ^ w.y ^ w.z ^ w.w;
      }
    }
  }
  if (MODE == kGather && x == 0x9e3779b9u) sink[0] = x;  // keeps the loads
}

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  const size_t n_el = (size_t)kHk * kN * kD;
  void *acc_k, *acc_v;
  uint4* kv;
  unsigned* sink;
  int* keys;
  CK(cudaMalloc(&acc_k, n_el * 8));
  CK(cudaMalloc(&acc_v, n_el * 8));
  CK(cudaMalloc(&kv, n_el * 2 * 2));
  CK(cudaMalloc(&sink, 4));
  CK(cudaMemset(acc_k, 0, n_el * 8));
  CK(cudaMemset(acc_v, 0, n_el * 8));
  CK(cudaMemset(kv, 1, n_el * 4));
  const int per_row = kN / 4;  // density 1/4, C = 1
  CK(cudaMalloc(&keys, sizeof(int) * (kN / 16) * per_row));
  constexpr int kBulkSmem = kThreads / 32 * kSlots * 2 * kD * 8;
  CK(cudaFuncSetAttribute(scatter<kBulkU64>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBulkSmem));
  cudaEvent_t t0, t1;
  CK(cudaEventCreate(&t0));
  CK(cudaEventCreate(&t1));
  std::printf("%4s %8s %10s %12s %10s %12s\n", "R", "mode", "ms", "payload GB", "TB/s", "rows/s (G)");
  for (int R : {128, 64, 16}) {
    const int MB = kN / R;
    std::vector<int> all(kN), h_keys((size_t)MB * per_row);
    for (int j = 0; j < kN; ++j) all[j] = j;
    std::mt19937 rng(R);
    for (int b = 0; b < MB; ++b) {
      std::shuffle(all.begin(), all.end(), rng);
      std::sort(all.begin(), all.begin() + per_row);  // a block row's list, ascending as in a BSR layout
      std::copy(all.begin(), all.begin() + per_row, h_keys.begin() + (size_t)b * per_row);
    }
    CK(cudaMemcpy(keys, h_keys.data(), sizeof(int) * h_keys.size(), cudaMemcpyHostToDevice));
    const dim3 grid(MB, kHk);
    const double rows = (double)MB * kHk * per_row;  // (block row, head, key) triples
    for (int mode : {kU64, kU64Frag, kBulkU64, kF32, kV4F32, kGather}) {
      std::vector<float> ms;
      CK(cudaMemset(acc_k, 0, n_el * 8));
      CK(cudaMemset(acc_v, 0, n_el * 8));
      for (int rep = 0; rep < 8; ++rep) {
        CK(cudaEventRecord(t0));
        if (mode == kU64) scatter<kU64><<<grid, kThreads>>>(keys, per_row, acc_k, acc_v, kv, sink);
        if (mode == kF32) scatter<kF32><<<grid, kThreads>>>(keys, per_row, acc_k, acc_v, kv, sink);
        if (mode == kV4F32) scatter<kV4F32><<<grid, kThreads>>>(keys, per_row, acc_k, acc_v, kv, sink);
        if (mode == kGather) scatter<kGather><<<grid, kThreads>>>(keys, per_row, acc_k, acc_v, kv, sink);
        if (mode == kU64Frag) scatter<kU64Frag><<<grid, kThreads>>>(keys, per_row, acc_k, acc_v, kv, sink);
        if (mode == kBulkU64)
          scatter<kBulkU64><<<grid, kThreads, kBulkSmem>>>(keys, per_row, acc_k, acc_v, kv, sink);
        CK(cudaEventRecord(t1));
        CK(cudaEventSynchronize(t1));
        CK(cudaGetLastError());
        float m;
        CK(cudaEventElapsedTime(&m, t0, t1));
        if (rep > 0) ms.push_back(m);  // the first is a warm-up
      }
      std::sort(ms.begin(), ms.end());
      const double med = ms[ms.size() / 2];
      const double bytes = rows * 2 * kD * (mode == kF32 || mode == kV4F32 ? 4 : mode == kGather ? 2 : 8);
      const char* name[] = {"u64", "f32", "v4f32", "gather", "u64frag", "bulk"};
      unsigned long long sum = 0;  // u64 and bulk add the same values: their sums must agree
      if (mode == kU64 || mode == kBulkU64) {
        std::vector<unsigned long long> hk(n_el), hv(n_el);
        CK(cudaMemcpy(hk.data(), acc_k, n_el * 8, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(hv.data(), acc_v, n_el * 8, cudaMemcpyDeviceToHost));
        for (size_t e = 0; e < n_el; ++e) sum += hk[e] * 3 + hv[e] * 7 + (hk[e] >> 7);
      }
      std::printf("%4d %8s %10.3f %12.2f %10.2f %12.2f", R, name[mode], med, bytes / 1e9, bytes / med / 1e9,
                  rows / med / 1e6);
      if (sum) std::printf("   checksum %016llx", sum);
      std::printf("\n");
    }
  }
  CK(cudaDeviceSynchronize());
  return 0;
}
