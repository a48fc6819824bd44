// Hopper (sm_90a) plumbing of the warpgroup-MMA kernels (fwd_sm90/, bwd_sm90/): shared-memory matrix descriptors,
// the fences that order wgmma.mma_async (an asynchronous-proxy reader of shared memory and writer of registers)
// with the rest of the kernel, and the other sm_90 instructions they use (stmatrix, vector red, bulk reduce). The wgmma
// instructions themselves are generated: wgmma_ops.cuh.
#pragma once

#include <cstdint>

#include "cuda/common/wgmma_ops.cuh"
#include "cuda/fwd/mma.cuh"

namespace bsattn {
namespace cuda {

// The first 1024-byte-aligned byte of the dynamic shared memory `raw` (the 128-byte swizzle's tiles must start on
// 1024 bytes; the kernels' configurations reserve 1024 bytes of slack for this): returned as a pointer, its shared
// address in `addr`. (fwd_sm90/kernel.cuh keeps the open-coded lines: through this helper ptxas laid out its address
// arithmetic differently, and that timed kernel's SASS is kept as measured.)
__device__ __forceinline__ uint8_t* align_smem_1024(uint8_t* raw, uint32_t& addr) {
  const uint32_t a = smem_u32(raw);
  const uint32_t pad = ((a + 1023u) & ~1023u) - a;
  addr = a + pad;
  return raw + pad;
}

// Descriptor of a matrix in a 128-byte-swizzled canonical layout (common/gather.cuh AtomSwizzle) starting at
// shared address `addr`. K-major (A = Q, B = K): sbo = 1024 (the next 8 rows), lbo unused (16). MN-major
// (B = V): lbo = the next 64-wide column block, sbo = 1024 (the next 8 rows along k). The address field is
// addr / 16 in the low 14 bits, so adding bytes / 16 to a descriptor moves its start.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (uint64_t{1} << 62);
}

// acc (64 x N) (+)= A B^T over a contraction of KD (the D / 16 k16 steps of wgmma ss, issued, not committed): A = 64
// rows of a K-major 128-byte-swizzled tile of AROWS rows, B = the N rows of one of BROWS rows (common/gather.cuh
// AtomSwizzle); step kk is 32 bytes into column block kk / 4 of each. The first step overwrites acc. S = Q K^T (the
// forward, dq), s^T = K q^T and dp^T = V do^T (the one-pass backward).
template <typename T, int N, int KD, int AROWS, int BROWS>
__device__ __forceinline__ void wgmma_ss_kmajor(float (&acc)[N / 2], uint64_t a_desc, uint64_t b_desc) {
#pragma unroll
  for (int kk = 0; kk < KD / 16; ++kk)
    WgmmaOp<T, N>::ss(acc, a_desc + (((kk >> 2) * AROWS * 128 + (kk & 3) * 32) >> 4),
                      b_desc + (((kk >> 2) * BROWS * 128 + (kk & 3) * 32) >> 4), kk > 0 ? 1 : 0);
}

// acc (64 x N) += A B over KSTEPS k16 steps (wgmma rs, issued, not committed): A from registers (a[kk]: the m16n8k16 A
// fragments), B read MN-major from a 128-byte-swizzled tile (16 rows, 2048 bytes, a step). O += P V, dQ += dS K,
// dv += p^T do, dk += ds^T q.
template <typename T, int N, int KSTEPS>
__device__ __forceinline__ void wgmma_rs_mn(float (&acc)[N / 2], const uint32_t (&a)[KSTEPS][4], uint64_t b_desc) {
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) WgmmaOp<T, N>::rs(acc, a[kk], b_desc + kk * (2048 >> 4), 1);
}

// Orders this warpgroup's register writes (accumulators, A fragments) before the next wgmma.mma_async.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed wgmma groups of this warpgroup are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's generic-proxy shared-memory writes (cp.async, st.shared) visible to the async proxy
// (wgmma operand reads) once a barrier orders them; or, after an mbarrier wait (acquire), the writes that wait
// made visible to this thread, other threads' landed cp.async copies included (fwd_sm90/kernel_ws.cuh).
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Pins registers in place around asynchronous wgmma: the compiler may not move their reads or writes across.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// Four 8 x 8 b16 matrices from registers (the m16n8 accumulator / A-fragment layout: lane holds row lane / 4,
// columns 2 (lane % 4) + {0, 1} of each) to shared memory transposed: row i of stored matrix m (16 contiguous
// bytes at the address lane 8 m + i passes) is column i of register matrix m.
__device__ __forceinline__ void stsm_x4_trans(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r[0]),
               "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// dst[0] += a, dst[1] += b in global memory (one relaxed, gpu-scope vector reduction; dst 8-byte aligned).
__device__ __forceinline__ void red_add_f32x2(float* dst, float a, float b) {
  asm volatile("red.relaxed.gpu.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(a), "f"(b) : "memory");
}

__device__ __forceinline__ void st_shared_f32x2(uint32_t dst, float a, float b) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(dst), "f"(a), "f"(b) : "memory");
}

// dst[i] += src[i] for `bytes` / 4 floats, global += shared, by the bulk copy engine (asynchronous: the source must
// stay unchanged until bulk_wait_read; its writes must be fenced to the async proxy first). 16-byte aligned, bytes a
// multiple of 16. Completion is tracked per thread: bulk_commit, then bulk_wait_read (source read) / bulk_wait (done).
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
}
// The same, through a 4-d tensor map (TMA): the box at coordinates {c0, c1, c2, c3} (innermost first) added from
// shared memory laid out as the map's box (and swizzle); elements outside the tensor are skipped. `map`: the generic
// address of a __grid_constant__ CUtensorMap.
__device__ __forceinline__ void bulk_tensor_reduce_add_4d(const void* map, uint32_t src, int c0, int c1, int c2,
                                                          int c3) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(src)
      : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

// mbarrier (shared::cta) for the warp-specialised kernel: init (one thread, before a CTA barrier), arrive (release,
// CTA scope: orders the thread's earlier shared-memory writes before the phase completes), and a spin on the
// phase parity (acquire).
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred P1;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 P1, [%0], %1;\n"
      "@!P1 bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// An arrive-on that fires once every cp.async the thread issued before it has landed: it raises the phase's pending
// count now and lowers it then, so the phase cannot complete before those copies have (the thread arrives as well,
// mbar_arrive, which also releases its plain stores).
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Barrier `id` (1..15) among `count` threads (a multiple of 32): the consumer warps of a warp-specialised CTA.
__device__ __forceinline__ void named_bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
// Warpgroup register reallocation (sm_90a): the producer gives registers back, the consumers take them.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

}  // namespace cuda
}  // namespace bsattn
