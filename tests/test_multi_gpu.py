"""Sharding over several real GPUs (skipped with fewer than two): batch and head sharding of the forward and the
backward under jax.jit with NamedSharding. The results must match the same op on one GPU, and the compiled HLO
must hold no all-gather (each GPU runs the kernels on its local shard). The CPU version with forced host
devices, which covers more shardings, is test_sharding.py.
"""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_bsattn as jb
from conftest import check_forward, check_gradients
from jax_bsattn import layouts

pytestmark = pytest.mark.gpu


def _gpus():
    try:
        return jax.devices("cuda")
    except RuntimeError:
        return []


# name: (mesh shape over ("b", "h"), layout batch shape); q, k, v are sharded over batch on "b", heads on "h"
CASES = {
    "batch": ((2, 1), ()),
    "heads": ((1, 2), ()),
    "heads_per_head_layout": ((1, 2), (4,)),
    "batch_per_batch_layout": ((2, 1), (4, 1)),
    "batch_and_heads": ((2, 2), (4,)),   # needs 4 GPUs
}


def _problem(lead):
    rng = np.random.default_rng(0)
    B, M, N, Hq, Hk, D = 4, 512, 512, 8, 4, 64
    draw = lambda shape: jnp.asarray(rng.standard_normal(shape) * 1.5, jnp.bfloat16)
    q, k, v = draw((B, M, Hq, D)), draw((B, N, Hk, D)), draw((B, N, Hk, D))
    lay = layouts.union(layouts.sliding_window((M, N), 64, 128),
                        layouts.random((M, N), 64, 2, batch_shape=lead, seed=3))
    return q, k, v, lay


def _fns():
    def fwd(q, k, v, lay):
        return jb.block_sparse_attention(q, k, v, lay, causal=True, return_lse=True)

    def loss(q, k, v, lay):
        return jnp.sum(jnp.sin(fwd(q, k, v, lay)[0].astype(jnp.float32)))

    return fwd, jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_on_gpus_equals_one_gpu(name):
    (nb, nh), lead = CASES[name]
    gpus = _gpus()
    if len(gpus) < nb * nh or len(gpus) < 2:
        pytest.skip(f"needs {max(2, nb * nh)} GPUs, found {len(gpus)}")
    q, k, v, lay = _problem(lead)
    fwd, grad = _fns()
    with jax.default_device(gpus[0]):                                  # one GPU, unsharded
        want = jax.jit(fwd)(q, k, v, lay) + jax.jit(grad)(q, k, v, lay)
    mesh = jax.make_mesh((nb, nh), ("b", "h"), axis_types=(AxisType.Auto,) * 2, devices=gpus[:nb * nh])
    spec = NamedSharding(mesh, P("b", None, "h"))
    qs, ks, vs = (jax.device_put(x, spec) for x in (q, k, v))
    f, g = jax.jit(fwd), jax.jit(grad)
    got = f(qs, ks, vs, lay) + g(qs, ks, vs, lay)
    for name_, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        fin = np.isfinite(b)
        assert np.array_equal(fin, np.isfinite(a)), name_
        err = np.linalg.norm((a - b)[fin]) / (np.linalg.norm(b[fin]) + 1e-30)
        assert err <= 1e-4, (name_, err)
    hlo = f.lower(qs, ks, vs, lay).compile().as_text() + g.lower(qs, ks, vs, lay).compile().as_text()
    assert hlo.count("all-gather") == 0
    plat = "cuda"  # the FFI targets are named per jax platform (cuda), not per device kind (gpu)
    assert hlo.count(f"bsattn_fwd_{plat}") >= 1 and hlo.count(f"bsattn_bwd_{plat}") >= 1
    assert got[0].sharding.is_equivalent_to(spec, 4), got[0].sharding       # o stays sharded as q


def _sequence_over_two_gpus():
    """The sharding of [B, S, ...] with the sequence over 2 GPUs (the test skips with fewer)."""
    gpus = _gpus()
    if len(gpus) < 2:
        pytest.skip(f"needs 2 GPUs, found {len(gpus)}")
    return NamedSharding(jax.make_mesh((2,), ("s",), axis_types=(AxisType.Auto,), devices=gpus[:2]), P(None, "s"))


def test_query_rows_split_over_gpus():
    """Context parallelism: q's 8 block rows split over 2 GPUs stay split (no gather of q's rows), k and v whole on
    each; forward and gradients held to the float32 reference (dk, dv: the shards' bf16 parts summed)."""
    (q, k, v, lay), rows = _problem((4,)), _sequence_over_two_gpus()
    whole = NamedSharding(rows.mesh, P())
    qs, ks, vs = jax.device_put(q, rows), jax.device_put(k, whole), jax.device_put(v, whole)
    check_forward(qs, ks, vs, lay, causal=True)
    check_gradients(qs, ks, vs, lay, causal=True)
    fwd, grad = _fns()
    hlo = "".join(jax.jit(f).lower(qs, ks, vs, lay).compile().as_text() for f in (fwd, grad))
    assert hlo.count("all-gather") == 0 and hlo.count("all-reduce") >= 1
    assert jax.jit(fwd)(qs, ks, vs, lay)[0].sharding.is_equivalent_to(rows, 4)


def test_ring_attention_over_gpus():
    """context_parallel="ring": q, k, v split over the sequence on 2 GPUs stay split (k, v pass between the GPUs, no
    all-gather); forward and gradients held to the float32 reference in bf16 (o: the two shards' bf16 partial outputs
    merged in float32; dk, dv: their parts summed in float32 on the way round)."""
    (q, k, v, lay), rows = _problem((4,)), _sequence_over_two_gpus()
    qs, ks, vs = (jax.device_put(x, rows) for x in (q, k, v))
    ring = partial(jb.block_sparse_attention, context_parallel="ring")
    check_forward(qs, ks, vs, lay, op=ring, causal=True)
    check_gradients(qs, ks, vs, lay, op=ring, causal=True)
    fwd = jax.jit(lambda q, k, v: ring(q, k, v, lay, causal=True))
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fwd(q, k, v).astype(jnp.float32))), argnums=(0, 1, 2)))
    hlo = "".join(f.lower(qs, ks, vs).compile().as_text() for f in (fwd, grad))
    assert hlo.count("all-gather") == 0 and hlo.count("collective-permute") >= 1
    assert all(x.sharding.is_equivalent_to(rows, 4) for x in (fwd(qs, ks, vs),) + grad(qs, ks, vs))


@pytest.mark.parametrize("context_parallel", ["all_gather", "ring"])
def test_sequence_axis_inside_shard_map_over_gpus(context_parallel):
    """sequence_axis inside jax.shard_map: each GPU holds half of q, k, v's sequence; the op makes its collectives
    itself (k, v all-gathered, or passed between the GPUs by the ring); forward and gradients held to the float32
    reference on the whole sequences (bf16)."""
    (q, k, v, lay), rows = _problem((4,)), _sequence_over_two_gpus()
    spec = P(None, "s")

    def op(q, k, v, layout, return_lse=False, **kw):
        f = lambda q, k, v: jb.block_sparse_attention(q, k, v, layout, return_lse=return_lse, sequence_axis="s",
                                                      context_parallel=context_parallel, **kw)
        outs = (spec, spec) if return_lse else spec
        return jax.shard_map(f, mesh=rows.mesh, in_specs=(spec,) * 3, out_specs=outs)(q, k, v)

    qs, ks, vs = (jax.device_put(x, rows) for x in (q, k, v))
    check_forward(qs, ks, vs, lay, op=op, causal=True)
    check_gradients(qs, ks, vs, lay, op=op, causal=True)
    hlo = jax.jit(lambda q, k, v: op(q, k, v, lay, causal=True)).lower(qs, ks, vs).compile().as_text()
    if context_parallel == "ring":
        assert hlo.count("all-gather") == 0 and hlo.count("collective-permute") >= 1
    else:
        assert hlo.count("all-gather") >= 1


@pytest.mark.parametrize("context_parallel", ["all_gather", "ring"])
def test_zigzag_order_over_gpus(context_parallel):
    """zigzag_shards=2: q, k, v stored in the zigzag order, split over the sequence on 2 GPUs (each GPU one early and
    one late chunk of rows, nothing of q's gathered); forward and gradients held to the float32 reference on the
    natural order, permuted (bf16). With the ring, k and v pass between the GPUs (two chunks each, no all-gather)."""
    from jax_bsattn.reference import reference_in_dtype
    from jax_bsattn.zigzag import from_zigzag, to_zigzag
    from conftest import assert_close, on_cpu
    (q, k, v, lay), rows = _problem((4,)), _sequence_over_two_gpus()
    zz = [jax.device_put(to_zigzag(x, 2), rows) for x in (q, k, v)]
    ct = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), jnp.float32)
    loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * ct))
    op = lambda q, k, v: from_zigzag(jb.block_sparse_attention(q, k, v, lay, causal=True, zigzag_shards=2,
                                                               context_parallel=context_parallel), 2)
    got = (jax.jit(op)(*zz),) + tuple(from_zigzag(g, 2) for g in jax.jit(jax.grad(loss(op), argnums=(0, 1, 2)))(*zz))
    ref = lambda dt: (lambda q, k, v: reference_in_dtype(q, k, v, lay, causal=True, compute_dtype=dt))
    cq, ck, cv = on_cpu(q, k, v)
    want, lowp = ((ref(dt)(cq, ck, cv),) + jax.grad(loss(ref(dt)), argnums=(0, 1, 2))(cq, ck, cv)
                  for dt in (jnp.float32, q.dtype))
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), got, want, lowp):
        assert_close(name, a, b, c)
    hlo = jax.jit(op).lower(*zz).compile().as_text()
    if context_parallel == "ring":
        assert hlo.count("all-gather") == 0 and hlo.count("collective-permute") >= 1
    else:
        assert len(re.findall(r"= \w+\[\d+,512,[^=]*all-gather\(", hlo)) <= 2  # k and v only (M = N = 512)
