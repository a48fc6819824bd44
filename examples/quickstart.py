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
# the CUDA kernels take bf16 / f16; the CPU path float32 too
dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
q = jnp.asarray(rng.standard_normal((B, M, Hq, D)), dtype)
k = jnp.asarray(rng.standard_normal((B, N, Hk, D)), dtype)
v = jnp.asarray(rng.standard_normal((B, N, Hk, D)), dtype)

attention = jax.jit(lambda q, k, v: jb.block_sparse_attention(q, k, v, layout, causal=True))
out = attention(q, k, v).block_until_ready()          # compile + first run
times = []
for _ in range(5):
    t0 = time.perf_counter()
    attention(q, k, v).block_until_ready()
    times.append(time.perf_counter() - t0)

# The float32 reference on the CPU (a GPU's float32 matmuls may use TF32). The kernel's error may be up to twice
# the reference's own error when it computes in the inputs' dtype (none in float32), plus 1e-4.
cpu = jax.devices("cpu")[0]
with jax.default_device(cpu):
    args = [jax.device_put(x, cpu) for x in (q, k, v)]
    ref = jb.reference.reference_in_dtype(*args, layout, causal=True)
    ref_lowp = jb.reference.reference_in_dtype(*args, layout, causal=True, compute_dtype=dtype)
rel = lambda x: float(jnp.linalg.norm(jnp.asarray(x, jnp.float32) - ref) / jnp.linalg.norm(ref))
err, budget = rel(np.asarray(out, np.float32)), 2 * rel(ref_lowp) + 1e-4
print(f"backend: {jax.default_backend()}  layout: {layout}  density {layout.density:.3f}")
print(f"q {q.shape} {q.dtype.name}, k/v {k.shape}, causal, {B * Hq} heads")
print(f"relative error vs float32 reference: {err:.2e} (budget {budget:.2e})")
print(f"median time: {np.median(times) * 1e3:.2f} ms")
assert err <= budget, "the kernel disagrees with the reference"
