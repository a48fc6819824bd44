"""The float32 reference: plain jax.numpy on a dense mask. The oracle of every test.

It follows the kernels' semantics exactly (csrc/README.md), including how a traced, malformed layout is read
(clamped indptr, skipped out-of-range blocks, a block listed twice counted twice). Its products (q k^T, p v and
their gradients) take only the elements of listed blocks: an inf / NaN in q, k, v or the cotangent reaches the rows
and keys that list it, as in the kernels, never through a 0 at an unlisted element (a dense matmul's 0 x inf).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .per_sequence import canonical_kv_lens, canonical_q_offset
from .layout import BlockSparseLayout, expand_blocks
from .listed import attention_over_listed
from .primitives import to_common_variance
from .zigzag import from_zigzag, to_zigzag

__all__ = ["block_sparse_attention_reference"]


def block_sparse_attention_reference(q, k, v, layout: BlockSparseLayout, *, scale=None, causal=False,
                                     logits_soft_cap=None, return_lse=False, deterministic=False, kv_lens=None,
                                     q_offset=None, context_parallel="all_gather", zigzag_shards=None,
                                     sequence_axis=None):
    """Same signature and semantics as :func:`jax_bsattn.block_sparse_attention`, in float32 on a dense mask
    (``deterministic`` and ``context_parallel`` are accepted and have nothing to do: this is plain jax.numpy;
    ``zigzag_shards``: q, k, v put in natural order, o and lse back in zigzag order; ``sequence_axis``: inside
    shard_map, q, k, v all-gathered over the axes, and this device's rows of o and lse kept)."""
    from .attention import (as_jax_arrays, check_inputs, check_sequence_split, is_ring, sequence_axes, static_flag,
                            zigzag_order_shards)

    static_flag("deterministic", deterministic)
    is_ring("context_parallel", context_parallel)
    q, k, v = as_jax_arrays(q, k, v)
    if sequence_axis is not None:          # the whole sequences on every device; this device's rows kept
        axes, parts = sequence_axes(sequence_axis)
        if not all(getattr(x, "ndim", 0) >= 3 for x in (q, k, v)):
            check_inputs(q, k, v, layout, logits_soft_cap)  # (it says what is wrong with them, before the gather)
        Ml = q.shape[-3]
        whole = [jax.lax.all_gather(x, axes, axis=x.ndim - 3, tiled=True) for x in (q, k, v)]
        check_inputs(*whole, layout, logits_soft_cap)
        check_sequence_split(sequence_axis, parts, zigzag_shards, Ml, layout)     # (as the op)
        out = block_sparse_attention_reference(*whole, layout, scale=scale, causal=causal,
                                               logits_soft_cap=logits_soft_cap, return_lse=True, kv_lens=kv_lens,
                                               q_offset=q_offset, zigzag_shards=zigzag_shards)
        first = jax.lax.axis_index(axes) * Ml
        o, lse = (jax.lax.dynamic_slice_in_dim(x, first, Ml, axis=x.ndim - d) for x, d in zip(out, (3, 2)))
        return (o, lse) if return_lse else o
    if zigzag_shards is not None:
        check_inputs(q, k, v, layout, logits_soft_cap)     # (before the shapes are read)
    S = zigzag_order_shards(zigzag_shards, q, k, layout)
    if S:
        q, k, v = (from_zigzag(x, S) for x in (q, k, v))
    out = reference_in_dtype(q, k, v, layout, scale=scale, causal=causal, logits_soft_cap=logits_soft_cap,
                             return_lse=return_lse, compute_dtype=jnp.float32, kv_lens=kv_lens, q_offset=q_offset)
    if S:   # (o [*B, M, Hq, D], lse [*B, M, Hq]: the sequence at -3 and -2)
        out = (to_zigzag(out[0], S), to_zigzag(out[1], S, axis=-2)) if return_lse else to_zigzag(out, S)
    return out


def reference_in_dtype(q, k, v, layout, *, scale=None, causal=False, logits_soft_cap=None, return_lse=False,
                       compute_dtype=jnp.float32, kv_lens=None, q_offset=None):
    """The reference with its matmuls and softmax in ``compute_dtype``.

    In float32 it is the oracle; in the inputs' own dtype (bf16, f16) its distance to the oracle is the error
    budget the tests give a kernel.
    """
    from .attention import (as_jax_arrays, check_inputs, check_per_sequence, check_q_offset_causal, static_flag,
                            static_float)  # the API's checks

    q, k, v = as_jax_arrays(q, k, v)
    shapes = check_inputs(q, k, v, layout, logits_soft_cap)
    check_per_sequence("kv_lens", kv_lens, shapes.batch)
    check_per_sequence("q_offset", q_offset, shapes.batch)
    # inside shard_map: q, k, v and the layout's arrays made to vary alike (the custom VJPs below need it)
    q, k, v, *arrays = to_common_variance(q, k, v, *jax.tree_util.tree_leaves(layout))
    layout = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(layout), arrays)
    batch, M, N, Hq, Hk, D = shapes.batch, shapes.M, shapes.N, shapes.Hq, shapes.Hk, shapes.D
    g = Hq // Hk
    scale = D ** -0.5 if scale is None else static_float("scale", scale)
    causal, return_lse = static_flag("causal", causal), static_flag("return_lse", return_lse)
    check_q_offset_causal(q_offset, causal)
    cd = jnp.dtype(compute_dtype)

    # Element weights [*L, M, N]: how many times each element's block is listed (0 = masked out).
    weights = expand_blocks(layout.block_counts(), layout.block_size, layout.seq_lens)
    weights = jnp.broadcast_to(weights, batch + (Hk, M, N))[..., None, :, :]   # [*B, Hk, 1, M, N]
    if kv_lens is not None:  # keys at or past a sequence's length: as if no block listed them
        lens = canonical_kv_lens(kv_lens, batch, N).reshape(batch + (1, 1, 1, 1))  # (clipped: no int32 wrap)
        weights = jnp.where(jnp.arange(N) < lens, weights, 0)
    # The elements the kernels multiply: those of listed blocks, at p = 0 where the causal mask hides them, but not
    # of a block that no row of its block row sees (the kernels skip it).
    listed = weights > 0   # [*B, Hk, 1, M, N]
    if causal:
        R, C = layout.block_size
        # key j seen by query row i where j <= i + shift; shift [*B, 1, 1, 1, 1]: N - M, or the clipped q_offset
        shift = (N - M if q_offset is None
                 else canonical_q_offset(q_offset, batch, M, N).reshape(batch + (1, 1, 1, 1)))
        i = jnp.arange(M)[:, None]
        j = jnp.arange(N)[None, :]
        last_row_of_block_row = jnp.minimum(i // R * R + R, M) - 1
        listed = listed & (j // C * C <= last_row_of_block_row + shift)
        weights = jnp.where(j <= i + shift, weights, 0)
    w = weights.astype(cd)

    qh = jnp.moveaxis(q.reshape(batch + (M, Hk, g, D)), -4, -2).astype(cd)   # [*B, Hk, g, M, D]
    kh = jnp.swapaxes(k, -3, -2).astype(cd)[..., None, :, :]               # [*B, Hk, 1, N, D]
    vh = jnp.swapaxes(v, -3, -2).astype(cd)[..., None, :, :]
    o, lse = attention_over_listed(qh, kh, vh, w, scale, logits_soft_cap, listed)

    o = jnp.moveaxis(o.reshape(batch + (Hq, M, D)), -3, -2).astype(q.dtype)    # [*B, M, Hq, D]
    if not return_lse:
        return o
    lse = jnp.swapaxes(lse.reshape(batch + (Hq, M)), -1, -2).astype(jnp.float32)
    return o, lse
