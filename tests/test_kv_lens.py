"""Per-sequence key lengths (kv_lens) on the CPU path: forward and gradients against the float32 reference (which
masks the keys past each length on its dense mask), garbage past the lengths, traced lengths, bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bsattn as jb
from conftest import check_forward, check_gradients, custom_call_lines, random_mask, random_problem
from jax_bsattn.reference import block_sparse_attention_reference as reference


# R, C, g, D, causal, softcap, per-head layout, lengths (B = 3; some cut a block, some do not)
CASES = [
    (8, 12, 2, 16, False, None, True, (100, 37, 60)),
    (8, 12, 2, 16, True, None, False, (100, 37, 61)),
    (16, 16, 4, 32, False, 20.0, True, (96, 0, 17)),
    (1, 5, 1, 8, True, None, True, (3, 99, 1)),
    (5, 1, 3, 16, False, None, False, (50, 7, 100)),
    (64, 64, 1, 16, False, None, True, (100, 64, 65)),
]


@pytest.mark.parametrize("R,C,g,D,causal,softcap,per_head,lens", CASES)
def test_forward_and_gradients(R, C, g, D, causal, softcap, per_head, lens):
    rng = np.random.default_rng(R * 100 + C)
    M, N, Hk = 40, 100, 2
    q, k, v = random_problem(rng, batch=(3,), M=M, N=N, Hq=Hk * g, Hk=Hk, D=D)
    mask = random_mask(rng, (Hk,) if per_head else (), -(-M // R), -(-N // C), 0.5)
    layout = jb.BlockSparseLayout.from_block_mask(mask, (R, C), (M, N))
    _check(q, k, v, layout, causal=causal, logits_soft_cap=softcap, kv_lens=jnp.asarray(lens))


def _check(q, k, v, layout, **kw):
    check_forward(q, k, v, layout, **kw)
    check_gradients(q, k, v, layout, **kw)


@pytest.mark.parametrize("causal,dtype", [(False, jnp.float32), (True, jnp.float32), (True, jnp.bfloat16)])
def test_differentiated_forward_is_the_same_call(causal, dtype):
    """The kernels take kv_lens forward and backward: under differentiation the forward is the very call made without
    it (o and lse bitwise equal), and a length of 0 leaves every row empty."""
    rng = np.random.default_rng(14)
    M, N, R, C = 24, 90, 4, 8
    q, k, v = random_problem(rng, batch=(4,), M=M, N=N, Hq=6, Hk=2, D=16, dtype=dtype)
    layout = jb.BlockSparseLayout.from_block_mask(random_mask(rng, (4, 2), 6, 12, 0.6), (R, C), (M, N))
    lens = jnp.asarray([90, 0, 41, 8])
    attend = lambda q: jb.block_sparse_attention(q, k, v, layout, kv_lens=lens, causal=causal, return_lse=True)
    o, lse = jax.jit(attend)(q)
    (o_vjp, lse_vjp), _ = jax.jit(lambda q: jax.vjp(attend, q))(q)
    np.testing.assert_array_equal(o, o_vjp)
    np.testing.assert_array_equal(lse, lse_vjp)
    assert np.isneginf(np.asarray(lse)[1]).all() and not np.asarray(o)[1].any()  # a length of 0: every row empty


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(dtype):
    rng = np.random.default_rng(3)
    M, N = 1, 300  # a decode step: one query row, the last block of two sequences partly written
    q, k, v = random_problem(rng, batch=(2,), M=M, N=N, Hq=8, Hk=2, D=32, dtype=dtype)
    layout = jb.BlockSparseLayout.from_block_mask(random_mask(rng, (2, 2), 1, 19, 0.6), (1, 16), (M, N))
    _check(q, k, v, layout, kv_lens=jnp.asarray([131, 300]))


def test_batch_dims_and_broadcast():
    rng = np.random.default_rng(4)
    M, N = 24, 50
    q, k, v = random_problem(rng, batch=(2, 3), M=M, N=N, Hq=4, Hk=2, D=16)
    layout = jb.BlockSparseLayout.from_block_mask(random_mask(rng, (), 3, 7, 0.6), (8, 8), (M, N))
    check_forward(q, k, v, layout, kv_lens=jnp.asarray([[50, 13, 1], [29, 0, 44]]))
    check_forward(q, k, v, layout, kv_lens=jnp.asarray([[21], [37]]))  # (2, 1): per outer batch element
    check_forward(q, k, v, layout, kv_lens=19)  # one length for all


def test_cache_past_the_lengths_never_read():
    """Keys and values past each length may hold anything (an unwritten cache): inf and NaN there change nothing,
    in the output or the gradients (whose entries there are 0)."""
    rng = np.random.default_rng(5)
    M, N, lens = 16, 80, jnp.asarray([33, 64])
    q, k, v = random_problem(rng, batch=(2,), M=M, N=N, Hq=4, Hk=1, D=16)
    layout = jb.BlockSparseLayout.from_block_mask(np.ones((2, 5), bool), (8, 16), (M, N))
    past = (jnp.arange(N)[None, :] >= lens[:, None])[..., None, None]
    kg, vg = jnp.where(past, jnp.nan, k), jnp.where(past, jnp.inf, v)

    def loss(k, v):
        return jnp.sum(jb.block_sparse_attention(q, k, v, layout, kv_lens=lens) ** 2)

    np.testing.assert_array_equal(jb.block_sparse_attention(q, kg, vg, layout, kv_lens=lens),
                                  jb.block_sparse_attention(q, k, v, layout, kv_lens=lens))
    dk, dv = jax.grad(loss, argnums=(0, 1))(kg, vg)
    dk0, dv0 = jax.grad(loss, argnums=(0, 1))(k, v)
    np.testing.assert_array_equal(dk, dk0)
    np.testing.assert_array_equal(dv, dv0)
    assert not np.asarray(jnp.where(past, dk, 0) != 0).any() and not np.asarray(jnp.where(past, dv, 0) != 0).any()


def test_whole_blocks_same_as_the_layout_without_them():
    """Lengths on block boundaries: exactly the op on the layout without the blocks past them (no dense part
    contributes, and the merge with an empty part is exact)."""
    rng = np.random.default_rng(6)
    M, N, C = 32, 96, 16
    q, k, v = random_problem(rng, batch=(2,), M=M, N=N, Hq=4, Hk=2, D=16)
    mask = random_mask(rng, (2, 2), 4, 6, 0.7)
    layout = jb.BlockSparseLayout.from_block_mask(mask, (8, C), (M, N))
    lens = np.array([48, 96])
    cut = jb.BlockSparseLayout.from_block_mask(mask & (np.arange(6) < lens[:, None, None, None] // C), (8, C), (M, N))
    o, lse = jb.block_sparse_attention(q, k, v, layout, kv_lens=jnp.asarray(lens), return_lse=True)
    o2, lse2 = jb.block_sparse_attention(q, k, v, cut, return_lse=True)
    np.testing.assert_array_equal(o, o2)
    np.testing.assert_array_equal(lse, lse2)


def test_edges():
    """Length 0: every row empty (o = 0, lse = -inf). Lengths past N or negative are clipped to [0, N]."""
    rng = np.random.default_rng(7)
    M, N = 8, 30
    q, k, v = random_problem(rng, batch=(3,), M=M, N=N, Hq=2, Hk=1, D=8)
    layout = jb.BlockSparseLayout.from_block_mask(np.ones((2, 4), bool), (4, 8), (M, N))
    o, lse = jb.block_sparse_attention(q, k, v, layout, kv_lens=jnp.asarray([0, 1000, -5]), return_lse=True)
    assert (np.asarray(o[0]) == 0).all() and (np.asarray(lse[0]) == -np.inf).all()
    assert (np.asarray(o[2]) == 0).all() and (np.asarray(lse[2]) == -np.inf).all()
    full = jb.block_sparse_attention(q, k, v, layout, return_lse=True)
    np.testing.assert_allclose(o[1], full[0][1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lse[1], full[1][1], rtol=1e-6, atol=1e-6)
    o64 = jb.block_sparse_attention(q, k, v, layout, kv_lens=np.array([0, 2**40, -2**40], np.int64))
    np.testing.assert_array_equal(o64, o)


def test_cut_block_listed_twice():
    """A traced layout that lists the cut block twice in a block row counts it twice there, as the kernels count
    any block listed twice (the reference's semantics)."""
    rng = np.random.default_rng(8)
    M, N = 16, 64
    q, k, v = random_problem(rng, batch=(2,), M=M, N=N, Hq=2, Hk=1, D=16)
    indptr = jnp.asarray([0, 4, 6], jnp.int32)
    indices = jnp.asarray([0, 2, 2, 1, 3, 2], jnp.int32)  # block row 0 lists column 2 twice
    layout = jb.BlockSparseLayout(indptr, indices, (8, 16), (M, N), validate=False)
    _check(q, k, v, layout, kv_lens=jnp.asarray([40, 64]))


def test_traced_under_jit_and_vmap():
    rng = np.random.default_rng(9)
    M, N = 16, 48
    q, k, v = random_problem(rng, batch=(4,), M=M, N=N, Hq=4, Hk=2, D=16)
    layout = jb.BlockSparseLayout.from_block_mask(random_mask(rng, (), 2, 6, 0.7), (8, 8), (M, N))
    lens = jnp.asarray([48, 5, 30, 17])
    want = reference(q, k, v, layout, kv_lens=lens)
    got = jax.jit(lambda q, k, v, n: jb.block_sparse_attention(q, k, v, layout, kv_lens=n))(q, k, v, lens)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    one = jax.vmap(lambda q, k, v, n: jb.block_sparse_attention(q, k, v, layout, kv_lens=n))(q, k, v, lens)
    np.testing.assert_allclose(one, want, rtol=2e-5, atol=2e-5)


def test_bad_kv_lens():
    rng = np.random.default_rng(10)
    q, k, v = random_problem(rng, batch=(2,), M=8, N=16, Hq=2, Hk=1, D=8)
    layout = jb.BlockSparseLayout.from_block_mask(np.ones((1, 2), bool), (8, 8), (8, 16))
    with pytest.raises(TypeError, match="kv_lens"):
        jb.block_sparse_attention(q, k, v, layout, kv_lens=jnp.asarray([3.0, 4.0]))
    with pytest.raises(ValueError, match="kv_lens"):
        jb.block_sparse_attention(q, k, v, layout, kv_lens=jnp.asarray([3, 4, 5]))
    with pytest.raises(ValueError, match="kv_lens"):
        jb.block_sparse_attention(q[0], k[0], v[0], layout, kv_lens=jnp.asarray([3]))
    with pytest.raises(TypeError, match="kv_lens"):
        jb.block_sparse_attention(q, k, v, layout, kv_lens="long")


def test_one_kernel_call_each_way():
    """kv_lens goes to the kernels: a training step is one forward and one backward kernel call (the lengths an
    operand of both), with no lax.cond (on a GPU a conditional waits for the device: a host round trip a step)."""
    q, k, v = random_problem(np.random.default_rng(11), batch=(2,), M=1, N=64, Hq=4, Hk=2, D=16)
    layout = jb.BlockSparseLayout.from_block_mask(np.ones((1, 4), bool), (1, 16), (1, 64))
    lens = jnp.asarray([40, 64])
    fwd = lambda q, k, v, n: jb.block_sparse_attention(q, k, v, layout, kv_lens=n)
    grad = jax.grad(lambda *a: jnp.sum(fwd(*a)), argnums=(0, 1, 2))
    for f, calls in ((fwd, {"bsattn_fwd_cpu": 1, "bsattn_bwd_cpu": 0}), (grad, {"bsattn_fwd_cpu": 1, "bsattn_bwd_cpu": 1})):
        text = jax.jit(f).lower(q, k, v, lens).as_text()
        assert "stablehlo.case" not in text and "stablehlo.while" not in text
        for target, n in calls.items():
            assert len(custom_call_lines(text, target)) == n, target


@pytest.mark.parametrize("causal", [False, True])
def test_non_finite_below_the_length(causal):
    """An inf in k inside the cut block below the length: NaN in the same gradient entries as the reference (the rows
    that list the block, not the others), finite values alike elsewhere. An inf in q also meets the zeros of its row's
    saturated or -inf scores (0 x inf), which the kernels' p (dp - delta) and the reference's autodiff place
    differently (as without kv_lens, test_forward.py): there the values are compared where neither is NaN."""
    rng = np.random.default_rng(12)
    M, N, R, C = 32, 32, 8, 16
    q, k, v = random_problem(rng, batch=(1,), M=M, N=N, Hq=2, Hk=1, D=8)
    mask = np.ones((4, 2), bool)
    mask[0, 1] = mask[2, 1] = False  # block rows 0 and 2 do not list the cut column
    layout = jb.BlockSparseLayout.from_block_mask(mask, (R, C), (M, N))
    lens = jnp.asarray([20])  # cuts column 1 at key 20
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    for kk, qq, same_nans in ((k.at[0, 18].set(jnp.inf), q, True), (k, q.at[0, 3].set(jnp.inf), False)):
        def grads(fn):
            loss = lambda q, k, v: jnp.sum(fn(q, k, v, layout, kv_lens=lens, causal=causal) * ct)
            return jax.grad(loss, argnums=(0, 1, 2))(qq, kk, v)
        for got, want in zip(grads(jb.block_sparse_attention), grads(reference)):
            got, want = np.asarray(got), np.asarray(want)
            if same_nans:
                np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            fine = np.isfinite(want) & ~np.isnan(got)
            assert fine.mean() >= 0.25  # (not a vacuous comparison)
            np.testing.assert_allclose(got[fine], want[fine], rtol=2e-4, atol=2e-5)


def test_lengths_of_any_integer_type():
    """uint32 past 2^31, int64 far below 0, Python ints past int64: clipped to [0, N], in the op and the reference."""
    rng = np.random.default_rng(13)
    M, N = 8, 30
    q, k, v = random_problem(rng, batch=(2,), M=M, N=N, Hq=2, Hk=1, D=8)
    layout = jb.BlockSparseLayout.from_block_mask(np.ones((1, 4), bool), (8, 8), (M, N))
    want = reference(q, k, v, layout, kv_lens=jnp.asarray([30, 0]))
    for lens in (jnp.asarray([2**31 + 5, 0], jnp.uint32), np.array([2**40, -2**40], np.int64), [2**70, -2**70]):
        np.testing.assert_allclose(jb.block_sparse_attention(q, k, v, layout, kv_lens=lens), want, rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(reference(q, k, v, layout, kv_lens=lens), want, rtol=1e-6, atol=1e-7)
    for lens, n in ((2**70, 30), (-2**70, 0)):  # a scalar past int64 (a 0-d object array, once a crash)
        want = reference(q, k, v, layout, kv_lens=jnp.asarray([n, n]))
        np.testing.assert_allclose(jb.block_sparse_attention(q, k, v, layout, kv_lens=lens), want, rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(reference(q, k, v, layout, kv_lens=lens), want, rtol=1e-6, atol=1e-7)


def test_drop_blocks_past_lengths():
    """The CUDA lowering's live row lists (live_blocks): per batch element, each row keeps its entries with a key below
    the length, in order, also with garbage indices (negative, >= NB) and shared or per-batch layouts."""
    from jax_bsattn.live_blocks import drop_blocks_past_lengths
    rng = np.random.default_rng(14)
    MB, NB, C, N, nnz = 6, 9, 5, 43, 40
    for LB, LH in ((1, 1), (3, 2)):
        ends = np.sort(rng.integers(0, nnz + 1, size=(LB, LH, MB - 1)), axis=-1)
        indptr = np.concatenate([np.zeros((LB, LH, 1), int), ends, np.full((LB, LH, 1), nnz - 3)], -1)
        indices = rng.integers(-2, NB + 2, size=(LB, LH, nnz))
        lens = np.array([43, 17, 0] if LB == 3 else [43, 15, 16, 1, -4, 99])
        ip, ix = (np.asarray(x) for x in jax.jit(drop_blocks_past_lengths, static_argnums=(3, 4))(
            jnp.asarray(indptr, jnp.int32), jnp.asarray(indices, jnp.int32), jnp.asarray(lens, jnp.int32), C, N))
        assert ip.shape == (len(lens), LH, MB + 1) and ix.shape == (len(lens), LH, nnz)
        for b, n in enumerate(np.clip(lens, 0, N)):
            for h in range(LH):
                src_ip, src_ix = indptr[b % LB, h], indices[b % LB, h]
                for r in range(MB):
                    row = src_ix[src_ip[r]:src_ip[r + 1]]
                    want = row[(row >= 0) & (row < NB) & (row * C < n)]
                    np.testing.assert_array_equal(ix[b, h, ip[b, h, r]:ip[b, h, r + 1]], want)
                assert (ix[b, h, ip[b, h, -1]:] == -1).all()


def test_live_lists_only_where_small(monkeypatch):
    """The lowering builds the live row lists only where they stay within a quarter of q's bytes or the layout's own
    size: a layout shared over a large batch keeps the masked path instead of growing B-fold."""
    from jax_bsattn.live_blocks import drops_dead_blocks
    monkeypatch.delenv("BSATTN_KV_LIVE_LISTS", raising=False)

    def arr(shape, dtype=np.int32):  # shapes only: no memory behind them
        return np.broadcast_to(np.zeros((), dtype), shape)

    q = arr((64, 4096, 32, 128), np.float16)  # 2 GiB: lists of up to 512 MiB are built
    lens = arr((64,))
    shared_small = (arr((1, 1, 257)), arr((1, 1, 4096)))  # 64 * 4353 words: lists built
    shared_large = (arr((1, 8, 4097)), arr((1, 8, 2 ** 20)))  # 64 * 8 * ~2^20 words = 2 GiB: masked
    per_batch = (arr((64, 8, 4097)), arr((64, 8, 2 ** 20)))   # as large, but the layout's own size: built
    assert drops_dead_blocks(lens, *shared_small, q)
    assert not drops_dead_blocks(lens, *shared_large, q)
    assert drops_dead_blocks(lens, *per_batch, q)
    assert not drops_dead_blocks(arr((0,)), *shared_small, q)                   # no kv_lens
    assert not drops_dead_blocks(lens, arr((1, 1, 257)), arr((1, 1, 0)), q)   # empty layout
    monkeypatch.setenv("BSATTN_KV_LIVE_LISTS", "0")
    assert not drops_dead_blocks(lens, *shared_small, q)
