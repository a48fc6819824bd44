// Hopper sweep forward instantiation: bf16, head dim 64 (R * g <= 16). Compiled for sm_90a only.
#include "cuda/fwd_sm90/launch.cuh"

BSATTN_INSTANTIATE_FWD_SM90_SWEEP(kBF16, 64)
