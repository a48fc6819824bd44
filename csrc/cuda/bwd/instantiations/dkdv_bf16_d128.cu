// Backward kernel instantiation: dkdv, bf16, head dim 128.
#include "cuda/bwd/launch.cuh"

BSATTN_INSTANTIATE_BWD_DKDV(kBF16, 128)
