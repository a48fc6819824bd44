"""jax_bsattn.layouts: every builder against a direct NumPy construction of its block mask (an element mask
reduced block by block), combinations, from_topk under jit and grad, and BlockSparseLayout.plot."""

import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bsattn as jb
from jax_bsattn import layouts as L
from jax_bsattn.reference import block_sparse_attention_reference as ref
from conftest import random_problem

# (seq_lens, block_size): square, ragged with R != C, M > N, M < N.
GEOMETRIES = [((64, 64), (8, 8)), ((37, 50), (5, 7)), ((50, 37), (7, 5)), ((24, 61), (8, 16))]


def expected_blocks(seq_lens, block_size, wanted):
    """``[MB, NB]``: blocks holding an element (i, j) with ``wanted(i, j, d)``, ``d = i + N - M - j``."""
    (M, N), (R, C) = seq_lens, block_size
    i, j = np.arange(M)[:, None], np.arange(N)[None, :]
    dense = np.broadcast_to(wanted(i, j, i + (N - M) - j), (M, N))
    MB, NB = math.ceil(M / R), math.ceil(N / C)
    padded = np.zeros((MB * R, NB * C), bool)
    padded[:M, :N] = dense
    return padded.reshape(MB, R, NB, C).any(axis=(1, 3))


def mask_of(layout):
    return np.asarray(layout.to_block_mask())


@pytest.mark.parametrize("seq_lens,block_size", GEOMETRIES)
def test_band_builders(seq_lens, block_size):
    def check(layout, wanted):
        assert layout.seq_lens == seq_lens and layout.block_size == block_size
        np.testing.assert_array_equal(mask_of(layout), expected_blocks(seq_lens, block_size, wanted))

    check(L.block_causal(seq_lens, block_size), lambda i, j, d: d >= 0)
    for w in (1, 9, 20):
        check(L.sliding_window(seq_lens, block_size, w), lambda i, j, d: (d >= 0) & (d < w))
        check(L.sliding_window(seq_lens, block_size, w, causal=False), lambda i, j, d: np.abs(d) < w)


@pytest.mark.parametrize("seq_lens,block_size", GEOMETRIES)
def test_windows_and_strides_past_the_sequences(seq_lens, block_size):
    """A window or stride of max(M, N) tokens or more (2^63, 2^70 too: no int64 overflow) lists what max(M, N) does:
    every block (causally, for a causal window; a stride that large leaves the diagonal and, local, everything)."""
    edge = max(seq_lens)
    for big in (edge + 1, 2**63, 2**70):
        for causal in (True, False):
            want = mask_of(L.sliding_window(seq_lens, block_size, edge, causal=causal))
            np.testing.assert_array_equal(mask_of(L.sliding_window(seq_lens, block_size, big, causal=causal)), want)
            np.testing.assert_array_equal(want, expected_blocks(seq_lens, block_size,
                                                                lambda i, j, d: d >= 0 if causal else d == d))
            for local in (True, False):
                want = mask_of(L.strided(seq_lens, block_size, edge, causal=causal, local=local))
                got = mask_of(L.strided(seq_lens, block_size, big, causal=causal, local=local))
                np.testing.assert_array_equal(got, want)
            want = mask_of(L.global_local(seq_lens, block_size, edge, 0, causal=causal))
            np.testing.assert_array_equal(mask_of(L.global_local(seq_lens, block_size, big, 0, causal=causal)), want)


@pytest.mark.parametrize("seq_lens,block_size", GEOMETRIES)
def test_strided(seq_lens, block_size):
    for s in (3, 16):
        for causal in (True, False):
            for local in (True, False):
                def wanted(i, j, d):
                    ok = (d % s == 0) | (local & (np.abs(d) < s))
                    return ok & (d >= 0) if causal else ok
                got = mask_of(L.strided(seq_lens, block_size, s, causal=causal, local=local))
                np.testing.assert_array_equal(got, expected_blocks(seq_lens, block_size, wanted), (s, causal, local))


@pytest.mark.parametrize("seq_lens,block_size", GEOMETRIES)
def test_global_local(seq_lens, block_size):
    # (window 0: the global tokens alone, where a causal global token's blocks once took d >= 0 anywhere in the
    # block for d >= 0 on the token's own row or column, listing blocks no element of the pattern is in)
    for w in (6, 0):
        for glob, causal in [(1, False), (3, True), ([0, 17, 30], False), ([5, 33], True), (0, False), ([0, 9], True)]:
            positions = np.arange(glob) if isinstance(glob, int) else np.asarray(glob)

            def wanted(i, j, d):  # (token t: key t, query row t - (N - M); i's token is d + j)
                is_global = np.isin(d + j, positions) | np.isin(j, positions)
                if causal:
                    return ((d >= 0) & (d < w)) | (is_global & (d >= 0))
                return (np.abs(d) < w) | is_global

            got = mask_of(L.global_local(seq_lens, block_size, w, glob, causal=causal))
            np.testing.assert_array_equal(got, expected_blocks(seq_lens, block_size, wanted), (w, glob, causal))


def test_random_layouts():
    seq_lens, bs = (64, 80), (8, 8)
    lay = L.random(seq_lens, bs, 3, seed=1, batch_shape=(2, 4))
    m = mask_of(lay)
    assert lay.batch_shape == (2, 4) and m.shape == (2, 4, 8, 10)
    assert (m.sum(-1) == 3).all()
    assert not (m[0, 0] == m[1, 3]).all()                       # independent draws
    np.testing.assert_array_equal(mask_of(L.random(seq_lens, bs, 3, seed=1, batch_shape=(2, 4))), m)
    assert not (mask_of(L.random(seq_lens, bs, 3, seed=2, batch_shape=(2, 4))) == m).all()
    causal = mask_of(L.random((64, 64), bs, 3, seed=0, causal=True))
    allowed = expected_blocks((64, 64), bs, lambda i, j, d: d >= 0)
    assert not (causal & ~allowed).any()
    np.testing.assert_array_equal(causal.sum(-1), np.minimum(3, allowed.sum(-1)))


def test_union_intersection_per_head():
    seq_lens, bs = (37, 50), (5, 7)
    a, b = L.sliding_window(seq_lens, bs, 8), L.strided(seq_lens, bs, 12, local=False)
    c = L.random(seq_lens, bs, 2, batch_shape=(3,))
    np.testing.assert_array_equal(mask_of(L.union(a, b)), mask_of(a) | mask_of(b))
    np.testing.assert_array_equal(mask_of(L.intersection(a, b)), mask_of(a) & mask_of(b))
    np.testing.assert_array_equal(mask_of(L.union(a, b, c)), mask_of(a) | mask_of(b) | mask_of(c))  # broadcast
    # Traced layouts give the same blocks under jit.
    traced = jax.jit(lambda a, c: L.union(a, c))(a, c)
    np.testing.assert_array_equal(mask_of(traced), mask_of(a) | mask_of(c))
    traced = jax.jit(lambda a, c: L.intersection(a, c))(a, c)
    np.testing.assert_array_equal(mask_of(traced), mask_of(a) & mask_of(c))
    mixed = L.per_head([a, b, a])
    assert mixed.batch_shape == (3,)
    for h, want in enumerate((a, b, a)):
        np.testing.assert_array_equal(mask_of(mixed)[h], mask_of(want))
    with pytest.raises(ValueError, match="differ"):
        L.union(a, L.block_causal(seq_lens, (5, 5)))


def test_per_head_layout_in_attention():
    rng = np.random.default_rng(3)
    M = N = 48
    q, k, v = random_problem(rng, batch=(2,), M=M, N=N, Hq=4, Hk=2, D=16)
    layout = L.per_head([L.sliding_window(M, 8, 12), L.strided(M, 8, 16)])
    got = jax.jit(lambda q, k, v: jb.block_sparse_attention(q, k, v, layout, causal=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref(q, k, v, layout, causal=True)), rtol=1e-4, atol=1e-5)


def test_from_topk_concrete():
    rng = np.random.default_rng(0)
    seq_lens, bs = (40, 48), (8, 8)
    scores = rng.standard_normal((3, 5, 6)).astype(np.float32)
    scores[0, 1, :] = -np.inf                                    # nothing to choose
    scores[1, 2, 3:] = -np.inf                                   # only 3 choosable
    lay = L.from_topk(scores, 4, seq_lens=seq_lens, block_size=bs)
    assert lay.nnz == 5 * 4 and lay.batch_shape == (3,)
    want = np.zeros(scores.shape, bool)
    finite = np.isfinite(scores)
    order = np.argsort(-np.where(finite, scores, -np.inf), axis=-1, kind="stable")[..., :4]
    np.put_along_axis(want, order, True, axis=-1)
    np.testing.assert_array_equal(mask_of(lay), want & finite)
    causal = mask_of(L.from_topk(scores, 4, seq_lens=seq_lens, block_size=bs, causal=True))
    assert not (causal & ~expected_blocks(seq_lens, bs, lambda i, j, d: d >= 0)).any()
    with pytest.raises(ValueError, match="expected"):
        L.from_topk(scores, 4, seq_lens=(64, 64), block_size=bs)
    # a NaN score is never chosen (top_k ranks NaN first), as -inf; nested lists are taken as arrays
    nan = scores.copy()
    nan[2, 0, np.argmax(scores[2, 0])] = np.nan
    got = mask_of(L.from_topk(nan.tolist(), 4, seq_lens=seq_lens, block_size=bs))
    as_inf = np.where(np.isnan(nan), -np.inf, nan)
    want = np.zeros(scores.shape, bool)
    np.put_along_axis(want, np.argsort(-as_inf, axis=-1, kind="stable")[..., :4], True, axis=-1)
    np.testing.assert_array_equal(got, want & np.isfinite(as_inf))
    assert got[2, 0].sum() == 4
    # under checkify's index checks (the compaction once scattered the unused entries out of bounds: an error there)
    from jax.experimental import checkify
    err, (ip, ix) = checkify.checkify(
        lambda s: (lambda l: (l.indptr, l.indices))(L.from_topk(s, 4, seq_lens=seq_lens, block_size=bs)),
        errors=checkify.index_checks)(jnp.asarray(scores))
    err.throw()
    np.testing.assert_array_equal(np.asarray(ip), np.asarray(lay.indptr))
    np.testing.assert_array_equal(np.asarray(ix), np.asarray(lay.indices))


def test_from_topk_routing_under_jit_with_grad():
    """MoBA-style: each query block attends its top-2 key blocks by mean-pooled score, plus its own block."""
    rng = np.random.default_rng(1)
    M = N = 64
    R = 8
    q, k, v = random_problem(rng, batch=(2,), M=M, N=N, Hq=4, Hk=2, D=16)

    def routed(fn, q, k, v):
        qb = q.reshape(2, M // R, R, 2, 2, 16).mean((2, 4))                # [B, MB, Hk, D]
        kb = k.reshape(2, N // R, R, 2, 16).mean(2)                       # [B, NB, Hk, D]
        scores = jnp.einsum("bmhd,bnhd->bhmn", qb, kb) + jnp.where(jnp.eye(M // R, dtype=bool), jnp.inf, 0.0)
        layout = L.from_topk(scores, 3, seq_lens=(M, N), block_size=R, causal=True)   # per (batch, KV head)
        return fn(q, k, v, layout, causal=True)

    got = jax.jit(lambda q, k, v: routed(jb.block_sparse_attention, q, k, v))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(routed(ref, q, k, v)), rtol=1e-4, atol=1e-5)
    loss = lambda fn: (lambda q, k, v: jnp.sum(jnp.sin(routed(fn, q, k, v))))
    g = jax.jit(jax.grad(loss(jb.block_sparse_attention), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_builders_are_fast_for_long_sequences():
    t0 = time.perf_counter()
    lay = L.block_causal(1 << 17, 64)                             # MB = 2048, 2.1M blocks listed
    win = L.sliding_window(1 << 17, 64, 4096)
    assert lay.nnz == 2048 * 2049 // 2
    assert win.nnz == sum(min(r + 1, 65) for r in range(2048))     # 4096 / 64 + 1 blocks per full row
    assert time.perf_counter() - t0 < 5


def test_argument_errors():
    with pytest.raises(ValueError, match="window"):
        L.sliding_window(64, 8, 0)
    with pytest.raises(ValueError, match="stride"):
        L.strided(64, 8, 0)
    with pytest.raises(ValueError, match="block_size"):
        L.block_causal(64, 0)
    with pytest.raises(ValueError, match="k must be"):
        L.from_topk(jnp.zeros((8, 8)), 9, seq_lens=64, block_size=8)
    with pytest.raises(TypeError, match="scores must be real"):
        L.from_topk(jnp.zeros((8, 8), jnp.complex64), 2, seq_lens=64, block_size=8)
    for bad in ((8.9, 8), ("8", 8), (True, 8), True):  # sizes are integers, never truncated
        with pytest.raises(TypeError,
                           match=r"block_size must be a pair of integers \(or one for both\), got \(?(True|8\.9|'8')"):
            L.block_causal(64, bad)
    for call, name in ((lambda: L.sliding_window(64, 8, 1.9), "window"), (lambda: L.strided(64, 8, "4"), "stride"),
                       (lambda: L.random(64, 8, 2.5), "blocks_per_row"), (lambda: L.global_local(64, 8, 0, [3.7]),
                                                                          "global token position"),
                       (lambda: L.from_topk(jnp.zeros((8, 8)), 2.0, seq_lens=64, block_size=8), "k"),
                       (lambda: jb.BlockSparseLayout.from_block_mask(np.ones((8, 8), bool), (8, 8), (64, 64), nnz=70.5), "nnz")):
        with pytest.raises(TypeError, match=f"{name} must be an integer"):
            call()
    # concrete NumPy / JAX integers are integers
    assert L.block_causal(jnp.int32(64), jnp.asarray([8, 8])).block_size == (8, 8)
    assert L.block_causal(np.int64(64), (np.int32(8), 8)).seq_lens == (64, 64)
    # one integer for both, in the builders and the constructors alike
    causal = L.block_causal(64, 8)
    for lay in (jb.BlockSparseLayout.from_block_mask(mask_of(causal), np.int32(8), 64),
                jb.BlockSparseLayout.from_csr(causal.indptr, causal.indices, 8, np.int64(64))):
        assert (lay.block_size, lay.seq_lens) == ((8, 8), (64, 64))
        np.testing.assert_array_equal(mask_of(lay), mask_of(causal))
    with pytest.raises(TypeError, match="seq_lens must be a pair of integers"):
        L.block_causal((64.5, 64), 8)
    with pytest.raises(ValueError, match="at most 2"):
        L.block_causal(64, (8, 1 << 31))
    two, three = L.random(64, 8, 2, batch_shape=(2,)), L.random(64, 8, 2, batch_shape=(3,))
    for combine in (L.per_head, lambda ls: L.union(*ls)):
        with pytest.raises(ValueError, match=r"batch shapes \[\(2,\), \(3,\)\] do not broadcast"):
            combine([two, three])


def test_global_local_token_positions():
    """Positions are tokens: key t and query row t - (N - M), so a decoding step (M = 1) with a CLS token sees the CLS
    key without becoming a global row; any iterable of positions; each in [0, N)."""
    decode = mask_of(L.global_local((1, 64), (1, 8), 8, 1, causal=True))
    np.testing.assert_array_equal(decode, [[1, 0, 0, 0, 0, 0, 0, 1]])
    want = mask_of(L.global_local(64, 8, 0, [0, 17]))
    for positions in ({0, 17}, (t for t in (0, 17)), np.array([[0], [17]]), range(0, 18, 17)):
        np.testing.assert_array_equal(mask_of(L.global_local(64, 8, 0, positions)), want)
    for bad, exc, match in ((64, ValueError, r"global_tokens \(a count\) must be in \[0, N\] = \[0, 50\]"),
                            ([3, 50], ValueError, r"positions must be in \[0, N\) = \[0, 50\), got 50"),
                            ([2**70], ValueError, r"positions must be in \[0, N\) = \[0, 50\), got 118059162"),
                            ("0", TypeError, "global_tokens must be a count or token positions"),
                            (2.5, TypeError, "global_tokens must be a count or token positions")):
        with pytest.raises(exc, match=match):
            L.global_local((64, 50), 8, 0, bad)
    with pytest.raises(ValueError, match="window must be >= 0"):
        L.global_local(64, 8, -5)


def test_builder_switches_and_seeds_are_checked():
    for call, name in ((lambda: L.sliding_window(64, 8, 4, causal="no"), "causal"),
                       (lambda: L.strided(64, 8, 4, local=1), "local"),
                       (lambda: L.global_local(64, 8, 4, causal=None), "causal"),
                       (lambda: L.random(64, 8, 2, causal="no"), "causal"),
                       (lambda: L.from_topk(jnp.zeros((8, 8)), 2, seq_lens=64, block_size=8, causal=0), "causal")):
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            call()
    with pytest.raises(TypeError, match="seed must be an integer"):
        L.random(64, 8, 2, seed=1.5)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        L.random(64, 8, 2, seed=-1)
    with pytest.raises(TypeError, match="batch_shape must be a sequence of integers"):
        L.random(64, 8, 2, batch_shape=3)
    np.testing.assert_array_equal(mask_of(L.sliding_window(64, 8, 4, causal=np.bool_(False))),
                                  mask_of(L.sliding_window(64, 8, 4, causal=False)))


def test_size_errors_name_the_call():
    with pytest.raises(ValueError, match="union: nnz=3 is smaller than the 36 blocks the union lists"):
        L.union(L.block_causal(64, 8), nnz=3)
    with pytest.raises(TypeError, match="k must be a concrete"):
        jax.jit(lambda k: L.from_topk(jnp.zeros((8, 8)), k, seq_lens=64, block_size=8))(2)


def test_zero_size_batch_of_layouts():
    """A per-batch layout for an empty batch: built, viewed and used like any other."""
    for kw in ({}, dict(nnz=3)):
        lay = jb.BlockSparseLayout.from_block_mask(np.zeros((0, 1, 4, 4), bool), (8, 8), (32, 32), **kw)
        assert lay.batch_shape == (0, 1) and lay.block_counts().shape == (0, 1, 4, 4)
    q = jnp.ones((0, 32, 2, 16))
    assert jb.block_sparse_attention(q, q, q, lay).shape == (0, 32, 2, 16)
    csr = jb.BlockSparseLayout.from_csr(np.zeros((0, 5), np.int32), np.zeros((0, 2), np.int32), (8, 8), (32, 32))
    assert csr.batch_shape == (0,)


def test_plot_returns_a_figure(monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lay = L.per_head([L.sliding_window((37, 50), (5, 7), 10), L.block_causal((37, 50), (5, 7))])
    fig = lay.plot(1)
    assert isinstance(fig, matplotlib.figure.Figure)
    image = fig.axes[0].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(image), mask_of(lay)[1])
    plt.close(fig)
    fig, ax = plt.subplots()
    assert lay.plot(ax=ax, title="x") is fig and ax.get_title() == "x"
    plt.close(fig)
    with pytest.raises(ValueError, match="more entries than the layout's batch shape"):
        L.block_causal((37, 50), (5, 7)).plot(0)     # (one layout: it once drew a row of the mask)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="needs matplotlib"):
        lay.plot()
