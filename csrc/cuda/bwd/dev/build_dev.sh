#!/bin/bash
# Development build of the backward alone: a shared library exporting `bsattn_bwd_cuda_dev` (dev/capi.cc), with the
# handler compiled with -DBSATTN_BWD_DEV (BSATTN_BWD_PARTS). No nanobind, no Python ABI: build it where nvcc is (here
# or on the device machine) and load it with check_bwd.py --lib.
#   bash csrc/cuda/bwd/dev/build_dev.sh [OUTDIR] [JOBS]      (ARCHS="90" by default; e.g. ARCHS="80 90")
set -e
ROOT=$(cd "$(dirname "$0")/../../../.." && pwd)
OUTDIR=${1:-$ROOT/.bwd_dev}
JOBS=${2:-2}
ARCHS=${ARCHS:-90}
mkdir -p "$OUTDIR/obj"
GEN=""
for a in $ARCHS; do GEN="$GEN -gencode=arch=compute_$a,code=sm_$a"; done
FFI_INC=$(python3 -c "import jax; print(jax.ffi.include_dir())")
T0=$(date +%s)
pids=()
for f in "$ROOT"/csrc/cuda/bwd/instantiations/*.cu "$ROOT"/csrc/cuda/bwd/dispatch.cu; do
  n=$(basename "$f" .cu)
  nvcc -c -std=c++17 -O3 --expt-relaxed-constexpr -DBSATTN_BWD_DEV -Xptxas -v $GEN -Xcompiler=-fPIC,-fvisibility=hidden \
    -I"$ROOT/csrc" "$f" -o "$OUTDIR/obj/$n.o" > "$OUTDIR/obj/$n.log" 2>&1 || { cat "$OUTDIR/obj/$n.log"; exit 1; } &
  pids+=($!)
  while [ $(jobs -r | wc -l) -ge "$JOBS" ]; do sleep 0.2; done
done
for p in "${pids[@]}"; do wait $p || exit 1; done
for s in ffi_bwd.cc dev/capi.cc; do
  g++ -std=c++17 -O2 -fPIC -fvisibility=hidden -DBSATTN_BWD_DEV -isystem "$FFI_INC" -I/usr/local/cuda/include \
    -I"$ROOT/csrc" -c "$ROOT/csrc/cuda/bwd/$s" -o "$OUTDIR/obj/$(basename $s .cc).o"
done
nvcc -shared $GEN -cudart static -o "$OUTDIR/libbsattn_bwd_dev.so" "$OUTDIR"/obj/*.o
echo "built $OUTDIR/libbsattn_bwd_dev.so in $(( $(date +%s) - T0 )) s"
cat "$OUTDIR"/obj/*.log | grep -E "spill|Used" | awk '/spill/{s=$5" "$9} /Used/{print $5, s}' | sort | uniq -c
