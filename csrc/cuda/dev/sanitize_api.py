"""Small forward + backward cases through the public op, for compute-sanitizer (memcheck / racecheck):

    XLA_PYTHON_CLIENT_ALLOCATOR=platform compute-sanitizer --tool memcheck --kernel-name kns=bsattn \
        python3 csrc/cuda/dev/sanitize_api.py

Valid layouts and garbage traced ones (indptr decreasing / past nnz / negative, indices out of range), with
C <= 8 (the packed dk/dv path) and larger blocks, causal and soft cap; layouts with global block columns ("global": a
band plus column 0 in head 0, columns 0 and NB / 2 in head 1), long enough that the column kernels split them
(bwd/column_split.cuh); and with global block rows ("global-rows": a band plus row 0 in head 0, rows 0 and MB / 2 in
head 1), R * g > 16, which the forward's row split cuts (fwd_sm90/row_split.cuh); and decode shapes (one block
row, 16K-32K keys: the few-row split), whose forward also runs alone with kv_lens (the kernels read the length and
never the keys past it). Every other case (odd index) differentiates with a length that cuts a block (kv_lens in the
backward's kernels: the keys past it never read). Prints one line per case.
Arguments (optional): run only the cases of these kinds (e.g. `global-rows`) or at these indices into CASES (e.g. `3
7`): under JAX the sanitizer's own process sometimes dies (segfault) partway, so one process per case loses least.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_bsattn as jb

CASES = [  # (R, C, g, D, M, N, garbage, causal, softcap)
    (1, 1, 4, 64, 40, 33, False, True, None),
    (3, 5, 2, 64, 50, 47, True, False, 10.0),
    (16, 16, 4, 128, 70, 90, True, True, None),
    (64, 4, 1, 128, 130, 70, True, False, None),
    (128, 64, 2, 256, 150, 200, False, True, 20.0),
    # C > 16, D <= 128: the Hopper one-pass backward on an H100 / H200 (C = 100: a partial 64-key tile)
    (64, 64, 4, 128, 150, 200, True, True, None),
    (16, 100, 2, 64, 90, 230, False, False, 10.0),
    # D = 128, C >= 128: its two-warpgroup tile (C = 200: the second tile holds 72 keys, the last column fewer)
    (32, 200, 2, 128, 100, 530, True, True, None),
    (16, 128, 4, 128, 70, 300, False, False, 10.0),
    # C > 16 with at least 8 block columns: the column split (global columns cut into pieces; garbage: maybe)
    (64, 64, 2, 128, 1024, 1024, "global", False, None),
    (32, 128, 4, 128, 1500, 1500, "global", True, None),
    (32, 192, 2, 64, 1100, 1700, "global", False, 10.0),
    (64, 64, 4, 128, 600, 1100, True, True, None),
    # 8 < C <= 16 at D = 128, C > 8 at D = 256: the pair's narrow wgmma dk / dv kernel, its long columns split too
    (16, 16, 4, 128, 2048, 2048, "global", False, None),
    (16, 40, 2, 256, 1100, 1300, "global", True, None),
    # R * g > 16 with at least 16 block rows: the forward's row split (global rows cut into pieces, f32 partials);
    # R * g = 17 and 18 put the partial planes off 16 bytes before they were padded
    (17, 16, 1, 128, 3000, 3000, "global-rows", False, None),
    (9, 24, 2, 64, 1500, 1500, "global-rows", True, 30.0),
    (16, 16, 4, 128, 2048, 2048, "global-rows", False, None),
    # N > 2 g M: the narrow kernel's column split area would exceed q's size, so the pair's dq split takes it alone
    (32, 16, 1, 128, 1024, 4096, "global-rows", False, None),
    # decode shapes (fewer than 16 block rows, many keys): the few-row split, its combine staging pieces in batches
    (1, 16, 4, 128, 1, 16384, False, False, None),
    (16, 8, 4, 128, 16, 32768, False, True, None),
    (16, 8, 4, 128, 16, 32768, True, False, None),
]


def main():
    rng = np.random.default_rng(0)
    kinds = sys.argv[1:]
    for i, (R, C, g, D, M, N, garbage, causal, softcap) in enumerate(CASES):
        if kinds and str(garbage) not in kinds and str(i) not in kinds:
            continue
        MB, NB = -(-M // R), -(-N // C)
        nnz = MB * NB
        if garbage == "global-rows":
            rows, cols = np.arange(MB)[:, None] * R, np.arange(NB)[None, :] * C
            band = ((rows - cols) < 2 * C) & (cols <= rows + R - 1)
            ids = np.arange(MB)[:, None]
            mask = np.stack([band | (ids == 0), band | (ids == 0) | (ids == MB // 2)])
            lay = jb.BlockSparseLayout.from_block_mask(mask, (R, C), (M, N))
            indptr, indices = np.asarray(lay.indptr), np.asarray(lay.indices)
        elif garbage == "global":
            rows, cols = np.arange(MB)[:, None] * R, np.arange(NB)[None, :] * C
            band = np.abs(rows - cols) < 2 * C
            mask = np.stack([band | (cols == 0), band | (cols == 0) | (cols == (NB // 2) * C)])
            lay = jb.BlockSparseLayout.from_block_mask(mask, (R, C), (M, N))
            indptr, indices = np.asarray(lay.indptr), np.asarray(lay.indices)
        elif garbage:
            indptr = rng.integers(-5, nnz + 5, size=(2, MB + 1)).astype(np.int32)
            indices = rng.integers(-3, NB + 3, size=(2, nnz)).astype(np.int32)
        else:
            lay = jb.BlockSparseLayout.from_block_mask(rng.random((2, MB, NB)) < 0.5, (R, C), (M, N), nnz=nnz)
            indptr, indices = np.asarray(lay.indptr), np.asarray(lay.indices)
        q = jnp.asarray(rng.standard_normal((M, 2 * g, D)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((N, 2, D)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((N, 2, D)), jnp.bfloat16)

        lens = N - N // 3 - 1 if i % 2 else None

        @jax.jit
        def run(q, k, v, ip, ix):
            layout = jb.BlockSparseLayout.from_csr(ip, ix, (R, C), (M, N))   # traced: never validated

            def loss(q, k, v):
                o = jb.block_sparse_attention(q, k, v, layout, causal=causal, logits_soft_cap=softcap, kv_lens=lens)
                return jnp.sum(o.astype(jnp.float32) ** 2)
            return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

        val, grads = run(q, k, v, indptr, indices)
        finite = bool(np.isfinite(float(val))) and all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in grads)
        if M <= 16:  # a decode shape: the forward alone with a length that cuts a block (kv_lens in the kernels)
            o = jax.jit(lambda q, k, v, ip, ix: jb.block_sparse_attention(
                q, k, v, jb.BlockSparseLayout.from_csr(ip, ix, (R, C), (M, N)), causal=causal,
                logits_soft_cap=softcap, kv_lens=N - 77))(q, k, v, indptr, indices)
            finite = finite and bool(jnp.isfinite(o.astype(jnp.float32)).all())
        print(f"case R={R} C={C} g={g} D={D} garbage={garbage} kv_lens={lens}: finite={finite}", flush=True)


if __name__ == "__main__":
    main()
