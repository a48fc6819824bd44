// Tile configurations of the Hopper backward kernel (bwd_sm90/kernel.cuh).
//
// A CTA is WG warpgroups and owns BK = 64 * WG keys of one block column (warpgroup w: keys 64 w ..); it walks the
// column's packed query rows in tiles of BQ = 64, STAGES deep (cp.async), every warpgroup on the same q / do tile.
// With two warpgroups the dq tile (64 rows x D) is split by columns: warpgroup w computes columns w * D / 2 .. over
// all 128 keys. Every tile is in the 128-byte-swizzled canonical layout (common/gather.cuh AtomSwizzle), 1024-byte
// aligned.
#pragma once

#include "cuda/bwd/common.cuh"
#include "cuda/common/gather.cuh"
#include "cuda/fwd/config.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

template <int D_, int STAGES_, int MINB_, int WG_ = 1>
struct Sm90BwdCfg {
  static constexpr int D = D_, STAGES = STAGES_, MINB = MINB_, WG = WG_;
  static constexpr int BK = 64 * WG;  // keys per CTA; per warpgroup wgmma M of s^T, dp^T, dk, dv; K of dq
  static constexpr int BQ = 64;       // packed query rows per tile: wgmma N of s^T, dp^T; K of dk, dv; M of dq
  static constexpr int DQN = D / WG;  // dq columns per warpgroup: wgmma N of dq
  static constexpr int NT = 128 * WG; // warp w owns keys 16 w .. (and rows 16 (w % 4) .. of dq)
  static constexpr int NWARPS = 4 * WG;
  // dkdv_store (bwd/dkdv_kernel.cuh) view: one warp column of 16 keys per warp, no row split, dk and dv
  static constexpr int WQ = 1, MODE = 0, CPR = D / 8, DKN = D / 8, DVN = D / 8, OST = D + 8;
  using KLayout = AtomSwizzle<D, BK>;   // K, V
  using QLayout = AtomSwizzle<D, BQ>;   // q, do stages
  using SLayout = AtomSwizzle<BK, BQ>;  // dS: BQ rows x BK keys (one 128-byte column block per warpgroup)
  using QMap = TileMap<D, NT, BQ>;
  // shared memory (bytes; the tiles first, each a multiple of 1024): K, V, q stages, do stages, dS; then per
  // staged row raw lse, delta, causal limit and global row (-1: none); + 1024 to align the dynamic base
  static constexpr int K_BYTES = BK * D * 2;
  static constexpr int Q_STAGE = BQ * D * 2;
  static constexpr int DS_BYTES = BQ * BK * 2;
  // two warpgroups: each warp stages its 16 dq rows (DQN floats) here for the bulk-copy reduction into dq_accum; the
  // row pitch is 32 bytes over, so that the 8-byte stores of 8 rows x 4 lanes fall in distinct banks
  static constexpr bool BULK_DQ = WG > 1;
  static constexpr int DQ_PITCH = DQN * 4 + 32;
  static constexpr int DQ_BYTES = BULK_DQ ? NWARPS * 16 * DQ_PITCH : 0;
  static constexpr int TILE_BYTES = 2 * K_BYTES + 2 * STAGES * Q_STAGE + DS_BYTES + DQ_BYTES;
  static constexpr int ROW_BYTES = 4 * STAGES * BQ * 4;
  static constexpr int SMEM = 1024 + TILE_BYTES + ROW_BYTES;

  static_assert(D == 64 || D == 128, "wgmma N of dk, dv is D: 64 or 128 (the generated ops)");
  static_assert(WG == 1 || (WG == 2 && D == 128), "two warpgroups split dq at a 64-column (128-byte) block");
  static_assert(STAGES >= 2 && STAGES <= 4, "pipeline depth");
  static_assert(SMEM <= 227 * 1024, "shared memory per CTA");
};

// The narrow-column dk / dv kernel (dkdv_narrow_kernel.cuh; the deterministic pair's dk / dv for 8 < C <= 16): one
// warpgroup and one block column of BK = 16 keys per CTA, its packed query rows in tiles of BQ = 64, STAGES deep. The
// rows are wgmma M of s = q K^T and dp = do V^T (N = the 16 keys); dv^T += do^T p and dk^T += q^T ds take D as M (D / 64
// m64 halves, N = 16 keys, K = the tile's rows), do and q read MN-major from their stages as gathered, p^T and ds^T
// from shared memory. Every tile 1024-byte aligned.
//
// WS: a fifth to eighth warp, a producer warpgroup, does the gather (K, V and the q / do tiles), handing each stage
// over through an mbarrier (full: its copies landed and its row statistics and mask flags stored; empty: the
// consumers' products and reads done), so the MMA warpgroup meets no CTA barrier. The default; BSATTN_BWD_DKDV=narrow
// runs the form without (WS = false).
template <int D_, int STAGES_, int MINB_, bool WS_ = false, int BK_ = 16>
struct Sm90DkdvNarrowCfg {
  static constexpr int D = D_, STAGES = STAGES_, MINB = MINB_;
  static constexpr bool WS = WS_;
  static constexpr int BK = BK_;  // keys per CTA (16-key chunks of a wider column): wgmma N of every product
  static constexpr int BQ = 64;  // packed query rows per tile: wgmma M of s, dp; K of dv^T, dk^T
  static constexpr int NT = 128, NWARPS = 4;  // the MMA warpgroup
  static constexpr int NT_ALL = NT + (WS ? 128 : 0);
  static constexpr int HALVES = D / 64;  // m64 blocks of dv^T, dk^T
  using KLayout = AtomSwizzle<D, BK>;   // K, V: 16 rows, D / 64 column blocks of 2 KB
  using QLayout = AtomSwizzle<D, BQ>;   // q, do stages
  using PLayout = AtomSwizzle<BQ, BK>;  // p^T, ds^T: 16 keys x 64 rows, one 128-byte column block
  using QMap = TileMap<D, NT, BQ>;
  static constexpr int K_BYTES = BK * D * 2;
  static constexpr int Q_STAGE = BQ * D * 2;
  static constexpr int P_BYTES = BK * BQ * 2;
  static constexpr int OUT_PITCH = D * 2 + 16;  // the epilogue's staging rows (16 keys) inside stage 0 of q
  static constexpr int TILE_BYTES = 2 * K_BYTES + 2 * STAGES * Q_STAGE + 2 * P_BYTES;
  static constexpr int ROW_BYTES = 3 * STAGES * BQ * 4;  // per staged row: raw lse, raw delta (f32), causal limit
  // WS: full[S], empty[S] mbarriers, then a mask flag per stage and producer warp
  static constexpr int BAR_OFF = TILE_BYTES + ROW_BYTES;
  static constexpr int WS_BYTES = WS ? 2 * STAGES * 8 + STAGES * 4 * 4 : 0;
  static constexpr int SMEM = 1024 + TILE_BYTES + ROW_BYTES + WS_BYTES;

  static_assert(D == 64 || D == 128 || D == 256, "dv^T, dk^T in m64 blocks of D");
  static_assert(K_BYTES % 1024 == 0 && Q_STAGE % 1024 == 0 && P_BYTES % 1024 == 0, "1024-byte aligned tiles");
  static_assert(BK == 16 || BK == 32, "16-key slices; N = 16 or 32 wgmmas");
  static_assert(2 * BK * OUT_PITCH <= STAGES * Q_STAGE, "dk, dv staging inside the q stages");
  static_assert(STAGES >= 2 && STAGES <= 4, "pipeline depth");
  static_assert(SMEM <= 227 * 1024 && MINB * (SMEM + 1024) <= 228 * 1024, "shared memory per CTA");
  static_assert(BAR_OFF % 8 == 0, "mbarrier alignment");
};
// D = 128: three stages, 111 KB, two CTAs per SM.
struct Sm90DkdvNarrowTile : Sm90DkdvNarrowCfg<128, 3, 2> {};
struct Sm90DkdvNarrowWsTile : Sm90DkdvNarrowCfg<128, 3, 2, true> {};
// D = 256 (every C > 8 of the pair): a q / do stage pair is 64 KB, so one CTA per SM. 8 < C <= 16: 16 keys (150 KB,
// 119 registers); C > 16: 32-key chunks of the column (170 KB, 212 registers), each gathered tile serving twice the
// keys: forward + backward 7.5-7.8 against 9.7-10.1 ms with 16-key chunks (H200, 2026-12-01, M = N = 8192, Hq = 32,
// density 1/4). A third stage bought 0-1.5 %.
struct Sm90DkdvNarrowWsTile256 : Sm90DkdvNarrowCfg<256, 2, 1, true> {};
struct Sm90DkdvNarrowWsTile256Wide : Sm90DkdvNarrowCfg<256, 2, 1, true, 32> {};

// Sm90BwdTile<D>: the configuration for head dim D; two CTAs per SM (each up to 255 registers a thread).
template <int D>
struct Sm90BwdTile;
template <> struct Sm90BwdTile<64> : Sm90BwdCfg<64, 3, 2> {};
template <> struct Sm90BwdTile<128> : Sm90BwdCfg<128, 2, 2> {};
// Sm90BwdWideTile: 128 keys in two warpgroups, one CTA per SM (D = 128, block columns of at least 128 keys): each
// gathered q / do tile serves twice the keys, and dq gets half the atomic adds per FLOP. What runs there by default
// is its warp-specialised form (kernel_ws.cuh, Sm90BwdWsTile); this one is the A / B baseline.
struct Sm90BwdWideTile : Sm90BwdCfg<128, 3, 1, 2> {};

// Sm90BwdPackTile<D>: the packed small-block kernel (pack_kernel.cuh): the one-warpgroup tile above (64 keys, now
// 64 / C block columns of C <= 16 keys) plus a window of W block rows of the columns' merged row lists. Extra shared
// memory after the tile's (from EXTRA_OFF of the aligned base): the window entry of each staged row ([STAGES][BQ]
// int), a 64-bit word of listed columns per window entry and one zero entry ([W + 1] u64), the entries' block rows
// ([W] u16), per column its window start, list end, entries in the window and next block row ([4][64] int), and the
// compaction scan, window start and pass flag (8 int). At D = 128 two CTAs per SM still fit.
template <int D_>
struct Sm90BwdPackTile : Sm90BwdTile<D_> {
  using Base = Sm90BwdTile<D_>;
  static constexpr int W = 384;
  static constexpr int MAX_COLS = Base::BK;  // C = 1: one bit per column in a 64-bit word
  static constexpr int EXTRA_OFF = Base::TILE_BYTES + Base::ROW_BYTES;
  static constexpr int ENT_BYTES = Base::STAGES * Base::BQ * 4;
  static constexpr int BITS_BYTES = (W + 1) * 8;
  static constexpr int LBR_BYTES = W * 2;
  static constexpr int COL_BYTES = (4 * MAX_COLS + 8) * 4;
  static constexpr int PACK_SMEM = Base::SMEM + ENT_BYTES + BITS_BYTES + LBR_BYTES + COL_BYTES;
  static_assert(Base::WG == 1 && Base::BK == 64 && Base::NT == 128, "one warpgroup of four 16-key warps");
  static_assert(EXTRA_OFF % 8 == 0 && ENT_BYTES % 8 == 0 && LBR_BYTES % 4 == 0, "alignment of the extra arrays");
  static_assert(W % Base::NT == 0 && W <= 65536, "window: whole compaction chunks, u16 offsets");
  static_assert(Base::MINB * (PACK_SMEM + 1024) <= 228 * 1024, "MINB CTAs per SM");
};

// The Hopper dq kernel (dq_kernel.cuh): TM = 64 NWG packed query rows per CTA (warpgroup w: rows 64 w ..), the
// block row's gathered keys in KV tiles of BN rows, ST stages of K and V (both live until the tile's dq product), the
// forward's gather (FwdTileShape: its thread layout and tables); MINB CTAs per SM.
template <int D_, int NWG_, int BN_, int ST_, int MINB_>
struct Sm90DqCfg : FwdTileShape<D_, NWG_ * 128, NWG_ * 64, BN_> {
  using Shape = FwdTileShape<D_, NWG_ * 128, NWG_ * 64, BN_>;
  using Shape::Q_BYTES, Shape::KV_STAGE_BYTES, Shape::LIM_BYTES, Shape::CTA_BYTES, Shape::OWN_BYTES, Shape::ROW_BYTES;
  static constexpr int D = D_, NWG = NWG_, BN = BN_, ST = ST_, MINB = MINB_;
  static constexpr int PF = ST - 1;  // KV tiles in flight ahead of the one being computed
  static constexpr int NT = NWG * 128, TM = NWG * 64;
  static constexpr bool KV_L1 = false;
  // shared memory (bytes): q and do tiles, K stages, V stages (each 1024-byte aligned), key index per staged row, the
  // tile shape's tables, lse2 and delta per tile row; + 1024 to align the dynamic base
  static constexpr int KV_BYTES = 2 * ST * KV_STAGE_BYTES;
  static constexpr int SMEM =
      1024 + 2 * Q_BYTES + KV_BYTES + ST * BN * 4 + LIM_BYTES + CTA_BYTES + OWN_BYTES + ROW_BYTES + 2 * TM * 4;

  static_assert(D == 64 || D == 128 || D == 256, "wgmma N of dq = dS K is D: 64, 128 or 256 (the generated ops)");
  static_assert(BN == 32 || BN == 64 || BN == 128, "wgmma N of S, dP is BN: 32, 64 or 128 (the generated ops)");
  static_assert(ST >= 2 && ST <= 8, "pipeline depth");
  static_assert(SMEM <= 227 * 1024, "shared memory per CTA");
  static_assert(MINB * (SMEM + 1024) <= 228 * 1024, "MINB CTAs per SM");
};

// Sm90DqTile<D>: the configuration for head dim D. 64 packed rows per CTA everywhere: at D = 128, two CTAs of 64 rows
// measured as fast as one CTA of 128 (two warpgroups, one CTA per SM) or 1 % faster (H200, 2026-11-30, C = 16, R * g
// >= 128); at D = 64 two warpgroups under two CTAs per SM spilled.
template <int D>
struct Sm90DqTile;
//                                     D  NWG  BN  ST MINB
template <> struct Sm90DqTile<64> : Sm90DqCfg<64, 1, 64, 2, 3> {};
template <> struct Sm90DqTile<128> : Sm90DqCfg<128, 1, 64, 2, 2> {};
// D = 256: q and do alone take 64 KB, so one CTA per SM whatever BN; 64-key tiles (194 KB, 255 registers, 8 bytes of
// spill) measured 8 % faster forward + backward than 32-key ones (130 KB, 216 registers, none) or 32-key tiles three
// deep (H200, 2026-12-01).
template <> struct Sm90DqTile<256> : Sm90DqCfg<256, 1, 64, 2, 1> {};

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
