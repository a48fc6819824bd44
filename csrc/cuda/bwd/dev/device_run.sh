#!/bin/bash
# One device session for the CUDA backward (run from the repo root on the GPU machine, with .bwd_dev carried):
#   STAGES="check time" bash csrc/cuda/bwd/dev/device_run.sh
# check: correctness + determinism + robustness (check_bwd.py --no-time); time: the peers' grid (--no-check;
# TIME_ARGS="--parts-g 4 --tune 4:64:1:n" also times dq and dk/dv alone, and without column packing);
# memcheck: compute-sanitizer on the robustness / small cases. Uses the carried .bwd_dev/libbsattn_bwd_dev.so
# (dev/build_dev.sh, built off the device) and rebuilds it here if it does not load. Logs go to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
STAGES=${STAGES:-check time}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,driver_version --format=csv,noheader
LIB=${LIB:-.bwd_dev/libbsattn_bwd_dev.so}
if ! python3 -c "import ctypes; ctypes.CDLL('$LIB').bsattn_bwd_cuda_dev" 2>/dev/null; then
  stamp "carried library does not load: building"
  bash csrc/cuda/bwd/dev/build_dev.sh /tmp/bwd_dev 16 > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
  LIB=/tmp/bwd_dev/libbsattn_bwd_dev.so
fi
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for st in $STAGES; do
  case $st in
    check)
      stamp check
      timeout ${CHECK_S:-170} python3 csrc/cuda/bwd/check_bwd.py --lib $LIB --no-time --out $OUT ${CHECK_ARGS:---quick --budget-s 110} \
        > $OUT/check.log 2>&1
      echo "check rc=$?"; grep -E "^FAIL|Error|error|DIFFERENT|finished': False" $OUT/check.log | head -30
      grep -E "^CHECK|^total" $OUT/check.log ;;
    time)
      stamp time
      mkdir -p $OUT/t
      timeout ${TIME_S:-150} python3 csrc/cuda/bwd/check_bwd.py --lib $LIB --no-check --out $OUT/t ${TIME_ARGS:-} \
        > $OUT/time.log 2>&1
      echo "time rc=$?"; grep -E "Error|error" $OUT/time.log | head -5 ;;
    memcheck)
      stamp memcheck
      XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout ${SAN_S:-120} $SAN --tool memcheck --kernel-name kns=bsattn_bwd \
        --print-limit 20 python3 csrc/cuda/bwd/check_bwd.py --lib $LIB --sanitize > $OUT/memcheck.log 2>&1
      echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|Invalid|sanitize case|robustness" $OUT/memcheck.log | head -16 ;;
  esac
done
stamp done
[ -f $OUT/time.log ] && sed -n '/bwd timing/,$p' $OUT/time.log
