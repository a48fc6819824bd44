"""Context parallelism: one training step of causal block-sparse attention with the sequence split over devices, in
the forms the op has: all-gather (the default), ring (``context_parallel="ring"``), zigzag order
(``zigzag_shards``) and both (the zigzag ring), beside the same step on one device.

    python benchmarks/bench_context_parallel.py [--devices 2] [--seq 32768] [--block 64] [--window 4096]
                                                [--hq 32] [--hk 8] [--dim 128] [--reps 20] [--out FILE.json]

The step: o = block_sparse_attention(q, k, v, layout, causal=True) and the VJP of a fixed cotangent, q, k, v
bf16 ``[1, S, H, D]`` split over the sequence on a 1-D mesh of ``--devices`` (q, k, v all split alike: k and v
arrive split, as a sequence-parallel model gives them). The layout: block-causal (every earlier block; the load
that contiguous shards balance worst) unless ``--window`` > 0 (a causal sliding window of that many keys plus the
first block as a global sink). Per form: the median time of ``--reps`` steps (after one to compile and one to warm
up), the useful TFLOP/s (4 x listed elements x D x Hq for the forward, x 3.5 for forward + backward, causal blocks
on the diagonal counted whole), the temporary bytes per device of the compiled step (XLA's memory_analysis), and
the listed blocks of the busiest device's rows over the mean (1.0: balanced). On CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``) it runs as a smoke test: the times are not the GPU's.
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jax_bsattn import block_sparse_attention, layouts
from jax_bsattn.zigzag import to_zigzag, zigzag_chunks


def _layout(args):
    S, R = args.seq, args.block
    if args.window <= 0:
        return layouts.block_causal(S, R)
    return layouts.union(layouts.sliding_window(S, R, args.window),
                         layouts.global_local(S, R, 0, global_tokens=R, causal=True))


def _busiest_over_mean(counts: np.ndarray, devices: int, zigzag: bool) -> float:
    """Listed blocks of each device's block rows (contiguous shards, or the zigzag order's two chunks), busiest over
    the mean."""
    if zigzag:
        chunks = counts.reshape(2 * devices, -1).sum(1)[zigzag_chunks(devices)]
        per_device = chunks.reshape(devices, 2).sum(1)
    else:
        per_device = counts.reshape(devices, -1).sum(1)
    return float(per_device.max() / per_device.mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--window", type=int, default=0, help="0: block-causal; else a sliding window of this many keys")
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hk", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    devices = jax.devices()[:args.devices]
    if len(devices) < args.devices or args.seq % (2 * args.devices * args.block):
        raise SystemExit(f"needs {args.devices} devices (found {len(jax.devices())}) and --seq a multiple of "
                         f"2 x devices x block = {2 * args.devices * args.block}")
    S, D = args.seq, args.dim
    layout = _layout(args)
    counts = np.diff(np.asarray(layout.indptr).reshape(-1))      # listed blocks per block row
    flops = 4 * int(counts.sum()) * args.block * args.block * D * args.hq * 3.5
    rng = np.random.default_rng(0)
    draw = lambda h: jnp.asarray(rng.standard_normal((1, S, h, D)), jnp.bfloat16)
    q, k, v, ct = draw(args.hq), draw(args.hk), draw(args.hk), draw(args.hq)
    mesh = jax.make_mesh((args.devices,), ("seq",), axis_types=(AxisType.Auto,), devices=devices)
    split = NamedSharding(mesh, P(None, "seq"))
    print(f"{jax.devices()[0].device_kind} x {args.devices}: S = {S}, block {args.block}, "
          f"{'block-causal' if args.window <= 0 else f'window {args.window} + sink'}, Hq {args.hq}, Hk {args.hk}, "
          f"D {D}, density {layout.density:.3f}")
    rows = []
    forms = [("one device", {}, False, devices[:1]), ("all_gather", {}, False, None),
             ("ring", dict(context_parallel="ring"), False, None),
             ("zigzag", dict(zigzag_shards=args.devices), True, None),
             ("zigzag ring", dict(zigzag_shards=args.devices, context_parallel="ring"), True, None)]
    for name, kw, zigzag, single in forms:
        def step(q, k, v, ct, kw=kw):
            o, pull = jax.vjp(lambda q, k, v: block_sparse_attention(q, k, v, layout, causal=True, **kw), q, k, v)
            return o, pull(ct)

        order = (lambda x: to_zigzag(x, args.devices)) if zigzag else (lambda x: x)
        place = (lambda x: jax.device_put(x, single[0])) if single else (lambda x: jax.device_put(x, split))
        operands = [place(order(x)) for x in (q, k, v, ct)]
        compiled = jax.jit(step).lower(*operands).compile()
        temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
        jax.block_until_ready(compiled(*operands))                  # warm-up
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*operands))
            times.append(time.perf_counter() - t0)
        ms = 1e3 * statistics.median(times)
        balance = 1.0 if single else _busiest_over_mean(counts, args.devices, zigzag)
        row = dict(form=name, ms=ms, tflops=flops / ms / 1e9, temp_mib=None if temp is None else temp / 2 ** 20,
                   busiest_over_mean=balance)
        rows.append(row)
        print(f"{name:>11}: {ms:9.3f} ms  {row['tflops']:7.1f} TFLOP/s (all devices)  temp "
              f"{'?' if temp is None else f'{temp / 2 ** 20:.1f}'} MiB/device  busiest/mean rows {balance:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), device=jax.devices()[0].device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
