# Sourced by the kv_lens device scripts. kv_lens_gpu_tests SECONDS EXPR...: one pytest process of tests/test_gpu.py
# per -k expression, in parallel, each killed after SECONDS; logs $OUT/t1.log ...; the summaries and failures shown.
KV_LENS_GPU_TESTS_ALL=("test_kv_lens and not backward and not 16-4096" "16-4096" "kv_lens_backward and not training"
  "training_scale" "forward_grid or nan_rows or test_q_offset or forward_row_split or vmap_and_garbage")
kv_lens_gpu_tests() {
  local t=$1 i=0 k; shift
  for k in "$@"; do i=$((i+1))
    (cd tests && timeout -s KILL $t python3 -m pytest -q test_gpu.py -k "$k" > $OUT/t$i.log 2>&1) &
  done
  wait
  echo "tests done"; for k in $(seq 1 $i); do tail -1 $OUT/t$k.log; done
  grep -hE "^FAILED|Error" $OUT/t?.log | head -20
}
