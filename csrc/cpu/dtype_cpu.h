// Element types of the CPU path and their conversions to and from f32.
//
// bf16 and f16 are carried as raw 16-bit patterns. Widening is exact (including inf, NaN and
// subnormals); narrowing rounds to nearest, ties to even, overflows to inf and keeps NaN a NaN.
// No intrinsics: plain integer code, so it compiles for every target.
#pragma once

#include <cstdint>
#include <cstring>

namespace bsattn::cpu {

enum class DType { kF32, kBF16, kF16 };

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t{h} << 16); }

inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u)  // NaN: keep sign and top payload, force quiet
    return static_cast<uint16_t>((u >> 16) | 0x0040u);
  // Round to nearest even on the 16 dropped bits; a carry into the exponent is the right result
  // (up to inf for values past the largest bf16).
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in f32
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return f32_from_bits(f32_bits(mag) | sign);
  }
  if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  return f32_from_bits(sign | ((exp + (127 - 15)) << 23) | (mant << 13));
}

inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u)  // NaN: quiet, keep the top payload bits
    return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 (or inf): inf
  if (a >= 0x38800000u) {  // normal f16 range: rebias the exponent, round the 13 dropped bits
    const uint32_t r = a - (112u << 23);
    return static_cast<uint16_t>(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
  }
  // Subnormal or zero: adding 0.5 puts the value where the f32 ulp is 2^-24, the f16 subnormal
  // step, so the FPU's own round-to-nearest-even does the rounding (0x400 = smallest normal).
  const float t = f32_from_bits(a) + 0.5f;
  return static_cast<uint16_t>(sign | (f32_bits(t) - 0x3f000000u));
}

// n f16 values to and from f32 with a multiplier, dst[i] = mul * src[i] (dtype_cpu.cc): through F16C where the CPU
// has it, else with the functions above. Out of line: a call per row keeps load_f32 / store_f32 as small as they were
// for f32 and bf16 (whose loops are inlined into each instruction set's item functions).
void widen_f16_row(const uint16_t* src, int64_t n, float mul, float* dst);
void narrow_f16_row(const float* src, int64_t n, float mul, uint16_t* dst);

inline size_t dtype_size(DType t) { return t == DType::kF32 ? 4 : 2; }

// dst[i] = mul * src[offset + i] for i < n, widening from `t`.
inline void load_f32(DType t, const void* src, int64_t offset, int64_t n, float mul, float* dst) {
  switch (t) {
    case DType::kF32: {
      const float* s = static_cast<const float*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = mul * s[i];
      break;
    }
    case DType::kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = mul * bf16_to_f32(s[i]);
      break;
    }
    case DType::kF16: {
      widen_f16_row(static_cast<const uint16_t*>(src) + offset, n, mul, dst);
      break;
    }
  }
}

// dst[offset + i] = mul * src[i] for i < n, narrowing to `t`.
inline void store_f32(DType t, const float* src, int64_t n, float mul, void* dst, int64_t offset) {
  switch (t) {
    case DType::kF32: {
      float* d = static_cast<float*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) d[i] = mul * src[i];
      break;
    }
    case DType::kBF16: {
      uint16_t* d = static_cast<uint16_t*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(mul * src[i]);
      break;
    }
    case DType::kF16: {
      narrow_f16_row(src, n, mul, static_cast<uint16_t*>(dst) + offset);
      break;
    }
  }
}

}  // namespace bsattn::cpu
