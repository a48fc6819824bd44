// Forward kernel instantiation: f16, head dim 128 (tiles of 16, 64 and 128 packed rows).
#include "cuda/fwd/launch.cuh"

BSATTN_INSTANTIATE_FWD(kF16, 128)
