"""The column view of a layout (for each block column, the block rows that list it), built in XLA.

The backward kernel for dk / dv walks block columns; this builds their lists on the device from the (possibly
traced) row view, with static sizes and no dense mask: O(nnz log nnz) work per layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["column_view", "column_order"]


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
