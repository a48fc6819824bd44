// Backward kernel instantiation: dq, f16, head dim 128.
#include "cuda/bwd/launch.cuh"

BSATTN_INSTANTIATE_BWD_DQ(kF16, 128)
