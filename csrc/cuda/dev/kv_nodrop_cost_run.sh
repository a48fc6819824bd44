#!/bin/bash
# Session 50 (run in session 51, H100: BENCHMARKS "Session 51"): where does kv_lens' 1-3 % go where nothing is
# dropped (lengths N - 7)? The list build alone (kv_lists_cost_probe.py), then interleaved rounds of the step with the
# live lists (main) and with the masked path (BSATTN_KV_LIVE_LISTS=0: the layout as given, the kernels' length checks
# alone), each against the step without kv_lens.
source csrc/cuda/dev/kv_lens_device.sh
kv_build
timeout -s KILL 120 python3 csrc/cuda/dev/kv_lists_cost_probe.py > $OUT/lists_cost.log 2>&1; stamp "lists probe rc=$?"
tail -3 $OUT/lists_cost.log
for r in $(seq 1 ${ROUNDS:-3}); do kv_nodrop kvfull$r live masked; done
