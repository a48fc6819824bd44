// Backward kernel instantiation: dq, f16, head dim 64.
#include "cuda/bwd/launch.cuh"

BSATTN_INSTANTIATE_BWD_DQ(kF16, 64)
