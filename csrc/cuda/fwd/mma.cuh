// Thin wrappers over the sm_80+ PTX the forward kernel is built from: cp.async (16-byte, with
// groups), ldmatrix (plain and transposed), mma.sync m16n8k16 with f32 accumulation for bf16 and
// f16, and the fast special functions (ex2.approx, tanh.approx).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace bsattn {
namespace cuda {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- cp.async -----------------------------------------------------------------------------
// 16 bytes global -> shared, cached in L2 only.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
// 16 bytes global -> shared (L1: also allocated in L1, .ca; else L2 only, .cg), copying only `src_bytes` (0 or
// 16) and zero-filling the rest: an invalid row is a copy of nothing (src must still be a mapped address).
template <bool L1>
__device__ __forceinline__ void cp_async16_zfill(uint32_t dst, const void* src, int src_bytes) {
  if constexpr (L1)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
  else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Wait until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void st_shared_zero16(uint32_t dst) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(dst), "r"(0) : "memory");
}
__device__ __forceinline__ uint4 ld_shared16(uint32_t src) {
  uint4 r;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "r"(src)
               : "memory");
  return r;
}
// 16 bytes to global memory in one instruction: a plain `*(uint4*)p = v` of a value assembled from registers
// is split by nvcc into four 4-byte stores (4x the store instructions and partial-sector writes).
__device__ __forceinline__ void st_global16(void* dst, uint4 v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}
__device__ __forceinline__ void st_shared32(uint32_t dst, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(dst), "r"(v) : "memory");
}

// ---- ldmatrix -----------------------------------------------------------------------------
// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives it.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// ---- mma.sync m16n8k16, f32 accumulation ----------------------------------------------------
// c (row g = lane/4, cols 2*(lane%4) + {0,1}; c[2..3] row g + 8) += a (16x16, row) * b (16x8, col).
template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static constexpr uint32_t kOnes = 0x3F803F80u;  // (1, 1) as b16x2
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // Two floats -> one b32 register, `lo` in the low half (the lower column index).
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Mma<__half> {
  static constexpr uint32_t kOnes = 0x3C003C00u;
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// The k16 step kk of a 16-row accumulator strip acc[NT8][4] (n8 tiles 2 kk and 2 kk + 1) as the A fragment of
// the next m16n8k16 (and of a wgmma from registers): the m16n8 accumulator layout is the A layout once packed to
// b16x2.
template <typename T, int NT8>
__device__ __forceinline__ void acc_to_a(const float (&acc)[NT8][4], int kk, uint32_t (&a)[4]) {
  a[0] = Mma<T>::pack(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = Mma<T>::pack(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = Mma<T>::pack(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = Mma<T>::pack(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// ---- special functions ----------------------------------------------------------------------
__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
// tanh(x) given y = 2 * log2(e) * x: 1 - 2 / (1 + 2^y). Absolute error ~1e-7 over the whole range
// (tanh.approx.f32 is cheaper but its ~5e-4 relative error becomes softcap * 5e-4 in the score).
__device__ __forceinline__ float tanh_from_2log2e_x(float y) {
  return 1.f - 2.f * fast_rcp(1.f + fast_exp2(y));
}

}  // namespace cuda
}  // namespace bsattn
