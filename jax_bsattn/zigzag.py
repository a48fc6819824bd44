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
    # by slices and one concatenation: no index array (custom_partitioning's inlined function takes no constants)
    # and no reshape of the sequence axis (which jax refuses on an axis sharded over explicit mesh axes)
    import jax
    import jax.numpy as jnp
    if not isinstance(shards, (int, np.integer)) or isinstance(shards, (bool, np.bool_)) or shards < 1:
        raise ValueError(f"shards must be a positive integer, got {shards!r}")
    S, axis, n = int(shards), axis % x.ndim, x.shape[axis]
    if n % (2 * S):
        raise ValueError(f"the sequence axis ({axis}, length {n}) must split into 2 x shards = {2 * S} equal chunks")
    L, order = n // (2 * S), zigzag_chunks(S)
    order = np.argsort(order) if inverse else order      # the source chunk of each chunk of the result
    return jnp.concatenate([jax.lax.slice_in_dim(x, int(c) * L, (int(c) + 1) * L, axis=axis) for c in order],
                           axis=axis)


def to_zigzag(x, shards: int, axis: int = -3):
    """``x`` with its sequence axis (default ``-3``, the op's ``[*B, S, H, D]``; token ids or positions ``[*B, S]``:
    ``axis=-1``) from natural to zigzag order for ``shards`` shards."""
    return _permute_chunks(x, shards, axis, inverse=False)


def from_zigzag(x, shards: int, axis: int = -3):
    """The inverse of :func:`to_zigzag`."""
    return _permute_chunks(x, shards, axis, inverse=True)
