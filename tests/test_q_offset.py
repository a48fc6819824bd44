"""Per-sequence causal offsets (q_offset) on the CPU path: forward and gradients against the float32 reference, the
chunked-prefill identity, with kv_lens, traced offsets, clipping, bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bsattn as jb
from conftest import check_forward, check_gradients, random_mask, random_problem
from jax_bsattn.reference import block_sparse_attention_reference as reference


# R, C, g, D, softcap, per-head layout, offsets (B = 3: inside [-M, N - 1], at its ends, past them), kv_lens or None
CASES = [
    (8, 12, 2, 16, None, True, (60, -5, 17), None),
    (16, 16, 4, 32, 20.0, False, (99, -40, 0), None),
    (1, 5, 1, 8, None, True, (3, 500, -1000), None),
    (5, 1, 3, 16, None, False, (59, 2, 80), (100, 7, 81)),
    (8, 12, 2, 16, None, True, (57, 10, 40), (97, 50, 61)),
    (64, 64, 1, 16, None, True, (30, 64, 99), (70, 100, 65)),
]


@pytest.mark.parametrize("R,C,g,D,softcap,per_head,offsets,lens", CASES)
def test_forward_and_gradients(R, C, g, D, softcap, per_head, offsets, lens):
    rng = np.random.default_rng(R * 100 + C + len(offsets))
    M, N, Hk = 40, 100, 2
    q, k, v = random_problem(rng, batch=(3,), M=M, N=N, Hq=Hk * g, Hk=Hk, D=D)
    mask = random_mask(rng, (Hk,) if per_head else (), -(-M // R), -(-N // C), 0.6)
    layout = jb.BlockSparseLayout.from_block_mask(mask, (R, C), (M, N))
    kw = dict(causal=True, logits_soft_cap=softcap, q_offset=jnp.asarray(offsets))
    if lens is not None:
        kw["kv_lens"] = jnp.asarray(lens)
    check_forward(q, k, v, layout, **kw)
    check_gradients(q, k, v, layout, **kw)


def test_offsets_move_the_mask():
    """The offsets change what each row sees (a test of the tests): offset N - M is the default mask, others differ
    from it, and an offset of -M leaves every row empty."""
    rng = np.random.default_rng(1)
    M, N = 16, 48
    q, k, v = random_problem(rng, batch=(3,), M=M, N=N, Hq=2, Hk=1, D=8)
    layout = jb.BlockSparseLayout.from_block_mask(np.ones((2, 6), bool), (8, 8), (M, N))
    attend = jax.jit(lambda off: jb.block_sparse_attention(q, k, v, layout, causal=True, q_offset=off,
                                                           return_lse=True))
    o_default, _ = jax.jit(lambda: jb.block_sparse_attention(q, k, v, layout, causal=True, return_lse=True))()
    o, lse = attend(jnp.asarray([N - M, -5, -M]))
    np.testing.assert_array_equal(o[0], o_default[0])
    assert not np.allclose(o[1], o_default[1])
    # offset -5: rows 0 .. 4 see keys <= -5 .. -1 (none), row 5 on at least key 0
    assert np.isneginf(np.asarray(lse[1, :5])).all() and np.isfinite(np.asarray(lse[1, 5:])).all()
    assert np.isneginf(np.asarray(lse[2])).all() and not np.asarray(o[2]).any()


def test_chunked_prefill_matches_the_whole_prefill():
    """A chunk of M new rows at the end of each sequence (length L_b, q_offset = L_b - M) gives the rows L_b - M ..
    L_b - 1 of the causal prefill of the whole sequence: the serving identity the offsets exist for."""
    rng = np.random.default_rng(2)
    N, M, R, C = 96, 24, 8, 16
    lens = np.array([96, 40, 73])
    q_all, k, v = random_problem(rng, batch=(3,), M=N, N=N, Hq=4, Hk=2, D=16)
    whole_layout = jb.BlockSparseLayout.from_block_mask(np.ones((N // R, N // C), bool), (R, C), (N, N))
    whole = jb.block_sparse_attention(q_all, k, v, whole_layout, causal=True, kv_lens=lens)
    rows = lens[:, None] - M + np.arange(M)[None, :]  # [B, M] positions of the chunk's rows
    q = jnp.take_along_axis(q_all, jnp.asarray(rows)[..., None, None], axis=1)
    chunk_layout = jb.BlockSparseLayout.from_block_mask(np.ones((M // R, N // C), bool), (R, C), (M, N))
    chunk = jax.jit(lambda q, k, v: jb.block_sparse_attention(q, k, v, chunk_layout, causal=True, kv_lens=lens,
                                                              q_offset=lens - M))(q, k, v)
    want = jnp.take_along_axis(whole, jnp.asarray(rows)[..., None, None], axis=1)
    np.testing.assert_allclose(chunk, want, rtol=2e-5, atol=2e-6)


def test_traced_under_jit_and_vmap():
    rng = np.random.default_rng(3)
    M, N = 16, 48
    q, k, v = random_problem(rng, batch=(4,), M=M, N=N, Hq=4, Hk=2, D=16)
    layout = jb.BlockSparseLayout.from_block_mask(random_mask(rng, (), 2, 6, 0.7), (8, 8), (M, N))
    off = jnp.asarray([32, 3, -9, 40])
    want = reference(q, k, v, layout, causal=True, q_offset=off)
    op = lambda q, k, v, o: jb.block_sparse_attention(q, k, v, layout, causal=True, q_offset=o)
    np.testing.assert_allclose(jax.jit(op)(q, k, v, off), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(jax.vmap(op)(q, k, v, off), want, rtol=2e-5, atol=2e-5)
    # vmapped over the offsets alone (q, k, v shared): one kernel call over the folded batch
    one = jax.vmap(lambda o: op(q[0], k[0], v[0], o))(off)
    np.testing.assert_allclose(one, reference(jnp.broadcast_to(q[0], q.shape), jnp.broadcast_to(k[0], k.shape),
                                              jnp.broadcast_to(v[0], v.shape), layout, causal=True, q_offset=off),
                               rtol=2e-5, atol=2e-5)
    grads = jax.grad(lambda q, k, v: jnp.sum(jax.vmap(op)(q, k, v, off) ** 2), argnums=(0, 1, 2))(q, k, v)
    want_g = jax.grad(lambda q, k, v: jnp.sum(reference(q, k, v, layout, causal=True, q_offset=off) ** 2),
                      argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(grads, want_g):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_batch_dims_broadcast_and_integer_types():
    """Offsets broadcast against *B like kv_lens; any integer type; values past [-M, N - 1] clipped (2^40 must not
    wrap), in the op and the reference."""
    rng = np.random.default_rng(4)
    M, N = 8, 30
    q, k, v = random_problem(rng, batch=(2, 3), M=M, N=N, Hq=2, Hk=1, D=8)
    layout = jb.BlockSparseLayout.from_block_mask(np.ones((1, 4), bool), (8, 8), (M, N))
    check_forward(q, k, v, layout, causal=True, q_offset=jnp.asarray([[3], [-2]]))
    check_forward(q, k, v, layout, causal=True, q_offset=7)
    want = reference(q, k, v, layout, causal=True, q_offset=jnp.asarray([[N - 1] * 3, [-M] * 3]))
    for off in (np.array([[2**40], [-2**40]], np.int64), [[2**70], [-2**70]], jnp.asarray([[30], [-8]], jnp.int8)):
        np.testing.assert_allclose(jb.block_sparse_attention(q, k, v, layout, causal=True, q_offset=off), want,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(reference(q, k, v, layout, causal=True, q_offset=off), want, rtol=1e-6, atol=1e-7)
    for off, clipped in ((2**70, N - 1), (-2**70, -M)):  # a scalar past int64 (a 0-d object array, once a crash)
        want = reference(q, k, v, layout, causal=True, q_offset=clipped)
        np.testing.assert_allclose(jb.block_sparse_attention(q, k, v, layout, causal=True, q_offset=off), want,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(reference(q, k, v, layout, causal=True, q_offset=off), want, rtol=1e-6, atol=1e-7)
    big = jnp.asarray([[2**31 + 5], [0]], jnp.uint32)  # (unsigned: no negative bound, clipped to N - 1)
    np.testing.assert_allclose(jb.block_sparse_attention(q, k, v, layout, causal=True, q_offset=big),
                               reference(q, k, v, layout, causal=True, q_offset=jnp.asarray([[N - 1], [0]])),
                               rtol=1e-5, atol=1e-6)


def test_bad_q_offset():
    rng = np.random.default_rng(5)
    q, k, v = random_problem(rng, batch=(2,), M=8, N=16, Hq=2, Hk=1, D=8)
    layout = jb.BlockSparseLayout.from_block_mask(np.ones((1, 2), bool), (8, 8), (8, 16))
    with pytest.raises(ValueError, match="q_offset.*causal=True"):
        jb.block_sparse_attention(q, k, v, layout, q_offset=jnp.asarray([3, 4]))
    with pytest.raises(ValueError, match="q_offset.*causal=True"):
        reference(q, k, v, layout, q_offset=jnp.asarray([3, 4]))
    with pytest.raises(TypeError, match="q_offset"):
        jb.block_sparse_attention(q, k, v, layout, causal=True, q_offset=jnp.asarray([3.0, 4.0]))
    with pytest.raises(ValueError, match="q_offset"):
        jb.block_sparse_attention(q, k, v, layout, causal=True, q_offset=jnp.asarray([3, 4, 5]))
    with pytest.raises(TypeError, match="q_offset"):
        jb.block_sparse_attention(q, k, v, layout, causal=True, q_offset="late")
