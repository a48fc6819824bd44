"""A padded batch's training step with per-sequence key lengths (``kv_lens``), forward + backward, on a CUDA GPU.

    python benchmarks/bench_kv_lens.py --out results.jsonl [--cells g:R:C,...] [--batch 4] [--seq 4096]

Work: B sequences of M = N = --seq, Hq = 32, D = --head-dim, bf16, the grid's random layout (bench_grid.random_bsr,
density 0.25, one layout for the batch), lengths --lens (fractions of N, less 7 so that most cut a block).
Per cell: the median time of jax.grad (dq, dk, dv) of the op without kv_lens (every key) and with it, each timed as
bench_grid.time_cell times a cell (chained calls, median over --reps). The useful TFLOP/s of the step with lengths
count 3.5 x the forward's work inside listed blocks below each length (causal off): 4 * R * D * Hq * (listed keys
below the length) per block row, summed over the batch.
"""
import argparse, json, os, sys, time

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_grid import HQ, random_bsr, time_cell  # noqa: E402


def useful_flops(indptr, indices, R, C, D, M, lens):
    """3.5 x 4 * R * D * Hq * keys for the listed keys below each length (the last block row's R clipped to M)."""
    MB = len(indptr) - 1
    rows = np.minimum(R, M - np.arange(MB) * R)
    total = 0.0
    for n in lens:
        keys = np.clip(n - indices.astype(np.int64) * C, 0, C)  # listed keys of each entry below the length
        cs = np.concatenate([[0], np.cumsum(keys)])
        per_row = cs[indptr[1:]] - cs[indptr[:-1]]
        total += float(np.sum(per_row * rows)) * 4 * D * HQ
    return 3.5 * total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="a .jsonl file the rows are appended to")
    ap.add_argument("--cells", default="4:64:64,4:16:16,4:16:1", help="g:R:C,...")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--lens", default="1,0.75,0.5,0.25", help="fractions of N (each less 7 keys, at least 1)")
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    # (each repetition's steps are unrolled in one jit: a long chain of forward + backward steps compiles slowly; the
    # old path's took over 115 s a cell at 1:128:128 and 8:1:16 with 60 ms, session 44)
    ap.add_argument("--target-ms", type=float, default=25.0)
    ap.add_argument("--tag", default="", help="a label stored in every row (e.g. the build timed)")
    args = ap.parse_args()
    import jax_bsattn as jb

    B, N, D = args.batch, args.seq, args.head_dim
    fr = [float(x) for x in args.lens.split(",")]
    lens = np.array([max(1, int(f * N) - 7) for f in (fr * B)[:B]], np.int32)
    rng = np.random.default_rng(0)
    dev = jax.devices("cuda")[0]
    print(jax.devices()[0].device_kind, "jax", jax.__version__, "lens", lens.tolist(), flush=True)
    for cell in args.cells.split(","):
        g, R, C = (int(x) for x in cell.split(":"))
        Hk = HQ // g
        MB, NB = -(-N // R), -(-N // C)
        indptr, indices = random_bsr(MB, NB, args.density)
        q, k, v = (jax.device_put(jnp.asarray(rng.standard_normal((B, N, h, D)) * 1.5, jnp.bfloat16), dev)
                   for h in (HQ, Hk, Hk))
        row = dict(tag=args.tag, device=jax.devices()[0].device_kind, date=time.strftime("%Y-%m-%d"), g=g, R=R, C=C,
                   B=B, seq=N, D=D, density=args.density, lens=lens.tolist())
        for name, kv_lens in (("full", None), ("lens", jnp.asarray(lens))):
            def build(R_, C_, M_, N_, calls, kv_lens=kv_lens):
                @jax.jit
                def f(q, k, v, ip, ix):
                    layout = jb.BlockSparseLayout.from_csr(ip, ix, block_size=(R_, C_), seq_lens=(M_, N_))

                    def loss(q, k, v):
                        return jnp.sum(jb.block_sparse_attention(q, k, v, layout, kv_lens=kv_lens)
                                       .astype(jnp.float32))

                    o = q
                    for _ in range(calls):  # chained, as bench_grid's --fwdbwd
                        dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(o, k, v)
                        o = (dq + dk[:, :1].mean() + dv[:, :1].mean()).astype(q.dtype)
                    return o
                return f

            ms, calls, spread = time_cell(build, R, C, N, N, indptr, indices, q, k, v, args.reps, args.target_ms)
            work = useful_flops(indptr, indices, R, C, D, N, lens if kv_lens is not None else [N] * B)
            row[f"{name}_ms"] = round(ms, 4)
            row[f"{name}_spread_ms"] = round(spread, 4)
            row[f"{name}_tflops"] = round(work / ms / 1e9, 1)
        row["lens_over_full"] = round(row["lens_ms"] / row["full_ms"], 4)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
