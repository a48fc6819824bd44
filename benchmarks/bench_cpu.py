"""CPU kernel vs the dense jnp reference on the same CPU (the foundation's speed check).

    python benchmarks/bench_cpu.py [--reps 5]

Shape: M = N = 2048, Hq = 8, D = 64, density 0.25 (each block row holds the same number of random blocks),
float32. Prints median times of the jitted forward and forward+backward and the ratio reference / kernel. The
cells with R x g <= 4 are the ones where the kernels lay the keys across the vector lanes (AVX2, AVX-512; the generic
code up to R x g = 2), 8 x 16 the next size up (BSATTN_CPU_LANES=rows / keys in the environment times either way).
"""

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_bsattn as jb
from jax_bsattn.reference import block_sparse_attention_reference as reference


def median_time(fn, *args, reps):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def uniform_layout(rng, M, N, R, C, density):
    MB, NB = -(-M // R), -(-N // C)
    per_row = max(1, round(density * NB))
    cols = np.sort(np.argsort(rng.random((MB, NB)), axis=1)[:, :per_row], axis=1)
    indptr = np.arange(MB + 1, dtype=np.int32) * per_row
    return jb.BlockSparseLayout.from_csr(indptr, cols.reshape(-1).astype(np.int32), (R, C), (M, N))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    M = N = 2048
    Hq, D, density = 8, 64, 0.25
    rng = np.random.default_rng(0)
    rows = []
    print(f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
          f"BSATTN_CPU_LANES={os.environ.get('BSATTN_CPU_LANES', '(unset)')}")
    print(f"{'R x C':>8} {'g':>2} {'pass':>8} {'kernel ms':>10} {'ref ms':>9} {'ref/kernel':>10}")
    for (R, C), g in [((64, 64), 1), ((64, 64), 4), ((16, 16), 4), ((1, 64), 1), ((1, 16), 1), ((4, 16), 1),
                      ((8, 16), 1)]:
        Hk = Hq // g
        layout = uniform_layout(rng, M, N, R, C, density)
        q = jnp.asarray(rng.standard_normal((M, Hq, D)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((N, Hk, D)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((N, Hk, D)), jnp.float32)
        for name, make in (("fwd", lambda f: jax.jit(lambda q, k, v: f(q, k, v, layout))),
                           ("fwd+bwd", lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, layout) ** 2),
                                                                  argnums=(0, 1, 2))))):
            t_kernel = median_time(make(jb.block_sparse_attention), q, k, v, reps=args.reps)
            t_ref = median_time(make(reference), q, k, v, reps=args.reps)
            rows.append(dict(R=R, C=C, g=g, pass_=name, kernel_ms=t_kernel * 1e3, ref_ms=t_ref * 1e3,
                             ratio=t_ref / t_kernel))
            print(f"{R:>3} x {C:<3} {g:>2} {name:>8} {t_kernel * 1e3:>10.1f} {t_ref * 1e3:>9.1f} "
                  f"{t_ref / t_kernel:>9.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
