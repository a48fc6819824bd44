"""Session 49: are the live lists (live_blocks.py), built in both the forward's and the backward's CUDA lowering,
merged by XLA in a jitted training step? Counts the scatters and sorts of the compiled (optimized) HLO of the
forward alone and of jax.grad, with kv_lens and without. Run on a CUDA machine with the package on PYTHONPATH.
Session 50 (H200): merged, one list build a step (benchmarks/results/h200_s50_kv_lists_cse_probe.txt)."""
import re, sys, os

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "benchmarks"))
import jax_bsattn as jb  # noqa: E402
from bench_grid import random_bsr  # noqa: E402

B, N, D, Hq, Hk, R, C = 4, 4096, 128, 32, 4, 1, 128
ip, ix = random_bsr(-(-N // R), -(-N // C), 0.25)
q = jax.ShapeDtypeStruct((B, N, Hq, D), jnp.bfloat16)
k = jax.ShapeDtypeStruct((B, N, Hk, D), jnp.bfloat16)
lens = jax.ShapeDtypeStruct((B,), jnp.int32)
ips, ixs = jax.ShapeDtypeStruct(ip.shape, jnp.int32), jax.ShapeDtypeStruct(ix.shape, jnp.int32)


def attn(q, k, v, ip, ix, kv_lens):
    layout = jb.BlockSparseLayout.from_csr(ip, ix, block_size=(R, C), seq_lens=(N, N))
    return jb.block_sparse_attention(q, k, v, layout, kv_lens=kv_lens)


def step(q, k, v, ip, ix, kv_lens):
    return jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v, ip, ix, kv_lens).astype(jnp.float32)), (0, 1, 2))(q, k, v)


for name, f in (("forward", attn), ("grad", step)):
    for with_lens in (True, False):
        g = f if with_lens else (lambda q, k, v, ip, ix, kv_lens, f=f: f(q, k, v, ip, ix, None))
        hlo = jax.jit(g).lower(q, k, k, ips, ixs, lens).compile().as_text()
        counts = {op: len(re.findall(rf"= [^=]*? {op}\(", hlo)) for op in ("scatter", "sort", "custom-call", "fusion")}
        scat = sorted(set(re.findall(r"(s32\[[0-9,]*\])[^=]*? scatter\(", hlo)))
        print(name, "kv_lens" if with_lens else "none", counts, "scatter shapes", scat, flush=True)
