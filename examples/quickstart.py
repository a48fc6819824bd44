"""Quickstart: a random block-sparse layout, the attention, its error against the reference, and the time."""

import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_bsattn as jb

B, M, N, Hq, Hk, D = 2, 1024, 1024, 8, 2, 64
R, C, density = 64, 64, 0.25

rng = np.random.default_rng(0)
block_mask = rng.random((M // R, N // C)) < density
layout = jb.BlockSparseLayout.from_block_mask(block_mask, block_size=(R, C), seq_lens=(M, N))
q = jnp.asarray(rng.standard_normal((B, M, Hq, D)), jnp.float32)
k = jnp.asarray(rng.standard_normal((B, N, Hk, D)), jnp.float32)
v = jnp.asarray(rng.standard_normal((B, N, Hk, D)), jnp.float32)

attention = jax.jit(lambda q, k, v: jb.block_sparse_attention(q, k, v, layout, causal=True))
out = attention(q, k, v).block_until_ready()          # compile + first run
times = []
for _ in range(5):
    t0 = time.perf_counter()
    attention(q, k, v).block_until_ready()
    times.append(time.perf_counter() - t0)

ref = jb.reference.block_sparse_attention_reference(q, k, v, layout, causal=True)
err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
print(f"backend: {jax.default_backend()}  layout: {layout}  density {layout.density:.3f}")
print(f"q {q.shape}, k/v {k.shape}, causal, {B * Hq} heads")
print(f"relative error vs float32 reference: {err:.2e}")
print(f"median time: {np.median(times) * 1e3:.2f} ms")
assert err < 1e-4, "the kernel disagrees with the reference"
