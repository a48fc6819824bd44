# Sourced by the kv_lens device scripts (run from the repository root on the device, $OUT set): the timer, the build,
# one bench_kv_lens.py run per variant, the GPU test processes. kv_variant_env VARIANT prints the env assignments of a
# variant (here: live, main's lists, and masked, BSATTN_KV_LIVE_LISTS=0); a script with other variants redefines it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
T0=$(date +%s); stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name --format=csv,noheader

kv_build() {  # the CUDA build into /tmp/site
  BSATTN_CUDA=FORCE BSATTN_CUDA_ARCHS=90 python3 -m pip install -q --no-build-isolation --no-deps --no-index \
    --target /tmp/site . > $OUT/pip.log 2>&1 || { tail -30 $OUT/pip.log; exit 1; }
  stamp built
}

kv_variant_env() { [ $1 = masked ] && echo BSATTN_KV_LIVE_LISTS=0; }

kv_bench() {  # VARIANT STEM SECONDS bench_kv_lens.py's arguments...: one run, its rows shown
  local v=$1 f=$2 t=$3; shift 3
  env $(kv_variant_env $v) timeout -s KILL $t python3 benchmarks/bench_kv_lens.py --out $OUT/${f}_$v.jsonl "$@" \
    > $OUT/b${f}_$v.log 2>&1
  stamp "bench $f $v rc=$?"; grep "^{" $OUT/b${f}_$v.log | python3 -c "import json,sys; [print(r['g'],r['R'],r['C'],'full',r['full_ms'],'~',r['full_spread_ms'],'lens',r['lens_ms'],'~',r['lens_spread_ms'],r['lens_over_full']) for r in map(json.loads, sys.stdin)]" 2>&1 | tail -6
}

kv_nodrop() {  # STEM VARIANT...: one run per variant at lengths N - 7 (nothing dropped but the last block's tail)
  local f=$1 v; shift
  for v in "$@"; do kv_bench $v $f 50 --cells 1:128:128,8:1:16 --lens 1,1,1,1 --tag nodrop_$v; done
}

# kv_lens_gpu_tests SECONDS EXPR...: one pytest process of tests/test_gpu.py per -k expression, in parallel, each
# killed after SECONDS; logs $OUT/t1.log ...; the summaries and failures shown.
KV_LENS_GPU_TESTS_ALL=("test_kv_lens and not backward and not 16-4096" "16-4096" "kv_lens_backward and not training"
  "training_scale" "forward_grid or nan_rows or test_q_offset or forward_row_split or vmap_and_garbage")
kv_lens_gpu_tests() {
  local t=$1 i=0 k; shift
  for k in "$@"; do i=$((i+1))
    (cd tests && timeout -s KILL $t python3 -m pytest -q test_gpu.py -k "$k" > $OUT/t$i.log 2>&1) &
  done
  wait
  stamp "tests done"; for k in $(seq 1 $i); do tail -1 $OUT/t$k.log; done
  grep -hE "^FAILED|Error" $OUT/t?.log | head -20
}
