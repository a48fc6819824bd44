// The row-oriented Hopper backward: bf16, head dim 128. Compiled for sm_90a only.
#include "cuda/bwd_sm90/launch_rows.cuh"

BSATTN_INSTANTIATE_BWD_ROWS_SM90(kBF16, 128)
