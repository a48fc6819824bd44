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
cd tests
K1="test_kv_lens and not backward and not 16-4096"
K2="16-4096"
K3="kv_lens_backward and not training"
K4="training_scale"
K5="forward_grid or nan_rows or test_q_offset or forward_row_split or vmap_and_garbage"
i=0; for k in "$K1" "$K2" "$K3" "$K4" "$K5"; do i=$((i+1))
  timeout -s KILL ${TT:-290} python3 -m pytest -q test_gpu.py -k "$k" > $OUT/t$i.log 2>&1 &
done
wait
stamp done; for i in 1 2 3 4 5; do tail -1 $OUT/t$i.log; done; grep -hE "^FAILED|Error" $OUT/t?.log | head -20
cd ..
# the lists' cost where nothing is dropped but the last block's tail: lengths N - 7
[ $(( $(date +%s) - T0 )) -lt 450 ] && for v in live masked; do
  bench $v kvfull 50 --cells 1:128:128,8:1:16 --lens 1,1,1,1 --tag full_$v
done
