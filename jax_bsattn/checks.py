"""A checkify-based check of a layout, for layouts that are traced and so cannot be checked when built.

The kernels never read or write out of bounds whatever the layout holds (they clamp indptr and skip
out-of-range blocks); this check tells a user whose layout is malformed, instead of silently skipping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from .layout import BlockSparseLayout

__all__ = ["check_layout", "validate_layout"]


def check_layout(layout: BlockSparseLayout) -> None:
    """Adds checkify checks that ``layout`` is well formed; use inside a function wrapped in
    ``jax.experimental.checkify.checkify``. Checks: indptr starts at 0 and never decreases,
    ``indptr[..., -1] <= nnz``, every listed index in ``[0, NB)``, no block listed twice in a row."""
    indptr, indices = layout.indptr, layout.indices
    nnz, NB = layout.nnz, layout.num_block_cols
    checkify.check(jnp.all(indptr[..., 0] == 0), "jax_bsattn layout: indptr must start at 0")
    checkify.check(jnp.all(jnp.diff(indptr, axis=-1) >= 0), "jax_bsattn layout: indptr must never decrease")
    checkify.check(jnp.all(indptr[..., -1] <= nnz),
                   f"jax_bsattn layout: indptr[..., -1] must be <= nnz = {nnz} (blocks beyond nnz are dropped)")
    used = jnp.arange(nnz) < indptr[..., -1:]
    in_range = (indices >= 0) & (indices < NB)
    checkify.check(jnp.all(in_range | ~used), f"jax_bsattn layout: indices must lie in [0, NB) = [0, {NB})")
    checkify.check(jnp.all(layout.block_counts() <= 1), "jax_bsattn layout: a block is listed twice in a row")


def validate_layout(layout: BlockSparseLayout) -> None:
    """Runs :func:`check_layout` (jitted, so it works on traced-then-materialised layouts) and raises
    ``checkify.JaxRuntimeError`` naming the first failed check."""
    err, _ = jax.jit(checkify.checkify(lambda lay: check_layout(lay)))(layout)
    err.throw()
