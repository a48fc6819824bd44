"""The float32 reference: plain jax.numpy on a dense mask. The oracle of every test.

It follows the kernels' semantics exactly (csrc/README.md), including how a traced, malformed layout is read
(clamped indptr, skipped out-of-range blocks, a block listed twice counted twice).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .layout import BlockSparseLayout, expand_blocks

__all__ = ["block_sparse_attention_reference"]


def block_sparse_attention_reference(q, k, v, layout: BlockSparseLayout, *, scale=None, causal=False,
                                     logits_soft_cap=None, return_lse=False, deterministic=False):
    """Same signature and semantics as :func:`jax_bsattn.block_sparse_attention`, in float32 on a dense mask
    (``deterministic`` is accepted and has nothing to do: this is plain jax.numpy)."""
    from .attention import static_flag

    static_flag("deterministic", deterministic)
    return reference_in_dtype(q, k, v, layout, scale=scale, causal=causal, logits_soft_cap=logits_soft_cap,
                              return_lse=return_lse, compute_dtype=jnp.float32)


def reference_in_dtype(q, k, v, layout, *, scale=None, causal=False, logits_soft_cap=None, return_lse=False,
                       compute_dtype=jnp.float32):
    """The reference with its matmuls and softmax in ``compute_dtype``.

    In float32 it is the oracle; in the inputs' own dtype (bf16, f16) its distance to the oracle is the error
    budget the tests give a kernel.
    """
    from .attention import check_inputs, static_flag, static_float  # the public API's argument checks, shared

    shapes = check_inputs(q, k, v, layout, logits_soft_cap)
    batch, M, N, Hq, Hk, D = shapes.batch, shapes.M, shapes.N, shapes.Hq, shapes.Hk, shapes.D
    g = Hq // Hk
    scale = D ** -0.5 if scale is None else static_float("scale", scale)
    causal, return_lse = static_flag("causal", causal), static_flag("return_lse", return_lse)
    cd = jnp.dtype(compute_dtype)

    # Element weights [*L, M, N]: how many times each element's block is listed (0 = masked out).
    weights = expand_blocks(layout.block_counts(), layout.block_size, layout.seq_lens)
    weights = jnp.broadcast_to(weights, batch + (Hk, M, N))[..., None, :, :]   # [*B, Hk, 1, M, N]
    if causal:
        i = jnp.arange(M)[:, None]
        j = jnp.arange(N)[None, :]
        weights = jnp.where(j <= i + (N - M), weights, 0)
    w = weights.astype(cd)

    qh = jnp.moveaxis(q.reshape(batch + (M, Hk, g, D)), -4, -2).astype(cd)   # [*B, Hk, g, M, D]
    kh = jnp.swapaxes(k, -3, -2).astype(cd)[..., None, :, :]               # [*B, Hk, 1, N, D]
    vh = jnp.swapaxes(v, -3, -2).astype(cd)[..., None, :, :]
    s = jnp.einsum("...md,...nd->...mn", qh, kh, preferred_element_type=cd) * jnp.asarray(scale, cd)
    if logits_soft_cap is not None:
        c = jnp.asarray(logits_soft_cap, cd)
        s = c * jnp.tanh(s / c)
    live = weights > 0
    s_live = jnp.where(live, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s_live, axis=-1, keepdims=True))
    # (an empty row's -inf max -> 0; a +inf max stays, so inf - inf makes the row NaN, as the kernels do)
    m = jnp.where(m > -jnp.inf, m, jnp.zeros_like(m))
    p = w * jnp.exp(s_live - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    # denom > 0; 0 for an empty row; NaN where a NaN score took part (o and lse NaN then)
    nonempty, empty = denom > 0, denom == 0
    safe = jnp.where(nonempty, denom, jnp.ones_like(denom))
    o = jnp.einsum("...mn,...nd->...md", p, vh, preferred_element_type=cd)
    # an empty row is 0 exactly, even where v holds inf / NaN at keys it lists but cannot see (0 x inf)
    o = jnp.where(empty, jnp.zeros_like(o), o / safe)
    lse = jnp.where(nonempty, m + jnp.log(safe), jnp.where(empty, -jnp.inf, jnp.nan).astype(denom.dtype))

    o = jnp.moveaxis(o.reshape(batch + (Hq, M, D)), -3, -2).astype(q.dtype)    # [*B, M, Hq, D]
    if not return_lse:
        return o
    lse = jnp.swapaxes(lse.reshape(batch + (Hq, M)), -1, -2).astype(jnp.float32)
    return o, lse
