#!/bin/bash
# Session 51 (H100, run once; not merged, BENCHMARKS "Session 51"): the decode path's tile with a deep pipeline
# (decode_few_tile.patch, applied to the device's copy: fwd_sm90/config.cuh Sm90FwdFewTile, PF = 3 KV tiles in flight,
# 1 CTA / SM) against the ordinary 64-row tile (BSATTN_FWD_FEW_TILE=0: PF = 1, 2 CTAs / SM) and two variants at
# D = 128 (2: PF = 5, 1 CTA / SM; 3: 32-key tiles, PF = 4, 2 CTAs / SM): bench_decode.py's device time a call, then
# the few-row tests under each tile. BATCHES (default 1: a run at batch 1,16 takes more than 150 s).
source csrc/cuda/dev/kv_lens_device.sh
git apply csrc/cuda/dev/decode_few_tile.patch || exit 1
kv_build
mkdir -p $OUT/dec
for v in ${VARIANTS:-0 1 2 3}; do
  (cd /tmp && BSATTN_FWD_FEW_TILE=$v timeout -s KILL 150 python3 $OLDPWD/benchmarks/bench_decode.py --out $OUT/dec \
    --label t$v --batch ${BATCHES:-1} --calls 50 > $OUT/dec_t$v.log 2>&1)
  stamp "decode t$v rc=$?"
  grep "^{" $OUT/dec_t$v.log | python3 -c "import json,sys; [print(r['B'],r['M'],r['N'],r['C'],r['keys'],'gpu_us',r['gpu_us'],'us',round(r['us'],2)) for r in map(json.loads, sys.stdin)]"
done
i=0
for v in ${VARIANTS:-0 1 2 3}; do i=$((i+1))
  (cd tests && BSATTN_FWD_FEW_TILE=$v timeout -s KILL ${TEST_S:-120} python3 -m pytest -q test_gpu.py \
    -k "few_rows_split" > $OUT/ft$i.log 2>&1) &
done
wait; stamp "tests done"; tail -qn1 $OUT/ft?.log; grep -hE "^FAILED|Error" $OUT/ft?.log | head
