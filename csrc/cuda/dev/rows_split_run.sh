#!/bin/bash
# Session 55 (prepared, not yet run: no device started that session): the row-oriented Hopper backward's row split,
# rows_split.patch (a long block row cut into pieces over CTAs as the pair's dq kernel's: bwd_sm90/dq_split.cuh). Run
# on the device from the repository root ($OUT set); it applies the patch to its copy, builds it into /tmp/site and,
# with `grid` among the stages, main's tree into /tmp/site_old beside it. STAGES (default "tests layouts memcheck"):
#   tests    the rows / dq-split GPU tests, the patch's test_backward_rows_split among them (K1, K2: -k expressions)
#   layouts  bench_layouts.py, BSATTN_BWD_SPLIT 0 / auto interleaved in one process, bigbird and uniform (LCELLS)
#   memcheck compute-sanitizer memcheck on sanitize_api.py's row-split cases (SAN_CASES: 24 25 26)
#   grid     bench_grid.py forward + backward, main's build against the patched one, ROUNDS rounds (GCELLS): the cost of
#            the kernel's changed epilogue (225 registers against 221 at D = 128 bf16, no spills) where nothing is split
# Timings: TEST_S, LAYOUT_S, SAN_S (seconds a stage's process). Logs under $OUT (a few files: t1.log, t2.log, ...).
source csrc/cuda/dev/kv_lens_device.sh   # the environment, stamp, kv_build (into /tmp/site), kv_lens_gpu_tests
STAGES=${STAGES:-tests layouts memcheck}
if [[ " $STAGES " == *" grid "* ]]; then
  rm -rf /tmp/oldtree && mkdir -p /tmp/oldtree && cp -r . /tmp/oldtree/ || exit 1  # (before the patch is applied)
  (cd /tmp/oldtree && BSATTN_CUDA=FORCE BSATTN_CUDA_ARCHS=90 python3 -m pip install -q --no-build-isolation --no-deps \
    --no-index --target /tmp/site_old . > /tmp/pip_old.log 2>&1 || tail -30 /tmp/pip_old.log) &
fi
git apply csrc/cuda/dev/rows_split.patch || exit 1
kv_build; wait
for st in $STAGES; do case $st in
tests)
  kv_lens_gpu_tests ${TEST_S:-200} "${K1:-backward_rows_split or (backward_rows and 64-1-4) or very_low_lse}" \
    "${K2:-(backward_rows and not split and not 64-1-4) or dq_split}" ;;
memcheck)
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for c in ${SAN_CASES:-24 25 26}; do
    XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout -s INT ${SAN_S:-100} $SAN --tool memcheck --kernel-name kns=bsattn \
      python3 csrc/cuda/dev/sanitize_api.py $c > /tmp/san_$c.log 2>&1; echo "memcheck case $c rc=$?"
    grep -E "^case|ERROR SUMMARY" /tmp/san_$c.log
  done; cat /tmp/san_*.log | grep -v "^I0000\|^WARNING" | tail -40 > $OUT/memcheck.log; stamp memcheck ;;
layouts)
  timeout -s INT ${LAYOUT_S:-200} python3 benchmarks/bench_layouts.py --cells ${LCELLS:-8:16:16,4:64:1,4:16:8} \
    --layouts bigbird,uniform --env BSATTN_BWD_SPLIT --values 0,auto --reps 5 > $OUT/layouts.log 2>&1
  stamp "layouts rc=$?"; grep -v "^WARNING\|^I0000" $OUT/layouts.log | tail -20 ;;
grid)
  for r in ${ROUNDS:-1 2}; do for v in old new; do s=/tmp/site; [ $v = old ] && s=/tmp/site_old
    PYTHONPATH=$s timeout -s INT 70 python3 benchmarks/bench_grid.py --backend api --fwdbwd --no-causal \
      --cells ${GCELLS:-4:64:1,8:16:16,4:16:1} --out /tmp/g_${v}_$r > /tmp/g_${v}_$r.log 2>&1
    echo "$v round $r rc=$?"; grep -E "^ *[0-9]+ +[0-9]+ +[0-9]+ " /tmp/g_${v}_$r.log | head -5; done; done
  stamp grid; tail -n 8 /tmp/g_*.log > $OUT/grid.log ;;
esac; done
