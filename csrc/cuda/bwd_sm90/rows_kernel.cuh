// The row-oriented Hopper backward (sm_90a, D = 64 or 128; bwd/params.h rows_sm90_rule: C <= 16 with R * g >= 128, or
// R * g >= 64 with C <= 8 at D = 128, C <= 4 at D = 64, where a tile is half padding): dq, dk and dv from one pass over
// each block row's listed keys, as the forward walks them. Why: at C <= 16 the column kernels re-gather a block
// column's query rows for every C keys (the narrow dk / dv kernel) or do a dense sweep's work (C <= 4), while a row
// tile gathers each listed key once and every product it computes is useful. The price is dk / dv: each row tile adds
// its part into every key it lists. Float atomics would make dk / dv depend on the order of arrival; integer adds do
// not, so the parts are added as 64-bit fixed point (x times a power of two from this call's bounds, rows_scales;
// rounded to nearest) into a workspace the launcher zeroes and then converts: dk, dv stay bitwise repeatable. A key
// whose part is not finite is flagged and comes out NaN. Measured cost of that scatter at the grid's C = 1 shapes:
// about 3.4 TB/s of reductions (csrc/cuda/dev/scatter_bench.cu, staged rows 2.2x faster than the accumulator layout's
// scattered 64-byte pieces).
//
// One CTA = 128 packed rows of one block row (two warpgroups of 64, as the dq kernel with NWG = 2), the block row's
// gathered keys in KV tiles of BN = 64. Per tile:
//   S = Q K^T, dP = dO V^T             (each warpgroup its rows; wgmma, both operands from shared memory)
//   p, dS = p (dP - delta)             (bwd/common.cuh dq_probs_ds, p kept)
//   dQ += dS K                         (wgmma, dS from registers; dq stays in registers to the end: no atomics)
//   p^T, dS^T -> shared memory         (stmatrix .trans, while dQ runs; a padded row of TM b16 per key)
//   warpgroup 0: dV_t = p^T dO, warpgroup 1: dK_t = dS^T Q   (M = the 64 keys, K = the 128 rows; A by ldmatrix)
//   each warp stages its 16 keys' half rows (f32) and adds them, rounded, into the workspace (lane-consecutive
//   64-bit reductions, 256 bytes an instruction); padding keys (index >= N) are skipped.
// Its shared-memory carve-up, prologue, per-lane row state and S / dP issue are dq_kernel.cuh's (sm90_dq_smem,
// sm90_dq_prologue, sm90_dq_lane_rows, sm90_issue_s_dp; session 22, timed against the written-out lines: the dq
// kernel's SASS then differs in equivalent instruction forms and alignment only, this kernel's loop not at all).
// Tried and dropped (session 19, branch wip/rows-bwd at ecbffe3): a block row's 128-row tiles as one cluster, each
// key's parts summed across it through distributed shared memory before one workspace addition: 30-60 % slower.
// Session 22 (branch wip/rows-red-ab): the additions cost about 15 % (none at all: 2.68 against 3.15 ms at 4:64:1),
// 32-bit ones would save 2-4 %; tile t + 1's S / dP issued under tile t's additions was 5-7 % slower (255 registers).
#pragma once

#include <cfloat>
#include <climits>
#include <cstdint>

#include "cuda/bwd/common.cuh"
#include "cuda/bwd_sm90/config.cuh"
#include "cuda/bwd_sm90/dq_kernel.cuh"
#include "cuda/common/wgmma.cuh"
#include "cuda/fwd/gather_kv.cuh"
#include "cuda/fwd/params.h"
#include "cuda/fwd/tile_setup.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

// The dq kernel's parameters and the fixed-point workspace.
struct Sm90RowsParams : Sm90DqParams {
  long long* acc_dk;         // [B, N, Hk, D] sum of round(part * mk) (zeroed by the launcher)
  long long* acc_dv;         // [B, N, Hk, D] sum of round(part * fv)
  const unsigned* amax;      // max |q|, |v|, |do|, |delta| over their finite values, as float bits
  unsigned char* bad_dk;     // [B, N, Hk] set where a dk part was not finite (zeroed by the launcher)
  unsigned char* bad_dv;     // [B, N, Hk] the same for dv
  uint32_t zero;             // 0, from the launcher (dS^T's copy, below)
};

// The fixed-point scales of one call, powers of two from bounds on |dv| and |dk| (every finite part and every sum
// stays under 2^61 in magnitude): with T rows (M g) seeing a key, |dv| <= T max|do| and |dk| <= |scale| T max|q|
// (D max|do| max|v| + max|delta|) (|p| <= 1, |o| <= max|v|, the soft cap's factor <= 1), the maxima over the finite
// values of the whole tensors. A sum's resolution is then about its bound times 2^-61: entries down to 2^-36 of the
// bound keep bf16's precision. A part that is not finite (an inf / NaN input it reads, or a float32 overflow) flags
// its key instead, and the key's output is NaN.
struct RowsScales {
  float fv;  // multiplier of dv parts
  float mk;  // multiplier of dk parts: scale * 2^ek, finite
  double inv_v, inv_k;
};
// |x| <= FLT_MAX: false for inf and NaN
__device__ __forceinline__ bool finite_f32(float x) { return fabsf(x) <= FLT_MAX; }
__device__ __forceinline__ RowsScales rows_scales(const unsigned* amax, int M, int g, int D, float scale) {
  const double aq = __uint_as_float(amax[0]), av = __uint_as_float(amax[1]), ado = __uint_as_float(amax[2]),
               adl = __uint_as_float(amax[3]);
  const double rows = static_cast<double>(M) * g;
  const double bv = rows * ado, bk = fabs(static_cast<double>(scale)) * rows * aq * (D * ado * av + adl);
  int ev = 0, ek = 0, es = 0;
  frexp(bv, &ev);  // b < 2^e (0 for b = 0); finite: the maxima are
  frexp(bk, &ek);
  frexp(static_cast<double>(scale), &es);
  ev = min(max(61 - ev, -126), 127);
  ek = min(max(61 - ek, -126), 127 - max(es, 0));  // scale * 2^ek stays a finite float
  RowsScales r;
  r.fv = ldexpf(1.f, ev);
  r.mk = scale * ldexpf(1.f, ek);
  r.inv_v = ldexp(1.0, -ev);
  r.inv_k = ldexp(1.0, -ek);
  return r;
}

// max |x| over the finite values of q, v, do and delta into amax[0..3] (float bits: non-negative floats order as
// unsigned). Non-finite values are left out: they may sit where the layout excludes them; where a part reads one,
// that part is not finite and flags its key. v's rows past their sequence's length (kv_lens: v [B, N, Hk, D], v_row8
// vectors of 8 a row) are never read: a large finite value in an unwritten cache must not coarsen dk's scale.
template <typename T>
__global__ void bsattn_bwd_rows_amax_kernel(const T* __restrict__ q, int64_t nq, const T* __restrict__ v, int64_t nv,
                                            const T* __restrict__ dout, const float* __restrict__ delta, int64_t nd,
                                            const int32_t* __restrict__ kv_lens, int N, int64_t v_row8,
                                            unsigned* amax) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float m[4] = {0.f, 0.f, 0.f, 0.f};
  const T* src[3] = {q, v, dout};
  const int64_t n8[3] = {nq / 8, nv / 8, nq / 8};  // (D = 64, 128: whole 8-element vectors)
#pragma unroll
  for (int a = 0; a < 3; ++a)
    for (int64_t i = i0; i < n8[a]; i += stride) {
      if (a == 1 && kv_lens != nullptr) {
        const int64_t row = i / v_row8;  // (b, key) of v
        const int b = static_cast<int>(row / N), key = static_cast<int>(row - static_cast<int64_t>(b) * N);
        if (key >= clipped_key_count<int>(kv_lens, b, N)) continue;
      }
      const uint4 w = __ldcs(reinterpret_cast<const uint4*>(src[a]) + i);
      const T* x = reinterpret_cast<const T*>(&w);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float f = static_cast<float>(x[e]);
        if (finite_f32(f)) m[a] = fmaxf(m[a], fabsf(f));
      }
    }
  for (int64_t i = i0; i < nd; i += stride) {
    const float f = delta[i];
    if (finite_f32(f)) m[3] = fmaxf(m[3], fabsf(f));
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    unsigned u = __float_as_uint(m[a]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) u = max(u, __shfl_xor_sync(0xffffffffu, u, o));
    if ((threadIdx.x & 31) == 0) atomicMax(amax + a, u);
  }
}

// Two warpgroups of 64 rows (the dq kernel's shape with NWG = 2) plus p^T and dS^T (BN keys x TM rows, b16, rows
// padded by 16 bytes: the transposed stores and the ldmatrix reads of 8 keys hit distinct banks) and a staging area
// per warpgroup (BN keys x D / 2 f32, padded alike).
template <int D_, int BN_, int ST_>
struct Sm90RowsCfg : Sm90DqCfg<D_, 2, BN_, ST_, 1> {
  using Base = Sm90DqCfg<D_, 2, BN_, ST_, 1>;
  static constexpr int PT_PITCH = Base::TM * 2 + 16;
  static constexpr int PT_BYTES = BN_ * PT_PITCH;
  static constexpr int STG_PITCH = D_ / 2 * 4 + 16;
  static constexpr int STG_BYTES = BN_ * STG_PITCH;
  static constexpr int SMEM = Base::SMEM + 128 + 2 * PT_BYTES + 2 * STG_BYTES;
  static_assert((D_ == 64 || D_ == 128) && BN_ == 64, "D = 64 or 128, 64-key tiles");
  static_assert(SMEM <= 227 * 1024, "shared memory per CTA");
};
template <int D>
struct Sm90RowsTile : Sm90RowsCfg<D, 64, 2> {};

// Sets the byte at a to 1 where bad holds, as a predicated store: no branch, so the adding loop keeps its schedule.
__device__ __forceinline__ void flag_if(bool bad, unsigned char* a) {
  asm volatile("{\n .reg .pred q;\n setp.ne.u32 q, %0, 0;\n @q st.global.u8 [%1], 1;\n}\n" ::"r"(unsigned(bad)), "l"(a)
               : "memory");
}

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::NT, 1) bsattn_bwd_rows_sm90_kernel(const __grid_constant__ Sm90RowsParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = Cfg::D, BN = Cfg::BN, TM = Cfg::TM, ST = Cfg::ST, PF = Cfg::PF;
  constexpr int NT8 = BN / 8, DT = D / 8;
  constexpr int HW = D / 64;  // values a lane adds per key and half row (a half row is D / 2 columns)
  using QLayout = AtomSwizzle<D, TM>;
  using KvLayout = AtomSwizzle<D, BN>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2, wq = warp & 3;

  FwdTileSetup ts;
  if (!fwd_tile_setup<D, TM, BN>(p, ts)) return;  // (uniform) a split past the last query row

  // ---- shared memory: the dq kernel's carve-up, then p^T, dS^T and the staging areas; the dq kernel's prologue -----
  const Sm90DqSmem m = sm90_dq_smem<Cfg>(smem_raw);
  const uint32_t sQ = m.sQ, sDo = m.sDo, sK = m.sK, sV = m.sV;
  int* const sKidx = m.sKidx;
  const uint32_t sPt = (smem_u32(m.sDl + TM) + 127u) & ~127u;  // p^T [BN][PT_PITCH]
  const uint32_t sDst = sPt + Cfg::PT_BYTES;                    // dS^T
  const uint32_t sStg = sDst + Cfg::PT_BYTES + wg * Cfg::STG_BYTES;
  const float* stg = reinterpret_cast<const float*>(m.base + (sStg - sQ));
  KvGather<T, Cfg, KvLayout> kv;
  sm90_dq_prologue<T, Cfg, QLayout>(p, ts, m, kv, tid, warp, lane);
  auto issue = [&](int i) { return kv.issue(p, *m.gs, sK, sV, sKidx, i % ST, warp, lane); };
  uint32_t pending = issue_prologue<PF + 1>(issue, ts.ntiles);

  // ---- per-warpgroup state (no warpgroup skips a tile: both meet the CTA barrier of every tile) -------------
  float acc[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[d][e] = 0.f;
  float(&accf)[D / 2] = reinterpret_cast<float(&)[D / 2]>(acc);
  float s[NT8][4], dp[NT8][4];
  float(&sf)[BN / 2] = reinterpret_cast<float(&)[BN / 2]>(s);
  float(&dpf)[BN / 2] = reinterpret_cast<float(&)[BN / 2]>(dp);
  uint32_t da[BN / 16][4];

  float lse2[2], dl[2];
  int lim[2];
  sm90_dq_lane_rows<Cfg>(m, warp, lane, lse2, dl, lim);
  const float s_mul = p.s_mul, cap_mul = p.cap_mul;
  const bool use_cap = p.use_cap != 0;

  const uint64_t q_desc = sw128_desc(sQ + wg * 64 * 128, 16, 1024);
  const uint64_t do_desc = sw128_desc(sDo + wg * 64 * 128, 16, 1024);
  const uint64_t k_desc = sw128_desc(sK, 16, 1024);
  const uint64_t v_desc = sw128_desc(sV, 16, 1024);
  const uint64_t kt_desc = sw128_desc(sK, BN * 128, 1024);
  constexpr uint64_t kStageDesc = Cfg::KV_STAGE_BYTES >> 4;
  // the B of the key-side products, MN-major over all TM rows: dO for warpgroup 0 (dV), Q for warpgroup 1 (dK)
  const uint64_t rows_desc = sw128_desc(wg == 0 ? sDo : sQ, TM * 128, 1024);
  // this lane's stmatrix row (key 8 (m >> 1) + i of a 16-key step, tile rows 8 (m & 1) + the warp's 16)
  const uint32_t st_off = (8 * ((lane >> 3) >> 1) + (lane & 7)) * Cfg::PT_PITCH + (warp * 16 + 8 * ((lane >> 3) & 1)) * 2;
  // this lane's ldmatrix row (key 16 wq + 8 ((lane >> 3) & 1) + (lane & 7), rows 8 (lane >> 4) of a 16-row step)
  const uint32_t ld_src = (wg == 0 ? sPt : sDst) +
                          (16 * wq + 8 * ((lane >> 3) & 1) + (lane & 7)) * Cfg::PT_PITCH + 16 * (lane >> 4);
  const RowsScales fs = rows_scales(p.amax, p.M, p.g, D, p.scale);
  const float fx = wg == 0 ? fs.fv : fs.mk;
  unsigned char* const bad = (wg == 0 ? p.bad_dv : p.bad_dk) + ts.kvoff / D;  // (b, key 0, hk)
  long long* const accg = (wg == 0 ? p.acc_dv : p.acc_dk) + ts.kvoff;
  const int64_t key_stride = static_cast<int64_t>(p.Hk) * D;

  // ---- main loop ------------------------------------------------------------------------------------------
  for (int t = 0; t < ts.ntiles; ++t) {
    const bool need_mask = tile_landed<PF - 1>(pending, fence_async_shared);
    if (t + PF < ts.ntiles) pending |= issue(t + PF) << (PF - 1);
    cp_async_commit();

    const int stage = t % ST;
    sm90_issue_s_dp<T, Cfg>(sf, dpf, q_desc, do_desc, k_desc, v_desc, stage);
    wgmma_wait<0>();
    fence_regs(sf);
    fence_regs(dpf);
    // the soft cap's test outside the call: one copy of the step per case. Left to the compiler, this kernel's
    // other changes (session 20) turned it into a branch per element around each exponential, 7 % slower overall.
    if (use_cap)
      dq_probs_ds<NT8, true>(s, dp, sKidx + stage * BN + (lane & 3) * 2, need_mask, lse2, dl, lim, s_mul, cap_mul, true);
    else
      dq_probs_ds<NT8, true>(s, dp, sKidx + stage * BN + (lane & 3) * 2, need_mask, lse2, dl, lim, s_mul, cap_mul, false);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) acc_to_a<T>(dp, kk, da[kk]);
    // dS^T is stored while dQ runs, from a copy: the PTX ISA leaves reading a wgmma's A registers before its wait
    // undefined. The copy (xor with a zero the compiler cannot see) keeps registers of its own; it cost nothing
    // measurable against reading da itself (session 20, calls 3-4: within 0.5 %).
    uint32_t db[BN / 16][4];
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        db[kk][e] = da[kk][e] ^ p.zero;
        asm volatile("" : "+r"(db[kk][e]));  // the copy made before the wgmma is issued
      }
    wgmma_fence();
    fence_regs(accf);
    wgmma_rs_mn<T, D, BN / 16>(accf, da, kt_desc + stage * kStageDesc);  // dQ += dS K
    wgmma_commit();
    // p^T and dS^T of this warp's 16 rows while dQ runs (16 keys a store)
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[4];
      acc_to_a<T>(s, kk, pa);
      stsm_x4_trans(sPt + st_off + kk * 16 * Cfg::PT_PITCH, pa);
      stsm_x4_trans(sDst + st_off + kk * 16 * Cfg::PT_PITCH, db[kk]);
    }
    wgmma_wait<0>();
    fence_regs(accf);
    __syncthreads();  // p^T, dS^T whole

    // dV_t (warpgroup 0) or dK_t (warpgroup 1): 64 keys x D over the TM rows
    float tacc[DT][4];
    float(&taccf)[D / 2] = reinterpret_cast<float(&)[D / 2]>(tacc);
    {
      uint32_t ta[TM / 16][4];
#pragma unroll
      for (int kk = 0; kk < TM / 16; ++kk) ldsm_x4(ta[kk], ld_src + kk * 32);
      wgmma_fence();
      WgmmaOp<T, D>::rs(taccf, ta[0], rows_desc, 0);
#pragma unroll
      for (int kk = 1; kk < TM / 16; ++kk) WgmmaOp<T, D>::rs(taccf, ta[kk], rows_desc + kk * (2048 >> 4), 1);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(taccf);
    }
    // add into the workspace, half a row (D / 2 columns) at a time: each warp stages its 16 keys (f32), loads them
    // back a row per key (all 16 keys' loads first), rounds and adds
    const int* kidx = sKidx + stage * BN + 16 * wq;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int d = 0; d < DT / 2; ++d) {
        const int col = 8 * d + 2 * (lane & 3);
        const int key = 16 * wq + (lane >> 2);
        st_shared_f32x2(sStg + key * Cfg::STG_PITCH + col * 4, tacc[half * DT / 2 + d][0], tacc[half * DT / 2 + d][1]);
        st_shared_f32x2(sStg + (key + 8) * Cfg::STG_PITCH + col * 4, tacc[half * DT / 2 + d][2],
                        tacc[half * DT / 2 + d][3]);
      }
      __syncwarp();
      float v[16][HW];
#pragma unroll
      for (int r = 0; r < 16; ++r)
#pragma unroll
        for (int h = 0; h < HW; ++h) v[r][h] = stg[(16 * wq + r) * (Cfg::STG_PITCH / 4) + lane + 32 * h];
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const int j = kidx[r];
        if (j < 0 || j >= p.N) continue;  // (uniform per warp) padding keys
        long long* dst = accg + j * key_stride + half * (D / 2) + lane;
        // a part that is not finite (inf / NaN read, or a float32 overflow) flags its key: each lane tests its own HW
        // values (session 21: within 0.5 % of no test; a warp vote here cost 3 %, x * 0 sums over tacc 2 %)
        flag_if(!finite_f32(v[r][0]) || (HW > 1 && !finite_f32(v[r][HW - 1])), bad + static_cast<int64_t>(j) * p.Hk);
#pragma unroll
        for (int h = 0; h < HW; ++h) {
          const long long iv = __float2ll_rn(v[r][h] * fx);
          asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;\n" ::"l"(dst + 32 * h), "l"(iv) : "memory");
        }
      }
      __syncwarp();
    }
  }

  // ---- epilogue: dq * scale, each warp its 16 rows, staged in the q tile -----------------------------------
  cp_async_wait<0>();
  __syncthreads();
  store_dq_rows<T, D>(acc, p.scale, sQ, warp * 16, m.sRow, static_cast<T*>(p.dq) + ts.qoff, ts.q_rstride, lane);
#endif
}

// dk and dv = the fixed-point sums over their scales, in the inputs' dtype, NaN for a key flagged as having read a
// non-finite value: acc holds dk's nk sums then dv's, bad dk's nk / D flags then dv's (so element e's flag is
// bad[e / D] either way); 8 elements a thread (nk a multiple of 8).
template <typename T, int D>
__global__ void bsattn_bwd_rows_finalize_kernel(const long long* __restrict__ acc, const unsigned* amax,
                                                const unsigned char* __restrict__ bad, T* __restrict__ dk,
                                                T* __restrict__ dv, int64_t nk, int M, int g, float scale) {
  const RowsScales fs = rows_scales(amax, M, g, D, scale);
  const int64_t n8 = 2 * nk / 8, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n8; i += stride) {
    const int64_t e = 8 * i;
    const bool is_k = e < nk;
    const int64_t ek = is_k ? e : e - nk;
    const double inv = is_k ? fs.inv_k : fs.inv_v;
    const bool nan = bad[e / D] != 0;
    const longlong2* src = reinterpret_cast<const longlong2*>(acc) + 4 * i;
    alignas(16) T out[8];
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const longlong2 a = __ldcs(src + h);
      out[2 * h] = static_cast<T>(nan ? NAN : static_cast<float>(static_cast<double>(a.x) * inv));
      out[2 * h + 1] = static_cast<T>(nan ? NAN : static_cast<float>(static_cast<double>(a.y) * inv));
    }
    T* dst = is_k ? dk + ek : dv + ek;
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(out);
  }
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
