// Tile configurations of the Hopper forward kernels (fwd_sm90/kernel.cuh, kernel_ws.cuh, sweep_kernel.cuh).
//
// A CTA owns TM = 64 NWG packed query rows; each of its NWG warpgroups owns 64 of them and computes them with
// wgmma (m64nNk16): S = Q K^T with Q and K from shared memory, O += P V with P from registers. The block row's
// gathered keys come in KV tiles of BN rows, in KST K and VST V stages (cp.async, the forward's gather). All tiles use the
// 128-byte-swizzled canonical layout (common/gather.cuh AtomSwizzle).
#pragma once

#include "cuda/fwd/config.cuh"

namespace bsattn {
namespace cuda {

template <int D_, int NWG_, int BN_, int KST_, int VST_, int MINB_, bool OVERLAP_>
struct Sm90FwdCfg : FwdTileShape<D_, NWG_ * 128, NWG_ * 64, BN_> {
  using Shape = FwdTileShape<D_, NWG_ * 128, NWG_ * 64, BN_>;
  using Shape::Q_BYTES, Shape::KV_STAGE_BYTES, Shape::LIM_BYTES, Shape::CTA_BYTES, Shape::OWN_BYTES, Shape::ROW_BYTES;
  static constexpr int D = D_, NWG = NWG_, BN = BN_;
  // K and V stages. OVERLAP: each warpgroup issues S = Q K^T of tile t before O += P V of tile t - 1 and runs
  // the softmax of t while the tensor cores finish P V (V tiles live one tile longer: VST >= KST + 1);
  // else one stage count for both (KST == VST) and the two products of a tile run back to back.
  static constexpr int KST = KST_, VST = VST_;
  static constexpr bool OVERLAP = OVERLAP_;
  // KV tiles in flight ahead of the one being computed
  static constexpr int PF = OVERLAP ? (KST - 1 < VST - 2 ? KST - 1 : VST - 2) : KST - 1;
  static constexpr int MINB = MINB_;  // CTAs per SM asked of the register allocator (and the carveout)
  static constexpr int NWARPS = 4 * NWG, NT = NWARPS * 32;
  static constexpr int TM = 64 * NWG;  // packed rows per CTA
  static constexpr int MI = 1;         // m16 strips per warp (the epilogue's view: warp w owns rows 16 w ...)
  static constexpr bool KV_L1 = false;
  // shared memory (bytes): the tile shape's tables (fwd/config.cuh), K stages, V stages (each 1024-byte aligned),
  // key index per K stage row; + 1024 of slack to align the dynamic shared memory to 1024
  static constexpr int KV_BYTES = (KST + VST) * KV_STAGE_BYTES;
  static constexpr int KIDX_BYTES = KST * BN * 4;
  static constexpr int SMEM = 1024 + Q_BYTES + KV_BYTES + KIDX_BYTES + LIM_BYTES + CTA_BYTES + OWN_BYTES + ROW_BYTES;

  static_assert(OVERLAP ? (KST >= 2 && VST >= 3) : KST == VST, "stage counts");
  static_assert(D == 64 || D == 128 || D == 256, "wgmma N of O += P V is D: 64, 128 or 256 (the generated ops)");
  static_assert(BN == 32 || BN == 64 || BN == 128, "wgmma N of S = Q K^T is BN: 32, 64 or 128 (the generated ops)");
  static_assert(PF >= 1 && KST <= 8 && VST <= 8, "pipeline depth");
  static_assert(SMEM <= 227 * 1024, "shared memory per CTA");
};

// Sm90FwdTile<D, TM>: the configuration for head dim D when R * g packs into TM = 64 or 128 rows. Chosen on an
// H100 (csrc/cuda/dev/NOTES.md has the variants timed). The winners run 2 to 4 CTAs per SM (8 to 16 warps):
// with one CTA of 8 warps the tensor cores idle while both warpgroups are in their softmax, which the
// overlapped schedule (OVERLAP) recovers only in part; with 2 CTAs it still gains ~1 % on the 64-row D = 128
// tile and nothing elsewhere.
template <int D, int TM>
struct Sm90FwdTile;

//                                              D  NWG  BN KST VST MINB OVERLAP
template <> struct Sm90FwdTile<64, 128> : Sm90FwdCfg<64, 2, 128, 2, 2, 2, false> {};
template <> struct Sm90FwdTile<64, 64> : Sm90FwdCfg<64, 1, 64, 2, 2, 4, false> {};
template <> struct Sm90FwdTile<128, 128> : Sm90FwdCfg<128, 2, 64, 2, 2, 2, false> {};
template <> struct Sm90FwdTile<128, 64> : Sm90FwdCfg<128, 1, 64, 2, 3, 2, true> {};
// D = 256 (every tile of 64 rows or more: launch_fwd_sm90): 32-key tiles keep two CTAs per SM (98 KB each); 64-key
// ones would leave one of four warps (163 KB), and the overlapped schedule's third V stage does not fit twice.
template <> struct Sm90FwdTile<256, 64> : Sm90FwdCfg<256, 1, 32, 2, 2, 2, false> {};

// Sm90FwdWsTile: the warp-specialised 128-row tile (fwd_sm90/kernel_ws.cuh, D = 128). Warps 0-7 are the two MMA
// warpgroups of Sm90FwdTile<128, 128> (64 rows each, the overlapped schedule on 128-key tiles); warps 8-11 only gather
// (the FwdTileShape of 128 threads), K KST and V VST stages ahead, handing each over through an mbarrier. One CTA per
// SM: 1024 + Q 32 KB + 2 K + 3 V stages of 32 KB + tables, about 197 KB.
template <int D_, int BN_, int KST_, int VST_>
struct Sm90FwdWsCfg : FwdTileShape<D_, 128, 128, BN_> {
  using Shape = FwdTileShape<D_, 128, 128, BN_>;
  using Shape::Q_BYTES, Shape::KV_STAGE_BYTES, Shape::LIM_BYTES, Shape::CTA_BYTES, Shape::OWN_BYTES, Shape::ROW_BYTES;
  static constexpr int D = D_, BN = BN_, KST = KST_, VST = VST_;
  static constexpr int NWG = 2, TM = 128, MI = 1;
  static constexpr int NTC = 256, NT = NTC + 128;  // consumer threads; the launch (+ the producer warpgroup)
  static constexpr int MINB = 1;
  static constexpr bool KV_L1 = false;
  // setmaxnreg moves registers within the launch allocation (384 x 168): what the consumers take, the producer gives
  static constexpr int LAUNCH_REGS = 65536 / NT / 8 * 8, PRODUCER_REGS = 40, CONSUMER_REGS = 232;
  static constexpr int KV_BYTES = (KST + VST) * KV_STAGE_BYTES;
  static constexpr int KIDX_BYTES = KST * BN * 4;
  // full / empty mbarriers of the K stages, then of the V stages; per K stage and producer warp: a row needs the mask
  static constexpr int BAR_BYTES = 2 * (KST + VST) * 8, FLAG_BYTES = KST * 4 * 4;
  static constexpr int TAB_BYTES = KIDX_BYTES + LIM_BYTES + CTA_BYTES + OWN_BYTES + ROW_BYTES;
  static constexpr int SMEM = 1024 + Q_BYTES + KV_BYTES + TAB_BYTES + BAR_BYTES + FLAG_BYTES;

  static_assert(D == 128 && BN == 128, "the 128-row D = 128 tile on 128-key tiles (the generated wgmma ops)");
  static_assert(KST >= 2 && VST >= KST + 1, "V tiles live one tile longer (P V of t - 1 runs beside S of t)");
  static_assert(TAB_BYTES % 8 == 0, "mbarrier alignment");
  static_assert(128 * PRODUCER_REGS + NTC * CONSUMER_REGS <= NT * LAUNCH_REGS, "register reallocation");
  static_assert(PRODUCER_REGS % 8 == 0 && CONSUMER_REGS % 8 == 0 && PRODUCER_REGS >= 24 && CONSUMER_REGS <= 256,
                "setmaxnreg: multiples of 8 in 24 .. 256");
  static_assert(SMEM <= 227 * 1024, "shared memory per CTA");
};
using Sm90FwdWsTile = Sm90FwdWsCfg<128, 128, 2, 3>;

// Sm90SweepTile<D>: the sweep kernel's configuration (fwd_sm90/sweep_kernel.cuh: one warpgroup, 64 rows, 64-key
// tiles, plus the key bit map). Two stages each without the overlap keep two CTAs per SM with a 16 KB bit map at
// D = 128 (R * g = 4, N = 8192). The overlapped schedule (K 2, V 3 stages) left one CTA per SM there and measured
// 1.4-1.7x slower at R * g = 4 (H200, 2026-11-30).
template <int D>
struct Sm90SweepTile;
//                                               D  NWG  BN KST VST MINB OVERLAP
template <> struct Sm90SweepTile<64> : Sm90FwdCfg<64, 1, 64, 2, 2, 3, false> {};
template <> struct Sm90SweepTile<128> : Sm90FwdCfg<128, 1, 64, 2, 2, 2, false> {};

}  // namespace cuda
}  // namespace bsattn
