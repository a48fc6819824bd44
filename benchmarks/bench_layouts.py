"""Forward + backward of jax_bsattn on structured layouts, with an environment switch set two or more ways in one
process (each jitted function traced under its setting, the settings' timings interleaved).

    python benchmarks/bench_layouts.py --cells 8:64:64,4:128:128 --layouts causal,band16,uniform \
        --env BSATTN_BWD_COL_WALK --values 0,auto

Work: one sequence, M = N = --seq (8192), Hq = 32, D = --head-dim (128), bf16, g = Hq / Hk; ``jax.grad`` of the sum of
the output (dq, dk, dv), --calls steps per jitted call chained through q, median over --reps calls. Useful TFLOP/s =
3.5 x 4 x (listed blocks) x R x C x D x Hq / time. Layouts, from ``jax_bsattn.layouts`` (at R = C, in blocks):
- causal: ``block_causal``, block row i lists blocks 0..i;
- band16: ``sliding_window`` of 15 C + 1 tokens, block row i lists i - 15..i;
- longformer: ``global_local``, that window plus the first 2 C tokens global (block columns 0 and 1);
- bigbird (not in the default list): ``union`` of ``global_local`` not causal (a window of 3 C + 1 tokens each way,
  the first 2 C tokens global: block rows and columns 0 and 1) and ``random`` (3 blocks a row);
- moba: ``from_topk`` of random scores, 16 blocks a row, causal, the diagonal block and the one before forced;
- uniform: ``random``, (MB + 1) // 2 blocks in every block row (about the block-causal layout's nnz).
The value `auto` leaves the variable unset (the library's default).
"""
import argparse, os, statistics, time

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax
import jax.numpy as jnp

HQ = 32


def build_layout(kind, M, R, C):
    from jax_bsattn import layouts

    lens, block = (M, M), (R, C)
    if kind == "causal":
        return layouts.block_causal(lens, block)
    if kind == "band16":
        return layouts.sliding_window(lens, block, 15 * C + 1)
    if kind == "longformer":
        return layouts.global_local(lens, block, 15 * C + 1, 2 * C, causal=True)
    if kind == "bigbird":  # not causal: window of 3 blocks each way, 2 global blocks (rows and columns), 3 random
        return layouts.union(layouts.global_local(lens, block, 3 * C + 1, 2 * C),
                             layouts.random(lens, block, 3, seed=5))
    MB, NB = -(-M // R), -(-M // C)
    if kind == "moba":
        scores = np.random.default_rng(5).random((MB, NB))
        rows = np.arange(MB)
        scores[rows, np.minimum(rows, NB - 1)] = np.inf                  # the current block and the one before
        scores[rows[1:], np.minimum(rows[1:] - 1, NB - 1)] = np.inf
        return layouts.from_topk(scores, min(16, NB), seq_lens=lens, block_size=block, causal=True)
    if kind == "uniform":
        return layouts.random(lens, block, (MB + 1) // 2, seed=5)
    raise SystemExit(f"--layouts: unknown layout {kind!r}")


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
        q = jax.random.normal(key, (1, M, HQ, D), jnp.bfloat16)
        k = jax.random.normal(jax.random.fold_in(key, 1), (1, N, Hk, D), jnp.bfloat16)
        v = jax.random.normal(jax.random.fold_in(key, 2), (1, N, Hk, D), jnp.bfloat16)
        for kind in a.layouts.split(","):
            layout = build_layout(kind, M, R, C)
            nnz = int(np.asarray(layout.indptr)[-1])
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
            flops = 3.5 * 4 * nnz * R * C * D * HQ
            cols = "  ".join(f"{value}: {statistics.median(t):.3f} ({flops / statistics.median(t) / 1e9:.1f})"
                             for value, t in times.items())
            print(f"{g}:{R}:{C} {kind:10s} nnz={nnz:6d}  {cols}", flush=True)


if __name__ == "__main__":
    main()
