// f16 rows (dtype_cpu.h widen_f16_row / narrow_f16_row): through the F16C instructions (vcvtph2ps / vcvtps2ph, one
// instruction per 8 elements) where the CPU has them (every one the AVX2 and AVX-512 kernels run on), else one element
// at a time with the integer code of dtype_cpu.h, whose branches keep GCC from vectorising it. Few-row items convert
// every K / V block they list: f16 took 9-18x float32's time at R x g <= 4 that way (BENCHMARKS.md, session 58). Bitwise
// the same, the multiplication by `mul` included (all 2^16 widenings and 2^32 narrowings compared, with MXCSR's
// flush-to-zero and denormals-are-zero on and off: XLA's CPU threads run with both on).
#include "cpu/dtype_cpu.h"

#include "cpu/simd_cpu.h"

#if BSATTN_X86
#include <immintrin.h>
#endif

namespace bsattn::cpu {
namespace {

#if BSATTN_X86
// (BSATTN_CPU_ISA=generic takes the integer code, to test it)
bool use_f16c() {
  static const bool yes = detect_isa() != IsaKind::kGeneric;
  return yes;
}

__attribute__((target("avx,f16c"))) int64_t widen_f16c(const uint16_t* src, int64_t n, float mul, float* dst) {
  const __m256 m = _mm256_set1_ps(mul);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(m, _mm256_cvtph_ps(h)));
  }
  return i;
}

__attribute__((target("avx,f16c"))) int64_t narrow_f16c(const float* src, int64_t n, float mul, uint16_t* dst) {
  const __m256 m = _mm256_set1_ps(mul);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_mul_ps(m, _mm256_loadu_ps(src + i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
  return i;
}
#endif

}  // namespace

void widen_f16_row(const uint16_t* src, int64_t n, float mul, float* dst) {
  int64_t i = 0;
#if BSATTN_X86
  if (use_f16c()) i = widen_f16c(src, n, mul, dst);
#endif
  for (; i < n; ++i) dst[i] = mul * f16_to_f32(src[i]);  // (the tail, or every element without F16C)
}

void narrow_f16_row(const float* src, int64_t n, float mul, uint16_t* dst) {
  int64_t i = 0;
#if BSATTN_X86
  if (use_f16c()) i = narrow_f16c(src, n, mul, dst);
#endif
  for (; i < n; ++i) dst[i] = f32_to_f16(mul * src[i]);
}

}  // namespace bsattn::cpu
