"""The cost of row-list entries whose block index is out of range, on one GPU.

Such entries take no part in the op, but the CUDA kernels pack a block row's listed entries into key tiles by
position (fwd/gather_kv.cuh), so an out-of-range entry is gathered as zero rows and computed masked. A ring step
(partitioning.py, ``context_parallel="ring"``) that kept the whole lists, other shards' blocks moved out of range,
would pay this at every step; the ring therefore cuts each step's lists (live_blocks.keep_blocks_below). This times
a random layout (a quarter of the block columns per row) against the same lists with every entry followed by an
out-of-range one (twice the entries, half of them dead), forward and gradient, median of ``--reps`` calls.

    python benchmarks/bench_list_entries_out_of_range.py [--reps 20]
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_bsattn as jb
from jax_bsattn import layouts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import median_time  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    M = N = 8192
    Hk, D = 8, 128
    print(f"{jax.devices()[0].device_kind}: M = N = {M}, Hk = {Hk}, D = {D}, bf16, a quarter of the block columns")
    for g, R, C in ((4, 16, 16), (1, 64, 64), (4, 16, 1)):
        lay = layouts.random((M, N), (R, C), max(1, (N // C) // 4), seed=1)
        ip, ix = np.asarray(lay.indptr), np.asarray(lay.indices)
        dead = np.stack([ix, ix + N // C + 7], -1).reshape(ix.shape[:-1] + (2 * ix.shape[-1],))
        q = jnp.asarray(rng.standard_normal((1, M, Hk * g, D)), jnp.bfloat16)
        k, v = (jnp.asarray(rng.standard_normal((1, N, Hk, D)), jnp.bfloat16) for _ in range(2))
        # (the layout's arrays as jit arguments: a concrete layout with out-of-range indices is refused at construction)
        make = lambda a, b: jb.BlockSparseLayout(a, b, (R, C), (M, N))
        fwd = jax.jit(lambda q, k, v, a, b: jb.block_sparse_attention(q, k, v, make(a, b)))
        grad = jax.jit(jax.grad(lambda q, k, v, a, b: jnp.sum(
            jb.block_sparse_attention(q, k, v, make(a, b)).astype(jnp.float32)), argnums=(0, 1, 2)))
        ms = []
        for a, b in ((ip, ix), (2 * ip, dead)):
            lists = (jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))
            ms.append([1e3 * median_time(f, q, k, v, *lists, reps=args.reps) for f in (fwd, grad)])
        print(f"{g}:{R}:{C}  forward {ms[0][0]:.3f} -> {ms[1][0]:.3f} ms ({ms[1][0] / ms[0][0]:.2f}x)  "
              f"gradient {ms[0][1]:.3f} -> {ms[1][1]:.3f} ms ({ms[1][1] / ms[0][1]:.2f}x)")


if __name__ == "__main__":
    main()
