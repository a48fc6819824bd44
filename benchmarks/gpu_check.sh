#!/bin/bash
# On a CUDA machine, from the repo root: build + install the package (CPU and CUDA modules) into /tmp/site,
# run the GPU tests, run them again with the FFI calls captured in CUDA graphs (command buffers), and time
# cells of the forward grid through the public API.   OUT=dir CELLS="g:R:C,..." bash benchmarks/gpu_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
T0=$(date +%s); stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
stamp build
BSATTN_CUDA=FORCE BSATTN_CUDA_ARCHS=${ARCHS:-90} python3 -m pip install --no-build-isolation --no-deps --no-index \
  --target /tmp/site . > "$OUT/pip.log" 2>&1 || { tail -40 "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site
stamp "gpu tests"
(cd tests && python3 -m pytest -q -m gpu ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15)
stamp "gpu tests, command buffers"
(cd tests && XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1" \
  python3 -m pytest -q -m gpu -k "vmap or R16-C16" 2>&1 | tee "$OUT/pytest_cmdbuf.log" | tail -4)
if [ -n "${CELLS:-}" ]; then
  stamp "grid (public API)"
  (cd /tmp && python3 "$OLDPWD/benchmarks/bench_grid.py" --backend api --out "$OUT/grid" --cells "$CELLS" \
    ${BENCH_ARGS:-} > "$OUT/bench_api.log" 2>&1; echo "bench rc=$?"; sed -n '/useful TFLOP/,$p' "$OUT/bench_api.log" | head -40)
fi
stamp done
