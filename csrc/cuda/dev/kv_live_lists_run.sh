#!/bin/bash
# session 48: live row lists with kv_lens (jax_bsattn/live_blocks.py): bench A/B, then GPU tests (ran: NOTES.md, session 48)
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
T0=$(date +%s); stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name --format=csv,noheader
BSATTN_CUDA=FORCE BSATTN_CUDA_ARCHS=90 python3 -m pip install -q --no-build-isolation --no-deps --no-index --target /tmp/site . > $OUT/pip.log 2>&1 || { tail -30 $OUT/pip.log; exit 1; }
stamp built
export PYTHONPATH=/tmp/site
CELLS=${CELLS:-1:128:128,8:1:16,4:1:16,4:16:16}
bench() {  # $1 live / masked, $2 file stem, $3 seconds, the rest bench_kv_lens.py's arguments: one run, its rows shown
  local v=$1 f=$2 t=$3 e=""; shift 3; [ $v = masked ] && e="BSATTN_KV_LIVE_LISTS=0"
  env $e timeout -s KILL $t python3 benchmarks/bench_kv_lens.py --out $OUT/${f}_$v.jsonl "$@" > $OUT/b${f}_$v.log 2>&1
  stamp "bench $f $v rc=$?"; grep "^{" $OUT/b${f}_$v.log | python3 -c "import json,sys; [print(r['g'],r['R'],r['C'],'full',r['full_ms'],'~',r['full_spread_ms'],'lens',r['lens_ms'],'~',r['lens_spread_ms'],r['lens_over_full']) for r in map(json.loads, sys.stdin)]" 2>&1 | tail -6
}
for v in live masked; do bench $v kv ${BT:-100} --cells $CELLS --tag $v; done
source csrc/cuda/dev/kv_lens_gpu_tests.sh
kv_lens_gpu_tests ${TT:-290} "${KV_LENS_GPU_TESTS_ALL[@]}"
# the lists' cost where nothing is dropped but the last block's tail: lengths N - 7
[ $(( $(date +%s) - T0 )) -lt 450 ] && for v in live masked; do
  bench $v kvfull 50 --cells 1:128:128,8:1:16 --lens 1,1,1,1 --tag full_$v
done
