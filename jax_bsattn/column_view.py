"""The column view of a layout (for each block column, the block rows that list it), built in XLA.

The backward kernel for dk / dv walks block columns; this builds their lists on the device from the (possibly
traced) row view, with static sizes and no dense mask: O(nnz log nnz) work per layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["column_view", "column_order", "walk_order"]


def _segment_of(ptr, n: int):
    """For each position 0 .. n - 1 of a CSR list, its segment: the last i with ``ptr[i] <= pos`` (-1 before
    ``ptr[0]``), as a histogram of the starts + a prefix sum: no binary search, whose while loop costs XLA a kernel
    launch or more per level."""
    return jnp.cumsum(jnp.zeros(n + 1, jnp.int32).at[jnp.clip(ptr, 0, n)].add(1)[:n]) - 1


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
        # The block row of each entry and each column's first entry (the number of listed entries with a smaller
        # column), as histograms + prefix sums.
        row = _segment_of(ip, nnz)
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

    Candidates, per layout: increasing (kept unless another scores under ``_WALK_GAIN`` of it); decreasing
    (block-causal: rank MB - 1 - r in every column); by the key ((MB - 1 - r) mod P, MB - 1 - r) with P the longest
    column's length (band layouts of P block rows: rank (MB - 1 - r) mod P in every column) or the work-weighted median
    length (bands with a few global columns). Candidates may coincide (a block-causal layout's longest column spans all
    MB rows: the first key is then the decreasing order); ties go to the earlier one. Score: the sum over the entries
    of the absolute deviation of their rank from their block row's mean rank. Integer sums, so the choice (and with it
    the kernel's dk / dv summation order) is the same on every run. Measured: ``BENCHMARKS.md``, twenty-sixth session.

    Takes ``column_view``'s output (``col_indptr`` non-decreasing from 0); on any other input the result is still a
    permutation of ``col_rows``. Layouts of 2^31 blocks or more keep the increasing order (int32 rank sums)."""
    lead, nnz = col_rows.shape[:-1], col_rows.shape[-1]
    NB, MB = col_indptr.shape[-1] - 1, num_block_rows
    if nnz == 0 or NB <= 0 or MB <= 0 or MB * NB >= 2**31:
        return col_rows
    pos = jnp.arange(nnz, dtype=jnp.int32)

    def one(ci, cr):
        ci = jax.lax.cummax(jnp.clip(ci, 0, nnz))        # (as it is for column_view's; any input: still ranges)
        col = _segment_of(ci[:NB], nnz)
        valid = (col >= 0) & (pos < ci[NB])             # the listed entries; the rest keep their place
        col = jnp.where(valid, col, jnp.where(col < 0, -1, NB))
        start = jnp.where(valid, ci[jnp.clip(col, 0, NB - 1)], pos)
        end = jnp.where(valid, ci[jnp.clip(col, 0, NB - 1) + 1], pos + 1)
        row = jnp.clip(cr, 0, MB - 1)
        from_bottom = MB - 1 - row
        by_len = jnp.sort(ci[1:] - ci[:-1])[::-1]
        cum = jnp.cumsum(by_len)
        periods = (jnp.maximum(by_len[0], 1),
                   jnp.maximum(by_len[jnp.clip(jnp.searchsorted(cum, (cum[-1] + 1) // 2), 0, NB - 1)], 1))

        def by_period(P):  # the order's source positions and each entry's rank in its column
            key = jnp.where(valid, (from_bottom % P) * ((MB + P - 1) // P) + from_bottom // P, pos)
            src = jax.lax.sort((col, key, pos), num_keys=2, is_stable=True)[2]
            return src, jnp.zeros(nnz, jnp.int32).at[src].set(pos - start[src])

        n_row = jnp.zeros(MB, jnp.int32).at[row].add(valid.astype(jnp.int32))

        def score(rank):  # (exact int32 sums where no block is listed twice: ranks < MB, n_row <= NB)
            total = jnp.zeros(MB, jnp.int32).at[row].add(jnp.where(valid, rank, 0))
            mean = total.astype(jnp.float32) / jnp.maximum(n_row, 1).astype(jnp.float32)
            return jnp.sum(jnp.where(valid, jnp.abs(rank.astype(jnp.float32) - mean[row]), 0.0))

        # candidate 0: increasing (as given); 1: decreasing; then the two keyed orders
        cands = [(pos, pos - start), (jnp.where(valid, start + end - 1 - pos, pos), end - 1 - pos)]
        cands += [by_period(P) for P in periods]
        scores = jnp.stack([score(rank) for _, rank in cands])
        best = 1 + jnp.argmin(scores[1:])
        src = jnp.stack([s_ for s_, _ in cands])[best]
        return jnp.where(scores[best] >= _WALK_GAIN * scores[0], cr, cr[src])

    out = jax.vmap(one)(col_indptr.reshape(-1, NB + 1), col_rows.reshape(-1, nnz))
    return out.reshape(lead + (nnz,))


# walk_order keeps the increasing order unless a candidate's score is under this fraction of its score.
_WALK_GAIN = 0.9
