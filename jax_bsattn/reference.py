"""The float32 reference: plain jax.numpy on a dense mask. The oracle of every test.

It follows the kernels' semantics exactly (csrc/README.md), including how a traced, malformed layout is read
(clamped indptr, skipped out-of-range blocks, a block listed twice counted twice). Its products (q k^T, p v and
their gradients) take only the elements of listed blocks: an inf / NaN in q, k, v or the cotangent reaches the rows
and keys that list it, as in the kernels, never through a 0 at an unlisted element (a dense matmul's 0 x inf).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .layout import BlockSparseLayout, expand_blocks
from .primitives import to_common_variance

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
    from .attention import as_jax_arrays, check_inputs, static_flag, static_float  # the public API's checks, shared

    q, k, v = as_jax_arrays(q, k, v)
    shapes = check_inputs(q, k, v, layout, logits_soft_cap)
    # inside shard_map: q, k, v and the layout's arrays made to vary alike (the custom VJPs below need it)
    q, k, v, *arrays = to_common_variance(q, k, v, *jax.tree_util.tree_leaves(layout))
    layout = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(layout), arrays)
    batch, M, N, Hq, Hk, D = shapes.batch, shapes.M, shapes.N, shapes.Hq, shapes.Hk, shapes.D
    g = Hq // Hk
    scale = D ** -0.5 if scale is None else static_float("scale", scale)
    causal, return_lse = static_flag("causal", causal), static_flag("return_lse", return_lse)
    cd = jnp.dtype(compute_dtype)

    # Element weights [*L, M, N]: how many times each element's block is listed (0 = masked out).
    weights = expand_blocks(layout.block_counts(), layout.block_size, layout.seq_lens)
    weights = jnp.broadcast_to(weights, batch + (Hk, M, N))[..., None, :, :]   # [*B, Hk, 1, M, N]
    # The elements the kernels multiply: those of listed blocks, at p = 0 where the causal mask hides them, but not
    # of a block that no row of its block row sees (the kernels skip it).
    listed = weights > 0   # [*B, Hk, 1, M, N]
    if causal:
        R, C = layout.block_size
        i = jnp.arange(M)[:, None]
        j = jnp.arange(N)[None, :]
        last_row_of_block_row = jnp.minimum(i // R * R + R, M) - 1
        listed = listed & (j // C * C <= last_row_of_block_row + (N - M))
        weights = jnp.where(j <= i + (N - M), weights, 0)
    w = weights.astype(cd)

    qh = jnp.moveaxis(q.reshape(batch + (M, Hk, g, D)), -4, -2).astype(cd)   # [*B, Hk, g, M, D]
    kh = jnp.swapaxes(k, -3, -2).astype(cd)[..., None, :, :]               # [*B, Hk, 1, N, D]
    vh = jnp.swapaxes(v, -3, -2).astype(cd)[..., None, :, :]
    s = _listed_scores(qh, kh, listed) * jnp.asarray(scale, cd)
    if logits_soft_cap is not None:
        c = jnp.asarray(logits_soft_cap, cd)
        s = c * jnp.tanh(s / c)
    live = weights > 0
    s_live = jnp.where(live, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s_live, axis=-1, keepdims=True))
    # (an empty row's -inf max -> 0; a +inf max stays and a NaN score makes it NaN (a reduction's max need not), so
    # the row's p is NaN at every element, as the kernels')
    m = jnp.where(jnp.isnan(s_live).any(axis=-1, keepdims=True), jnp.full_like(m, jnp.nan),
                  jnp.where(m == -jnp.inf, jnp.zeros_like(m), m))
    p = w * jnp.exp(s_live - m)   # (a NaN m makes the row's p NaN at every element it multiplies, as the kernels)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    # denom > 0; 0 for an empty row; NaN where a NaN score took part (o and lse NaN then)
    nonempty, empty = denom > 0, denom == 0
    safe = jnp.where(nonempty, denom, jnp.ones_like(denom))
    o = _listed_product(p, vh, listed)
    # an empty row is 0 exactly, even where v holds inf / NaN at keys it lists but cannot see (0 x inf)
    o = jnp.where(empty, jnp.zeros_like(o), o / safe)
    lse = jnp.where(nonempty, m + jnp.log(safe), jnp.where(empty, -jnp.inf, jnp.nan).astype(denom.dtype))

    o = jnp.moveaxis(o.reshape(batch + (Hq, M, D)), -3, -2).astype(q.dtype)    # [*B, M, Hq, D]
    if not return_lse:
        return o
    lse = jnp.swapaxes(lse.reshape(batch + (Hq, M)), -1, -2).astype(jnp.float32)
    return o, lse


# The two products, each the other's transpose, over the listed elements only ([..., M, N] bool `listed`):
#   _listed_scores(a, b)[m, n] = a[m] . b[n] where listed, else 0          (a [..., M, D], b [..., N, D])
#   _listed_product(p, b)[m, d] = sum over listed n of p[m, n] b[n, d]     (p [..., M, N], b [..., N, D])
# with the leading dimensions broadcast (`listed` and b take the g query heads' dimension as 1). Each one's VJP is
# written with the pair, so gradients skip unlisted elements as well.

def _inputs_as_residuals(f):
    return lambda *args: (f(*args), args)


def _summed_to(x, shape):  # a cotangent of a broadcast operand: summed over the broadcast dimensions
    axes = tuple(i for i, (n, want) in enumerate(zip(x.shape, shape)) if n != want)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


@jax.custom_vjp
def _listed_scores(a, b, listed):
    s = jnp.einsum("...md,...nd->...mn", a, b, preferred_element_type=a.dtype)
    return jnp.where(listed, s, jnp.zeros_like(s))


def _listed_scores_bwd(res, ds):
    a, b, listed = res
    db = _listed_product(jnp.swapaxes(ds, -1, -2), a, jnp.swapaxes(listed, -1, -2))
    return _listed_product(ds, b, listed), _summed_to(db, b.shape), None


_listed_scores.defvjp(_inputs_as_residuals(_listed_scores), _listed_scores_bwd)


@jax.custom_vjp
def _listed_product(p, b, listed):
    p = jnp.where(listed, p, jnp.zeros_like(p))
    finite = jnp.isfinite(b)
    out = jnp.einsum("...mn,...nd->...md", p, jnp.where(finite, b, jnp.zeros_like(b)), preferred_element_type=p.dtype)

    def with_nonfinite(out):  # what inf / NaN in b make of the sums they take part in (counted by 0/1 products)
        def meets(rows, cols):  # [..., M, D]: some listed n with rows[m, n] and cols[n, d]
            return jnp.einsum("...mn,...nd->...md", rows.astype(jnp.float32), cols.astype(jnp.float32)) > 0

        pos, neg = listed & (p > 0), listed & (p < 0)
        nan = meets(listed, jnp.isnan(b)) | meets(listed & (p == 0), jnp.isinf(b))   # (0 x inf)
        up = meets(pos, b == jnp.inf) | meets(neg, b == -jnp.inf)
        down = meets(pos, b == -jnp.inf) | meets(neg, b == jnp.inf)
        special = jnp.where(up, jnp.inf, -jnp.inf).astype(out.dtype)
        return jnp.where(nan | (up & down), jnp.nan, jnp.where(up | down, special, out)).astype(out.dtype)

    return jax.lax.cond(jnp.all(finite), lambda o: o, with_nonfinite, out)


def _listed_product_bwd(res, do):
    p, b, listed = res
    db = _listed_product(jnp.swapaxes(p, -1, -2), do, jnp.swapaxes(listed, -1, -2))
    return _listed_scores(do, b, listed), _summed_to(db, b.shape), None


_listed_product.defvjp(_inputs_as_residuals(_listed_product), _listed_product_bwd)
