// f16 rows through the F16C instructions (vcvtph2ps / vcvtps2ph, one instruction per 8 elements), where the CPU has
// them (every one the AVX2 and AVX-512 kernels run on). The branch-free integer conversions of dtype_cpu.h take about
// a dozen vector instructions per 8 or 16 elements, and few-row items convert every K / V block they list: f16 took
// about twice bf16's time at R x g = 1 with them. Bitwise the same as those, the multiplication by `mul` included (all
// 2^16 widenings and 2^32 narrowings compared, with MXCSR's flush-to-zero and denormals-are-zero on and off: XLA's CPU
// threads run with both on).
#include "cpu/dtype_cpu.h"

#include "cpu/simd_cpu.h"

#if BSATTN_X86
#include <immintrin.h>
#endif

namespace bsattn::cpu {

#if BSATTN_X86
bool f16c_rows() { return detect_isa() != IsaKind::kGeneric; }  // (BSATTN_CPU_ISA=generic tests the integer code)

__attribute__((target("avx,f16c"))) void widen_f16_rows(const uint16_t* src, int64_t n, float mul, float* dst) {
  const __m256 m = _mm256_set1_ps(mul);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(m, _mm256_cvtph_ps(h)));
  }
  for (; i < n; ++i) dst[i] = mul * f16_to_f32(src[i]);
}

__attribute__((target("avx,f16c"))) void narrow_f16_rows(const float* src, int64_t n, float mul, uint16_t* dst) {
  const __m256 m = _mm256_set1_ps(mul);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_mul_ps(m, _mm256_loadu_ps(src + i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = f32_to_f16(mul * src[i]);
}
#else
bool f16c_rows() { return false; }
void widen_f16_rows(const uint16_t*, int64_t, float, float*) {}
void narrow_f16_rows(const float*, int64_t, float, uint16_t*) {}
#endif

}  // namespace bsattn::cpu
