"""Sharding under jax.jit with NamedSharding on 8 CPU devices: batch, heads (Hq with Hk), both, per-head and
per-batch layouts, forward and gradients equal to the unsharded op, no all-gather in the compiled HLO; q's rows
split into whole block rows stay split (context parallelism: no gather of q, o, lse; k, v gathered where split);
a head-dim axis or a sequence axis that does not cut whole block rows is all-gathered (the documented behaviour)
and the result stays right. Also jax_bsattn.export of the shard_map form.

jax fixes its device count at first import, so the checks run in one subprocess started with
``--xla_force_host_platform_device_count=8`` (this file is also that subprocess's script); each test reads
its case from the subprocess's report. Also: the op inside ``jax.shard_map`` (the manual alternative), with q, k, v
split alike, with k, v replicated beside a split q, and with a layout that differs per device.
"""

import contextlib
import json
import os
import re
import subprocess
import sys

import pytest

# name: (mesh shape over axes ("x", "y"), q spec, k/v spec, KV heads, layout batch shape, explicit axes)
CASES = {
    "batch": ((8, 1), ("x",), ("x",), 4, (), False),
    "heads": ((1, 8), (None, None, "y"), (None, None, "y"), 8, (8,), False),
    "batch_and_heads_per_head_layout": ((2, 4), ("x", None, "y"), ("x", None, "y"), 4, (4,), False),
    "batch_and_heads_per_batch_layout": ((4, 2), ("x", None, "y"), ("x", None, "y"), 2, (8, 1), False),
    "batch_and_heads_full_layout": ((2, 4), ("x", None, "y"), ("x", None, "y"), 4, (8, 4), False),
    "explicit_axes": ((2, 4), ("x", None, "y"), ("x", None, "y"), 4, (4,), True),
    "q_heads_only": ((2, 4), ("x", None, "y"), ("x",), 4, (4,), False),        # k, v sliced, not gathered
    "seq_q": ((2, 4), (None, "y"), (None,), 4, (), False),
    "seq_kv": ((2, 4), ("x",), ("x", "y"), 4, (4,), False),
    "head_dim": ((2, 4), (None, None, None, "y"), (None, None, None, "y"), 4, (), False),
    "mqa_heads": ((2, 4), ("x", None, "y"), ("x",), 1, (), False),
    # q's heads over an axis that does not divide Hk = 2 (GQA tensor parallel): compiling the gradient crashed
    # (Shardy split the axis between the KV heads and the groups; custom_partitioning cannot take a sub-axis)
    "gqa_heads_past_hk": ((2, 4), (None, None, "y"), (None,), 2, (), False),
    # q's rows over an axis that cuts them into whole block rows (48 rows, 8-row blocks: over "x" = 2): they stay
    # split (context parallelism), k, v all-gathered if split, dk and dv summed over the row shards
    "seq_q_rows": ((2, 4), (None, "x"), (None,), 4, (), False),
    "seq_q_rows_and_heads": ((2, 4), (None, "x", "y"), (None, None, "y"), 4, (4,), False),
    "seq_qkv_rows_per_batch_layout": ((2, 4), ("y", "x"), ("y", "x"), 4, (8, 1), False),
    "seq_q_rows_explicit": ((2, 4), (None, "x", "y"), (None, None, "y"), 4, (4,), True),
}
NO_GATHER = ["batch", "heads", "batch_and_heads_per_head_layout", "batch_and_heads_per_batch_layout",
             "batch_and_heads_full_layout", "explicit_axes", "q_heads_only"]
GATHERED = ["seq_q", "seq_kv", "head_dim", "mqa_heads", "gqa_heads_past_hk"]   # documented: all-gathered first
ROWS_LOCAL = ["seq_q_rows", "seq_q_rows_and_heads", "seq_qkv_rows_per_batch_layout", "seq_q_rows_explicit"]


def worker():
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import jax_bsattn as jb
    from jax_bsattn import layouts

    assert len(jax.devices()) == 8, jax.devices()
    B, M, N, Hq, D = 8, 48, 64, 8, 16
    rng = np.random.default_rng(0)
    report = {}
    rel = lambda got, want: [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, want)]
    # (where the reference is finite: lse is -inf on rows that see nothing)
    rel_finite = lambda got, want: [float(jnp.max(jnp.abs(jnp.where(jnp.isfinite(b), a - b, 0))) / (jnp.max(jnp.abs(
        jnp.where(jnp.isfinite(b), b, 0))) + 1e-30)) for a, b in zip(got, want)]
    compiled = lambda args, *fns: "".join(jax.jit(f).lower(*args).compile().as_text() for f in fns)  # their HLO
    kernel_calls = lambda hlo: hlo.count("bsattn_fwd_") + hlo.count("bsattn_bwd_")
    # all-gathers whose result has q's M rows (q, o, do, lse, delta: [*, M, *]), not k's or v's N
    row_gathers = lambda hlo: len(re.findall(rf"= \w+\[\d+,{M},[^=]*all-gather\(", hlo))
    sharder = lambda mesh: (lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec))))
    for name, (mesh_shape, qspec, kspec, Hk, lead, explicit) in CASES.items():
        q = jnp.asarray(rng.standard_normal((B, M, Hq, D)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal((B, N, Hk, D)), jnp.float32) for _ in range(2))
        lay = layouts.union(layouts.sliding_window((M, N), 8, 24), layouts.random((M, N), 8, 2, batch_shape=lead))
        kind = AxisType.Explicit if explicit else AxisType.Auto
        mesh = jax.make_mesh(mesh_shape, ("x", "y"), axis_types=(kind, kind))
        qs = jax.device_put(q, NamedSharding(mesh, P(*qspec)))
        ks, vs = (jax.device_put(x, NamedSharding(mesh, P(*kspec))) for x in (k, v))

        def fwd(q, k, v, lay):
            return jb.block_sparse_attention(q, k, v, lay, causal=True, return_lse=True)

        grad = jax.grad(lambda q, k, v, lay: jnp.sum(jnp.sin(fwd(q, k, v, lay)[0])), argnums=(0, 1, 2))
        with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():   # explicit axes: mesh in context
            f, g = jax.jit(fwd), jax.jit(grad)
            got = f(qs, ks, vs, lay) + g(qs, ks, vs, lay)
            hlo = compiled((qs, ks, vs, lay), f, g)
            specs = [[list(e) if isinstance(e, tuple) else e for e in x.sharding.spec] for x in got]
        want = jax.jit(fwd)(q, k, v, lay) + jax.jit(grad)(q, k, v, lay)                 # unsharded
        errs = [float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)) for a, b in zip(got, want)]
        report[name] = dict(errs=errs, all_gathers=hlo.count("all-gather"), specs=specs,
                            kernel_calls=kernel_calls(hlo), row_gathers=row_gathers(hlo),
                            all_reduces=hlo.count(" all-reduce("), reduce_scatters=hlo.count(" reduce-scatter("))
    # Per-sequence key lengths (kv_lens) split over the batch axis beside q, k, v split over batch and heads, with
    # automatic and explicit mesh axes: the forward is one kernel call taking the lengths; its gradients go through
    # the layout cut per batch element and the cut column's XLA part, which shard like the rest.
    q = jnp.asarray(rng.standard_normal((B, M, Hq, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, N, 4, D)), jnp.float32) for _ in range(2))
    lens = jnp.asarray(rng.integers(0, N + 1, size=B), jnp.int32)
    offsets = lens - M + jnp.asarray(rng.integers(-3, 4, size=B), jnp.int32)  # (chunks ending near each length)
    lay = layouts.union(layouts.sliding_window((M, N), 8, 24), layouts.random((M, N), 8, 2, batch_shape=(4,)))
    # (and, as q_offset cases, per-sequence causal offsets beside the lengths: both per-sequence operands sharded)
    # (q_offset_rows: q's rows split over "x", the heads over "y", the per-sequence operands replicated)
    for name, kind, with_offsets in (("kv_lens", AxisType.Auto, False), ("kv_lens_explicit", AxisType.Explicit, False),
                                     ("q_offset", AxisType.Auto, True), ("q_offset_explicit", AxisType.Explicit, True),
                                     ("q_offset_rows", AxisType.Auto, True)):
        fwd = lambda q, k, v, n, o, w=with_offsets: jb.block_sparse_attention(
            q, k, v, lay, causal=True, return_lse=True, kv_lens=n, q_offset=o if w else None)
        grad = jax.grad(lambda q, k, v, n, o: jnp.sum(jnp.sin(fwd(q, k, v, n, o)[0])), argnums=(0, 1, 2))
        want = jax.jit(fwd)(q, k, v, lens, offsets) + jax.jit(grad)(q, k, v, lens, offsets)
        mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(kind, kind))
        shard = sharder(mesh)
        if name.endswith("rows"):
            args = (shard(q, None, "x", "y"), shard(k, None, None, "y"), shard(v, None, None, "y"), lens, offsets)
        else:
            args = (shard(q, "x", None, "y"), shard(k, "x", None, "y"), shard(v, "x", None, "y"), shard(lens, "x"),
                    shard(offsets, "x"))
        with jax.set_mesh(mesh) if kind == AxisType.Explicit else contextlib.nullcontext():
            got = jax.jit(fwd)(*args) + jax.jit(grad)(*args)
            hlo = compiled(args, fwd, grad)
        errs = rel_finite(got, want)
        report[name] = dict(errs=errs, all_gathers=hlo.count("all-gather"), kernel_calls=kernel_calls(hlo),
                            row_gathers=row_gathers(hlo))
    # Tensor parallel as a model writes it: q, k, v projected by weights whose feature axis is over "y" (4 devices),
    # reshaped to heads; o merged and projected back by a weight over "y" (row parallel). With Hk = 2 the reshape
    # gives k's heads and head dim each half of "y" (a sub-axis), which jax's custom_partitioning could not take
    # (IndivisibleError before the partition callback); with Hk = 4 the heads stay whole on each device.
    E = 32
    for Hk in (2, 4):
        xq, xkv = (jnp.asarray(rng.standard_normal((B, n, E)), jnp.float32) for n in (M, N))
        ws = [jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), jnp.float32)
              for s in ((E, Hq * D), (E, Hk * D), (E, Hk * D), (Hq * D, E))]
        lay = layouts.union(layouts.sliding_window((M, N), 8, 24), layouts.random((M, N), 8, 2))

        def model(xq, xkv, wq, wk, wv, wo, Hk=Hk):
            heads = lambda x, w, h: (x @ w).reshape(*x.shape[:2], h, D)
            o = jb.block_sparse_attention(heads(xq, wq, Hq), heads(xkv, wk, Hk), heads(xkv, wv, Hk), lay, causal=True)
            return o.reshape(B, M, Hq * D) @ wo

        grad = jax.grad(lambda *a: jnp.sum(jnp.sin(model(*a))), argnums=(2, 3, 4, 5))
        want = (jax.jit(model)(xq, xkv, *ws),) + jax.jit(grad)(xq, xkv, *ws)
        mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
        shard = sharder(mesh)
        args = (shard(xq, "x"), shard(xkv, "x"), *(shard(w, None, "y") for w in ws[:3]), shard(ws[3], "y", None))
        got = (jax.jit(model)(*args),) + jax.jit(grad)(*args)
        hlo = compiled(args, model, grad)
        report[f"projected_heads_hk{Hk}"] = dict(errs=rel(got, want), all_gathers=hlo.count("all-gather"),
                                                 kernel_calls=kernel_calls(hlo))
    # Ring attention (context_parallel="ring"): q, k, v split over the sequence on "y" (4 devices, whole block rows and
    # columns), the batch over "x"; k, v pass round "y" instead of being all-gathered. With N = 96 and 16-key blocks a
    # shard of 24 keys cuts a block: k, v are all-gathered as with "all_gather" (documented), and the result is right.
    Mr = 64
    for name, (N_r, C_r, kw_r) in {"ring_causal": (64, 8, dict(causal=True)), "ring_not_causal": (64, 8, {}),
                                   "ring_lens_offsets": (64, 8, "per_sequence"),
                                   "ring_cut_blocks": (96, 16, dict(causal=True)),
                                   "ring_explicit": (64, 8, dict(causal=True))}.items():
        q = jnp.asarray(rng.standard_normal((B, Mr, Hq, D)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal((B, N_r, 4, D)), jnp.float32) for _ in range(2))
        lens = jnp.asarray(rng.integers(0, N_r + 1, size=B), jnp.int32)
        if kw_r == "per_sequence":
            kw_r = dict(causal=True, kv_lens=lens, q_offset=lens - Mr + jnp.asarray(rng.integers(-3, 4, size=B)))
        lay = layouts.union(layouts.sliding_window((Mr, N_r), (8, C_r), 24),
                            layouts.random((Mr, N_r), (8, C_r), 2, batch_shape=(4,)))

        def fwd(q, k, v, cp, kw_r=kw_r, lay=lay):
            return jb.block_sparse_attention(q, k, v, lay, return_lse=True, context_parallel=cp, **kw_r)

        grad = lambda q, k, v, cp, fwd=fwd: jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fwd(q, k, v, cp)[0])),
                                                     argnums=(0, 1, 2))(q, k, v)
        want = jax.jit(fwd, static_argnums=3)(q, k, v, "ring") + jax.jit(grad, static_argnums=3)(q, k, v, "ring")
        kind = AxisType.Explicit if name.endswith("explicit") else AxisType.Auto
        mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(kind,) * 2)
        args = tuple(sharder(mesh)(x, "x", "y") for x in (q, k, v)) + ("ring",)
        f, g = jax.jit(fwd, static_argnums=3), jax.jit(grad, static_argnums=3)
        with jax.set_mesh(mesh) if kind == AxisType.Explicit else contextlib.nullcontext():
            got = f(*args) + g(*args)
            hlo = "".join(h.lower(*args).compile().as_text() for h in (f, g))
        errs = rel_finite(got, want)
        report[name] = dict(errs=errs, all_gathers=hlo.count("all-gather"), kernel_calls=kernel_calls(hlo),
                            row_gathers=len(re.findall(rf"= \w+\[\d+,{Mr},[^=]*all-gather\(", hlo)),
                            permutes=hlo.count(" collective-permute("),
                            specs=[[list(e) if isinstance(e, tuple) else e for e in x.sharding.spec] for x in got])
    # The zigzag order (zigzag_shards=4): q, k, v stored in it, split over the sequence on "y" (4 devices), the batch
    # over "x": each device runs its two chunks of rows, nothing of q's is gathered. zigzag_other_count: the order for
    # 2 shards over 4 devices: q's rows gathered (documented), the result still right. zigzag_ring*: with the ring,
    # k and v (N = 128: each device's two chunks of 16 keys, whole 8-key block columns) pass round the devices; with
    # N = 96 (chunks of 12 keys) a chunk would cut a block and they are all-gathered (documented).
    from jax_bsattn.zigzag import to_zigzag
    Mz = 64
    for name, (S, kw_z, cp, Nz) in {
            "zigzag_causal": (4, dict(causal=True), "all_gather", 96),
            "zigzag_lens_offsets": (4, "per_sequence", "all_gather", 96),
            "zigzag_other_count": (2, dict(causal=True), "all_gather", 96),
            "zigzag_explicit": (4, dict(causal=True), "all_gather", 96),
            "zigzag_ring_causal": (4, dict(causal=True), "ring", 128),
            "zigzag_ring_not_causal": (4, {}, "ring", 128),
            "zigzag_ring_lens_offsets": (4, "per_sequence", "ring", 128),
            "zigzag_ring_explicit": (4, dict(causal=True), "ring", 128),
            "zigzag_ring_cut_blocks": (4, dict(causal=True), "ring", 96)}.items():
        q = jnp.asarray(rng.standard_normal((B, Mz, Hq, D)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal((B, Nz, 4, D)), jnp.float32) for _ in range(2))
        if kw_z == "per_sequence":
            lens = jnp.asarray(rng.integers(0, Nz + 1, size=B), jnp.int32)
            kw_z = dict(causal=True, kv_lens=lens, q_offset=lens - Mz + jnp.asarray(rng.integers(-3, 4, size=B)))
        lay = layouts.union(layouts.sliding_window((Mz, Nz), 8, 24), layouts.random((Mz, Nz), 8, 2, batch_shape=(4,)))

        def fwd(q, k, v, shards, kw_z=kw_z, lay=lay, cp=cp):
            return jb.block_sparse_attention(q, k, v, lay, return_lse=True, zigzag_shards=shards,
                                             context_parallel=cp, **kw_z)

        grad = lambda q, k, v, shards, fwd=fwd: jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fwd(q, k, v, shards)[0])),
                                                         argnums=(0, 1, 2))(q, k, v)
        f, g = jax.jit(fwd, static_argnums=3), jax.jit(grad, static_argnums=3)
        want = [to_zigzag(x, S, axis=1) for x in f(q, k, v, None) + g(q, k, v, None)]
        kind = AxisType.Explicit if name.endswith("explicit") else AxisType.Auto
        mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(kind,) * 2)
        args = tuple(sharder(mesh)(to_zigzag(x, S), "x", "y") for x in (q, k, v)) + (S,)
        with jax.set_mesh(mesh) if kind == AxisType.Explicit else contextlib.nullcontext():
            got = f(*args) + g(*args)
            hlo = "".join(h.lower(*args).compile().as_text() for h in (f, g))
            fwd_hlo = f.lower(*args).compile().as_text()
        errs = rel_finite(got, want)
        report[name] = dict(errs=errs, fwd_calls=len(re.findall(r'custom_call_target="bsattn_fwd', fwd_hlo)),
                            all_gathers=hlo.count("all-gather"),
                            permutes=hlo.count(" collective-permute("),
                            row_gathers=len(re.findall(rf"= \w+\[\d+,{Mz},[^=]*all-gather\(", hlo)),
                            specs=[[list(e) if isinstance(e, tuple) else e for e in x.sharding.spec] for x in got])
    # The manual alternative: the op inside shard_map runs on each device's batch shard (no partitioner).
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    q, k, v = (jnp.asarray(rng.standard_normal((B, n, 4, D)), jnp.float32) for n in (M, N, N))
    lay = layouts.sliding_window((M, N), 8, 24)
    fwd = lambda q, k, v: jb.block_sparse_attention(q, k, v, lay, causal=True)
    sm = jax.shard_map(fwd, mesh=mesh, in_specs=(P("x"),) * 3, out_specs=P("x"))
    loss = lambda f: (lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))))
    got = (jax.jit(sm)(q, k, v),) + jax.jit(jax.grad(loss(sm), argnums=(0, 1, 2)))(q, k, v)
    want = (jax.jit(fwd)(q, k, v),) + jax.jit(jax.grad(loss(fwd), argnums=(0, 1, 2)))(q, k, v)
    report["shard_map"] = dict(errs=rel(got, want))
    # jax_bsattn.export: the shard_map form exports (and serialises); jit's sharded op is refused with a message
    try:
        import flatbuffers  # noqa: F401  (jax's serialisation needs it)
    except ImportError:
        pass
    else:
        restored = [jax.export.deserialize(jb.export(jax.jit(f))(q, k, v).serialize())
                    for f in (sm, jax.grad(loss(sm), argnums=(0, 1, 2)))]
        batch = NamedSharding(mesh, P("x"))
        split = [jax.device_put(x, batch) for x in (q, k, v)]     # an 8-device program runs on 8 devices' shards
        out = [jax.jit(r.call)(*split) for r in restored]
        report["export_shard_map"] = dict(errs=rel((out[0],) + tuple(out[1]), got), nr_devices=restored[0].nr_devices)
        try:
            jb.export(jax.jit(fwd, in_shardings=(batch,) * 3, out_shardings=batch))(q, k, v)
            report["export_sharded_jit"] = "exported"
        except ValueError as e:
            report["export_sharded_jit"] = str(e)
    # Operands that vary over different axes inside shard_map. q split, k / v replicated: their cotangents are summed
    # over the devices (as jax.nn.dot_product_attention's would be).
    k1, v1 = k[:1], v[:1]
    sm = jax.shard_map(fwd, mesh=mesh, in_specs=(P("x"), P(), P()), out_specs=P("x"))
    bcast = lambda q, k, v: fwd(q, *(jnp.broadcast_to(x, (B,) + x.shape[1:]) for x in (k, v)))
    got = (jax.jit(sm)(q, k1, v1),) + jax.jit(jax.grad(loss(sm), argnums=(0, 1, 2)))(q, k1, v1)
    want = (jax.jit(bcast)(q, k1, v1),) + jax.jit(jax.grad(loss(bcast), argnums=(0, 1, 2)))(q, k1, v1)
    report["shard_map_replicated_kv"] = dict(errs=rel(got, want))
    # A layout that differs per device beside replicated q, k, v: each device's output is its own, and dq sums them.
    lays = layouts.random((M, N), 8, 2, batch_shape=(8,))
    def per_device(q, k, v, ip, ix):
        lay = jb.BlockSparseLayout(ip[0], ix[0], (8, 8), (M, N))
        return jb.block_sparse_attention(q, k, v, lay, causal=True)[None]

    sm = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P("x"), P("x")), out_specs=P("x"))
    stacked = lambda q, k, v, ip, ix: jnp.stack([per_device(q, k, v, ip[i:i + 1], ix[i:i + 1])[0] for i in range(8)])
    loss5 = lambda f: (lambda q, k, v, ip, ix: jnp.sum(jnp.sin(f(q, k, v, ip, ix))))
    args = (q[0], k[0], v[0], lays.indptr, lays.indices)
    got = (jax.jit(sm)(*args),) + jax.jit(jax.grad(loss5(sm), argnums=(0, 1, 2)))(*args)
    want = (jax.jit(stacked)(*args),) + jax.jit(jax.grad(loss5(stacked), argnums=(0, 1, 2)))(*args)
    report["shard_map_layout_per_device"] = dict(errs=rel(got, want))
    # Context parallelism inside shard_map (sequence_axis): q, k, v split over the sequence on "y" (4 devices; the
    # batch over "x"), or on ("x", "y") (8), the layout and the per-sequence operands the whole sequences'; the op
    # makes its collectives itself. Against the unsharded op (o, lse and the gradients; in zigzag order, permuted).
    # seq_axis_cut_blocks: 12 keys a device, 8-key blocks: the ring falls back to the all-gather (documented).
    Ms, Hks = 64, 4
    # (two_axes_reversed: the sequence over ("y", "x"), against the mesh's order, which ppermute numbers devices by;
    # empty: a layout that lists nothing)
    for name, (cp, zz, spec, Ns, per_seq, causal) in {
            "seq_axis_all_gather": ("all_gather", None, ("x", "y"), 128, False, True),
            "seq_axis_ring": ("ring", None, ("x", "y"), 128, False, True),
            "seq_axis_ring_not_causal": ("ring", None, ("x", "y"), 128, False, False),
            "seq_axis_zigzag": ("all_gather", 4, ("x", "y"), 128, False, True),
            "seq_axis_zigzag_ring": ("ring", 4, (None, "y"), 128, True, True),   # (kv_lens, q_offset: whole batch)
            "seq_axis_two_axes_ring": ("ring", None, (None, ("x", "y")), 128, True, True),
            "seq_axis_two_axes_reversed_ring": ("ring", None, (None, ("y", "x")), 128, False, True),
            "seq_axis_empty_ring": ("ring", None, ("x", "y"), 128, False, True),
            "seq_axis_cut_blocks": ("ring", None, ("x", "y"), 48, False, True)}.items():
        q = jnp.asarray(rng.standard_normal((2, Ms, Hq, D)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal((2, Ns, Hks, D)), jnp.float32) for _ in range(2))
        lay = layouts.union(layouts.sliding_window((Ms, Ns), 8, 40),
                            layouts.random((Ms, Ns), 8, 2, batch_shape=(Hks,)))
        if "empty" in name:
            lay = jb.BlockSparseLayout.from_block_mask(np.zeros((Ms // 8, Ns // 8), bool), (8, 8), (Ms, Ns))
        kw = {}
        if per_seq:
            lens = jnp.asarray(rng.integers(Ns // 2, Ns + 1, size=2), jnp.int32)
            kw = dict(kv_lens=lens, q_offset=lens - Ms + jnp.asarray(rng.integers(-3, 4, size=2), jnp.int32))
        axis = spec[1]
        parts = 8 if isinstance(axis, tuple) else 4
        mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
        order = (lambda x, zz=zz: to_zigzag(x, zz, axis=1)) if zz else (lambda x: x)

        def op(q, k, v, kw=kw, lay=lay, cp=cp, zz=zz, axis=axis, causal=causal, f=jb.block_sparse_attention):
            return f(q, k, v, lay, causal=causal, return_lse=True, context_parallel=cp, zigzag_shards=zz,
                     sequence_axis=axis, **kw)

        loss2 = lambda f: (lambda q, k, v: sum(jnp.sum(jnp.sin(x)) for x in f(q, k, v)))
        whole = lambda q, k, v, op=op: op(q, k, v, axis=None, zz=None)
        want = [order(x) for x in jax.jit(whole)(q, k, v) + jax.jit(jax.grad(loss2(whole), argnums=(0, 1, 2)))(q, k, v)]
        sm = jax.shard_map(op, mesh=mesh, in_specs=(P(*spec),) * 3, out_specs=(P(*spec),) * 2)
        args = [order(x) for x in (q, k, v)]
        g = jax.jit(jax.grad(loss2(sm), argnums=(0, 1, 2)))
        got = jax.jit(sm)(*args) + g(*args)
        hlo = g.lower(*args).compile().as_text()
        report[name] = dict(errs=rel_finite(got, want), all_gathers=hlo.count("all-gather"), parts=parts,
                            permutes=hlo.count(" collective-permute("),
                            nonzero=[bool(jnp.any(jnp.isfinite(x) & (x != 0))) for x in want])
        if name == "seq_axis_two_axes_reversed_ring":   # the same under jit: q, k, v sharded over ("y", "x")
            f = jax.jit(op, static_argnames=("axis",))
            sharded = [jax.device_put(x, NamedSharding(mesh, P(*spec))) for x in args]
            got = f(*sharded, axis=None) + jax.jit(jax.grad(loss2(partial(op, axis=None)), argnums=(0, 1, 2)))(
                *sharded)
            hlo = f.lower(*sharded, axis=None).compile().as_text()
            report["ring_axes_out_of_mesh_order"] = dict(errs=rel_finite(got, want), all_gathers=hlo.count(
                "all-gather"), parts=parts, permutes=hlo.count(" collective-permute("))
        if name == "seq_axis_zigzag_ring":     # the reference takes sequence_axis too
            ref_op = partial(op, f=jb.reference.block_sparse_attention_reference)
            sm = jax.shard_map(ref_op, mesh=mesh, in_specs=(P(*spec),) * 3, out_specs=(P(*spec),) * 2)
            got = jax.jit(sm)(*args) + jax.jit(jax.grad(loss2(sm), argnums=(0, 1, 2)))(*args)
            report["seq_axis_reference"] = dict(errs=rel_finite(got, want))
            try:      # the shard_map form exports (no custom_partitioning in it), the ring's collectives included
                import flatbuffers  # noqa: F401
            except ImportError:
                continue
            sm = jax.shard_map(op, mesh=mesh, in_specs=(P(*spec),) * 3, out_specs=(P(*spec),) * 2)
            restored = [jax.export.deserialize(jb.export(jax.jit(f))(*args).serialize())
                        for f in (sm, jax.grad(loss2(sm), argnums=(0, 1, 2)))]
            split = [jax.device_put(x, NamedSharding(mesh, P(*spec))) for x in args]
            got = jax.jit(restored[0].call)(*split) + jax.jit(restored[1].call)(*split)
            report["seq_axis_export"] = dict(errs=rel_finite(got, want))
    # The Flax module inside shard_map with sequence_axis (rotary, causal, GQA; the zigzag ring over "y"): its output
    # and parameter gradients equal the module's on the whole sequences (permuted); flax's MultiHeadAttention with
    # make_attention_fn(sequence_axis=...) likewise (its output).
    from flax import nnx
    import jax_bsattn.flax as jbf
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
    mkw = dict(num_kv_heads=2, rotary=True, causal=True, layout=lambda lens: layouts.sliding_window(lens, 8, 24))
    whole_m = jbf.BlockSparseMultiHeadAttention(4, 32, **mkw, rngs=nnx.Rngs(3))
    split_m = jbf.BlockSparseMultiHeadAttention(4, 32, **mkw, context_parallel="ring", zigzag_shards=4,
                                                sequence_axis="y", rngs=nnx.Rngs(3))
    x = jnp.asarray(rng.standard_normal((2, 64, 32)), jnp.float32)
    zig = lambda a: to_zigzag(a, 4, axis=1)

    def run(module, spec):
        graph, state = nnx.split(module)
        apply = lambda state, x: nnx.merge(graph, state)(x)
        if spec is not None:
            apply = jax.shard_map(apply, mesh=mesh, in_specs=(P(), spec), out_specs=spec)
        loss = lambda state, x: jnp.sum(jnp.sin(apply(state, x)))
        return apply, loss, state

    apply, loss_w, state = run(whole_m, None)
    want = [zig(jax.jit(apply)(state, x))] + jax.tree.leaves(jax.jit(jax.grad(loss_w))(state, x))
    apply, loss_s, state = run(split_m, P(None, "y"))
    got = [jax.jit(apply)(state, zig(x))] + jax.tree.leaves(jax.jit(jax.grad(loss_s))(state, zig(x)))
    report["seq_axis_flax_module"] = dict(errs=rel(got, want), leaves=len(got))
    mha = lambda fn: nnx.MultiHeadAttention(4, 32, num_kv_heads=2, attention_fn=fn, decode=False, rngs=nnx.Rngs(0))
    lay = layouts.sliding_window(64, 8, 24)
    want = mha(jbf.make_attention_fn(lay, causal=True))(x)
    graph, state = nnx.split(mha(jbf.make_attention_fn(lay, causal=True, context_parallel="ring", sequence_axis="y")))
    sm = jax.shard_map(lambda state, x: nnx.merge(graph, state)(x), mesh=mesh, in_specs=(P(), P(None, "y")),
                       out_specs=P(None, "y"))
    report["seq_axis_attention_fn"] = dict(errs=rel([jax.jit(sm)(state, x)], [want]))
    # vmap over the op with sequence_axis inside shard_map (the inner primitives' batching rules): two problems at once
    lay = layouts.sliding_window(64, 8, 24)
    q = jnp.asarray(rng.standard_normal((2, 2, 64, Hq, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 2, 64, 4, D)), jnp.float32) for _ in range(2))
    one = lambda q, k, v, axis: jb.block_sparse_attention(q, k, v, lay, causal=True, context_parallel="ring",
                                                          sequence_axis=axis)
    sm = jax.shard_map(jax.vmap(partial(one, axis="y")), mesh=mesh, in_specs=(P(None, None, "y"),) * 3,
                       out_specs=P(None, None, "y"))
    want = jax.vmap(partial(one, axis=None))(q, k, v)
    report["seq_axis_vmap"] = dict(errs=rel([jax.jit(sm)(q, k, v)], [want]))
    # sequence_axis's errors: outside shard_map, not an axis name, shards that cut a block row, another zigzag count
    errors = {}
    q = jnp.asarray(rng.standard_normal((2, 64, Hq, D)), jnp.float32)
    k = v = jnp.asarray(rng.standard_normal((2, 64, 4, D)), jnp.float32)
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
    for case, (Mq, zz, axis) in {"outside": (64, None, "y"), "type": (64, None, 3), "rows": (48, None, "y"),
                                 "zigzag": (64, 2, "y"), "local_layout": (64, None, "y")}.items():
        lay = layouts.sliding_window((16, 16) if case == "local_layout" else (Mq, 64), 8, 24)
        op = lambda q, k, v, lay=lay, zz=zz, axis=axis: jb.block_sparse_attention(
            q, k, v, lay, causal=True, zigzag_shards=zz, sequence_axis=axis)
        try:
            if case == "outside":
                jax.jit(op)(q, k, v)
            else:
                jax.jit(jax.shard_map(op, mesh=mesh, in_specs=(P(None, "y"),) * 3, out_specs=P(None, "y")))(
                    q[:, :Mq], k, v)
            errors[case] = "no error"
        except ValueError as e:
            errors[case] = str(e)
    report["seq_axis_errors"] = errors
    print("REPORT " + json.dumps(report))


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    # the worker imports jax_bsattn the way this process did (the installed package, or PYTHONPATH in a dev tree)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, f"sharding worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("REPORT "):])


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_equals_unsharded(report, name):
    r = report[name]
    assert max(r["errs"]) < 1e-5, r           # o, lse, dq, dk, dv against the unsharded op
    assert r["kernel_calls"] >= 2, r          # the kernels ran (forward and backward), not a fallback


@pytest.mark.parametrize("name", NO_GATHER)
def test_batch_and_head_sharding_runs_on_local_shards(report, name):
    r = report[name]
    assert r["all_gathers"] == 0, r
    qspec = CASES[name][1] + (None,) * 3
    o_spec = r["specs"][0] + [None] * 3
    assert (o_spec[0], o_spec[2]) == (qspec[0], qspec[2]), r        # o stays sharded as q (batch, heads)


@pytest.mark.parametrize("name", ROWS_LOCAL)
def test_query_rows_stay_split(report, name):
    r = report[name]
    assert r["row_gathers"] == 0, r           # no all-gather of q, o, do, lse or delta
    assert r["specs"][0][1] == CASES[name][1][1], r    # o's rows split as q's
    if "qkv" not in name:                     # k, v not split: nothing is gathered; dk, dv all-reduced
        assert r["all_gathers"] == 0 and r["all_reduces"] > 0, r
    else:                                     # k, v split over the rows' axes: dk, dv reduce-scattered to them
        assert r["reduce_scatters"] > 0 and r["all_reduces"] == 0 and r["specs"][3][1] == CASES[name][2][1], r


@pytest.mark.parametrize("name", ["ring_causal", "ring_not_causal", "ring_lens_offsets", "ring_cut_blocks",
                                  "ring_explicit"])
def test_ring_attention(report, name):
    r = report[name]
    assert max(r["errs"]) < 1e-5, r           # o, lse, dq, dk, dv against the unsharded op
    assert r["row_gathers"] == 0 and all(s[:2] == ["x", "y"] for s in r["specs"]), r   # all stay split
    if name == "ring_cut_blocks":             # a key shard would cut a block: all-gathered instead (documented)
        assert r["all_gathers"] > 0 and r["permutes"] == 0, r
    else:                                     # k, v (and dk, dv) pass round the 4 devices of "y": 3 steps each way
        assert r["all_gathers"] == 0 and r["permutes"] > 0, r
        assert r["kernel_calls"] >= 4 * 3, r  # (forward; backward, with its forward again)


@pytest.mark.parametrize("name", ["zigzag_causal", "zigzag_lens_offsets", "zigzag_other_count", "zigzag_explicit",
                                  "zigzag_ring_causal", "zigzag_ring_not_causal", "zigzag_ring_lens_offsets",
                                  "zigzag_ring_explicit", "zigzag_ring_cut_blocks"])
def test_zigzag_order(report, name):
    r = report[name]
    assert max(r["errs"]) < 1e-5, r           # against the unsharded op on the natural order, permuted
    assert all(s[:2] == ["x", "y"] for s in r["specs"]), r     # o, lse, dq, dk, dv split as q
    if name == "zigzag_other_count":          # the order's 2 shards on 4 devices: q's rows gathered (documented)
        assert r["row_gathers"] > 0, r
        return
    assert r["row_gathers"] == 0, r
    if "ring" in name and "cut_blocks" not in name:
        # k, v pass round the 4 devices of "y": 4 steps of 2 chunks of rows x 2 chunks of keys, nothing gathered
        assert r["all_gathers"] == 0 and r["permutes"] > 0 and r["fwd_calls"] == 4 * 2 * 2, r
    else:                                     # each device its two chunks: a kernel call each, k, v all-gathered
        assert r["all_gathers"] > 0 and r["permutes"] == 0 and r["fwd_calls"] == 2, r


def test_ring_step_lists_hold_only_the_shards_blocks():
    """A ring step's lists (partitioning._keys_from, in-process): each row keeps, in order, its entries that fall in
    the key shard held, moved to it; garbage indices (negative, >= NB) never come back into range. The CUDA
    kernels pack a row's entries into key tiles by position, so other shards' entries left in would be computed,
    masked, at every step."""
    import jax.numpy as jnp
    import numpy as np
    from jax_bsattn.partitioning import _keys_from
    from jax_bsattn.primitives import Config

    rng = np.random.default_rng(3)
    MB, NB, C, nnz, Nl = 5, 12, 4, 30, 16                 # shards of 16 keys: 4 block columns each
    ends = np.sort(rng.integers(0, nnz + 1, size=(2, 3, MB - 1)), axis=-1)
    indptr = np.concatenate([np.zeros((2, 3, 1), int), ends, np.full((2, 3, 1), nnz - 2)], -1)
    indices = rng.integers(-3, NB + 3, size=(2, 3, nnz))
    cfg = Config(block_r=8, block_c=C, scale=1.0, softcap=0.0, causal=False, ring=True)
    none = jnp.zeros((0,), jnp.int32)
    for first in (0, 16, 32):
        ip, ix, _, _ = (np.asarray(x) for x in _keys_from(jnp.asarray(indptr, jnp.int32),
                                                             jnp.asarray(indices, jnp.int32), none, none, 8 * MB,
                                                             first, Nl, cfg))
        for l in range(2):
            for h in range(3):
                for r in range(MB):
                    row = indices[l, h, indptr[l, h, r]:indptr[l, h, r + 1]] - first // C
                    np.testing.assert_array_equal(ix[l, h, ip[l, h, r]:ip[l, h, r + 1]],
                                                  row[(row >= 0) & (row < Nl // C)])


@pytest.mark.parametrize("name", ["kv_lens", "kv_lens_explicit", "q_offset", "q_offset_explicit", "q_offset_rows"])
def test_kv_lens_sharded(report, name):
    r = report[name]
    assert max(r["errs"]) < 1e-5, r
    assert r["kernel_calls"] >= 2 and r["all_gathers"] == 0, r


@pytest.mark.parametrize("name", ["projected_heads_hk2", "projected_heads_hk4"])
def test_projected_heads(report, name):
    r = report[name]
    assert max(r["errs"]) < 1e-5, r           # the model's output and its weights' gradients against unsharded
    assert r["kernel_calls"] >= 2, r
    if name.endswith("hk4"):                  # heads whole on each device: nothing gathered
        assert r["all_gathers"] == 0, r
    else:                                     # heads over part of "y": all-gathered before the call (documented)
        assert r["all_gathers"] > 0, r


@pytest.mark.parametrize("name", ["shard_map", "shard_map_replicated_kv", "shard_map_layout_per_device"])
def test_inside_shard_map(report, name):
    assert max(report[name]["errs"]) < 1e-5, report[name]


@pytest.mark.parametrize("name", ["seq_axis_all_gather", "seq_axis_ring", "seq_axis_ring_not_causal",
                                  "seq_axis_zigzag", "seq_axis_zigzag_ring", "seq_axis_two_axes_ring",
                                  "seq_axis_two_axes_reversed_ring", "ring_axes_out_of_mesh_order",
                                  "seq_axis_empty_ring", "seq_axis_cut_blocks"])
def test_sequence_axis_inside_shard_map(report, name):
    r = report[name]
    assert max(r["errs"]) < 1e-5, r           # o, lse, dq, dk, dv against the unsharded op
    if "empty" in name:                       # (o and the gradients are 0, lse -inf: nothing to compare but that)
        assert r["nonzero"] == [False] * 5, r
    elif "nonzero" in r:
        assert all(r["nonzero"]), r
    if "ring" in name:                        # k, v (and dk, dv) pass round the devices: nothing gathered
        assert r["all_gathers"] == 0 and r["permutes"] >= 2 * (r["parts"] - 1), r
    else:                                     # k, v all-gathered (the cut blocks: the ring's fallback)
        assert r["all_gathers"] > 0 and r["permutes"] == 0, r


@pytest.mark.parametrize("name", ["seq_axis_flax_module", "seq_axis_attention_fn", "seq_axis_vmap"])
def test_sequence_axis_flax_and_vmap(report, name):
    assert max(report[name]["errs"]) < 1e-5, report[name]


def test_sequence_axis_export(report):
    if "seq_axis_export" not in report:
        pytest.skip("flatbuffers (jax's serialisation) is not installed")
    assert max(report["seq_axis_export"]["errs"]) < 1e-5, report["seq_axis_export"]


def test_sequence_axis_reference_and_errors(report):
    assert max(report["seq_axis_reference"]["errs"]) < 1e-5, report["seq_axis_reference"]
    e = report["seq_axis_errors"]
    assert "sequence_axis='y' is not an axis of an enclosing jax.shard_map" in e["outside"], e
    assert "sequence_axis must be None, a mesh axis name or a tuple of them" in e["type"], e
    assert "each device's 12 rows of q must be whole block rows (R = 8)" in e["rows"], e
    assert "zigzag_shards=2 with sequence_axis='y'" in e["zigzag"], e
    assert "layout.seq_lens=(16, 16)" in e["local_layout"] and "with sequence_axis='y'" in e["local_layout"], e


def test_export(report):
    if "export_shard_map" not in report:
        pytest.skip("flatbuffers (jax's serialisation) is not installed")
    r = report["export_shard_map"]
    assert max(r["errs"]) == 0 and r["nr_devices"] == 8, r      # restored from bytes: the same program
    assert "jax.shard_map" in report["export_sharded_jit"], report["export_sharded_jit"]


@pytest.mark.parametrize("name", GATHERED)
def test_sequence_and_head_dim_sharding_is_all_gathered(report, name):
    assert report[name]["all_gathers"] > 0, report[name]
    if name == "seq_q":                       # 6 block rows over 4 devices: q's rows gathered (row_gathers sees it)
        assert report[name]["row_gathers"] > 0, report[name]


if __name__ == "__main__":
    worker()
