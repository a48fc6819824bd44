// Hopper dq kernel instantiation: bf16, head dim 256. Compiled for sm_90a only.
#include "cuda/bwd_sm90/launch.cuh"

BSATTN_INSTANTIATE_DQ_SM90(kBF16, 256)
