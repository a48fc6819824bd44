"""The zigzag sequence order (jax_bsattn.zigzag) on one device: the permutation and its inverse, and the op with
``zigzag_shards`` equal to the op on the natural order, permuted (forward, lse, gradients, kv_lens and q_offset in
natural positions); bad arguments name themselves. Sharded over 8 CPU devices: test_sharding.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bsattn as jb
from jax_bsattn import layouts
from jax_bsattn.zigzag import from_zigzag, to_zigzag, zigzag_chunks
from conftest import random_problem


def test_order_and_inverse():
    assert list(zigzag_chunks(4)) == [0, 7, 1, 6, 2, 5, 3, 4]
    x = jnp.arange(16)
    assert list(to_zigzag(x, 4, axis=-1)) == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    y = jnp.asarray(np.random.default_rng(0).standard_normal((2, 24, 3, 5)))
    for S in (1, 2, 3, 6):
        assert np.array_equal(from_zigzag(to_zigzag(y, S), S), y)
        chunks = np.asarray(to_zigzag(y, S)).reshape(2, 2 * S, 24 // (2 * S), 3, 5)
        want = np.asarray(y).reshape(2, 2 * S, 24 // (2 * S), 3, 5)[:, zigzag_chunks(S)]
        assert np.array_equal(chunks, want), S


@pytest.mark.parametrize("kw", [dict(causal=True), {}, "per_sequence"])
def test_op_in_zigzag_order_equals_natural_order_permuted(kw):
    rng = np.random.default_rng(1)
    B, M, N, S = 2, 64, 96, 4
    q, k, v = random_problem(rng, batch=(B,), M=M, N=N, Hq=4, Hk=2, D=16)
    if kw == "per_sequence":
        lens = jnp.asarray([70, 96], jnp.int32)
        kw = dict(causal=True, kv_lens=lens, q_offset=lens - M + jnp.asarray([2, -3]))
    lay = layouts.union(layouts.sliding_window((M, N), 8, 24), layouts.random((M, N), 8, 2, batch_shape=(2,)))

    def fwd(q, k, v, shards=None):
        return jb.block_sparse_attention(q, k, v, lay, return_lse=True, zigzag_shards=shards, **kw)

    def grads(q, k, v, shards=None):
        return jax.grad(lambda *a: jnp.sum(jnp.sin(fwd(*a, shards)[0])), argnums=(0, 1, 2))(q, k, v)

    zz = [to_zigzag(x, S) for x in (q, k, v)]
    want = [to_zigzag(x, S, axis=1) for x in jax.jit(fwd)(q, k, v) + jax.jit(grads)(q, k, v)]
    got = jax.jit(fwd, static_argnums=3)(*zz, S) + jax.jit(grads, static_argnums=3)(*zz, S)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True), name   # the same kernels, permuted
    # the reference takes the order too
    ref = lambda *a: jb.reference.block_sparse_attention_reference(*a, lay, return_lse=True, **kw)
    ref_zz = lambda *a: jb.reference.block_sparse_attention_reference(*a, lay, return_lse=True, zigzag_shards=S, **kw)
    for a, b in zip(ref_zz(*zz), ref(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(to_zigzag(b, S, axis=1)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shards, match", [
    (0, "zigzag_shards must be None or a positive integer"),
    (True, "zigzag_shards must be None or a positive integer"),
    (2.0, "zigzag_shards must be None or a positive integer"),
    (3, "zigzag_shards=3: q's M = 64 rows must split into 2 x 3 chunks of whole block rows"),
    (8, "zigzag_shards=8: q's M = 64 rows must split into 2 x 8 chunks of whole block rows"),
])
def test_bad_zigzag_shards_names_the_argument(shards, match):
    q, k, v = random_problem(np.random.default_rng(0), batch=(1,), M=64, N=64, Hq=2, Hk=2, D=8)
    with pytest.raises(ValueError, match=match):
        jb.block_sparse_attention(q, k, v, layouts.sliding_window((64, 64), 8, 16), zigzag_shards=shards)
    with pytest.raises(ValueError, match="shards must be a positive integer"):
        to_zigzag(q, 0)
    with pytest.raises(ValueError, match="must split into 2 x shards = 6 equal chunks"):
        to_zigzag(q[:, :62], 3)
