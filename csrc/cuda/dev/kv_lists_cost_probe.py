"""Session 50 (run in session 51, H100: 23.2 us a build at R = 1, C = 16, 3.6 at 128 x 128): the device time of
building the live row lists alone (live_blocks.drop_blocks_past_lengths) for bench_kv_lens.py's layouts (B = 4,
N = 4096, density 1/4), to attribute the 1-3 % that kv_lens costs a training step where nothing is dropped. K builds
with distinct lengths run in one jit (no CSE), timed as the median of chained calls; the per-build time is that over
K. Run on a CUDA machine with the package on PYTHONPATH."""
import os, sys, time

import numpy as np
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "benchmarks"))
from bench_grid import random_bsr  # noqa: E402
from jax_bsattn.live_blocks import drop_blocks_past_lengths  # noqa: E402

B, N, K = 4, 4096, 32
for R, C in ((1, 16), (128, 128)):
    ip, ix = random_bsr(-(-N // R), -(-N // C), 0.25)
    ip, ix = jnp.asarray(ip)[None, None], jnp.asarray(ix)[None, None]
    lens = jnp.asarray([N - 7] * B, jnp.int32)

    @jax.jit
    def builds(ip, ix, lens):
        acc = jnp.zeros((), jnp.int32)
        for i in range(K):  # distinct lengths: K separate builds (each result consumed)
            nip, nix = drop_blocks_past_lengths(ip, ix, lens - i, C, N)
            acc = acc + nip[..., -1].sum() + nix[..., 0].sum()
        return acc

    builds(ip, ix, lens).block_until_ready()
    times = []
    for _ in range(15):
        t = time.perf_counter()
        for _ in range(10):
            r = builds(ip, ix, lens)
        r.block_until_ready()
        times.append((time.perf_counter() - t) / 10)
    print(f"R={R} C={C} nnz={ix.shape[-1]} B={B}: {np.median(times) / K * 1e6:.1f} us a build "
          f"(median of 15, {K} builds a call)", flush=True)
