// Hopper narrow-column dk / dv (16- or 32-key chunks, a producer warpgroup): bf16, head dim 256. Compiled for sm_90a
// only.
#include "cuda/bwd_sm90/launch.cuh"
#include "cuda/bwd_sm90/launch_dkdv_ws.cuh"

BSATTN_INSTANTIATE_DKDV_SM90(kBF16, 256)
BSATTN_INSTANTIATE_DKDV_SM90_WS(kBF16, 256)
