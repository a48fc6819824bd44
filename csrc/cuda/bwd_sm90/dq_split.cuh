// The row split of the Hopper dq kernel (dq_kernel.cuh, the pair's dq where R * g > 16): a block row that lists many
// more blocks than the others (a global row of a BigBird layout) is cut into pieces of consecutive entries over
// several CTAs, as in the forward (fwd_sm90/row_split.cuh, whose plan and item tables this reuses): without it such a
// row's CTA walks all its blocks while the others are long done.
//
// Three steps (launch_dq_split_tiles): the forward's plan kernel over the block rows; the dq kernel, where a piece
// stores its unscaled dQ as f32 (dq_kernel.cuh store_dq_partial); bsattn_dq_split_finish_kernel, per split row the
// pieces added in piece order, times the scale, rounded once. dq stays bitwise repeatable: the cut depends on the
// layout and the launch shape only, the additions on nothing else.
//
// The area: the forward's (fwd/params.h fwd_split_workspace_words, its lse part unused) in the pair's workspace, after
// the column split's where both are given (bwd/params.h dq_split_offset; jax_bsattn/lowering.py _dq_split_words).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/bwd_sm90/dq_kernel.cuh"
#include "cuda/fwd/mma.cuh"
#include "cuda/fwd_sm90/row_split.cuh"

namespace bsattn {
namespace cuda {
namespace bwd {

// One CTA per (batch, KV head, partial slot) and chunk of kCombineRows packed rows (blockIdx.y, strided by gridDim.y):
// where the slot is its row's first, dq = scale x the sum of the pieces' dQ in piece order, for the rows below M.
template <typename T, int D>
__global__ void __launch_bounds__(256) bsattn_dq_split_finish_kernel(const __grid_constant__ Sm90DqParams p) {
  SplitRowPieces sr;
  if (!split_row_pieces(p, D, sr)) return;  // (uniform)
  constexpr int Q4 = D / 4;  // float4 of a row
  const int64_t n = sr.rows * Q4, step = static_cast<int64_t>(gridDim.y) * kCombineRows * Q4;
  for (int64_t base = static_cast<int64_t>(blockIdx.y) * kCombineRows * Q4; base < n; base += step) {
    for (int i = threadIdx.x; i < kCombineRows * Q4 && base + i < n; i += 256) {
      const int64_t P = (base + i) / Q4, d = ((base + i) % Q4) * 4;
      float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int j = 0; j < sr.count; ++j) {  // piece order: fixed, so dq repeats bitwise
        const float4 x = *reinterpret_cast<const float4*>(sr.sums + j * sr.plane + P * D + d);
        s.x += x.x;
        s.y += x.y;
        s.z += x.z;
        s.w += x.w;
      }
      const int64_t at = sr.at(p, P);
      uint2 v;
      v.x = Mma<T>::pack(s.x * p.scale, s.y * p.scale);
      v.y = Mma<T>::pack(s.z * p.scale, s.w * p.scale);
      *reinterpret_cast<uint2*>(static_cast<T*>(p.dq) + at * D + d) = v;
    }
  }
}

// The dq kernel over 64-row tiles, its long block rows split where the pair's workspace holds the area
// (dq_split_offset); else exactly launch_row_tiles.
template <typename T, class Cfg>
cudaError_t launch_dq_split_tiles(const Params& p, cudaStream_t stream) {
  Sm90DqParams d = dq_sm90_params(p);
  const int64_t off = dq_split_offset(p, Cfg::D);
  if (off >= 0) {
    d.ws = reinterpret_cast<uint32_t*>(p.dq_accum + off);
    d.ws_words = fwd_split_workspace_words(d, Cfg::D, false);
  }
  return launch_split_row_tiles<bsattn_bwd_dq_sm90_kernel<T, Cfg>, bsattn_dq_split_finish_kernel<T, Cfg::D>, Cfg, T,
                                /*FewRows=*/false, kCombineRows>(d, stream);
}

}  // namespace bwd
}  // namespace cuda
}  // namespace bsattn
