// Hopper narrow-column dk / dv with a producer warpgroup (the default): f16, head dim 128. Compiled for sm_90a
// only.
#include "cuda/bwd_sm90/launch_dkdv_ws.cuh"

BSATTN_INSTANTIATE_DKDV_SM90_WS(kF16, 128)
