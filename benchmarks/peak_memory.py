"""Peak device memory of one training step (forward + backward) of block-sparse attention at a long sequence.

    python benchmarks/peak_memory.py [--seq 32768] [--blocks 64x64,16x16] [--hq 32] [--hk 8] [--dim 128]
                                     [--deterministic]

One jitted step: o = block_sparse_attention(q, k, v, layout), then dq, dk, dv = vjp(do). Inputs are bf16
[1, M, H, D]; the layout is random with the same number of blocks in every block row (density --density).
Reports the device's peak bytes in use during the step beyond what was live before it (the inputs: q, k, v,
do and the layout), next to the dense formulas: an M x N boolean mask, and the Hq x M x N bf16 scores that
materialising attention would hold. Needs a GPU (or runs on the CPU when it reports memory stats).
"""
import argparse
import json

import jax
import jax.numpy as jnp

from jax_bsattn import block_sparse_attention, layouts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--blocks", default="16x16,64x64")
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hk", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--deterministic", action="store_true", help="the op's deterministic=True (its own workspaces)")
    a = ap.parse_args()
    dev = jax.devices()[0]
    M = N = a.seq
    key = jax.random.PRNGKey(0)
    kq, kk, kv, kd = jax.random.split(key, 4)
    q = jax.random.normal(kq, (1, M, a.hq, a.dim), jnp.bfloat16)
    k = jax.random.normal(kk, (1, N, a.hk, a.dim), jnp.bfloat16)
    v = jax.random.normal(kv, (1, N, a.hk, a.dim), jnp.bfloat16)
    do = jax.random.normal(kd, (1, M, a.hq, a.dim), jnp.bfloat16)
    io_bytes = 2 * (q.size + k.size + v.size)  # one copy of q, k, v (the gradients have their shapes)
    for blk in a.blocks.split(","):
        R, C = (int(x) for x in blk.split("x"))
        per_row = max(1, round(a.density * -(-N // C)))   # the same number of blocks in every block row
        layout = jax.device_put(layouts.random((M, N), (R, C), per_row))

        @jax.jit
        def step(q, k, v, do, layout):
            attend = lambda q, k, v: block_sparse_attention(q, k, v, layout, deterministic=a.deterministic)
            o, pull = jax.vjp(attend, q, k, v)
            return o, pull(do)

        compiled = step.lower(q, k, v, do, layout).compile()
        jax.block_until_ready((q, k, v, do, layout))
        before = dev.memory_stats() or {}
        out = compiled(q, k, v, do, layout)
        jax.block_until_ready(out)
        after = dev.memory_stats() or {}
        peak = after.get("peak_bytes_in_use", 0)
        # the allocator's peak is process-wide and cannot be reset: a step that stays under an earlier case's peak
        # cannot be read off it (run that case alone: --blocks RxC)
        step_bytes = peak - before.get("bytes_in_use", 0) if peak > before.get("peak_bytes_in_use", 0) else None
        analysis = compiled.memory_analysis()
        xla_temp = analysis.temp_size_in_bytes if analysis else None
        row = {"device": str(dev.device_kind), "seq": M, "R": R, "C": C, "hq": a.hq, "hk": a.hk, "dim": a.dim,
               "density": a.density, "deterministic": a.deterministic, "peak_step_bytes": step_bytes,
               "outputs_bytes": io_bytes + 2 * q.size,  # o, dq, dk, dv
               "xla_temp_bytes": xla_temp, "dense_mask_bytes": M * N, "dense_scores_bytes": 2 * a.hq * M * N,
               "lse_delta_bytes": 2 * 4 * M * a.hq}
        print(json.dumps(row))
        gib = 2.0 ** 30
        peak_txt = (f"peaks at {step_bytes / gib:.2f} GiB" if step_bytes is not None else
                    "stays under an earlier case's peak (not measurable here: run it alone)")
        print(f"{'deterministic: ' if a.deterministic else ''}M = N = {M}, {R}x{C}, Hq={a.hq} Hk={a.hk} D={a.dim}: "
              f"one step {peak_txt} "
              f"beyond its inputs (outputs o, dq, dk, dv: {row['outputs_bytes'] / gib:.2f} GiB; XLA temporaries "
              f"{(xla_temp or 0) / gib:.3f} GiB); dense: M x N mask {M * N / gib:.2f} GiB, Hq x M x N bf16 scores "
              f"{row['dense_scores_bytes'] / gib:.1f} GiB", flush=True)
        del out


if __name__ == "__main__":
    main()
