"""The column view of a layout (for each block column, the block rows that list it), built in XLA.

The backward kernel for dk / dv walks block columns; this builds their lists on the device from the (possibly
traced) row view, with static sizes and no dense mask: O(nnz log nnz) work per layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["column_view", "column_order", "walk_order"]


def column_view(indptr, indices, num_block_cols: int):
    """``indptr [..., MB+1]`` (already monotone, see ``monotone_indptr``), ``indices [..., nnz]`` ->
    ``col_indptr [..., NB+1]``, ``col_rows [..., nnz]``: block column ``c`` is listed by the block rows
    ``col_rows[col_indptr[c]:col_indptr[c+1]]``, in increasing order. Entries of ``indices`` outside the rows'
    ranges or out of ``[0, NB)`` are left out; ``col_rows`` past ``col_indptr[NB]`` is padding (0)."""
    NB = num_block_cols
    lead, nnz = indices.shape[:-1], indices.shape[-1]
    MB = indptr.shape[-1] - 1
    pos = jnp.arange(nnz, dtype=jnp.int32)

    def one(ip, ix):
        # The block row of each entry (the last i with ip[i] <= pos) and each column's first entry (the number of
        # listed entries with a smaller column) as histograms + prefix sums: no binary search, whose while loop
        # costs XLA a kernel launch or more per level.
        starts = jnp.zeros(nnz + 1, jnp.int32).at[jnp.clip(ip, 0, nnz)].add(1)
        row = jnp.cumsum(starts[:nnz]) - 1
        listed = (pos >= ip[0]) & (pos < ip[MB]) & (ix >= 0) & (ix < NB)
        key = jnp.where(listed, ix, NB)                 # unlisted entries sort last
        order = jnp.argsort(key, stable=True)           # stable: rows stay increasing within a column
        per_col = jnp.zeros(NB + 1, jnp.int32).at[key].add(1)
        col_indptr = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(per_col[:NB])])
        rows = jnp.where(key[order] < NB, jnp.clip(row[order], 0, MB - 1), 0)
        return col_indptr.astype(jnp.int32), rows.astype(jnp.int32)

    if nnz == 0:
        return jnp.zeros(lead + (NB + 1,), jnp.int32), jnp.zeros(lead + (0,), jnp.int32)
    ci, cr = jax.vmap(one)(indptr.reshape(-1, MB + 1), indices.reshape(-1, nnz))
    return ci.reshape(lead + (NB + 1,)), cr.reshape(lead + (nnz,))


def column_order(col_indptr):
    """``col_indptr [..., NB+1]`` -> the block columns by decreasing number of block rows (stable), int32
    ``[..., NB]``: the CUDA backward starts the longest columns first, so that its last wave holds the shortest
    (a permutation of ``[0, NB)`` whatever ``col_indptr`` holds)."""
    return jnp.argsort(col_indptr[..., :-1] - col_indptr[..., 1:], axis=-1, stable=True).astype(jnp.int32)


def walk_order(col_indptr, col_rows, num_block_rows: int):
    """``col_rows`` of ``column_view`` with each layout's block columns reordered for the Hopper one-pass backward,
    whose CTAs stream the q, do and dq rows of the block rows they walk (each column's list is a set: that kernel walks
    it in any order). The dq accumulator alone is twice the size of q, far over the L2 at training sizes, so the rows
    stay in L2 only where the CTAs running at one time walk the same block rows at the same time. They start about
    together and walk one block row per step, so the order should give each block row the same rank in every column
    that lists it. In increasing order (``column_view``'s) a block-causal layout gives block row r the rank r - c in
    column c (the CTAs walk a band of rows as wide as the wave), a band layout worse.

    Candidates, per layout: increasing (kept unless another is 10 % better); decreasing (block-causal: rank MB - 1 -
    r in every column); by the key ((MB - 1 - r) mod P, MB - 1 - r) with P the longest column's length (band layouts
    of P block rows: rank (MB - 1 - r) mod P in every column) or the work-weighted median length (band layouts with a
    few global columns). Score: the mean absolute deviation of each block row's ranks from their mean. Measured on
    an H200 at g = 8, 64 x 64 blocks, M = 8192 (forward + backward): block-causal 1.24x, a band of 16 block rows 1.32x,
    the band with two global columns 1.13x (lowering.py WALK_ORDER_MIN_BYTES: where it applies)."""
    lead, nnz = col_rows.shape[:-1], col_rows.shape[-1]
    NB, MB = col_indptr.shape[-1] - 1, num_block_rows
    if nnz == 0 or NB <= 0 or MB <= 0:
        return col_rows
    pos = jnp.arange(nnz, dtype=jnp.int32)

    def one(ci, cr):
        ci = jnp.clip(ci, 0, nnz)
        ci = jnp.maximum(ci, jax.lax.cummax(ci))  # (non-decreasing whatever a hand-made view holds)
        col = jnp.cumsum(jnp.zeros(nnz + 1, jnp.int32).at[ci[:NB]].add(1)[:nnz]) - 1   # as column_view's row
        valid = pos < ci[NB]
        col = jnp.where(valid, jnp.clip(col, 0, NB - 1), NB)
        start = jnp.where(valid, ci[jnp.minimum(col, NB - 1)], pos)
        end = jnp.where(valid, ci[jnp.minimum(col, NB - 1) + 1], pos + 1)
        row = jnp.clip(cr, 0, MB - 1)
        up = MB - 1 - row
        lens = ci[1:] - ci[:-1]
        by_len = jnp.sort(lens)[::-1]
        cum = jnp.cumsum(by_len)
        periods = (jnp.maximum(by_len[0], 1),
                   jnp.maximum(by_len[jnp.clip(jnp.searchsorted(cum, (cum[-1] + 1) // 2), 0, NB - 1)], 1))

        def by_period(P):  # the order's source positions and each entry's rank
            key = jnp.where(valid, (up % P) * ((MB + P - 1) // P) + up // P, pos)
            src = jax.lax.sort((col, key, pos), num_keys=2)[2]
            return src, jnp.zeros(nnz, jnp.int32).at[src].set(pos - start[src])

        n_row = jnp.zeros(MB, jnp.float32).at[row].add(valid.astype(jnp.float32))

        def score(rank):
            rank = rank.astype(jnp.float32)
            mean = jnp.zeros(MB, jnp.float32).at[row].add(jnp.where(valid, rank, 0.0)) / jnp.maximum(n_row, 1.0)
            return jnp.sum(jnp.where(valid, jnp.abs(rank - mean[row]), 0.0))

        reverse_src = jnp.where(valid, start + end - 1 - pos, pos)
        cands = [(reverse_src, end - 1 - pos)] + [by_period(P) for P in periods]
        scores = jnp.stack([score(r) for _, r in cands])
        best = jnp.argmin(scores)
        src = jnp.select([best == i for i in range(len(cands))], [s_ for s_, _ in cands])
        keep = ~(scores[best] < 0.9 * score(pos - start))
        return jnp.where(keep, cr, cr[src])

    out = jax.vmap(one)(col_indptr.reshape(-1, NB + 1), col_rows.reshape(-1, nnz))
    return out.reshape(lead + (nnz,))
