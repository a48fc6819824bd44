// Hopper forward, the warp-specialised 128-row tile: f16, head dim 128. Compiled for sm_90a only.
#include "cuda/fwd_sm90/launch_ws.cuh"

BSATTN_INSTANTIATE_FWD_SM90_WS(kF16)
