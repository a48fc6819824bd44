"""Products over the listed elements of a block-sparse score matrix only, as the kernels take them.

An inf / NaN in q, k, v or a cotangent reaches the rows and keys that list it, never through a 0 at an unlisted
element (a dense matmul's 0 x inf). The float32 reference's products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["attention_over_listed", "listed_product", "listed_scores"]


# The two products, each the other's transpose, over the listed elements only ([..., M, N] bool `listed`):
#   listed_scores(a, b)[m, n] = a[m] . b[n] where listed, else 0          (a [..., M, D], b [..., N, D])
#   listed_product(p, b)[m, d] = sum over listed n of p[m, n] b[n, d]     (p [..., M, N], b [..., N, D])
# with the leading dimensions broadcast (`listed` and b take the g query heads' dimension as 1). Each one's VJP is
# written with the pair, so gradients skip unlisted elements as well.

def _inputs_as_residuals(f):
    return lambda *args: (f(*args), args)


def _summed_to(x, shape):  # a cotangent of a broadcast operand: summed over the broadcast dimensions
    axes = tuple(i for i, (n, want) in enumerate(zip(x.shape, shape)) if n != want)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


@jax.custom_vjp
def listed_scores(a, b, listed):
    s = jnp.einsum("...md,...nd->...mn", a, b, preferred_element_type=a.dtype)
    return jnp.where(listed, s, jnp.zeros_like(s))


def listed_scores_bwd(res, ds):
    a, b, listed = res
    db = listed_product(jnp.swapaxes(ds, -1, -2), a, jnp.swapaxes(listed, -1, -2))
    return listed_product(ds, b, listed), _summed_to(db, b.shape), None


listed_scores.defvjp(_inputs_as_residuals(listed_scores), listed_scores_bwd)


@jax.custom_vjp
def listed_product(p, b, listed):
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


def listed_product_bwd(res, do):
    p, b, listed = res
    db = listed_product(jnp.swapaxes(p, -1, -2), do, jnp.swapaxes(listed, -1, -2))
    return listed_scores(do, b, listed), _summed_to(db, b.shape), None


listed_product.defvjp(_inputs_as_residuals(listed_product), listed_product_bwd)


def attention_over_listed(q, k, v, weights, scale, softcap, listed):
    """Softmax attention of ``q [..., M, D]`` over ``k, v [..., N, D]`` in q's dtype, each element counted ``weights``
    times (``[..., M, N]``, 0: masked): ``o [..., M, D]`` and ``lse [..., M, 1]``. A row with no element: o = 0,
    lse = -inf; a NaN score taking part: the row NaN. ``softcap``: None / 0 for none.

    ``listed`` (a superset of weights > 0): the elements the products take, through listed_scores / listed_product."""
    live = weights > 0
    cd = q.dtype
    s = listed_scores(q, k, listed)
    s = s * jnp.asarray(scale, cd)
    if softcap:
        c = jnp.asarray(softcap, cd)
        s = c * jnp.tanh(s / c)
    s_live = jnp.where(live, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s_live, axis=-1, keepdims=True))
    # (an empty row's -inf max -> 0; a +inf max stays and a NaN score makes it NaN (a reduction's max need not), so
    # the row's p is NaN at every element, as the kernels')
    m = jnp.where(jnp.isnan(s_live).any(axis=-1, keepdims=True), jnp.full_like(m, jnp.nan),
                  jnp.where(m == -jnp.inf, jnp.zeros_like(m), m))
    p = weights * jnp.exp(s_live - m)   # (a NaN m makes the row's p NaN at every element it multiplies, as the kernels)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    # denom > 0; 0 for an empty row; NaN where a NaN score took part (o and lse NaN then)
    nonempty, empty = denom > 0, denom == 0
    safe = jnp.where(nonempty, denom, jnp.ones_like(denom))
    o = listed_product(p, v, listed)
    # an empty row is 0 exactly, even where v holds inf / NaN at keys it lists but cannot see (0 x inf)
    o = jnp.where(empty, jnp.zeros_like(o), o / safe)
    lse = jnp.where(nonempty, m + jnp.log(safe), jnp.where(empty, -jnp.inf, jnp.nan).astype(denom.dtype))
    return o, lse
