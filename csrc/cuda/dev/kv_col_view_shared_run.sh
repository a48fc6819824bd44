#!/bin/bash
# Sessions 48-49 (NOT run on a GPU yet: no machine could be started in session 49): the backward's column view built
# once from a layout shared by the batch and broadcast (kv_col_view_shared.patch, applied here to the device's copy of
# the tree: lowering.py _cuda_bwd_call and a lowering test) against the one built from the B live lists
# (BSATTN_DEV_KV_COL_VIEW=lists, main's behaviour) and the masked path (BSATTN_KV_LIVE_LISTS=0).
# PART=bench (default): timings + kv_lists_cse_probe.py; PART=min, for a thin budget: no-drop timings (BT seconds a
# run, CELLS) and the backward's kv_lens tests in what is left of LIMIT seconds; PART=tests: every kv_lens GPU test.
source csrc/cuda/dev/kv_lens_device.sh
kv_variant_env() { case $1 in masked) echo BSATTN_KV_LIVE_LISTS=0;; lists) echo BSATTN_DEV_KV_COL_VIEW=lists;; esac; }
grep -q BSATTN_DEV_KV_COL_VIEW jax_bsattn/lowering.py ||
  patch -p1 -s < csrc/cuda/dev/kv_col_view_shared.patch || { echo "the patch does not apply"; exit 1; }
[ "${PART:-bench}" != tests ] || [ ! -d /tmp/site/jax_bsattn ] && kv_build
NODROP="--lens 1,1,1,1"  # lengths N - 7: nothing dropped but the last block's tail
case ${PART:-bench} in
  min)
    for v in shared lists; do kv_bench $v kvfull ${BT:-60} --cells ${CELLS:-8:1:16,1:128:128} $NODROP --tag full_$v; done
    kv_lens_gpu_tests $(( ${LIMIT:-565} - $(date +%s) + T0 )) "${KV_LENS_GPU_TESTS_ALL[2]}" "${KV_LENS_GPU_TESTS_ALL[0]}";;
  bench)
    timeout -s KILL 90 python3 csrc/cuda/dev/kv_lists_cse_probe.py > $OUT/cse.log 2>&1; stamp "cse probe rc=$?"
    grep -E "^(forward|grad)|Error" $OUT/cse.log | cut -c1-400
    for v in shared lists masked; do kv_bench $v kv ${BT:-90} --cells ${CELLS:-8:1:16,1:128:128} --tag $v; done
    for r in 1 2; do for v in shared lists; do
      kv_bench $v kvfull$r 50 --cells 1:128:128,8:1:16 $NODROP --tag full_$v
    done; done;;
  *) kv_lens_gpu_tests ${TT:-290} "${KV_LENS_GPU_TESTS_ALL[@]}";;
esac
