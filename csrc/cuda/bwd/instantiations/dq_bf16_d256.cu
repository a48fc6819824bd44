// Backward kernel instantiation: dq, bf16, head dim 256.
#include "cuda/bwd/launch.cuh"

BSATTN_INSTANTIATE_BWD_DQ(kBF16, 256)
