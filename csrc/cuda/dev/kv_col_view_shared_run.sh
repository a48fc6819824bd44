#!/bin/bash
# Sessions 48-49 (NOT run on a GPU yet: no machine could be started in session 49): the backward's column view built
# once from a layout shared by the batch and broadcast (kv_col_view_shared.patch, applied here to the device's copy of
# the tree: lowering.py _cuda_bwd_call and a lowering test) against the one built from the B live lists
# (BSATTN_DEV_KV_COL_VIEW=lists, main's behaviour) and the masked path (BSATTN_KV_LIVE_LISTS=0).
# PART=bench: build + timings + csrc/cuda/dev/kv_lists_cse_probe.py; PART=tests: the kv_lens GPU tests; PART=all: a
# shorter bench (no masked path, one no-drop round) and the backward's kv_lens tests in one call; PART=min: no-drop
# timings and the backward's tests (LIMIT: the call's seconds, BT: each bench's seconds, CELLS).
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
source csrc/cuda/dev/kv_lens_gpu_tests.sh
T0=$(date +%s); stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name --format=csv,noheader
grep -q BSATTN_DEV_KV_COL_VIEW jax_bsattn/lowering.py ||
  patch -p1 -s < csrc/cuda/dev/kv_col_view_shared.patch || { echo "the patch does not apply"; exit 1; }
if [ "${PART:-bench}" != tests ] || [ ! -d /tmp/site/jax_bsattn ]; then
  BSATTN_CUDA=FORCE BSATTN_CUDA_ARCHS=90 python3 -m pip install -q --no-build-isolation --no-deps --no-index \
    --target /tmp/site . > $OUT/pip.log 2>&1 || { tail -30 $OUT/pip.log; exit 1; }
  stamp built
fi
export PYTHONPATH=/tmp/site
cp jax_bsattn/*.py /tmp/site/jax_bsattn/  # (a warm machine's site: this tree's Python)
bench() {  # $1 shared / lists / masked, $2 file stem, $3 seconds, the rest bench_kv_lens.py's arguments
  local v=$1 f=$2 t=$3 e=""; shift 3
  [ $v = masked ] && e="BSATTN_KV_LIVE_LISTS=0"; [ $v = lists ] && e="BSATTN_DEV_KV_COL_VIEW=lists"
  env $e timeout -s KILL $t python3 benchmarks/bench_kv_lens.py --out $OUT/${f}_$v.jsonl "$@" > $OUT/b${f}_$v.log 2>&1
  stamp "bench $f $v rc=$?"; grep "^{" $OUT/b${f}_$v.log | python3 -c "import json,sys; [print(r['g'],r['R'],r['C'],'full',r['full_ms'],'~',r['full_spread_ms'],'lens',r['lens_ms'],'~',r['lens_spread_ms'],r['lens_over_full']) for r in map(json.loads, sys.stdin)]" 2>&1 | tail -6
}
cse_probe() {  # $1 seconds
  timeout -s KILL $1 python3 csrc/cuda/dev/kv_lists_cse_probe.py > $OUT/cse.log 2>&1; stamp "cse probe rc=$?"
  grep -E "^(forward|grad)|Error" $OUT/cse.log | cut -c1-400
}
if [ "${PART:-bench}" = min ]; then  # (a short budget: no-drop lengths only, the backward's tests)
  for v in shared lists; do bench $v kvfull ${BT:-60} --cells ${CELLS:-8:1:16,1:128:128} --lens 1,1,1,1 --tag full_$v; done
  kv_lens_gpu_tests $(( ${LIMIT:-565} - $(date +%s) + T0 )) "${KV_LENS_GPU_TESTS_ALL[2]}" "${KV_LENS_GPU_TESTS_ALL[0]}"
elif [ "${PART:-bench}" = all ]; then
  cse_probe 60
  for v in shared lists; do bench $v kv 80 --cells 8:1:16,1:128:128 --tag $v; done
  for v in shared lists; do bench $v kvfull 40 --cells 1:128:128,8:1:16 --lens 1,1,1,1 --tag full_$v; done
  kv_lens_gpu_tests $(( ${LIMIT:-565} - $(date +%s) + T0 )) "${KV_LENS_GPU_TESTS_ALL[@]:0:1}" "${KV_LENS_GPU_TESTS_ALL[@]:2:2}"
elif [ "${PART:-bench}" = bench ]; then
  cse_probe 90
  CELLS=${CELLS:-8:1:16,1:128:128}
  for v in shared lists masked; do bench $v kv ${BT:-90} --cells $CELLS --tag $v; done
  # where nothing is dropped but the last block's tail (lengths N - 7)
  for r in 1 2; do for v in shared lists; do
    bench $v kvfull$r 50 --cells 1:128:128,8:1:16 --lens 1,1,1,1 --tag full_$v
  done; done
else
  kv_lens_gpu_tests ${TT:-290} "${KV_LENS_GPU_TESTS_ALL[@]}"
fi
