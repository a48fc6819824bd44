// Hopper narrow-column dk / dv with a producer warpgroup (the default): bf16, head dim 128. Compiled for sm_90a
// only.
#include "cuda/bwd_sm90/launch_dkdv_ws.cuh"

BSATTN_INSTANTIATE_DKDV_SM90_WS(kBF16, 128)
