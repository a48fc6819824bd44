#!/bin/bash
# On a CUDA machine, from the repo root: build + install the package (CPU and CUDA modules) into /tmp/site,
# run the GPU tests (on Hopper the forward ones a second time with the mma.sync kernel), run some again with the
# FFI calls captured in CUDA graphs (command buffers), and time cells of the forward grid through the public API.
#   OUT=dir CELLS="g:R:C,..." bash benchmarks/gpu_check.sh
# Options (environment): SANITIZE=1 (compute-sanitizer through the public API), KERNEL_SANITIZE=1 (on the kernels
# alone), MEMORY="--seq 32768" (peak memory of a training step), CELLS / FWDBWD_CELLS (grids), TRAIN=1,
# MULTI=1 (several GPUs: tests/test_multi_gpu.py and train_lm data parallel vs one GPU; MULTI_ARGS),
# BWD_CHECK="--atomic --quick ..." (csrc/cuda/bwd/check_bwd.py on the installed module: float32-reference checks,
# determinism, garbage layouts, the backward timing grid; BWD_CHECK2 a second such run), PYTEST_ARGS (e.g. -k backward),
# FWD_MMA=0 / OLD_BWD=0 / CMDBUF=0 (skip the mma.sync forward re-run / the small-block backward tests re-run with
# the row-oriented pass off / the command-buffer tests), TESTS=0 (no GPU tests),
# SHARDS=5 (the GPU tests in five concurrent processes, each cut at SHARD_S seconds, default 530: with the build,
# under a 600 s call; ALL=1 adds the unmarked tests; the ids matching SLOW are dealt out first, so they spread),
# PEERS="flex" (the peers' phases run first in the same call, from .peers: see shared/peers/README.md; PEER_CELLS),
# EXTRA_PYTHONPATH (absolute folders added after /tmp/site, e.g. a carried copy of flatbuffers for test_export.py),
# DECODE=1 (benchmarks/bench_decode.py without and with kv_lens, and FlashInfer where .peers is carried; DECODE_ARGS).
set -o pipefail
SLOW=${SLOW:-"16-4096|training_scale|backward_sweep"}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# NVLink multicast stays off on the lent multi-GPU hosts (device KINDS.md): keep these set for every program
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
RESULTS=${OUT:-/tmp/gpu_check}; OUT=/tmp/gpu_check_work; mkdir -p "$RESULTS" "$OUT"   # all logs here; a few copied back
T0=$(date +%s); stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
stamp build
# SKIP_BUILD=1: keep the package a previous call installed on this (still warm) machine
[ "${SKIP_BUILD:-0}" = 1 ] && [ -d /tmp/site/jax_bsattn ] && echo "(kept /tmp/site)" || \
BSATTN_CUDA=FORCE BSATTN_CUDA_ARCHS=${ARCHS:-90} python3 -m pip install --no-build-isolation --no-deps --no-index \
  --target /tmp/site . > "$OUT/pip.log" 2>&1 || { tail -40 "$OUT/pip.log"; exit 1; }
# EXTRA_PYTHONPATH: packages the GPU machine lacks, carried in an ignored folder (flatbuffers, which jax's
# serialisation needs: without it tests/test_export.py skips)
export PYTHONPATH=/tmp/site${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}
run_ids() {  # log name, file of test ids (one per line, relative to tests/): one pytest process, cut at SHARD_S
  # (by SIGINT, so that pytest still prints its summary and the tracebacks of what failed before the cut)
  # (never with no ids: pytest would then run the whole suite)
  [ -s "$2" ] || { echo "$1: no test ids" > "$OUT/$1.log"; return; }
  (cd tests && timeout -s INT -k 15 ${SHARD_S:-530} python3 -c "import sys, pytest; sys.exit(pytest.main(['-v', '--tb=short', \
    '-p', 'no:cacheprovider'] + open('$2').read().splitlines()))" > "$OUT/$1.log" 2>&1; echo "$1 rc=$?" >> "$OUT/$1.log")
}
shard() {  # name, pytest -m expression, processes, extra pytest args: the matching ids round-robin, concurrently
  (cd tests && python3 -m pytest -q -m "$2" $4 --collect-only 2>/dev/null | grep "::" | sed 's#^tests/##') \
    > "$OUT/ids_$1_all.txt"
  # the slow cases first, so that the round robin spreads them over the processes (SLOW: a grep -E pattern of ids; the
  # kv_lens case at 16-4096 alone takes about 200 s)
  { grep -E "$SLOW" "$OUT/ids_$1_all.txt"; grep -vE "$SLOW" "$OUT/ids_$1_all.txt"; } > "$OUT/ids_$1.txt"
  echo "$(wc -l < "$OUT/ids_$1.txt") $1 test ids"
  for s in $(seq 0 $(($3 - 1))); do
    awk -v s=$s -v n=$3 'NR % n == s' "$OUT/ids_$1.txt" > "$OUT/ids_$1$s.txt"; run_ids pytest_$1$s "$OUT/ids_$1$s.txt" &
  done
}
if [ "${TESTS:-1}" = 1 ] && [ "${SHARDS:-1}" -gt 1 ]; then
  # the suite in SHARDS concurrent processes on the one GPU (the whole gpu-marked suite takes over ten minutes in one);
  # ALL=1: the unmarked tests too (the CPU path, on the CPU device: tests/conftest.py), in two more processes
  stamp "gpu tests in $SHARDS processes${ALL:+, the others in 2}"
  shard gpu gpu "$SHARDS" "${PYTEST_ARGS:-}"
  [ -n "${ALL:-}" ] && shard cpu "not gpu" 2 ""
  wait
  for f in "$OUT"/pytest_{gpu,cpu}[0-9]*.log; do
    [ -f "$f" ] || continue
    echo "$(basename "$f" .log): $(grep -c ' PASSED' "$f") passed, $(grep -c ' FAILED' "$f") failed, $(grep -c ' SKIPPED' \
      "$f") skipped; $(tail -1 "$f")"; grep -E "^FAILED|^ERROR" "$f" | head -5
  done
elif [ "${TESTS:-1}" = 1 ]; then
  stamp "gpu tests" && (cd tests && python3 -m pytest -q -m gpu ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15)
fi
if [ "${FWD_MMA:-1}" = 1 ] && [ "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)" = "9.0" ]; then
  # on Hopper the forward's 64- and 128-row tiles run the wgmma kernel: test the mma.sync kernel (what other GPUs
  # run) on them too (kv_lens: the forward's kernels take the lengths)
  stamp "gpu forward tests, mma.sync kernel (BSATTN_FWD_KERNEL=mma)"
  (cd tests && BSATTN_FWD_KERNEL=mma python3 -m pytest -q -m gpu -k "forward or kv_lens" 2>&1 | tee "$OUT/pytest_gpu_mma.log" | tail -3)
fi
if [ "${OLD_BWD:-1}" = 1 ] && [ "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)" = "9.0" ]; then
  # on Hopper the row-oriented backward takes C <= 16 with R * g >= 64 before the kernels these tests are named for
  # (compact, sweep, packed): run them again where it does not (read once per process: a process of their own)
  stamp "gpu backward tests, the row-oriented pass off (BSATTN_BWD_ROWS=0)"
  (cd tests && BSATTN_BWD_ROWS=0 python3 -m pytest -q -m gpu -k "compact_small_blocks or sweep_tall_row_groups or \
    sweep_duplicate_blocks or unlisted_keys_overflow or packed_small_blocks or kv_lens_backward" 2>&1 | tee "$OUT/pytest_gpu_rows0.log" | tail -3)
fi
if [ "${CMDBUF:-1}" = 1 ]; then
  stamp "gpu tests, command buffers"
  (cd tests && XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1" \
    python3 -m pytest -q -m gpu -k "vmap or R16-C16" 2>&1 | tee "$OUT/pytest_cmdbuf.log" | tail -4)
fi
n=0
for args in "${BWD_CHECK:-}" "${BWD_CHECK2:-}"; do
  [ -n "$args" ] || continue
  n=$((n + 1)); stamp "check_bwd.py $args"
  mkdir -p "$OUT/bwd$n"
  # the handler from the installed _bsattn_cuda module (no --lib)
  (PYTHONPATH=/tmp/site:/tmp/site/jax_bsattn timeout ${BWD_S:-300} python3 csrc/cuda/bwd/check_bwd.py $args \
    --out "$OUT/bwd$n" > "$OUT/check_bwd$n.log" 2>&1; echo "check_bwd rc=$?"; \
    grep -E "^FAIL|DIFFERENT|finished': False|^CHECK|^determinism" "$OUT/check_bwd$n.log" | head -20; \
    sed -n '/bwd timing/,$p' "$OUT/check_bwd$n.log")
done
if [ -n "${SANITIZE:-}" ]; then
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  # one process per case: under JAX the sanitizer's own process sometimes dies (segfault) partway through several
  NCASES=$(cd csrc/cuda/dev && python3 -c "import sanitize_api; print(len(sanitize_api.CASES))")
  for tool in memcheck racecheck; do
    stamp "compute-sanitizer $tool, $NCASES cases"
    for i in $(seq 0 $((NCASES - 1))); do
      (cd /tmp && XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout ${SAN_S:-60} $SAN --tool $tool --kernel-name kns=bsattn \
        --print-limit 20 python3 "$OLDPWD/csrc/cuda/dev/sanitize_api.py" $i > "$OUT/sanitize_${tool}_$i.log" 2>&1; \
        echo "$tool case $i rc=$?"; grep -E "^case|SUMMARY|Invalid|hazard" "$OUT/sanitize_${tool}_$i.log" | head -4)
    done
  done
fi
if [ -n "${KERNEL_SANITIZE:-}" ]; then
  # the launchers called directly, without JAX (csrc/cuda/dev/sanitize_kernels.cu): forward, dq, dk / dv, Hopper bwd
  stamp "compute-sanitizer on the kernels alone"
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  # (sm_90a: the forward's 64- and 128-row tiles and the backward where C > 16 run the wgmma kernels, as in the package
  # on an H100 / H200)
  I=csrc/cuda; nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -DBSATTN_WITH_SM90 \
    -t 8 -Icsrc $I/dev/sanitize_kernels.cu $I/fwd/instantiations/fwd_bf16_d{64,128,256}.cu \
    $I/fwd_sm90/instantiations/{fwd_sm90,sweep}_bf16_d{64,128}.cu $I/fwd_sm90/instantiations/fwd_ws_bf16_d128.cu \
    $I/fwd_sm90/instantiations/fwd_sm90_bf16_d256.cu \
    $I/bwd/instantiations/{dq,dkdv}_bf16_d{64,128,256}.cu \
    $I/bwd_sm90/instantiations/{bwd,dq}_sm90_bf16_d{64,128}.cu $I/bwd_sm90/instantiations/dkdv_sm90_bf16_d{128,256}.cu \
    $I/bwd_sm90/instantiations/dq_sm90_bf16_d256.cu \
    $I/bwd_sm90/instantiations/dkdv_ws_sm90_bf16_d128.cu $I/bwd_sm90/instantiations/rows_sm90_bf16_d{64,128}.cu \
    -o /tmp/sanitize_kernels > "$OUT/sanitize_kernels_build.log" 2>&1 || tail -20 "$OUT/sanitize_kernels_build.log"
  for tool in memcheck racecheck; do
    timeout ${SAN_S:-200} $SAN --tool $tool --print-limit 20 /tmp/sanitize_kernels > "$OUT/kernels_$tool.log" 2>&1
    echo "$tool rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|hazard|all cases" "$OUT/kernels_$tool.log" | head -8
  done
fi
if [ -n "${MEMORY:-}" ]; then
  stamp "peak memory of one training step"
  (cd /tmp && python3 "$OLDPWD/benchmarks/peak_memory.py" $MEMORY > "$OUT/peak_memory.log" 2>&1; echo "memory rc=$?"; \
    grep -v '^{' "$OUT/peak_memory.log" | tail -6)
fi
if [ -n "${DECODE:-}" ]; then
  # the decode benchmark (benchmarks/bench_decode.py): jax_bsattn without and with kv_lens, then FlashInfer's fa2 from
  # .peers' wheels where carried, in the same call; DECODE_ARGS: bench_decode's (default "--batch 1 --calls 50")
  stamp "decode benchmark"
  for label in plain kvlens; do
    (cd /tmp && timeout ${DECODE_S:-150} python3 "$OLDPWD/benchmarks/bench_decode.py" --out "$OUT/decode" --label $label \
      ${DECODE_ARGS:---batch 1 --calls 50} $([ $label = kvlens ] && echo --kv-lens) > "$OUT/decode_$label.log" 2>&1; \
      echo "decode $label rc=$?")
  done
  if [ -d .peers/wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/peers-site \
      .peers/wheels/*.whl > "$OUT/fi_install.log" 2>&1
    (PYTHONPATH=/tmp/peers-site FLASHINFER_CUDA_ARCH_LIST="9.0a" MAX_JOBS=16 FLASHINFER_WORKSPACE_BASE=/tmp/fiws \
      timeout ${DECODE_S:-150} python3 benchmarks/bench_decode.py --out "$OUT/decode" --peer fi > "$OUT/decode_fi.log" 2>&1; \
      echo "decode fi rc=$?")
  fi
  grep -h '^{' "$OUT"/decode_*.log > "$RESULTS/decode.jsonl"; cut -c1-170 "$RESULTS/decode.jsonl"
fi
PEERS_ARG=""
if [ -n "${PEERS:-}" ]; then
  # the peers in the same call (a copy of shared/peers carried as .peers): PEERS="flex" or "fi:fa2 fi:fa3 flex"
  stamp "peers: $PEERS"
  (PHASES="$PEERS" TOTAL_S=${PEERS_S:-300} CELLS=${PEER_CELLS:-} OUT="$OUT/peers" bash .peers/run_peers.sh \
    > "$OUT/peers.log" 2>&1; echo "peers rc=$?"; tail -4 "$OUT/peers.log")
  cp "$OUT/peers/anchors.jsonl" "$OUT/peers_anchors.jsonl" 2>/dev/null && PEERS_ARG="--peers-jsonl $OUT/peers_anchors.jsonl"
fi
if [ -n "${CELLS:-}" ]; then
  stamp "grid (public API)"
  (cd /tmp && python3 "$OLDPWD/benchmarks/bench_grid.py" --backend api --out "$OUT/grid" --cells "$CELLS" \
    $PEERS_ARG ${BENCH_ARGS:-} > "$OUT/bench_api.log" 2>&1; echo "bench rc=$?"; sed -n '/useful TFLOP/,$p' "$OUT/bench_api.log" | head -40)
fi
if [ -n "${FWDBWD_CELLS:-}" ]; then
  stamp "grid forward + backward (public API)"
  (cd /tmp && python3 "$OLDPWD/benchmarks/bench_grid.py" --backend api --fwdbwd --out "$OUT/grid_fb" \
    --cells "$FWDBWD_CELLS" --no-causal --reps 5 $PEERS_ARG > "$OUT/bench_fwdbwd.log" 2>&1; echo "bench rc=$?"; \
    sed -n '/useful TFLOP/,$p' "$OUT/bench_fwdbwd.log" | head -40)
fi
if [ -n "${MULTI:-}" ]; then
  # several GPUs: the sharding tests on real devices (also part of `-m gpu` above; again here with their output),
  # then one training configuration data-parallel over every GPU vs one GPU at the same per-GPU batch
  NG=$(python3 -c "import jax; print(len(jax.devices('cuda')))")
  stamp "multi-GPU: $NG GPUs"
  (cd tests && python3 -m pytest -q -rs test_multi_gpu.py 2>&1 | tee "$OUT/pytest_multi_gpu.log" | tail -8)
  for n in 1 $NG; do
    (cd /tmp && python3 "$OLDPWD/examples/train_lm.py" --devices $n ${MULTI_ARGS:---seq-len 4096 --batch 16 --steps 60} \
      --out "$OUT/multi_$n" > "$OUT/train_multi_$n.log" 2>&1; echo "devices $n rc=$?"; grep -E "^loss:|^throughput|^data parallel" "$OUT/train_multi_$n.log")
  done
  python3 - "$OUT" "$NG" > "$OUT/multi_summary.txt" <<'PY'
import json, sys
out, ng = sys.argv[1], int(sys.argv[2])
m = {n: json.load(open(f"{out}/multi_{n}/metrics.json")) for n in (1, ng)}
for n, r in m.items():
    print(f"{n} GPU(s): {r['tokens_per_s']:,.0f} tokens/s, final train loss {r['final_train_loss']:.4f}")
print(f"scaling {ng} GPUs / 1 GPU: {m[ng]['tokens_per_s'] / m[1]['tokens_per_s']:.2f}x "
      f"(ideal {ng}x; same per-GPU batch)")
PY
  cat "$OUT/multi_summary.txt"
fi
if [ -n "${TRAIN:-}" ]; then
  # the same small bf16 model on the GPU path and on the CPU path (loss curves should match), then the GPU
  # defaults with jax_bsattn and with jax.nn.dot_product_attention + a dense mask (tokens/s)
  small="--seq-len 512 --block 32 --window 128 --layers 2 --dim 256 --heads 4 --kv-heads 2 --batch 8 --lr 3e-3 --dtype bf16 --steps ${TRAIN_STEPS:-200}"
  for run in "gpu_small:$small" "cpu_small:$small" "gpu_sparse:--steps ${BIG_STEPS:-150}" "gpu_dense:--dense --steps ${BIG_STEPS:-150}"; do
    name=${run%%:*}; flags=${run#*:}
    stamp "train_lm $name"
    plat=""; [ "${name%%_*}" = cpu ] && plat=cpu
    (cd /tmp && env ${plat:+JAX_PLATFORMS=$plat} python3 "$OLDPWD/examples/train_lm.py" $flags --out "$OUT/$name" > "$OUT/train_$name.log" 2>&1; \
      echo "$name rc=$?"; grep -E "^loss:|^throughput" "$OUT/train_$name.log")
  done
  python3 - "$OUT" > "$OUT/train_summary.txt" <<'PY'
import json, sys, numpy as np
out = sys.argv[1]
runs = {}
for name in ("gpu_small", "cpu_small", "gpu_sparse", "gpu_dense"):
    try:
        runs[name] = json.load(open(f"{out}/{name}/metrics.json"))
    except OSError:
        print(name, "missing")
for name, m in runs.items():
    print(f"{name:10} backend {m['backend']:4} tokens/s {m['tokens_per_s']:12,.0f}  final train {m['final_train_loss']:.4f}  held-out {m['held_out_loss']:.4f}")
if "gpu_small" in runs and "cpu_small" in runs:
    a, b = (np.asarray(runs[n]["losses"]) for n in ("gpu_small", "cpu_small"))
    n = min(len(a), len(b)) // 20 * 20
    print("loss means per 20 steps, GPU:", np.round(a[:n].reshape(-1, 20).mean(1), 3).tolist())
    print("loss means per 20 steps, CPU:", np.round(b[:n].reshape(-1, 20).mean(1), 3).tolist())
    print("max |GPU - CPU| over per-step losses:", float(np.max(np.abs(a[:n] - b[:n]))))
PY
  cat "$OUT/train_summary.txt"
fi
for f in peers_anchors.jsonl check_bwd1.log check_bwd2.log pytest_gpu.log pytest_multi_gpu.log multi_summary.txt sanitize_memcheck.log sanitize_racecheck.log kernels_memcheck.log kernels_racecheck.log peak_memory.log bench_api.log bench_fwdbwd.log train_summary.txt grid/grid.json grid_fb/grid.json gpu_sparse/loss.png; do
  [ -f "$OUT/$f" ] && cp "$OUT/$f" "$RESULTS/$(echo $f | tr / _)"
done
stamp done
