#!/bin/bash
# session 48: live row lists with kv_lens (jax_bsattn/live_blocks.py): bench A/B, then GPU tests (ran: NOTES.md, session 48)
source csrc/cuda/dev/kv_lens_device.sh
kv_build
CELLS=${CELLS:-1:128:128,8:1:16,4:1:16,4:16:16}
for v in live masked; do kv_bench $v kv ${BT:-100} --cells $CELLS --tag $v; done
kv_lens_gpu_tests ${TT:-290} "${KV_LENS_GPU_TESTS_ALL[@]}"
# the lists' cost where nothing is dropped
[ $(( $(date +%s) - T0 )) -lt 450 ] && kv_nodrop kvfull live masked
