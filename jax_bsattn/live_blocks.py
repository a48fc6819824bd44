"""Row lists without the blocks that lie wholly past their batch element's key count (``kv_lens``), built in XLA for
the CUDA kernels.

The kernels that walk a block row pack its listed blocks into key tiles by position (virtual key t: entry t / C, key
t % C), so they cannot skip a block whose keys are all past the length: they gather it as masked rows and compute its
tile. With those entries dropped here (a prefix sum and a scatter, O(nnz) per batch element) every tile they walk
holds live keys only. The result has one layout per batch element; the kernels' masks still cut the block that holds
the length. ``keep_blocks_below`` is the compaction itself, which the ring (partitioning.py) also applies to each
step's lists (the blocks of the key shard held).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

__all__ = ["drop_blocks_past_lengths", "drops_dead_blocks", "keep_blocks_below", "live_row_lists"]


def drops_dead_blocks(kv_lens, indptr, indices, q) -> bool:
    """Whether the CUDA lowering drops the dead blocks: with ``kv_lens`` (``[B]``, not ``[0]``), a non-empty layout,
    and lists that stay small. The lists hold one layout per batch element, so a layout shared over a large batch
    grows B-fold, and the backward's column view with it. They are built only where they take no more than a quarter of
    q's bytes, or no more than the layout itself (a per-batch layout), which keeps the op's extra memory O(q).
    BSATTN_KV_LIVE_LISTS=0: never (A / B; the kernels' masks alone then keep the keys past the lengths out)."""
    if kv_lens.shape[0] == 0 or indices.shape[-1] == 0 or os.environ.get("BSATTN_KV_LIVE_LISTS") == "0":
        return False
    layout_bytes = 4 * indices.shape[1] * (indices.shape[-1] + indptr.shape[-1])  # one layout's int32 indptr + indices
    return kv_lens.shape[0] * layout_bytes <= max(q.size * q.dtype.itemsize // 4, indices.shape[0] * layout_bytes)


def live_row_lists(indptr, indices, kv_lens, q, block_c: int, num_keys: int):
    """The row view the CUDA kernels take: ``drop_blocks_past_lengths``'s lists where ``drops_dead_blocks``, else the
    layout as given."""
    if drops_dead_blocks(kv_lens, indptr, indices, q):
        return drop_blocks_past_lengths(indptr, indices, kv_lens, block_c, num_keys)
    return indptr, indices


def drop_blocks_past_lengths(indptr, indices, kv_lens, block_c: int, num_keys: int):
    """``indptr [LB, LH, MB+1]`` (monotone, in ``[0, nnz]``: ``monotone_indptr``), ``indices [LB, LH, nnz]``,
    ``kv_lens`` int32 ``[B]`` -> ``indptr, indices [B, LH, ...]``: for batch element ``b`` each block row lists, in
    their order, the entries of its range with ``0 <= index < ceil(min(kv_lens[b], N) / C)`` (a block with a key below
    the length); ``indices`` past the new ``indptr[..., -1]`` are -1.

    Dropped entries take no part in the op either way (an index out of ``[0, NB)`` is skipped; a block past the length
    has no key that takes part), so the result means the same for each batch element.
    """
    B, (LH, nnz) = kv_lens.shape[0], indices.shape[1:]
    ip = jnp.broadcast_to(indptr, (B, LH, indptr.shape[-1]))
    ix = jnp.broadcast_to(indices, (B, LH, nnz))
    lens = jnp.clip(kv_lens, 0, num_keys)                  # (N + C < 2^31: the handlers' limits)
    return keep_blocks_below(ip, ix, (lens + (block_c - 1)) // block_c)   # (blocks with a key below the length)


def keep_blocks_below(indptr, indices, live_cols):
    """``indptr [L, LH, MB+1]`` (monotone, in ``[0, nnz]``), ``indices [L, LH, nnz]``, ``live_cols`` int32 ``[L]`` ->
    ``indptr, indices`` of the same shapes: each block row lists, in their order, the entries of its range with
    ``0 <= index < live_cols[l]``; ``indices`` past the new ``indptr[..., -1]`` are -1."""
    ip, ix, nnz = indptr, indices, indices.shape[-1]
    if nnz == 0:                                           # (nothing listed: every row empty)
        return jnp.zeros_like(indptr), indices
    pos = jnp.arange(nnz, dtype=jnp.int32)
    live = (ix >= 0) & (ix < live_cols[:, None, None]) & (pos >= ip[..., :1]) & (pos < ip[..., -1:])  # (in a row)
    upto = jnp.cumsum(live, axis=-1, dtype=jnp.int32)      # live entries at or before each position
    before = jnp.pad(upto, ((0, 0), (0, 0), (1, 0)))       # ... before each position, and in all (nnz + 1)
    new_ip = jnp.take_along_axis(before, ip, axis=-1)      # a row's range keeps exactly its live entries
    # dead entries: distinct slots out of range (the scatter's indices stay unique), dropped
    slot = jnp.where(live, upto - 1, nnz + pos)

    def compact(s, x):
        return jnp.full((nnz,), -1, jnp.int32).at[s].set(x, mode="drop", unique_indices=True)

    new_ix = jax.vmap(compact)(slot.reshape(-1, nnz), ix.reshape(-1, nnz)).reshape(ix.shape)
    return new_ip.astype(jnp.int32), new_ix
