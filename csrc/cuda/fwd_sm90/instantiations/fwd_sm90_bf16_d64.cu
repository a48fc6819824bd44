// Hopper forward kernel instantiation: bf16, head dim 64 (tiles of 64 and 128 packed rows). Compiled for sm_90a only.
#include "cuda/fwd_sm90/launch.cuh"

BSATTN_INSTANTIATE_FWD_SM90(kBF16, 64)
