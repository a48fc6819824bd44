// Hopper narrow-column dk / dv instantiation: bf16, head dim 128. Compiled for sm_90a only.
#include "cuda/bwd_sm90/launch.cuh"

BSATTN_INSTANTIATE_DKDV_SM90(kBF16, 128)
