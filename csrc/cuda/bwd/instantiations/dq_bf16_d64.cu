// Backward kernel instantiation: dq, bf16, head dim 64.
#include "cuda/bwd/launch.cuh"

BSATTN_INSTANTIATE_BWD_DQ(kBF16, 64)
