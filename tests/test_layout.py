"""BlockSparseLayout: constructors, validation, views, pytree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bsattn as jb
from conftest import random_mask

R, C, M, N = 5, 7, 37, 50
MB, NB = 8, 8


def test_from_block_mask_round_trip_and_density():
    rng = np.random.default_rng(0)
    mask = random_mask(rng, (2, 3), MB, NB, 0.4)
    lay = jb.BlockSparseLayout.from_block_mask(mask, (R, C), (M, N))
    assert lay.batch_shape == (2, 3) and lay.nnz == mask.reshape(6, -1).sum(-1).max()
    assert (np.asarray(lay.to_block_mask()) == mask).all()
    assert lay.density == pytest.approx(mask.mean())
    dense = np.asarray(lay.to_dense_mask())
    assert dense.shape == (2, 3, M, N)
    i, j = 36, 49
    assert dense[1, 2, i, j] == mask[1, 2, i // R, j // C]


def test_from_csr_matches_flashinfer_arrays():
    indptr = np.array([0, 2, 2, 3, 3, 3, 3, 3, 4])
    indices = np.array([1, 5, 0, 7])
    lay = jb.BlockSparseLayout.from_csr(indptr, indices, (R, C), (M, N))
    bm = np.asarray(lay.to_block_mask())
    assert bm[0, 1] and bm[0, 5] and bm[2, 0] and bm[7, 7] and bm.sum() == 4
    assert lay.indptr.dtype == jnp.int32 and lay.indices.dtype == jnp.int32


def test_traced_from_block_mask_matches_concrete():
    rng = np.random.default_rng(1)
    mask = random_mask(rng, (3,), MB, NB, 0.3)
    traced = jax.jit(lambda m: jb.BlockSparseLayout.from_block_mask(m, (R, C), (M, N), nnz=40))(mask)
    assert traced.nnz == 40
    assert (np.asarray(traced.to_block_mask()) == mask).all()
    assert (np.asarray(jax.jit(lambda m: jb.BlockSparseLayout.from_block_mask(m, (R, C), (M, N))
                               .to_block_mask())(mask)) == mask).all()


def test_pytree_leaves_and_static_part():
    lay = jb.BlockSparseLayout.from_block_mask(np.eye(MB, NB, dtype=bool), (R, C), (M, N))
    leaves, treedef = jax.tree_util.tree_flatten(lay)
    assert len(leaves) == 2
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.block_size == (R, C) and back.seq_lens == (M, N)
    doubled = jax.tree_util.tree_map(lambda x: x, lay)
    assert (np.asarray(doubled.indices) == np.asarray(lay.indices)).all()


@pytest.mark.parametrize("indptr,indices,match", [
    ([1, 2, 2, 3, 3, 3, 3, 3, 3], [0, 1, 2], "start at 0"),
    ([0, 2, 1, 3, 3, 3, 3, 3, 3], [0, 1, 2], r"never decrease; it does at position \(1,\)$"),
    ([0, 2, 2, 3, 3, 3, 3, 3, 4], [0, 1, 2], "exceeds nnz"),
    ([0, 2, 2, 3, 3, 3, 3, 3, 3], [0, 8, 2], r"\[0, NB\) = \[0, 8\); indices\[1\] = 8$"),
    ([0, 2, 2, 3, 3, 3, 3, 3, 3], [0, -1, 2], r"\[0, NB\)"),
    ([0, 2, 2, 3, 3, 3, 3, 3, 3], [4, 4, 2], "more than once"),
    ([0, 2, 2, 3, 3, 3, 3], [0, 1, 2], "MB \\+ 1"),
])
def test_concrete_validation(indptr, indices, match):
    """(The positions print as plain ints: NumPy 2's repr once made them np.int64(1).)"""
    with pytest.raises(ValueError, match=match):
        jb.BlockSparseLayout.from_csr(np.array(indptr), np.array(indices), (R, C), (M, N))


def test_concrete_validation_names_the_layout_plainly():
    with pytest.raises(ValueError, match=r"in layout \(1,\)$"):
        jb.BlockSparseLayout.from_csr(np.array([[0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 2, 2, 3, 3, 3, 3, 3, 3]]),
                                      np.array([[0, 0, 0], [4, 4, 2]]), (R, C), (M, N))


def test_constructor_argument_errors():
    with pytest.raises(ValueError, match="block_size"):
        jb.BlockSparseLayout.from_csr(np.zeros(2), np.zeros(0), (0, 4), (4, 4))
    with pytest.raises(TypeError, match="indptr must hold integers"):
        jb.BlockSparseLayout.from_csr(np.zeros(2, np.float32), np.zeros(0, np.int32), (4, 4), (4, 4))
    with pytest.raises(ValueError, match="leading"):
        jb.BlockSparseLayout.from_csr(np.zeros((2, 2), np.int32), np.zeros((3, 1), np.int32), (4, 4), (4, 4))
    with pytest.raises(ValueError, match=r"block_mask has shape"):
        jb.BlockSparseLayout.from_block_mask(np.ones((3, 3), bool), (R, C), (M, N))
    with pytest.raises(ValueError, match="nnz=2 is smaller"):
        jb.BlockSparseLayout.from_block_mask(np.ones((MB, NB), bool), (R, C), (M, N), nnz=2)


def test_empty_list_of_indices():
    lay = jb.BlockSparseLayout.from_csr([0, 0, 0], [], (4, 4), (8, 8))   # (NumPy reads [] as float64)
    assert lay.nnz == 0 and lay.indices.dtype == jnp.int32 and not np.asarray(lay.block_counts()).any()


def test_traced_int64_indices_past_int32_are_out_of_range_not_wrapped():
    """Under jax_enable_x64 a traced int64 index 2^32 is out of range (skipped), not block column 0."""
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((8, 1, 4)), jnp.float32) for _ in range(2))
    with jax.enable_x64(True):
        def lse(ip, ix):
            return jb.block_sparse_attention(q, k, k, jb.BlockSparseLayout(ip, ix, (4, 4), (8, 8)), return_lse=True)[1]

        got = np.asarray(jax.jit(lse)(jnp.array([0, 1, 2]), jnp.array([2**32, 1])))
    assert np.isneginf(got[:4]).all() and np.isfinite(got[4:]).all(), got


def test_padding_entries_past_indptr_end_are_not_validated():
    lay = jb.BlockSparseLayout.from_csr(np.array([0, 1, 1, 1, 1, 1, 1, 1, 1]), np.array([3, -5, 999]),
                                        (R, C), (M, N))
    assert int(np.asarray(lay.block_counts()).sum()) == 1


def test_checkify_check_of_traced_layouts():
    from jax.experimental import checkify

    bad = (np.array([0, 2, 1, 3, 3, 3, 3, 3, 3], np.int32), np.array([0, 1, 2], np.int32))
    good = (np.array([0, 2, 2, 3, 3, 3, 3, 3, 3], np.int32), np.array([0, 1, 2], np.int32))

    def f(ip, ix):
        jb.check_layout(jb.BlockSparseLayout.from_csr(ip, ix, (R, C), (M, N)))

    checked = jax.jit(checkify.checkify(f))
    assert checked(*good)[0].get() is None
    assert "never decrease" in checked(*bad)[0].get()
    dup = (np.array([0, 2, 2, 3, 3, 3, 3, 3, 3], np.int32), np.array([4, 4, 2], np.int32))
    assert "twice" in checked(*dup)[0].get()
    oob = (np.array([0, 2, 2, 3, 3, 3, 3, 3, 9], np.int32), np.array([4, 9, 2], np.int32))
    assert checked(*oob)[0].get() is not None
    lay = jax.jit(lambda ip, ix: jb.BlockSparseLayout.from_csr(ip, ix, (R, C), (M, N)))(*bad)
    with pytest.raises(Exception, match="never decrease"):
        jb.validate_layout(lay)


def test_column_view_and_order_match_numpy():
    """The CUDA backward's column view (block rows per block column, increasing) and its CTA order (block columns
    by decreasing length, ties in column order), built in XLA, against a plain NumPy construction; stacked
    layouts with padding and out-of-range indices included."""
    from jax_bsattn.column_view import column_order, column_view
    from jax_bsattn.layout import monotone_indptr

    rng = np.random.default_rng(5)
    MB, NB, nnz = 9, 7, 30
    ip = np.sort(rng.integers(0, nnz + 1, size=(3, MB + 1)), axis=1).astype(np.int32)
    ip[:2, 0] = 0            # the third layout starts past entry 0 (its first entries are listed by no row)
    ip[2, MB] = min(ip[2, MB], nnz - 3)
    ix = rng.integers(-2, NB + 2, size=(3, nnz)).astype(np.int32)
    ci, cr = column_view(monotone_indptr(jnp.asarray(ip), nnz), jnp.asarray(ix), NB)
    order = np.asarray(column_order(ci))
    ci, cr = np.asarray(ci), np.asarray(cr)
    assert ip[2, 0] > 0 and ip[2, MB] < nnz
    for l in range(3):
        cols = [[] for _ in range(NB)]
        for r in range(MB):
            for e in range(ip[l, r], ip[l, r + 1]):
                if 0 <= ix[l, e] < NB:
                    cols[ix[l, e]].append(r)
        counts = np.array([len(c) for c in cols])
        np.testing.assert_array_equal(np.diff(ci[l]), counts)
        for c in range(NB):
            np.testing.assert_array_equal(cr[l, ci[l, c]:ci[l, c + 1]], cols[c])
        np.testing.assert_array_equal(order[l], np.argsort(-counts, kind="stable"))


def _walk_order_numpy(cols, MB):
    """The one-pass backward's walk order (column_view.walk_order) in plain NumPy: candidate orders of each column's
    sorted rows, scored by the mean absolute deviation of each block row's ranks."""
    lens = np.array([len(c) for c in cols])
    by_len = np.sort(lens)[::-1]
    cum = np.cumsum(by_len)
    periods = [max(by_len[0], 1), max(by_len[min(np.searchsorted(cum, (cum[-1] + 1) // 2), len(cols) - 1)], 1)]
    cands = [[list(c) for c in cols], [c[::-1] for c in cols]]
    cands += [[sorted(c, key=lambda r, P=P: ((MB - 1 - r) % P, MB - 1 - r)) for c in cols] for P in periods]

    def score(order):
        ranks = {}
        for c in order:
            for k, r in enumerate(c):
                ranks.setdefault(r, []).append(k)
        return sum(np.abs(np.array(v) - np.mean(v)).sum() for v in ranks.values())

    scores = [score(o) for o in cands]
    best = 1 + int(np.argmin(scores[1:]))
    return cands[best] if scores[best] < 0.9 * scores[0] else cands[0]


def test_walk_order_matches_numpy():
    """The walk order of the Hopper one-pass backward's columns: block-causal layouts walk each column from its last
    block row up, band layouts by block row modulo the band, a layout that no candidate improves by 10 % keeps the
    increasing order (an upper triangle); stacked layouts (one choice each), with padding after the listed entries."""
    from jax_bsattn.column_view import column_view, walk_order

    MB = NB = 24
    rng = np.random.default_rng(7)
    masks = [np.tril(np.ones((MB, NB), bool)),                                      # block-causal
             np.array([[0 <= r - c < 5 for c in range(NB)] for r in range(MB)]),     # a band of 5
             rng.random((MB, NB)) < 0.5,                                             # uniform
             np.triu(np.ones((MB, NB), bool))]                                       # upper: kept increasing
    masks[1][:, 0] = True                                                           # + a global column
    nnz = max(int(m.sum()) for m in masks) + 3
    ip = np.zeros((4, MB + 1), np.int32)
    ix = np.zeros((4, nnz), np.int32)
    for l, m in enumerate(masks):
        ip[l, 1:] = np.cumsum(m.sum(1))
        ix[l, :ip[l, -1]] = np.nonzero(m)[1]
    ci, cr = column_view(jnp.asarray(ip), jnp.asarray(ix), NB)
    got = np.asarray(walk_order(ci, cr, MB))
    ci, cr = np.asarray(ci), np.asarray(cr)
    for l in range(4):
        cols = [list(cr[l, ci[l, c]:ci[l, c + 1]]) for c in range(NB)]
        want = _walk_order_numpy(cols, MB)
        for c in range(NB):
            np.testing.assert_array_equal(got[l, ci[l, c]:ci[l, c + 1]], want[c])
        np.testing.assert_array_equal(got[l, ci[l, NB]:], cr[l, ci[l, NB]:])
    assert list(got[0, ci[0, 0]:ci[0, 1]]) == list(range(MB - 1, -1, -1))            # block-causal: from the bottom up
    assert np.array_equal(got[3], cr[3])                                              # upper triangle: as it was
    assert not np.array_equal(got[1], cr[1])
