"""jit, grad, vmap (over every argument, layout arrays included), vmap(grad), jit(vmap(grad)), checkpoint,
and layouts decided inside jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bsattn as jb
from jax_bsattn.reference import block_sparse_attention_reference as ref
from conftest import random_mask, random_problem

M, N, R, C = 32, 40, 8, 8
MB, NB = 4, 5


def _count(fn, *args, prim="bsattn_fwd"):
    """How many times `prim` is bound in the jaxpr of fn, sub-jaxprs included."""
    from jax.extend.core import subjaxprs

    def walk(jp):
        return sum(e.primitive.name == prim for e in jp.eqns) + sum(walk(s) for s in subjaxprs(jp))
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    q, k, v = random_problem(rng, batch=(3,), M=M, N=N, Hq=4, Hk=2, D=16)
    masks = random_mask(rng, (3,), MB, NB, 0.5)
    return q, k, v, masks


def _layouts(masks):
    return jb.BlockSparseLayout.from_block_mask(masks, (R, C), (M, N), nnz=MB * NB)


def test_vmap_over_everything_is_one_kernel_call(problem):
    q, k, v, masks = problem
    lay = _layouts(masks)

    def f(q, k, v, indptr, indices):
        layout = jb.BlockSparseLayout.from_csr(indptr, indices, (R, C), (M, N))
        return jb.block_sparse_attention(q, k, v, layout, causal=True)

    def g(q, k, v, indptr, indices):
        return ref(q, k, v, jb.BlockSparseLayout.from_csr(indptr, indices, (R, C), (M, N)), causal=True)

    # (one layout array mapped and not the other: e.g. a per-example row cutoff in indptr over shared indices)
    for in_axes in [(0, 0, 0, 0, 0), (0, None, None, None, None), (None, 0, 0, None, None),
                    (None, None, None, 0, 0), (0, 0, 0, None, None), (1, 1, 1, 0, 0), (None, None, None, 0, None),
                    (None, None, None, None, 0), (0, None, None, None, 0)]:
        args = [q, k, v, lay.indptr, lay.indices]
        args = [a if ax != 1 else jnp.moveaxis(a, 0, 1) for a, ax in zip(args, in_axes)]
        args = [a if ax is not None else a[0] for a, ax in zip(args, in_axes)]
        vf = jax.vmap(f, in_axes=in_axes)
        assert _count(vf, *args) == 1
        np.testing.assert_allclose(np.asarray(jax.jit(vf)(*args)), np.asarray(jax.vmap(g, in_axes=in_axes)(*args)),
                                   rtol=1e-4, atol=1e-5)


def test_nested_vmap_and_grad(problem):
    q, k, v, masks = problem
    lay = _layouts(masks)
    qq = jnp.stack([q, q * 0.5])

    def loss(fn):
        def f(q, k, v, indptr, indices):
            layout = jb.BlockSparseLayout.from_csr(indptr, indices, (R, C), (M, N))
            return jnp.sum(jnp.sin(fn(q, k, v, layout, logits_soft_cap=5.0)))
        return f

    for wrap in (lambda f: jax.vmap(jax.vmap(jax.grad(f, argnums=(0, 1, 2)), (0, 0, 0, 0, 0)), (0, None, None, None, None)),
                 lambda f: jax.jit(jax.vmap(jax.vmap(jax.grad(f, argnums=(0, 1, 2)), (0, 0, 0, 0, 0)),
                                            (0, None, None, None, None)))):
        got = wrap(loss(jb.block_sparse_attention))(qq, k, v, lay.indptr, lay.indices)
        want = wrap(loss(ref))(qq, k, v, lay.indptr, lay.indices)
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_grad_under_vmap_over_one_layout_array(problem):
    """A per-example row cutoff: indptr mapped, indices shared (the two fold to the same layout batch)."""
    q, k, v, masks = problem
    lay = _layouts(masks)

    def loss(fn):
        def f(q, k, v, cut):
            ip = jnp.where(jnp.arange(MB + 1) <= cut, lay.indptr[0], lay.indptr[0][cut])
            layout = jb.BlockSparseLayout.from_csr(ip, lay.indices[0], (R, C), (M, N))
            return jnp.sum(jnp.sin(fn(q, k, v, layout, causal=True)))
        return f

    cuts = jnp.array([1, 2, 4])
    got = jax.jit(jax.vmap(jax.grad(loss(jb.block_sparse_attention), argnums=(0, 1, 2))))(q, k, v, cuts)
    want = jax.vmap(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v, cuts)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_grad_wrt_unbatched_args_under_vmap(problem):
    """vmap over q only, gradient w.r.t. the shared k, v: cotangents are summed over the batch."""
    q, k, v, masks = problem
    layout = jb.BlockSparseLayout.from_block_mask(masks[0], (R, C), (M, N))

    def total(fn):
        return lambda k, v: jnp.sum(jax.vmap(lambda qi: fn(qi, k[0], v[0], layout))(q) ** 2)

    got = jax.grad(total(jb.block_sparse_attention), argnums=(0, 1))(k, v)
    want = jax.grad(total(ref), argnums=(0, 1))(k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_checkpoint(problem):
    q, k, v, masks = problem
    layout = jb.BlockSparseLayout.from_block_mask(masks[:, None], (R, C), (M, N))   # per batch element

    def loss(fn):
        @jax.checkpoint
        def block(q, k, v):
            return fn(q, k, v, layout, causal=True)
        return lambda q, k, v: jnp.sum(block(block(q, k, v), k, v) ** 2)

    got = jax.jit(jax.grad(loss(jb.block_sparse_attention), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_layout_chosen_inside_jit_topk_routing():
    """MoBA-style routing: each query block keeps the top-k key blocks by mean-pooled score, under jit."""
    rng = np.random.default_rng(2)
    q, k, v = random_problem(rng, M=M, N=N, Hq=2, Hk=1, D=16)
    topk = 2

    def routed(fn, q, k, v):
        qb = q.reshape(MB, R, 2, 16).mean((1, 2))
        kb = k.reshape(NB, C, 1, 16).mean((1, 2))
        scores = qb @ kb.T
        cols = jnp.sort(jax.lax.top_k(scores, topk)[1], axis=-1).astype(jnp.int32)
        indptr = jnp.arange(MB + 1, dtype=jnp.int32) * topk
        layout = jb.BlockSparseLayout.from_csr(indptr, cols.reshape(-1), (R, C), (M, N))
        return fn(q, k, v, layout)

    got = jax.jit(lambda q, k, v: routed(jb.block_sparse_attention, q, k, v))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(routed(ref, q, k, v)), rtol=1e-4, atol=1e-5)
    g = jax.jit(jax.grad(lambda q: jnp.sum(routed(jb.block_sparse_attention, q, k, v) ** 2)))(q)
    g_ref = jax.grad(lambda q: jnp.sum(routed(ref, q, k, v) ** 2))(q)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-4, atol=1e-5)


def test_layout_arrays_get_zero_cotangent_and_are_not_differentiated(problem):
    q, k, v, masks = problem
    lay = jb.BlockSparseLayout.from_block_mask(masks[:, None], (R, C), (M, N))   # per batch element
    grads = jax.grad(lambda q, lay: jnp.sum(jb.block_sparse_attention(q, k, v, lay)), argnums=(0, 1),
                     allow_int=True)(q, lay)
    assert grads[1].indptr.dtype == jax.dtypes.float0


def test_second_derivative_is_refused_with_a_message(problem):
    # first order only: a gradient's own derivative names the op instead of jax's "Differentiation rule ... not
    # implemented" for an internal primitive
    q, k, v, masks = problem
    lay = jb.BlockSparseLayout.from_block_mask(masks[:, None], (R, C), (M, N))   # per batch element
    grad_q = jax.grad(lambda q: jnp.sum(jb.block_sparse_attention(q, k, v, lay) ** 2))
    assert np.isfinite(np.asarray(grad_q(q))).all()
    for second in (jax.grad(lambda q: jnp.sum(grad_q(q))), jax.hessian(lambda q: jnp.sum(
            jb.block_sparse_attention(q, k, v, lay) ** 2))):
        with pytest.raises(NotImplementedError, match="block_sparse_attention has a first derivative only"):
            second(q)
