// Backward kernel instantiation: dkdv, f16, head dim 128.
#include "cuda/bwd/launch.cuh"

BSATTN_INSTANTIATE_BWD_DKDV(kF16, 128)
