"""Forward + backward of jax_bsattn on structured layouts, with an environment switch set two or more ways in one
process (each jitted function traced under its setting, the settings' timings interleaved).

    python benchmarks/bench_layouts.py --cells 8:64:64,4:128:128 --layouts causal,band16,uniform \
        --env BSATTN_BWD_COL_WALK --values 0,auto

Work: one sequence, M = N = --seq (8192), Hq = 32, D = --head-dim (128), bf16, g = Hq / Hk; ``jax.grad`` of the sum of
the output (dq, dk, dv), --calls steps per jitted call chained through q, median over --reps calls. Useful TFLOP/s =
3.5 x 4 x nnz x R x C x D x Hq / time. Layouts, at block level (MB x NB blocks):
- causal: block row i lists blocks 0..i;
- band16: block row i lists i - 15..i;
- longformer: band16 plus block columns 0 and 1;
- moba: block row i lists i - 1, i and 14 random earlier blocks;
- uniform: (MB + 1) // 2 random blocks in every block row (about the block-causal layout's nnz).
The value `auto` leaves the variable unset (the library's default).
"""
import argparse, os, statistics, time

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax
import jax.numpy as jnp

HQ = 32


def block_mask(kind, MB, NB, rng):
    m = np.zeros((MB, NB), bool)
    for r in range(MB):
        if kind == "causal":
            m[r, :r + 1] = True
        elif kind in ("band16", "longformer"):
            m[r, max(0, r - 15):r + 1] = True
            if kind == "longformer":
                m[r, :2] = True
        elif kind == "moba":
            m[r, max(0, r - 1):r + 1] = True
            if r >= 2:
                m[r, rng.choice(r - 1, min(14, r - 1), replace=False)] = True
        elif kind == "uniform":
            m[r, rng.choice(NB, (MB + 1) // 2, replace=False)] = True
        else:
            raise SystemExit(f"--layouts: unknown layout {kind!r}")
    return m


def main():
    import jax_bsattn as jb

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default="8:64:64", help="g:R:C,...")
    ap.add_argument("--layouts", default="causal,band16,longformer,moba,uniform")
    ap.add_argument("--env", default="BSATTN_BWD_COL_WALK", help="the environment variable compared")
    ap.add_argument("--values", default="0,auto", help="its settings (auto: unset)")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--deterministic", action="store_true", help="block_sparse_attention(..., deterministic=True)")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    M = N = a.seq
    D = a.head_dim
    key = jax.random.PRNGKey(0)
    print(f"forward + backward, M = N = {M}, Hq = {HQ}, D = {D}, bf16, deterministic={a.deterministic}, "
          f"{jax.devices()[0].device_kind}; "
          f"ms (useful TFLOP/s) per {a.env} setting", flush=True)
    for cell in a.cells.split(","):
        g, R, C = (int(x) for x in cell.split(":"))
        Hk = HQ // g
        MB, NB = -(-M // R), -(-N // C)
        q = jax.random.normal(key, (1, M, HQ, D), jnp.bfloat16)
        k = jax.random.normal(jax.random.fold_in(key, 1), (1, N, Hk, D), jnp.bfloat16)
        v = jax.random.normal(jax.random.fold_in(key, 2), (1, N, Hk, D), jnp.bfloat16)
        for kind in a.layouts.split(","):
            mask = block_mask(kind, MB, NB, np.random.default_rng(5))
            layout = jb.BlockSparseLayout.from_block_mask(mask, (R, C), (M, N))
            steps = {}
            for value in a.values.split(","):
                if value == "auto":
                    os.environ.pop(a.env, None)
                else:
                    os.environ[a.env] = value

                @jax.jit
                def step(q, k, v, layout):
                    for _ in range(a.calls):  # chained through q: strictly in order, no CSE
                        def loss(q, k, v):
                            o = jb.block_sparse_attention(q, k, v, layout, deterministic=a.deterministic)
                            return jnp.sum(o.astype(jnp.float32))
                        dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
                        q = q + dq * 0
                    return q, dk, dv

                jax.block_until_ready(step(q, k, v, layout))  # traced and compiled under this setting
                steps[value] = step
            times = {value: [] for value in steps}
            for _ in range(a.reps):
                for value, step in steps.items():
                    t0 = time.perf_counter()
                    jax.block_until_ready(step(q, k, v, layout))
                    times[value].append((time.perf_counter() - t0) * 1e3 / a.calls)
            flops = 3.5 * 4 * int(mask.sum()) * R * C * D * HQ
            cols = "  ".join(f"{value}: {statistics.median(t):.3f} ({flops / statistics.median(t) / 1e9:.1f})"
                             for value, t in times.items())
            print(f"{g}:{R}:{C} {kind:10s} nnz={int(mask.sum()):6d}  {cols}", flush=True)


if __name__ == "__main__":
    main()
