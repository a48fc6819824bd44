// Tile configurations of the forward kernel, one per (head dim, packed rows per tile).
//
// A CTA owns TM packed query rows (rows (r, j) of one block row and one KV head group, p = r * g + j)
// and walks the block row's gathered key sequence in KV tiles of BN rows, STAGES deep in shared memory.
// Its warps form a WM x WN grid: WM warps along the rows, each owning MI m16 strips (16 * MI rows),
// and WN warps along the keys of every KV tile (each keeps its own online-softmax state over its
// BN / WN keys; the WN partial results are merged through shared memory at the end).
#pragma once

namespace bsattn {
namespace cuda {

// What both forward kernels' configurations (this one and fwd_sm90/config.cuh) derive alike from the head dim D,
// NT threads, TM packed rows and BN-key KV tiles: the KV gather's thread layout (fwd/gather_kv.cuh) and the
// shared-memory tables every CTA keeps.
template <int D, int NT, int TM, int BN>
struct FwdTileShape {
  // KV gather: threads per row = CPR (16-byte chunks per row), rows per pass over all threads, passes per tile,
  // rows one warp issues per instruction, and key rows each warp resolves per tile (one per "owner" lane).
  static constexpr int CPR = D / 8;
  static constexpr int RPP = NT / CPR;
  static constexpr int PASSES = BN / RPP;
  static constexpr int RPW = 32 / CPR;
  static constexpr int OWN = BN / (NT / 32);
  // shared memory (bytes): Q tile, one K or V stage, causal limit per tile row, per-CTA gather constants
  // (GatherShared), gather walk state per owner row, (query row, head) per tile row
  static constexpr int Q_BYTES = TM * D * 2;
  static constexpr int KV_STAGE_BYTES = BN * D * 2;
  static constexpr int LIM_BYTES = TM * 4;
  static constexpr int CTA_BYTES = 32;
  static constexpr int OWN_BYTES = BN * 8;
  static constexpr int ROW_BYTES = TM * 8;

  static_assert(NT % CPR == 0 && BN % RPP == 0 && CPR <= 32, "gather layout");
  static_assert(OWN <= 32 && OWN == PASSES * RPW, "one owner lane per key row");
  static_assert((TM * CPR) % NT == 0, "Q tile load layout (load_packed_tile)");
};

template <int D_, int WM_, int WN_, int MI_, int BN_, int STAGES_, bool QREG_, int MINB_, int NKC_ = BN_ / WN_,
          bool KV_L1_ = false, bool MMA_SUM_ = false>
struct FwdCfg : FwdTileShape<D_, WM_ * WN_ * 32, WM_ * MI_ * 16, BN_> {
  using Shape = FwdTileShape<D_, WM_ * WN_ * 32, WM_ * MI_ * 16, BN_>;
  using Shape::Q_BYTES, Shape::KV_STAGE_BYTES, Shape::LIM_BYTES, Shape::CTA_BYTES, Shape::OWN_BYTES,
      Shape::ROW_BYTES;
  static constexpr int D = D_;
  static constexpr int WM = WM_, WN = WN_, MI = MI_;
  static constexpr int BN = BN_, STAGES = STAGES_;
  static constexpr bool QREG = QREG_;  // keep the warp's Q fragments in registers for the whole loop
  static constexpr int MINB = MINB_;   // CTAs per SM asked of the register allocator (and the carveout)
  static constexpr bool KV_L1 = KV_L1_;  // gather K / V through L1 (cp.async.ca) rather than L2 only
  static constexpr bool MMA_SUM = MMA_SUM_;  // softmax row sums on the tensor cores (P x ones) instead of FADD trees
  static constexpr int NWARPS = WM * WN, NT = NWARPS * 32;
  static constexpr int TM = WM * MI * 16;  // packed rows per CTA
  static constexpr int NK = BN / WN;       // keys per warp per KV tile
  static constexpr int NKC = NKC_;         // keys per compute chunk: S = Q K^T, softmax, O += P V
  static constexpr int NT8 = NKC / 8;      // n8 score tiles per warp per chunk
  // shared memory (bytes): the tile shape's tables (above), K and V stages, key index per staged row, per-warp
  // row max / sum
  static constexpr int KV_BYTES = 2 * STAGES * KV_STAGE_BYTES;
  static constexpr int KIDX_BYTES = STAGES * BN * 4;
  static constexpr int ML_BYTES = 2 * WN * TM * 4;
  static constexpr int SMEM =
      Q_BYTES + KV_BYTES + KIDX_BYTES + ML_BYTES + LIM_BYTES + CTA_BYTES + OWN_BYTES + ROW_BYTES;
  // WN > 1: the f32 partial outputs are merged in the (then idle) Q tile + K/V stages, rows padded by 8
  // floats
  static constexpr int OSTRIDE = D + 8;

  static_assert(D % 64 == 0, "head dim must be a multiple of 64 (swizzle works on 8-chunk groups)");
  static_assert(NKC % 16 == 0 && NK % NKC == 0, "each warp needs whole k16 steps of keys");
  static_assert(WN == 1 || WN * TM * OSTRIDE * 4 <= Q_BYTES + KV_BYTES, "merge buffer must fit in Q + K/V");
  static_assert(STAGES >= 2 && STAGES <= 8, "pipeline depth");
  static_assert(SMEM <= 227 * 1024, "shared memory per CTA");
};

// FwdTile<D, TM>: the configuration used for head dim D when R * g packs into TM rows. Chosen on an H100
// (csrc/cuda/dev/NOTES.md has the variants that were timed):
//   TM = 128: 4 warps x 32 rows (two m16 strips each: half the shared-memory reads per FLOP of 16-row
//             warps), 2 CTAs / SM. D = 128 computes whole 64-key tiles with the row sums on the tensor
//             cores (MMA_SUM): 56 bytes of spills (a few gather words per tile, in L1), 5-7% faster than
//             two 32-key chunks without spills. D = 256 has no registers for 32 rows and uses 8 warps x
//             16 rows, 32-key tiles (fits an A100's 163 KB).
//   TM = 64:  4 warps x 16 rows with Q in registers (beat 2 x 2 warps of 32 rows splitting the keys by 3-5%).
//   TM = 16:  4 warps that split every KV tile along the keys (the memory-bound regime, R * g <= 16), two
//             64-key stages so that 3 CTAs (12 warps) fit an SM: +10-15% over 3 stages and 2 CTAs.
template <int D, int TM>
struct FwdTile;

//                                        D  WM WN MI  BN ST  QREG  MINB [NKC  KV_L1  MMA_SUM]
template <> struct FwdTile<64, 128> : FwdCfg<64, 4, 1, 2, 64, 3, false, 2> {};
template <> struct FwdTile<64, 64> : FwdCfg<64, 4, 1, 1, 64, 3, true, 3> {};
template <> struct FwdTile<64, 16> : FwdCfg<64, 1, 4, 1, 64, 4, true, 3> {};
template <> struct FwdTile<128, 128> : FwdCfg<128, 4, 1, 2, 64, 2, false, 2, 64, false, true> {};
template <> struct FwdTile<128, 64> : FwdCfg<128, 4, 1, 1, 64, 2, true, 2> {};
template <> struct FwdTile<128, 16> : FwdCfg<128, 1, 4, 1, 64, 2, true, 3> {};
template <> struct FwdTile<256, 128> : FwdCfg<256, 8, 1, 1, 32, 2, false, 1> {};
template <> struct FwdTile<256, 64> : FwdCfg<256, 4, 1, 1, 32, 2, false, 2> {};
template <> struct FwdTile<256, 16> : FwdCfg<256, 1, 4, 1, 64, 2, false, 1> {};

}  // namespace cuda
}  // namespace bsattn
