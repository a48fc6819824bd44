// Hopper sweep forward instantiation: f16, head dim 128 (R * g <= 16). Compiled for sm_90a only.
#include "cuda/fwd_sm90/launch.cuh"

BSATTN_INSTANTIATE_FWD_SM90_SWEEP(kF16, 128)
