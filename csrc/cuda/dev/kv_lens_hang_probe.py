"""Forward calls, then gradient calls, each timed, with kv_lens at bench_kv_lens.py's scale: what reproduced session
45's hang of the persistent backward kernel (a race in its item hand-over, fixed in session 46: bwd_sm90/kernel_ws.cuh).

    PYTHONPATH=<installed package> python csrc/cuda/dev/kv_lens_hang_probe.py 1:128:128 [B] [N] [lens|full|L0,L1,..]

Run it under `timeout` (a hang never returns); faulthandler prints the Python stack after DUMP_S seconds (default 30).
REPS: calls of each (default 6). B = 4, N = 4096, Hq = 32, D = 128, bench_grid's random layout (density 1/4),
lengths N - 7, 3/4 N - 7, N / 2 - 7, N / 4 - 7 (`lens`), none (`full`), or the given ones, repeated over the batch.
With a build made with CUDAFLAGS=-DBSATTN_HANG_WATCH and XLA_FLAGS=--xla_gpu_enable_command_buffer= a hang of that
kernel prints where each warp waits (csrc/cuda/common/hang_watch.cuh).
"""
import faulthandler
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "benchmarks"))
from bench_grid import HQ, random_bsr  # noqa: E402

import jax_bsattn as jb  # noqa: E402


def main():
    faulthandler.dump_traceback_later(float(os.environ.get("DUMP_S", 30)), repeat=False)
    g, R, C = (int(x) for x in sys.argv[1].split(":"))
    B = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    N = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
    mode = sys.argv[4] if len(sys.argv) > 4 else "lens"
    D, Hk = 128, HQ // g
    rng = np.random.default_rng(0)
    indptr, indices = random_bsr(-(-N // R), -(-N // C), 0.25)
    q, k, v = (jnp.asarray(rng.standard_normal((B, N, h, D)) * 1.5, jnp.bfloat16) for h in (HQ, Hk, Hk))
    ip, ix = jnp.asarray(indptr), jnp.asarray(indices)
    lens = None
    if mode == "lens":
        lens = jnp.asarray([max(1, int(f * N) - 7) for f in ((1, .75, .5, .25) * B)[:B]], jnp.int32)
    elif mode != "full":  # a comma list of lengths, repeated over the batch
        given = [int(x) for x in mode.split(",")]
        lens = jnp.asarray([given[i % len(given)] for i in range(B)], jnp.int32)
    print("lengths", None if lens is None else lens.tolist(), flush=True)

    def attend(q, k, v, ip, ix):
        layout = jb.BlockSparseLayout.from_csr(ip, ix, block_size=(R, C), seq_lens=(N, N))
        return jb.block_sparse_attention(q, k, v, layout, kv_lens=lens)

    fwd = jax.jit(attend)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(attend(*a).astype(jnp.float32)), argnums=(0, 1, 2)))
    for name, f in (("forward", fwd), ("gradient", grad)):
        for i in range(int(os.environ.get("REPS", 6))):
            t = time.perf_counter()
            jax.block_until_ready(f(q, k, v, ip, ix))
            print(name, i, f"{1e3 * (time.perf_counter() - t):.2f} ms", flush=True)
    print("all done", flush=True)


if __name__ == "__main__":
    main()
