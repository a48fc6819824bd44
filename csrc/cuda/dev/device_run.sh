#!/bin/bash
# One full device session for the CUDA forward kernel (run from the repo root on the GPU machine):
#   STAGES="build check bench memcheck racecheck peers" bash csrc/cuda/dev/device_run.sh
# build: only the _bsattn_cuda target (sm_90), into /tmp/b; check: check_fwd.py; bench: the timing grid
# (benchmarks/bench_grid.py, raw FFI); memcheck / racecheck: compute-sanitizer on small garbage-layout
# cases; peers: FlashInfer fa2 on the same grid (needs .peers carried; see /shared/peers/README.md).
# Logs and results go to $OUT (at most 8 files come back).
set -o pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
STAGES=${STAGES:-build check bench memcheck racecheck}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,driver_version --format=csv,noheader
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for st in $STAGES; do
  case $st in
    build)
      stamp build
      { cmake -S . -B /tmp/b -G Ninja -DPython_EXECUTABLE=$(which python3) -DBSATTN_CUDA_ARCHS=90 \
          -DBSATTN_PTXAS_VERBOSE=ON ${EXTRA_CMAKE:-} && /usr/bin/time -f "build wall %e s" cmake --build /tmp/b --target _bsattn_cuda -j16; } \
        > $OUT/build.log 2>&1 || { tail -40 $OUT/build.log; exit 1; }
      grep -E "build wall" $OUT/build.log; grep -cE "spill stores" $OUT/build.log | sed 's/^/kernels: /'
      grep -E "[1-9][0-9]* bytes spill" $OUT/build.log | head -5 ;;
    check)
      stamp check
      PYTHONPATH=/tmp/b/csrc/cuda timeout ${CHECK_S:-240} python3 csrc/cuda/dev/check_fwd.py ${CHECK_ARGS:-} --out ${CHECK_OUT:-$OUT} > $OUT/check.log 2>&1
      echo "check rc=$?"; grep -E "FAIL|Error|error" $OUT/check.log | head -25; tail -2 $OUT/check.log ;;
    bench)
      stamp bench
      PYTHONPATH=/tmp/b/csrc/cuda timeout ${BENCH_S:-300} python3 benchmarks/bench_grid.py --backend ffi --out $OUT/grid \
        ${PEERS_JSONL:+--peers-jsonl $PEERS_JSONL} ${BENCH_ARGS:-} > $OUT/bench.log 2>&1
      echo "bench rc=$?" ;;
    memcheck)
      stamp memcheck
      PYTHONPATH=/tmp/b/csrc/cuda XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout ${SAN_S:-150} $SAN --tool memcheck \
        --kernel-name kns=bsattn_fwd --print-limit 20 python3 csrc/cuda/dev/check_fwd.py --sanitize > ${SAN_OUT:-$OUT}/memcheck.log 2>&1
      echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|Invalid|sanitize case" ${SAN_OUT:-$OUT}/memcheck.log | head -12 ;;
    racecheck)
      stamp racecheck
      PYTHONPATH=/tmp/b/csrc/cuda XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout ${SAN_S:-150} $SAN --tool racecheck \
        --kernel-name kns=bsattn_fwd --print-limit 20 python3 csrc/cuda/dev/check_fwd.py --sanitize > ${SAN_OUT:-$OUT}/racecheck.log 2>&1
      echo "racecheck rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard|sanitize case" ${SAN_OUT:-$OUT}/racecheck.log | head -12 ;;
    tune)
      # needs build with EXTRA_CMAKE=-DBSATTN_FWD_TUNING=ON; times each BSATTN_FWD_TUNE variant on TUNE_CELLS
      stamp tune
      for v in ${TUNE_VARIANTS:-000 111 222}; do
        [ "$v" = 000 ] || BSATTN_FWD_TUNE=$v PYTHONPATH=/tmp/b/csrc/cuda timeout 60 python3 csrc/cuda/dev/check_fwd.py --quick \
          --out /tmp > /tmp/check_$v.log 2>&1; echo "variant $v quick check: $(tail -1 /tmp/check_$v.log)"
        BSATTN_FWD_TUNE=$v PYTHONPATH=/tmp/b/csrc/cuda timeout 120 python3 benchmarks/bench_grid.py --backend ffi --out /tmp/tune_$v \
          --no-causal --reps 5 --target-ms 40 --cells "$TUNE_CELLS" > /tmp/tune_$v.log 2>&1
        grep '^{' /tmp/tune_$v.log | python3 -c "import json,sys; print('$v', ' '.join(f\"g{r['g']}/{r['R']}/{r['C']}:{r['tflops']:.0f}\" for r in map(json.loads, sys.stdin)))" | tee -a ${TUNE_LOG:-$OUT/tune.log}
      done ;;
    ncu)
      # NCU_RUNS="name:variant:g:R:C ..."; one profiled launch of the forward kernel each
      stamp ncu
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      for run in $NCU_RUNS; do
        IFS=: read name v g R C <<< "$run"
        BSATTN_FWD_TUNE=$v PYTHONPATH=/tmp/b/csrc/cuda timeout 120 $NCU --clock-control none --target-processes all \
          --kernel-name regex:bsattn_fwd --launch-skip 1 --launch-count 1 --section SpeedOfLight --section Occupancy \
          --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
          --metrics l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sector_hit_rate.pct \
          python3 benchmarks/bench_grid.py --backend ffi --out /tmp/ncu_$name --no-causal --reps 1 --target-ms 1 \
          --cells $g:$R:$C > $OUT/ncu_$name.txt 2>&1
        echo "ncu $name rc=$?"; grep -E "Duration|Compute \(SM\) Throughput|Achieved Occupancy|Issued Ipc|No Eligible|Stall|bank_conflicts|wavefronts" $OUT/ncu_$name.txt | head -14
      done ;;
    peers)
      stamp peers
      PHASES="fi:fa2" TOTAL_S=${PEERS_S:-330} bash .peers/run_peers.sh > /tmp/peers.log 2>&1
      echo "peers rc=$?"; grep -c '"kind": "fi"' $OUT/anchors.jsonl; tail -3 /tmp/peers.log ;;
  esac
done
stamp done
[ -f $OUT/bench.log ] && sed -n '/useful TFLOP/,$p' $OUT/bench.log
