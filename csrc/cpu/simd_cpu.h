// SIMD building blocks of the CPU kernels, written once with GCC/Clang vector extensions and
// compiled per instruction set.
//
// Everything here is an always-inline template on an ISA description `I`; the kernels
// (attention_*_cpu.cc) instantiate their per-item functions once per ISA inside a function that
// carries the matching `target` attribute (BSATTN_TARGET_*), and pick one at run time with
// `detect_isa()`. Because the helpers are always inlined into those functions, they are compiled
// for the caller's instruction set; nothing ISA-specific is ever emitted out of line, so there is
// no ODR clash between instruction sets. No -march, no -ffast-math: exp/tanh below are explicit
// polynomial approximations whose handling of inf is exact where the kernels need it.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__)
// Vector values cross always-inline helper boundaries; the psABI note about passing wide vectors
// without AVX is irrelevant once they are inlined.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define BSATTN_AI inline __attribute__((always_inline))

#if defined(__x86_64__) || defined(__i386__)
#define BSATTN_X86 1
#define BSATTN_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define BSATTN_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
#else
#define BSATTN_X86 0
#endif

namespace bsattn::cpu {

template <int W>
struct VecTypes;
template <>
struct VecTypes<4> {
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
};
template <>
struct VecTypes<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
};
template <>
struct VecTypes<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
};

// W: floats per vector. MR x (2 vectors): the register tile of the GEMM micro-kernel.
struct IsaGeneric {  // SSE2 (x86-64 baseline) or whatever the compiler targets by default
  static constexpr int W = 4, MR = 6;
};
struct IsaAvx2 {  // 16 ymm registers: 12 accumulators
  static constexpr int W = 8, MR = 6;
};
struct IsaAvx512 {  // 32 zmm registers: 16 accumulators
  static constexpr int W = 16, MR = 8;
};

enum class IsaKind { kGeneric, kAvx2, kAvx512 };

// The best instruction set this CPU (and OS) supports, read once (a thread-safe function-local
// static). The environment variable BSATTN_CPU_ISA=generic|avx2 lowers it (for testing the other
// code paths); it never raises it above what the CPU supports.
inline IsaKind detect_isa() {
  static const IsaKind kind = [] {
    IsaKind best = IsaKind::kGeneric;
#if BSATTN_X86
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq");
    best = avx512 ? IsaKind::kAvx512 : (avx2 ? IsaKind::kAvx2 : IsaKind::kGeneric);
#endif
    const char* env = std::getenv("BSATTN_CPU_ISA");
    if (env && std::strcmp(env, "generic") == 0) return IsaKind::kGeneric;
    if (env && std::strcmp(env, "avx2") == 0 && best == IsaKind::kAvx512) return IsaKind::kAvx2;
    return best;
  }();
  return kind;
}

// Floats per vector of the instruction set `kind`.
inline int vector_width(IsaKind kind) {
  return kind == IsaKind::kAvx512 ? IsaAvx512::W : (kind == IsaKind::kAvx2 ? IsaAvx2::W : IsaGeneric::W);
}

// Rounds n up to a multiple of 16 floats (64 bytes): the row pitch of every scratch matrix, so
// that each row is a whole number of vectors for every ISA above.
inline int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }

template <class I>
struct Simd {
  static constexpr int W = I::W;
  using F = typename VecTypes<W>::F;
  using Iv = typename VecTypes<W>::I;

  static BSATTN_AI F load(const float* p) {
    F v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static BSATTN_AI void store(float* p, F v) { std::memcpy(p, &v, sizeof v); }
  static BSATTN_AI F splat(float x) { return F{} + x; }
  static BSATTN_AI Iv iota() {
    alignas(64) static constexpr int32_t kIota[16] = {0, 1, 2,  3,  4,  5,  6,  7,
                                                      8, 9, 10, 11, 12, 13, 14, 15};
    Iv v;
    std::memcpy(&v, kIota, sizeof v);
    return v;
  }
  // x in the lanes below n, `other` in the rest (the tail of a row of keys)
  static BSATTN_AI F first_lanes(F x, int64_t n, F other) {
    return n >= W ? x : (iota() < static_cast<int32_t>(n) ? x : other);
  }
  static BSATTN_AI F max(F a, F b) { return a > b ? a : b; }
  // NaN in a comes back as NaN (tanh's clamp relies on it)
  static BSATTN_AI F min(F a, F b) { return b < a ? b : a; }
  // Horizontal max / sum by halving (the halves are extracted with memcpy, which compiles to
  // register extracts), down to 4 lanes.
  static BSATTN_AI float hmax(F v) { return reduce<W, true>(v); }
  static BSATTN_AI float hsum(F v) { return reduce<W, false>(v); }
  template <int N, bool kMax, class T>
  static BSATTN_AI float reduce(T v) {
    if constexpr (N == 4) {
      const float a = kMax ? (v[0] > v[1] ? v[0] : v[1]) : v[0] + v[1];
      const float b = kMax ? (v[2] > v[3] ? v[2] : v[3]) : v[2] + v[3];
      return kMax ? (a > b ? a : b) : a + b;
    } else {
      typename VecTypes<N / 2>::F lo, hi;
      std::memcpy(&lo, &v, sizeof lo);
      std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
      return reduce<N / 2, kMax>(kMax ? (lo > hi ? lo : hi) : lo + hi);
    }
  }

  // exp(x) with a relative error of a few ulp for x in [-87.3, 88]; 0 below (also for -inf),
  // NaN stays NaN. Cody-Waite reduction x = n ln2 + r, degree-6 polynomial for exp(r), 2^n
  // assembled in the exponent field.
  static BSATTN_AI F exp(F x) {
    const F lo = splat(-87.33654f), hi = splat(88.0f);
    F xc = x < lo ? lo : x;
    xc = xc > hi ? hi : xc;
    const F shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const F t = xc * 1.44269504088896341f + shifter;
    Iv bits;
    std::memcpy(&bits, &t, sizeof bits);
    const F n = t - shifter;
    const F r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
    F y = splat(1.9875691500e-4f);
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    const Iv pow2_bits = (bits - 0x4b400000 + 127) << 23;
    F pow2;
    std::memcpy(&pow2, &pow2_bits, sizeof pow2);
    const F res = y * pow2;
    return x < lo ? F{} : res;
  }

  // tanh(x): odd polynomial below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above (|x| clamped to 9.1,
  // where tanh rounds to 1 in f32: at 9 it was 0.99999994, so a saturated soft cap's factor 1 - t^2
  // was 1.2e-7, not 0). Absolute error ~1e-7. NaN stays NaN (a clamp once made it 1).
  static BSATTN_AI F tanh(F x) {
    const F ax = x < 0.f ? -x : x;
    const F z = x * x;
    F p = splat(-5.70498872745e-3f);
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    const F small = p * z * x + x;
    const F e = exp(2.f * min(ax, splat(9.1f)));
    F big = 1.f - 2.f / (e + 1.f);
    big = x < 0.f ? -big : big;
    return ax < 0.625f ? small : big;
  }
};

// ---- GEMM: C[M x N] (+)= A[M x K] B[K x N] ------------------------------------------------------
// A is read one element at a time through strides (sam between rows, sak between columns), so
// both A and A^T work; B and C are row-major with pitches ldb / ldc. N must be a multiple of W
// (scratch rows are padded with pad16). Accumulation runs over k in order, element by element,
// so a given entry of C gets the same value whatever M / N blocking computed it.

template <class I, int MR, int NV>
BSATTN_AI void gemm_micro(int64_t K, const float* A, int64_t sam, int64_t sak, const float* B,
                          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  using S = Simd<I>;
  using F = typename S::F;
  constexpr int W = I::W;
  F c[MR][NV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[m][v] = accumulate ? S::load(C + m * ldc + v * W) : F{};
  for (int64_t k = 0; k < K; ++k) {
    F b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = S::load(B + k * ldb + v * W);
    const float* a = A + k * sak;
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const float am = a[m * sam];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[m][v] += am * b[v];
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) S::store(C + m * ldc + v * W, c[m][v]);
}

// Rows [0, M) of one column panel of NV vectors; the last M % MR rows with a smaller tile.
template <class I, int NV, int MRT = I::MR>
BSATTN_AI void gemm_panel(int64_t M, int64_t K, const float* A, int64_t sam, int64_t sak,
                          const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int64_t m0 = 0;
  for (; m0 + MRT <= M; m0 += MRT)
    gemm_micro<I, MRT, NV>(K, A + m0 * sam, sam, sak, B, ldb, C + m0 * ldc, ldc, accumulate);
  if constexpr (MRT > 1) {
    if (m0 < M)
      gemm_panel<I, NV, MRT - 1>(M - m0, K, A + m0 * sam, sam, sak, B, ldb, C + m0 * ldc, ldc,
                                 accumulate);
  }
}

template <class I>
BSATTN_AI void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t sam, int64_t sak,
                    const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int W = I::W;
  int64_t n0 = 0;
  for (; n0 + 2 * W <= N; n0 += 2 * W)
    gemm_panel<I, 2>(M, K, A, sam, sak, B + n0, ldb, C + n0, ldc, accumulate);
  if (n0 < N) gemm_panel<I, 1>(M, K, A, sam, sak, B + n0, ldb, C + n0, ldc, accumulate);
}

// ---- dot products: C[M x N] = A[M x K] B[N x K]^T ------------------------------------------------
// Both operands row-major (pitches lda / ldb), K a multiple of W whose padding columns hold zeros in
// both (the scratch rows past D are never written). One vector sum per output, reduced across its
// lanes at the end: for few rows M, where a GEMM's vectors across the rows would be mostly padding.
template <class I>
BSATTN_AI void dots(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc) {
  using S = Simd<I>;
  using F = typename S::F;
  constexpr int W = I::W, NR = 4;
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * lda;
    int64_t n0 = 0;
    for (; n0 + NR <= N; n0 += NR) {
      F c[NR] = {};
      for (int64_t k = 0; k < K; k += W) {
        const F av = S::load(a + k);
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) c[r] += av * S::load(B + (n0 + r) * ldb + k);
      }
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) C[m * ldc + n0 + r] = S::hsum(c[r]);
    }
    for (; n0 < N; ++n0) {
      F c = {};
      for (int64_t k = 0; k < K; k += W) c += S::load(a + k) * S::load(B + n0 * ldb + k);
      C[m * ldc + n0] = S::hsum(c);
    }
  }
}

}  // namespace bsattn::cpu
