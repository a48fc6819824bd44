// Hopper narrow-column dk / dv instantiation: f16, head dim 128. Compiled for sm_90a only.
#include "cuda/bwd_sm90/launch.cuh"

BSATTN_INSTANTIATE_DKDV_SM90(kF16, 128)
