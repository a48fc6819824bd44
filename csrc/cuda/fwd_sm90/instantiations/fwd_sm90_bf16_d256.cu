// Hopper forward kernel instantiation: bf16, head dim 256 (64-row tiles). Compiled for sm_90a only.
#include "cuda/fwd_sm90/launch.cuh"

BSATTN_INSTANTIATE_FWD_SM90(kBF16, 256)
