"""The zigzag sequence order: load-balanced context parallelism for causal attention.

A sequence split into ``2S`` equal chunks is stored as chunk ``0, 2S-1, 1, 2S-2, ..., S-1, S``, so that ``S``
contiguous shards of the stored sequence (one per device along a mesh axis) each hold one early and one late chunk:
under a causal mask every shard then sees about as many keys as the others, where contiguous shards of the natural
order leave the last device with ``2S - 1`` times the first one's work. ``block_sparse_attention(...,
zigzag_shards=S)`` takes q, k, v (and gives o, lse) in this order; the layout, ``kv_lens`` and ``q_offset`` stay in
natural positions. A model keeps its tokens in the zigzag order from the start (``to_zigzag`` on the token ids and on
their positions, for rotary embeddings) and undoes it at the end (``from_zigzag``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["to_zigzag", "from_zigzag", "zigzag_chunks"]


def zigzag_chunks(shards: int) -> np.ndarray:
    """The natural chunk stored at each of the ``2 * shards`` chunk slots: ``[0, 2S-1, 1, 2S-2, ...]``."""
    t = np.arange(2 * shards)
    return np.where(t % 2 == 0, t // 2, 2 * shards - 1 - t // 2)


def _permute_chunks(x, shards, axis: int, inverse: bool):
    # by reshapes, a flip and a stack (no index array: custom_partitioning's inlined function takes no constants)
    import jax
    import jax.numpy as jnp
    pick = lambda a, i, ax: jax.lax.index_in_dim(a, i, axis=ax, keepdims=False)   # (a static slice)
    if not isinstance(shards, (int, np.integer)) or isinstance(shards, (bool, np.bool_)) or shards < 1:
        raise ValueError(f"shards must be a positive integer, got {shards!r}")
    S, axis, n = int(shards), axis % x.ndim, x.shape[axis]
    if n % (2 * S):
        raise ValueError(f"the sequence axis ({axis}, length {n}) must split into 2 x shards = {2 * S} equal chunks")
    lead, tail = x.shape[:axis], x.shape[axis + 1:]
    if inverse:   # stored [S, 2, L]: slot 2i holds chunk i, slot 2i + 1 chunk 2S - 1 - i
        pairs = x.reshape(lead + (S, 2, n // (2 * S)) + tail)
        early = pick(pairs, 0, axis + 1)
        late = jnp.flip(pick(pairs, 1, axis + 1), axis=axis)
        return jnp.concatenate([early, late], axis=axis).reshape(x.shape)
    halves = x.reshape(lead + (2, S, n // (2 * S)) + tail)
    early = pick(halves, 0, axis)
    late = jnp.flip(pick(halves, 1, axis), axis=axis)
    return jnp.stack([early, late], axis=axis + 1).reshape(x.shape)


def to_zigzag(x, shards: int, axis: int = -3):
    """``x`` with its sequence axis (default ``-3``, the op's ``[*B, S, H, D]``; token ids or positions ``[*B, S]``:
    ``axis=-1``) from natural to zigzag order for ``shards`` shards."""
    return _permute_chunks(x, shards, axis, inverse=False)


def from_zigzag(x, shards: int, axis: int = -3):
    """The inverse of :func:`to_zigzag`."""
    return _permute_chunks(x, shards, axis, inverse=True)
